//! Support for tests against a real PostgreSQL: where the server is, and a
//! schema of a test's own that is gone when the test ends (passed or
//! failed).
//!
//! The server is `EVENT_HOST_TEST_POSTGRES_URL`, else the local one
//! `scripts/ensure-postgres.sh` starts (trust auth from loopback, user
//! `postgres`, database `test`). Each test works in its own schema, so
//! runs never see each other's tables; the host creates the tables itself
//! (`state_schema`), so a [`TestSchema`] starts out absent.

#![allow(dead_code)] // each test uses a subset

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use event_host::state::StateStore;
use tokio_postgres::{NoTls, Row};

/// The PostgreSQL server the tests use.
pub fn postgres_url() -> String {
    std::env::var("EVENT_HOST_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema name no other test (or concurrent run) uses, dropped with
/// everything in it when this is dropped — also while a failing test
/// unwinds.
pub struct TestSchema {
    name: String,
}

impl TestSchema {
    /// A fresh name, `<tag>_<pid>_<n>` (`tag`: lowercase letters, digits
    /// and `_`, as `state_schema` takes). Nothing of that name exists
    /// afterwards: a leftover of an earlier run with the same pid is
    /// dropped.
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let schema = Self {
            name: format!(
                "{tag}_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
        };
        schema
            .drop_schema()
            .unwrap_or_else(|e| panic!("test PostgreSQL at {}: {e:#}", redacted()));
        schema
    }

    /// The schema's name (`state_schema`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shared state store in this schema, as host `host_id` opens it
    /// (creating the schema's tables when they are not there yet).
    pub fn store(&self, host_id: &str) -> Result<StateStore> {
        StateStore::postgres(&postgres_url(), &self.name, host_id)
            .with_context(|| format!("opening state in schema {}", self.name))
    }

    /// Run `sql` (one statement, `$n` parameters) with this schema first
    /// on the search path: its rows.
    pub fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let search_path = format!("SET search_path TO \"{}\"", self.name);
        with_client(|client| async move {
            client.batch_execute(&search_path).await?;
            client.query(sql, params).await
        })
        .with_context(|| format!("{sql} (schema {})", self.name))
    }

    fn drop_schema(&self) -> Result<()> {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name);
        with_client(|client| async move { client.batch_execute(&sql).await })
            .with_context(|| format!("dropping schema {}", self.name))
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        if let Err(e) = self.drop_schema() {
            eprintln!("test schema {} left behind: {e:#}", self.name);
        }
    }
}

/// The server URL without its password, for messages.
fn redacted() -> String {
    event_host::state::redact_url(&postgres_url())
}

/// Run `f` on a fresh connection, on a small runtime of its own (tests
/// are synchronous).
fn with_client<F, Fut, T>(f: F) -> Result<T>
where
    F: FnOnce(tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the PostgreSQL client")?;
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&postgres_url(), NoTls)
            .await
            .with_context(|| format!("connecting to {}", redacted()))?;
        let io = tokio::spawn(connection);
        let out = f(client).await.map_err(anyhow::Error::from);
        // The client is dropped by now: the connection ends.
        let _ = io.await;
        out
    })
}
