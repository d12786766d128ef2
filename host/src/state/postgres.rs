//! Shared state on PostgreSQL: one database, a fleet of hosts.
//!
//! A batch of one handler's events runs inside one PostgreSQL
//! transaction, on one connection, from its first state read to its
//! commit. Every committed key a handler reads is read `FOR UPDATE`: the
//! row stays locked until the batch commits, so another host wanting the
//! same key waits for this batch instead of racing it. Two hosts therefore
//! never lose an update, and a hot key (a stock level every order
//! touches) costs the fleet a short wait per batch, not a storm of
//! re-runs. What a lock cannot protect — a key read as absent, which two
//! hosts may both insert; a message id two hosts commit at once; a
//! deadlock between two batches locking keys in opposite orders — ends
//! the transaction with an error PostgreSQL reports by code, and the
//! events run again (see [`Contended`]).
//!
//! The commit sends every statement at once (tokio-postgres pipelines the
//! requests of one connection): the check of keys the batch read without
//! locking them, its net writes, its dedupe records, its outbox row and
//! `COMMIT` cost one round trip. It runs on the
//! handler's commit thread ([`Backend::detach_commit`]) while the handler's next
//! batch, on another connection, reads ahead and runs its events: those
//! see what the committing batch left through the store's committing
//! layer (see `StateStore::commit_in_background`), and lock those keys
//! only at their own commit.
//!
//! Nothing is cached across batches: another host may change any key
//! between two of this host's batches.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use foldhash::{HashMap, HashMapExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, Statement};

use super::{
    decode_messages, encode_messages, new_secret, Backend, Commit, CommitJob, CommitOutcome,
    Contended, Owed, PendingMessage, Plan, PRUNE_CHUNK,
};

/// How long another host's claim on its outbox rows lasts, in seconds.
/// Rows still there after it (their host died between commit and
/// confirm, or has been cut off from the broker that long) are claimed
/// and published by a live host. Longer delays a dead host's messages;
/// shorter makes a live but slow host's messages more likely to be
/// published twice (with the same message ids).
pub const OUTBOX_CLAIM_SECS: i64 = 30;

/// How long a state read waits for a row another host's batch holds
/// before the event is run again. Batches hold rows for their run time
/// (bounded by the handlers' deadlines).
const LOCK_TIMEOUT: &str = "10s";

/// Longest a connection may sit in an open transaction between two
/// statements before PostgreSQL ends it, releasing its locks: a host
/// frozen mid-batch (SIGSTOP, a partition) must not hold a hot key for
/// ever.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "300s";

/// Idle connections kept for reuse.
const MAX_IDLE: usize = 16;

/// Largest value a batch's read-ahead keeps in memory for its guests
/// (`read_ahead`); a larger one is locked with the rest but read when a
/// guest asks. With [`crate::read_ahead::MAX_KEYS_PER_BATCH`] it bounds
/// what one batch holds on a hint: 512 × 16 KiB = 8 MiB.
const READ_AHEAD_VALUE_BYTES: i32 = 16 * 1024;

/// The schema's version history: statement `i` brings the schema from
/// version `i` to `i + 1`. Append, never edit.
///
/// Keys and message ids are stored as bytes: a guest's key or a
/// publisher's message id may hold NUL, which PostgreSQL `text` refuses,
/// and bytes order as SQLite orders keys (bytewise, whatever the
/// database's collation), so listings page alike on both backends.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE kv (
        ns text NOT NULL, key bytea NOT NULL, value bytea NOT NULL,
        PRIMARY KEY (ns, key));
    CREATE TABLE processed (
        ns text NOT NULL, message_id bytea NOT NULL, at bigint NOT NULL,
        PRIMARY KEY (ns, message_id));
    CREATE INDEX processed_at ON processed (at);
    CREATE TABLE outbox (
        id bigserial PRIMARY KEY, ns text NOT NULL, messages bytea NOT NULL,
        claimed_by text NOT NULL, claimed_at timestamptz NOT NULL DEFAULT now());
",
    "
    CREATE FUNCTION still_absent(p_ns text, p_keys bytea[]) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE found boolean;
    BEGIN
        -- EXECUTE: planned with the keys each call (a cached generic plan
        -- would scan the whole namespace, see Typed in postgres.rs).
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM kv WHERE ns = $1 AND key = ANY($2))'
            INTO found USING p_ns, p_keys;
        IF found THEN
            RAISE EXCEPTION 'a key read as absent was created by another host'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END $$;
",
    // Key by key: `key = ANY(...)` over many keys of a table PostgreSQL
    // has no statistics for yet is planned as a scan of the namespace
    // (see `Typed`).
    "
    CREATE OR REPLACE FUNCTION still_absent(p_ns text, p_keys bytea[]) RETURNS void
    LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM unnest(p_keys) AS u(k),
                   LATERAL (SELECT 1 FROM kv WHERE ns = p_ns AND key = u.k OFFSET 0) r) THEN
            RAISE EXCEPTION 'a key read as absent was created by another host'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END $$;
    CREATE OR REPLACE FUNCTION delete_keys(p_ns text, p_keys bytea[]) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE k bytea;
    BEGIN
        FOREACH k IN ARRAY p_keys LOOP
            DELETE FROM kv WHERE ns = p_ns AND key = k;
        END LOOP;
    END $$;
",
    // A commit's check of the keys its batch read without locking them:
    // lock each (in the array's order) and fail the transaction, as
    // contention, if one no longer holds what the batch read (NULL:
    // absent). Sent with the commit's writes, not a round trip before them.
    "
    CREATE OR REPLACE FUNCTION still_read(p_ns text, p_keys bytea[], p_values bytea[]) RETURNS void
    LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM unnest(p_keys, p_values) AS u(k, v)
                   LEFT JOIN LATERAL (SELECT value FROM kv WHERE ns = p_ns AND key = u.k
                                      FOR UPDATE) r ON true
                   WHERE r.value IS DISTINCT FROM u.v) THEN
            RAISE EXCEPTION 'a key the batch read was changed by another host'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END $$;
",
];

/// `url` with its password replaced by `***` (URL and key=value forms),
/// for logs and errors.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let shown = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            let tail = redact_query(tail);
            return format!("{scheme}://{shown}@{host}{tail}");
        }
        return format!("{scheme}://{authority}{}", redact_query(tail));
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let query = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{path}?{query}")
}

/// A schema name that needs no quoting surprises: lowercase ASCII
/// letters, digits and `_`, not starting with a digit, at most 63 bytes
/// (PostgreSQL's identifier limit).
fn check_schema(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if !ok {
        bail!("state_schema {schema:?}: use 1 to 63 lowercase letters, digits and _, not starting with a digit");
    }
    Ok(())
}

/// The hot path's SQL, in the order of [`Statements`]' fields: prepared
/// once per connection. Statements that find rows by `= ANY($n)` are not
/// among them: they are [`MANY`].
const HOT_PATH_SQL: [&str; 10] = [
    "SELECT value FROM kv WHERE ns = $1 AND key = $2 FOR UPDATE",
    "SELECT value FROM kv WHERE ns = $1 AND key = $2",
    "SELECT key FROM kv WHERE ns = $1 AND key > $2 ORDER BY key LIMIT $3",
    "SELECT 1 FROM processed WHERE ns = $1 AND message_id = $2",
    "SELECT still_absent($1, $2::bytea[])",
    "SELECT still_read($1, $2::bytea[], $3::bytea[])",
    "INSERT INTO kv (ns, key, value)
     SELECT $1, k, v FROM unnest($2::bytea[], $3::bytea[]) AS u(k, v)",
    "INSERT INTO kv (ns, key, value)
     SELECT $1, k, v FROM unnest($2::bytea[], $3::bytea[]) AS u(k, v)
     ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value",
    "INSERT INTO processed (ns, message_id, at)
     SELECT $1, id, $3 FROM unnest($2::bytea[]) AS u(id)",
    "INSERT INTO outbox (ns, messages, claimed_by) VALUES ($1, $2, $3) RETURNING id",
];

/// A statement over many keys or ids, prepared with its parameter types
/// (as [`MANY`] lists them) on every connection.
///
/// The statements over many keys of a namespace look each key up on its
/// own (a `LATERAL` subquery per element of the array), so every lookup is
/// the primary key's whatever the planner knows of the table. Written as
/// `ns = $1 AND key = ANY($2)`, PostgreSQL finds the rows by the index on
/// `ns` alone and filters on the key — a scan of the whole namespace per
/// batch — both with a generic plan (prepared while the table was small)
/// and, for more than a few keys, with a fresh plan on a table not yet
/// analysed, as a new fleet's is for its first minutes (the fleet bench
/// saw 40–400 µs of PostgreSQL CPU per event from it).
struct Typed {
    sql: &'static str,
    types: &'static [Type],
}

/// Lock and read keys `$2` of namespace `$1`, in the array's order (the
/// callers sort the keys, so two hosts lock shared keys in one order).
const LOCK_MANY: Typed = Typed {
    sql: "SELECT r.key, r.value FROM unnest($2::bytea[]) AS u(k),
          LATERAL (SELECT key, value FROM kv WHERE ns = $1 AND key = u.k FOR UPDATE) r",
    types: &[Type::TEXT, Type::BYTEA_ARRAY],
};

/// [`LOCK_MANY`], keeping only values up to `$3` bytes (the third column
/// says whether the value came).
const READ_AHEAD: Typed = Typed {
    sql: "SELECT r.key, CASE WHEN octet_length(r.value) <= $3 THEN r.value END,
                 octet_length(r.value) <= $3
          FROM unnest($2::bytea[]) AS u(k),
          LATERAL (SELECT key, value FROM kv WHERE ns = $1 AND key = u.k FOR UPDATE) r",
    types: &[Type::TEXT, Type::BYTEA_ARRAY, Type::INT4],
};

const PROCESSED_MANY: Typed = Typed {
    sql: "SELECT r.message_id FROM unnest($2::bytea[]) AS u(id),
          LATERAL (SELECT message_id FROM processed
                   WHERE ns = $1 AND message_id = u.id OFFSET 0) r",
    types: &[Type::TEXT, Type::BYTEA_ARRAY],
};

/// `delete_keys` deletes key by key (see the migrations).
const DELETE_MANY: Typed = Typed {
    sql: "SELECT delete_keys($1, $2::bytea[])",
    types: &[Type::TEXT, Type::BYTEA_ARRAY],
};

const OUTBOX_DELETE: Typed = Typed {
    sql: "DELETE FROM outbox WHERE id = ANY($1)",
    types: &[Type::INT8_ARRAY],
};

/// Every [`Typed`] statement, in [`Many`]'s order, prepared on each
/// connection. Their plans do not depend on the keys (each is looked up
/// by the primary key), so a generic plan is as good as a fresh one,
/// without planning per batch.
const MANY: [&Typed; 5] = [
    &LOCK_MANY,
    &READ_AHEAD,
    &PROCESSED_MANY,
    &DELETE_MANY,
    &OUTBOX_DELETE,
];

/// Which of [`MANY`].
#[derive(Clone, Copy)]
enum Many {
    Lock = 0,
    ReadAhead = 1,
    Processed = 2,
    Delete = 3,
    OutboxDelete = 4,
}

/// One statement of the hot path.
#[derive(Clone, Copy)]
enum Sql {
    Prepared(fn(&Statements) -> &Statement),
    Many(Many),
}

/// The statements of the hot path, prepared once per connection.
struct Statements {
    read_for_update: Statement,
    read: Statement,
    list: Statement,
    processed: Statement,
    still_absent: Statement,
    still_read: Statement,
    insert_new: Statement,
    upsert: Statement,
    mark: Statement,
    outbox_insert: Statement,
}

/// A connection and its prepared statements.
struct Conn {
    client: Client,
    st: Statements,
    /// The [`MANY`] statements, in its order.
    many: Vec<Statement>,
    io: Io,
}

/// The connection's socket I/O, driven by the thread that waits on one of
/// its queries ([`Conn::wait`]) on a runtime of the connection's own, not
/// by a task on an I/O thread: a round trip then wakes one thread (the
/// waiting one) instead of handing the request and the answer across two
/// more, which on a loaded host is most of what a round trip costs (see
/// BENCHMARKS.md, the fleet bench's round-trip probe).
struct Io {
    /// A current-thread runtime; `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    /// `tokio_postgres::Connection`, until it ends.
    connection: Mutex<Option<Connection>>,
}

type Connection = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

impl Drop for Io {
    fn drop(&mut self) {
        // The socket first, while its runtime is there; then the runtime,
        // without blocking (the last clone of the store may be dropped
        // inside the host's runtime, where blocking is refused).
        drop(
            self.connection
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Io {
    /// Run `f` to completion on this thread, driving the connection
    /// meanwhile. Callers are plain threads (the dispatchers, the commit
    /// threads, `spawn_blocking`), never an async task: the store's
    /// contract (see [`super::Backend`]).
    fn wait<F: Future>(&self, f: F) -> F::Output {
        let Some(rt) = self.rt.as_ref() else {
            unreachable!("a connection's runtime outlives it");
        };
        let mut connection = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        rt.block_on(async {
            let mut f = std::pin::pin!(f);
            loop {
                let Some(driving) = connection.as_mut() else {
                    // Ended: the query fails by itself (the client sees
                    // the connection closed).
                    return f.await;
                };
                match futures_util::future::select(f.as_mut(), driving.as_mut()).await {
                    futures_util::future::Either::Left((out, _)) => return out,
                    futures_util::future::Either::Right((ended, _)) => {
                        if let Err(e) = ended {
                            tracing::warn!(
                                "state database connection ended: {:#}",
                                anyhow::Error::new(e)
                            );
                        }
                        *connection = None;
                    }
                }
            }
        })
    }

    /// Whether the connection is still up, as far as it can tell without
    /// waiting (the server may have closed it while it sat idle).
    fn alive(&self) -> bool {
        let Some(rt) = self.rt.as_ref() else {
            return false;
        };
        let mut connection = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        rt.block_on(async {
            // Once round the runtime first, so the socket's news (an
            // end of file) reaches the connection.
            tokio::task::yield_now().await;
            if let Some(driving) = connection.as_mut() {
                let polled =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(driving.as_mut().poll(cx)))
                        .await;
                if let std::task::Poll::Ready(ended) = polled {
                    if let Err(e) = ended {
                        tracing::warn!(
                            "state database connection ended: {:#}",
                            anyhow::Error::new(e)
                        );
                    }
                    *connection = None;
                }
            }
        });
        connection.is_some()
    }
}

impl Conn {
    fn wait<F: Future>(&self, f: F) -> F::Output {
        self.io.wait(f)
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed() || !self.io.alive()
    }
}

impl Conn {
    /// Send one statement (the request goes out when first polled: send
    /// several and await them together to pipeline them).
    fn send<'a>(&'a self, sql: Sql, params: &'a [&'a (dyn ToSql + Sync)]) -> Query<'a> {
        match sql {
            Sql::Prepared(statement) => Box::pin(self.client.query(statement(&self.st), params)),
            Sql::Many(many) => Box::pin(self.client.query(&self.many[many as usize], params)),
        }
    }
}

/// One handler's batch in progress: its connection, inside a transaction
/// once anything was read.
struct Batch {
    conn: Conn,
    /// `BEGIN` was sent.
    open: bool,
    /// Keys read so far, locked until the batch ends, with their values
    /// (`None`: absent — not locked, which is why inserting one is checked).
    locked: HashMap<String, Option<Vec<u8>>>,
    /// A statement failed: the transaction is aborted, every later read
    /// and the commit report contention, and the events run again.
    failed: Option<String>,
    /// Dedupe answers read ahead for the batch: message id → committed.
    /// Read inside the transaction, as the per-event check would be;
    /// another host committing one of them meanwhile is caught by the
    /// processed table's key at commit.
    processed: HashMap<String, bool>,
}

impl Batch {
    /// A batch on `conn`, not begun.
    fn new(conn: Conn) -> Self {
        Self {
            conn,
            open: false,
            locked: HashMap::new(),
            failed: None,
            processed: HashMap::new(),
        }
    }
}

/// The one namespace a shared-state commit is for (`None`: an empty one).
fn batch_ns(commits: &[Commit]) -> Result<Option<&str>> {
    let Some(first) = commits.first() else {
        return Ok(None);
    };
    let ns = first.ns.as_str();
    if commits.iter().any(|c| c.ns != ns) {
        bail!("a shared-state commit holds one handler's events");
    }
    Ok(Some(ns))
}

/// Shared state on PostgreSQL.
pub(super) struct Postgres {
    config: tokio_postgres::Config,
    schema: String,
    host_id: String,
    /// The URL without its password, for errors.
    shown: String,
    /// Runs the I/O of the connection that migrates the schema (the hot
    /// path's connections drive their own, see [`Io`]). Its own, because
    /// the store is used from plain threads (the dispatchers, `replay`) as
    /// well as from the host's runtime; `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    idle: Mutex<Vec<Conn>>,
    /// Open batches, by handler namespace (one batch per handler at a
    /// time, as the dispatcher runs them).
    batches: Mutex<HashMap<String, Batch>>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which tokio refuses inside another
        // runtime; the last clone of the store may go there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A key or message id read back from its `bytea` column (written from a
/// Rust string, so UTF-8 unless someone else wrote the row).
fn text_of(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Whether a failed statement means "another host got there first": the
/// events run again instead of failing.
fn contended(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::UNIQUE_VIOLATION
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::LOCK_NOT_AVAILABLE
            || *c == SqlState::IN_FAILED_SQL_TRANSACTION
    )
}

/// Run a client future to completion on this thread. The connection's
/// I/O runs on the store's runtime; the client side is plain channels,
/// so any thread may wait on it.
fn wait<F: Future>(f: F) -> F::Output {
    futures_executor::block_on(f)
}

type Query<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + 'a>>;

impl Postgres {
    /// The store, before anything is sent to the database.
    fn unmigrated(url: &str, schema: &str, host_id: &str) -> Result<Self> {
        let shown = redact_url(url);
        check_schema(schema)?;
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| anyhow!("state_url {shown}: {e}"))?;
        config.application_name(format!("event-host {host_id}"));
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        config.keepalives_idle(std::time::Duration::from_secs(30));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("state-postgres")
            .enable_all()
            .build()
            .context("starting the PostgreSQL I/O thread")?;
        Ok(Self {
            config,
            schema: schema.to_owned(),
            host_id: host_id.to_owned(),
            shown,
            rt: Some(rt),
            idle: Mutex::new(Vec::new()),
            batches: Mutex::new(HashMap::new()),
        })
    }

    /// Connect, create or migrate the schema, and check the connection
    /// works. The password never appears in an error.
    pub(super) fn connect(url: &str, schema: &str, host_id: &str) -> Result<Self> {
        let store = Self::unmigrated(url, schema, host_id)?;
        store.migrate()?;
        let conn = store.conn()?;
        store.put(conn);
        Ok(store)
    }

    /// A raw client, its I/O spawned on the store's runtime.
    fn client(&self) -> Result<Client> {
        let rt = self.rt.as_ref().context("state store is shutting down")?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let config = self.config.clone();
        rt.spawn(async move {
            let connected = match config.connect(NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::warn!(
                                "state database connection ended: {:#}",
                                anyhow::Error::new(e)
                            );
                        }
                    });
                    Ok(client)
                }
                Err(e) => Err(e),
            };
            let _ = tx.send(connected);
        });
        let client = rx
            .recv()
            .map_err(|_| anyhow!("the PostgreSQL I/O thread stopped"))?
            .with_context(|| format!("connecting to the state database {}", self.shown))?;
        Ok(client)
    }

    /// Create the schema and its tables, or bring them up to date: once,
    /// however many hosts start at once (an advisory lock per schema
    /// serialises them; the second finds the work done).
    fn migrate(&self) -> Result<()> {
        let mut client = self.client()?;
        let schema = &self.schema;
        let target = MIGRATIONS.len() as i64;
        wait(async {
            let tx = client.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('event-host schema ' || $1::text))",
                &[&schema],
            )
            .await?;
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
                 SET LOCAL search_path TO \"{schema}\";
                 CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value bytea NOT NULL);"
            ))
            .await?;
            let version: i64 = match tx
                .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
                .await?
            {
                Some(row) => {
                    let raw: Vec<u8> = row.get(0);
                    std::str::from_utf8(&raw)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(-1)
                }
                None => 0,
            };
            if !(0..=target).contains(&version) {
                return Ok::<_, tokio_postgres::Error>(Err(version));
            }
            for step in &MIGRATIONS[version as usize..] {
                tx.batch_execute(step).await?;
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', $1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&target.to_string().into_bytes()],
            )
            .await?;
            tx.commit().await?;
            Ok(Ok(()))
        })
        .with_context(|| {
            format!(
                "creating the state schema {schema:?} in {}",
                self.shown
            )
        })?
        .map_err(|found| {
            anyhow!(
                "state schema {schema:?} in {} is at version {found}, this host knows up to {target}: it was written by a newer event-host (or is not an event-host schema)",
                self.shown
            )
        })
    }

    /// A connection set up for the hot path, its I/O on a runtime of its
    /// own (see [`Io`]).
    fn conn(&self) -> Result<Conn> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a state database connection's runtime")?;
        let (client, connection) = rt
            .block_on(self.config.connect(NoTls))
            .with_context(|| format!("connecting to the state database {}", self.shown))?;
        let io = Io {
            rt: Some(rt),
            connection: Mutex::new(Some(Box::pin(connection))),
        };
        let schema = &self.schema;
        let st = io
            .wait(async {
                client
                    .batch_execute(&format!(
                        "SET search_path TO \"{schema}\";
                     SET lock_timeout = '{LOCK_TIMEOUT}';
                     SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}';"
                    ))
                    .await?;
                // Prepared together: one round trip for all of them.
                let (prepared, many) = futures_util::future::try_join(
                    futures_util::future::try_join_all(
                        HOT_PATH_SQL.iter().map(|sql| client.prepare(sql)),
                    ),
                    futures_util::future::try_join_all(
                        MANY.iter().map(|m| client.prepare_typed(m.sql, m.types)),
                    ),
                )
                .await?;
                Ok::<_, tokio_postgres::Error>((prepared, many))
            })
            .with_context(|| format!("preparing the state database connection ({})", self.shown))?;
        let (st, many) = st;
        let Ok(
            [read_for_update, read, list, processed, still_absent, still_read, insert_new, upsert, mark, outbox_insert],
        ) = <[Statement; 10]>::try_from(st)
        else {
            bail!("prepared statements out of step");
        };
        let st = Statements {
            read_for_update,
            read,
            list,
            processed,
            still_absent,
            still_read,
            insert_new,
            upsert,
            mark,
            outbox_insert,
        };
        Ok(Conn {
            client,
            st,
            many,
            io,
        })
    }

    /// An idle connection, or a new one.
    fn take(&self) -> Result<Conn> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match idle {
                Some(conn) if conn.is_closed() => continue,
                Some(conn) => return Ok(conn),
                None => return self.conn(),
            }
        }
    }

    /// Give a connection back (dropped when broken or when enough idle).
    fn put(&self, conn: Conn) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Run `f` on the open batch of `ns` (starting one: a connection in a
    /// transaction), keeping it open for the batch's next reads.
    fn in_batch<T>(&self, ns: &str, f: impl FnOnce(&mut Batch) -> Result<T>) -> Result<T> {
        let existing = self
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ns);
        let mut batch = match existing {
            Some(batch) => batch,
            None => Batch::new(self.take()?),
        };
        let result = f(&mut batch);
        self.batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ns.to_owned(), batch);
        result
    }

    /// Run one statement of the batch, sending `BEGIN` with it when it is
    /// the batch's first.
    fn query_in_batch(
        &self,
        batch: &mut Batch,
        what: &str,
        statement: Sql,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let mut rows = self.queries_in_batch(batch, what, &[(statement, params)])?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// Run statements of the batch in one round trip (pipelined, `BEGIN`
    /// first when the batch has not begun), their rows in order. The
    /// first failure is the cause; it fails the batch.
    fn queries_in_batch(
        &self,
        batch: &mut Batch,
        what: &str,
        queries: &[(Sql, &[&(dyn ToSql + Sync)])],
    ) -> Result<Vec<Vec<tokio_postgres::Row>>> {
        if let Some(why) = &batch.failed {
            return Err(anyhow::Error::new(Contended(why.clone())));
        }
        let begin = !batch.open;
        let conn = &batch.conn;
        let sent = futures_util::future::join_all(
            queries
                .iter()
                .map(|(statement, params)| conn.send(*statement, params)),
        );
        let result = conn.wait(async {
            let all = if begin {
                let (began, all) =
                    futures_util::future::join(conn.client.batch_execute("BEGIN"), sent).await;
                began?;
                all
            } else {
                sent.await
            };
            all.into_iter().collect::<Result<Vec<_>, _>>()
        });
        batch.open = true;
        match result {
            Ok(rows) => Ok(rows),
            Err(e) => {
                let why = format!("{what}: {e}");
                batch.failed = Some(why.clone());
                if contended(&e) {
                    Err(anyhow::Error::new(Contended(why)))
                } else {
                    Err(anyhow::Error::new(e).context(format!("{what} ({})", self.shown)))
                }
            }
        }
    }

    /// The commit's statements, sent at once, `BEGIN` first when the batch
    /// read nothing. The first failure is the cause (the others then fail
    /// as "transaction aborted").
    fn commit_in(
        &self,
        batch: &mut Batch,
        ns: &str,
        commits: &[Commit],
        confirmed: &[i64],
    ) -> Result<Result<Vec<CommitOutcome>, String>> {
        if let Some(why) = &batch.failed {
            return Ok(Err(why.clone()));
        }
        // Keys read but not locked by this transaction: read through the
        // commit under way before this batch's (see `StateStore::
        // commit_in_background`), read by an earlier chunk of the batch
        // (its commit released them), or seen only as an earlier event of
        // the batch left them. Each is locked now, to validate against
        // what is there.
        //
        // A key the batch read before any of its events wrote it must
        // still hold what was read: `still_read` locks such keys and
        // checks that at the head of the commit's statements, in their
        // round trip, and they are planned against the values read (should
        // one differ, the transaction fails as contention and the batch
        // runs again). The hot key read through the commit under way is
        // one. A key first written, then read, is locked and read in a
        // round trip of its own: only its committed value says what
        // planning the batch against it must find.
        let mut read_first: HashMap<&str, Option<&[u8]>> = HashMap::new();
        let mut written = std::collections::HashSet::new();
        let mut unlocked: Vec<&str> = Vec::new();
        for commit in commits {
            for (key, value) in &commit.reads {
                let key = key.as_str();
                if batch.locked.contains_key(key) || read_first.contains_key(key) {
                    continue;
                }
                if written.contains(key) {
                    unlocked.push(key);
                } else {
                    read_first.insert(key, value.as_deref());
                }
            }
            // A call's reads of a key came before its own write of it.
            written.extend(commit.writes.iter().map(|(k, _)| k.as_str()));
        }
        let mut read_first: Vec<(&str, Option<&[u8]>)> = read_first.into_iter().collect();
        // Sorted: two hosts lock shared keys in one order.
        read_first.sort_unstable_by_key(|(k, _)| *k);
        unlocked.sort_unstable();
        unlocked.dedup();
        let unlocked_bytes: Vec<&[u8]> = unlocked.iter().map(|k| k.as_bytes()).collect();
        if !unlocked.is_empty() {
            let rows = match self.query_in_batch(
                batch,
                "locking keys read",
                Sql::Many(Many::Lock),
                &[&ns, &unlocked_bytes],
            ) {
                Ok(rows) => rows,
                Err(e) if e.downcast_ref::<Contended>().is_some() => {
                    return Ok(Err(format!("{e:#}")))
                }
                Err(e) => return Err(e),
            };
            for key in &unlocked {
                batch.locked.insert((*key).to_owned(), None);
            }
            for row in rows {
                batch.locked.insert(text_of(row.get(0)), Some(row.get(1)));
            }
        }
        let (read_keys, read_values): (Vec<&[u8]>, Vec<Option<&[u8]>>) =
            read_first.iter().map(|(k, v)| (k.as_bytes(), *v)).unzip();
        for (key, value) in &read_first {
            batch
                .locked
                .insert((*key).to_owned(), value.map(<[u8]>::to_vec));
        }
        let locked = &batch.locked;
        // Dedupe against other hosts is the processed table's primary key:
        // an id committed meanwhile fails the insert below, and the events
        // run again (and find it).
        let mut plan = Plan::new(
            commits,
            |_, _| Ok(false),
            |_, key| Ok(locked.get(key).cloned().flatten()),
        )?;
        // Keys in order: two hosts' upserts lock rows in one order.
        let mut written: Vec<(&str, Option<&[u8]>)> =
            plan.written.iter().map(|((_, k), v)| (*k, *v)).collect();
        written.sort_unstable_by_key(|(k, _)| *k);
        let (mut new_keys, mut new_values) = (Vec::new(), Vec::new());
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut deleted = Vec::new();
        for (key, value) in written {
            match value {
                // Read as absent: nothing locked it, so the insert itself
                // is the check that no other host created it meanwhile.
                Some(v) if matches!(locked.get(key), Some(None)) => {
                    new_keys.push(key.as_bytes());
                    new_values.push(v);
                }
                Some(v) => {
                    keys.push(key.as_bytes());
                    values.push(v);
                }
                None => deleted.push(key.as_bytes()),
            }
        }
        // Keys read as absent and not created here: nothing locked them
        // either, so check at commit that no other host created one
        // meanwhile (a handler that decides on a key's absence without
        // writing it). Failing, it aborts the transaction as contention.
        let created: std::collections::HashSet<&[u8]> = new_keys.iter().copied().collect();
        let mut absent: Vec<&[u8]> = commits
            .iter()
            .flat_map(|c| c.reads.iter())
            .filter(|(k, _)| matches!(locked.get(k.as_str()), Some(None)))
            .map(|(k, _)| k.as_bytes())
            .filter(|k| !created.contains(k))
            .collect();
        absent.sort_unstable();
        absent.dedup();
        let marks: Vec<&[u8]> = plan.marks.iter().map(|(_, id)| id.as_bytes()).collect();
        let now = super::unix_now();
        let encoded = plan
            .outbox
            .first()
            .map(|(_, messages, _)| encode_messages(messages))
            .transpose()?;
        let st = &batch.conn.st;
        let client = &batch.conn.client;
        let host = self.host_id.as_str();
        let p_confirmed: [&(dyn ToSql + Sync); 1] = [&confirmed];
        let p_read: [&(dyn ToSql + Sync); 3] = [&ns, &read_keys, &read_values];
        let p_new: [&(dyn ToSql + Sync); 3] = [&ns, &new_keys, &new_values];
        let p_upsert: [&(dyn ToSql + Sync); 3] = [&ns, &keys, &values];
        let p_delete: [&(dyn ToSql + Sync); 2] = [&ns, &deleted];
        let p_absent: [&(dyn ToSql + Sync); 2] = [&ns, &absent];
        let p_marks: [&(dyn ToSql + Sync); 3] = [&ns, &marks, &now];
        let mut statements: Vec<Query<'_>> = Vec::new();
        if !batch.open {
            statements.push(Box::pin(async {
                client.batch_execute("BEGIN").await.map(|()| Vec::new())
            }));
        }
        if !read_keys.is_empty() {
            statements.push(Box::pin(client.query(&st.still_read, &p_read)));
        }
        if !confirmed.is_empty() {
            statements.push(batch.conn.send(Sql::Many(Many::OutboxDelete), &p_confirmed));
        }
        if !absent.is_empty() {
            statements.push(Box::pin(client.query(&st.still_absent, &p_absent)));
        }
        if !new_keys.is_empty() {
            statements.push(Box::pin(client.query(&st.insert_new, &p_new)));
        }
        if !keys.is_empty() {
            statements.push(Box::pin(client.query(&st.upsert, &p_upsert)));
        }
        if !deleted.is_empty() {
            statements.push(batch.conn.send(Sql::Many(Many::Delete), &p_delete));
        }
        if !marks.is_empty() {
            statements.push(Box::pin(client.query(&st.mark, &p_marks)));
        }
        let p_outbox: Option<[&(dyn ToSql + Sync); 3]> = encoded
            .as_ref()
            .map(|bytes| -> [&(dyn ToSql + Sync); 3] { [&ns, bytes, &host] });
        let outbox_at = p_outbox.as_ref().map(|params| {
            statements.push(Box::pin(client.query(&st.outbox_insert, params)));
            statements.len() - 1
        });
        statements.push(Box::pin(async {
            client.batch_execute("COMMIT").await.map(|()| Vec::new())
        }));
        let results = batch.conn.wait(futures_util::future::join_all(statements));
        batch.open = false;
        batch.locked.clear();
        if let Some(failed) = results.iter().position(Result::is_err) {
            let Some(Err(e)) = results.into_iter().nth(failed) else {
                bail!("commit results out of step");
            };
            let why = format!("committing: {e}");
            if contended(&e) {
                return Ok(Err(why));
            }
            // The connection may be broken mid-commit: whether it
            // committed is unknown, and the events go back to the queue
            // (their dedupe records make a committed one a duplicate).
            batch.failed = Some(why);
            return Err(anyhow::Error::new(e).context(format!("committing state ({})", self.shown)));
        }
        if let Some(at) = outbox_at {
            let row: i64 = results[at]
                .as_ref()
                .ok()
                .and_then(|rows| rows.first())
                .map(|r| r.get(0))
                .context("outbox insert returned no id")?;
            plan.outbox_row(0, row);
        }
        Ok(Ok(plan.outcomes))
    }

    /// Commit `commits` of `ns` in `open`, the batch's transaction (a
    /// batch that read nothing begins with its commit), and end it.
    fn commit_open(
        &self,
        ns: &str,
        open: Option<Batch>,
        commits: &[Commit],
        confirmed: &[i64],
    ) -> Result<Vec<CommitOutcome>> {
        let mut open = match open {
            Some(open) => open,
            None => Batch::new(self.take()?),
        };
        let committed = self.commit_in(&mut open, ns, commits, confirmed);
        // The transaction is over either way: the connection goes back to
        // the pool (or is dropped, broken) and the next batch starts anew.
        self.release(ns, open);
        self.outcomes(ns, committed, commits, confirmed)
    }

    /// End `batch` (of `ns`): roll back what is still open, releasing its
    /// locks, and give its connection back.
    fn release(&self, ns: &str, batch: Batch) {
        if batch.open {
            // Reads only, or a failed batch: release its locks now.
            if let Err(e) = batch.conn.wait(batch.conn.client.batch_execute("ROLLBACK")) {
                tracing::warn!(handler = ns, "ending a state transaction: {e}");
                return; // the connection is dropped, ending it for sure
            }
        }
        self.put(batch.conn);
    }

    /// What [`Postgres::commit_in`]'s answer means for each commit: a
    /// contended transaction makes every one a conflict (they run again).
    fn outcomes(
        &self,
        ns: &str,
        committed: Result<Result<Vec<CommitOutcome>, String>>,
        commits: &[Commit],
        confirmed: &[i64],
    ) -> Result<Vec<CommitOutcome>> {
        match committed? {
            Ok(outcomes) => Ok(outcomes),
            Err(why) => {
                tracing::debug!(
                    handler = ns,
                    "shared state contended, events run again: {why}"
                );
                // The deletes of the confirmed rows rolled back with the
                // rest: delete them on their own, or they would be
                // published again (at this host's next reconnect, or by
                // another host once it is gone).
                if !confirmed.is_empty() {
                    self.clear_outbox(confirmed)?;
                }
                Ok(commits
                    .iter()
                    .map(|_| CommitOutcome::Conflict { key: why.clone() })
                    .collect())
            }
        }
    }

    /// Run `f` on an idle connection, outside any batch.
    fn with_conn<T>(&self, f: impl FnOnce(&Conn) -> Result<T>) -> Result<T> {
        let conn = self.take()?;
        let result = f(&conn);
        self.put(conn);
        result
    }
}

impl Backend for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn shared(&self) -> bool {
        true
    }

    fn path(&self) -> Option<&Path> {
        None
    }

    fn read(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.in_batch(ns, |batch| {
            if let Some(v) = batch.locked.get(key) {
                return Ok(v.clone());
            }
            let rows = self.query_in_batch(
                batch,
                &format!("reading state {ns}/{key}"),
                Sql::Prepared(|st| &st.read_for_update),
                &[&ns, &key.as_bytes()],
            )?;
            let value: Option<Vec<u8>> = rows.first().map(|r| r.get(0));
            batch.locked.insert(key.to_owned(), value.clone());
            Ok(value)
        })
    }

    fn read_committed(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.with_conn(|c| {
            let row = c
                .wait(c.client.query_opt(&c.st.read, &[&ns, &key.as_bytes()]))
                .with_context(|| format!("reading state {ns}/{key} ({})", self.shown))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn list_keys(&self, ns: &str, after: Option<&str>, limit: usize) -> Result<Vec<String>> {
        let after = after.unwrap_or("").as_bytes();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.in_batch(ns, |batch| {
            let rows = self.query_in_batch(
                batch,
                &format!("listing keys of {ns}"),
                Sql::Prepared(|st| &st.list),
                &[&ns, &after, &limit],
            )?;
            Ok(rows.iter().map(|r| text_of(r.get(0))).collect())
        })
    }

    fn prefetch(&self, ns: &str, message_ids: &[&str], keys: &[String]) -> Result<()> {
        let ids: Vec<&[u8]> = message_ids.iter().map(|id| id.as_bytes()).collect();
        let key_bytes: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let cap = READ_AHEAD_VALUE_BYTES;
        let dedupe: [&(dyn ToSql + Sync); 2] = [&ns, &ids];
        let state: [&(dyn ToSql + Sync); 3] = [&ns, &key_bytes, &cap];
        let mut queries: Vec<(Sql, &[&(dyn ToSql + Sync)])> = Vec::new();
        if !ids.is_empty() {
            queries.push((Sql::Many(Many::Processed), &dedupe));
        }
        if !keys.is_empty() {
            queries.push((Sql::Many(Many::ReadAhead), &state));
        }
        if queries.is_empty() {
            return Ok(());
        }
        self.in_batch(ns, |batch| {
            let mut answers = self
                .queries_in_batch(batch, "reading ahead for the batch", &queries)?
                .into_iter();
            if !ids.is_empty() {
                for id in message_ids {
                    batch.processed.insert((*id).to_owned(), false);
                }
                for row in answers.next().unwrap_or_default() {
                    batch.processed.insert(text_of(row.get(0)), true);
                }
            }
            if !keys.is_empty() {
                // Every key is locked now, present or not; absent ones
                // are remembered as absent (inserting one is checked at
                // commit, as for any read).
                for key in keys {
                    batch.locked.insert(key.clone(), None);
                }
                for row in answers.next().unwrap_or_default() {
                    let key = text_of(row.get(0));
                    if row.get::<_, bool>(2) {
                        batch.locked.insert(key, Some(row.get(1)));
                    } else {
                        // Too large to hold for the whole batch on a
                        // hint: locked, but read again when asked for.
                        batch.locked.remove(&key);
                    }
                }
            }
            Ok(())
        })
    }

    fn is_processed(&self, ns: &str, message_id: &str) -> Result<bool> {
        self.in_batch(ns, |batch| {
            if let Some(known) = batch.processed.get(message_id) {
                return Ok(*known);
            }
            let rows = self.query_in_batch(
                batch,
                "reading dedupe records",
                Sql::Prepared(|st| &st.processed),
                &[&ns, &message_id.as_bytes()],
            )?;
            Ok(!rows.is_empty())
        })
    }

    fn commit(&self, commits: &[Commit], confirmed: &[i64]) -> Result<Vec<CommitOutcome>> {
        let ns = match batch_ns(commits) {
            Ok(Some(ns)) => ns,
            Ok(None) => {
                if !confirmed.is_empty() {
                    self.clear_outbox(confirmed)?;
                }
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        let open = self
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ns);
        self.commit_open(ns, open, commits, confirmed)
    }

    fn commits_in_background(&self) -> bool {
        // A commit here is a round trip or two and a WAL flush on the
        // server: time the next batch can spend running its events.
        true
    }

    fn detach_commit(
        self: Arc<Self>,
        ns: &str,
        batch: Vec<Commit>,
        confirmed: Vec<i64>,
    ) -> CommitJob {
        let open = self
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ns);
        let ns = ns.to_owned();
        Box::new(move || {
            let result = match batch_ns(&batch) {
                Ok(Some(of)) if of == ns => self.commit_open(&ns, open, &batch, &confirmed),
                // Empty, or not one namespace's: as a plain commit.
                _ => {
                    if let Some(open) = open {
                        self.release(&ns, open);
                    }
                    self.commit(&batch, &confirmed)
                }
            };
            (result, batch)
        })
    }

    fn end_batch(&self, ns: &str) {
        let batch = self
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ns);
        if let Some(batch) = batch {
            self.release(ns, batch);
        }
    }

    fn pending_outbox(&self, owed: Owed) -> Result<Vec<PendingMessage>> {
        // Claimed in one statement: `SKIP LOCKED` keeps two hosts claiming
        // at once from taking the same rows.
        let mine = owed == Owed::Mine;
        let host = self.host_id.as_str();
        let rows = self.with_conn(|c| {
            c.wait(c.client.query(
                "UPDATE outbox SET claimed_by = $1, claimed_at = now()
                 WHERE id IN (
                     SELECT id FROM outbox
                     WHERE ($2 AND claimed_by = $1)
                        OR (claimed_by <> $1
                            AND claimed_at < now() - make_interval(secs => $3::bigint))
                     ORDER BY id FOR UPDATE SKIP LOCKED)
                 RETURNING id, ns, messages",
                &[&host, &mine, &OUTBOX_CLAIM_SECS],
            ))
            .with_context(|| format!("claiming outbox rows ({})", self.shown))
        })?;
        let mut claimed: Vec<(i64, String, Vec<u8>)> = rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        claimed.sort_unstable_by_key(|(id, ..)| *id);
        let mut out = Vec::new();
        for (id, ns, messages) in claimed {
            let messages =
                decode_messages(&messages).with_context(|| format!("outbox row {id}"))?;
            out.extend(messages.into_iter().map(|m| (id, ns.clone(), m)));
        }
        Ok(out)
    }

    fn clear_outbox(&self, ids: &[i64]) -> Result<()> {
        self.with_conn(|c| {
            c.wait(c.send(Sql::Many(Many::OutboxDelete), &[&ids]))
                .with_context(|| format!("clearing outbox rows ({})", self.shown))?;
            Ok(())
        })
    }

    fn prune_processed_before(&self, cutoff: i64) -> Result<usize> {
        let chunk = PRUNE_CHUNK as i64;
        let mut total = 0;
        loop {
            let n = self.with_conn(|c| {
                c.wait(c.client.execute(
                    "DELETE FROM processed WHERE ctid = ANY(ARRAY(
                         SELECT ctid FROM processed WHERE at < $1 LIMIT $2))",
                    &[&cutoff, &chunk],
                ))
                .with_context(|| format!("pruning dedupe records ({})", self.shown))
            })?;
            total += n as usize;
            if n < chunk as u64 {
                return Ok(total);
            }
        }
    }

    fn host_secret(&self) -> Result<[u8; 32]> {
        let fresh = new_secret()?.to_vec();
        let stored: Vec<u8> = self.with_conn(|c| {
            // The first host to get here makes the fleet's secret; every
            // other one reads it.
            c.wait(async {
                c.client
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('host-secret', $1)
                         ON CONFLICT (key) DO NOTHING",
                        &[&fresh],
                    )
                    .await?;
                c.client
                    .query_one("SELECT value FROM meta WHERE key = 'host-secret'", &[])
                    .await
                    .map(|r| r.get(0))
            })
            .with_context(|| format!("reading the fleet's host secret ({})", self.shown))
        })?;
        <[u8; 32]>::try_from(stored)
            .map_err(|_| anyhow!("the host secret in the state database is not 32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Outgoing, StateStore, Txn};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The test database (`EVENT_HOST_TEST_POSTGRES_URL`, else the local
    /// server with trust auth, database `test`).
    fn url() -> String {
        std::env::var("EVENT_HOST_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    /// A schema of its own, dropped when the test ends.
    struct Schema(String);

    impl Schema {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            Self(format!(
                "unit_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ))
        }

        fn host(&self, id: &str) -> StateStore {
            StateStore::postgres(&url(), &self.0, id).expect("test PostgreSQL reachable")
        }

        fn sql(&self, sql: &str) {
            let store = Postgres::unmigrated(&url(), &self.0, "admin").expect("connect");
            store
                .with_conn(|c| Ok(c.wait(c.client.batch_execute(sql))?))
                .expect(sql);
        }
    }

    impl Drop for Schema {
        fn drop(&mut self) {
            if let Ok(store) = Postgres::unmigrated(&url(), &self.0, "cleanup") {
                let _ =
                    store.with_conn(|c| {
                        Ok(c.wait(c.client.batch_execute(&format!(
                            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                            self.0
                        )))?)
                    });
            }
        }
    }

    fn increment(store: &StateStore, key: &str, id: Option<&str>) -> Result<CommitOutcome> {
        let mut txn = Txn::default();
        let n = txn
            .get(store, "h", key)?
            .map(|v| String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0))
            .unwrap_or(0);
        txn.set(key, (n + 1).to_string().into_bytes());
        let out = store.commit(&[txn.into_commit("h", id.map(str::to_owned), Vec::new())]);
        store.end_batch("h");
        Ok(out?.remove(0))
    }

    fn value(store: &StateStore, key: &str) -> Option<String> {
        store
            .get_committed("h", key)
            .expect("read")
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    #[test]
    fn two_hosts_incrementing_one_key_lose_no_update() -> Result<()> {
        let schema = Schema::new();
        let hosts = [schema.host("a"), schema.host("b")];
        std::thread::scope(|s| {
            for store in &hosts {
                s.spawn(move || {
                    for _ in 0..150 {
                        // A conflict (the key was inserted by the other
                        // host first) runs the event again, as the
                        // dispatcher does.
                        while increment(store, "n", None).expect("increment")
                            != (CommitOutcome::Committed { outbox_ids: vec![] })
                        {
                        }
                    }
                });
            }
        });
        assert_eq!(value(&hosts[0], "n").as_deref(), Some("300"));
        Ok(())
    }

    #[test]
    fn a_batch_holds_what_it_read_until_it_commits() -> Result<()> {
        let schema = Schema::new();
        let (a, b) = (schema.host("a"), schema.host("b"));
        assert!(matches!(
            increment(&a, "k", None)?,
            CommitOutcome::Committed { .. }
        ));
        // a's batch reads k and keeps running; b wants k meanwhile.
        let mut txn = Txn::default();
        assert_eq!(txn.get(&a, "h", "k")?.as_deref(), Some(&b"1"[..]));
        let waiter = std::thread::spawn(move || increment(&b, "k", None).map(|o| (o, b)));
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!waiter.is_finished(), "b must wait for a's batch");
        txn.set("k", b"10".to_vec());
        a.commit(&[txn.into_commit("h", None, Vec::new())])?;
        a.end_batch("h");
        let (outcome, _b) = waiter.join().expect("thread")?;
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));
        assert_eq!(value(&a, "k").as_deref(), Some("11"), "b saw a's write");
        Ok(())
    }

    /// One batch's state work on `store`: add one to `counter`, set
    /// `own` (as the broker path runs it, writes staged for the next
    /// event).
    fn counting_batch(store: &StateStore, counter: &str, own: &str) -> Result<Commit> {
        let mut txn = Txn::default();
        let n = txn
            .get(store, "h", counter)?
            .map(|v| String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0))
            .unwrap_or(0);
        txn.set(counter, (n + 1).to_string().into_bytes());
        txn.set(own, b"x".to_vec());
        let commit = txn.into_commit("h", Some(own.to_owned()), Vec::new());
        store.stage("h", &commit.writes);
        Ok(commit)
    }

    #[test]
    fn batches_read_through_the_commit_under_way_before_theirs() -> Result<()> {
        let schema = Schema::new();
        let a = schema.host("a");
        assert!(a.commits_in_background());
        let mut under_way: Option<crate::state::PendingCommit> = None;
        for i in 0..5 {
            let commit = counting_batch(&a, "n", &format!("k{i}"))?;
            if let Some(previous) = under_way.take() {
                let (outcomes, _) = previous.finish();
                assert!(matches!(outcomes?[..], [CommitOutcome::Committed { .. }]));
            }
            under_way = Some(a.commit_in_background("h", vec![commit]));
        }
        let (outcomes, commits) = under_way.take().expect("last").finish();
        assert!(matches!(outcomes?[..], [CommitOutcome::Committed { .. }]));
        assert_eq!(commits.len(), 1, "the commits come back");
        assert_eq!(
            value(&a, "n").as_deref(),
            Some("5"),
            "every batch saw the one before"
        );
        assert_eq!(value(&a, "k4").as_deref(), Some("x"));
        Ok(())
    }

    #[test]
    fn a_batch_built_on_a_commit_that_failed_conflicts() -> Result<()> {
        let schema = Schema::new();
        let (a, b) = (schema.host("a"), schema.host("b"));
        // a's first batch creates `n`; b creates it first (and makes it
        // 2), so that commit fails (contended) after a's second batch read
        // a's value of it.
        let first = counting_batch(&a, "n", "k1")?;
        for _ in 0..2 {
            assert!(matches!(
                increment(&b, "n", None)?,
                CommitOutcome::Committed { .. }
            ));
        }
        let under_way = a.commit_in_background("h", vec![first]);
        let second = counting_batch(&a, "n", "k2")?;
        assert_eq!(second.reads, vec![("n".to_owned(), Some(b"1".to_vec()))]);
        let (outcomes, _) = under_way.finish();
        assert!(matches!(outcomes?[..], [CommitOutcome::Conflict { .. }]));
        let outcomes = a.commit(&[second])?;
        a.end_batch("h");
        assert!(
            matches!(outcomes[..], [CommitOutcome::Conflict { .. }]),
            "checked against what is committed: {outcomes:?}"
        );
        assert_eq!(value(&a, "n").as_deref(), Some("2"), "b's alone");
        assert_eq!(value(&a, "k1"), None);
        assert_eq!(value(&a, "k2"), None);
        Ok(())
    }

    #[test]
    fn keys_of_the_commit_under_way_are_not_locked_by_the_next_batch() -> Result<()> {
        let schema = Schema::new();
        let (a, b) = (schema.host("a"), schema.host("b"));
        assert!(matches!(
            increment(&a, "hot", None)?,
            CommitOutcome::Committed { .. }
        ));
        let first = counting_batch(&a, "hot", "k1")?;
        let under_way = a.commit_in_background("h", vec![first]);
        // The next batch reads ahead and reads `hot`: through the commit
        // under way, not locking it.
        a.prefetch("h", &[], &["hot".to_owned()]);
        let second = counting_batch(&a, "hot", "k2")?;
        assert_eq!(second.reads, vec![("hot".to_owned(), Some(b"2".to_vec()))]);
        let (outcomes, _) = under_way.finish();
        assert!(matches!(outcomes?[..], [CommitOutcome::Committed { .. }]));
        // Were `hot` locked by a's open batch, b would wait out the lock
        // timeout and be told it is contended.
        let started = std::time::Instant::now();
        assert!(matches!(
            increment(&b, "hot", None)?,
            CommitOutcome::Committed { .. }
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // a's second batch read 2, b made it 3: it runs again.
        let outcomes = a.commit(&[second])?;
        a.end_batch("h");
        assert!(matches!(outcomes[..], [CommitOutcome::Conflict { .. }]));
        assert_eq!(value(&a, "hot").as_deref(), Some("3"));
        Ok(())
    }

    /// A key an event of the batch wrote before another read it: the
    /// reader saw the batch's own value, not the committed one, and the
    /// commit must not take that for a change by another host.
    #[test]
    fn a_key_written_then_read_within_a_batch_commits() -> Result<()> {
        let schema = Schema::new();
        let a = schema.host("a");
        assert!(matches!(
            increment(&a, "k", None)?,
            CommitOutcome::Committed { .. }
        ));
        let mut writer = Txn::default();
        writer.set("k", b"5".to_vec());
        let writer = writer.into_commit("h", Some("m1".into()), Vec::new());
        a.stage("h", &writer.writes);
        let reader = counting_batch(&a, "k", "k2")?;
        assert_eq!(reader.reads, vec![("k".to_owned(), Some(b"5".to_vec()))]);
        let outcomes = a.commit(&[writer, reader])?;
        a.end_batch("h");
        assert!(
            matches!(
                outcomes[..],
                [
                    CommitOutcome::Committed { .. },
                    CommitOutcome::Committed { .. }
                ]
            ),
            "{outcomes:?}"
        );
        assert_eq!(value(&a, "k").as_deref(), Some("6"));
        Ok(())
    }

    #[test]
    fn a_message_id_committed_by_one_host_is_skipped_by_every_other() -> Result<()> {
        let schema = Schema::new();
        let (a, b) = (schema.host("a"), schema.host("b"));
        assert!(matches!(
            increment(&a, "k", Some("m1"))?,
            CommitOutcome::Committed { .. }
        ));
        assert!(b.is_processed("h", "m1")?);
        b.end_batch("h");
        // Read ahead for a batch, the answers are the same.
        b.prefetch("h", &["m1", "m2"], &[]);
        assert!(b.is_processed("h", "m1")?);
        assert!(!b.is_processed("h", "m2")?);
        b.end_batch("h");
        // b ran it anyway (it checked before a committed): the commit
        // does not apply it twice.
        assert!(matches!(
            increment(&b, "k", Some("m1"))?,
            CommitOutcome::Conflict { .. }
        ));
        assert_eq!(value(&a, "k").as_deref(), Some("1"));
        Ok(())
    }

    #[test]
    fn hosts_starting_at_once_on_an_empty_database_all_come_up() {
        let schema = Schema::new();
        std::thread::scope(|s| {
            let started: Vec<_> = (0..3)
                .map(|i| {
                    let name = schema.0.clone();
                    s.spawn(move || StateStore::postgres(&url(), &name, &format!("h{i}")))
                })
                .collect();
            for host in started {
                host.join().expect("thread").expect("each host starts");
            }
        });
        let a = schema.host("a");
        assert_eq!(a.backend_name(), "postgres");
        assert!(a.is_shared());
        assert_eq!(a.host_secret().ok(), schema.host("b").host_secret().ok());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let schema = Schema::new();
        drop(schema.host("a"));
        schema.sql("UPDATE meta SET value = '99' WHERE key = 'schema_version'");
        let err = StateStore::postgres(&url(), &schema.0, "a")
            .err()
            .expect("refused");
        assert!(format!("{err:#}").contains("newer event-host"), "{err:#}");
    }

    #[test]
    fn outbox_rows_a_dead_host_left_are_claimed_once_by_a_live_one() -> Result<()> {
        let schema = Schema::new();
        let (a, b, c) = (schema.host("a"), schema.host("b"), schema.host("c"));
        let message = Outgoing {
            exchange: "x".into(),
            routing_key: "k".into(),
            payload: b"{}".to_vec(),
            content_type: None,
            message_id: Some("out-1".into()),
            correlation_id: None,
            headers: Vec::new(),
        };
        let commit = Txn::default().into_commit("h", None, vec![message.clone()]);
        let out = a.commit(&[commit])?;
        assert!(
            matches!(&out[0], CommitOutcome::Committed { outbox_ids } if outbox_ids.len() == 1)
        );
        // a's claim is fresh: nobody else takes its rows.
        assert!(b.orphaned_outbox()?.is_empty());
        assert!(b.pending_outbox()?.is_empty(), "b owes nothing of its own");
        // a dies; its claim runs out.
        schema.sql("UPDATE outbox SET claimed_at = now() - interval '1 hour'");
        let claimed = b.orphaned_outbox()?;
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].2, message, "same message, same id");
        assert!(c.orphaned_outbox()?.is_empty(), "claimed once");
        b.clear_outbox(&[claimed[0].0])?;
        assert!(a.pending_outbox()?.is_empty());
        Ok(())
    }

    #[test]
    fn outbox_rows_confirmed_before_a_contended_commit_are_deleted_all_the_same() -> Result<()> {
        let schema = Schema::new();
        let (a, b) = (schema.host("a"), schema.host("b"));
        let message = Outgoing {
            exchange: "x".into(),
            routing_key: "k".into(),
            payload: b"{}".to_vec(),
            content_type: None,
            message_id: Some("out-1".into()),
            correlation_id: None,
            headers: Vec::new(),
        };
        let out = b.commit(&[Txn::default().into_commit("h", None, vec![message])])?;
        let CommitOutcome::Committed { outbox_ids } = &out[0] else {
            panic!("{out:?}")
        };
        // The broker confirmed it: b's next commit deletes the row.
        b.forget_outbox_later(outbox_ids.clone());
        // That commit loses a race with a (both create "new").
        let mut ta = Txn::default();
        let mut tb = Txn::default();
        assert_eq!(ta.get(&a, "h", "new")?, None);
        assert_eq!(tb.get(&b, "h", "new")?, None);
        ta.set("new", b"a".to_vec());
        tb.set("new", b"b".to_vec());
        a.commit(&[ta.into_commit("h", None, Vec::new())])?;
        a.end_batch("h");
        assert!(matches!(
            b.commit(&[tb.into_commit("h", None, Vec::new())])?[0],
            CommitOutcome::Conflict { .. }
        ));
        b.end_batch("h");
        // The row went all the same: b's next reconnect (or, once b is
        // gone, another host) does not publish it again.
        assert!(b.pending_outbox()?.is_empty(), "confirmed row left behind");
        Ok(())
    }

    #[test]
    fn keys_read_ahead_are_locked_for_the_batch_and_answered_from_memory() -> Result<()> {
        let schema = Schema::new();
        let (a, b) = (schema.host("a"), schema.host("b"));
        assert!(matches!(
            increment(&a, "k", None)?,
            CommitOutcome::Committed { .. }
        ));
        let big = vec![b'x'; READ_AHEAD_VALUE_BYTES as usize + 1];
        let mut txn = Txn::default();
        txn.set("big", big.clone());
        a.commit(&[txn.into_commit("h", None, Vec::new())])?;
        a.end_batch("h");

        // a's batch reads ahead k (present), big (over the cap kept in
        // memory) and absent (no row).
        a.prefetch("h", &[], &["absent".into(), "big".into(), "k".into()]);
        // Present keys are locked from now on: b waits for a's batch.
        let waiter = std::thread::spawn(move || increment(&b, "k", None).map(|o| (o, b)));
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !waiter.is_finished(),
            "b must wait for the keys a read ahead"
        );
        // An absent key locks nothing: another host may create it, and
        // the batch still answers from what it read ahead (it did not ask
        // again)...
        let c = schema.host("c");
        let mut tc = Txn::default();
        tc.set("absent", b"c".to_vec());
        c.commit(&[tc.into_commit("h", None, Vec::new())])?;
        c.end_batch("h");
        let mut txn = Txn::default();
        assert_eq!(
            txn.get(&a, "h", "absent")?,
            None,
            "answered from the read-ahead"
        );
        assert_eq!(txn.get(&a, "h", "k")?.as_deref(), Some(&b"1"[..]));
        assert_eq!(
            txn.get(&a, "h", "big")?,
            Some(big),
            "a large value is read when asked"
        );
        // ...and creating it too is caught at commit: c's write stays.
        txn.set("absent", b"a".to_vec());
        txn.set("k", b"10".to_vec());
        assert!(matches!(
            a.commit(&[txn.into_commit("h", None, Vec::new())])?[0],
            CommitOutcome::Conflict { .. }
        ));
        a.end_batch("h");
        assert_eq!(value(&a, "absent").as_deref(), Some("c"));
        // The failed batch released k: b's increment goes through.
        let (outcome, _b) = waiter.join().expect("thread")?;
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));
        assert_eq!(value(&a, "k").as_deref(), Some("2"));
        Ok(())
    }

    #[test]
    fn a_key_read_as_absent_that_another_host_creates_meanwhile_fails_the_batch() -> Result<()> {
        let schema = Schema::new();
        // A schema as the first version left it (no absence check) is
        // brought up to date by the next host to start.
        drop(schema.host("old"));
        schema.sql(
            "DROP FUNCTION still_absent(text, bytea[]);
             DROP FUNCTION delete_keys(text, bytea[]);
             UPDATE meta SET value = '1' WHERE key = 'schema_version'",
        );
        let (a, c) = (schema.host("a"), schema.host("c"));
        let mut txn = Txn::default();
        assert_eq!(txn.get(&a, "h", "flag")?, None);
        // c creates the key while a's batch goes on its absence...
        let mut tc = Txn::default();
        tc.set("flag", b"on".to_vec());
        c.commit(&[tc.into_commit("h", None, Vec::new())])?;
        c.end_batch("h");
        // ...and writes another key on that basis: the batch runs again.
        txn.set("other", b"1".to_vec());
        assert!(matches!(
            a.commit(&[txn.into_commit("h", None, Vec::new())])?[0],
            CommitOutcome::Conflict { .. }
        ));
        a.end_batch("h");
        assert_eq!(value(&a, "other"), None);
        let mut txn = Txn::default();
        assert_eq!(txn.get(&a, "h", "flag")?.as_deref(), Some(&b"on"[..]));
        a.end_batch("h");
        Ok(())
    }

    /// Batch statements find rows by `= ANY($n)`. Sent as the host sends
    /// them (unnamed, typed: planned with the keys every time), each goes
    /// by the primary key, not by a scan of the namespace — again and
    /// again, past the point where a prepared statement would switch to a
    /// generic plan (the fleet bench's 400 µs of PostgreSQL CPU per event).
    #[test]
    fn statements_by_many_keys_find_them_by_the_primary_key() -> Result<()> {
        let schema = Schema::new();
        let store = Postgres::connect(&url(), &schema.0, "a")?;
        // A namespace of many rows, not analysed yet, as a new fleet's is.
        schema.sql(
            "INSERT INTO kv SELECT 'h', convert_to('k' || g, 'UTF8'), 'v'
                 FROM generate_series(1, 5000) g;
             INSERT INTO processed SELECT 'h', convert_to('m' || g, 'UTF8'), 0
                 FROM generate_series(1, 5000) g;",
        );
        // As many keys as a batch reads ahead: with a few, PostgreSQL
        // used the whole index even for `= ANY`; with a batch's worth, on
        // a table it has no statistics for, it scanned the namespace.
        let names: Vec<String> = (0..100).map(|i| format!("k{}", i * 50 + 1)).collect();
        let keys: Vec<&[u8]> = names.iter().map(|k| k.as_bytes()).collect();
        let cap = READ_AHEAD_VALUE_BYTES;
        let cases: [(&Typed, Vec<&(dyn ToSql + Sync)>); 3] = [
            (&LOCK_MANY, vec![&"h", &keys]),
            (&READ_AHEAD, vec![&"h", &keys, &cap]),
            (&PROCESSED_MANY, vec![&"h", &keys]),
        ];
        let functions = ["SELECT 1 FROM unnest($2::bytea[]) AS u(k),
             LATERAL (SELECT 1 FROM kv WHERE ns = $1 AND key = u.k OFFSET 0) r"];
        // A fresh plan (with the keys), or the generic one a prepared
        // statement may settle on.
        let explain = |sql: &str, types: &[Type], params: &[&(dyn ToSql + Sync)], mode: &str| {
            store.with_conn(|c| {
                let params: Vec<(&(dyn ToSql + Sync), Type)> = params
                    .iter()
                    .zip(types)
                    .map(|(p, t)| (*p, t.clone()))
                    .collect();
                c.wait(
                    c.client
                        .batch_execute(&format!("SET plan_cache_mode = {mode}")),
                )?;
                let rows = c.wait(c.client.query_typed(&format!("EXPLAIN {sql}"), &params))?;
                Ok(rows
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
                    .join("\n"))
            })
        };
        let by_key = |sql: &str, plan: &str| {
            assert!(
                plan.contains("Index Cond")
                    && (plan.contains("key = u.k") || plan.contains("message_id = u.id"))
                    && !plan.contains("Filter")
                    && !plan.contains("Bitmap")
                    && !plan.contains("Seq Scan"),
                "{sql}:\n{plan}"
            );
        };
        for mode in ["force_custom_plan", "force_generic_plan"] {
            for (typed, params) in &cases {
                by_key(typed.sql, &explain(typed.sql, typed.types, params, mode)?);
            }
            // What the functions run (still_absent; delete_keys deletes
            // one key at a time).
            for sql in functions {
                let types = [Type::TEXT, Type::BYTEA_ARRAY];
                by_key(sql, &explain(sql, &types, &[&"h", &keys], mode)?);
            }
        }
        store.with_conn(|c| Ok(c.wait(c.client.batch_execute("RESET plan_cache_mode"))?))?;
        store.with_conn(|c| {
            let body: String = c
                .wait(c.client.query_one(
                    "SELECT prosrc FROM pg_proc WHERE proname = 'still_absent'
                 AND pronamespace = current_schema()::regnamespace",
                    &[],
                ))?
                .get(0);
            assert!(
                body.contains("LATERAL (SELECT 1 FROM kv WHERE ns = p_ns AND key = u.k OFFSET 0)"),
                "{body}"
            );
            Ok(())
        })?;
        // And they do their work.
        let absent: Vec<&[u8]> = vec![b"nope", b"neither"];
        store.with_conn(|c| {
            c.wait(c.client.query_typed(
                "SELECT still_absent($1, $2::bytea[])",
                &[(&"h", Type::TEXT), (&absent, Type::BYTEA_ARRAY)],
            ))?;
            let err = c
                .wait(c.client.query_typed(
                    "SELECT still_absent($1, $2::bytea[])",
                    &[(&"h", Type::TEXT), (&keys, Type::BYTEA_ARRAY)],
                ))
                .expect_err("present keys are not absent");
            assert_eq!(err.code(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
            c.wait(c.client.query_typed(
                DELETE_MANY.sql,
                &[(&"h", Type::TEXT), (&keys, Type::BYTEA_ARRAY)],
            ))?;
            let left: i64 = c
                .wait(c.client.query_one("SELECT count(*) FROM kv", &[]))?
                .get(0);
            assert_eq!(left, 4900);
            Ok(())
        })?;
        Ok(())
    }

    #[test]
    fn a_key_two_hosts_create_at_once_is_created_once() -> Result<()> {
        let schema = Schema::new();
        let (a, b) = (schema.host("a"), schema.host("b"));
        // Both read "new" as absent (nothing to lock), both insert.
        let mut ta = Txn::default();
        let mut tb = Txn::default();
        assert_eq!(ta.get(&a, "h", "new")?, None);
        assert_eq!(tb.get(&b, "h", "new")?, None);
        ta.set("new", b"a".to_vec());
        tb.set("new", b"b".to_vec());
        assert!(matches!(
            a.commit(&[ta.into_commit("h", None, Vec::new())])?[0],
            CommitOutcome::Committed { .. }
        ));
        a.end_batch("h");
        assert!(matches!(
            b.commit(&[tb.into_commit("h", None, Vec::new())])?[0],
            CommitOutcome::Conflict { .. }
        ));
        b.end_batch("h");
        assert_eq!(value(&a, "new").as_deref(), Some("a"));
        Ok(())
    }

    #[test]
    fn keys_and_ids_with_nul_are_stored_and_listed_in_byte_order() -> Result<()> {
        let schema = Schema::new();
        let a = schema.host("a");
        let mut txn = Txn::default();
        for key in ["b", "a\0z", "\u{e9}", "B"] {
            txn.set(key, key.as_bytes().to_vec());
        }
        let out = a.commit(&[txn.into_commit("h", Some("id\0x".into()), Vec::new())])?;
        assert!(matches!(out[0], CommitOutcome::Committed { .. }));
        assert!(a.is_processed("h", "id\0x")?);
        a.end_batch("h");
        assert_eq!(a.list_keys("h", None, 10)?, ["B", "a\0z", "b", "\u{e9}"]);
        a.end_batch("h");
        assert_eq!(value(&a, "a\0z").as_deref(), Some("a\0z"));
        Ok(())
    }

    #[test]
    fn old_dedupe_records_are_pruned() -> Result<()> {
        let schema = Schema::new();
        let a = schema.host("a");
        increment(&a, "k", Some("fresh"))?;
        schema.sql("INSERT INTO processed (ns, message_id, at) VALUES ('h', 'old', 0)");
        assert_eq!(a.prune_processed(3600)?, 1);
        assert!(a.is_processed("h", "fresh")?);
        a.end_batch("h");
        Ok(())
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/state?sslmode=disable"),
            "postgres://app:***@db:5432/state?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://app@db/state?password=s3cret&x=1"),
            "postgres://app@db/state?password=***&x=1"
        );
        assert_eq!(
            redact_url("host=db user=app password=s3cret dbname=state"),
            "host=db user=app password=*** dbname=state"
        );
        assert_eq!(redact_url("postgres://db/state"), "postgres://db/state");
    }

    #[test]
    fn a_failed_connection_names_the_database_without_its_password() {
        // Port 1: nothing listens. Wrong password on the real server:
        // refused by authentication (trust auth accepts it, so only the
        // unreachable case is certain to fail here).
        let err = StateStore::postgres("postgres://app:pw-s3cret@127.0.0.1:1/state", "s", "h")
            .err()
            .expect("nothing listens on port 1");
        let text = format!("{err:#} {err:?}");
        assert!(!text.contains("pw-s3cret"), "{text}");
        assert!(
            text.contains("postgres://app:***@127.0.0.1:1/state"),
            "{text}"
        );
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(check_schema("event_host").is_ok());
        assert!(check_schema("fleet_2").is_ok());
        for bad in ["", "Event", "a-b", "x\"; DROP", "1abc", &"a".repeat(64)] {
            assert!(check_schema(bad).is_err(), "{bad:?}");
        }
    }
}
