//! Durable per-handler key-value state, transactional per event.
//!
//! A handler call never writes to the database directly. It works on a
//! [`Txn`]: reads go through to the committed state (and are remembered),
//! writes stay in memory. When the call succeeds the dispatcher hands the
//! transaction to [`StateStore::commit`], which in one SQLite transaction
//! checks that nothing the call read has changed since (optimistic
//! concurrency: two events of one handler may run at once), that the
//! event's message id has not committed before (effectively-once), applies
//! the writes and records the event's publishes in the outbox. A failed
//! call's writes are simply dropped.
//!
//! The interface is deliberately small — point reads, key listing, batch
//! commit, outbox — so that a shared backend (PostgreSQL) can implement the
//! same contract later without the dispatcher or guests changing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

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

/// The properties of an outbox row, stored as JSON beside the payload blob.
#[derive(Serialize, Deserialize)]
struct OutboxProperties {
    content_type: Option<String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    headers: Vec<(String, String)>,
}

/// One event's state work, built up while its handler runs.
#[derive(Debug, Default)]
pub struct Txn {
    /// The committed value of every key the call read, as it first saw it.
    /// Validated at commit time.
    reads: HashMap<String, Option<Vec<u8>>>,
    /// Pending writes; `None` is a delete.
    writes: BTreeMap<String, Option<Vec<u8>>>,
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
        self.reads.insert(key.to_owned(), value.clone());
        Ok(value)
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

/// The embedded state store (SQLite in WAL mode).
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

/// One namespace's staged writes: key to new value, `None` for a delete.
type Staged = HashMap<String, Option<Vec<u8>>>;

struct Inner {
    /// Writes of executed-but-not-yet-committed events, per namespace, in
    /// execution order. The broker path runs a batch of events and commits
    /// them in one transaction; later events of the batch must see the
    /// earlier ones' writes, as they would after a commit. Commit-time
    /// validation happens in the same order inside one transaction, so it
    /// agrees with what the events saw.
    staged: Mutex<HashMap<String, Staged>>,
    /// Outbox rows already confirmed, deleted by the next commit's
    /// transaction rather than one of their own.
    confirmed_outbox: Mutex<Vec<i64>>,
    /// One connection: SQLite serialises writers anyway, and reads are point
    /// lookups on a primary key, far cheaper than the lock round trip a
    /// second connection would save.
    conn: Mutex<Connection>,
    path: Option<PathBuf>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ns, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS processed (
    ns TEXT NOT NULL, message_id TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (ns, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL, payload BLOB NOT NULL, properties TEXT NOT NULL);
";

impl StateStore {
    /// Open (creating if needed) the store in directory `dir`.
    pub fn open(dir: &Path, durability: Durability) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
        let path = dir.join("state.sqlite3");
        let conn = Connection::open(&path)
            .with_context(|| format!("opening state database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        Self::with_connection(conn, Some(path))
    }

    /// A private in-memory store (replay without `--state`, tests).
    pub fn in_memory() -> Result<Self> {
        Self::with_connection(Connection::open_in_memory()?, None)
    }

    fn with_connection(conn: Connection, path: Option<PathBuf>) -> Result<Self> {
        conn.execute_batch(SCHEMA)
            .context("creating state schema")?;
        Ok(Self {
            inner: Arc::new(Inner {
                staged: Mutex::new(HashMap::new()),
                confirmed_outbox: Mutex::new(Vec::new()),
                conn: Mutex::new(conn),
                path,
            }),
        })
    }

    /// The database file, when on disk.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back on drop), so a poisoned lock is usable.
        self.inner.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make `writes` visible to reads of `ns` until [`StateStore::unstage`]:
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

    /// Drop everything staged for `ns` (its batch committed or failed).
    pub fn unstage(&self, ns: &str) {
        let mut staged = self.inner.staged.lock().unwrap_or_else(|p| p.into_inner());
        staged.remove(ns);
    }

    /// The value of `key` in namespace `ns`: staged if an uncommitted event
    /// of the current batch wrote it, else committed.
    pub fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        {
            let staged = self.inner.staged.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = staged.get(ns).and_then(|m| m.get(key)) {
                return Ok(v.clone());
            }
        }
        self.get_committed(ns, key)
    }

    /// The committed value of `key`, ignoring anything staged.
    pub fn get_committed(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT value FROM kv WHERE ns = ?1 AND key = ?2")?;
        stmt.query_row(params![ns, key], |row| row.get(0))
            .optional()
            .with_context(|| format!("reading state {ns}/{key}"))
    }

    /// Up to `limit` committed keys of `ns` after `after`, in key order.
    pub fn list_keys(&self, ns: &str, after: Option<&str>, limit: usize) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT key FROM kv WHERE ns = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![ns, after.unwrap_or(""), limit as i64], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
    }

    /// Whether an event with `message_id` already committed in `ns`.
    pub fn is_processed(&self, ns: &str, message_id: &str) -> Result<bool> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT 1 FROM processed WHERE ns = ?1 AND message_id = ?2")?;
        Ok(stmt.exists(params![ns, message_id])?)
    }

    /// Commit a batch of events' transactions in one database transaction
    /// (one fsync for all of them). Each commit is validated and applied on
    /// its own: a conflict or duplicate skips that commit only.
    pub fn commit(&self, batch: &[Commit]) -> Result<Vec<CommitOutcome>> {
        let mut conn = self.conn();
        let tx = conn.transaction().context("starting state transaction")?;
        let confirmed = self.take_confirmed();
        if !confirmed.is_empty() {
            let mut del = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            for id in &confirmed {
                del.execute(params![id])?;
            }
        }
        let now = unix_now();
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut read = tx.prepare_cached("SELECT value FROM kv WHERE ns = ?1 AND key = ?2")?;
            let mut seen =
                tx.prepare_cached("SELECT 1 FROM processed WHERE ns = ?1 AND message_id = ?2")?;
            let mut put = tx.prepare_cached(
                "INSERT INTO kv (ns, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM kv WHERE ns = ?1 AND key = ?2")?;
            let mut mark = tx
                .prepare_cached("INSERT INTO processed (ns, message_id, at) VALUES (?1, ?2, ?3)")?;
            let mut enqueue = tx.prepare_cached(
                "INSERT INTO outbox (ns, exchange, routing_key, payload, properties)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            'commits: for commit in batch {
                if let Some(id) = &commit.message_id {
                    if seen.exists(params![commit.ns, id])? {
                        outcomes.push(CommitOutcome::Duplicate);
                        continue;
                    }
                }
                for (key, expected) in &commit.reads {
                    let current: Option<Vec<u8>> = read
                        .query_row(params![commit.ns, key], |r| r.get(0))
                        .optional()?;
                    if &current != expected {
                        outcomes.push(CommitOutcome::Conflict { key: key.clone() });
                        continue 'commits;
                    }
                }
                for (key, value) in &commit.writes {
                    match value {
                        Some(v) => put.execute(params![commit.ns, key, v])?,
                        None => del.execute(params![commit.ns, key])?,
                    };
                }
                if let Some(id) = &commit.message_id {
                    mark.execute(params![commit.ns, id, now])?;
                }
                let mut outbox_ids = Vec::with_capacity(commit.outbox.len());
                for message in &commit.outbox {
                    let properties = serde_json::to_string(&OutboxProperties {
                        content_type: message.content_type.clone(),
                        message_id: message.message_id.clone(),
                        correlation_id: message.correlation_id.clone(),
                        headers: message.headers.clone(),
                    })?;
                    enqueue.execute(params![
                        commit.ns,
                        message.exchange,
                        message.routing_key,
                        message.payload,
                        properties
                    ])?;
                    outbox_ids.push(tx.last_insert_rowid());
                }
                outcomes.push(CommitOutcome::Committed { outbox_ids });
            }
        }
        tx.commit().context("committing state transaction")?;
        Ok(outcomes)
    }

    /// Outbox rows not yet confirmed published (after a crash, for example).
    pub fn pending_outbox(&self) -> Result<Vec<(i64, String, Outgoing)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, ns, exchange, routing_key, payload, properties FROM outbox ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, String>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, ns, exchange, routing_key, payload, properties) = row?;
            let p: OutboxProperties = serde_json::from_str(&properties)
                .with_context(|| format!("decoding outbox row {id}"))?;
            out.push((
                id,
                ns,
                Outgoing {
                    exchange,
                    routing_key,
                    payload,
                    content_type: p.content_type,
                    message_id: p.message_id,
                    correlation_id: p.correlation_id,
                    headers: p.headers,
                },
            ));
        }
        Ok(out)
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

    /// The confirmed outbox rows waiting to be deleted, taken.
    fn take_confirmed(&self) -> Vec<i64> {
        std::mem::take(
            &mut *self
                .inner
                .confirmed_outbox
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
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
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut del = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            for id in ids {
                del.execute(params![id])?;
            }
        }
        tx.commit().context("clearing outbox")?;
        Ok(())
    }

    /// Drop dedupe records older than `max_age_secs`; they only need to
    /// outlive any redelivery of their message.
    pub fn prune_processed(&self, max_age_secs: i64) -> Result<usize> {
        let cutoff = unix_now() - max_age_secs;
        Ok(self
            .conn()
            .execute("DELETE FROM processed WHERE at < ?1", params![cutoff])?)
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_of(txn: Txn, id: Option<&str>) -> Commit {
        txn.into_commit("h", id.map(str::to_owned), Vec::new())
    }

    #[test]
    fn failed_call_writes_are_invisible_and_commits_apply() -> Result<()> {
        let store = StateStore::in_memory()?;
        let mut txn = Txn::default();
        txn.set("a", b"1".to_vec());
        assert_eq!(txn.get(&store, "h", "a")?, Some(b"1".to_vec()));
        drop(txn); // the call failed: nothing was committed
        assert_eq!(store.get("h", "a")?, None);

        let mut txn = Txn::default();
        txn.set("a", b"2".to_vec());
        let out = store.commit(&[commit_of(txn, Some("m1"))])?;
        assert!(matches!(out[0], CommitOutcome::Committed { .. }));
        assert_eq!(store.get("h", "a")?, Some(b"2".to_vec()));
        assert_eq!(store.get("other", "a")?, None, "namespaces are separate");
        Ok(())
    }

    #[test]
    fn duplicate_message_id_is_not_applied_twice() -> Result<()> {
        let store = StateStore::in_memory()?;
        let mut first = Txn::default();
        first.set("n", b"1".to_vec());
        let mut second = Txn::default();
        second.set("n", b"2".to_vec());
        let out = store.commit(&[commit_of(first, Some("m")), commit_of(second, Some("m"))])?;
        assert_eq!(out[1], CommitOutcome::Duplicate);
        assert_eq!(store.get("h", "n")?, Some(b"1".to_vec()));
        assert!(store.is_processed("h", "m")?);
        Ok(())
    }

    #[test]
    fn concurrent_read_modify_write_conflicts() -> Result<()> {
        let store = StateStore::in_memory()?;
        // Two calls read the same counter before either commits.
        let mut a = Txn::default();
        let mut b = Txn::default();
        assert_eq!(a.get(&store, "h", "c")?, None);
        assert_eq!(b.get(&store, "h", "c")?, None);
        a.set("c", b"1".to_vec());
        b.set("c", b"1".to_vec());
        let out = store.commit(&[commit_of(a, None), commit_of(b, None)])?;
        assert!(matches!(out[0], CommitOutcome::Committed { .. }));
        assert_eq!(out[1], CommitOutcome::Conflict { key: "c".into() });
        Ok(())
    }

    #[test]
    fn a_batch_sees_staged_writes_and_commits_in_order() -> Result<()> {
        let store = StateStore::in_memory()?;
        // Event 1 reads c (absent) and writes 1; event 2, run before the
        // batch commits, must see 1 and write 2.
        let mut first = Txn::default();
        assert_eq!(first.get(&store, "h", "c")?, None);
        first.set("c", b"1".to_vec());
        let first = commit_of(first, None);
        store.stage("h", &first.writes);
        let mut second = Txn::default();
        assert_eq!(second.get(&store, "h", "c")?, Some(b"1".to_vec()));
        second.set("c", b"2".to_vec());
        let second = commit_of(second, None);
        let out = store.commit(&[first, second])?;
        store.unstage("h");
        assert!(
            out.iter()
                .all(|o| matches!(o, CommitOutcome::Committed { .. })),
            "{out:?}"
        );
        assert_eq!(store.get("h", "c")?, Some(b"2".to_vec()));
        Ok(())
    }

    fn outgoing() -> Outgoing {
        Outgoing {
            exchange: "x".into(),
            routing_key: "k".into(),
            payload: b"{}".to_vec(),
            content_type: None,
            message_id: Some("id".into()),
            correlation_id: None,
            headers: vec![("h".into(), "v".into())],
        }
    }

    #[test]
    fn outbox_survives_until_cleared() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("evh-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let message = outgoing();
        let ids = {
            let store = StateStore::open(&dir, Durability::Normal)?;
            let commit = Txn::default().into_commit("h", None, vec![message.clone()]);
            match &store.commit(&[commit])?[0] {
                CommitOutcome::Committed { outbox_ids } => outbox_ids.clone(),
                other => anyhow::bail!("unexpected {other:?}"),
            }
        };
        let store = StateStore::open(&dir, Durability::Normal)?;
        let pending = store.pending_outbox()?;
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].2, message);
        store.clear_outbox(&ids)?;
        assert!(store.pending_outbox()?.is_empty());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn confirmed_rows_are_never_relayed_again() -> Result<()> {
        let store = StateStore::in_memory()?;
        let message = outgoing();
        let commit = Txn::default().into_commit("h", None, vec![message]);
        let CommitOutcome::Committed { outbox_ids } = store.commit(&[commit])?.remove(0) else {
            anyhow::bail!("not committed");
        };
        // Confirmed, deletion deferred to the next commit — which never
        // comes because the connection broke. The relay flushes first.
        store.forget_outbox_later(outbox_ids);
        assert_eq!(store.pending_outbox()?.len(), 1);
        store.flush_confirmed_outbox()?;
        assert!(store.pending_outbox()?.is_empty());
        Ok(())
    }
}
