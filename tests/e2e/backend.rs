//! Which state backend the suite's hosts run on. The suite runs twice
//! (`scripts/test.sh`): on embedded SQLite, and with
//! `EVENT_HOST_TEST_STATE=postgres` on PostgreSQL — every host then gets
//! `state_url` and a schema of its own, derived from its state folder so
//! a restarted host (same folder) finds its state again, and the tests
//! that read a host's state back open the same schema.
//!
//! The PostgreSQL run's schemas live in the database
//! `EVENT_HOST_TEST_POSTGRES_URL` names; `scripts/test.sh` creates a
//! database for the run and drops it afterwards.

#![allow(dead_code)] // each test uses a subset

use std::path::Path;
use std::process::Command;

use event_host::state::{Durability, StateStore};
use sha2::{Digest, Sha256};

pub use crate::pg_support::postgres_url;

/// True when this run puts every host's state on PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var("EVENT_HOST_TEST_STATE").is_ok_and(|v| v == "postgres")
}

/// A stable name derived from a state folder's absolute path.
fn derived(prefix: &str, state_dir: &Path) -> String {
    let path = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let digest = Sha256::digest(path.to_string_lossy().as_bytes());
    format!("{prefix}{}", &hex::encode(digest)[..20])
}

/// The schema of the host whose state folder is `state_dir`.
pub fn schema_for(state_dir: &Path) -> String {
    derived("suite_", state_dir)
}

/// Its host id: fixed per folder, so a restarted host relays the outbox
/// rows it claimed before (as a container keeps its hostname).
pub fn host_id_for(state_dir: &Path) -> String {
    derived("host-", state_dir)
}

/// Config lines that put the host with state folder `state_dir` on this
/// run's backend (none on SQLite).
pub fn config_lines(state_dir: &Path) -> String {
    if !on_postgres() {
        return String::new();
    }
    format!(
        "state_url = {:?}\nstate_schema = {:?}\nhost_id = {:?}\n",
        postgres_url(),
        schema_for(state_dir),
        host_id_for(state_dir)
    )
}

/// The same for a host process, through its environment (which wins
/// over its config file, as `EVENT_HOST_*` settings do).
pub fn apply_env(cmd: &mut Command, state_dir: &Path) {
    if on_postgres() {
        cmd.env("EVENT_HOST_STATE_URL", postgres_url())
            .env("EVENT_HOST_STATE_SCHEMA", schema_for(state_dir))
            .env("EVENT_HOST_HOST_ID", host_id_for(state_dir));
    }
}

/// Keep a host process on embedded state whatever the run's backend: for
/// what only embedded state does.
pub fn embedded(cmd: &mut Command) {
    for name in [
        "EVENT_HOST_STATE_URL",
        "EVENT_HOST_STATE_SCHEMA",
        "EVENT_HOST_HOST_ID",
    ] {
        cmd.env_remove(name);
    }
}

/// The state of the host with state folder `state_dir`, as that host
/// sees it (opened while it does not run, for embedded state).
pub fn open_state(state_dir: &Path) -> StateStore {
    if on_postgres() {
        StateStore::postgres(
            &postgres_url(),
            &schema_for(state_dir),
            &host_id_for(state_dir),
        )
        .expect("the test PostgreSQL")
    } else {
        StateStore::open(state_dir, Durability::Normal).expect("the host's state folder")
    }
}
