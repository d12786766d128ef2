//! Dead letters as a workflow: look at a handler's dead-letter queue, and
//! send its messages back to the work queue once the handler is fixed.
//!
//! A dead-letter copy carries why, when and by whom it was dead-lettered,
//! and the original exchange and routing key signed with the fleet's host
//! secret (see [`crate::broker::DEAD_LETTER_ATTEMPT`]). Re-driving one
//! publishes it to the work queue as attempt 1 of that exchange and
//! routing key (signed anew), with its message id and the publisher's
//! properties and headers; the dead letter is acked only after the broker
//! confirmed the copy. A re-drive killed at any point loses nothing: a
//! dead letter whose copy was confirmed but which was not yet acked goes
//! back to the DLQ and is sent again by the next re-drive, a duplicate the
//! handler's dedupe (message id or `idempotency_key`) absorbs.
//!
//! Only copies this fleet signed go back: a copy without a valid signature
//! (an output the broker refused, dead-lettered with its handler; one an
//! older release made; one someone published to the dead-letter exchange)
//! stays in the DLQ and is counted as kept.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;
use serde::Serialize;

use crate::broker::{self, text, KeepHeaders, RetryFacts, RetrySigner, Topology};

/// Bytes of a dead letter's payload shown in a listing.
const PREVIEW_BYTES: usize = 120;

/// One dead letter, as `dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The `message-id` property.
    pub message_id: Option<String>,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// Attempts made (absent on a refused output).
    pub attempts: Option<i64>,
    /// The handler version (file sha256) that dead-lettered it.
    pub version: Option<String>,
    /// The host that dead-lettered it.
    pub host: Option<String>,
    /// When it was dead-lettered (Unix seconds).
    pub dead_lettered_at: Option<i64>,
    /// The publisher's `timestamp` property (Unix seconds), when it set one.
    pub published_at: Option<u64>,
    /// The exchange it was published to.
    pub exchange: Option<String>,
    /// Its routing key.
    pub routing_key: Option<String>,
    /// Payload size in bytes.
    pub bytes: usize,
    /// The first bytes of the payload, as text.
    pub preview: String,
}

impl DeadLetter {
    fn of(message: &BasicGetMessage) -> Self {
        let d = &message.delivery;
        let props = &d.properties;
        let header = |name| broker::header_text(props, name);
        let cut = d.data.len().min(PREVIEW_BYTES);
        let mut preview = String::from_utf8_lossy(&d.data[..cut]).into_owned();
        if cut < d.data.len() {
            preview.push('…');
        }
        Self {
            message_id: props.message_id().as_ref().map(|s| s.as_str().to_owned()),
            reason: header(broker::REASON_HEADER),
            attempts: broker::header_int(props, broker::ATTEMPTS_HEADER),
            version: header(broker::VERSION_HEADER),
            host: header(broker::HOST_HEADER),
            dead_lettered_at: broker::header_int(props, broker::DEAD_LETTERED_AT_HEADER),
            published_at: *props.timestamp(),
            exchange: header(broker::EXCHANGE_HEADER),
            routing_key: header(broker::ROUTING_KEY_HEADER),
            bytes: d.data.len(),
            preview,
        }
    }
}

/// A handler's dead-letter queue: how many wait in it, and the first few.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// The dead-letter queue.
    pub queue: String,
    /// Messages ready in it.
    pub depth: u32,
    /// The first of them, oldest first.
    pub messages: Vec<DeadLetter>,
}

/// Which dead letters a re-drive sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Every one.
    All,
    /// Those with this `message-id`.
    MessageId(String),
    /// Those whose reason starts with this text.
    ReasonPrefix(String),
}

impl Filter {
    fn matches(&self, letter: &DeadLetter) -> bool {
        match self {
            Filter::All => true,
            Filter::MessageId(id) => letter.message_id.as_deref() == Some(id),
            Filter::ReasonPrefix(prefix) => letter
                .reason
                .as_deref()
                .is_some_and(|r| r.starts_with(prefix.as_str())),
        }
    }
}

/// What a re-drive did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Redriven {
    /// Sent back to the work queue (confirmed), and gone from the DLQ.
    pub moved: u64,
    /// Left in the DLQ: not matching the filter.
    pub skipped: u64,
    /// Left in the DLQ: matching, but not a copy this fleet signed.
    pub unsigned: u64,
}

/// The DLQ's depth, checked to exist (a clear error for a handler that
/// has none: a typo, or one that never ran against this broker).
pub(crate) async fn depth(conn: &Connection, handler: &str, topology: &Topology) -> Result<u32> {
    // A failed passive declare closes its channel: a throwaway one.
    let probe = conn.create_channel().await.context("opening a channel")?;
    let declared = probe
        .queue_declare(
            broker::name(&topology.dlq)?,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(queue) => {
            let _ = probe.close(200, broker::short("counted")).await;
            Ok(queue.message_count())
        }
        Err(_) => bail!(
            "handler {handler:?} has no dead-letter queue on this broker ({:?} does not exist): \
             is it the name of a handler a host here has run (its manifest's name, with the \
             config's `queue` if set)?",
            topology.dlq
        ),
    }
}

/// The next dead letter ready in the DLQ, held unacked on `ch`.
async fn next(ch: &lapin::Channel, topology: &Topology) -> Result<Option<BasicGetMessage>> {
    ch.basic_get(
        broker::name(&topology.dlq)?,
        BasicGetOptions { no_ack: false },
    )
    .await
    .with_context(|| format!("reading {:?}", topology.dlq))
}

/// Up to `limit` dead letters of `handler`, oldest first, left in place
/// (read without acking; they go back when the channel closes).
pub async fn list(
    conn: &Connection,
    handler: &str,
    topology: &Topology,
    limit: usize,
) -> Result<Listing> {
    let depth = depth(conn, handler, topology).await?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    let mut messages = Vec::new();
    while messages.len() < limit {
        let Some(message) = next(&ch, topology).await? else {
            break;
        };
        messages.push(DeadLetter::of(&message));
    }
    // Closing returns every message read to the queue, in its place.
    let _ = ch.close(200, broker::short("listed")).await;
    Ok(Listing {
        queue: topology.dlq.clone(),
        depth,
        messages,
    })
}

/// Send `handler`'s dead letters matching `filter` back to its work queue,
/// at most `rate` a second (`None`: as fast as the broker confirms).
/// `progress` hears the count moved so far after each one.
pub async fn redrive(
    conn: &Connection,
    handler: &str,
    topology: &Topology,
    signer: &RetrySigner,
    filter: &Filter,
    rate: Option<f64>,
    mut progress: impl FnMut(u64),
) -> Result<Redriven> {
    depth(conn, handler, topology).await?;
    let get = conn.create_channel().await.context("opening a channel")?;
    let publish = broker::confirm_channel(conn).await?;
    let pace = rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let started = Instant::now();
    let mut done = Redriven::default();
    // Messages kept are held unacked on this channel until the end, so
    // the queue runs dry once every message was looked at once.
    while let Some(message) = next(&get, topology).await? {
        let letter = DeadLetter::of(&message);
        if !filter.matches(&letter) {
            done.skipped += 1;
            continue;
        }
        let d = &message.delivery;
        let (exchange, routing_key) = (
            letter.exchange.clone().unwrap_or_default(),
            letter.routing_key.clone().unwrap_or_default(),
        );
        let signed =
            broker::header_text(&d.properties, broker::SIGNATURE_HEADER).is_some_and(|signature| {
                signer.verify(
                    &RetryFacts {
                        queue: &topology.queue,
                        attempt: broker::DEAD_LETTER_ATTEMPT,
                        exchange: &exchange,
                        routing_key: &routing_key,
                        payload: &d.data,
                    },
                    &signature,
                )
            });
        if !signed {
            done.unsigned += 1;
            continue;
        }
        let signature = signer.sign(&RetryFacts {
            queue: &topology.queue,
            attempt: 1,
            exchange: &exchange,
            routing_key: &routing_key,
            payload: &d.data,
        });
        let props = broker::republish_properties(
            &d.properties,
            KeepHeaders::ForRedrive,
            &[
                (broker::ATTEMPT_HEADER, AMQPValue::LongLongInt(1)),
                (broker::EXCHANGE_HEADER, text(&exchange)),
                (broker::ROUTING_KEY_HEADER, text(&routing_key)),
                (broker::SIGNATURE_HEADER, text(&signature)),
            ],
        );
        let confirm = publish
            .basic_publish(
                broker::short(""),
                broker::name(&topology.queue)?,
                BasicPublishOptions::default(),
                &d.data,
                props,
            )
            .await
            .with_context(|| format!("sending a dead letter back to {:?}", topology.queue))?
            .await
            .with_context(|| format!("waiting for the broker to confirm {:?}", topology.queue))?;
        if !confirm.is_ack() {
            bail!(
                "the broker refused the copy for {:?} (is the queue full?); {} moved so far, the rest are still in {:?}",
                topology.queue,
                done.moved,
                topology.dlq
            );
        }
        // Only now: the copy is the broker's.
        get.basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await
            .with_context(|| format!("removing a re-driven message from {:?}", topology.dlq))?;
        done.moved += 1;
        progress(done.moved);
        if let Some(pace) = pace {
            let due = started + pace.mul_f64(done.moved as f64);
            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        }
    }
    // What was kept goes back to the DLQ.
    let _ = get.close(200, broker::short("re-driven")).await;
    let _ = publish.close(200, broker::short("re-driven")).await;
    Ok(done)
}

/// A listing as a table for a terminal.
pub fn render(handler: &str, listing: &Listing) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if listing.depth == 0 {
        let _ = writeln!(
            out,
            "{handler}: no dead letters ({} is empty)",
            listing.queue
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{handler}: {} dead letter{} in {}{}",
        listing.depth,
        if listing.depth == 1 { "" } else { "s" },
        listing.queue,
        if (listing.messages.len() as u32) < listing.depth {
            format!(", the first {}", listing.messages.len())
        } else {
            String::new()
        }
    );
    for (n, m) in listing.messages.iter().enumerate() {
        let when = m
            .dead_lettered_at
            .map_or_else(|| "-".to_owned(), |t| format!("{t}"));
        let _ = writeln!(
            out,
            "{:>4}. id {}  attempts {}  dead-lettered at {}  version {}  from {}/{}\n      reason: {}\n      payload ({} bytes): {}",
            n + 1,
            m.message_id.as_deref().unwrap_or("-"),
            m.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            when,
            m.version.as_deref().map_or("-", |v| &v[..v.len().min(12)]),
            m.exchange.as_deref().unwrap_or("-"),
            m.routing_key.as_deref().unwrap_or("-"),
            m.reason.as_deref().unwrap_or("-"),
            m.bytes,
            m.preview.replace('\n', " "),
        );
    }
    out
}
