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
//!   serving;
//! - a deleted file's handler stops consuming; its queue stays, and its
//!   events wait there until a file for it returns.
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
            tokio::select! {
                changed = rx.recv() => if changed.is_none() { return Ok(()) },
                _ = tokio::time::sleep(RESCAN) => {}
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
        for path in &present {
            self.look_at(path, &present).await;
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            self.registry.clear_broken(&path);
            let Some(seen) = self.files.remove(&path) else {
                continue;
            };
            let Some(entry) = seen.handler.and_then(|h| self.registry.get(&h)) else {
                continue;
            };
            // Not if another file provides it now (a rename, a move).
            let still_provided = self
                .files
                .iter()
                .any(|(p, s)| s.handler.as_deref() == Some(entry.name()) && present.contains(p));
            if !still_provided && entry.lifecycle() != Lifecycle::Removed {
                entry.remove();
                tracing::warn!(handler = entry.name(), file = %path.display(), "handler file deleted: consumer stopped, its queue keeps the events");
            }
        }
        self.metrics
            .broken_files
            .set(self.registry.broken().len() as i64);
    }

    async fn look_at(&mut self, path: &Path, present: &[PathBuf]) {
        let Ok(meta) = std::fs::metadata(path) else {
            return; // gone since the listing; the next pass removes it
        };
        let (len, modified) = (meta.len(), meta.modified().ok());
        let known = self.files.get(path);
        if known.is_some_and(|s| s.len == len && s.modified == modified) {
            return;
        }
        let max = self.runtime.config().max_component_mb << 20;
        let bytes = if len > max {
            Err(anyhow!(
                "component is {len} bytes, over the {} MiB limit",
                self.runtime.config().max_component_mb
            ))
        } else {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        // Still being written: wait for the writer's next event.
        if std::fs::metadata(path).is_ok_and(|m| m.len() != len || m.modified().ok() != modified) {
            return;
        }
        let sha256 = match &bytes {
            Ok(b) => handler::sha256_hex(b),
            Err(_) => format!("size {len}"),
        };
        if known.is_some_and(|s| s.sha256 == sha256) {
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
                handler: previous_handler,
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
            return self.refuse(path, &sha256, &e);
        }
        if let Err(e) = self.activate(Arc::new(version), started).await {
            return self.refuse(path, &sha256, &e);
        }
        if let Some(s) = self.files.get_mut(path) {
            s.handler = Some(name);
        }
        self.registry.clear_broken(path);
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
