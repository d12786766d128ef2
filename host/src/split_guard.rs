//! No silent split: a host whose state is embedded (SQLite, this
//! process's alone) consumes a handler's queue only while no other
//! consumer is on it. Two such hosts on one queue would each apply part of
//! the events to state of their own — each would sell the same stock —
//! and nothing would say so. Hosts that share a queue share their state
//! (`state_url`); a host on shared state consumes as always.
//!
//! The broker reports a queue's consumers on a passive declare. Before
//! consuming, the guard waits until that count is 0: it says why in the
//! log (once per wait), in `/handlers` (status `refused_shared_queue` and
//! a `status_reason`) and in `/readyz` (503), and looks again every
//! [`RECHECK`] plus up to [`RECHECK_JITTER`], so the handler starts by
//! itself once the other consumer has gone.
//!
//! Two hosts that look at the same moment both see 0 and both consume.
//! So the guard keeps looking while its handler consumes: a count above 1
//! means another consumer is there too, and this host stops consuming
//! (events in flight settle; the rest wait in the queue) and waits as
//! above. The jitter makes two racing hosts look at different moments:
//! the first to look yields, the second then sees only itself and keeps
//! the queue. Until then — one recheck period at most — both have
//! consumed, which is the window the README documents.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use lapin::Connection;
use tokio::sync::watch;

use crate::broker;
use crate::metrics::Metrics;
use crate::registry::{Entry, Lifecycle, Status};

/// How often the guard looks at a queue's consumers, waiting or consuming.
pub const RECHECK: Duration = Duration::from_secs(2);

/// Most random delay added to each [`RECHECK`], so that two hosts that
/// started together do not keep looking at the same moment.
pub const RECHECK_JITTER: Duration = Duration::from_secs(1);

/// What the guard concludes from a queue's consumer count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Consume (or keep consuming).
    Consume,
    /// Do not consume: `others` consumers besides this host are on the
    /// queue and this host's state is its own.
    Refuse {
        /// Consumers other than this host's.
        others: u32,
    },
}

/// The guard's decision, pure: a host on shared state always consumes;
/// one on embedded state only alone. `consumers` is the broker's count,
/// which includes this host's own consumer when `consuming`.
pub fn verdict(shared_state: bool, consuming: bool, consumers: u32) -> Verdict {
    if shared_state {
        return Verdict::Consume;
    }
    let others = if consuming {
        consumers.saturating_sub(1)
    } else {
        consumers
    };
    match others {
        0 => Verdict::Consume,
        others => Verdict::Refuse { others },
    }
}

/// What `/handlers` and `/readyz` say about a refused queue.
pub fn refusal(queue: &str, others: u32, backend: &str) -> String {
    let consumers = if others == 1 {
        "1 other consumer".to_owned()
    } else {
        format!("{others} other consumers")
    };
    format!(
        "refused: queue {queue:?} has {consumers}; a shared queue needs shared state (state_url), and this host's is embedded ({backend})"
    )
}

/// How [`wait_alone`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The queue has no other consumer: consume.
    Alone,
    /// The host is stopping.
    Stopped,
    /// The handler's lifecycle changed (paused, removed, new version):
    /// look at it again.
    LifecycleChanged,
}

/// Wait until `entry`'s queue has no consumer, marking the handler
/// refused meanwhile. Errors when the broker cannot be asked (the session
/// ends and reconnects, as when declaring fails).
pub async fn wait_alone(
    conn: &Connection,
    entry: &Entry,
    backend: &str,
    metrics: &Metrics,
    stop: &mut watch::Receiver<bool>,
    lifecycle: &mut watch::Receiver<Lifecycle>,
) -> Result<Waited> {
    let gauge = metrics
        .shared_queue_refused
        .get_or_create(&Metrics::label(entry.name()))
        .clone();
    let mut refused_before = false;
    let waited = loop {
        let queue = entry.version().topology.queue.clone();
        let consumers = broker::consumer_count(conn, &queue).await?;
        match verdict(false, false, consumers) {
            Verdict::Consume => {
                if refused_before {
                    tracing::info!(handler = entry.name(), queue = %queue, "the queue's other consumers have gone: consuming");
                }
                break Waited::Alone;
            }
            Verdict::Refuse { others } => {
                if !refused_before {
                    tracing::warn!(
                        handler = entry.name(),
                        queue = %queue,
                        other_consumers = others,
                        "not consuming: the queue has another consumer, and hosts sharing a queue need shared state (set state_url); this host's state is embedded ({backend}). Checking again every {}-{} s",
                        RECHECK.as_secs(),
                        (RECHECK + RECHECK_JITTER).as_secs()
                    );
                    refused_before = true;
                }
                entry.set_refused_shared_queue(refusal(&queue, others, backend));
                gauge.set(1);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(recheck_delay()) => {}
            _ = lifecycle.changed() => break Waited::LifecycleChanged,
            _ = stop.wait_for(|s| *s) => break Waited::Stopped,
        }
    };
    gauge.set(0);
    Ok(waited)
}

/// While `entry` consumes, look at its queue's consumers; when another
/// consumer is there too, mark the handler refused and set `leave`, which
/// stops the consumer gracefully (the caller passes `leave`'s receiver to
/// `dispatch::amqp::serve` as its stop). Also sets `leave` when the host
/// stops, and returns once it has set it. A failed look is logged and
/// tried again: the consumer itself notices a broken connection.
pub async fn watch_consumers(
    conn: Arc<Connection>,
    entry: Arc<Entry>,
    backend: &'static str,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    leave: watch::Sender<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(recheck_delay()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        // Before its consumer is registered (or after it ended) the count
        // would not include this host's own.
        if entry.status() != Status::Consuming {
            continue;
        }
        let queue = entry.version().topology.queue.clone();
        let consumers = match broker::consumer_count(&conn, &queue).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(handler = entry.name(), "{e:#}");
                continue;
            }
        };
        if let Verdict::Refuse { others } = verdict(false, true, consumers) {
            tracing::warn!(
                handler = entry.name(),
                queue = %queue,
                other_consumers = others,
                "stopping consuming: another consumer joined the queue, and hosts sharing a queue need shared state (set state_url); this host's state is embedded ({backend})"
            );
            entry.set_refused_shared_queue(refusal(&queue, others, backend));
            metrics
                .shared_queue_refused
                .get_or_create(&Metrics::label(entry.name()))
                .set(1);
            break;
        }
    }
    let _ = leave.send(true);
}

/// [`RECHECK`] plus a jitter from the clock's low bits (as
/// `broker::backoff`): enough to spread hosts that started together.
fn recheck_delay() -> Duration {
    let jitter_ms = u64::try_from(RECHECK_JITTER.as_millis()).unwrap_or(u64::MAX);
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()) % (jitter_ms + 1))
        .unwrap_or(0);
    RECHECK + Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_state_always_consumes() {
        for (consuming, consumers) in [(false, 0), (false, 3), (true, 1), (true, 5)] {
            assert_eq!(verdict(true, consuming, consumers), Verdict::Consume);
        }
    }

    #[test]
    fn embedded_state_consumes_only_alone() {
        assert_eq!(verdict(false, false, 0), Verdict::Consume);
        assert_eq!(
            verdict(false, false, 1),
            Verdict::Refuse { others: 1 },
            "another host is there first"
        );
        assert_eq!(verdict(false, true, 1), Verdict::Consume, "only itself");
        assert_eq!(
            verdict(false, true, 2),
            Verdict::Refuse { others: 1 },
            "another joined"
        );
        // The broker has not registered this host's consumer yet.
        assert_eq!(verdict(false, true, 0), Verdict::Consume);
    }

    #[test]
    fn the_refusal_names_the_queue_the_count_and_the_fix() {
        let one = refusal("inventory", 1, "sqlite");
        assert!(one.contains("\"inventory\" has 1 other consumer;"), "{one}");
        assert!(one.contains("state_url") && one.contains("sqlite"), "{one}");
        assert!(refusal("q", 2, "sqlite").contains("2 other consumers"));
    }

    #[test]
    fn rechecks_are_spread_within_the_jitter() {
        let d = recheck_delay();
        assert!(d >= RECHECK && d <= RECHECK + RECHECK_JITTER, "{d:?}");
    }
}
