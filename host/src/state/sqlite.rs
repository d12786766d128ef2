//! Embedded state: one SQLite file in WAL mode, this process's alone.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::cache::ReadCache;
use super::{
    decode_messages, encode_messages, new_secret, Backend, Commit, CommitOutcome, Durability,
    Outgoing, Owed, PendingMessage, Plan, PRUNE_CHUNK,
};

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

/// How long opening the store waits for another process to release it
/// (a host restarting while its predecessor exits).
const OWNER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The embedded state store (SQLite in WAL mode).
pub(crate) struct Sqlite {
    /// One connection: SQLite serialises writers anyway, and reads are point
    /// lookups on a primary key, far cheaper than the lock round trip a
    /// second connection would save.
    db: Mutex<Db>,
    path: Option<PathBuf>,
}

/// The connection and what this process knows of the committed state.
pub(super) struct Db {
    pub(super) conn: Connection,
    pub(super) cache: ReadCache,
}

impl Db {
    /// The committed value of `key` (see [`ReadCache::read`]).
    fn read(&mut self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.cache.read(&self.conn, ns, key)
    }
}

pub(super) fn read_kv(conn: &Connection, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
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

impl Sqlite {
    /// Open (creating if needed) the store in directory `dir`, and hold it:
    /// one process at a time owns a state folder.
    pub(super) fn open(dir: &Path, durability: Durability) -> Result<Self> {
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

    /// A private in-memory store.
    pub(super) fn in_memory() -> Result<Self> {
        Self::with_connection(Connection::open_in_memory()?, None)
    }

    fn with_connection(mut conn: Connection, path: Option<PathBuf>) -> Result<Self> {
        conn.execute_batch(SCHEMA)
            .context("creating state schema")?;
        migrate_legacy_outbox(&mut conn)?;
        let cache = ReadCache::over(&conn)?;
        Ok(Self {
            db: Mutex::new(Db { conn, cache }),
            path,
        })
    }

    pub(super) fn db(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back on drop), so a poisoned lock is usable.
        // The cache is only updated after a commit succeeded, so it is too.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    #[cfg(test)]
    fn as_sqlite(&self) -> Option<&Sqlite> {
        Some(self)
    }

    fn shared(&self) -> bool {
        false
    }

    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn read(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.db().read(ns, key)
    }

    fn read_committed(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.db().read(ns, key)
    }

    fn list_keys(&self, ns: &str, after: Option<&str>, limit: usize) -> Result<Vec<String>> {
        let db = self.db();
        let mut stmt = db.conn.prepare_cached(
            "SELECT key FROM kv WHERE ns = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![ns, after.unwrap_or(""), limit as i64], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
    }

    fn is_processed(&self, ns: &str, message_id: &str) -> Result<bool> {
        let db = self.db();
        let mut stmt = db
            .conn
            .prepare_cached("SELECT 1 FROM processed WHERE ns = ?1 AND message_id = ?2")?;
        Ok(stmt.exists(params![ns, message_id])?)
    }

    fn commit(&self, batch: &[Commit], confirmed: &[i64]) -> Result<Vec<CommitOutcome>> {
        let mut db = self.db();
        let Db { conn, cache } = &mut *db;
        let tx = conn.transaction().context("starting state transaction")?;
        if !confirmed.is_empty() {
            let mut del = tx.prepare_cached("DELETE FROM outbox_batches WHERE id = ?1")?;
            for id in confirmed {
                del.execute(params![id])?;
            }
        }
        let now = super::unix_now();
        let mut plan = {
            let mut seen =
                tx.prepare_cached("SELECT 1 FROM processed WHERE ns = ?1 AND message_id = ?2")?;
            Plan::new(
                batch,
                |ns, id| Ok(seen.exists(params![ns, id])?),
                |ns, key| cache.read(&tx, ns, key),
            )?
        };
        {
            let mut mark = tx
                .prepare_cached("INSERT INTO processed (ns, message_id, at) VALUES (?1, ?2, ?3)")?;
            for (ns, id) in &plan.marks {
                mark.execute(params![ns, id, now])?;
            }
            let mut put = tx.prepare_cached(
                "INSERT INTO kv (ns, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM kv WHERE ns = ?1 AND key = ?2")?;
            for ((ns, key), value) in &plan.written {
                match value {
                    Some(v) => put.execute(params![ns, key, v])?,
                    None => del.execute(params![ns, key])?,
                };
            }
        }
        for group in 0..plan.outbox.len() {
            let (ns, messages, _) = &plan.outbox[group];
            tx.prepare_cached("INSERT INTO outbox_batches (ns, messages) VALUES (?1, ?2)")?
                .execute(params![ns, encode_messages(messages)?])?;
            let row = tx.last_insert_rowid();
            plan.outbox_row(group, row);
        }
        tx.commit().context("committing state transaction")?;
        for ((ns, key), value) in plan.written {
            cache.committed(ns, key, value);
        }
        Ok(plan.outcomes)
    }

    fn end_batch(&self, _ns: &str) {
        // Nothing is held between a batch's reads and its commit: the one
        // writer is this process, and the commit validates the reads.
    }

    fn pending_outbox(&self, owed: Owed) -> Result<Vec<PendingMessage>> {
        if owed == Owed::Orphaned {
            // No other host writes this file.
            return Ok(Vec::new());
        }
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

    fn clear_outbox(&self, ids: &[i64]) -> Result<()> {
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

    fn host_secret(&self) -> Result<[u8; 32]> {
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
        let secret = new_secret()?;
        db.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('host-secret', ?1)",
                params![secret.to_vec()],
            )
            .context("storing the host secret")?;
        Ok(secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{unix_now, StateStore, Txn};

    /// The SQLite backend behind `store`, for its internals.
    fn db(store: &StateStore) -> MutexGuard<'_, Db> {
        store
            .inner
            .backend
            .as_sqlite()
            .expect("an embedded store")
            .db()
    }

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
        db(&store).conn.execute(
            "INSERT INTO processed (ns, message_id, at) VALUES ('h', 'old', ?1)",
            params![unix_now() - 8 * 24 * 3600],
        )?;
        assert_eq!(store.prune_processed(7 * 24 * 3600)?, 1);
        assert!(!store.is_processed("h", "old")?);
        assert!(store.is_processed("h", "fresh")?);
        // More than one chunk.
        {
            let db = db(&store);
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
        store.end_batch("h");
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
        store.end_batch("h");
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
        db(store).cache.sqlite_reads
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
        db(&store).cache.entries.clear();
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
        db(&store).conn.execute_batch("DROP TABLE kv")?;
        let mut txn = Txn::default();
        txn.set("k", b"v".to_vec());
        assert!(store
            .commit(&[txn.into_commit("h", None, Vec::new())])
            .is_err());
        assert_eq!(store.take_confirmed(), [row], "still owed a delete");
        Ok(())
    }
}
