//! The one place for configuration: the TOML file, its defaults, and how a
//! handler's effective settings are resolved from its manifest and the file.
//!
//! Every knob is documented here with its default and what goes wrong when
//! it is set badly. Unknown keys are errors, so a typo never silently falls
//! back to a default.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::guest::CallLimits;
use crate::health::HealthSettings;
use crate::idempotency::IdempotencyKey;
pub use crate::manifest::OutputExchange;
use crate::manifest::{Manifest, Subscription};
use crate::read_ahead::KeyTemplate;
use crate::runtime::{CallBudget, RuntimeConfig};
use crate::state::Durability;

/// Default `max_key_bytes`.
pub const DEFAULT_MAX_KEY_BYTES: u64 = 512;
/// Default `max_value_bytes` (1 MiB).
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 1 << 20;
/// Default `max_writes`.
pub const DEFAULT_MAX_WRITES: u64 = 1000;
/// Default `max_written_bytes` (8 MiB).
pub const DEFAULT_MAX_WRITTEN_BYTES: u64 = 8 << 20;
/// Default `max_read_bytes` (64 MiB).
pub const DEFAULT_MAX_READ_BYTES: u64 = 64 << 20;

/// The broker a fresh install talks to: RabbitMQ's defaults on this machine.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long dedupe records are kept by default: 7 days.
pub const DEFAULT_DEDUPE_WINDOW_SECS: u64 = 7 * 24 * 3600;

/// Default `state_schema`.
pub const DEFAULT_STATE_SCHEMA: &str = "event_host";

/// A sampling ratio is a share: 0 to 1.
fn check_sample_ratio(ratio: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&ratio) {
        bail!("trace_sample_ratio must be from 0 to 1 (a share of new traces), not {ratio}");
    }
    Ok(())
}

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
    /// Shared state on PostgreSQL (`postgres://user:pass@host:port/db`,
    /// also `EVENT_HOST_STATE_URL`). Default none: embedded SQLite in
    /// `state_path`, for one host. Set it on every host of a fleet that
    /// shares a handler's queue; hosts on embedded state refuse a queue
    /// another consumer is on. The password is never logged.
    pub state_url: Option<Secret>,
    /// PostgreSQL schema holding the state tables (also
    /// `EVENT_HOST_STATE_SCHEMA`). Default `event_host`. One schema serves
    /// many handlers (tables are keyed by handler); give each fleet its own
    /// schema, or two fleets with a handler of the same name share its
    /// state.
    pub state_schema: String,
    /// This host's name in a fleet (also `EVENT_HOST_HOST_ID`): shown in
    /// `/handlers` and `/metrics`, stamped on every message it publishes
    /// (`x-event-host-host`), and written on the outbox rows it claims.
    /// Default `<hostname>-<pid>`; at most 128 bytes. Keep it stable across
    /// restarts (a container's hostname is) so a restarted host publishes
    /// its own unconfirmed outbox rows at once rather than after the claim
    /// runs out. Two live hosts with one id lose nothing, but at a
    /// reconnect one may publish again what the other has in flight (same
    /// message ids).
    pub host_id: Option<String>,
    /// The broker. The password is never logged (see `broker::redact`).
    /// Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub amqp_url: String,
    /// Admin HTTP endpoint (`/healthz`, `/readyz`, `/metrics`, `/handlers`,
    /// `/state/{handler}/{key}`, `/dlq/{handler}`). Default
    /// `127.0.0.1:9090`. Binding it to a public address exposes handler
    /// state, and the re-driving of dead letters, to whoever can reach it.
    pub admin_addr: String,
    /// AMQP heartbeat in seconds (0 disables): a silent network cut is
    /// noticed within about twice this. Default 10.
    pub heartbeat_secs: u16,
    /// Seconds a graceful shutdown waits for in-flight events. Default 30.
    pub drain_timeout_secs: u64,
    /// Watch the handlers folder and hot-reload changed files. Default true.
    pub watch: bool,
    /// Quiet time after the last change in the handlers folder before it is
    /// read, in ms. Default 10. Too low and a file written in several steps
    /// is read (and refused) mid-write more often; too high and every
    /// reload waits longer.
    pub reload_debounce_ms: u64,
    /// Longest a new file may take to compile and validate, in seconds.
    /// Default 60; past it the file is refused and the old version serves.
    pub load_timeout_secs: u64,
    /// Folder of compiled handlers, keyed by the file's sha256, so a
    /// restart or a re-drop of a known file does not compile again.
    /// Default `<state_path>/compiled`. Only the host should write there:
    /// its files are loaded as native code.
    pub cache_dir: Option<PathBuf>,
    /// How long a dedupe record (an event's idempotency key, kept so a
    /// redelivery is not applied twice) is kept, in seconds. Default
    /// 604800 (7 days); records are pruned in the background. Set it
    /// shorter than the longest time an event can spend in the broker
    /// (retries, a dead-letter re-drive, a long outage) and a redelivery
    /// that old is applied again; much longer only grows the state file.
    pub dedupe_window_secs: u64,
    /// Bearer token required by the admin endpoint for everything but
    /// `/healthz`, `/readyz` and `/metrics` (also `EVENT_HOST_ADMIN_TOKEN`).
    /// Default none: the endpoint is open to whoever can reach
    /// `admin_addr`, and shows every handler's state. Never logged.
    pub admin_token: Option<Secret>,
    /// Continue W3C trace context: each event gets a span of its own, a
    /// child of its `traceparent` (or a new trace's root), whose ids go
    /// into the log lines about it and, as `traceparent`, onto everything
    /// it causes. Default true; false stamps nothing.
    pub trace_context: bool,
    /// Share of new traces (events that arrive with no `traceparent`)
    /// sampled, 0 to 1; default 1, all. An unsampled trace is stamped
    /// (flags `00`), so hops after this one leave it out too, and its spans
    /// are not exported. A trace that arrives with a `traceparent` keeps its
    /// publisher's decision. Also the standard `OTEL_TRACES_SAMPLER`
    /// (`always_on`, `always_off`, `traceidratio` and their `parentbased_`
    /// forms, all applied parent-based) with `OTEL_TRACES_SAMPLER_ARG`.
    pub trace_sample_ratio: f64,
    /// OTLP collector to export each event's span to, over HTTP/protobuf
    /// (also the standard `OTEL_EXPORTER_OTLP_ENDPOINT`, a base URL such as
    /// `http://collector:4318`, and `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
    /// the full URL). Default none: no export. `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none` turn it off whatever is set.
    pub otlp_endpoint: Option<String>,
    /// How the host declares exchanges it finds absent, by name
    /// (`[exchanges.orders]`). An exchange that exists is always used as
    /// it is; these settings only matter to whoever declares it first, and
    /// must then match what the other clients of the exchange declare —
    /// RabbitMQ refuses a second declaration with other attributes.
    pub exchanges: BTreeMap<String, ExchangeOptions>,
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
            state_url: None,
            state_schema: DEFAULT_STATE_SCHEMA.into(),
            host_id: None,
            amqp_url: DEFAULT_AMQP_URL.into(),
            admin_addr: "127.0.0.1:9090".into(),
            heartbeat_secs: 10,
            drain_timeout_secs: 30,
            watch: true,
            reload_debounce_ms: 10,
            load_timeout_secs: 60,
            cache_dir: None,
            dedupe_window_secs: DEFAULT_DEDUPE_WINDOW_SECS,
            admin_token: None,
            trace_context: true,
            trace_sample_ratio: 1.0,
            otlp_endpoint: None,
            exchanges: BTreeMap::new(),
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
    /// Longest state key a guest may read or write, in bytes (default
    /// 512). A longer one is an error the guest sees. Too high lets one
    /// event fill the outbox and the database with huge keys.
    pub max_key_bytes: Option<u64>,
    /// Largest value one state write may store, in bytes (default 1 MiB).
    /// A larger one is an error the guest sees. Too high and one event's
    /// commit can outgrow what SQLite takes in one row.
    pub max_value_bytes: Option<u64>,
    /// State writes (`set`, `delete`, `increment`, successful `swap`) one
    /// event may make (default 1000); past it each write is an error the
    /// guest sees. Too low fails handlers that write many keys per event.
    pub max_writes: Option<u64>,
    /// Bytes of keys and values one event may write, together (default
    /// 8 MiB); past it writes are errors the guest sees. Bounds the host
    /// memory an event's buffered writes take, and its commit's size.
    pub max_written_bytes: Option<u64>,
    /// Bytes of state values one event may read, counting each key once
    /// (default 64 MiB). Every value read is kept until the event commits
    /// (its reads are validated then), so this bounds the host memory one
    /// event's reads take; past it the read traps the call, a failed
    /// attempt. Too low fails handlers that scan large state per event.
    pub max_read_bytes: Option<u64>,
    /// Events one instance of the handler may serve, one after another
    /// within a batch, before a fresh one is made (default 1: a fresh
    /// instance per event, as Spin does). Raising it saves the
    /// instantiation and teardown per event — for small handlers most of
    /// the host's cost per event — but gives up memory isolation between
    /// those events: whatever the guest keeps in globals or its heap, the
    /// next event sees, and a leak grows until the memory cap traps an
    /// event (which then retries in a fresh instance). Only for handlers
    /// that keep nothing between calls; each event's state, publishes and
    /// outcome stay its own either way, and any failed call discards the
    /// instance. Capped by the batch size (128).
    pub events_per_instance: Option<u32>,
    /// Where an event carries the key it is deduplicated on (so a
    /// redelivery after a crash between commit and ack is not applied
    /// twice): `"message-id"` (default), a JSON pointer into the body
    /// (RFC 6901, e.g. `"/id"`; the value must be a string or a number),
    /// or `"header:NAME"`. An event without its key falls back to its
    /// message id, then to at-least-once (counted in
    /// `event_host_events_without_idempotency_key_total`); it is never
    /// rejected for that. A key that is not unique per event (a field two
    /// different events share) makes the second one a "duplicate": it is
    /// acked without running.
    pub idempotency_key: Option<IdempotencyKey>,
    /// State keys the handler's events read, named from their bodies:
    /// text with JSON pointers in braces, e.g. `["order.{/id}",
    /// "stock.{/item}"]` (at most 16). On shared state (`state_url`) the
    /// keys of a whole batch are read and locked in one round trip before
    /// its first event runs, instead of one round trip per read while the
    /// guest waits. A hint only: a key named but not read is locked
    /// early, a key read but not named is read as usual. Ignored on
    /// embedded state. Only the handler's own section counts.
    pub read_ahead: Option<Vec<KeyTemplate>>,
    /// Replace the manifest's subscriptions (pin the topology).
    pub subscriptions: Option<Vec<Subscription>>,
    /// Exchanges the handler may publish to, besides those its manifest
    /// declares (`publishes`): publishing is allow-listed, and a publish
    /// to any other exchange is a `not-allowed` error the guest sees. Both
    /// lists are declared with the handler's topology (durable, when
    /// absent; one that exists is used as it is); with `passive`, they
    /// must exist. The default exchange `""` (straight into any queue) and
    /// `amq.*` are allowed only when named here, and never declared (the
    /// broker has them). Only the handler's own section counts (exchanges
    /// are per handler, not a default). A handler whose config renames
    /// its output exchange must name the new one here.
    pub publishes_to: Option<Vec<OutputExchange>>,
    /// Work queue name (default: the handler name). Renaming it strands
    /// the events waiting in the old queue.
    pub queue: Option<String>,
    /// Unacked deliveries in flight (default 256). Too low starves the
    /// dispatcher between round trips; too high holds many events in
    /// memory and makes redelivery after a crash larger.
    pub prefetch: Option<u16>,
    /// `classic` (default) or `quorum` (replicated; for clusters). Changing
    /// it for an existing queue fails: the broker refuses to redeclare.
    pub queue_type: Option<QueueType>,
    /// Topology owned by someone else: check that the exchanges and queue
    /// exist, declare and bind nothing. Default false.
    pub passive: Option<bool>,
    /// First retry delay in ms (default 1000); doubles per attempt.
    pub retry_base_ms: Option<u64>,
    /// Longest retry delay in ms (default 60000).
    pub retry_max_ms: Option<u64>,
    /// Largest payload accepted, in KiB (default 1024); larger events go to
    /// the dead-letter queue unread.
    pub max_payload_kb: Option<u32>,
    /// Failed attempts (traps, timeouts, `retry`) within
    /// `breaker_window_secs` that pause the handler's consumer, so its
    /// events wait in the queue instead of burning through their retries
    /// into the dead-letter queue. Default 20.
    pub breaker_failures: Option<u32>,
    /// The breaker's window in seconds. Default 10.
    pub breaker_window_secs: Option<u64>,
    /// Seconds a paused handler waits before consuming again (a new version
    /// resumes it at once). Default 30.
    pub breaker_cooloff_secs: Option<u64>,
    /// Events a newly loaded version is judged on. Default 20.
    pub rollback_events: Option<u32>,
    /// Failure rate over those events (0 to 1) at which the host goes back
    /// to the previous version. Default 0.5.
    pub rollback_failure_rate: Option<f64>,
    /// Values the guest reads through `wasi:config`. Numbers and booleans
    /// are accepted and passed as their text.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
}

impl Config {
    /// Apply `EVENT_HOST_*` environment overrides: `HANDLERS_DIR`,
    /// `STATE_PATH`, `AMQP_URL`, `ADMIN_ADDR`, `DURABILITY`,
    /// `HEARTBEAT_SECS`, `DRAIN_TIMEOUT_SECS`, `WATCH`, `CACHE_DIR`,
    /// `ADMIN_TOKEN`, `STATE_URL`, `STATE_SCHEMA`, `HOST_ID`; and the
    /// standard `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SDK_DISABLED` and
    /// `OTEL_TRACES_EXPORTER=none`.
    pub fn apply_env(&mut self) -> Result<()> {
        let var = |name: &str| {
            std::env::var(format!("EVENT_HOST_{name}"))
                .ok()
                .filter(|v| !v.is_empty())
        };
        if let Some(v) = var("HANDLERS_DIR") {
            self.handlers_dir = v.into();
        }
        if let Some(v) = var("STATE_PATH") {
            self.state_path = v.into();
        }
        if let Some(v) = var("AMQP_URL") {
            self.amqp_url = v;
        }
        if let Some(v) = var("ADMIN_ADDR") {
            self.admin_addr = v;
        }
        if let Some(v) = var("DURABILITY") {
            self.durability = toml::Value::String(v.clone())
                .try_into()
                .with_context(|| format!("EVENT_HOST_DURABILITY={v:?}: use full or normal"))?;
        }
        if let Some(v) = var("HEARTBEAT_SECS") {
            self.heartbeat_secs = v.parse().context("EVENT_HOST_HEARTBEAT_SECS")?;
        }
        if let Some(v) = var("DRAIN_TIMEOUT_SECS") {
            self.drain_timeout_secs = v.parse().context("EVENT_HOST_DRAIN_TIMEOUT_SECS")?;
        }
        if let Some(v) = var("WATCH") {
            self.watch = v.parse().context("EVENT_HOST_WATCH: use true or false")?;
        }
        if let Some(v) = var("CACHE_DIR") {
            self.cache_dir = Some(v.into());
        }
        if let Some(v) = var("ADMIN_TOKEN") {
            self.admin_token = Some(Secret(v));
        }
        if let Some(v) = var("STATE_URL") {
            self.state_url = Some(Secret(v));
        }
        if let Some(v) = var("STATE_SCHEMA") {
            self.state_schema = v;
        }
        if let Some(v) = var("HOST_ID") {
            self.host_id = Some(v);
        }
        // The OpenTelemetry variables every SDK reads, so a host drops into
        // an instrumented deployment with no settings of its own.
        let otel = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(v) = otel("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| otel("OTEL_EXPORTER_OTLP_ENDPOINT"))
        {
            self.otlp_endpoint = Some(v);
        }
        if let Some(sampler) = otel("OTEL_TRACES_SAMPLER") {
            let arg = otel("OTEL_TRACES_SAMPLER_ARG");
            self.trace_sample_ratio = match sampler.trim_start_matches("parentbased_") {
                "always_on" => 1.0,
                "always_off" => 0.0,
                "traceidratio" => match arg {
                    Some(a) => a
                        .parse()
                        .with_context(|| format!("OTEL_TRACES_SAMPLER_ARG={a:?}: a ratio, 0 to 1"))?,
                    None => 1.0,
                },
                other => bail!(
                    "OTEL_TRACES_SAMPLER={other:?}: use always_on, always_off, traceidratio or their parentbased_ forms"
                ),
            };
            check_sample_ratio(self.trace_sample_ratio).context("OTEL_TRACES_SAMPLER_ARG")?;
        }
        let disabled = otel("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || otel("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        if disabled {
            self.otlp_endpoint = None;
        }
        Ok(())
    }

    /// This host's id in a fleet: `host_id`, else `<hostname>-<pid>`
    /// (unique among live hosts on one machine or in containers).
    pub fn host_id(&self) -> String {
        if let Some(id) = self.host_id.as_ref().filter(|id| !id.is_empty()) {
            return id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".into());
        format!("{host}-{}", std::process::id())
    }

    /// Where compiled handlers are cached.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.state_path.join("compiled"))
    }

    /// Read a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in config file {}", path.display()))
    }

    /// Parse config text.
    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text)?;
        check_sample_ratio(config.trace_sample_ratio)?;
        for name in config.handlers.keys() {
            crate::manifest::validate_name(name)?;
        }
        for (name, options) in &config.exchanges {
            if name.is_empty() || name.len() > 255 || name.starts_with("amq.") {
                bail!("[exchanges.{name:?}]: name an exchange of 1 to 255 bytes; the default exchange and amq.* are the broker's own");
            }
            for (key, value) in &options.arguments {
                if !matches!(
                    value,
                    toml::Value::String(_)
                        | toml::Value::Integer(_)
                        | toml::Value::Float(_)
                        | toml::Value::Boolean(_)
                ) {
                    bail!(
                        "[exchanges.{name:?}] argument {key:?}: use a string, number or boolean, not {}",
                        value.type_str()
                    );
                }
            }
        }
        // Settings that name one handler's own things: in `[defaults]`
        // they would be ignored, silently.
        let d = &config.defaults;
        for (set, key) in [
            (d.subscriptions.is_some(), "subscriptions"),
            (d.publishes_to.is_some(), "publishes_to"),
            (d.queue.is_some(), "queue"),
            (d.read_ahead.is_some(), "read_ahead"),
        ] {
            if set {
                bail!("[defaults] sets `{key}`, which only a handler's own section ([handlers.NAME]) may set");
            }
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

        let retry_base = pick(|c| c.retry_base_ms).unwrap_or(1000).max(1);
        let retry_max = pick(|c| c.retry_max_ms).unwrap_or(60_000).max(retry_base);
        let queue = own
            .and_then(|c| c.queue.clone())
            .unwrap_or_else(|| manifest.name.clone());
        crate::manifest::validate_name(&queue).context("queue name")?;
        let mut broker = BrokerSettings {
            queue,
            prefetch: own
                .and_then(|c| c.prefetch)
                .or(self.defaults.prefetch)
                .unwrap_or(256)
                .max(1),
            queue_type: own
                .and_then(|c| c.queue_type)
                .or(self.defaults.queue_type)
                .unwrap_or_default(),
            passive: own
                .and_then(|c| c.passive)
                .or(self.defaults.passive)
                .unwrap_or(false),
            // One delay per retry: base, 2*base, 4*base, ... capped.
            retry_delays_ms: (0..max_attempts.saturating_sub(1).min(32))
                .map(|n| retry_base.saturating_mul(1u64 << n.min(40)).min(retry_max))
                .collect(),
            max_payload_bytes: (pick(|c| c.max_payload_kb.map(u64::from)).unwrap_or(1024) as usize)
                << 10,
            // The manifest's and the config's, merged below.
            publishes_to: Vec::new(),
            exchanges: Arc::new(self.exchanges.clone()),
        };
        let configured = own.and_then(|c| c.publishes_to.clone()).unwrap_or_default();
        for out in &configured {
            // The default exchange may be named here (to allow it), not
            // declared; everything else must be a name the broker takes.
            if !out.exchange.is_empty() {
                crate::manifest::validate_exchange(
                    &manifest.name,
                    &out.exchange,
                    "declared (publishes_to)",
                )?;
            }
        }
        let read_ahead: Arc<[KeyTemplate]> = own
            .and_then(|c| c.read_ahead.clone())
            .unwrap_or_default()
            .into();
        crate::read_ahead::validate(&manifest.name, &read_ahead).map_err(anyhow::Error::msg)?;
        let (allowed, declared) = outputs(&manifest.publishes, &configured);
        broker.publishes_to = declared;

        let defaults = HealthSettings::default();
        let rate = own
            .and_then(|c| c.rollback_failure_rate)
            .or(self.defaults.rollback_failure_rate)
            .unwrap_or(defaults.rollback_failure_rate);
        if !(rate > 0.0 && rate <= 1.0) {
            bail!(
                "handler {:?}: rollback_failure_rate must be in (0, 1], not {rate}",
                manifest.name
            );
        }
        let health = HealthSettings {
            breaker_failures: pick(|c| c.breaker_failures.map(u64::from))
                .map_or(defaults.breaker_failures, |v| {
                    v.clamp(1, u64::from(u32::MAX)) as u32
                }),
            breaker_window: pick(|c| c.breaker_window_secs)
                .map_or(defaults.breaker_window, Duration::from_secs),
            breaker_cooloff: pick(|c| c.breaker_cooloff_secs)
                .map_or(defaults.breaker_cooloff, Duration::from_secs),
            probation_events: pick(|c| c.rollback_events.map(u64::from))
                .map_or(defaults.probation_events, |v| {
                    v.clamp(1, u64::from(u32::MAX)) as u32
                }),
            rollback_failure_rate: rate,
        };

        Ok(HandlerSettings {
            health,
            broker,
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
                    allowed_exchanges: Arc::new(allowed),
                    max_key_bytes: pick(|c| c.max_key_bytes).unwrap_or(DEFAULT_MAX_KEY_BYTES)
                        as usize,
                    max_value_bytes: pick(|c| c.max_value_bytes).unwrap_or(DEFAULT_MAX_VALUE_BYTES)
                        as usize,
                    max_writes: pick(|c| c.max_writes)
                        .unwrap_or(DEFAULT_MAX_WRITES)
                        .min(u64::from(u32::MAX)) as u32,
                    max_written_bytes: pick(|c| c.max_written_bytes)
                        .unwrap_or(DEFAULT_MAX_WRITTEN_BYTES)
                        as usize,
                    max_read_bytes: pick(|c| c.max_read_bytes).unwrap_or(DEFAULT_MAX_READ_BYTES)
                        as usize,
                },
                events_per_instance: pick(|c| c.events_per_instance.map(u64::from))
                    .unwrap_or(1)
                    .clamp(1, u64::from(u32::MAX)) as u32,
            },
            config: Arc::new(config),
            idempotency_key: own
                .and_then(|c| c.idempotency_key.clone())
                .or_else(|| self.defaults.idempotency_key.clone())
                .unwrap_or_default(),
            read_ahead,
        })
    }
}

/// A handler's outputs: the exchanges it may publish to (the manifest's
/// and the config's, by name), and those the host declares for it — the
/// same, less the default exchange and `amq.*` (the broker's own, which
/// it refuses to have declared). One named in both is declared once, with
/// the config's kind: the operator's word wins.
fn outputs(
    manifest: &[OutputExchange],
    configured: &[OutputExchange],
) -> (BTreeSet<String>, Vec<OutputExchange>) {
    let mut allowed = BTreeSet::new();
    let mut declared: Vec<OutputExchange> = Vec::new();
    for out in manifest.iter().chain(configured) {
        allowed.insert(out.exchange.clone());
        if out.exchange.is_empty() || out.exchange.starts_with("amq.") {
            continue;
        }
        match declared.iter_mut().find(|d| d.exchange == out.exchange) {
            Some(known) => known.kind = out.kind,
            None => declared.push(out.clone()),
        }
    }
    (allowed, declared)
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

/// A value that must not reach a log: its `Debug` shows only that it is
/// set.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Queue types a handler's work queue can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A classic durable queue.
    #[default]
    Classic,
    /// A replicated quorum queue.
    Quorum,
}

/// How a handler meets the broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Work queue name.
    pub queue: String,
    /// Prefetch (unacked deliveries in flight).
    pub prefetch: u16,
    /// Classic or quorum.
    pub queue_type: QueueType,
    /// Check topology instead of declaring it.
    pub passive: bool,
    /// Delay before retry n (index 0 = after the first failed attempt).
    pub retry_delays_ms: Vec<u64>,
    /// Payload cap in bytes.
    pub max_payload_bytes: usize,
    /// Exchanges declared for what the handler publishes.
    pub publishes_to: Vec<OutputExchange>,
    /// How exchanges are declared when absent, by name (`[exchanges]`).
    pub exchanges: Arc<BTreeMap<String, ExchangeOptions>>,
}

/// How the host declares one exchange when it is absent
/// (`[exchanges.NAME]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExchangeOptions {
    /// Kept across a broker restart. Default true. A non-durable exchange
    /// is gone after a restart until a client declares it again (the host
    /// does when it reconnects); what is published to it meanwhile is
    /// unroutable.
    pub durable: bool,
    /// Deleted by the broker once its last binding is removed. Default
    /// false.
    pub auto_delete: bool,
    /// Declaration arguments (`alternate-exchange = "unrouted"`, …):
    /// strings, integers, floats or booleans.
    pub arguments: BTreeMap<String, toml::Value>,
}

impl Default for ExchangeOptions {
    fn default() -> Self {
        Self {
            durable: true,
            auto_delete: false,
            arguments: BTreeMap::new(),
        }
    }
}

/// A handler's effective settings: manifest with overrides applied, limits,
/// and the values it reads through `wasi:config`.
#[derive(Debug, Clone)]
pub struct HandlerSettings {
    /// Queue, prefetch, retry path.
    pub broker: BrokerSettings,
    /// The manifest after config overrides.
    pub manifest: Manifest,
    /// Deliveries before dead-lettering.
    pub max_attempts: u32,
    /// Per-event deadline and limits.
    pub budget: CallBudget,
    /// `wasi:config` values.
    pub config: Arc<BTreeMap<String, String>>,
    /// Crash-loop breaker and rollback.
    pub health: HealthSettings,
    /// Where its events carry the key they are deduplicated on.
    pub idempotency_key: IdempotencyKey,
    /// State keys read ahead per batch on shared state.
    pub read_ahead: Arc<[KeyTemplate]>,
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
            publishes: vec![],
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
        assert_eq!(
            s.budget.events_per_instance, 1,
            "a fresh instance per event unless a handler opts out"
        );
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
    fn retry_backoff_is_exponential_and_capped() -> Result<()> {
        let c = Config::parse(
            "[handlers.inventory]\nmax_attempts = 6\nretry_base_ms = 100\nretry_max_ms = 500",
        )?;
        assert_eq!(
            c.resolve(&manifest())?.broker.retry_delays_ms,
            vec![100, 200, 400, 500, 500]
        );
        Ok(())
    }

    #[test]
    fn output_exchanges_are_the_handlers_own_and_named() -> Result<()> {
        let c = Config::parse(
            r#"[handlers.inventory]
            publishes_to = [{ exchange = "inventory", kind = "topic" }]"#,
        )?;
        assert_eq!(
            c.resolve(&manifest())?.broker.publishes_to,
            vec![OutputExchange {
                exchange: "inventory".into(),
                kind: ExchangeKind::Topic
            }]
        );
        let other = Manifest {
            name: "other".into(),
            ..manifest()
        };
        assert!(c.resolve(&other)?.broker.publishes_to.is_empty());
        // The default exchange may be allowed, by name, but is not declared.
        let unnamed = Config::parse(
            "[handlers.inventory]\npublishes_to = [{ exchange = '', kind = 'direct' }]",
        )?;
        let resolved = unnamed.resolve(&manifest())?;
        assert!(resolved.broker.publishes_to.is_empty());
        assert!(resolved.budget.limits.allowed_exchanges.contains(""));
        let long = Config::parse(&format!(
            "[handlers.inventory]\npublishes_to = [{{ exchange = '{}', kind = 'topic' }}]",
            "x".repeat(256)
        ))?;
        assert!(long.resolve(&manifest()).is_err());
        // The same rule as for the exchanges a handler subscribes to.
        let subscribed = Config::parse(
            "[handlers.inventory]\nsubscriptions = [{ exchange = '', kind = 'fanout' }]",
        )?;
        assert!(subscribed.resolve(&manifest()).is_err());
        assert!(Config::parse(
            "[handlers.inventory]\npublishes_to = [{ exchange = 'x', kind = 'round' }]"
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn read_ahead_is_a_handler_s_own_list_of_key_templates() -> Result<()> {
        let c =
            Config::parse("[handlers.inventory]\nread_ahead = ['order.{/id}', 'stock.{/item}']")?;
        let keys: Vec<String> = c
            .resolve(&manifest())?
            .read_ahead
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(keys, ["order.{/id}", "stock.{/item}"]);
        assert!(c
            .resolve(&Manifest {
                name: "other".into(),
                ..manifest()
            })?
            .read_ahead
            .is_empty());
        let err = Config::parse("[handlers.inventory]\nread_ahead = ['stock.{item}']").unwrap_err();
        assert!(format!("{err:#}").contains("JSON pointer"), "{err:#}");
        let many = (0..17)
            .map(|i| format!("'k{i}'"))
            .collect::<Vec<_>>()
            .join(",");
        let c = Config::parse(&format!("[handlers.inventory]\nread_ahead = [{many}]"))?;
        assert!(format!("{:#}", c.resolve(&manifest()).unwrap_err()).contains("at most 16"));
        Ok(())
    }

    #[test]
    fn defaults_cannot_set_what_names_one_handler_s_own_things() {
        // An unknown key is an error there too, as in a handler's section.
        let err = Config::parse("[defaults]\nnot_a_knob = 1").unwrap_err();
        assert!(err.to_string().contains("not_a_knob"), "{err}");
        for line in [
            "queue = 'q'",
            "read_ahead = ['k']",
            "publishes_to = [{ exchange = 'x', kind = 'topic' }]",
            "subscriptions = [{ exchange = 'x', kind = 'fanout' }]",
        ] {
            let err = Config::parse(&format!("[defaults]\n{line}")).unwrap_err();
            assert!(
                err.to_string().contains("only a handler's own section"),
                "{line}: {err}"
            );
            Config::parse(&format!("[handlers.inventory]\n{line}")).expect(line);
        }
    }

    #[test]
    fn idempotency_key_defaults_to_the_message_id() -> Result<()> {
        let c = Config::parse("[handlers.inventory]\nidempotency_key = '/id'")?;
        assert_eq!(
            c.resolve(&manifest())?.idempotency_key,
            IdempotencyKey::Pointer("/id".into())
        );
        let other = Manifest {
            name: "other".into(),
            ..manifest()
        };
        assert_eq!(
            c.resolve(&other)?.idempotency_key,
            IdempotencyKey::MessageId
        );
        assert_eq!(c.dedupe_window_secs, DEFAULT_DEDUPE_WINDOW_SECS);
        assert!(Config::parse("[handlers.inventory]\nidempotency_key = 'id'").is_err());
        Ok(())
    }

    #[test]
    fn allowed_exchanges_are_the_manifests_and_the_configs() -> Result<()> {
        let declaring = Manifest {
            publishes: vec![OutputExchange {
                exchange: "inventory".into(),
                kind: ExchangeKind::Topic,
            }],
            ..manifest()
        };
        let allowed = |s: &HandlerSettings| -> Vec<String> {
            s.budget.limits.allowed_exchanges.iter().cloned().collect()
        };
        // Without config: the manifest's outputs, declared and allowed.
        let s = Config::default().resolve(&declaring)?;
        assert_eq!(s.broker.publishes_to, declaring.publishes);
        assert_eq!(allowed(&s), ["inventory"]);
        // With config: one list of both, the config's kind for a name in
        // both, and `amq.*` allowed but left to the broker.
        let c = Config::parse(
            r#"[handlers.inventory]
            publishes_to = [
                { exchange = "inventory", kind = "fanout" },
                { exchange = "audit", kind = "topic" },
                { exchange = "amq.direct", kind = "direct" },
            ]"#,
        )?;
        let s = c.resolve(&declaring)?;
        assert_eq!(
            s.broker.publishes_to,
            vec![
                OutputExchange {
                    exchange: "inventory".into(),
                    kind: ExchangeKind::Fanout
                },
                OutputExchange {
                    exchange: "audit".into(),
                    kind: ExchangeKind::Topic
                },
            ]
        );
        assert_eq!(allowed(&s), ["amq.direct", "audit", "inventory"]);
        // Nothing is allowed that nobody named.
        let s = Config::default().resolve(&manifest())?;
        assert!(s.budget.limits.allowed_exchanges.is_empty());
        Ok(())
    }

    #[test]
    fn state_bounds_default_and_are_configurable() -> Result<()> {
        let bounds = |s: &HandlerSettings| {
            let l = &s.budget.limits;
            (
                l.max_key_bytes,
                l.max_value_bytes,
                l.max_writes,
                l.max_written_bytes,
                l.max_read_bytes,
            )
        };
        let s = Config::default().resolve(&manifest())?;
        assert_eq!(bounds(&s), (512, 1 << 20, 1000, 8 << 20, 64 << 20));
        let c = Config::parse(
            "[defaults]\nmax_writes = 7\n[handlers.inventory]\nmax_key_bytes = 10\nmax_value_bytes = 20\nmax_written_bytes = 30\nmax_read_bytes = 40",
        )?;
        let s = c.resolve(&manifest())?;
        assert_eq!(bounds(&s), (10, 20, 7, 30, 40));
        Ok(())
    }

    #[test]
    fn typos_and_bad_limits_are_errors() {
        assert!(Config::parse("handler_dir = 'x'").is_err());
        assert!(Config::parse("[handlers.inventory]\ndeadline = 5").is_err());
        let c = Config::parse("[handlers.inventory]\nmemory_mb = 4096").unwrap();
        assert!(c.resolve(&manifest()).is_err());
        let ratio = Config::parse("trace_sample_ratio = 2.0").unwrap_err();
        assert!(format!("{ratio:#}").contains("0 to 1"), "{ratio:#}");
        assert_eq!(
            Config::parse("trace_sample_ratio = 0.1")
                .unwrap()
                .trace_sample_ratio,
            0.1
        );
    }
}
