//! Recent activity per handler, for the status page: the last
//! [`WINDOW_SECS`] seconds, one bucket per second, each holding the events
//! settled in that second by outcome and a small latency histogram from
//! which the second's p50 and p99 are read.
//!
//! Prometheus (`metrics`) keeps totals since start; a page that shows
//! "what is happening now" without a Prometheus server needs the recent
//! past itself, and nothing more. Memory is fixed per handler whatever the
//! traffic: a ring of [`WINDOW_SECS`] buckets, allocated on the handler's
//! first event, each reused when its second comes round again. A bucket
//! knows which second it holds, so one left over from an earlier lap reads
//! as empty instead of being mixed in. The clock (Unix seconds) is passed
//! in, so the arithmetic is tested without waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// How far back the ring reaches, in one-second buckets.
pub const WINDOW_SECS: u64 = 600;

/// Latency histogram resolution: bins per factor of ten. Four gives bins
/// about 1.78× wide, which bounds a percentile's error well under that
/// (it is interpolated inside its bin): plenty for a chart, at 120 bytes
/// a bucket.
const BINS_PER_DECADE: u32 = 4;

/// Decades covered above 1 µs: up to 10 s. The deadline is a second by
/// default; anything slower lands in the last bin.
const DECADES: u32 = 7;

/// Bin 0 holds latencies under 1 µs; bins `1..=DECADES*BINS_PER_DECADE`
/// the log-spaced range; the last one everything from 10 s up.
const LATENCY_BINS: usize = (DECADES * BINS_PER_DECADE) as usize + 2;

/// How an event ended, as the status page counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Acked after its handler succeeded.
    Acked,
    /// Acked without running: its idempotency key had committed before.
    Duplicate,
    /// Sent to the retry path.
    Retried,
    /// Dead-lettered (rejected, attempts exhausted, over a bound).
    DeadLettered,
    /// Given back to the queue unsettled (host fault, conflict, inactive).
    Requeued,
}

impl Settled {
    const ALL: [Settled; 5] = [
        Settled::Acked,
        Settled::Duplicate,
        Settled::Retried,
        Settled::DeadLettered,
        Settled::Requeued,
    ];

    /// Anything but an ack: what the rate chart shows in red.
    fn failed(self) -> bool {
        matches!(
            self,
            Settled::Retried | Settled::DeadLettered | Settled::Requeued
        )
    }
}

/// One settled event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// How it ended.
    pub settled: Settled,
    /// Time spent in the guest; `None` when the guest did not run (a
    /// duplicate, an event over a bound, a paused handler's).
    pub latency: Option<Duration>,
}

/// Counts by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Outcomes {
    /// See [`Settled::Acked`].
    pub acked: u64,
    /// See [`Settled::Duplicate`].
    pub duplicates: u64,
    /// See [`Settled::Retried`].
    pub retried: u64,
    /// See [`Settled::DeadLettered`].
    pub dead_lettered: u64,
    /// See [`Settled::Requeued`].
    pub requeued: u64,
}

impl Outcomes {
    fn add(&mut self, counts: &[u32; 5]) {
        let [a, d, r, l, q] = counts.map(u64::from);
        self.acked += a;
        self.duplicates += d;
        self.retried += r;
        self.dead_lettered += l;
        self.requeued += q;
    }

    /// Every event counted.
    pub fn total(&self) -> u64 {
        self.acked + self.duplicates + self.retried + self.dead_lettered + self.requeued
    }
}

/// A latency histogram over [`LATENCY_BINS`] log-spaced bins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Histogram([u32; LATENCY_BINS]);

impl Default for Histogram {
    fn default() -> Self {
        Self([0; LATENCY_BINS])
    }
}

/// The bin of a latency.
fn bin_of(latency: Duration) -> usize {
    let micros = latency.as_secs_f64() * 1e6;
    if micros < 1.0 {
        return 0;
    }
    let bin = (micros.log10() * f64::from(BINS_PER_DECADE)).floor() as usize + 1;
    bin.min(LATENCY_BINS - 1)
}

/// A bin's lower edge, in microseconds.
fn lower_edge(bin: usize) -> f64 {
    if bin == 0 {
        0.0
    } else {
        10f64.powf((bin - 1) as f64 / f64::from(BINS_PER_DECADE))
    }
}

impl Histogram {
    fn add(&mut self, latency: Duration) {
        let bin = &mut self.0[bin_of(latency)];
        *bin = bin.saturating_add(1);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|&n| u64::from(n)).sum()
    }

    /// The `q`-quantile (0 < q ≤ 1) in milliseconds, or `None` with no
    /// samples: the bin holding the sample of rank ⌈q·n⌉, interpolated
    /// within it on the log scale the bins are spaced on (linearly in the
    /// first bin, which starts at zero). The last bin is open-ended: its
    /// lower edge (10 s) is reported, an underestimate said as such in
    /// the README.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut below = 0u64;
        for (bin, &count) in self.0.iter().enumerate() {
            let count = u64::from(count);
            if below + count < rank {
                below += count;
                continue;
            }
            // Where the rank falls among this bin's samples, each taken
            // to sit in the middle of an equal share of the bin.
            let within = ((rank - below) as f64 - 0.5) / count as f64;
            let micros = match bin {
                0 => within,
                b if b == LATENCY_BINS - 1 => lower_edge(b),
                b => {
                    let (lo, hi) = (lower_edge(b), lower_edge(b + 1));
                    lo * (hi / lo).powf(within)
                }
            };
            return Some(micros / 1000.0);
        }
        None
    }
}

/// One second of one handler.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// The Unix second it holds; a bucket holding another second is
    /// empty for this one.
    second: u64,
    /// Events by outcome, in [`Settled::ALL`] order.
    counts: [u32; 5],
    latency: Histogram,
}

/// The ring of one handler.
#[derive(Debug)]
struct Series {
    buckets: Box<[Bucket]>,
}

impl Series {
    fn new() -> Self {
        Self {
            buckets: vec![Bucket::default(); WINDOW_SECS as usize].into_boxed_slice(),
        }
    }

    fn slot(second: u64) -> usize {
        (second % WINDOW_SECS) as usize
    }

    fn record(&mut self, now: u64, samples: impl IntoIterator<Item = Sample>) {
        let bucket = &mut self.buckets[Self::slot(now)];
        if bucket.second != now {
            *bucket = Bucket {
                second: now,
                ..Bucket::default()
            };
        }
        for sample in samples {
            let i = Settled::ALL
                .iter()
                .position(|s| *s == sample.settled)
                .unwrap_or(0);
            bucket.counts[i] = bucket.counts[i].saturating_add(1);
            if let Some(latency) = sample.latency {
                bucket.latency.add(latency);
            }
        }
    }

    /// The bucket of `second`, if the ring still holds it.
    fn at(&self, second: u64) -> Option<&Bucket> {
        let bucket = &self.buckets[Self::slot(second)];
        (bucket.second == second).then_some(bucket)
    }
}

/// What a handler did, second by second, up to the last whole second
/// before `now` (the one running is still filling). Every array has one
/// entry per second, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Window {
    /// The Unix second the last entry covers.
    pub end: u64,
    /// Seconds covered (the arrays' length).
    pub seconds: u64,
    /// Events settled per second (every outcome).
    pub events: Vec<u32>,
    /// Of those, not acked: retried, dead-lettered or requeued.
    pub failed: Vec<u32>,
    /// Median time in the guest per second, ms (`null`: nothing ran).
    pub p50_ms: Vec<Option<f64>>,
    /// 99th percentile, ms.
    pub p99_ms: Vec<Option<f64>>,
    /// Totals over the window, by outcome.
    pub outcomes: Outcomes,
    /// Over the last [`SUMMARY_SECS`] of the window: events per second,
    /// and p50 and p99 of every event that ran.
    pub last_minute: Summary,
}

/// Seconds the summary ([`Window::last_minute`]) covers.
pub const SUMMARY_SECS: u64 = 60;

/// A rate and two percentiles over some seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Events settled per second.
    pub events_per_sec: f64,
    /// Median latency, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, ms.
    pub p99_ms: Option<f64>,
}

/// Recent activity of every handler (see the module docs).
#[derive(Debug, Default)]
pub struct Activity {
    handlers: RwLock<HashMap<String, Arc<Mutex<Series>>>>,
}

/// The current Unix second.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Activity {
    /// Count `samples` (a settled batch) for `handler`, now.
    pub fn record(&self, handler: &str, samples: impl IntoIterator<Item = Sample>) {
        self.record_at(handler, unix_now(), samples);
    }

    /// [`Activity::record`] at `now` (Unix seconds).
    pub fn record_at(&self, handler: &str, now: u64, samples: impl IntoIterator<Item = Sample>) {
        let series = self.series(handler);
        let mut series = series.lock().unwrap_or_else(|p| p.into_inner());
        series.record(now, samples);
    }

    fn series(&self, handler: &str) -> Arc<Mutex<Series>> {
        if let Some(s) = self
            .handlers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(handler)
        {
            return s.clone();
        }
        self.handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(handler.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(Series::new())))
            .clone()
    }

    /// The last `seconds` (at most [`WINDOW_SECS`]) whole seconds of
    /// `handler` before `now`; all zero for a handler that settled nothing.
    pub fn window(&self, handler: &str, now: u64, seconds: u64) -> Window {
        let seconds = seconds.clamp(1, WINDOW_SECS);
        let end = now.saturating_sub(1);
        let series = self
            .handlers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(handler)
            .cloned();
        let guard = series
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()));
        let mut w = Window {
            end,
            seconds,
            ..Window::default()
        };
        let mut recent = Histogram::default();
        let mut recent_events = 0u64;
        let first = end.saturating_sub(seconds - 1);
        for second in first..=end {
            let bucket = guard.as_ref().and_then(|s| s.at(second));
            let (counts, latency) =
                bucket.map_or(([0; 5], Histogram::default()), |b| (b.counts, b.latency));
            let events = counts.iter().fold(0u32, |a, &c| a.saturating_add(c));
            let failed = Settled::ALL
                .iter()
                .zip(counts)
                .filter(|(s, _)| s.failed())
                .fold(0u32, |a, (_, c)| a.saturating_add(c));
            w.events.push(events);
            w.failed.push(failed);
            w.p50_ms.push(latency.quantile_ms(0.5));
            w.p99_ms.push(latency.quantile_ms(0.99));
            w.outcomes.add(&counts);
            if end - second < SUMMARY_SECS {
                recent.merge(&latency);
                recent_events += u64::from(events);
            }
        }
        let span = SUMMARY_SECS.min(seconds);
        w.last_minute = Summary {
            events_per_sec: recent_events as f64 / span as f64,
            p50_ms: recent.quantile_ms(0.5),
            p99_ms: recent.quantile_ms(0.99),
        };
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000;

    fn acked(micros: u64) -> Sample {
        Sample {
            settled: Settled::Acked,
            latency: Some(Duration::from_micros(micros)),
        }
    }

    fn within(value: Option<f64>, expected_ms: f64, factor: f64) -> bool {
        value.is_some_and(|v| v >= expected_ms / factor && v <= expected_ms * factor)
    }

    #[test]
    fn bins_are_log_spaced_from_one_microsecond_to_ten_seconds() {
        assert_eq!(bin_of(Duration::ZERO), 0);
        assert_eq!(bin_of(Duration::from_nanos(999)), 0);
        assert_eq!(bin_of(Duration::from_micros(1)), 1);
        assert_eq!(
            bin_of(Duration::from_micros(10)),
            1 + BINS_PER_DECADE as usize
        );
        assert_eq!(bin_of(Duration::from_secs(10)), LATENCY_BINS - 1);
        assert_eq!(bin_of(Duration::from_secs(3600)), LATENCY_BINS - 1);
        for micros in [1u64, 7, 42, 999, 12_345, 999_999, 9_999_999] {
            let b = bin_of(Duration::from_micros(micros));
            let m = micros as f64;
            assert!(
                lower_edge(b) <= m * 1.000_001 && m < lower_edge(b + 1),
                "{micros} µs in bin {b}"
            );
        }
    }

    #[test]
    fn percentiles_come_from_the_right_bins() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile_ms(0.5), None);
        // 98 fast events and 2 slow ones: the median is fast, p99 slow.
        for _ in 0..98 {
            h.add(Duration::from_micros(100));
        }
        h.add(Duration::from_millis(50));
        h.add(Duration::from_millis(50));
        // Within one bin's width (×1.78) of the truth.
        assert!(within(h.quantile_ms(0.5), 0.1, 1.78), "{h:?}");
        assert!(within(h.quantile_ms(0.99), 50.0, 1.78), "{h:?}");
        // One sample: every quantile is that sample's bin.
        let mut one = Histogram::default();
        one.add(Duration::from_millis(3));
        assert!(within(one.quantile_ms(0.5), 3.0, 1.78));
        assert!(within(one.quantile_ms(0.99), 3.0, 1.78));
        // A uniform spread: the median in the middle.
        let mut spread = Histogram::default();
        for ms in 1..=1000 {
            spread.add(Duration::from_micros(ms * 100));
        }
        assert!(within(spread.quantile_ms(0.5), 50.0, 1.2), "{spread:?}");
        assert!(within(spread.quantile_ms(0.99), 99.0, 1.2), "{spread:?}");
        // Past 10 s: reported as 10 s, not more.
        let mut slow = Histogram::default();
        slow.add(Duration::from_secs(30));
        assert_eq!(slow.quantile_ms(0.5), Some(10_000.0));
        // Under a microsecond: under a microsecond.
        let mut fast = Histogram::default();
        fast.add(Duration::from_nanos(200));
        assert!(fast.quantile_ms(0.5).is_some_and(|v| v < 0.001));
    }

    #[test]
    fn a_window_counts_each_second_and_excludes_the_one_running() {
        let a = Activity::default();
        a.record_at("inv", T0, (0..3).map(|_| acked(100)));
        a.record_at(
            "inv",
            T0,
            [Sample {
                settled: Settled::Retried,
                latency: Some(Duration::from_millis(1)),
            }],
        );
        a.record_at(
            "inv",
            T0 + 2,
            [Sample {
                settled: Settled::Duplicate,
                latency: None,
            }],
        );
        // The second T0 + 2 is still running at T0 + 2: not shown yet.
        let w = a.window("inv", T0 + 2, 5);
        assert_eq!((w.end, w.seconds), (T0 + 1, 5));
        assert_eq!(w.events, [0, 0, 0, 4, 0]);
        assert_eq!(w.failed, [0, 0, 0, 1, 0]);
        assert_eq!(w.p50_ms[..3], [None, None, None]);
        assert!(within(w.p50_ms[3], 0.1, 1.78));
        assert!(within(w.p99_ms[3], 1.0, 1.78));
        let w = a.window("inv", T0 + 3, 5);
        assert_eq!(w.events, [0, 0, 4, 0, 1]);
        assert_eq!(w.p50_ms[4], None, "a duplicate did not run");
        assert_eq!(
            w.outcomes,
            Outcomes {
                acked: 3,
                duplicates: 1,
                retried: 1,
                ..Outcomes::default()
            }
        );
        assert_eq!(w.outcomes.total(), 5);
        assert!((w.last_minute.events_per_sec - 5.0 / 5.0).abs() < 1e-9);
        // A handler that settled nothing: zeros, not an error.
        let w = a.window("other", T0, 3);
        assert_eq!(w.events, [0, 0, 0]);
        assert_eq!(w.last_minute, Summary::default());
    }

    #[test]
    fn the_ring_wraps_and_old_buckets_expire() {
        let a = Activity::default();
        a.record_at("h", T0, [acked(10)]);
        a.record_at("h", T0 + 1, [acked(10), acked(10)]);
        // A whole lap later the same slots hold new seconds: the old
        // counts are gone, not added to the new ones.
        a.record_at("h", T0 + WINDOW_SECS, [acked(10)]);
        let w = a.window("h", T0 + WINDOW_SECS + 1, WINDOW_SECS);
        assert_eq!(w.events.len(), WINDOW_SECS as usize);
        assert_eq!(*w.events.last().unwrap(), 1, "the new second alone");
        // T0 + 1 is still inside the window ending at T0 + WINDOW_SECS.
        assert_eq!(w.events[0], 2);
        assert_eq!(w.outcomes.total(), 3);
        // Once the window has moved past, nothing of T0 + 1 is left.
        let w = a.window("h", T0 + 2 * WINDOW_SECS + 1, WINDOW_SECS);
        assert_eq!(w.outcomes.total(), 0);
        // A quiet stretch longer than the window leaves no trace either.
        a.record_at("h", T0 + 10 * WINDOW_SECS, [acked(10)]);
        let w = a.window("h", T0 + 10 * WINDOW_SECS + 1, WINDOW_SECS);
        assert_eq!(w.outcomes.total(), 1);
        // A window asks for at most the ring, and at least one second.
        assert_eq!(a.window("h", T0, 10 * WINDOW_SECS).seconds, WINDOW_SECS);
        assert_eq!(a.window("h", T0, 0).seconds, 1);
    }

    #[test]
    fn the_summary_covers_the_last_minute_only() {
        let a = Activity::default();
        // Slow events two minutes ago, fast ones in the last minute.
        for s in 0..10 {
            a.record_at("h", T0 + s, (0..10).map(|_| acked(200_000)));
        }
        for s in 120..180 {
            a.record_at("h", T0 + s, (0..2).map(|_| acked(50)));
        }
        let w = a.window("h", T0 + 180, 300);
        assert_eq!(w.outcomes.acked, 100 + 120);
        assert!((w.last_minute.events_per_sec - 2.0).abs() < 1e-9);
        assert!(within(w.last_minute.p99_ms, 0.05, 1.78), "{w:?}");
    }

    #[test]
    fn memory_is_fixed_whatever_the_traffic() {
        let a = Activity::default();
        for s in 0..3 * WINDOW_SECS {
            a.record_at("h", T0 + s, (0..50).map(|i| acked(i * 37)));
        }
        let series = a.series("h");
        assert_eq!(
            series.lock().unwrap().buckets.len(),
            WINDOW_SECS as usize,
            "one bucket per second of the window, no more"
        );
        // Counts saturate rather than wrap.
        let mut h = Histogram::default();
        let bin = bin_of(Duration::from_micros(5));
        h.0[bin] = u32::MAX;
        h.add(Duration::from_micros(5));
        assert_eq!(h.0[bin], u32::MAX);
        let copy = h;
        h.merge(&copy);
        assert_eq!(h.0[bin], u32::MAX);
    }
}
