//! The recent lifecycle of the handlers, for the status page: loads,
//! reloads, rollbacks, breaker pauses and resumes, removals and refused
//! files, with wall-clock times.
//!
//! The log says all this too, but an operator looking at one host wants
//! "what changed lately" beside the charts without searching logs. Only
//! the last [`KEEP`] are kept, and every text is cut to
//! [`MAX_DETAIL_BYTES`]: a folder of broken files dropped in a loop cannot
//! grow the host.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Lifecycle events kept.
pub const KEEP: usize = 50;

/// Longest detail text kept (a refused file's compile error can be long).
pub const MAX_DETAIL_BYTES: usize = 512;

/// What happened to a handler (or a file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A handler not seen before started serving.
    Loaded,
    /// A new version was swapped in (`from` → `to`).
    Reloaded,
    /// The file of a removed handler came back, same content.
    Restored,
    /// A new version failed its probation: back to the previous one.
    RolledBack,
    /// The crash-loop breaker stopped the consumer.
    Paused,
    /// The breaker's cool-off ended: consuming again.
    Resumed,
    /// The handler's file was deleted (its queue stays).
    Removed,
    /// A dropped file was not activated (the previous version, if any,
    /// keeps serving).
    Refused,
}

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Happening {
    /// When, in Unix milliseconds.
    pub at_unix_ms: u64,
    /// When, as RFC 3339 UTC (`2026-05-01T12:00:00.123Z`).
    pub at: String,
    /// What happened.
    pub event: Kind,
    /// The handler; `None` for a refused file whose handler is unknown.
    pub handler: Option<String>,
    /// The version before (short sha256), where one changed.
    pub from: Option<String>,
    /// The version after (short sha256).
    pub to: Option<String>,
    /// Why, or what else an operator should know (cut to
    /// [`MAX_DETAIL_BYTES`]).
    pub detail: Option<String>,
}

/// The last [`KEEP`] lifecycle events, oldest dropped first.
#[derive(Debug, Default)]
pub struct Journal {
    events: Mutex<VecDeque<Happening>>,
}

/// What a lifecycle event says, before it gets its time.
#[derive(Debug, Clone, Default)]
pub struct Entry<'a> {
    /// The handler, if known.
    pub handler: Option<&'a str>,
    /// The version before.
    pub from: Option<&'a str>,
    /// The version after.
    pub to: Option<&'a str>,
    /// Why.
    pub detail: Option<String>,
}

impl Journal {
    /// Record `event` now.
    pub fn record(&self, event: Kind, entry: Entry<'_>) {
        self.record_at(unix_ms(), event, entry);
    }

    /// Record `event` at `at_unix_ms`.
    pub fn record_at(&self, at_unix_ms: u64, event: Kind, entry: Entry<'_>) {
        let happening = Happening {
            at_unix_ms,
            at: rfc3339(at_unix_ms),
            event,
            handler: entry.handler.map(|h| cut(h).to_owned()),
            from: entry.from.map(|v| cut(v).to_owned()),
            to: entry.to.map(|v| cut(v).to_owned()),
            detail: entry.detail.map(|d| {
                if d.len() > MAX_DETAIL_BYTES {
                    format!("{}…", cut(&d))
                } else {
                    d
                }
            }),
        };
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == KEEP {
            events.pop_front();
        }
        events.push_back(happening);
    }

    /// The events kept, newest first.
    pub fn recent(&self) -> Vec<Happening> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.iter().rev().cloned().collect()
    }
}

/// `text` cut to [`MAX_DETAIL_BYTES`] on a character boundary.
fn cut(text: &str) -> &str {
    crate::guest::truncate(text, MAX_DETAIL_BYTES)
}

/// Milliseconds since the Unix epoch, now (0 before it).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Unix milliseconds as RFC 3339 UTC, without a date crate: the civil
/// date from the day count (Howard Hinnant's `civil_from_days`).
pub(crate) fn rfc3339(unix_ms: u64) -> String {
    let (secs, ms) = (unix_ms / 1000, unix_ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn only_the_last_events_are_kept_newest_first() {
        let j = Journal::default();
        for i in 0..(KEEP as u64 + 7) {
            j.record_at(
                i,
                Kind::Refused,
                Entry {
                    detail: Some(format!("file {i}")),
                    ..Entry::default()
                },
            );
        }
        let recent = j.recent();
        assert_eq!(recent.len(), KEEP);
        assert_eq!(recent[0].at_unix_ms, KEEP as u64 + 6);
        assert_eq!(recent[KEEP - 1].detail.as_deref(), Some("file 7"));
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        let j = Journal::default();
        j.record_at(
            1,
            Kind::Refused,
            Entry {
                handler: Some(&"h".repeat(2000)),
                detail: Some("é".repeat(MAX_DETAIL_BYTES)),
                ..Entry::default()
            },
        );
        let e = &j.recent()[0];
        let detail = e.detail.as_deref().unwrap();
        assert!(detail.len() <= MAX_DETAIL_BYTES + '…'.len_utf8());
        assert!(detail.ends_with('…') && detail.starts_with("éé"));
        assert_eq!(e.handler.as_deref().map(str::len), Some(MAX_DETAIL_BYTES));
        let json = serde_json::to_value(e).unwrap();
        assert_eq!(json["event"], "refused");
        assert_eq!(json["at"], "1970-01-01T00:00:00.001Z");
    }
}
