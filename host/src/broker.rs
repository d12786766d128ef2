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

use std::borrow::Cow;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hmac::digest::generic_array::GenericArray;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use lapin::options::{
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sha2::{Digest, Sha256};

use crate::config::{BrokerSettings, ExchangeOptions, QueueType};
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
/// Host (`host_id`) that published it: a handler's output, or a
/// dead-letter copy.
pub const HOST_HEADER: &str = "x-event-host-host";
/// Attempts made before it was dead-lettered.
pub const ATTEMPTS_HEADER: &str = "x-event-host-attempts";
/// When a dead-letter copy was made (Unix seconds).
pub const DEAD_LETTERED_AT_HEADER: &str = "x-event-host-dead-lettered-at";
/// The attempt a dead-letter copy's signature covers: no delivery is
/// attempt 0, so a dead-letter copy's signature is never a retry copy's.
pub const DEAD_LETTER_ATTEMPT: u32 = 0;
/// HMAC-SHA256 (hex) of a retry copy's attempt, original exchange and
/// routing key, work queue and payload hash, keyed with the host's secret:
/// the attempt, exchange and routing-key headers are trusted only with it,
/// so a publisher cannot skip the retries or pose as another exchange.
pub const SIGNATURE_HEADER: &str = "x-event-host-signature";

/// Longest AMQP short string: exchange and queue names, routing keys,
/// `message-id`, `correlation-id`, `content-type` and header names. lapin
/// panics on a longer one, so nothing longer may reach it.
pub const MAX_SHORT_STRING_BYTES: usize = 255;

/// Prefix of the headers the host sets itself (attempt, original exchange,
/// reason, signature): never shown to a guest as such, and a guest may not
/// publish them.
pub const HOST_HEADER_PREFIX: &str = "x-event-host-";

/// Longest reason written to an `x-event-host-reason` header: a guest's
/// reason can be any size, and a header frame over `frame_max` makes the
/// broker close the whole connection. Longer reasons are cut on a char
/// boundary, noting the original length.
pub const MAX_REASON_BYTES: usize = 1024;

/// Largest encoded header table an incoming delivery may carry (and an
/// outgoing message a guest publishes). Retry and dead-letter copies carry
/// the original headers plus the host's (a few KiB at most, reasons being
/// capped), so every copy stays well under the 128 KiB `frame_max` lapin
/// and RabbitMQ negotiate. A delivery over it goes straight to its DLQ,
/// the copy carrying only the host's headers.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// Nesting depth past which a nested header table or array is shown to a
/// guest as the text `"..."` rather than converted (conversion recurses).
pub const MAX_HEADER_DEPTH: usize = 32;

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
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from("event-host"));
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
            retry_queues: settings
                .retry_delays_ms
                .iter()
                .map(|ms| format!("{q}.retry.{ms}ms"))
                .collect(),
            ..Self::of_queue(q)
        }
    }

    /// The work queue's and dead-letter path's names, without the retry
    /// queues (which depend on the retry settings): for tools that touch
    /// only those (`dlq`).
    pub fn of_queue(queue: &str) -> Self {
        Self {
            queue: queue.to_owned(),
            dlx: format!("{queue}.dlx"),
            dlq: format!("{queue}.dlq"),
            retry_queues: Vec::new(),
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

/// An `[exchanges]` section's arguments as AMQP values (checked to be
/// scalars when the config was read; anything else is left out).
fn declare_arguments(arguments: &std::collections::BTreeMap<String, toml::Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        let value = match value {
            toml::Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            toml::Value::Integer(i) => AMQPValue::LongLongInt(*i),
            toml::Value::Float(f) => AMQPValue::Double(*f),
            toml::Value::Boolean(b) => AMQPValue::Boolean(*b),
            _ => continue,
        };
        table.insert(short(key), value);
    }
    table
}

fn durable_queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert(short("x-queue-type"), text("quorum"));
    }
    args
}

/// Arguments of a queue whose messages the broker dead-letters (the delay
/// queues): on quorum queues, at-least-once dead-lettering, so the only
/// copy of a message on its way back to the work queue cannot be lost
/// (RabbitMQ requires `reject-publish` overflow for it).
fn dead_lettering_queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = durable_queue_args(queue_type);
    if queue_type == QueueType::Quorum {
        args.insert(short("x-dead-letter-strategy"), text("at-least-once"));
        args.insert(short("x-overflow"), text("reject-publish"));
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
        ensure_exchange(conn, &sub.exchange, sub.kind, settings).await?;
    }
    for out in &settings.publishes_to {
        ensure_exchange(conn, &out.exchange, out.kind, settings).await?;
    }
    let mut ch = conn.create_channel().await.context("opening a channel")?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    if settings.passive {
        ch.queue_declare(name(&topo.queue)?, passive, FieldTable::default())
            .await
            .with_context(|| format!("queue {:?} must exist (passive topology)", topo.queue))?;
    } else {
        ch.queue_declare(
            name(&topo.queue)?,
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
                    name(&topo.queue)?,
                    name(&sub.exchange)?,
                    name(&key)?,
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
        let mut args = dead_lettering_queue_args(settings.queue_type);
        args.insert(
            short("x-message-ttl"),
            AMQPValue::LongLongInt(i64::try_from(*delay).unwrap_or(i64::MAX)),
        );
        args.insert(short("x-dead-letter-exchange"), text(""));
        args.insert(short("x-dead-letter-routing-key"), text(&topo.queue));
        let declared = ch
            .queue_declare(name(queue)?, QueueDeclareOptions::durable(), args)
            .await;
        match declared {
            Ok(_) => {}
            // A quorum delay queue an older host declared without
            // at-least-once dead-lettering: the broker refuses to redeclare
            // it with other arguments. Keep using it (at-most-once, as
            // before) rather than refuse the handler; deleting it while
            // empty upgrades it.
            Err(e) if settings.queue_type == QueueType::Quorum && conn.status().connected() => {
                ch = conn.create_channel().await.context("opening a channel")?;
                ch.queue_declare(name(queue)?, passive, FieldTable::default())
                    .await
                    .with_context(|| format!("declaring retry queue {queue:?}: {e}"))?;
                tracing::warn!(queue, "retry queue exists with other arguments ({e}); it dead-letters at most once until deleted while empty");
            }
            Err(e) => return Err(e).with_context(|| format!("declaring retry queue {queue:?}")),
        }
    }
    ch.exchange_declare(
        name(&topo.dlx)?,
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
        name(&topo.dlq)?,
        QueueDeclareOptions::durable(),
        durable_queue_args(settings.queue_type),
    )
    .await
    .with_context(|| format!("declaring dead-letter queue {:?}", topo.dlq))?;
    ch.queue_bind(
        name(&topo.dlq)?,
        name(&topo.dlx)?,
        short(""),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, short("topology declared")).await;
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
                .queue_unbind(name(queue)?, name(&sub.exchange)?, name(&key)?, args)
                .await
            {
                Ok(()) => {
                    let _ = ch.close(200, short("unbound")).await;
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
            // A guest's over-long name, shortened, names no exchange.
            short(exchange),
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
        let _ = probe.close(200, short("checked")).await;
    }
    Ok(exists)
}

/// How many consumers the broker counts on `queue` (a passive declare on a
/// throwaway channel, since a failed one closes its channel). The count
/// includes this connection's own consumer, if it has one there.
pub async fn consumer_count(conn: &Connection, queue: &str) -> Result<u32> {
    let probe = conn.create_channel().await.context("opening a channel")?;
    let declared = probe
        .queue_declare(
            name(queue)?,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("counting the consumers of queue {queue:?}"))?;
    let _ = probe.close(200, short("counted")).await;
    Ok(declared.consumer_count())
}

/// Use an existing exchange as it is; declare it only when absent, durable
/// unless its `[exchanges]` section says otherwise. A passive declare that
/// fails closes its channel, hence a throwaway one.
async fn ensure_exchange(
    conn: &Connection,
    exchange: &str,
    kind: ExchangeKind,
    settings: &BrokerSettings,
) -> Result<()> {
    if exchange_exists(conn, exchange).await? {
        return Ok(());
    }
    if settings.passive {
        bail!("exchange {exchange:?} does not exist (passive topology)");
    }
    let defaults = ExchangeOptions::default();
    let options = settings.exchanges.get(exchange).unwrap_or(&defaults);
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.exchange_declare(
        name(exchange)?,
        lapin_kind(kind),
        ExchangeDeclareOptions {
            durable: options.durable,
            auto_delete: options.auto_delete,
            ..ExchangeDeclareOptions::default()
        },
        declare_arguments(&options.arguments),
    )
    .await
    .with_context(|| {
        format!(
            "declaring exchange {exchange:?} ({}, durable {}, auto-delete {})",
            kind.as_str(),
            options.durable,
            options.auto_delete
        )
    })?;
    let _ = ch.close(200, short("exchange declared")).await;
    Ok(())
}

/// A headers-exchange binding written `k=v,k2=v2[,x-match=any]`.
fn headers_binding_args(key: &str) -> FieldTable {
    let mut args = FieldTable::default();
    for pair in key.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        args.insert(short(k), text(v));
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

/// [`to_delivery_signed`] with no signer: the host's attempt, exchange and
/// routing-key headers are never trusted (tools and tests converting
/// deliveries that did not come through a handler's own retry path).
pub fn to_delivery(d: &lapin::message::Delivery) -> Delivery {
    convert(d, None)
}

/// Convert an AMQP delivery into a host delivery. The host's own headers
/// are consumed here: the attempt number, and the original exchange and
/// routing key of a message coming back from a retry queue — honoured only
/// when `signer` verifies the copy's signature for work queue `queue`
/// (anyone can publish an `x-event-host-attempt` header); otherwise the
/// delivery is attempt 1 from its own exchange and routing key. Either way
/// `x-event-host-*` headers are not shown to the guest.
pub fn to_delivery_signed(
    d: &lapin::message::Delivery,
    signer: &RetrySigner,
    queue: &str,
) -> Delivery {
    convert(d, Some((signer, queue)))
}

fn convert(d: &lapin::message::Delivery, signer: Option<(&RetrySigner, &str)>) -> Delivery {
    let props = &d.properties;
    let mut claimed_attempt = None;
    let mut claimed_exchange = None;
    let mut claimed_routing_key = None;
    let mut signature = None;
    let mut headers = Vec::new();
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            match k.as_str() {
                ATTEMPT_HEADER => {
                    claimed_attempt = amqp_int(v).and_then(|n| u32::try_from(n).ok());
                }
                EXCHANGE_HEADER => claimed_exchange = amqp_text(v),
                ROUTING_KEY_HEADER => claimed_routing_key = amqp_text(v),
                SIGNATURE_HEADER => signature = amqp_text(v),
                name if name.starts_with(HOST_HEADER_PREFIX) => {}
                name => headers.push((name.to_owned(), header_value(v))),
            }
        }
    }
    let mut attempt = 1;
    let mut exchange = d.exchange.as_str().to_owned();
    let mut routing_key = d.routing_key.as_str().to_owned();
    if let (Some(claimed), Some(signature), Some((signer, queue))) =
        (claimed_attempt, signature, signer)
    {
        let claimed_exchange = claimed_exchange.unwrap_or_default();
        let claimed_routing_key = claimed_routing_key.unwrap_or_default();
        let signed = RetryFacts {
            queue,
            attempt: claimed,
            exchange: &claimed_exchange,
            routing_key: &claimed_routing_key,
            payload: &d.data,
        };
        if signer.verify(&signed, &signature) {
            attempt = claimed.max(1);
            exchange = claimed_exchange;
            routing_key = claimed_routing_key;
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
        // The dispatcher gives it a span when trace context is on.
        span: None,
        headers,
        timestamp: *props.timestamp(),
        redelivered: d.redelivered,
        attempt,
    }
}

/// What a retry copy's signature covers.
#[derive(Debug, Clone, Copy)]
pub struct RetryFacts<'a> {
    /// The work queue the copy returns to.
    pub queue: &'a str,
    /// The attempt it will be.
    pub attempt: u32,
    /// Exchange the message was first published to.
    pub exchange: &'a str,
    /// Routing key it was first published with.
    pub routing_key: &'a str,
    /// Its body.
    pub payload: &'a [u8],
}

/// Signs and verifies retry copies with the host's secret (see
/// [`SIGNATURE_HEADER`]). The secret lives in the state store, so a
/// restarted host still trusts the copies its predecessor made.
#[derive(Clone)]
pub struct RetrySigner {
    key: [u8; 32],
}

impl std::fmt::Debug for RetrySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetrySigner(..)") // never the key
    }
}

impl RetrySigner {
    /// A signer with this key.
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    fn mac(&self, facts: &RetryFacts<'_>) -> Hmac<Sha256> {
        // HMAC pads a short key with zeros to the block size: padding it
        // here gives the same MAC through the constructor that cannot fail.
        let mut block = [0u8; 64];
        block[..self.key.len()].copy_from_slice(&self.key);
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&GenericArray::from(block));
        // Length-prefixed fields, so no two field lists hash alike.
        for field in [facts.queue, facts.exchange, facts.routing_key] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field.as_bytes());
        }
        mac.update(&facts.attempt.to_be_bytes());
        mac.update(&Sha256::digest(facts.payload));
        mac
    }

    /// The signature header's value for a retry copy.
    pub fn sign(&self, facts: &RetryFacts<'_>) -> String {
        hex::encode(self.mac(facts).finalize().into_bytes())
    }

    /// Whether `signature` is this host's for `facts` (constant time).
    pub fn verify(&self, facts: &RetryFacts<'_>, signature: &str) -> bool {
        match hex::decode(signature) {
            Ok(bytes) => self.mac(facts).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
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
///
/// Nesting deeper than [`MAX_HEADER_DEPTH`] shows as the text `"..."`:
/// a publisher can nest tables thousands deep, and this recurses.
pub fn json_value(v: &AMQPValue) -> serde_json::Value {
    json_value_at(v, 0)
}

fn json_value_at(v: &AMQPValue, depth: usize) -> serde_json::Value {
    use serde_json::Value;
    if depth > MAX_HEADER_DEPTH {
        return Value::String("...".into());
    }
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
        AMQPValue::FieldArray(a) => Value::Array(
            a.as_slice()
                .iter()
                .map(|v| json_value_at(v, depth + 1))
                .collect(),
        ),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), json_value_at(v, depth + 1)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

/// AMQP properties for a message a handler published. Persistent, so it
/// survives a broker restart once confirmed. Every short string goes
/// through [`short`]: outbox rows written before publish checked lengths
/// (or by a guest the check missed) still relay instead of panicking.
pub fn outgoing_properties(o: &Outgoing) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in &o.headers {
        headers.insert(short(k), text(v));
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(ct) = &o.content_type {
        props = props.with_content_type(short(ct));
    }
    if let Some(id) = &o.message_id {
        props = props.with_message_id(short(id));
    }
    if let Some(id) = &o.correlation_id {
        props = props.with_correlation_id(short(id));
    }
    props
}

/// Which of a delivery's own headers a retry or dead-letter copy keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepHeaders {
    /// All of them but the host's attempt and signature (they are
    /// replaced, or, on a dead-letter copy, dropped: a message moved back
    /// from the DLQ starts its attempts afresh).
    Original,
    /// None: the original table is over [`MAX_HEADER_BYTES`].
    None,
    /// For a retry copy, which a delay queue dead-letters back: the
    /// original ones but the broker's own death records (`x-death`,
    /// `x-first-death-*`, `x-last-death-*`). RabbitMQ reads and extends
    /// those when it dead-letters, and one a publisher forged (a table
    /// where it expects an array, say) crashes the delay queue's process,
    /// which then refuses every retry copy of the handler. The delay queue
    /// writes its own.
    ForDelayQueue,
    /// For a dead letter sent back to its work queue (`dlq redrive`): the
    /// original ones less all of the host's (reason, attempts, the old
    /// signature: it starts afresh) and the broker's death records.
    ForRedrive,
}

impl KeepHeaders {
    /// Whether a copy keeps the original header `name`.
    fn keeps(self, name: &str) -> bool {
        match self {
            KeepHeaders::None => false,
            KeepHeaders::Original => name != ATTEMPT_HEADER && name != SIGNATURE_HEADER,
            KeepHeaders::ForDelayQueue => {
                name != ATTEMPT_HEADER && name != SIGNATURE_HEADER && !is_death_header(name)
            }
            KeepHeaders::ForRedrive => {
                !name.starts_with(HOST_HEADER_PREFIX) && !is_death_header(name)
            }
        }
    }
}

/// Whether `name` is one of RabbitMQ's death-record headers.
fn is_death_header(name: &str) -> bool {
    name == "x-death" || name.starts_with("x-first-death-") || name.starts_with("x-last-death-")
}

/// Properties for re-publishing a delivery to a retry or dead-letter
/// queue, or from a dead-letter queue back to its work queue: the original
/// properties, the headers `keep` keeps, plus the host's.
pub fn republish_properties(
    original: &BasicProperties,
    keep: KeepHeaders,
    extra: &[(&str, AMQPValue)],
) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in original
        .headers()
        .as_ref()
        .map(FieldTable::inner)
        .into_iter()
        .flatten()
    {
        if keep.keeps(k.as_str()) {
            headers.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in extra {
        headers.insert(short(k), v.clone());
    }
    original.clone().with_delivery_mode(2).with_headers(headers)
}

/// A header of `props` as text, if it is a string.
pub fn header_text(props: &BasicProperties, name: &str) -> Option<String> {
    props
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(name))
        .and_then(amqp_text)
}

/// A header of `props` as an integer, if it is one.
pub fn header_int(props: &BasicProperties, name: &str) -> Option<i64> {
    props
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(name))
        .and_then(amqp_int)
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A text header value.
pub fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// A reason as a header value, capped at [`MAX_REASON_BYTES`].
pub fn reason_text(reason: &str) -> AMQPValue {
    text(&cap_reason(reason))
}

/// `reason` cut to [`MAX_REASON_BYTES`] on a char boundary, with a note of
/// its original length; unchanged when it fits.
pub fn cap_reason(reason: &str) -> Cow<'_, str> {
    if reason.len() <= MAX_REASON_BYTES {
        return Cow::Borrowed(reason);
    }
    let note = format!("... ({} bytes, cut)", reason.len());
    let cut = floor_char_boundary(reason, MAX_REASON_BYTES.saturating_sub(note.len()));
    Cow::Owned(format!("{}{note}", &reason[..cut]))
}

fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// An AMQP short string from text that may be too long for one (ids a
/// publisher or a guest chose, ids derived from them, header names): kept
/// as it is when it fits, else a readable prefix, `~`, and the sha256 hex
/// of the whole text — deterministic, so a re-run after a crash derives
/// the same id, and distinct texts stay distinct.
///
/// This and [`name`] are the only ways host code makes short strings:
/// lapin's `From<&str>`/`From<String>` panic past 255 bytes. (A test below
/// scans `host/src` for other conversions; clippy's `disallowed-methods`
/// cannot name them, since `.into()` resolves to the blanket
/// `Into::into` whatever the target type.)
pub fn short(s: &str) -> ShortString {
    if let Ok(fits) = ShortString::try_new(s) {
        return fits;
    }
    let hash = crate::handler::sha256_hex(s.as_bytes());
    let keep = floor_char_boundary(s, MAX_SHORT_STRING_BYTES - 1 - hash.len());
    ShortString::try_new(format!("{}~{hash}", &s[..keep])).unwrap_or_default()
}

/// A name the host declares or uses on the broker (queue, exchange,
/// binding key) as a short string. Config and manifests are validated at
/// load (names at most 100 bytes, exchanges and binding keys 255), so this
/// only fails on a bug; it errs rather than shortening, since a
/// shortened name would be another queue.
pub fn name(s: &str) -> Result<ShortString> {
    ShortString::try_new(s)
        .map_err(|e| anyhow!("broker name {:?}...: {e}", &s[..floor_char_boundary(s, 40)]))
}

/// The encoded size in bytes of a header table, as it goes on the wire.
/// Iterative: tables can nest thousands deep.
pub fn encoded_size(table: &FieldTable) -> usize {
    let mut size = 4usize; // the table's length prefix
    let mut stack: Vec<&AMQPValue> = Vec::new();
    // An entry: name length byte, name, type byte, value.
    let entry = |k: &ShortString| 2 + k.as_str().len();
    for (k, v) in table.inner() {
        size = size.saturating_add(entry(k));
        stack.push(v);
    }
    while let Some(v) = stack.pop() {
        let own = match v {
            AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
            AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
            AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
            AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
            AMQPValue::DecimalValue(_) => 5,
            AMQPValue::ShortString(s) => 1 + s.as_str().len(),
            AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
            AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
            AMQPValue::Void => 0,
            AMQPValue::FieldArray(a) => {
                for v in a.as_slice() {
                    size = size.saturating_add(1); // each item's type byte
                    stack.push(v);
                }
                4
            }
            AMQPValue::FieldTable(t) => {
                for (k, v) in t.inner() {
                    size = size.saturating_add(entry(k));
                    stack.push(v);
                }
                4
            }
        };
        size = size.saturating_add(own);
    }
    size
}

/// The encoded size of a delivery's header table (0 without one).
pub fn headers_size(props: &BasicProperties) -> usize {
    props.headers().as_ref().map_or(0, encoded_size)
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

    /// Every short string host code gives lapin is made by [`short`] or
    /// [`name`]: lapin's `From<&str>`/`From<String>` for `ShortString`
    /// panic past 255 bytes. Clippy's `disallowed-methods` cannot keep
    /// those out — `.into()` and `ShortString::from` resolve to the
    /// generic `Into::into`/`From::from` trait methods, not to lapin's impls
    /// (see clippy.toml) — so this scans the source instead: in files that
    /// use lapin, no `ShortString::from`, and no `.into()` but on a string
    /// literal that fits or a receiver listed here as not a short string.
    #[test]
    fn no_unchecked_short_string_conversions_in_host_code() {
        // (file, receiver of `.into()`) known not to make a short string.
        const NOT_SHORT: &[(&str, &str)] = &[("server.rs", "until")];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![root.clone()];
        let mut offences = Vec::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).unwrap() {
                    files.push(entry.unwrap().path());
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may convert freely.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            if !code.contains("lapin") {
                continue;
            }
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            for (n, line) in code.lines().enumerate() {
                let line = line.split("//").next().unwrap_or_default();
                let at = format!("{file}:{}: {}", n + 1, line.trim());
                if line.contains("ShortString::from") {
                    offences.push(at.clone());
                }
                let mut rest = line;
                while let Some(i) = rest.find(".into()") {
                    let before = &rest[..i];
                    rest = &rest[i + 7..];
                    if let Some(body) = before.strip_suffix('"') {
                        let literal = body.rsplit('"').next().unwrap_or_default();
                        if literal.len() <= MAX_SHORT_STRING_BYTES {
                            continue;
                        }
                    }
                    let receiver: String = before
                        .chars()
                        .rev()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    if !NOT_SHORT.contains(&(file.as_str(), receiver.as_str())) {
                        offences.push(at.clone());
                    }
                }
            }
        }
        assert!(
            offences.is_empty(),
            "use broker::short or broker::name, not lapin's panicking conversions:\n{}",
            offences.join("\n")
        );
    }

    #[test]
    fn short_strings_are_kept_or_shortened_deterministically() {
        assert_eq!(short("orders").as_str(), "orders");
        let fits = "a".repeat(255);
        assert_eq!(short(&fits).as_str(), fits);
        let long = format!("inventory:{}:0", "é".repeat(200));
        let a = short(&long);
        assert!(a.as_str().len() <= 255);
        assert!(a.as_str().starts_with("inventory:é"));
        assert_eq!(a, short(&long), "the same text, the same id");
        assert_ne!(a, short(&format!("inventory:{}:1", "é".repeat(200))));
        assert!(name(&"q".repeat(256)).is_err());
    }

    #[test]
    fn reasons_are_capped_on_a_char_boundary_with_their_length() {
        assert_eq!(cap_reason("short"), "short");
        let long = "ü".repeat(200_000);
        let capped = cap_reason(&long);
        assert!(capped.len() <= MAX_REASON_BYTES);
        assert!(capped.ends_with("(400000 bytes, cut)"), "{capped}");
    }

    #[test]
    fn encoded_size_matches_the_wire_and_survives_deep_nesting() {
        let mut table = FieldTable::default();
        table.insert(short("a"), text("xyz"));
        table.insert(short("n"), AMQPValue::LongLongInt(1));
        // Length prefix 4; "a": 1+1 name, 1 type, 4+3 long string; "n":
        // 1+1 name, 1 type, 8 long long.
        assert_eq!(encoded_size(&table), 4 + 10 + 11);
        let mut deep = AMQPValue::FieldArray(Default::default());
        for _ in 0..20_000 {
            deep = AMQPValue::FieldArray(vec![deep].into());
        }
        let mut nested = FieldTable::default();
        nested.insert(short("deep"), deep);
        // The entry (name 4), then 20 001 arrays of a 4-byte length, all
        // but the innermost holding one item (a type byte).
        assert_eq!(encoded_size(&nested), 4 + 6 + 20_001 * 4 + 20_000);
        // Dropping it recurses (lapin's types); leak it in this test only.
        std::mem::forget(nested);
    }

    #[test]
    fn only_the_hosts_signature_makes_retry_headers_trusted() {
        let signer = RetrySigner::new([7; 32]);
        let facts = RetryFacts {
            queue: "q",
            attempt: 3,
            exchange: "orders",
            routing_key: "k",
            payload: b"{}",
        };
        let signature = signer.sign(&facts);
        let delivery = |sig: &str, attempt: i64| {
            let mut headers = FieldTable::default();
            headers.insert(short(ATTEMPT_HEADER), AMQPValue::LongLongInt(attempt));
            headers.insert(short(EXCHANGE_HEADER), text("orders"));
            headers.insert(short(ROUTING_KEY_HEADER), text("k"));
            headers.insert(short(SIGNATURE_HEADER), text(sig));
            let mut d = lapin::message::Delivery::mock(
                1,
                short("other"),
                short("rk"),
                false,
                b"{}".to_vec(),
            );
            d.properties = BasicProperties::default().with_headers(headers);
            d
        };
        let trusted = to_delivery_signed(&delivery(&signature, 3), &signer, "q");
        assert_eq!(
            (
                trusted.attempt,
                trusted.exchange.as_str(),
                trusted.routing_key.as_str()
            ),
            (3, "orders", "k")
        );
        for (sig, attempt, queue, key) in [
            (signature.as_str(), 99, "q", [7; 32]), // another attempt
            (signature.as_str(), 3, "q2", [7; 32]), // another queue
            (signature.as_str(), 3, "q", [8; 32]),  // another host
            ("zz", 3, "q", [7; 32]),                // not hex
        ] {
            let d = to_delivery_signed(&delivery(sig, attempt), &RetrySigner::new(key), queue);
            assert_eq!(
                (d.attempt, d.exchange.as_str(), d.routing_key.as_str()),
                (1, "other", "rk")
            );
        }
        assert_eq!(to_delivery(&delivery(&signature, 3)).attempt, 1);
    }

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
