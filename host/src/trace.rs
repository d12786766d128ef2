//! W3C Trace Context across hops: which order caused this reservation.
//!
//! A delivery whose `traceparent` header is valid continues that trace; a
//! delivery without one (a plain client's) starts a new trace. Each
//! attempt at an event is a span of its own, and everything the attempt
//! causes carries it on as the parent: the handler's publishes, and the
//! retry and dead-letter copies of the event (`traceparent` replaced,
//! `tracestate` passed on as it came). Log lines about an event carry its
//! trace and span ids. The guest sees the incoming headers as they came.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::hash::Hash;

use crate::dispatch::HeaderValue;

/// The W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

/// One attempt at an event, as a span of a trace.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The trace it belongs to.
    pub trace_id: [u8; 16],
    /// This span.
    pub span_id: [u8; 8],
    /// The span that caused it (the publisher's, or the previous
    /// attempt's), when the delivery carried one.
    pub parent: Option<[u8; 8]>,
    /// Trace flags (bit 0: sampled), as they came; sampled for a new trace.
    pub flags: u8,
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

impl Span {
    /// The span of an attempt at a delivery with these headers: a child of
    /// its `traceparent` (sampled or not as the publisher decided), or the
    /// root of a new trace, sampled at `sample_ratio` (see [`sampled`]).
    pub fn for_delivery(headers: &[(String, HeaderValue)], sample_ratio: f64) -> Self {
        let parent = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(TRACEPARENT))
            .and_then(|(_, v)| match v {
                HeaderValue::Text(s) => parse_traceparent(s),
                _ => None,
            });
        match parent {
            Some((trace_id, parent, flags)) => Self {
                trace_id,
                span_id: random_span_id(),
                parent: Some(parent),
                flags,
            },
            None => {
                let trace_id = random_nonzero();
                Self {
                    trace_id,
                    span_id: random_span_id(),
                    parent: None,
                    flags: u8::from(sampled(&trace_id, sample_ratio)),
                }
            }
        }
    }

    /// The `traceparent` that makes this span the parent of what it sends.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }

    /// The trace id, hex, for logs.
    pub fn trace_id(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The span id, hex, for logs.
    pub fn span_id(&self) -> String {
        hex::encode(self.span_id)
    }
}

/// Whether a new trace with this id is sampled at `ratio` (0 to 1), as
/// OpenTelemetry's `TraceIdRatioBased` decides: the id's low 63 bits
/// against the ratio, so the decision follows from the id alone. The flag
/// then travels with the trace (`traceparent`), and every later hop
/// exports it, or not, alike.
pub fn sampled(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    (u64::from_be_bytes(low) >> 1) < bound
}

/// The `tracestate` a delivery carried, passed on unchanged (vendors'
/// entries; this host adds none).
pub fn tracestate(headers: &[(String, HeaderValue)]) -> Option<&str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(TRACESTATE))
        .and_then(|(_, v)| match v {
            HeaderValue::Text(s) if s.len() <= 512 => Some(s.as_str()),
            _ => None,
        })
}

/// `version-traceid-parentid-flags`, per the W3C spec: version 00 exactly,
/// a later version by its first four fields (forward compatible), never
/// version ff, all-zero ids, or upper-case hex.
fn parse_traceparent(s: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let s = s.trim();
    let mut parts = s.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |t: &str, n: usize| {
        t.len() == n
            && t.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(version, 2) || version == "ff" {
        return None;
    }
    if version == "00" && (parts.next().is_some() || s.len() != 55) {
        return None;
    }
    if !lower_hex(trace, 32)
        || !lower_hex(parent, 16)
        || !lower_hex(&flags[..flags.len().min(2)], 2)
    {
        return None;
    }
    let trace_id: [u8; 16] = hex::decode(trace).ok()?.try_into().ok()?;
    let parent_id: [u8; 8] = hex::decode(parent).ok()?.try_into().ok()?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    let flags = u8::from_str_radix(&flags[..2], 16).ok()?;
    Some((trace_id, parent_id, flags))
}

thread_local! {
    /// The event this thread is running, if any (see [`running`]).
    static RUNNING: Cell<Option<Span>> = const { Cell::new(None) };
}

/// Marks the event whose span this is as the one this thread runs, until
/// the guard is dropped: lines logged meanwhile through [`about_event`]
/// name its trace and span.
pub fn running(span: Option<Span>) -> Running {
    Running(RUNNING.replace(span))
}

/// Restores, when dropped, the event the thread ran before [`running`].
pub struct Running(Option<Span>);

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.set(self.0.take());
    }
}

/// Log a line about the event this thread is running: `log` runs inside
/// an `event` span holding the event's `trace_id` and `span_id`, so the
/// line carries them in either log format.
///
/// The span is made per line, and only for a line at a level the filter
/// may let through: one made for every event, whether or not anything
/// was logged about it, cost the dispatch thread ~3 µs an event at the
/// default `info` filter (most events log nothing).
pub fn about_event(level: tracing::Level, log: impl FnOnce()) {
    if level > tracing::level_filters::LevelFilter::current() {
        return;
    }
    match RUNNING.get() {
        Some(s) => {
            let _entered =
                tracing::info_span!("event", trace_id = %s.trace_id(), span_id = %s.span_id())
                    .entered();
            log()
        }
        None => log(),
    }
}

fn random_span_id() -> [u8; 8] {
    random_nonzero()
}

/// Random bytes, never all zero (which W3C reserves for "invalid").
///
/// Drawn from a per-thread generator seeded once from the OS: ids must be
/// unique and evenly spread (sampling reads the trace id's bits), not
/// secret, and asking the OS for each one cost the dispatch thread two
/// `getrandom` system calls per event.
fn random_nonzero<const N: usize>() -> [u8; N] {
    thread_local! {
        static IDS: RefCell<fastrand::Rng> = RefCell::new(fastrand::Rng::with_seed(os_seed()));
    }
    let mut bytes = [0u8; N];
    IDS.with_borrow_mut(|rng| {
        while bytes.iter().all(|b| *b == 0) {
            rng.fill(&mut bytes);
        }
    });
    bytes
}

/// A generator seed from the OS; without OS randomness, one derived from
/// the clock and the thread (still unique enough to tell spans apart).
fn os_seed() -> u64 {
    let mut seed = [0u8; 8];
    if getrandom::getrandom(&mut seed).is_ok() {
        return u64::from_le_bytes(seed);
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    std::thread::current().id().hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> Vec<(String, HeaderValue)> {
        vec![(TRACEPARENT.into(), HeaderValue::Text(traceparent.into()))]
    }

    #[test]
    fn ids_are_distinct_across_threads_and_never_zero() {
        // Each thread has its own generator: seeded alike (or not at
        // all), two threads would hand out the same ids.
        let ids: Vec<([u8; 16], [u8; 8])> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..5_000)
                            .map(|_| {
                                let span = Span::for_delivery(&[], 1.0);
                                (span.trace_id, span.span_id)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        let traces: std::collections::HashSet<_> = ids.iter().map(|(t, _)| *t).collect();
        let spans: std::collections::HashSet<_> = ids.iter().map(|(_, s)| *s).collect();
        assert_eq!(traces.len(), ids.len());
        assert_eq!(spans.len(), ids.len());
        assert!(!traces.contains(&[0; 16]) && !spans.contains(&[0; 8]));
    }

    #[test]
    fn new_traces_are_sampled_at_the_ratio_and_continued_ones_as_they_came() {
        let n = 20_000;
        let share = |ratio: f64| {
            (0..n)
                .filter(|_| Span::for_delivery(&[], ratio).flags & 0x01 == 1)
                .count() as f64
                / n as f64
        };
        assert_eq!(share(1.0), 1.0);
        assert_eq!(share(0.0), 0.0);
        let quarter = share(0.25);
        assert!((0.23..0.27).contains(&quarter), "{quarter}");
        // A publisher's decision stands, whatever this host's ratio.
        let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let sampled_in = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(Span::for_delivery(&headers(unsampled), 1.0).flags, 0);
        assert_eq!(Span::for_delivery(&headers(sampled_in), 0.0).flags, 1);
        // The decision follows from the id: the same for every host.
        let id = Span::for_delivery(&[], 1.0).trace_id;
        assert_eq!(sampled(&id, 0.5), sampled(&id, 0.5));
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let span = Span::for_delivery(&headers(incoming), 1.0);
        assert_eq!(span.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(
            span.parent,
            Some(hex::decode("b7ad6b7169203331").unwrap().try_into().unwrap())
        );
        assert_ne!(span.span_id(), "b7ad6b7169203331");
        let out = span.traceparent();
        assert!(
            out.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && out.ends_with("-01"),
            "{out}"
        );
        assert_eq!(out.len(), 55);
        // Continuing what we send continues the same trace.
        let next = Span::for_delivery(&headers(&out), 1.0);
        assert_eq!(next.trace_id, span.trace_id);
        assert_eq!(next.parent, Some(span.span_id));
    }

    #[test]
    fn anything_else_starts_a_new_trace() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            let span = Span::for_delivery(&headers(bad), 1.0);
            assert_eq!(span.parent, None, "{bad:?}");
            assert_ne!(span.trace_id, [0; 16]);
            assert_eq!(span.flags, 1);
        }
        // A later version is read by its first four fields.
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes";
        assert!(Span::for_delivery(&headers(later), 1.0).parent.is_some());
        // Two new traces are two traces.
        assert_ne!(
            Span::for_delivery(&[], 1.0).trace_id,
            Span::for_delivery(&[], 1.0).trace_id
        );
    }
}
