//! `event-host replay`: run handlers with no broker.
//!
//! Events from a JSON-lines file, and everything handlers publish, are
//! routed in memory with AMQP semantics and dispatched through the same
//! [`Dispatcher`] the broker path uses, state included. One JSON line is
//! written per handler invocation.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::dispatch::{Delivery, Dispatcher, HeaderValue, Outcome};
use crate::handler::HandlerVersion;
use crate::router::Router;
use crate::state::Outgoing;

/// One input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputEvent {
    /// Exchange it is published to.
    pub exchange: String,
    /// Routing key (default empty).
    #[serde(default)]
    pub routing_key: String,
    /// The body: a JSON string is taken as raw text (so non-JSON bodies can
    /// be replayed), anything else is serialised as JSON.
    pub payload: serde_json::Value,
    /// AMQP properties.
    #[serde(default)]
    pub properties: InputProperties,
}

/// Properties of an input line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputProperties {
    /// `message-id`.
    pub message_id: Option<String>,
    /// `correlation-id`.
    pub correlation_id: Option<String>,
    /// `content-type`.
    pub content_type: Option<String>,
    /// `timestamp` (Unix seconds).
    pub timestamp: Option<u64>,
    /// Headers: strings, integers, floats, booleans; anything else as JSON.
    #[serde(default)]
    pub headers: serde_json::Map<String, serde_json::Value>,
}

/// One output line.
#[derive(Debug, Serialize)]
pub struct OutputLine<'a> {
    /// Handler name.
    pub handler: &'a str,
    /// Handler version (sha256 of its file).
    pub version: &'a str,
    /// Exchange of the event.
    pub exchange: &'a str,
    /// Routing key of the event.
    pub routing_key: &'a str,
    /// `ack`, `retry`, `reject` or `requeue`.
    pub outcome: Outcome,
    /// Why, when not a plain ack.
    pub reason: Option<&'a str>,
    /// What the handler published.
    pub published: Vec<PublishedLine<'a>>,
}

/// A published message in the output.
#[derive(Debug, Serialize)]
pub struct PublishedLine<'a> {
    /// Exchange.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Payload: parsed JSON when it is JSON, else text.
    pub payload: serde_json::Value,
    /// Message id.
    pub message_id: Option<&'a str>,
    /// Content type.
    pub content_type: Option<&'a str>,
}

/// Counts of a replay run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Handler invocations.
    pub invocations: usize,
    /// Input or published messages no handler was bound to.
    pub unroutable: usize,
}

/// Stop a publish loop (a handler feeding its own exchange) from running
/// forever.
const MAX_INVOCATIONS: usize = 1_000_000;

/// Replay `events` through `handlers`, writing one JSON line per invocation.
pub fn replay(
    dispatcher: &Dispatcher,
    handlers: &[Arc<HandlerVersion>],
    events: impl BufRead,
    out: &mut impl Write,
) -> Result<Summary> {
    let mut router = Router::default();
    for (i, h) in handlers.iter().enumerate() {
        for sub in &h.settings.manifest.subscriptions {
            router.declare(&sub.exchange, sub.kind);
            for key in sub.effective_keys() {
                router.bind(&sub.exchange, &key, i);
            }
        }
    }
    let mut queue = VecDeque::new();
    let mut summary = Summary::default();
    for (n, line) in events.lines().enumerate() {
        let line = line.context("reading events")?;
        if line.trim().is_empty() {
            continue;
        }
        let input: InputEvent =
            serde_json::from_str(&line).with_context(|| format!("events line {}", n + 1))?;
        queue.push_back(input.into_delivery());
        while let Some(delivery) = queue.pop_front() {
            let targets =
                router.route(&delivery.exchange, &delivery.routing_key, &delivery.headers);
            if targets.is_empty() {
                summary.unroutable += 1;
                tracing::info!(exchange = %delivery.exchange, routing_key = %delivery.routing_key, "no handler is bound; message dropped as a broker would");
            }
            for target in targets {
                summary.invocations += 1;
                if summary.invocations > MAX_INVOCATIONS {
                    bail!(
                        "more than {MAX_INVOCATIONS} invocations: do handlers publish in a loop?"
                    );
                }
                let handler = &handlers[target];
                let handled = dispatcher.dispatch(handler, &delivery)?;
                let line = OutputLine {
                    handler: &handler.name,
                    version: &handler.sha256,
                    exchange: &delivery.exchange,
                    routing_key: &delivery.routing_key,
                    outcome: handled.outcome,
                    reason: handled.reason.as_deref(),
                    published: handled.published.iter().map(PublishedLine::from).collect(),
                };
                serde_json::to_writer(&mut *out, &line)?;
                out.write_all(b"\n")?;
                // Published messages count as delivered once routed here.
                dispatcher.state().clear_outbox(&handled.outbox_ids)?;
                queue.extend(handled.published.iter().map(published_delivery));
            }
        }
    }
    out.flush()?;
    Ok(summary)
}

impl InputEvent {
    fn into_delivery(self) -> Delivery {
        let payload = match self.payload {
            serde_json::Value::String(s) => s.into_bytes(),
            other => other.to_string().into_bytes(),
        };
        let headers = self
            .properties
            .headers
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => HeaderValue::Text(s),
                    serde_json::Value::Bool(b) => HeaderValue::Boolean(b),
                    serde_json::Value::Number(n) => match n.as_i64() {
                        Some(i) => HeaderValue::Integer(i),
                        None => HeaderValue::Float(n.as_f64().unwrap_or(0.0)),
                    },
                    other => HeaderValue::Json(other.to_string()),
                };
                (k, v)
            })
            .collect();
        Delivery {
            payload,
            exchange: self.exchange,
            routing_key: self.routing_key,
            message_id: self.properties.message_id,
            correlation_id: self.properties.correlation_id,
            content_type: self.properties.content_type,
            headers,
            timestamp: self.properties.timestamp,
            redelivered: false,
            attempt: 1,
            // No trace stamped: replay's output stays the same run to run.
            span: None,
        }
    }
}

fn published_delivery(p: &Outgoing) -> Delivery {
    Delivery {
        payload: p.payload.clone(),
        exchange: p.exchange.clone(),
        routing_key: p.routing_key.clone(),
        message_id: p.message_id.clone(),
        correlation_id: p.correlation_id.clone(),
        content_type: p.content_type.clone(),
        // The host's own headers are not shown to the next handler, as on
        // the broker path.
        headers: p
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(crate::broker::HOST_HEADER_PREFIX))
            .map(|(k, v)| (k.clone(), HeaderValue::Text(v.clone())))
            .collect(),
        timestamp: None,
        redelivered: false,
        attempt: 1,
        span: None,
    }
}

impl<'a> From<&'a Outgoing> for PublishedLine<'a> {
    fn from(p: &'a Outgoing) -> Self {
        let payload = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&p.payload).into_owned())
        });
        PublishedLine {
            exchange: &p.exchange,
            routing_key: &p.routing_key,
            payload,
            message_id: p.message_id.as_deref(),
            content_type: p.content_type.as_deref(),
        }
    }
}
