//! A handler's self-description, in host terms.
//!
//! The WIT `manifest` record is converted and validated once at load time;
//! everything downstream (topology, routing, `check` output, `/handlers`)
//! uses this type.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::bindings;

/// AMQP exchange kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Every binding gets every message.
    Fanout,
    /// Binding key equals routing key.
    Direct,
    /// Dot-separated patterns with `*` and `#`.
    Topic,
    /// Header matching.
    Headers,
}

impl ExchangeKind {
    /// The AMQP name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// One exchange a handler consumes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Exchange name.
    pub exchange: String,
    /// Exchange kind (used when the host declares it).
    pub kind: ExchangeKind,
    /// Binding keys; empty means one binding with the empty key.
    #[serde(default)]
    pub binding_keys: Vec<String>,
}

impl Subscription {
    /// The binding keys to declare: the empty key when none are given.
    pub fn effective_keys(&self) -> Vec<String> {
        if self.binding_keys.is_empty() {
            vec![String::new()]
        } else {
            self.binding_keys.clone()
        }
    }
}

/// An exchange a handler publishes to: declared with its topology, and
/// allowed as a `publish` target (see [`crate::config::Config::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputExchange {
    /// Exchange name.
    pub exchange: String,
    /// Its kind, when the host declares it.
    pub kind: ExchangeKind,
}

/// What a handler component says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Handler name: names its queue, state namespace and DLQ.
    pub name: String,
    /// The guest's own version string.
    pub version: String,
    /// Exchanges it consumes from.
    pub subscriptions: Vec<Subscription>,
    /// Exchanges it publishes to (its manifest's `publishes`).
    #[serde(default)]
    pub publishes: Vec<OutputExchange>,
    /// Deliveries before dead-lettering, if the guest suggests one.
    pub max_attempts: Option<u32>,
}

impl From<bindings::ExchangeKind> for ExchangeKind {
    fn from(kind: bindings::ExchangeKind) -> Self {
        match kind {
            bindings::ExchangeKind::Fanout => ExchangeKind::Fanout,
            bindings::ExchangeKind::Direct => ExchangeKind::Direct,
            bindings::ExchangeKind::Topic => ExchangeKind::Topic,
            bindings::ExchangeKind::Headers => ExchangeKind::Headers,
        }
    }
}

impl TryFrom<bindings::Manifest> for Manifest {
    type Error = anyhow::Error;

    fn try_from(raw: bindings::Manifest) -> Result<Self> {
        let manifest = Manifest {
            name: raw.name,
            version: raw.version,
            subscriptions: raw
                .subscriptions
                .into_iter()
                .map(|s| Subscription {
                    exchange: s.exchange,
                    kind: s.kind.into(),
                    binding_keys: s.binding_keys,
                })
                .collect(),
            publishes: raw
                .publishes
                .into_iter()
                .map(|o| OutputExchange {
                    exchange: o.exchange,
                    kind: o.kind.into(),
                })
                .collect(),
            max_attempts: raw.max_attempts,
        };
        manifest.validate()?;
        Ok(manifest)
    }
}

impl Manifest {
    /// Reject manifests the broker or the host could not honour.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        for sub in &self.subscriptions {
            validate_exchange(&self.name, &sub.exchange, "subscribed to")?;
            if sub.binding_keys.iter().any(|k| k.len() > 255) {
                bail!(
                    "handler {:?}: binding keys are at most 255 bytes",
                    self.name
                );
            }
        }
        for out in &self.publishes {
            validate_exchange(&self.name, &out.exchange, "published to (manifest)")?;
        }
        if self.max_attempts == Some(0) {
            bail!("handler {:?}: max-attempts must be at least 1", self.name);
        }
        Ok(())
    }
}

/// An exchange a handler names (to subscribe to, or to have declared) must
/// be one the broker can bind and declare: not the default exchange (""),
/// and at most 255 bytes (an AMQP short string). `role` says what for.
pub fn validate_exchange(handler: &str, exchange: &str, role: &str) -> Result<()> {
    if exchange.is_empty() {
        bail!("handler {handler:?}: the default exchange cannot be {role}");
    }
    if exchange.len() > 255 {
        bail!("handler {handler:?}: exchange names are at most 255 bytes ({role})");
    }
    Ok(())
}

/// Handler names become queue names and state namespaces: keep them to
/// characters that are safe everywhere.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("invalid handler name {name:?}: use 1-100 characters of [A-Za-z0-9._-]");
    }
    Ok(())
}
