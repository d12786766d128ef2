//! Durable per-handler key-value state, transactional per event.
//!
//! A handler call never writes to the database directly. It works on a
//! [`Txn`]: reads go through to the committed state (and are remembered),
//! writes stay in memory. When the call succeeds the dispatcher hands the
//! transaction to [`StateStore::commit`], which in one database
//! transaction checks that nothing the call read has changed since, that
//! the event's idempotency key has not committed before (effectively-once),
//! applies the writes and records the event's publishes in the outbox. A
//! failed call's writes are simply dropped.
//!
//! # Layout
//!
//! - this module: the interface — [`Txn`], [`Commit`], [`StateStore`] —
//!   and what both backends share: a batch's staged writes, the commit
//!   plan (`Plan`: dedupe, read validation, net writes, one outbox row
//!   per batch), the outbox encoding.
//! - `sqlite`: embedded state, one process's alone (the default).
//! - `cache`: the SQLite backend's read cache and key filter — safe there
//!   only because no other process can write the file.
//! - `postgres`: shared state for a fleet of hosts (`state_url`).
//!
//! The two backends differ in how reads are protected, not in what a
//! handler sees: SQLite validates a batch's reads at commit (one writer,
//! so only the batch's own events can have changed them); PostgreSQL
//! locks each key a batch reads until the batch commits, so hosts
//! serialise on a hot key instead of re-running each other's events.

mod cache;
mod postgres;
mod sqlite;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
// The maps here are hashed on every state read and write of every event:
// foldhash (randomly seeded per process) is several times cheaper than
// SipHash on short keys.
use foldhash::{HashMap, HashMapExt};
use serde::{Deserialize, Serialize};

use crate::config::Config;

pub use postgres::redact_url;

/// How hard the store pushes commits to disk before they count as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync every commit (SQLite `synchronous=FULL`): an acked event's
    /// effects survive power loss. The default.
    #[default]
    Full,
    /// fsync at WAL checkpoints only (`synchronous=NORMAL`): survives a host
    /// crash or SIGKILL, may lose the last commits on power loss.
    Normal,
}

/// A message a handler published, held until its call commits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    /// Target exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body bytes.
    pub payload: Vec<u8>,
    /// `content-type` property.
    pub content_type: Option<String>,
    /// `message-id` property (always set: derived when the guest gave none).
    pub message_id: Option<String>,
    /// `correlation-id` property.
    pub correlation_id: Option<String>,
    /// Application headers.
    pub headers: Vec<(String, String)>,
}

/// One event's state work, built up while its handler runs.
#[derive(Debug, Default)]
pub struct Txn {
    /// The committed value of every key the call read, as it first saw it.
    /// Validated at commit time.
    reads: HashMap<String, Option<Vec<u8>>>,
    /// Pending writes; `None` is a delete.
    writes: BTreeMap<String, Option<Vec<u8>>>,
    /// Bytes of the values in `reads`.
    read_bytes: usize,
}

impl Txn {
    /// Read `key`, seeing this call's own writes first.
    pub fn get(&mut self, store: &StateStore, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(pending) = self.writes.get(key) {
            return Ok(pending.clone());
        }
        if let Some(seen) = self.reads.get(key) {
            return Ok(seen.clone());
        }
        let value = store.get(ns, key)?;
        self.read_bytes = self
            .read_bytes
            .saturating_add(value.as_ref().map_or(0, Vec::len));
        self.reads.insert(key.to_owned(), value.clone());
        Ok(value)
    }

    /// Bytes of the committed values this call has read (each key once).
    pub fn read_bytes(&self) -> usize {
        self.read_bytes
    }

    /// Buffer a write of `key`.
    pub fn set(&mut self, key: &str, value: Vec<u8>) {
        self.writes.insert(key.to_owned(), Some(value));
    }

    /// Buffer a delete of `key`.
    pub fn delete(&mut self, key: &str) {
        self.writes.insert(key.to_owned(), None);
    }

    /// Keys with pending writes or deletes, for merging into listings.
    pub fn pending(&self) -> &BTreeMap<String, Option<Vec<u8>>> {
        &self.writes
    }

    /// True when the call wrote (or deleted) anything.
    pub fn has_writes(&self) -> bool {
        !self.writes.is_empty()
    }

    /// Turn the finished transaction into a commit request.
    pub fn into_commit(
        self,
        ns: &str,
        message_id: Option<String>,
        outbox: Vec<Outgoing>,
    ) -> Commit {
        Commit {
            ns: ns.to_owned(),
            message_id,
            reads: self.reads.into_iter().collect(),
            writes: self.writes.into_iter().collect(),
            outbox,
        }
    }
}

/// Everything one successful event wants made durable, atomically.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Handler namespace.
    pub ns: String,
    /// The input's message id, recorded so a redelivery is recognised.
    pub message_id: Option<String>,
    /// Values the call read; the commit fails if any has changed.
    pub reads: Vec<(String, Option<Vec<u8>>)>,
    /// Writes to apply (`None` deletes).
    pub writes: Vec<(String, Option<Vec<u8>>)>,
    /// Publishes to release once the commit is durable.
    pub outbox: Vec<Outgoing>,
}

/// What became of one [`Commit`].
#[derive(Debug, Clone, PartialEq)]
pub enum CommitOutcome {
    /// Applied; the outbox rows to publish and then clear.
    Committed {
        /// Outbox row ids, in publish order.
        outbox_ids: Vec<i64>,
    },
    /// The message id had already committed: nothing applied.
    Duplicate,
    /// A key the call read changed before the commit; nothing applied. The
    /// event should run again.
    Conflict {
        /// The first key found changed.
        key: String,
    },
}

/// A state read or commit lost a race with another host sharing the
/// state: a key both inserted, a message id both committed, two batches
/// waiting on each other's keys, a key held past the lock timeout. Nothing
/// was applied; the events run again (as for a [`CommitOutcome::Conflict`]).
#[derive(Debug, thiserror::Error)]
#[error("state contended: {0}")]
pub struct Contended(pub String);

/// Which unconfirmed outbox messages a relay takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owed {
    /// Everything this host owes: at a (re)connect, its own unconfirmed
    /// rows, and on shared state also rows another host claimed and left
    /// unconfirmed for longer than the claim lasts.
    Mine,
    /// Only rows another host claimed and left (shared state; a live host
    /// takes them over periodically). Embedded state has none.
    Orphaned,
}

/// One pending outbox message: its row (one row holds a committed batch's
/// messages), the handler namespace and the message.
pub type PendingMessage = (i64, String, Outgoing);

/// What a state backend provides. Every method is blocking: callers on an
/// async runtime go through `spawn_blocking` (the dispatch path runs on
/// its own threads).
pub(crate) trait Backend: Send + Sync {
    /// `sqlite` or `postgres`.
    fn name(&self) -> &'static str;
    /// Whether other hosts can share this state.
    fn shared(&self) -> bool;
    /// The embedded backend, for its unit tests.
    #[cfg(test)]
    fn as_sqlite(&self) -> Option<&sqlite::Sqlite> {
        None
    }
    /// The database file, for embedded state.
    fn path(&self) -> Option<&Path> {
        None
    }
    /// The committed value of `key`, as the current batch of `ns` reads it
    /// (on shared state: locked against other hosts until the batch ends).
    fn read(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>>;
    /// The committed value of `key`, outside any batch (admin reads).
    fn read_committed(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>>;
    /// Up to `limit` committed keys of `ns` after `after`, in key order.
    fn list_keys(&self, ns: &str, after: Option<&str>, limit: usize) -> Result<Vec<String>>;
    /// Whether `message_id` already committed in `ns`.
    fn is_processed(&self, ns: &str, message_id: &str) -> Result<bool>;
    /// The batch of `ns` about to run will ask [`Backend::is_processed`]
    /// for these ids and will likely [`Backend::read`] these keys (sorted):
    /// a backend a round trip away asks for all of them at once.
    fn prefetch(&self, _ns: &str, _message_ids: &[&str], _keys: &[String]) -> Result<()> {
        Ok(())
    }
    /// Commit `batch` in one transaction, deleting the `confirmed` outbox
    /// rows in it too.
    fn commit(&self, batch: &[Commit], confirmed: &[i64]) -> Result<Vec<CommitOutcome>>;
    /// Whether a batch's commit is worth overlapping with the next batch's
    /// run ([`Backend::detach_commit`]): true where it costs round trips
    /// and a remote WAL flush, false where it is a local write.
    fn commits_in_background(&self) -> bool {
        false
    }
    /// Take the open batch of `ns` out of the way of the namespace's next
    /// one and return the work that commits it (as [`Backend::commit`]
    /// would, then ends it), to run on another thread while the next batch
    /// begins. The default commits here and now.
    fn detach_commit(
        self: Arc<Self>,
        ns: &str,
        batch: Vec<Commit>,
        confirmed: Vec<i64>,
    ) -> CommitJob {
        let result = self.commit(&batch, &confirmed);
        self.end_batch(ns);
        Box::new(move || (result, batch))
    }
    /// The batch of `ns` is over: release whatever it holds.
    fn end_batch(&self, ns: &str);
    /// Unconfirmed outbox messages, in publish order.
    fn pending_outbox(&self, owed: Owed) -> Result<Vec<PendingMessage>>;
    /// Delete outbox rows the broker confirmed.
    fn clear_outbox(&self, ids: &[i64]) -> Result<()>;
    /// Delete dedupe records older than `cutoff` (unix seconds), in chunks.
    fn prune_processed_before(&self, cutoff: i64) -> Result<usize>;
    /// The secret that signs retry copies, shared by whoever shares the
    /// state.
    fn host_secret(&self) -> Result<[u8; 32]>;
}

/// One namespace's staged writes: key to new value, `None` for a delete.
type Staged = HashMap<String, Option<Vec<u8>>>;

/// A detached batch commit ([`Backend::detach_commit`]): its outcomes, and
/// the commits handed back.
pub(crate) type CommitJob = Box<dyn FnOnce() -> (Result<Vec<CommitOutcome>>, Vec<Commit>) + Send>;

/// The state store: embedded SQLite or shared PostgreSQL behind one
/// interface. Cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Writes of executed-but-not-yet-committed events, per namespace, in
    /// execution order. The broker path runs a batch of events and commits
    /// them in one transaction; later events of the batch must see the
    /// earlier ones' writes, as they would after a commit. Commit-time
    /// validation happens in the same order inside one transaction, so it
    /// agrees with what the events saw.
    staged: Mutex<HashMap<String, Staged>>,
    /// Per namespace, what the batch committing in the background (at
    /// most one: see [`StateStore::commit_in_background`]) read and wrote,
    /// as its events left it. The next batch reads through it while the
    /// commit is under way, and does not lock these keys meanwhile.
    committing: Mutex<HashMap<String, Staged>>,
    /// Outbox rows already confirmed, deleted by the next commit's
    /// transaction rather than one of their own.
    confirmed_outbox: Mutex<Vec<i64>>,
    /// Per namespace, the thread its background commits run on, started
    /// with its first one and kept for the next: one thread a batch cost
    /// a thread's start and end per commit, on the commit's path.
    committers: Mutex<HashMap<String, Committer>>,
    backend: Arc<dyn Backend>,
}

/// What a commit job hands back: each commit's outcome, and the commits.
type JobOutput = (Result<Vec<CommitOutcome>>, Vec<Commit>);

/// Hands jobs to a namespace's commit thread, each with where its output
/// goes.
type Committer = std::sync::mpsc::Sender<(CommitJob, std::sync::mpsc::SyncSender<JobOutput>)>;

impl StateStore {
    /// The store `config` names: PostgreSQL when `state_url` is set,
    /// else embedded SQLite in `state_path`.
    pub fn from_config(config: &Config) -> Result<Self> {
        match config.state_url.as_ref().filter(|u| !u.0.is_empty()) {
            Some(url) => Self::postgres(&url.0, &config.state_schema, &config.host_id()),
            None => Self::open(&config.state_path, config.durability),
        }
    }

    /// Open (creating if needed) embedded state in directory `dir`, and
    /// hold it: one process at a time owns a state folder. A second host,
    /// or a `replay --state` on a running host's folder, gets a clear
    /// error instead of racing the owner's commits.
    pub fn open(dir: &Path, durability: Durability) -> Result<Self> {
        Ok(Self::over(Arc::new(sqlite::Sqlite::open(dir, durability)?)))
    }

    /// A private in-memory store (replay without `--state`, tests).
    pub fn in_memory() -> Result<Self> {
        Ok(Self::over(Arc::new(sqlite::Sqlite::in_memory()?)))
    }

    /// Connect to shared state on PostgreSQL at `url`, in `schema`
    /// (created and migrated here: safe when several hosts start at once),
    /// as host `host_id`.
    pub fn postgres(url: &str, schema: &str, host_id: &str) -> Result<Self> {
        Ok(Self::over(Arc::new(postgres::Postgres::connect(
            url, schema, host_id,
        )?)))
    }

    fn over(backend: Arc<dyn Backend>) -> Self {
        Self {
            inner: Arc::new(Inner {
                staged: Mutex::new(HashMap::new()),
                committing: Mutex::new(HashMap::new()),
                confirmed_outbox: Mutex::new(Vec::new()),
                committers: Mutex::new(HashMap::new()),
                backend,
            }),
        }
    }

    /// The backend's name, for `/handlers` and `/metrics`: `sqlite` or
    /// `postgres`.
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// Whether other hosts can share this state (a fleet may consume one
    /// queue). Embedded state is this process's alone.
    pub fn is_shared(&self) -> bool {
        self.inner.backend.shared()
    }

    /// The database file, when on disk.
    pub fn path(&self) -> Option<&Path> {
        self.inner.backend.path()
    }

    /// Make `writes` visible to reads of `ns` until [`StateStore::end_batch`]:
    /// an executed event whose commit is batched with later events.
    pub fn stage(&self, ns: &str, writes: &[(String, Option<Vec<u8>>)]) {
        if writes.is_empty() {
            return;
        }
        let mut staged = self.inner.staged.lock().unwrap_or_else(|p| p.into_inner());
        let map = staged.entry(ns.to_owned()).or_default();
        for (k, v) in writes {
            map.insert(k.clone(), v.clone());
        }
    }

    /// The batch of `ns` is over (committed, failed, or nothing to
    /// commit): drop what it staged and release what it holds — on shared
    /// state, the keys it read stay locked until this or its commit.
    pub fn end_batch(&self, ns: &str) {
        {
            let mut staged = self.inner.staged.lock().unwrap_or_else(|p| p.into_inner());
            staged.remove(ns);
        }
        self.inner.backend.end_batch(ns);
    }

    /// The value of `key` in namespace `ns`, as a handler call sees it:
    /// staged if an uncommitted event of the current batch wrote it, else
    /// committed (the commit validates it).
    pub fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        {
            let staged = self.inner.staged.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = staged.get(ns).and_then(|m| m.get(key)) {
                return Ok(v.clone());
            }
        }
        {
            // The previous batch, still committing: what it left is what
            // this one sees (its commit validates the key against what
            // is then committed).
            let committing = self
                .inner
                .committing
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(v) = committing.get(ns).and_then(|m| m.get(key)) {
                return Ok(v.clone());
            }
        }
        self.inner.backend.read(ns, key)
    }

    /// The committed value of `key`, ignoring anything staged and outside
    /// any batch (the admin endpoint).
    pub fn get_committed(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.backend.read_committed(ns, key)
    }

    /// Up to `limit` committed keys of `ns` after `after`, in key order.
    pub fn list_keys(&self, ns: &str, after: Option<&str>, limit: usize) -> Result<Vec<String>> {
        self.inner.backend.list_keys(ns, after, limit)
    }

    /// Whether an event with `message_id` already committed in `ns`.
    pub fn is_processed(&self, ns: &str, message_id: &str) -> Result<bool> {
        self.inner.backend.is_processed(ns, message_id)
    }

    /// The batch of `ns` about to run holds these idempotency keys and
    /// will likely read these state keys (sorted, see
    /// [`crate::read_ahead`]): on shared state, the dedupe records and the
    /// keys (locked for the batch) are read in one round trip rather than
    /// one per event and read. A failure here is left for the per-event
    /// reads to report.
    pub fn prefetch(&self, ns: &str, message_ids: &[&str], keys: &[String]) {
        // Keys the batch committing in the background holds are read
        // through it, not locked: locking one would wait for that commit,
        // or, if it got there first, make that commit wait for this batch.
        let mut keys = std::borrow::Cow::Borrowed(keys);
        {
            let committing = self
                .inner
                .committing
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(held) = committing.get(ns) {
                keys = keys
                    .iter()
                    .filter(|k| !held.contains_key(*k))
                    .cloned()
                    .collect();
            }
        }
        if message_ids.is_empty() && keys.is_empty() {
            return;
        }
        if let Err(e) = self.inner.backend.prefetch(ns, message_ids, &keys) {
            tracing::debug!(handler = ns, "reading ahead for a batch: {e:#}");
        }
    }

    /// Commit a batch of events' transactions in one database transaction
    /// (one fsync, or one round trip, for all of them). Each commit is
    /// validated and applied on its own: a conflict or duplicate skips
    /// that commit only.
    ///
    /// What reaches the database is the batch's net effect: each key
    /// written once with its last value, and one outbox row holding every
    /// message of the batch (the outcomes all name that row). Per event
    /// that leaves only the dedupe record, when the event has a message id.
    pub fn commit(&self, batch: &[Commit]) -> Result<Vec<CommitOutcome>> {
        let confirmed = self.take_confirmed();
        self.inner
            .backend
            .commit(batch, &confirmed)
            .inspect_err(|_| {
                // Rolled back: the confirmed rows are still there, and
                // still to delete — not to relay again at the next
                // reconnect.
                self.forget_outbox_later(confirmed.clone());
            })
    }

    /// Whether [`StateStore::commit_in_background`] overlaps a commit with
    /// the next batch (shared state), or commits in place.
    pub fn commits_in_background(&self) -> bool {
        self.inner.backend.commits_in_background()
    }

    /// Start committing the batch of `ns` that just ran, as
    /// [`StateStore::commit`] and then [`StateStore::end_batch`] would: in
    /// place on embedded state, on another thread where the backend is a
    /// round trip away ([`StateStore::commits_in_background`]), where the
    /// next batch of `ns` may begin (read ahead, run its events) meanwhile.
    /// That batch reads what this one read and wrote as its events left
    /// it, without locking those keys; its own commit locks and validates
    /// them once this one is over, so should this commit fail, the next
    /// batch's events that built on it conflict and run again.
    ///
    /// One at a time per namespace: [`PendingCommit::finish`] this one
    /// before the next batch of `ns` commits.
    pub fn commit_in_background(&self, ns: &str, batch: Vec<Commit>) -> PendingCommit {
        let background = self.commits_in_background();
        // This batch's staged writes end here: in the committing layer for
        // the next batch to read, or (committed in place) simply gone, as
        // `end_batch` would drop them.
        let staged = self
            .inner
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ns);
        if background {
            let mut layer: Staged = HashMap::new();
            for commit in &batch {
                for (key, value) in &commit.reads {
                    layer.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
            layer.extend(staged.unwrap_or_default());
            self.inner
                .committing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ns.to_owned(), layer);
        }
        let confirmed = self.take_confirmed();
        let job = self
            .inner
            .backend
            .clone()
            .detach_commit(ns, batch, confirmed.clone());
        let job = if !background {
            let (result, batch) = job();
            Job::Done(result, batch)
        } else {
            match self.on_commit_thread(ns, job) {
                Ok(running) => Job::Running(running),
                Err(e) => Job::Done(Err(e), Vec::new()),
            }
        };
        PendingCommit {
            store: self.clone(),
            ns: background.then(|| ns.to_owned()),
            confirmed,
            job: Some(job),
        }
    }

    /// Run `job` on the commit thread of `ns`, starting it if there is
    /// none; its output arrives on the receiver. A job that panics fails
    /// its batch (the receiver finds the sender gone), not the thread.
    fn on_commit_thread(
        &self,
        ns: &str,
        job: CommitJob,
    ) -> Result<std::sync::mpsc::Receiver<JobOutput>> {
        let (done, output) = std::sync::mpsc::sync_channel(1);
        let mut committers = self
            .inner
            .committers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut work = (job, done);
        if let Some(committer) = committers.get(ns) {
            match committer.send(work) {
                Ok(()) => return Ok(output),
                // Its thread is gone: start another.
                Err(std::sync::mpsc::SendError(back)) => work = back,
            }
        }
        let (committer, jobs) =
            std::sync::mpsc::channel::<(CommitJob, std::sync::mpsc::SyncSender<JobOutput>)>();
        std::thread::Builder::new()
            .name("state-commit".into())
            .spawn(move || {
                // Ends when the store, and with it the sender, is dropped.
                for (job, done) in jobs {
                    if let Ok(out) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                        let _ = done.send(out);
                    }
                }
            })
            .context("starting a state commit thread")?;
        committer
            .send(work)
            .map_err(|_| anyhow::anyhow!("the state commit thread ended at its start"))?;
        committers.insert(ns.to_owned(), committer);
        Ok(output)
    }

    /// Outbox messages not yet confirmed published (after a crash, for
    /// example), in publish order. On shared state the rows are claimed
    /// for this host first, so no two live hosts relay the same row.
    pub fn pending_outbox(&self) -> Result<Vec<PendingMessage>> {
        self.inner.backend.pending_outbox(Owed::Mine)
    }

    /// Outbox messages another host claimed and left unconfirmed past its
    /// claim (it died), claimed now for this one. Empty on embedded state.
    pub fn orphaned_outbox(&self) -> Result<Vec<PendingMessage>> {
        self.inner.backend.pending_outbox(Owed::Orphaned)
    }

    /// Outbox rows whose messages the broker confirmed, to delete with the
    /// next commit (or [`StateStore::clear_outbox`]).
    pub fn forget_outbox_later(&self, ids: Vec<i64>) {
        if !ids.is_empty() {
            self.inner
                .confirmed_outbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(ids);
        }
    }

    /// The confirmed outbox rows waiting to be deleted, taken (each once:
    /// the events of a batch share their row).
    fn take_confirmed(&self) -> Vec<i64> {
        let mut ids = std::mem::take(
            &mut *self
                .inner
                .confirmed_outbox
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Delete now the confirmed rows [`StateStore::forget_outbox_later`]
    /// was holding for the next commit: before the outbox is relayed after
    /// a reconnect, so messages already confirmed are not published again.
    pub fn flush_confirmed_outbox(&self) -> Result<()> {
        let ids = self.take_confirmed();
        self.clear_outbox(&ids)
            .inspect_err(|_| self.forget_outbox_later(ids.clone()))
    }

    /// Forget outbox rows whose messages the broker has confirmed.
    pub fn clear_outbox(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.inner.backend.clear_outbox(ids)
    }

    /// Drop dedupe records older than `max_age_secs`; they only need to
    /// outlive any redelivery of their message. Deletes in chunks of
    /// `PRUNE_CHUNK` (10 000) rows, each its own transaction, so events
    /// committing meanwhile wait for one chunk at most, never for the
    /// whole table.
    /// Returns how many records were dropped.
    pub fn prune_processed(&self, max_age_secs: i64) -> Result<usize> {
        self.inner
            .backend
            .prune_processed_before(unix_now().saturating_sub(max_age_secs))
    }

    /// The 32-byte secret that keys the retry copies' signatures: random,
    /// made on first use and kept in the state, so a restarted host — and
    /// on shared state every host of the fleet — trusts the retry copies
    /// another made.
    ///
    /// An embedded store also keeps it, hex, in [`SECRET_FILE`] beside its
    /// database, for tools that sign for the host (`dlq redrive`) while
    /// the host holds the database locked; it is no more exposed there
    /// than in the database, which the folder holds too.
    pub fn host_secret(&self) -> Result<[u8; 32]> {
        let secret = self.inner.backend.host_secret()?;
        if let Some(dir) = self.path().and_then(Path::parent) {
            let file = dir.join(SECRET_FILE);
            if !file.exists() {
                write_private(&file, hex::encode(secret).as_bytes())
                    .with_context(|| format!("writing {}", file.display()))?;
            }
        }
        Ok(secret)
    }
}

/// A batch commit under way ([`StateStore::commit_in_background`]).
/// Dropping it waits for the commit, as [`PendingCommit::finish`] does.
pub struct PendingCommit {
    store: StateStore,
    /// The namespace whose committing layer this commit holds, when it
    /// runs in the background.
    ns: Option<String>,
    /// Confirmed outbox rows the commit deletes: kept for the next one
    /// if it fails.
    confirmed: Vec<i64>,
    job: Option<Job>,
}

enum Job {
    Done(Result<Vec<CommitOutcome>>, Vec<Commit>),
    Running(std::sync::mpsc::Receiver<JobOutput>),
}

impl PendingCommit {
    /// Whether the commit is over already (it ran in place, on embedded
    /// state): nothing is gained by waiting to collect it.
    pub fn is_done(&self) -> bool {
        matches!(self.job, Some(Job::Done(..)) | None)
    }

    /// Wait for the commit: each commit's outcome (as
    /// [`StateStore::commit`]), and the commits handed back.
    pub fn finish(mut self) -> (Result<Vec<CommitOutcome>>, Vec<Commit>) {
        self.wait()
    }

    fn wait(&mut self) -> (Result<Vec<CommitOutcome>>, Vec<Commit>) {
        let (result, batch) = match self.job.take() {
            Some(Job::Done(result, batch)) => (result, batch),
            Some(Job::Running(running)) => running.recv().unwrap_or_else(|_| {
                (
                    Err(anyhow::anyhow!("the state commit panicked")),
                    Vec::new(),
                )
            }),
            None => (Err(anyhow::anyhow!("commit already collected")), Vec::new()),
        };
        if let Some(ns) = self.ns.take() {
            self.store
                .inner
                .committing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&ns);
        }
        if result.is_err() {
            // Rolled back: the confirmed rows are still to delete.
            self.store
                .forget_outbox_later(std::mem::take(&mut self.confirmed));
        }
        (result, batch)
    }
}

impl Drop for PendingCommit {
    fn drop(&mut self) {
        if self.job.is_some() {
            let _ = self.wait();
        }
    }
}

/// The file in an embedded store's folder that holds the host secret.
pub const SECRET_FILE: &str = "host-secret";

/// The host secret an embedded store in `dir` keeps in [`SECRET_FILE`].
pub fn secret_from_file(dir: &Path) -> Result<[u8; 32]> {
    let file = dir.join(SECRET_FILE);
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "reading {} (a host on this state folder writes it when it starts)",
            file.display()
        )
    })?;
    hex::decode(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .with_context(|| format!("{} does not hold a 32-byte hex secret", file.display()))
}

/// Write `bytes` to `file` readable by its owner only, atomically. Safe
/// to race: every handler's session asks for the secret when it starts,
/// so several threads may write the file at once (each through a
/// temporary file of its own; the last rename wins, with the same bytes).
fn write_private(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let tmp = file.with_extension(format!(
        "tmp{}-{}",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    out.write_all(bytes)?;
    out.sync_all()?;
    std::fs::rename(&tmp, file)
}

/// What a batch of commits comes to, worked out before anything is
/// written: each commit's outcome, the batch's net writes, the dedupe
/// records to insert and the outbox rows (one per namespace). Both
/// backends apply a plan; only how they read the current state differs.
pub(crate) struct Plan<'a> {
    /// One per commit; `Committed` ones get their outbox row filled in.
    pub outcomes: Vec<CommitOutcome>,
    /// (namespace, key) → last value written by a committed event
    /// (`None`: deleted).
    pub written: HashMap<(&'a str, &'a str), Option<&'a [u8]>>,
    /// (namespace, message id) of every committed event that has one.
    pub marks: Vec<(&'a str, &'a str)>,
    /// Per namespace: its messages in order, and the outcomes they came
    /// from.
    pub outbox: Vec<(&'a str, Vec<&'a Outgoing>, Vec<usize>)>,
}

impl<'a> Plan<'a> {
    /// Plan `batch` in order. `seen` says whether a message id committed
    /// before this batch; `current` gives a key's committed value. A
    /// commit is a duplicate when its id committed before or earlier in
    /// the batch, a conflict when a key it read differs from what the
    /// batch's earlier commits or the store hold now.
    pub fn new(
        batch: &'a [Commit],
        mut seen: impl FnMut(&str, &str) -> Result<bool>,
        mut current: impl FnMut(&str, &str) -> Result<Option<Vec<u8>>>,
    ) -> Result<Self> {
        let mut plan = Plan {
            outcomes: Vec::with_capacity(batch.len()),
            written: HashMap::new(),
            marks: Vec::new(),
            outbox: Vec::new(),
        };
        let mut marked: HashSet<(&str, &str)> = HashSet::new();
        'commits: for commit in batch {
            if let Some(id) = &commit.message_id {
                if marked.contains(&(commit.ns.as_str(), id.as_str())) || seen(&commit.ns, id)? {
                    plan.outcomes.push(CommitOutcome::Duplicate);
                    continue;
                }
            }
            for (key, expected) in &commit.reads {
                let now = match plan.written.get(&(commit.ns.as_str(), key.as_str())) {
                    Some(v) => v.map(<[u8]>::to_vec),
                    None => current(&commit.ns, key)?,
                };
                if &now != expected {
                    plan.outcomes
                        .push(CommitOutcome::Conflict { key: key.clone() });
                    continue 'commits;
                }
            }
            for (key, value) in &commit.writes {
                plan.written.insert((&commit.ns, key), value.as_deref());
            }
            if let Some(id) = &commit.message_id {
                marked.insert((&commit.ns, id));
                plan.marks.push((&commit.ns, id));
            }
            if !commit.outbox.is_empty() {
                let index = plan.outcomes.len();
                match plan.outbox.iter_mut().find(|(ns, ..)| *ns == commit.ns) {
                    Some(group) => {
                        group.1.extend(&commit.outbox);
                        group.2.push(index);
                    }
                    None => {
                        plan.outbox
                            .push((&commit.ns, commit.outbox.iter().collect(), vec![index]))
                    }
                }
            }
            plan.outcomes.push(CommitOutcome::Committed {
                outbox_ids: Vec::new(),
            });
        }
        Ok(plan)
    }

    /// Name outbox row `row` (just written for group `group`) in the
    /// outcomes it came from.
    pub fn outbox_row(&mut self, group: usize, row: i64) {
        for &index in &self.outbox[group].2 {
            self.outcomes[index] = CommitOutcome::Committed {
                outbox_ids: vec![row],
            };
        }
    }
}

/// An outbox row's messages, as stored (both backends).
fn encode_messages(messages: &[&Outgoing]) -> Result<Vec<u8>> {
    postcard::to_stdvec(messages).context("encoding outbox messages")
}

fn decode_messages(bytes: &[u8]) -> Result<Vec<Outgoing>> {
    postcard::from_bytes(bytes).context("decoding outbox messages")
}

/// Dedupe records deleted per transaction when pruning.
const PRUNE_CHUNK: usize = 10_000;

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A fresh 32-byte secret.
fn new_secret() -> Result<[u8; 32]> {
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret)
        .map_err(|e| anyhow::anyhow!("generating the host secret: {e}"))?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace's background commits run one after another on one kept
    /// thread (not a thread each), and a commit that panics fails only its
    /// own batch: the next still runs, on the same thread.
    #[test]
    fn background_commits_share_their_namespace_s_thread_and_outlive_a_panic() -> Result<()> {
        let store = StateStore::in_memory()?;
        let threads = Arc::new(Mutex::new(Vec::new()));
        let job = |panics: bool| -> CommitJob {
            let threads = threads.clone();
            Box::new(move || {
                threads.lock().unwrap().push(std::thread::current().id());
                assert!(!panics, "a commit job panicked (as this test wants)");
                (Ok(Vec::new()), Vec::new())
            })
        };
        let ok = store.on_commit_thread("h", job(false))?.recv()?;
        assert!(ok.0.is_ok());
        let panicked = store.on_commit_thread("h", job(true))?.recv();
        assert!(panicked.is_err(), "the waiter sees a panicked commit fail");
        let after = store.on_commit_thread("h", job(false))?.recv()?;
        assert!(after.0.is_ok());
        assert!(store
            .on_commit_thread("other", job(false))?
            .recv()?
            .0
            .is_ok());
        let threads = threads.lock().unwrap();
        assert_eq!(threads[0], threads[1]);
        assert_eq!(threads[1], threads[2]);
        assert_ne!(threads[0], std::thread::current().id());
        assert_ne!(threads[3], threads[0], "each namespace has its own");
        Ok(())
    }
}
