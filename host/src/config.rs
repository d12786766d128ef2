//! The one place for configuration: the TOML file, its defaults, and how a
//! handler's effective settings are resolved from its manifest and the file.
//!
//! Every knob is documented here with its default and what goes wrong when
//! it is set badly. Unknown keys are errors, so a typo never silently falls
//! back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::guest::CallLimits;
use crate::manifest::{Manifest, Subscription};
use crate::runtime::{CallBudget, RuntimeConfig};
use crate::state::Durability;

/// The host configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Folder of handler `.wasm` files. Default `handlers`.
    pub handlers_dir: PathBuf,
    /// Folder of the state database. Default `state`. Losing it loses
    /// handler state and the dedupe records that make redeliveries safe.
    pub state_path: PathBuf,
    /// `full` (default): every commit is fsynced before its event is acked.
    /// `normal`: survives crashes but may lose the last commits on power
    /// loss, trading that for throughput.
    pub durability: Durability,
    /// Engine-wide limits.
    pub runtime: RuntimeConfig,
    /// Settings applied to every handler unless its own section overrides.
    pub defaults: HandlerConfig,
    /// Per-handler settings, by handler name (the manifest's `name`).
    pub handlers: BTreeMap<String, HandlerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            handlers_dir: PathBuf::from("handlers"),
            state_path: PathBuf::from("state"),
            durability: Durability::default(),
            runtime: RuntimeConfig::default(),
            defaults: HandlerConfig::default(),
            handlers: BTreeMap::new(),
        }
    }
}

/// Settings for one handler. Every field is optional; unset falls back to
/// `[defaults]`, then the manifest, then the built-in default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// Wall-clock budget per event in ms (default 1000). Too low and slow
    /// but healthy events time out and retry; too high and a looping guest
    /// holds a worker that long.
    pub deadline_ms: Option<u64>,
    /// Memory cap per instance in MiB (default 64, at most
    /// `runtime.max_memory_mb`). Too low and guests trap on allocation.
    pub memory_mb: Option<u64>,
    /// Deliveries of one event before it is dead-lettered (default: the
    /// manifest's hint, else 5).
    pub max_attempts: Option<u32>,
    /// Publishes one event may make (default 100).
    pub max_publishes: Option<u32>,
    /// Largest payload one publish may carry, in KiB (default 1024).
    pub max_publish_kb: Option<u32>,
    /// Bytes of guest stdout/stderr kept per event (default 8192).
    pub max_output_bytes: Option<usize>,
    /// Replace the manifest's subscriptions (pin the topology).
    pub subscriptions: Option<Vec<Subscription>>,
    /// Values the guest reads through `wasi:config`. Numbers and booleans
    /// are accepted and passed as their text.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
}

impl Config {
    /// Read a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in config file {}", path.display()))
    }

    /// Parse config text.
    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text)?;
        for name in config.handlers.keys() {
            crate::manifest::validate_name(name)?;
        }
        Ok(config)
    }

    /// The effective settings of a handler with this manifest.
    pub fn resolve(&self, manifest: &Manifest) -> Result<HandlerSettings> {
        let own = self.handlers.get(&manifest.name);
        let pick =
            |f: fn(&HandlerConfig) -> Option<u64>| own.and_then(f).or_else(|| f(&self.defaults));
        let deadline_ms = pick(|c| c.deadline_ms).unwrap_or(1000);
        let memory_mb = pick(|c| c.memory_mb).unwrap_or(64);
        if memory_mb > self.runtime.max_memory_mb {
            bail!(
                "handler {:?}: memory_mb = {memory_mb} is over runtime.max_memory_mb = {}",
                manifest.name,
                self.runtime.max_memory_mb
            );
        }
        if deadline_ms == 0 {
            bail!("handler {:?}: deadline_ms must be positive", manifest.name);
        }
        let max_attempts = own
            .and_then(|c| c.max_attempts)
            .or(manifest.max_attempts)
            .or(self.defaults.max_attempts)
            .unwrap_or(5)
            .max(1);
        let mut effective = manifest.clone();
        if let Some(subs) = own.and_then(|c| c.subscriptions.clone()) {
            effective.subscriptions = subs;
        }
        effective.max_attempts = Some(max_attempts);
        effective.validate()?;

        let mut values = self.defaults.config.clone();
        if let Some(own) = own {
            values.extend(own.config.clone());
        }
        let config = values
            .into_iter()
            .map(|(k, v)| Ok((k, scalar_text(&v)?)))
            .collect::<Result<BTreeMap<_, _>>>()
            .with_context(|| format!("handler {:?} config", manifest.name))?;

        Ok(HandlerSettings {
            manifest: effective,
            max_attempts,
            budget: CallBudget {
                deadline: Duration::from_millis(deadline_ms),
                limits: CallLimits {
                    memory_bytes: (memory_mb as usize) << 20,
                    max_publishes: pick(|c| c.max_publishes.map(u64::from)).unwrap_or(100) as u32,
                    max_publish_bytes: (pick(|c| c.max_publish_kb.map(u64::from)).unwrap_or(1024)
                        as u32)
                        .saturating_mul(1024),
                    max_output_bytes: pick(|c| c.max_output_bytes.map(|v| v as u64)).unwrap_or(8192)
                        as usize,
                    max_log_lines: 100,
                },
            },
            config: Arc::new(config),
        })
    }
}

fn scalar_text(v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "config values must be strings, numbers or booleans, not {}",
            other.type_str()
        ),
    })
}

/// A handler's effective settings: manifest with overrides applied, limits,
/// and the values it reads through `wasi:config`.
#[derive(Debug, Clone)]
pub struct HandlerSettings {
    /// The manifest after config overrides.
    pub manifest: Manifest,
    /// Deliveries before dead-lettering.
    pub max_attempts: u32,
    /// Per-event deadline and limits.
    pub budget: CallBudget,
    /// `wasi:config` values.
    pub config: Arc<BTreeMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ExchangeKind;

    fn manifest() -> Manifest {
        Manifest {
            name: "inventory".into(),
            version: "1".into(),
            subscriptions: vec![Subscription {
                exchange: "orders".into(),
                kind: ExchangeKind::Fanout,
                binding_keys: vec![],
            }],
            max_attempts: Some(3),
        }
    }

    #[test]
    fn issue_example_parses_and_resolves() -> Result<()> {
        let config = Config::parse(
            r#"
            handlers_dir = "handlers"
            state_path = "state"
            [handlers.inventory]
            deadline_ms = 1000
            memory_mb = 64
            [handlers.inventory.config]
            "stock.Laptop" = "10"
            "low-stock-threshold" = 3
            "#,
        )?;
        let s = config.resolve(&manifest())?;
        assert_eq!(s.budget.deadline, Duration::from_millis(1000));
        assert_eq!(s.budget.limits.memory_bytes, 64 << 20);
        assert_eq!(s.config.get("stock.Laptop").map(String::as_str), Some("10"));
        assert_eq!(
            s.config.get("low-stock-threshold").map(String::as_str),
            Some("3")
        );
        assert_eq!(
            s.max_attempts, 3,
            "manifest hint applies when config is silent"
        );
        Ok(())
    }

    #[test]
    fn typos_and_bad_limits_are_errors() {
        assert!(Config::parse("handler_dir = 'x'").is_err());
        assert!(Config::parse("[handlers.inventory]\ndeadline = 5").is_err());
        let c = Config::parse("[handlers.inventory]\nmemory_mb = 4096").unwrap();
        assert!(c.resolve(&manifest()).is_err());
    }
}
