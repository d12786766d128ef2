//! The live set of handlers: which version serves each one, whether it
//! should consume (active, paused by the breaker, removed with its file),
//! whether it really is, and which dropped files were refused.
//!
//! The folder watcher (`reload`) and the dispatch threads write it; the
//! broker session, `/readyz`, `/handlers`, `/status` and `/metrics` read
//! it. Swaps are one pointer store under a lock: a batch already running
//! holds the `Arc` of its version, new batches take the new one.
//!
//! Every lifecycle change (loaded, reloaded, rolled back, paused, resumed,
//! removed, a file refused) is made here, so it is also written to the
//! [`Journal`] here, once, whoever caused it.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::handler::HandlerVersion;
use crate::health::{Health, Verdict};
use crate::journal::{self, Journal, Kind};
use crate::manifest::Subscription;

/// Whether a handler's consumer is registered at the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Loaded; topology or consumer not (yet) in place.
    Starting = 0,
    /// Its consumer is registered at the broker.
    Consuming = 1,
    /// Not consuming: the broker connection is down or the host is
    /// shutting down. Events wait in its queue.
    Disconnected = 2,
    /// Paused by the crash-loop breaker; resumes after the cool-off or
    /// when a new version is loaded. Events wait in its queue.
    Paused = 3,
    /// Its file was deleted; its queue stays and its events wait there.
    Removed = 4,
    /// Not consuming because another consumer is on its queue and this
    /// host's state is embedded: two hosts would each apply part of the
    /// events to state of their own (see `split_guard`). Consumes once the
    /// queue is its alone; events wait in the queue meanwhile.
    RefusedSharedQueue = 5,
}

impl Status {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Status::Consuming,
            2 => Status::Disconnected,
            5 => Status::RefusedSharedQueue,
            _ => Status::Starting,
        }
    }
}

/// Whether a handler should be consuming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// Serving events.
    Active,
    /// Stopped by the breaker until `until`.
    Paused {
        /// When the cool-off ends.
        until: Instant,
    },
    /// Its file is gone.
    Removed,
}

/// The versions of one handler.
struct Versions {
    current: Arc<HandlerVersion>,
    /// What `current` replaced: the rollback target while `current` is on
    /// probation, and shown in `/handlers` after.
    previous: Option<Arc<HandlerVersion>>,
}

/// One handler as the host serves it.
pub struct Entry {
    name: Arc<str>,
    versions: RwLock<Versions>,
    status: AtomicU8,
    lifecycle: watch::Sender<Lifecycle>,
    health: Mutex<Health>,
    /// Versions (sha256) the host rolled back from: the same file is not
    /// activated again until it changes.
    refused: Mutex<HashSet<String>>,
    /// The last thing an operator should know (a rollback, a pause).
    note: Mutex<Option<String>>,
    /// Why the status is what it is, when the status alone does not say
    /// (a refused shared queue: how many other consumers, what to do).
    status_reason: Mutex<Option<String>>,
    /// Bindings a swapped-out version had and the current one dropped,
    /// still to remove at the broker (the session does it when it next
    /// declares this handler's topology).
    stale_bindings: Mutex<Vec<Subscription>>,
    /// When the call running now started, and its deadline: a call far
    /// past its deadline means the handler is stuck (see [`stuck_for`]).
    call: Mutex<Option<(Instant, Duration)>>,
    /// The registry's lifecycle history, which this entry's changes go to.
    journal: Arc<Journal>,
}

/// How far past its deadline a call may run before its handler counts as
/// stuck: the deadline's interruption itself takes a little while (the
/// epoch tick, unwinding, a blocking host call returning).
pub const STUCK_GRACE: Duration = Duration::from_millis(500);

/// How long past its deadline (and [`STUCK_GRACE`]) the call that started
/// at `started` has run by `now`, when it has: the handler is stuck and
/// not ready. Pure, with the clock passed in.
pub fn stuck_for(started: Instant, deadline: Duration, now: Instant) -> Option<Duration> {
    let ran = now.checked_duration_since(started)?;
    let limit = deadline.saturating_add(STUCK_GRACE);
    (ran > limit).then(|| ran - limit)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Entry {
    /// A handler entry serving `version`, its lifecycle changes written to
    /// `journal`.
    pub fn new(version: Arc<HandlerVersion>, journal: Arc<Journal>) -> Self {
        Self {
            name: version.name.clone(),
            health: Mutex::new(Health::new(version.settings.health.clone(), false)),
            versions: RwLock::new(Versions {
                current: version,
                previous: None,
            }),
            status: AtomicU8::new(Status::Starting as u8),
            lifecycle: watch::Sender::new(Lifecycle::Active),
            refused: Mutex::new(HashSet::new()),
            note: Mutex::new(None),
            status_reason: Mutex::new(None),
            stale_bindings: Mutex::new(Vec::new()),
            call: Mutex::new(None),
            journal,
        }
    }

    fn journal(&self, event: Kind, entry: journal::Entry<'_>) {
        self.journal.record(
            event,
            journal::Entry {
                handler: Some(&self.name),
                ..entry
            },
        );
    }

    /// A call of `version` starts now (the worker brackets every event
    /// with this and [`Entry::call_ended`]).
    pub fn call_started(&self, version: &HandlerVersion) {
        *lock(&self.call) = Some((Instant::now(), version.settings.budget.deadline));
    }

    /// The running call ended.
    pub fn call_ended(&self) {
        *lock(&self.call) = None;
    }

    /// How long the running call has been past its deadline and grace at
    /// `now`, if it is (see [`stuck_for`]).
    pub fn stuck(&self, now: Instant) -> Option<Duration> {
        let (started, deadline) = (*lock(&self.call))?;
        stuck_for(started, deadline, now)
    }

    /// Handler name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version serving new deliveries.
    pub fn version(&self) -> Arc<HandlerVersion> {
        self.versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .current
            .clone()
    }

    /// The version the current one replaced: what a rollback goes back to
    /// while the current one is on probation (kept after, for `/handlers`).
    pub fn previous(&self) -> Option<Arc<HandlerVersion>> {
        self.versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .previous
            .clone()
    }

    /// Status as `/handlers` reports it: the lifecycle when not active,
    /// else whether the consumer is registered.
    pub fn status(&self) -> Status {
        match &*self.lifecycle.borrow() {
            Lifecycle::Removed => Status::Removed,
            Lifecycle::Paused { .. } => Status::Paused,
            Lifecycle::Active => Status::from_u8(self.status.load(Ordering::Acquire)),
        }
    }

    /// Record whether the consumer is registered.
    pub fn set_status(&self, status: Status) {
        *lock(&self.status_reason) = None;
        self.status.store(status as u8, Ordering::Release);
    }

    /// Its consumer ended: `Disconnected`, unless the status already says
    /// more (a guard that stopped it records why first, and `/readyz`
    /// must not show a bare `Disconnected` in between).
    pub fn consumer_ended(&self) {
        let _ = self.status.compare_exchange(
            Status::Consuming as u8,
            Status::Disconnected as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Record that the handler does not consume from a queue other
    /// consumers are on, and why (shown in `/handlers` and `/readyz`).
    pub fn set_refused_shared_queue(&self, reason: String) {
        *lock(&self.status_reason) = Some(reason);
        self.status
            .store(Status::RefusedSharedQueue as u8, Ordering::Release);
    }

    /// Why the status is what it is, when it needs saying (see
    /// [`Entry::set_refused_shared_queue`]); `None` otherwise.
    pub fn status_reason(&self) -> Option<String> {
        match self.status() {
            Status::RefusedSharedQueue => lock(&self.status_reason).clone(),
            _ => None,
        }
    }

    /// Current lifecycle.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle.borrow().clone()
    }

    /// True while the handler should consume.
    pub fn is_active(&self) -> bool {
        *self.lifecycle.borrow() == Lifecycle::Active
    }

    /// Notified on every lifecycle change.
    pub fn watch_lifecycle(&self) -> watch::Receiver<Lifecycle> {
        self.lifecycle.subscribe()
    }

    /// The last rollback or pause, for operators.
    pub fn note(&self) -> Option<String> {
        lock(&self.note).clone()
    }

    /// Whether the host rolled back from this file content.
    pub fn refused(&self, sha256: &str) -> bool {
        lock(&self.refused).contains(sha256)
    }

    /// Serve `version` from now on: new batches use it, running ones finish
    /// on theirs. The replaced version is kept for a rollback while the new
    /// one is on probation. A paused or removed handler becomes active.
    pub fn swap(&self, version: Arc<HandlerVersion>) -> Arc<HandlerVersion> {
        let old = {
            let mut v = self.versions.write().unwrap_or_else(|p| p.into_inner());
            let old = std::mem::replace(&mut v.current, version.clone());
            v.previous = Some(old.clone());
            old
        };
        lock(&self.stale_bindings).extend(dropped_bindings(
            &old.settings.manifest.subscriptions,
            &version.settings.manifest.subscriptions,
        ));
        *lock(&self.health) = Health::new(version.settings.health.clone(), true);
        *lock(&self.note) = None;
        self.lifecycle.send_replace(Lifecycle::Active);
        if old.sha256 == version.sha256 {
            self.journal(
                Kind::Restored,
                journal::Entry {
                    to: Some(version.short_version()),
                    detail: Some("file back: consuming again".into()),
                    ..Default::default()
                },
            );
        } else {
            self.journal(
                Kind::Reloaded,
                journal::Entry {
                    from: Some(old.short_version()),
                    to: Some(version.short_version()),
                    detail: Some(format!(
                        "guest version {} → {}",
                        old.declared.version, version.declared.version
                    )),
                    ..Default::default()
                },
            );
        }
        old
    }

    /// Go back to the previous version (the current one failed its
    /// probation). Returns (bad, restored), or `None` with nothing to go
    /// back to.
    pub fn roll_back(&self) -> Option<(Arc<HandlerVersion>, Arc<HandlerVersion>)> {
        let (bad, good) = {
            let mut v = self.versions.write().unwrap_or_else(|p| p.into_inner());
            let good = v.previous.take()?;
            let bad = std::mem::replace(&mut v.current, good.clone());
            (bad, good)
        };
        lock(&self.refused).insert(bad.sha256.clone());
        lock(&self.stale_bindings).extend(dropped_bindings(
            &bad.settings.manifest.subscriptions,
            &good.settings.manifest.subscriptions,
        ));
        // The restored version is not on probation: it is what ran before.
        *lock(&self.health) = Health::new(good.settings.health.clone(), false);
        Some((bad, good))
    }

    /// Stop consuming until the cool-off ends or a new version arrives.
    pub fn pause(&self, reason: String) {
        let cooloff = self.version().settings.health.breaker_cooloff;
        self.journal(
            Kind::Paused,
            journal::Entry {
                detail: Some(reason.clone()),
                ..Default::default()
            },
        );
        *lock(&self.note) = Some(reason);
        self.lifecycle.send_replace(Lifecycle::Paused {
            until: Instant::now() + cooloff,
        });
    }

    /// End a pause (cool-off over). No effect unless paused.
    pub fn resume(&self) {
        let resumed = self.lifecycle.send_if_modified(|l| {
            if matches!(l, Lifecycle::Paused { .. }) {
                *l = Lifecycle::Active;
                true
            } else {
                false
            }
        });
        if resumed {
            self.journal(
                Kind::Resumed,
                journal::Entry {
                    detail: Some("breaker cool-off over".into()),
                    ..Default::default()
                },
            );
        }
    }

    /// Its file is gone: stop consuming, keep the queue.
    pub fn remove(&self) {
        let removed = self.lifecycle.send_replace(Lifecycle::Removed) != Lifecycle::Removed;
        if removed {
            self.journal(
                Kind::Removed,
                journal::Entry {
                    detail: Some("file deleted or replaced: its queue keeps the events".into()),
                    ..Default::default()
                },
            );
        }
    }

    /// Bindings to remove at the broker, taken (the caller removes them or
    /// puts them back with [`Entry::keep_stale_bindings`]).
    pub fn take_stale_bindings(&self) -> Vec<Subscription> {
        std::mem::take(&mut *lock(&self.stale_bindings))
    }

    /// Whether bindings wait to be removed.
    pub fn has_stale_bindings(&self) -> bool {
        !lock(&self.stale_bindings).is_empty()
    }

    /// Put back bindings that could not be removed yet.
    pub fn keep_stale_bindings(&self, bindings: Vec<Subscription>) {
        lock(&self.stale_bindings).extend(bindings);
    }

    /// Record how one event of `version` went, and act on the verdict:
    /// roll back a failing new version, or pause a crash-looping handler.
    /// Events of a version no longer current do not count.
    pub fn record(&self, version: &HandlerVersion, failed: bool) -> Verdict {
        if version.sha256 != self.version().sha256 {
            return Verdict::Healthy;
        }
        let verdict = lock(&self.health).record(failed, Instant::now());
        match &verdict {
            Verdict::Healthy => {}
            Verdict::RollBack { failures, events } => match self.roll_back() {
                Some((bad, good)) => {
                    let note = format!(
                        "rolled back from {} to {}: {failures} of its first {events} events failed",
                        bad.short_version(),
                        good.short_version()
                    );
                    tracing::error!(handler = %self.name, "{note}");
                    self.journal(
                        Kind::RolledBack,
                        journal::Entry {
                            from: Some(bad.short_version()),
                            to: Some(good.short_version()),
                            detail: Some(note.clone()),
                            ..Default::default()
                        },
                    );
                    *lock(&self.note) = Some(note);
                }
                None => self.trip(*failures),
            },
            Verdict::Trip { failures } => self.trip(*failures),
        }
        verdict
    }

    fn trip(&self, failures: u32) {
        let h = &self.version().settings.health;
        let reason = format!(
            "paused by the crash-loop breaker: {failures} failed attempts within {} s; resuming in {} s or when a new version is loaded",
            h.breaker_window.as_secs(),
            h.breaker_cooloff.as_secs()
        );
        tracing::error!(handler = %self.name, "{reason}");
        self.pause(reason);
    }
}

/// Bindings `old` has and `new` does not, one subscription per binding
/// key, so a key both versions keep is never unbound.
fn dropped_bindings(old: &[Subscription], new: &[Subscription]) -> Vec<Subscription> {
    let kept = |s: &Subscription, key: &String| {
        new.iter().any(|n| {
            n.exchange == s.exchange && n.kind == s.kind && n.effective_keys().contains(key)
        })
    };
    old.iter()
        .flat_map(|s| {
            s.effective_keys()
                .into_iter()
                .filter(|k| !kept(s, k))
                .map(|k| Subscription {
                    exchange: s.exchange.clone(),
                    kind: s.kind,
                    binding_keys: vec![k],
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A dropped file that was not activated.
#[derive(Debug, Clone, Serialize)]
pub struct BrokenFile {
    /// The file.
    pub file: PathBuf,
    /// sha256 of its content when it was refused.
    pub sha256: String,
    /// Why (one line).
    pub error: String,
}

/// All handlers, by name, and the files refused.
pub struct Registry {
    entries: RwLock<BTreeMap<String, Arc<Entry>>>,
    broken: Mutex<BTreeMap<PathBuf, BrokenFile>>,
    /// Bumped when a handler is added, so the broker session starts its
    /// consumer.
    added: watch::Sender<u64>,
    /// The recent lifecycle changes of every handler, for `/status`.
    journal: Arc<Journal>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            entries: RwLock::default(),
            broken: Mutex::default(),
            added: watch::Sender::new(0),
            journal: Arc::default(),
        }
    }
}

impl Registry {
    /// Add a handler (its name must not be registered yet).
    pub fn insert(&self, version: Arc<HandlerVersion>) -> Arc<Entry> {
        self.journal.record(
            Kind::Loaded,
            journal::Entry {
                handler: Some(&version.name),
                to: Some(version.short_version()),
                detail: Some(format!(
                    "guest version {} from {}",
                    version.declared.version,
                    version.path.display()
                )),
                ..Default::default()
            },
        );
        let entry = Arc::new(Entry::new(version, self.journal.clone()));
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry.name().to_owned(), entry.clone());
        self.added.send_modify(|n| *n += 1);
        entry
    }

    /// Notified whenever a handler is added.
    pub fn watch_added(&self) -> watch::Receiver<u64> {
        self.added.subscribe()
    }

    /// Every handler, in name order.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// One handler.
    pub fn get(&self, name: &str) -> Option<Arc<Entry>> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Ready when at least one handler is present and every present,
    /// unpaused one is consuming and not stuck in a call past its
    /// deadline. Removed handlers do not count; a paused one is a
    /// deliberate state, not a broken host.
    pub fn ready(&self) -> bool {
        self.not_ready(Instant::now()).is_none()
    }

    /// Why the host is not ready at `now`, naming each handler that keeps
    /// it from being; `None` when ready.
    pub fn not_ready(&self, now: Instant) -> Option<String> {
        let present: Vec<_> = self
            .entries()
            .into_iter()
            .filter(|e| e.status() != Status::Removed)
            .collect();
        if present.is_empty() {
            return Some("no handlers loaded".into());
        }
        let waiting: Vec<String> = present
            .iter()
            .filter_map(|e| {
                let status = e.status();
                if !matches!(status, Status::Consuming | Status::Paused) {
                    return Some(match e.status_reason() {
                        Some(reason) => format!("{}: {reason}", e.name()),
                        None => format!("{}: {status:?}", e.name()),
                    });
                }
                e.stuck(now).map(|past| {
                    format!(
                        "{}: stuck in a call {} ms past its deadline",
                        e.name(),
                        past.saturating_add(STUCK_GRACE).as_millis()
                    )
                })
            })
            .collect();
        (!waiting.is_empty()).then(|| waiting.join(", "))
    }

    /// Record a refused file. Returns false when the same content was
    /// already reported (so it is logged once).
    pub fn set_broken(&self, broken: BrokenFile) -> bool {
        let mut map = lock(&self.broken);
        if map
            .get(&broken.file)
            .is_some_and(|b| b.sha256 == broken.sha256)
        {
            return false;
        }
        self.journal.record(
            Kind::Refused,
            journal::Entry {
                detail: Some(format!("{}: {}", broken.file.display(), broken.error)),
                ..Default::default()
            },
        );
        map.insert(broken.file.clone(), broken);
        true
    }

    /// The recent lifecycle changes (see [`Journal`]).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The file loaded (or was deleted): forget its refusal.
    pub fn clear_broken(&self, file: &std::path::Path) {
        lock(&self.broken).remove(file);
    }

    /// Files currently refused.
    pub fn broken(&self) -> Vec<BrokenFile> {
        lock(&self.broken).values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ExchangeKind;

    fn sub(exchange: &str, kind: ExchangeKind, keys: &[&str]) -> Subscription {
        Subscription {
            exchange: exchange.into(),
            kind,
            binding_keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn a_call_is_stuck_only_past_its_deadline_and_grace() {
        let t0 = Instant::now();
        let deadline = Duration::from_millis(500);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(stuck_for(t0, deadline, t0), None);
        assert_eq!(stuck_for(t0, deadline, at(500)), None);
        let limit = 500 + STUCK_GRACE.as_millis() as u64;
        assert_eq!(stuck_for(t0, deadline, at(limit)), None);
        assert_eq!(
            stuck_for(t0, deadline, at(limit + 250)),
            Some(Duration::from_millis(250))
        );
        // A clock read before the call started (another thread's `now`).
        assert_eq!(stuck_for(at(10), deadline, t0), None);
    }

    #[test]
    fn only_bindings_the_new_version_dropped_are_removed() {
        let old = [
            sub(
                "checkout",
                ExchangeKind::Direct,
                &["order.created", "order.paid"],
            ),
            sub("orders", ExchangeKind::Fanout, &[]),
        ];
        let new = [sub("checkout", ExchangeKind::Direct, &["order.created"])];
        assert_eq!(
            dropped_bindings(&old, &new),
            vec![
                sub("checkout", ExchangeKind::Direct, &["order.paid"]),
                sub("orders", ExchangeKind::Fanout, &[""]),
            ]
        );
        assert!(dropped_bindings(&new, &old).is_empty());
    }
}
