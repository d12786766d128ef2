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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use growable_bloom_filter::GrowableBloom;
// The maps here are hashed on every state read and write of every event:
// foldhash (randomly seeded per process) is several times cheaper than
// SipHash on short keys.
use foldhash::{HashMap, HashMapExt};
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

/// The properties of a row of the outbox table older versions wrote (one
/// row per message), stored as JSON beside the payload blob. Read only to
/// carry such rows over (see [`migrate_legacy_outbox`]).
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

/// How long opening the store waits for another process to release it
/// (a host restarting while its predecessor exits).
const OWNER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
    db: Mutex<Db>,
    path: Option<PathBuf>,
}

/// The connection and what this process knows of the committed state.
struct Db {
    conn: Connection,
    cache: ReadCache,
}

/// Committed values this process read or wrote, so that the hot path — a
/// handler reading a key, then the commit validating that read — costs a
/// hash lookup instead of two SQLite statements. Every write goes through
/// [`StateStore::commit`], which updates the cache after its transaction
/// commits, and no other process can write the file while this one holds
/// it (see [`StateStore::open`]), so the cache is never stale.
#[derive(Default)]
struct ReadCache {
    /// Namespace → key → committed value (`None`: absent).
    entries: HashMap<String, HashMap<String, Option<Vec<u8>>>>,
    /// Approximate bytes held, to bound the cache.
    bytes: usize,
    /// Every (namespace, key) the kv table may hold: a read of a key it
    /// does not contain is answered "absent" without asking SQLite. Most
    /// reads of absent keys are of keys never written — a handler's "have
    /// I seen this order?" — and each would otherwise cost a B-tree
    /// descent. Built from the table at open and fed every committed
    /// write; deletes stay in it (a false "maybe" only costs the lookup).
    /// `None` when the state holds more keys than it is kept for.
    keys: Option<GrowableBloom>,
    /// Reads that went to SQLite (for tests of the cache and the filter).
    sqlite_reads: u64,
}

impl ReadCache {
    /// Keys the filter is kept for (about 1.2 bytes each at its 1% false
    /// positive rate: ~20 MiB at the bound). A state holding more is read
    /// through SQLite for absent keys as well, as it would be without it.
    const MAX_FILTERED_KEYS: usize = 16_000_000;

    /// A cache over the kv table behind `conn`, with the key filter built
    /// from every key it holds (when there are not too many).
    fn over(conn: &Connection) -> Result<Self> {
        let count: i64 = conn
            .query_row("SELECT count(*) FROM kv", [], |r| r.get(0))
            .context("counting state keys")?;
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let keys = if count > Self::MAX_FILTERED_KEYS {
            None
        } else {
            let mut filter = GrowableBloom::new(0.01, (count * 2).max(100_000));
            let mut stmt = conn.prepare("SELECT ns, key FROM kv")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let (ns, key): (String, String) = (row.get(0)?, row.get(1)?);
                filter.insert((ns.as_str(), key.as_str()));
            }
            Some(filter)
        };
        Ok(Self {
            keys,
            ..Self::default()
        })
    }

    /// Bound on what the cache holds. Past it the cache starts over: hot
    /// keys come back at once, and the memory stays bounded whatever the
    /// handlers store.
    const MAX_BYTES: usize = 64 << 20;
    /// Rough per-entry overhead of the maps, for the bound.
    const ENTRY_OVERHEAD: usize = 64;

    /// The committed value of `key`: from the cache, else from SQLite
    /// through `conn` (the store's connection, or its open transaction),
    /// and then cached.
    fn read(&mut self, conn: &Connection, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(value) = self.entries.get(ns).and_then(|keys| keys.get(key)) {
            return Ok(value.clone());
        }
        if self.keys.as_ref().is_some_and(|f| !f.contains((ns, key))) {
            // Never written: absent, and not worth a cache entry (the
            // filter answers again as cheaply).
            return Ok(None);
        }
        self.sqlite_reads += 1;
        let value = read_kv(conn, ns, key)?;
        self.insert(ns, key, value.clone());
        Ok(value)
    }

    /// A committed write (or delete, `None`) of `key`. A cached key gets
    /// its new value; an uncached one stays uncached: the hot keys are the
    /// ones read before they are written (a stock level), while a key only
    /// written (a dedupe record) would fill the cache for nothing.
    fn committed(&mut self, ns: &str, key: &str, value: Option<&[u8]>) {
        if value.is_some() {
            if let Some(filter) = &mut self.keys {
                filter.insert((ns, key));
                if filter.len() > Self::MAX_FILTERED_KEYS {
                    self.keys = None;
                }
            }
        }
        let cached = self.entries.get_mut(ns).and_then(|keys| keys.get_mut(key));
        if let Some(cached) = cached {
            let old = cached.as_ref().map_or(0, Vec::len);
            let new = value.map_or(0, <[u8]>::len);
            *cached = value.map(<[u8]>::to_vec);
            self.bytes = (self.bytes + new).saturating_sub(old);
        }
    }

    fn insert(&mut self, ns: &str, key: &str, value: Option<Vec<u8>>) {
        let size = key.len() + value.as_ref().map_or(0, Vec::len) + Self::ENTRY_OVERHEAD;
        if self.bytes + size > Self::MAX_BYTES {
            self.entries.clear();
            self.bytes = 0;
        }
        let keys = match self.entries.get_mut(ns) {
            Some(keys) => keys,
            None => self.entries.entry(ns.to_owned()).or_default(),
        };
        self.bytes += size;
        if let Some(old) = keys.insert(key.to_owned(), value) {
            let old = key.len() + old.map_or(0, |v| v.len()) + Self::ENTRY_OVERHEAD;
            self.bytes = self.bytes.saturating_sub(old);
        }
    }
}

impl Db {
    /// The committed value of `key` (see [`ReadCache::read`]).
    fn read(&mut self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.cache.read(&self.conn, ns, key)
    }
}

fn read_kv(conn: &Connection, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
    let mut stmt = conn.prepare_cached("SELECT value FROM kv WHERE ns = ?1 AND key = ?2")?;
    stmt.query_row(params![ns, key], |row| row.get(0))
        .optional()
        .with_context(|| format!("reading state {ns}/{key}"))
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ns, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS processed (
    ns TEXT NOT NULL, message_id TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (ns, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox_batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, messages BLOB NOT NULL);
";

/// Carry rows of the per-message outbox table older versions wrote into
/// the batch table, in order, so an upgrade never drops a message owed.
fn migrate_legacy_outbox(conn: &mut Connection) -> Result<()> {
    let legacy: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'outbox'",
        [],
        |r| r.get(0),
    )?;
    if legacy == 0 {
        return Ok(());
    }
    let tx = conn.transaction()?;
    {
        let mut rows = tx.prepare(
            "SELECT id, ns, exchange, routing_key, payload, properties FROM outbox ORDER BY id",
        )?;
        let mut insert = tx.prepare("INSERT INTO outbox_batches (ns, messages) VALUES (?1, ?2)")?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let ns: String = row.get(1)?;
            let properties: String = row.get(5)?;
            let p: OutboxProperties = serde_json::from_str(&properties)
                .with_context(|| format!("decoding legacy outbox row {id}"))?;
            let message = Outgoing {
                exchange: row.get(2)?,
                routing_key: row.get(3)?,
                payload: row.get(4)?,
                content_type: p.content_type,
                message_id: p.message_id,
                correlation_id: p.correlation_id,
                headers: p.headers,
            };
            insert.execute(params![ns, encode_messages(&[&message])?])?;
        }
    }
    tx.execute("DROP TABLE outbox", [])?;
    tx.commit().context("migrating the outbox table")?;
    Ok(())
}

fn encode_messages(messages: &[&Outgoing]) -> Result<Vec<u8>> {
    postcard::to_stdvec(messages).context("encoding outbox messages")
}

fn decode_messages(bytes: &[u8]) -> Result<Vec<Outgoing>> {
    postcard::from_bytes(bytes).context("decoding outbox messages")
}

impl StateStore {
    /// Open (creating if needed) the store in directory `dir`, and hold it:
    /// one process at a time owns a state folder. A second host, or a
    /// `replay --state` on a running host's folder, gets a clear error
    /// instead of racing the owner's commits.
    pub fn open(dir: &Path, durability: Durability) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
        let path = dir.join("state.sqlite3");
        let conn = Connection::open(&path)
            .with_context(|| format!("opening state database {}", path.display()))?;
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        // Exclusive locking, set before WAL is entered: the lock is taken
        // once and held, so no transaction pays the file-lock system calls
        // and WAL needs no shared-memory index. It also makes the read
        // cache safe: nobody else can write the file while it is held.
        let owned = conn
            .busy_timeout(OWNER_WAIT)
            .and_then(|()| conn.pragma_update(None, "locking_mode", "EXCLUSIVE"))
            .and_then(|()| conn.pragma_update(None, "journal_mode", "WAL"))
            .and_then(|()| conn.pragma_update(None, "synchronous", sync))
            // A write takes the exclusive lock now, not at the first event.
            .and_then(|()| conn.execute_batch("BEGIN IMMEDIATE; COMMIT;"));
        match owned {
            Ok(()) => {}
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {
                anyhow::bail!(
                    "state database {} is in use by another process (another event-host, or a replay with --state, on the same folder)",
                    path.display()
                )
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("setting up state database {}", path.display()))
            }
        }
        Self::with_connection(conn, Some(path))
    }

    /// A private in-memory store (replay without `--state`, tests).
    pub fn in_memory() -> Result<Self> {
        Self::with_connection(Connection::open_in_memory()?, None)
    }

    fn with_connection(mut conn: Connection, path: Option<PathBuf>) -> Result<Self> {
        conn.execute_batch(SCHEMA)
            .context("creating state schema")?;
        migrate_legacy_outbox(&mut conn)?;
        let cache = ReadCache::over(&conn)?;
        Ok(Self {
            inner: Arc::new(Inner {
                staged: Mutex::new(HashMap::new()),
                confirmed_outbox: Mutex::new(Vec::new()),
                db: Mutex::new(Db { conn, cache }),
                path,
            }),
        })
    }

    /// The backend's name, for `/handlers` and `/metrics`: `sqlite` or
    /// `postgres`.
    pub fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    /// Whether other hosts can share this state (a fleet may consume one
    /// queue). Embedded state is this process's alone.
    pub fn is_shared(&self) -> bool {
        false
    }

    /// The database file, when on disk.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    fn db(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back on drop), so a poisoned lock is usable.
        // The cache is only updated after a commit succeeded, so it is too.
        self.inner.db.lock().unwrap_or_else(|p| p.into_inner())
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

    /// The value of `key` in namespace `ns`, as a handler call sees it:
    /// staged if an uncommitted event of the current batch wrote it, else
    /// committed (possibly from the cache; the commit validates it).
    pub fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        {
            let staged = self.inner.staged.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = staged.get(ns).and_then(|m| m.get(key)) {
                return Ok(v.clone());
            }
        }
        self.db().read(ns, key)
    }

    /// The committed value of `key`, ignoring anything staged.
    pub fn get_committed(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.db().read(ns, key)
    }

    /// Up to `limit` committed keys of `ns` after `after`, in key order.
    pub fn list_keys(&self, ns: &str, after: Option<&str>, limit: usize) -> Result<Vec<String>> {
        let db = self.db();
        let mut stmt = db.conn.prepare_cached(
            "SELECT key FROM kv WHERE ns = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![ns, after.unwrap_or(""), limit as i64], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
    }

    /// Whether an event with `message_id` already committed in `ns`.
    pub fn is_processed(&self, ns: &str, message_id: &str) -> Result<bool> {
        let db = self.db();
        let mut stmt = db
            .conn
            .prepare_cached("SELECT 1 FROM processed WHERE ns = ?1 AND message_id = ?2")?;
        Ok(stmt.exists(params![ns, message_id])?)
    }

    /// Commit a batch of events' transactions in one database transaction
    /// (one fsync for all of them). Each commit is validated and applied on
    /// its own: a conflict or duplicate skips that commit only.
    ///
    /// What reaches SQLite is the batch's net effect: each key written once
    /// with its last value, and one outbox row holding every message of
    /// the batch (the outcomes all name that row). Per event that leaves
    /// only the dedupe record, when the event has a message id.
    pub fn commit(&self, batch: &[Commit]) -> Result<Vec<CommitOutcome>> {
        let confirmed = self.take_confirmed();
        self.commit_with(batch, &confirmed).inspect_err(|_| {
            // Rolled back: the confirmed rows are still there, and still
            // to delete — not to relay again at the next reconnect.
            self.forget_outbox_later(confirmed.clone());
        })
    }

    fn commit_with(&self, batch: &[Commit], confirmed: &[i64]) -> Result<Vec<CommitOutcome>> {
        let mut db = self.db();
        let Db { conn, cache } = &mut *db;
        let tx = conn.transaction().context("starting state transaction")?;
        if !confirmed.is_empty() {
            let mut del = tx.prepare_cached("DELETE FROM outbox_batches WHERE id = ?1")?;
            for id in confirmed {
                del.execute(params![id])?;
            }
        }
        let now = unix_now();
        let mut outcomes = Vec::with_capacity(batch.len());
        // The batch's writes so far, by (namespace, key): what later
        // commits of the batch validate against, and what reaches SQLite.
        let mut written: HashMap<(&str, &str), Option<&[u8]>> = HashMap::new();
        // Per namespace: its messages, and which outcomes they came from.
        let mut outbox: Vec<(&str, Vec<&Outgoing>, Vec<usize>)> = Vec::new();
        {
            let mut seen =
                tx.prepare_cached("SELECT 1 FROM processed WHERE ns = ?1 AND message_id = ?2")?;
            let mut mark = tx
                .prepare_cached("INSERT INTO processed (ns, message_id, at) VALUES (?1, ?2, ?3)")?;
            'commits: for commit in batch {
                if let Some(id) = &commit.message_id {
                    if seen.exists(params![commit.ns, id])? {
                        outcomes.push(CommitOutcome::Duplicate);
                        continue;
                    }
                }
                for (key, expected) in &commit.reads {
                    let current = match written.get(&(commit.ns.as_str(), key.as_str())) {
                        Some(v) => v.map(<[u8]>::to_vec),
                        None => cache.read(&tx, &commit.ns, key)?,
                    };
                    if &current != expected {
                        outcomes.push(CommitOutcome::Conflict { key: key.clone() });
                        continue 'commits;
                    }
                }
                for (key, value) in &commit.writes {
                    written.insert((&commit.ns, key), value.as_deref());
                }
                if let Some(id) = &commit.message_id {
                    mark.execute(params![commit.ns, id, now])?;
                }
                if !commit.outbox.is_empty() {
                    let group = match outbox.iter().position(|(ns, ..)| *ns == commit.ns) {
                        Some(i) => &mut outbox[i],
                        None => {
                            outbox.push((&commit.ns, Vec::new(), Vec::new()));
                            outbox.last_mut().expect("just pushed")
                        }
                    };
                    group.1.extend(&commit.outbox);
                    group.2.push(outcomes.len());
                }
                outcomes.push(CommitOutcome::Committed {
                    outbox_ids: Vec::new(),
                });
            }
            let mut put = tx.prepare_cached(
                "INSERT INTO kv (ns, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM kv WHERE ns = ?1 AND key = ?2")?;
            for ((ns, key), value) in &written {
                match value {
                    Some(v) => put.execute(params![ns, key, v])?,
                    None => del.execute(params![ns, key])?,
                };
            }
        }
        for (ns, messages, from) in outbox {
            tx.prepare_cached("INSERT INTO outbox_batches (ns, messages) VALUES (?1, ?2)")?
                .execute(params![ns, encode_messages(&messages)?])?;
            let row = tx.last_insert_rowid();
            for index in from {
                outcomes[index] = CommitOutcome::Committed {
                    outbox_ids: vec![row],
                };
            }
        }
        tx.commit().context("committing state transaction")?;
        for ((ns, key), value) in written {
            cache.committed(ns, key, value);
        }
        Ok(outcomes)
    }

    /// Outbox messages not yet confirmed published (after a crash, for
    /// example), in publish order, each with its outbox row (one row holds
    /// a committed batch's messages) and namespace.
    pub fn pending_outbox(&self) -> Result<Vec<(i64, String, Outgoing)>> {
        let db = self.db();
        let mut stmt = db
            .conn
            .prepare_cached("SELECT id, ns, messages FROM outbox_batches ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, ns, messages) = row?;
            let messages =
                decode_messages(&messages).with_context(|| format!("outbox row {id}"))?;
            out.extend(messages.into_iter().map(|m| (id, ns.clone(), m)));
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
        let mut db = self.db();
        let tx = db.conn.transaction()?;
        {
            let mut del = tx.prepare_cached("DELETE FROM outbox_batches WHERE id = ?1")?;
            for id in ids {
                del.execute(params![id])?;
            }
        }
        tx.commit().context("clearing outbox")?;
        Ok(())
    }

    /// Drop dedupe records older than `max_age_secs`; they only need to
    /// outlive any redelivery of their message. Deletes in chunks of
    /// [`PRUNE_CHUNK`] rows, each its own transaction, so events committing
    /// meanwhile wait for one chunk at most, never for the whole table.
    /// Returns how many records were dropped.
    pub fn prune_processed(&self, max_age_secs: i64) -> Result<usize> {
        self.prune_processed_before(unix_now().saturating_sub(max_age_secs))
    }

    fn prune_processed_before(&self, cutoff: i64) -> Result<usize> {
        let mut total = 0;
        loop {
            let n = self
                .db()
                .conn
                .prepare_cached(
                    "DELETE FROM processed WHERE (ns, message_id) IN \
                     (SELECT ns, message_id FROM processed WHERE at < ?1 LIMIT ?2)",
                )?
                .execute(params![cutoff, PRUNE_CHUNK as i64])
                .context("pruning dedupe records")?;
            total += n;
            if n < PRUNE_CHUNK {
                return Ok(total);
            }
        }
    }

    /// The host's 32-byte secret (it keys the retry copies' signatures):
    /// random, made on first use and kept in the `meta` table, so a
    /// restarted host still trusts its predecessor's retry copies.
    pub fn host_secret(&self) -> Result<[u8; 32]> {
        let db = self.db();
        db.conn
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS meta (
                    key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
            )
            .context("creating the meta table")?;
        let stored: Option<Vec<u8>> = db
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'host-secret'",
                [],
                |r| r.get(0),
            )
            .optional()
            .context("reading the host secret")?;
        if let Some(secret) = stored.and_then(|s| <[u8; 32]>::try_from(s).ok()) {
            return Ok(secret);
        }
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret)
            .map_err(|e| anyhow::anyhow!("generating the host secret: {e}"))?;
        db.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('host-secret', ?1)",
                params![secret.to_vec()],
            )
            .context("storing the host secret")?;
        Ok(secret)
    }
}

/// Dedupe records deleted per transaction when pruning.
const PRUNE_CHUNK: usize = 10_000;

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
    fn old_dedupe_records_are_pruned_and_fresh_ones_kept() -> Result<()> {
        let store = StateStore::in_memory()?;
        store.commit(&[commit_of(Txn::default(), Some("fresh"))])?;
        // A record from eight days ago.
        store.db().conn.execute(
            "INSERT INTO processed (ns, message_id, at) VALUES ('h', 'old', ?1)",
            params![unix_now() - 8 * 24 * 3600],
        )?;
        assert_eq!(store.prune_processed(7 * 24 * 3600)?, 1);
        assert!(!store.is_processed("h", "old")?);
        assert!(store.is_processed("h", "fresh")?);
        // More than one chunk.
        {
            let db = store.db();
            let mut insert = db
                .conn
                .prepare("INSERT INTO processed (ns, message_id, at) VALUES ('h', ?1, 0)")?;
            for i in 0..PRUNE_CHUNK + 5 {
                insert.execute(params![format!("old-{i}")])?;
            }
        }
        assert_eq!(store.prune_processed(60)?, PRUNE_CHUNK + 5);
        assert!(store.is_processed("h", "fresh")?);
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

    fn committed_row(outcome: &CommitOutcome) -> i64 {
        match outcome {
            CommitOutcome::Committed { outbox_ids } if outbox_ids.len() == 1 => outbox_ids[0],
            other => panic!("expected one outbox row, got {other:?}"),
        }
    }

    fn message(n: u8) -> Outgoing {
        Outgoing {
            payload: vec![n],
            ..outgoing()
        }
    }

    #[test]
    fn a_batch_writes_its_net_effect_and_one_outbox_row() -> Result<()> {
        let store = StateStore::in_memory()?;
        let mut commits = Vec::new();
        for n in 1..=3u8 {
            let mut txn = Txn::default();
            txn.get(&store, "h", "c")?;
            txn.set("c", vec![n]);
            let commit = txn.into_commit("h", None, vec![message(n)]);
            store.stage("h", &commit.writes);
            commits.push(commit);
        }
        let out = store.commit(&commits)?;
        store.unstage("h");
        let row = committed_row(&out[0]);
        assert!(out.iter().all(|o| committed_row(o) == row), "{out:?}");
        assert_eq!(store.get("h", "c")?, Some(vec![3]));
        let pending = store.pending_outbox()?;
        let payloads: Vec<_> = pending.iter().map(|(_, _, m)| m.payload[0]).collect();
        assert_eq!(payloads, [1, 2, 3], "every message, in order");
        assert!(pending.iter().all(|(id, ns, _)| *id == row && ns == "h"));
        // The events share the row: confirming them all clears it once.
        store.forget_outbox_later(vec![row, row, row]);
        store.commit(&[])?;
        assert!(store.pending_outbox()?.is_empty());
        Ok(())
    }

    fn sqlite_reads(store: &StateStore) -> u64 {
        store.db().cache.sqlite_reads
    }

    #[test]
    fn absent_keys_cost_no_sqlite_read_and_present_ones_are_never_missed() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = StateStore::open(dir.path(), Durability::Normal)?;
        let mut txn = Txn::default();
        for i in 0..1000 {
            txn.set(&format!("order.{i}"), b"reserved".to_vec());
        }
        txn.set("gone", b"x".to_vec());
        store.commit(&[commit_of(txn, None)])?;
        let mut txn = Txn::default();
        txn.delete("gone");
        store.commit(&[commit_of(txn, None)])?;
        drop(store);

        // Reopened: the filter is rebuilt from the table, and the read
        // cache starts empty, so every answer below is the filter's or
        // SQLite's.
        let store = StateStore::open(dir.path(), Durability::Normal)?;
        let before = sqlite_reads(&store);
        for i in 1000..11_000 {
            assert_eq!(store.get("h", &format!("order.{i}"))?, None);
        }
        let misses = sqlite_reads(&store) - before;
        assert!(
            misses < 500,
            "10000 never-written keys took {misses} SQLite reads (1% false positives expected)"
        );
        for i in 0..1000 {
            assert_eq!(
                store.get("h", &format!("order.{i}"))?.as_deref(),
                Some(&b"reserved"[..]),
                "order.{i} was committed"
            );
            assert_eq!(store.get("other", &format!("order.{i}"))?, None);
        }
        assert_eq!(store.get("h", "gone")?, None, "a deleted key stays deleted");

        // Written after the open: found too, in this process and the next.
        let mut txn = Txn::default();
        txn.set("late", b"1".to_vec());
        store.commit(&[commit_of(txn, None)])?;
        // As after the cache starts over at its bound: the filter alone
        // must still say "maybe".
        store.db().cache.entries.clear();
        assert_eq!(store.get("h", "late")?.as_deref(), Some(&b"1"[..]));
        drop(store);
        let store = StateStore::open(dir.path(), Durability::Normal)?;
        assert_eq!(store.get("h", "late")?.as_deref(), Some(&b"1"[..]));
        Ok(())
    }

    #[test]
    fn one_process_at_a_time_owns_a_state_folder() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let owner = StateStore::open(dir.path(), Durability::Normal)?;
        // A second owner (another host, a replay --state) would commit
        // behind the first one's read cache: it is refused, clearly.
        let err = StateStore::open(dir.path(), Durability::Normal)
            .err()
            .expect("a second owner must be refused");
        assert!(
            format!("{err:#}").contains("in use by another process"),
            "{err:#}"
        );
        drop(owner);
        // Released with the owner: the next one opens it.
        StateStore::open(dir.path(), Durability::Normal)?;
        Ok(())
    }

    #[test]
    fn outbox_rows_of_the_per_message_table_are_carried_over() -> Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let conn = Connection::open(dir.path().join("state.sqlite3"))?;
            conn.execute_batch(
                "CREATE TABLE outbox (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, exchange TEXT NOT NULL,
                    routing_key TEXT NOT NULL, payload BLOB NOT NULL, properties TEXT NOT NULL);
                 INSERT INTO outbox (ns, exchange, routing_key, payload, properties) VALUES
                    ('h', 'x', 'k', X'7B7D',
                     '{\"content_type\":null,\"message_id\":\"id\",\"correlation_id\":null,\"headers\":[[\"h\",\"v\"]]}');",
            )?;
        }
        let store = StateStore::open(dir.path(), Durability::Normal)?;
        let pending = store.pending_outbox()?;
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].2, outgoing());
        drop(store);
        // Migrated once: reopening finds no legacy table to carry again.
        let store = StateStore::open(dir.path(), Durability::Normal)?;
        assert_eq!(store.pending_outbox()?.len(), 1);
        Ok(())
    }

    #[test]
    fn a_failed_commit_keeps_the_confirmed_rows_to_delete() -> Result<()> {
        let store = StateStore::in_memory()?;
        let out = store.commit(&[Txn::default().into_commit("h", None, vec![message(1)])])?;
        let row = committed_row(&out[0]);
        store.forget_outbox_later(vec![row]);
        // Break the next commit's write.
        store.db().conn.execute_batch("DROP TABLE kv")?;
        let mut txn = Txn::default();
        txn.set("k", b"v".to_vec());
        assert!(store
            .commit(&[txn.into_commit("h", None, Vec::new())])
            .is_err());
        assert_eq!(store.take_confirmed(), [row], "still owed a delete");
        Ok(())
    }
}
