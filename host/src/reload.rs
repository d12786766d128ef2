//! Hot reload: keep the registry in step with the handlers folder.
//!
//! The folder is watched with `notify`; after a quiet period (debounce) the
//! whole folder is reconciled against what the host last saw, so the kind
//! of filesystem event never matters and a missed event is caught by the
//! next one (or the periodic rescan). For each `.wasm` file:
//!
//! - unchanged (size, mtime, then sha256) — nothing;
//! - new content — read, size-capped, compiled on a blocking thread with a
//!   timeout (or taken from the compiled-code cache), checked against the
//!   world, its manifest read; its topology is declared when connected;
//!   only then is it swapped in. A handler name not seen before starts
//!   consuming; a known one gets a new version (batches already running
//!   finish on theirs);
//! - a file that fails any step is refused: reported once per content in
//!   the log, `/handlers` and `/metrics`, and the old version keeps
//!   serving. A refusal by the broker (declaring its topology failed) is
//!   not final: the unchanged file is tried again on the next pass or
//!   connection;
//! - a deleted file's handler stops consuming; its queue stays, and its
//!   events wait there until a file for it returns. A file refused because
//!   another file provides its handler takes over when that one goes; a
//!   file replaced by a component of another handler stops the old one
//!   the same way.
//!
//! Dot-files are ignored: the safe install is to write `.name.wasm` (or
//! anywhere else on the same filesystem) and rename it into place, which
//! is atomic. A file written in place is read only once it has stopped
//! changing, and a half-written component fails validation, so it is
//! refused, never activated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context, Result};
use lapin::Connection;
use notify::Watcher;
use tokio::sync::{mpsc, watch};

use crate::broker;
use crate::config::Config;
use crate::handler::{self, HandlerVersion};
use crate::metrics::Metrics;
use crate::registry::{BrokenFile, Entry, Lifecycle, Registry};
use crate::runtime::Runtime;

/// How often the folder is rescanned even without events, in case the
/// filesystem dropped one (network filesystems, overflowing queues).
const RESCAN: Duration = Duration::from_secs(5);

/// What a file held when the reloader last looked at it.
#[derive(Debug, Clone)]
struct Seen {
    len: u64,
    modified: Option<SystemTime>,
    sha256: String,
    /// The handler it provides, when it loaded.
    handler: Option<String>,
    /// The handler it was refused for because another file provides it:
    /// reconsidered when that file goes away.
    conflict: Option<String>,
    /// Refused for a reason that may pass (the broker failing to declare
    /// its topology): tried again on the next pass even though unchanged.
    retry: bool,
}

/// Loads, swaps and removes handlers as the folder changes.
pub struct Reloader {
    runtime: Arc<Runtime>,
    config: Arc<Config>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// The live broker connection, when there is one.
    conn: watch::Receiver<Option<Arc<Connection>>>,
    files: HashMap<PathBuf, Seen>,
}

impl Reloader {
    /// A reloader for `config.handlers_dir`.
    pub fn new(
        runtime: Arc<Runtime>,
        config: Arc<Config>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        conn: watch::Receiver<Option<Arc<Connection>>>,
    ) -> Self {
        Self {
            runtime,
            config,
            registry,
            metrics,
            conn,
            files: HashMap::new(),
        }
    }

    /// Watch the folder until `stop` turns true, reconciling after every
    /// burst of changes.
    pub async fn watch(mut self, mut stop: watch::Receiver<bool>) -> Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Kept so the channel stays open even with no watcher.
        let _events = tx.clone();
        // Without folder events (inotify limits, some network filesystems)
        // the periodic rescan still picks changes up, only later.
        let _watcher = match watch_folder(&self.config.handlers_dir, tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "{e:#}; checking the handlers folder every {} s instead",
                    RESCAN.as_secs()
                );
                None
            }
        };
        let debounce = Duration::from_millis(self.config.reload_debounce_ms);
        loop {
            let mut conn = self.conn.clone();
            conn.mark_unchanged();
            tokio::select! {
                changed = rx.recv() => if changed.is_none() { return Ok(()) },
                _ = tokio::time::sleep(RESCAN) => {}
                // Back at the broker: a file whose topology it failed to
                // declare is tried again now rather than at the next rescan.
                _ = conn.changed(), if self.files.values().any(|s| s.retry) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            // Quiet period: a writer's burst of events becomes one pass.
            while let Ok(Some(_)) = tokio::time::timeout(debounce, rx.recv()).await {}
            self.reconcile().await;
        }
    }

    /// One pass over the folder: load what changed, remove what is gone.
    pub async fn reconcile(&mut self) {
        let dir = self.config.handlers_dir.clone();
        let present = match handler::wasm_files(&dir) {
            Ok(files) => files,
            Err(e) => {
                tracing::error!("{e:#}");
                return;
            }
        };
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        let mut orphaned = Vec::new();
        for path in gone {
            self.registry.clear_broken(&path);
            if let Some(handler) = self.files.remove(&path).and_then(|s| s.handler) {
                orphaned.push((handler, path));
            }
        }
        for path in &present {
            self.look_at(path, &present).await;
        }
        // A file refused because another provided its handler takes over
        // once none does (that file deleted, or replaced by another
        // handler's), before the handler would be stopped.
        let unprovided: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|(_, s)| {
                s.conflict
                    .as_ref()
                    .is_some_and(|h| !self.files.values().any(|o| o.handler.as_ref() == Some(h)))
            })
            .map(|(p, _)| p.clone())
            .collect();
        for path in unprovided {
            self.files.remove(&path);
            self.look_at(&path, &present).await;
        }
        for (handler, path) in orphaned {
            self.stop_unless_provided(&handler, &path);
        }
        self.metrics
            .broken_files
            .set(self.registry.broken().len() as i64);
    }

    fn connected(&self) -> bool {
        self.conn
            .borrow()
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// `path` no longer provides `handler`: stop it (its queue stays)
    /// unless another file provides it now (a rename, a move, a file that
    /// lost a name conflict).
    fn stop_unless_provided(&self, handler: &str, path: &Path) {
        let Some(entry) = self.registry.get(handler) else {
            return;
        };
        let still_provided = self
            .files
            .values()
            .any(|s| s.handler.as_deref() == Some(handler));
        if !still_provided && entry.lifecycle() != Lifecycle::Removed {
            entry.remove();
            tracing::warn!(handler, file = %path.display(), "handler file deleted or replaced: consumer stopped, its queue keeps the events");
        }
    }

    async fn look_at(&mut self, path: &Path, present: &[PathBuf]) {
        let Ok(meta) = std::fs::metadata(path) else {
            return; // gone since the listing; the next pass removes it
        };
        let (len, modified) = (meta.len(), meta.modified().ok());
        let known = self.files.get(path);
        let unchanged = known.is_some_and(|s| s.len == len && s.modified == modified);
        // A retry waits for a connection: without one the topology would
        // only be declared by the next session, which a topology the
        // broker refuses for good would then end, again and again.
        if unchanged && (known.is_some_and(|s| !s.retry) || !self.connected()) {
            return;
        }
        // Reading and hashing up to `max_component_mb` is blocking work:
        // off the async threads.
        let max_mb = self.runtime.config().max_component_mb;
        let file = path.to_owned();
        let read = tokio::task::spawn_blocking(move || read_component(&file, len, max_mb)).await;
        let (bytes, sha256) = match read {
            Ok(read) => read,
            Err(e) => (Err(anyhow!("reading panicked: {e}")), format!("size {len}")),
        };
        // Still being written: wait for the writer's next event.
        if std::fs::metadata(path).is_ok_and(|m| m.len() != len || m.modified().ok() != modified) {
            return;
        }
        let known = self.files.get(path);
        if known.is_some_and(|s| !s.retry && s.sha256 == sha256) {
            if let Some(s) = self.files.get_mut(path) {
                s.len = len;
                s.modified = modified;
            }
            return;
        }
        let previous_handler = known.and_then(|s| s.handler.clone());
        self.files.insert(
            path.to_owned(),
            Seen {
                len,
                modified,
                sha256: sha256.clone(),
                handler: previous_handler.clone(),
                conflict: None,
                retry: false,
            },
        );
        let started = Instant::now();
        let loaded = match bytes {
            Ok(bytes) => self.load(path, bytes).await,
            Err(e) => Err(e),
        };
        let version = match loaded {
            Ok(v) => v,
            Err(e) => return self.refuse(path, &sha256, &e),
        };
        let name = version.name.to_string();
        // Another present file already provides this handler?
        if let Some((other, _)) = self.files.iter().find(|(p, s)| {
            p.as_path() != path && s.handler.as_deref() == Some(&name) && present.contains(p)
        }) {
            let e = anyhow!(
                "{} also declares handler {name:?}; remove one of them",
                other.display()
            );
            if let Some(s) = self.files.get_mut(path) {
                s.conflict = Some(name);
            }
            return self.refuse(path, &sha256, &e);
        }
        if let Err(e) = self.activate(Arc::new(version), started).await {
            // Only the broker can refuse a loaded version here, and it may
            // accept it next time (a blip, a conflicting declaration since
            // removed): try again on the next pass or connection.
            if let Some(s) = self.files.get_mut(path) {
                s.retry = true;
            }
            return self.refuse(path, &sha256, &e);
        }
        if let Some(s) = self.files.get_mut(path) {
            s.handler = Some(name.clone());
        }
        self.registry.clear_broken(path);
        // The file used to provide another handler: that one stops.
        if let Some(old) = previous_handler.filter(|old| *old != name) {
            self.stop_unless_provided(&old, path);
        }
    }

    /// Compile and check off the async threads, within the load timeout.
    async fn load(&self, path: &Path, bytes: Vec<u8>) -> Result<HandlerVersion> {
        let (runtime, config, path) = (self.runtime.clone(), self.config.clone(), path.to_owned());
        let timeout = Duration::from_secs(self.config.load_timeout_secs.max(1));
        let task = tokio::task::spawn_blocking(move || {
            let cache = config.cache_dir();
            handler::load_bytes(&runtime, &config, &path, &bytes, Some(&cache))
        });
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(anyhow!("loading panicked: {e}")),
            // The compile keeps its blocking thread until it ends; its result
            // is dropped.
            Err(_) => Err(anyhow!(
                "compiling took longer than {} s (load_timeout_secs)",
                timeout.as_secs()
            )),
        }
    }

    /// Put a loaded version in service: declare its topology (when
    /// connected), then swap it in or add the handler.
    async fn activate(&self, version: Arc<HandlerVersion>, started: Instant) -> Result<()> {
        let entry = self.registry.get(&version.name);
        if let Some(entry) = &entry {
            let current = entry.version();
            if current.sha256 == version.sha256 {
                // Same content back (restored after a delete, or copied
                // over itself): serve it again if it had stopped.
                if entry.lifecycle() == Lifecycle::Removed {
                    entry.swap(current);
                    tracing::info!(handler = %version.name, "handler file restored: consuming again");
                }
                return Ok(());
            }
            if entry.refused(&version.sha256) {
                tracing::warn!(handler = %version.name, version = %version.short_version(), "not activating a version the host rolled back from; drop a new one");
                return Ok(());
            }
        }
        // A version with the same subscriptions, output exchanges and
        // queues as the one it replaces needs nothing new at the broker.
        let unchanged = entry.as_ref().is_some_and(|e| {
            let current = e.version();
            current.settings.manifest.subscriptions == version.settings.manifest.subscriptions
                && current.settings.broker.publishes_to == version.settings.broker.publishes_to
                && current.topology == version.topology
                && e.lifecycle() == Lifecycle::Active
        });
        let conn = self.conn.borrow().clone();
        if let Some(conn) = conn.filter(|c| !unchanged && c.status().connected()) {
            declare_topology(&conn, &version).await?;
        }
        let label = Metrics::label(&version.name);
        match entry {
            Some(entry) => {
                let old = entry.swap(version.clone());
                self.metrics.paused.get_or_create(&label).set(0);
                tracing::info!(
                    handler = %version.name,
                    from = %old.short_version(),
                    to = %version.short_version(),
                    cached = version.cached,
                    ms = started.elapsed().as_millis() as u64,
                    "handler reloaded"
                );
                let conn = self.conn.borrow().clone();
                if let Some(conn) = conn {
                    remove_stale_bindings(&conn, &entry).await;
                }
            }
            None => {
                self.registry.insert(version.clone());
                tracing::info!(
                    handler = %version.name,
                    version = %version.short_version(),
                    file = %version.path.display(),
                    cached = version.cached,
                    ms = started.elapsed().as_millis() as u64,
                    "handler loaded"
                );
            }
        }
        self.metrics.reloads.get_or_create(&label).inc();
        Ok(())
    }

    fn refuse(&self, path: &Path, sha256: &str, e: &anyhow::Error) {
        let broken = BrokenFile {
            file: path.to_owned(),
            sha256: sha256.to_owned(),
            error: format!("{e:#}"),
        };
        if self.registry.set_broken(broken) {
            self.metrics.load_failures.inc();
            tracing::error!(file = %path.display(), "handler file refused, the previous version (if any) keeps serving: {e:#}");
        }
    }
}

/// A component file's bytes (or why not: too big, unreadable) and its
/// sha256 (or, unread, a stand-in naming its size, so a refusal is still
/// reported once per content).
fn read_component(path: &Path, len: u64, max_mb: u64) -> (Result<Vec<u8>>, String) {
    let bytes = if len > max_mb << 20 {
        Err(anyhow!(
            "component is {len} bytes, over the {max_mb} MiB limit"
        ))
    } else {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    };
    let sha256 = match &bytes {
        Ok(b) => handler::sha256_hex(b),
        Err(_) => format!("size {len}"),
    };
    (bytes, sha256)
}

/// Send a message on `tx` for every event in `dir` (errors included: the
/// reconcile that follows sorts them out).
fn watch_folder(dir: &Path, tx: mpsc::UnboundedSender<bool>) -> Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = tx.send(event.is_ok());
    })
    .context("starting the folder watcher")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}

/// Declare what `version` needs at the broker: its exchanges, queue,
/// bindings, retry and dead-letter path.
pub async fn declare_topology(conn: &Connection, version: &HandlerVersion) -> Result<()> {
    broker::declare(
        conn,
        &version.topology,
        &version.settings.manifest.subscriptions,
        &version.settings.broker,
    )
    .await
    .with_context(|| format!("declaring the topology of handler {}", version.name))
}

/// Remove bindings a swapped-out version had and the current one dropped.
/// Bindings that cannot be removed now (connection lost) stay recorded for
/// the next session.
pub async fn remove_stale_bindings(conn: &Connection, entry: &Entry) {
    let stale = entry.take_stale_bindings();
    if stale.is_empty() {
        return;
    }
    let queue = entry.version().topology.queue.clone();
    match broker::unbind(conn, &queue, &stale).await {
        Ok(()) => tracing::info!(
            handler = entry.name(),
            bindings = stale.len(),
            "removed bindings the new version dropped"
        ),
        Err(e) => {
            tracing::warn!(
                handler = entry.name(),
                "could not remove dropped bindings yet: {e:#}"
            );
            entry.keep_stale_bindings(stale);
        }
    }
}
