//! Handlers in Python: the port of inventory in `guests/inventory-py`,
//! built with componentize-py (installed from PyPI by its build.sh, into a
//! cache reused across runs), behaves as the Rust one — the same state and
//! the same publishes, byte for byte, over normal orders, malformed input,
//! unknown items, out of stock and redelivered ids (its `parity.sh`).

use std::process::Command;

use crate::process::run_to_end;
use crate::support::{guest, repo_root};

#[test]
fn the_python_inventory_behaves_as_the_rust_one() {
    if crate::backend::on_postgres() {
        // Replay with state of its own: nothing here depends on the
        // backend, and the SQLite pass ran it.
        return;
    }
    let mut parity = Command::new(repo_root().join("guests/inventory-py/parity.sh"));
    parity
        .env("EVENT_HOST", env!("CARGO_BIN_EXE_event-host"))
        .env("RUST_WASM", guest("inventory"));
    let (ok, out, err) = run_to_end(parity);
    let said = out + &err;
    assert!(ok, "{said}");
    assert!(
        said.contains("parity: the Python and Rust inventory handlers behave the same"),
        "{said}"
    );
    // Every scenario ran.
    assert!(said.matches("same: ").count() >= 6, "{said}");
}
