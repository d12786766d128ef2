//! A handler's health: the crash-loop breaker and a new version's
//! probation.
//!
//! Both watch failures as `Handled::is_failure` defines them: failed
//! attempts (traps, timeouts, `retry`, attempts exhausted) and events given
//! back unsettled (host faults, conflict re-runs exhausted), so an event
//! that keeps being requeued trips the breaker instead of looping hot. A
//! deliberate `reject` is the handler doing its job and counts as a success. They are plain state machines with the clock passed in,
//! so they are tested without sleeping; the registry applies their verdicts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Breaker and rollback settings of one handler.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSettings {
    /// Failed attempts within `breaker_window` that pause the consumer.
    pub breaker_failures: u32,
    /// The breaker's sliding window.
    pub breaker_window: Duration,
    /// How long a paused handler stays paused before it tries again.
    pub breaker_cooloff: Duration,
    /// Events a freshly swapped-in version is judged on.
    pub probation_events: u32,
    /// Failure rate over the probation events at or above which the host
    /// goes back to the previous version.
    pub rollback_failure_rate: f64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            breaker_failures: 20,
            breaker_window: Duration::from_secs(10),
            breaker_cooloff: Duration::from_secs(30),
            probation_events: 20,
            rollback_failure_rate: 0.5,
        }
    }
}

/// What the tracker asks the registry to do after an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to do.
    Healthy,
    /// The version on probation failed it: go back to the previous one.
    RollBack {
        /// Failed events among the judged ones.
        failures: u32,
        /// Events judged.
        events: u32,
    },
    /// Too many failures in the window: pause the consumer.
    Trip {
        /// Failures counted in the window.
        failures: u32,
    },
}

/// Failure bookkeeping for the version currently serving a handler.
#[derive(Debug)]
pub struct Health {
    settings: HealthSettings,
    failures: VecDeque<Instant>,
    /// `Some` while a newly swapped-in version with a predecessor is judged:
    /// (events seen, failures seen).
    probation: Option<(u32, u32)>,
}

impl Health {
    /// A tracker; `on_probation` when a previous version exists to go back to.
    pub fn new(settings: HealthSettings, on_probation: bool) -> Self {
        Self {
            probation: on_probation.then_some((0, 0)),
            failures: VecDeque::new(),
            settings,
        }
    }

    /// Whether the version is still being judged.
    pub fn on_probation(&self) -> bool {
        self.probation.is_some()
    }

    /// Record one settled event.
    pub fn record(&mut self, failed: bool, now: Instant) -> Verdict {
        if let Some((events, fails)) = &mut self.probation {
            *events += 1;
            *fails += u32::from(failed);
            let (events, fails) = (*events, *fails);
            let limit = self.settings.probation_events.max(1);
            // Decide as soon as the outcome is certain: enough failures to
            // cross the rate whatever the rest do, or the window is over.
            let needed = (self.settings.rollback_failure_rate * f64::from(limit)).ceil() as u32;
            if fails >= needed.max(1) {
                self.probation = None;
                return Verdict::RollBack {
                    failures: fails,
                    events,
                };
            }
            if events >= limit {
                self.probation = None;
            }
            // A version on probation is judged by its failure rate, not the
            // breaker: going back to a good version beats pausing.
            return Verdict::Healthy;
        }
        if failed {
            self.failures.push_back(now);
        }
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.settings.breaker_window)
        {
            self.failures.pop_front();
        }
        let count = self.failures.len() as u32;
        if count >= self.settings.breaker_failures.max(1) {
            self.failures.clear();
            return Verdict::Trip { failures: count };
        }
        Verdict::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            breaker_failures: 3,
            breaker_window: Duration::from_secs(10),
            breaker_cooloff: Duration::from_secs(1),
            probation_events: 10,
            rollback_failure_rate: 0.5,
        }
    }

    #[test]
    fn breaker_trips_on_k_failures_inside_the_window_only() {
        let t0 = Instant::now();
        let mut h = Health::new(settings(), false);
        assert_eq!(h.record(true, t0), Verdict::Healthy);
        assert_eq!(
            h.record(true, t0 + Duration::from_secs(5)),
            Verdict::Healthy
        );
        // The first failure has left the window: still two in it.
        assert_eq!(
            h.record(true, t0 + Duration::from_secs(11)),
            Verdict::Healthy
        );
        assert_eq!(
            h.record(false, t0 + Duration::from_secs(12)),
            Verdict::Healthy
        );
        assert_eq!(
            h.record(true, t0 + Duration::from_secs(13)),
            Verdict::Trip { failures: 3 }
        );
        // Counting starts over after a trip.
        assert_eq!(
            h.record(true, t0 + Duration::from_secs(13)),
            Verdict::Healthy
        );
    }

    #[test]
    fn probation_rolls_back_once_the_rate_is_certain_and_ends_after_its_window() {
        let t = Instant::now();
        let mut bad = Health::new(settings(), true);
        // Three failures would trip the breaker; probation takes precedence.
        for _ in 0..4 {
            assert_eq!(bad.record(true, t), Verdict::Healthy);
        }
        assert_eq!(
            bad.record(true, t),
            Verdict::RollBack {
                failures: 5,
                events: 5
            }
        );
        assert!(!bad.on_probation());

        let mut good = Health::new(settings(), true);
        for i in 0..10 {
            assert_eq!(
                good.record(i % 3 == 0, t + Duration::from_secs(20 * i)),
                Verdict::Healthy
            );
        }
        assert!(!good.on_probation(), "probation ends after its events");
        // After probation the breaker watches the version again.
        assert_eq!(good.record(true, t), Verdict::Healthy);
        assert_eq!(good.record(true, t), Verdict::Healthy);
        assert_eq!(good.record(true, t), Verdict::Trip { failures: 3 });
        // A version without a predecessor is never on probation.
        assert!(!Health::new(settings(), false).on_probation());
    }
}
