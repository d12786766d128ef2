//! Prometheus metrics: per-handler event counters, handler latency, in-flight
//! events and instantiations, reloads, rollbacks, breaker; for the host,
//! connection state, reconnects and refused handler files; and which
//! fleet member it is (`event_host_info`: host id and state backend).
//! Beside them, outside Prometheus, the last minutes second by second
//! ([`Activity`], for the status page): the acker, which settles every
//! event, already holds this struct.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::activity::Activity;

/// The label every per-handler metric carries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabel {
    /// Handler name.
    pub handler: String,
}

/// The labels of `event_host_info`: which member of a fleet this is.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    /// This host's id (`host_id`).
    pub host_id: String,
    /// Where its state lives: `sqlite` (embedded) or `postgres` (shared).
    pub state_backend: String,
}

/// All metrics of one host.
pub struct Metrics {
    registry: Registry,
    /// Events acked after a successful call (duplicates included).
    pub acked: Family<HandlerLabel, Counter>,
    /// Events sent to the retry path (guest `retry`, trap, timeout).
    pub retried: Family<HandlerLabel, Counter>,
    /// Events the guest rejected.
    pub rejected: Family<HandlerLabel, Counter>,
    /// Events dead-lettered (rejected, attempts exhausted, oversize).
    pub dead_lettered: Family<HandlerLabel, Counter>,
    /// Redeliveries of already-committed events, acked without running.
    pub duplicates: Family<HandlerLabel, Counter>,
    /// Events put back after a host-side fault.
    pub requeued: Family<HandlerLabel, Counter>,
    /// Handler instantiations (one per call).
    pub instantiations: Family<HandlerLabel, Counter>,
    /// Events received and not yet settled.
    pub in_flight: Family<HandlerLabel, Gauge>,
    /// Time in the guest per event, seconds.
    pub latency: Family<HandlerLabel, Histogram>,
    /// 1 while connected to the broker.
    pub connected: Gauge<i64, AtomicI64>,
    /// Reconnect attempts since start (one per backoff, so an outage of
    /// several seconds counts several).
    pub reconnects: Counter,
    /// New versions swapped in (and handlers added) by the folder watcher.
    pub reloads: Family<HandlerLabel, Counter>,
    /// Automatic rollbacks to the previous version.
    pub rollbacks: Family<HandlerLabel, Counter>,
    /// Times the crash-loop breaker paused a handler.
    pub breaker_trips: Family<HandlerLabel, Counter>,
    /// 1 while a handler is paused by the breaker.
    pub paused: Family<HandlerLabel, Gauge>,
    /// 1 while a handler does not consume because other consumers are on
    /// its queue and this host's state is embedded (see `split_guard`).
    pub shared_queue_refused: Family<HandlerLabel, Gauge>,
    /// Always 1, labelled with the host id and state backend (see
    /// [`Metrics::set_info`]), to tell the fleet's members apart and join
    /// their other series on.
    pub info: Family<InfoLabels, Gauge>,
    /// Dropped files refused (garbage, wrong world, compile error, too big).
    pub load_failures: Counter,
    /// Files in the handlers folder currently refused.
    pub broken_files: Gauge<i64, AtomicI64>,
    /// Events that committed with no idempotency key (neither the
    /// configured one nor a message id): processed at least once, a
    /// redelivery would run them again.
    pub without_idempotency_key: Family<HandlerLabel, Counter>,
    /// Dedupe records dropped for being older than `dedupe_window_secs`.
    pub dedupe_pruned: Counter,
    /// Events settled per handler over the last minutes, by second (not
    /// exported to Prometheus, which keeps its own history).
    pub activity: Activity,
}

/// A handler's counters since start, as `/handlers` and `/status` show
/// them.
#[derive(Debug, Clone, Serialize)]
pub struct HandlerCounters {
    /// See [`Metrics::acked`].
    pub acked: u64,
    /// See [`Metrics::retried`].
    pub retried: u64,
    /// See [`Metrics::rejected`].
    pub rejected: u64,
    /// See [`Metrics::dead_lettered`].
    pub dead_lettered: u64,
    /// See [`Metrics::duplicates`].
    pub duplicates: u64,
    /// See [`Metrics::requeued`].
    pub requeued: u64,
    /// See [`Metrics::in_flight`].
    pub in_flight: i64,
    /// See [`Metrics::instantiations`].
    pub instantiations: u64,
    /// See [`Metrics::reloads`].
    pub reloads: u64,
    /// See [`Metrics::rollbacks`].
    pub rollbacks: u64,
    /// See [`Metrics::breaker_trips`].
    pub breaker_trips: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("event_host");
        let latency = Family::<HandlerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025,
                0.1, 0.5, 1.0, 5.0,
            ])
        });
        let m = Self {
            acked: Family::default(),
            retried: Family::default(),
            rejected: Family::default(),
            dead_lettered: Family::default(),
            duplicates: Family::default(),
            requeued: Family::default(),
            instantiations: Family::default(),
            in_flight: Family::default(),
            latency,
            connected: Gauge::default(),
            reconnects: Counter::default(),
            reloads: Family::default(),
            rollbacks: Family::default(),
            breaker_trips: Family::default(),
            paused: Family::default(),
            shared_queue_refused: Family::default(),
            info: Family::default(),
            load_failures: Counter::default(),
            broken_files: Gauge::default(),
            without_idempotency_key: Family::default(),
            dedupe_pruned: Counter::default(),
            activity: Activity::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_acked",
            "Events acked after a successful call",
            m.acked.clone(),
        );
        registry.register(
            "events_retried",
            "Events sent to the retry path",
            m.retried.clone(),
        );
        registry.register(
            "events_rejected",
            "Events the handler rejected",
            m.rejected.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Events dead-lettered",
            m.dead_lettered.clone(),
        );
        registry.register(
            "events_duplicate",
            "Redeliveries acked without running",
            m.duplicates.clone(),
        );
        registry.register(
            "events_requeued",
            "Events put back after a host fault",
            m.requeued.clone(),
        );
        registry.register(
            "instantiations",
            "Handler instantiations",
            m.instantiations.clone(),
        );
        registry.register(
            "events_in_flight",
            "Events received and not yet settled",
            m.in_flight.clone(),
        );
        registry.register(
            "handler_latency_seconds",
            "Time in the handler per event",
            m.latency.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while connected to the broker",
            m.connected.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Reconnect attempts since start",
            m.reconnects.clone(),
        );
        registry.register(
            "handler_reloads",
            "Handler versions activated by the folder watcher",
            m.reloads.clone(),
        );
        registry.register(
            "handler_rollbacks",
            "Automatic rollbacks to the previous version",
            m.rollbacks.clone(),
        );
        registry.register(
            "handler_breaker_trips",
            "Times the crash-loop breaker paused the handler",
            m.breaker_trips.clone(),
        );
        registry.register(
            "handler_paused",
            "1 while the handler is paused by the crash-loop breaker",
            m.paused.clone(),
        );
        registry.register(
            "handler_refused_shared_queue",
            "1 while the handler does not consume because other consumers are on its queue and this host's state is embedded",
            m.shared_queue_refused.clone(),
        );
        registry.register(
            "info",
            "This host: its id and where its state lives (always 1)",
            m.info.clone(),
        );
        registry.register(
            "handler_load_failures",
            "Dropped handler files refused",
            m.load_failures.clone(),
        );
        registry.register(
            "handler_broken_files",
            "Files in the handlers folder currently refused",
            m.broken_files.clone(),
        );
        registry.register(
            "events_without_idempotency_key",
            "Events run with no idempotency key (at-least-once)",
            m.without_idempotency_key.clone(),
        );
        registry.register(
            "dedupe_records_pruned",
            "Dedupe records dropped past the dedupe window",
            m.dedupe_pruned.clone(),
        );
        Self { registry, ..m }
    }

    /// Say which fleet member this is: `event_host_info{host_id,
    /// state_backend} 1`. Set once at start.
    pub fn set_info(&self, host_id: &str, state_backend: &str) {
        self.info
            .get_or_create(&InfoLabels {
                host_id: host_id.to_owned(),
                state_backend: state_backend.to_owned(),
            })
            .set(1);
    }

    /// Create every per-handler series of `handler`, at zero, as its
    /// consumer starts. A series that first appears at 1 hides that event
    /// from `rate()` and `increase()` (Prometheus sees no change), so
    /// without this a handler's first dead letter, rollback or breaker trip
    /// would show on no dashboard and fire no alert. Idempotent.
    pub fn init_handler(&self, handler: &str) {
        let l = Self::label(handler);
        // Creating the series is the point: each guard is let go at once.
        for counter in [
            &self.acked,
            &self.retried,
            &self.rejected,
            &self.dead_lettered,
            &self.duplicates,
            &self.requeued,
            &self.instantiations,
            &self.reloads,
            &self.rollbacks,
            &self.breaker_trips,
            &self.without_idempotency_key,
        ] {
            drop(counter.get_or_create(&l));
        }
        for gauge in [&self.in_flight, &self.paused, &self.shared_queue_refused] {
            drop(gauge.get_or_create(&l));
        }
        drop(self.latency.get_or_create(&l));
    }

    /// The label for `handler`.
    pub fn label(handler: &str) -> HandlerLabel {
        HandlerLabel {
            handler: handler.to_owned(),
        }
    }

    /// The counters of `handler` (zeros for one that never ran).
    pub fn counters(&self, handler: &str) -> HandlerCounters {
        let l = Self::label(handler);
        HandlerCounters {
            acked: self.acked.get_or_create(&l).get(),
            retried: self.retried.get_or_create(&l).get(),
            rejected: self.rejected.get_or_create(&l).get(),
            dead_lettered: self.dead_lettered.get_or_create(&l).get(),
            duplicates: self.duplicates.get_or_create(&l).get(),
            requeued: self.requeued.get_or_create(&l).get(),
            in_flight: self.in_flight.get_or_create(&l).get(),
            instantiations: self.instantiations.get_or_create(&l).get(),
            reloads: self.reloads.get_or_create(&l).get(),
            rollbacks: self.rollbacks.get_or_create(&l).get(),
            breaker_trips: self.breaker_trips.get_or_create(&l).get(),
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_info_gauge_names_the_host_and_its_state_backend() {
        let m = Metrics::new();
        m.set_info("host-a", "sqlite");
        let text = m.render();
        assert!(
            text.contains(r#"event_host_info{host_id="host-a",state_backend="sqlite"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn a_started_handler_shows_every_series_at_zero() {
        let m = Metrics::new();
        m.init_handler("h");
        let text = m.render();
        for sample in [
            r#"event_host_events_dead_lettered_total{handler="h"} 0"#,
            r#"event_host_handler_breaker_trips_total{handler="h"} 0"#,
            r#"event_host_handler_paused{handler="h"} 0"#,
            r#"event_host_handler_latency_seconds_count{handler="h"} 0"#,
        ] {
            assert!(text.contains(sample), "{sample} in\n{text}");
        }
    }
}
