//! The broker side: connecting to RabbitMQ, declaring each handler's
//! topology, and converting between AMQP messages and host deliveries.
//!
//! Nothing here knows about Wasm. The per-handler topology is:
//!
//! - the exchanges the manifest names — declared durable only when absent;
//!   one that exists is used as it is, since its publishers own it;
//! - a durable work queue (classic or quorum) bound to them;
//! - one delay queue per retry (`{queue}.retry.{ms}ms`), whose messages
//!   expire back into the work queue: exponential backoff without plugins;
//! - a dead-letter exchange `{queue}.dlx` and queue `{queue}.dlq`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use lapin::options::{
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::config::{BrokerSettings, QueueType};
use crate::dispatch::{Delivery, HeaderValue};
use crate::manifest::{ExchangeKind, Subscription};
use crate::state::Outgoing;

/// Attempt number of a retried message (1 on first delivery).
pub const ATTEMPT_HEADER: &str = "x-event-host-attempt";
/// Exchange a retried or dead-lettered message was first published to.
pub const EXCHANGE_HEADER: &str = "x-event-host-exchange";
/// Routing key it was first published with.
pub const ROUTING_KEY_HEADER: &str = "x-event-host-routing-key";
/// Why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-event-host-reason";
/// Handler that dead-lettered it.
pub const HANDLER_HEADER: &str = "x-event-host-handler";
/// Handler version (sha256) that dead-lettered it.
pub const VERSION_HEADER: &str = "x-event-host-version";
/// Attempts made before it was dead-lettered.
pub const ATTEMPTS_HEADER: &str = "x-event-host-attempts";

/// `amqp://user:***@host/...`: the URL with its password hidden, for logs
/// and errors.
///
/// The user info ends at the *last* `@`: a password that was not
/// percent-encoded may itself hold `@`, `/`, `?` or `#`, so the first of
/// those cannot be trusted to end it. A `@` in the vhost or query hides more
/// than needed, never less. Text without `://` (a URL missing its scheme)
/// is redacted the same way.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    let Some((user, _password)) = userinfo.split_once(':') else {
        // A user name alone: nothing secret.
        return url.to_owned();
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{user}:***@{host}"),
    }
}

/// Open a connection. Errors name the broker by its redacted URL and never
/// carry the password (lapin's own error text does not include the URL).
///
/// A `@` after the host is refused: it means a password with `@`, `/`, `?`
/// or `#` that was not percent-encoded, and connecting would treat part of
/// the password as the host name (which lapin logs and DNS sees).
pub async fn connect(url: &str, heartbeat_secs: u16) -> Result<Connection> {
    let mut uri = parse_url(url)?;
    uri.query.heartbeat = Some(heartbeat_secs);
    let properties = ConnectionProperties::default().with_connection_name("event-host".into());
    Connection::connect_uri(uri, properties)
        .await
        .map_err(|e| anyhow!("{}", e.to_string().replace(url, &redact(url))))
        .with_context(|| format!("connecting to {}", redact(url)))
}

/// Parse an AMQP URL; errors never show the password. `run` checks the
/// URL with this at start, so a typo fails at once instead of looking
/// like an unreachable broker forever.
pub fn parse_url(url: &str) -> Result<lapin::uri::AMQPUri> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if rest[authority_end..].contains('@') {
        bail!(
            "invalid AMQP URL {}: `@` after the host; percent-encode reserved characters \
             in the user name and password (`@` as %40, `/` as %2F, `?` as %3F, `#` as %23, \
             `%` as %25)",
            redact(url)
        );
    }
    url.parse().map_err(|e: String| {
        anyhow!(
            "invalid AMQP URL {}: {}",
            redact(url),
            e.replace(url, &redact(url))
        )
    })
}

/// A handler's queue names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Work queue.
    pub queue: String,
    /// Dead-letter exchange.
    pub dlx: String,
    /// Dead-letter queue.
    pub dlq: String,
    /// Retry delay queues, index n = the delay after attempt n+1.
    pub retry_queues: Vec<String>,
}

impl Topology {
    /// Names for a handler with these settings.
    pub fn new(settings: &BrokerSettings) -> Self {
        let q = &settings.queue;
        Self {
            queue: q.clone(),
            dlx: format!("{q}.dlx"),
            dlq: format!("{q}.dlq"),
            retry_queues: settings
                .retry_delays_ms
                .iter()
                .map(|ms| format!("{q}.retry.{ms}ms"))
                .collect(),
        }
    }

    /// The delay queue for a message that just failed attempt `attempt`.
    pub fn retry_queue(&self, attempt: u32) -> Option<&str> {
        let index = attempt.checked_sub(1)? as usize;
        self.retry_queues
            .get(index)
            .or(self.retry_queues.last())
            .map(String::as_str)
    }
}

fn lapin_kind(kind: ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Headers => lapin::ExchangeKind::Headers,
    }
}

fn durable_queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

/// Declare (or, when passive, check) a handler's topology.
pub async fn declare(
    conn: &Connection,
    topo: &Topology,
    subs: &[Subscription],
    settings: &BrokerSettings,
) -> Result<()> {
    for sub in subs {
        ensure_exchange(conn, &sub.exchange, sub.kind, settings.passive).await?;
    }
    for out in &settings.publishes_to {
        ensure_exchange(conn, &out.exchange, out.kind, settings.passive).await?;
    }
    let ch = conn.create_channel().await.context("opening a channel")?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    if settings.passive {
        ch.queue_declare(topo.queue.as_str().into(), passive, FieldTable::default())
            .await
            .with_context(|| format!("queue {:?} must exist (passive topology)", topo.queue))?;
    } else {
        ch.queue_declare(
            topo.queue.as_str().into(),
            QueueDeclareOptions::durable(),
            durable_queue_args(settings.queue_type),
        )
        .await
        .with_context(|| format!("declaring queue {:?}", topo.queue))?;
        for sub in subs {
            for key in sub.effective_keys() {
                let args = if sub.kind == ExchangeKind::Headers {
                    headers_binding_args(&key)
                } else {
                    FieldTable::default()
                };
                let key = if sub.kind == ExchangeKind::Headers {
                    String::new()
                } else {
                    key
                };
                ch.queue_bind(
                    topo.queue.as_str().into(),
                    sub.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    args,
                )
                .await
                .with_context(|| {
                    format!(
                        "binding {:?} to {:?} with {key:?}",
                        topo.queue, sub.exchange
                    )
                })?;
            }
        }
    }
    // The retry and dead-letter path is the host's own, so it is declared
    // even for passive topology.
    for (queue, delay) in topo.retry_queues.iter().zip(&settings.retry_delays_ms) {
        let mut args = durable_queue_args(settings.queue_type);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(*delay as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(topo.queue.as_str().into()),
        );
        ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .with_context(|| format!("declaring retry queue {queue:?}"))?;
    }
    ch.exchange_declare(
        topo.dlx.as_str().into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("declaring dead-letter exchange {:?}", topo.dlx))?;
    ch.queue_declare(
        topo.dlq.as_str().into(),
        QueueDeclareOptions::durable(),
        durable_queue_args(settings.queue_type),
    )
    .await
    .with_context(|| format!("declaring dead-letter queue {:?}", topo.dlq))?;
    ch.queue_bind(
        topo.dlq.as_str().into(),
        topo.dlx.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, "topology declared".into()).await;
    Ok(())
}

/// Remove bindings of `queue` (each subscription with the keys to
/// unbind). A binding or exchange that is already gone is not an error.
pub async fn unbind(conn: &Connection, queue: &str, subs: &[Subscription]) -> Result<()> {
    for sub in subs {
        for key in sub.effective_keys() {
            let (key, args) = if sub.kind == ExchangeKind::Headers {
                (String::new(), headers_binding_args(&key))
            } else {
                (key, FieldTable::default())
            };
            // Own channel per binding: unbinding from a deleted exchange
            // closes the channel it was tried on.
            let ch = conn.create_channel().await.context("opening a channel")?;
            match ch
                .queue_unbind(
                    queue.into(),
                    sub.exchange.as_str().into(),
                    key.as_str().into(),
                    args,
                )
                .await
            {
                Ok(()) => {
                    let _ = ch.close(200, "unbound".into()).await;
                }
                Err(e) if conn.status().connected() => {
                    tracing::debug!(queue, exchange = %sub.exchange, "binding already gone: {e}");
                }
                Err(e) => return Err(e).context("unbinding"),
            }
        }
    }
    Ok(())
}

/// Whether `exchange` exists (a passive declare on a throwaway channel,
/// since a failed one closes its channel).
pub async fn exchange_exists(conn: &Connection, exchange: &str) -> Result<bool> {
    let probe = conn.create_channel().await.context("opening a channel")?;
    let exists = probe
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    if exists {
        let _ = probe.close(200, "checked".into()).await;
    }
    Ok(exists)
}

/// Use an existing exchange as it is; declare it durable only when absent.
/// A passive declare that fails closes its channel, hence a throwaway one.
async fn ensure_exchange(
    conn: &Connection,
    exchange: &str,
    kind: ExchangeKind,
    passive_only: bool,
) -> Result<()> {
    if exchange_exists(conn, exchange).await? {
        return Ok(());
    }
    if passive_only {
        bail!("exchange {exchange:?} does not exist (passive topology)");
    }
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.exchange_declare(
        exchange.into(),
        lapin_kind(kind),
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("declaring exchange {exchange:?} ({})", kind.as_str()))?;
    let _ = ch.close(200, "exchange declared".into()).await;
    Ok(())
}

/// A headers-exchange binding written `k=v,k2=v2[,x-match=any]`.
fn headers_binding_args(key: &str) -> FieldTable {
    let mut args = FieldTable::default();
    for pair in key.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        args.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    args
}

/// A consumer channel with the handler's prefetch applied.
pub async fn consumer_channel(conn: &Connection, prefetch: u16) -> Result<Channel> {
    let ch = conn
        .create_channel()
        .await
        .context("opening a consumer channel")?;
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .context("setting prefetch")?;
    Ok(ch)
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel> {
    let ch = conn
        .create_channel()
        .await
        .context("opening a publish channel")?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok(ch)
}

/// Convert an AMQP delivery into a host delivery. The host's own headers
/// are consumed here: the attempt number, and the original exchange and
/// routing key of a message coming back from a retry queue.
pub fn to_delivery(d: &lapin::message::Delivery) -> Delivery {
    let props = &d.properties;
    let mut attempt = 1;
    let mut exchange = d.exchange.as_str().to_owned();
    let mut routing_key = d.routing_key.as_str().to_owned();
    let mut headers = Vec::new();
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            match k.as_str() {
                ATTEMPT_HEADER => {
                    attempt = amqp_int(v)
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(1)
                        .max(1)
                }
                EXCHANGE_HEADER => exchange = amqp_text(v).unwrap_or(exchange),
                ROUTING_KEY_HEADER => routing_key = amqp_text(v).unwrap_or(routing_key),
                name if name.starts_with("x-event-host-") => {}
                name => headers.push((name.to_owned(), header_value(v))),
            }
        }
    }
    Delivery {
        payload: d.data.clone(),
        exchange,
        routing_key,
        message_id: props.message_id().as_ref().map(|s| s.as_str().to_owned()),
        correlation_id: props
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        content_type: props.content_type().as_ref().map(|s| s.as_str().to_owned()),
        headers,
        timestamp: *props.timestamp(),
        redelivered: d.redelivered,
        attempt,
    }
}

fn amqp_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => *n as i64,
        AMQPValue::ShortShortUInt(n) => *n as i64,
        AMQPValue::ShortInt(n) => *n as i64,
        AMQPValue::ShortUInt(n) => *n as i64,
        AMQPValue::LongInt(n) => *n as i64,
        AMQPValue::LongUInt(n) => *n as i64,
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok()?,
        _ => return None,
    })
}

fn amqp_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Any AMQP field value as a WIT header value. Nested tables and arrays
/// (RabbitMQ's `x-death`, for example) become JSON text of the plain shape
/// a replayed event's headers have (see [`json_value`]), so a handler sees
/// the same JSON in production as under `replay`.
pub fn header_value(v: &AMQPValue) -> HeaderValue {
    if let Some(n) = amqp_int(v) {
        return HeaderValue::Integer(n);
    }
    match v {
        AMQPValue::Boolean(b) => HeaderValue::Boolean(*b),
        AMQPValue::Float(f) => HeaderValue::Float(*f as f64),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::ShortString(s) => HeaderValue::Text(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => HeaderValue::Text(text.to_owned()),
            Err(_) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        other => HeaderValue::Json(json_value(other).to_string()),
    }
}

/// A field value as plain JSON: a table is an object, an array an array,
/// text a string, any number a number (a decimal as its value, a NaN or
/// infinite float as `null`), void `null`, and bytes (a byte array, or a
/// long string that is not UTF-8) an array of numbers. Not serde's tagged
/// form (`{"FieldTable":{"count":{"LongLongInt":1}, ...}}`), in which
/// even a queue name would arrive as an array of bytes.
pub fn json_value(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    let float = |f: f64| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number);
    let bytes = |b: &[u8]| Value::Array(b.iter().map(|&b| Value::from(b)).collect());
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(d) => float(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => bytes(s.as_bytes()),
        },
        AMQPValue::ByteArray(b) => bytes(b.as_slice()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json_value).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), json_value(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

/// AMQP properties for a message a handler published. Persistent, so it
/// survives a broker restart once confirmed.
pub fn outgoing_properties(o: &Outgoing) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in &o.headers {
        headers.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(ct) = &o.content_type {
        props = props.with_content_type(ct.as_str().into());
    }
    if let Some(id) = &o.message_id {
        props = props.with_message_id(id.as_str().into());
    }
    if let Some(id) = &o.correlation_id {
        props = props.with_correlation_id(id.as_str().into());
    }
    props
}

/// Properties for re-publishing a delivery to a retry or dead-letter
/// queue: the original properties, plus the host's headers.
pub fn republish_properties(
    original: &BasicProperties,
    extra: &[(&str, AMQPValue)],
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        headers.insert(ShortString::from(*k), v.clone());
    }
    original.clone().with_delivery_mode(2).with_headers(headers)
}

/// A text header value.
pub fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// Capped exponential backoff with jitter, for reconnects.
pub fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(8)).min(10_000);
    // Jitter from the clock's low bits: enough to spread a fleet's
    // reconnects, no RNG dependency needed.
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 % (base / 2 + 1))
        .unwrap_or(0);
    Duration::from_millis(base / 2 + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://u:p@host"), "amqp://u:***@host");
        assert_eq!(redact("amqp://host:5672"), "amqp://host:5672");
        assert!(!redact("amqps://a:b@c@d/vh").contains("b@c"));
    }

    #[test]
    fn retry_queue_per_attempt() {
        let topo = Topology {
            queue: "q".into(),
            dlx: "q.dlx".into(),
            dlq: "q.dlq".into(),
            retry_queues: vec!["q.retry.100ms".into(), "q.retry.200ms".into()],
        };
        assert_eq!(topo.retry_queue(1), Some("q.retry.100ms"));
        assert_eq!(topo.retry_queue(2), Some("q.retry.200ms"));
        assert_eq!(topo.retry_queue(9), Some("q.retry.200ms"));
        assert_eq!(topo.retry_queue(0), None);
    }
}
