//! Shared test and benchmark support: building the guest components once,
//! and small helpers around the runtime.

#![allow(dead_code)] // each user (test binary, benchmark) uses a subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_owned()
}

/// Build every guest (release, wasm32-wasip2) once per process and return
/// the folder holding the `.wasm` files. Cargo makes this a no-op when
/// nothing changed, so tests never need a manual build step.
pub fn guests_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let guests = repo_root().join("guests");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&guests)
            .args(["build", "--release", "--quiet"]);
        // Settings meant for the host build must not leak into the guests'.
        for var in [
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTC_WORKSPACE_WRAPPER",
            "CARGO_MAKEFLAGS",
        ] {
            cmd.env_remove(var);
        }
        let status = cmd.status().expect("running cargo to build the guests");
        assert!(status.success(), "building the guests failed");
        guests.join("target/wasm32-wasip2/release")
    })
}

/// Path of one built guest, by crate name (`order-publisher` or
/// `order_publisher`), or a `.wasm` file built elsewhere, by its path (the
/// Python guest).
pub fn guest(name: &str) -> PathBuf {
    if name.ends_with(".wasm") {
        return PathBuf::from(name);
    }
    guests_dir().join(format!("{}.wasm", name.replace('-', "_")))
}

/// A fresh folder holding copies of the named guests, as a handlers dir.
pub fn handlers_dir(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in names {
        std::fs::copy(guest(name), dir.path().join(format!("{name}.wasm"))).expect("copy guest");
    }
    dir
}

use std::collections::HashMap;
use std::sync::Arc;

use event_host::config::Config;
use event_host::dispatch::{Delivery, Dispatcher, Handled};
use event_host::handler::HandlerVersion;
use event_host::runtime::Runtime;
use event_host::state::StateStore;

/// A runtime, an in-memory state store and some loaded guests.
pub struct Harness {
    pub dispatcher: Dispatcher,
    pub handlers: HashMap<String, Arc<HandlerVersion>>,
}

impl Harness {
    /// Load the named guests with this config text.
    pub fn new(names: &[&str], config_toml: &str) -> Self {
        let config = Config::parse(config_toml).expect("test config parses");
        let runtime = Arc::new(Runtime::new(config.runtime.clone()).expect("runtime"));
        let mut handlers = HashMap::new();
        for name in names {
            let v = event_host::handler::load_file(&runtime, &config, &guest(name))
                .expect("guest loads");
            handlers.insert(v.name.to_string(), Arc::new(v));
        }
        let dispatcher = Dispatcher::new(runtime, StateStore::in_memory().expect("state"));
        Self {
            dispatcher,
            handlers,
        }
    }

    /// Dispatch `payload` to handler `name` as a fresh delivery.
    pub fn send(&self, name: &str, payload: &str) -> Handled {
        self.send_delivery(
            name,
            Delivery {
                payload: payload.as_bytes().to_vec(),
                exchange: "test".into(),
                attempt: 1,
                ..Delivery::default()
            },
        )
    }

    /// Dispatch a prepared delivery.
    pub fn send_delivery(&self, name: &str, delivery: Delivery) -> Handled {
        let handler = self.handlers.get(name).expect("handler loaded");
        self.dispatcher
            .dispatch(handler, &delivery)
            .expect("no host fault")
    }

    /// Committed state of `key` for handler `name`, as text.
    pub fn state(&self, name: &str, key: &str) -> Option<String> {
        self.dispatcher
            .state()
            .get(name, key)
            .expect("state read")
            .map(|v| String::from_utf8(v).expect("utf-8 state"))
    }
}

/// A built guest with a custom section appended: the same code in a
/// different file (another sha256), as a rebuild of the handler would be.
pub fn variant(name: &str, tag: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(guest(name)).unwrap();
    let section = b"event-host-test";
    let mut payload = leb128(section.len());
    payload.extend_from_slice(section);
    payload.extend_from_slice(tag.as_bytes());
    bytes.push(0); // custom section id
    bytes.extend(leb128(payload.len()));
    bytes.extend(payload);
    bytes
}

fn leb128(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// The documented safe install: write a dot-file beside it, rename.
pub fn install(dir: &Path, file: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{file}.partial"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}
