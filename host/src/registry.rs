//! The live set of handlers: which version serves each one, and whether it
//! is really consuming. `/readyz` and `/handlers` read it; the serving loop
//! and (later) the folder watcher write it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::broker::Topology;
use crate::handler::HandlerVersion;

/// Where a handler's consumer stands.
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
}

impl Status {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Status::Consuming,
            2 => Status::Disconnected,
            _ => Status::Starting,
        }
    }
}

/// One handler as the host serves it.
pub struct Entry {
    /// The version new deliveries go to. Events in flight keep the `Arc`
    /// they started with.
    version: RwLock<Arc<HandlerVersion>>,
    /// Queue names.
    pub topology: Topology,
    status: AtomicU8,
}

impl Entry {
    /// A handler entry for `version`.
    pub fn new(version: Arc<HandlerVersion>) -> Self {
        Self {
            topology: Topology::new(&version.settings.broker),
            version: RwLock::new(version),
            status: AtomicU8::new(Status::Starting as u8),
        }
    }

    /// The version serving new deliveries.
    pub fn version(&self) -> Arc<HandlerVersion> {
        self.version
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Current status.
    pub fn status(&self) -> Status {
        Status::from_u8(self.status.load(Ordering::Acquire))
    }

    /// Record a status change.
    pub fn set_status(&self, status: Status) {
        self.status.store(status as u8, Ordering::Release);
    }
}

/// All handlers, by name.
#[derive(Default)]
pub struct Registry {
    entries: RwLock<BTreeMap<String, Arc<Entry>>>,
}

impl Registry {
    /// Add (or replace) a handler.
    pub fn insert(&self, version: Arc<HandlerVersion>) -> Arc<Entry> {
        let entry = Arc::new(Entry::new(version));
        let name = entry.version().name.to_string();
        self.write().insert(name, entry.clone());
        entry
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

    /// Ready when there is at least one handler and every one is consuming.
    pub fn ready(&self) -> bool {
        let entries = self.entries();
        !entries.is_empty() && entries.iter().all(|e| e.status() == Status::Consuming)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Entry>>> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }
}
