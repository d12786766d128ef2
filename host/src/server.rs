//! `event-host run`: load the handlers, serve the admin endpoint, and keep
//! a broker session alive — reconnecting with capped, jittered backoff —
//! until the shutdown future resolves.
//!
//! The shutdown is injected (as in mini-redis), so tests stop the host
//! deterministically; the binary passes SIGTERM/SIGINT.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, AdminState};
use crate::broker;
use crate::config::Config;
use crate::dispatch::{amqp, Dispatcher};
use crate::metrics::Metrics;
use crate::otlp::Exporter;
use crate::registry::{Entry, Lifecycle, Registry, Status};
use crate::reload::{declare_topology, remove_stale_bindings, Reloader};
use crate::runtime::Runtime;
use crate::split_guard::{self, Waited};
use crate::state::{Owed, StateStore};

/// How often a host on shared state looks for outbox rows that other
/// hosts left (see [`crate::state::StateStore::orphaned_outbox`]).
const ORPHAN_SCAN: Duration = Duration::from_secs(10);

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Longest `host_id` accepted.
const MAX_HOST_ID_BYTES: usize = 128;

/// Longest a connection handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Run the sidecar until `shutdown` resolves, then drain and return.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    broker::parse_url(&config.amqp_url)?;
    let config = Arc::new(config);
    let host_id = config.host_id();
    // It goes into every published message's headers and into metric
    // labels (and PostgreSQL's application_name): checked before anything
    // is opened with it.
    if host_id.len() > MAX_HOST_ID_BYTES {
        anyhow::bail!(
            "host_id is {} bytes; at most {MAX_HOST_ID_BYTES}",
            host_id.len()
        );
    }
    let runtime = Arc::new(Runtime::new(config.runtime.clone())?);
    // Opening PostgreSQL connects and migrates: blocking work.
    let opening = config.clone();
    let state = tokio::task::spawn_blocking(move || StateStore::from_config(&opening))
        .await
        .context("opening the state store")??;
    let mut dispatcher = Dispatcher::new(runtime.clone(), state.clone())
        .with_host_id(&host_id)
        .with_trace_context(config.trace_context)
        .with_sample_ratio(config.trace_sample_ratio);
    let mut url = crate::otlp::traces_url(config.otlp_endpoint.as_deref());
    if url.is_some() && !config.trace_context {
        // An explicit "no tracing" wins: nothing is stamped, so there is
        // nothing to export either.
        tracing::warn!("otlp_endpoint is set but trace_context = false: no spans are exported");
        url = None;
    }
    let exporter = match url {
        Some(url) => {
            // Building the HTTP client starts threads: not on the runtime.
            let id = host_id.clone();
            let exporter = tokio::task::spawn_blocking(move || Exporter::start(&url, &id))
                .await
                .context("starting OTLP export")??;
            tracing::info!(url = %crate::otlp::redact(exporter.url()), "exporting event spans over OTLP");
            let exporter = Arc::new(exporter);
            dispatcher = dispatcher.with_exporter(exporter.clone());
            Some(exporter)
        }
        None => None,
    };
    let registry = Arc::new(Registry::default());
    let metrics = Arc::new(Metrics::new());
    metrics.set_info(&host_id, state.backend_name());
    tracing::info!(host_id = %host_id, state_backend = state.backend_name(), "state opened");
    std::fs::create_dir_all(&config.handlers_dir)
        .with_context(|| format!("creating handlers folder {}", config.handlers_dir.display()))?;
    // The live connection, for the reloader to declare a new version's
    // topology before swapping it in.
    let (conn_tx, conn_rx) = watch::channel(None);
    let mut reloader = Reloader::new(
        runtime.clone(),
        config.clone(),
        registry.clone(),
        metrics.clone(),
        conn_rx,
    );
    // The first pass loads what is there; one bad file does not keep the
    // others from serving.
    reloader.reconcile().await;
    if registry.entries().is_empty() {
        tracing::warn!(folder = %config.handlers_dir.display(), "no handlers loaded; /readyz stays false until one is dropped in");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: finishing in-flight events");
        let _ = stop_tx.send(true);
    });
    let pruner = tokio::spawn(prune_dedupe(
        state.clone(),
        config.dedupe_window_secs,
        metrics.clone(),
        stop_rx.clone(),
    ));
    let admin_state = Arc::new(AdminState {
        registry: registry.clone(),
        state: state.clone(),
        metrics: metrics.clone(),
        token: config
            .admin_token
            .as_ref()
            .map(|t| t.0.clone())
            .filter(|t| !t.is_empty()),
        host_id,
        amqp_url: config.amqp_url.clone(),
        heartbeat_secs: config.heartbeat_secs,
        status: crate::status::StatusSource::new(conn_tx.subscribe()),
    });
    let mut admin_stop = stop_rx.clone();
    let (admin_addr, admin_task) = admin::serve(&config.admin_addr, admin_state, async move {
        stopped(&mut admin_stop).await;
    })
    .await?;
    tracing::info!(%admin_addr, "admin endpoint listening");
    let watcher = if config.watch {
        let stop = stop_rx.clone();
        Some(tokio::spawn(async move {
            if let Err(e) = reloader.watch(stop).await {
                tracing::error!("hot reload is off: {e:#}");
            }
        }))
    } else {
        None
    };

    let mut failures = 0u32;
    loop {
        if *stop_rx.borrow() {
            break;
        }
        match session(
            &config,
            &dispatcher,
            &registry,
            &metrics,
            &conn_tx,
            stop_rx.clone(),
            &mut failures,
        )
        .await
        {
            Ok(()) => break,
            Err(e) => {
                metrics.connected.set(0);
                for entry in registry.entries() {
                    entry.set_status(Status::Disconnected);
                }
                failures += 1;
                let delay = broker::backoff(failures);
                tracing::warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    "broker session ended: {e:#}"
                );
                let mut stop = stop_rx.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => metrics.reconnects.inc(),
                    _ = stopped(&mut stop) => break,
                };
            }
        }
    }
    let _ = admin_task.await;
    let _ = pruner.await;
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    if let Some(exporter) = exporter {
        // The last events' spans go out before the process ends.
        let _ = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Longest time between two prunes of the dedupe records.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Drop dedupe records older than `window_secs`: once at start, then every
/// [`PRUNE_EVERY`] (or every window, when shorter), on a blocking thread —
/// never on the path of an event. A failed prune is logged and tried again
/// next time; the records only take space meanwhile.
async fn prune_dedupe(
    state: StateStore,
    window_secs: u64,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let window = i64::try_from(window_secs).unwrap_or(i64::MAX);
    let every = PRUNE_EVERY.min(Duration::from_secs(window_secs.max(1)));
    loop {
        let store = state.clone();
        match tokio::task::spawn_blocking(move || store.prune_processed(window)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                metrics.dedupe_pruned.inc_by(n as u64);
                tracing::info!(records = n, window_secs, "pruned expired dedupe records");
            }
            Ok(Err(e)) => tracing::warn!("pruning dedupe records: {e:#}"),
            Err(e) => tracing::warn!("pruning dedupe records: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once the stop flag is set (the guard `wait_for` returns is not
/// `Send`, so it is dropped here rather than held across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One connection's life: connect, release any unconfirmed outbox
/// messages, then run every handler's consumer (and those of handlers the
/// watcher adds) until stopped or broken.
async fn session(
    config: &Config,
    dispatcher: &Dispatcher,
    registry: &Arc<Registry>,
    metrics: &Arc<Metrics>,
    conn_slot: &watch::Sender<Option<Arc<lapin::Connection>>>,
    stop: watch::Receiver<bool>,
    failures: &mut u32,
) -> Result<()> {
    // A broker (or a path to it) that accepts TCP but never answers would
    // hang the handshake forever; a stop request must not wait for it either.
    let connect = tokio::time::timeout(
        CONNECT_TIMEOUT,
        broker::connect(&config.amqp_url, config.heartbeat_secs),
    );
    let mut stopping = stop.clone();
    let conn = tokio::select! {
        c = connect => Arc::new(c.map_err(|_| anyhow::anyhow!(
            "no answer from the broker within {} s", CONNECT_TIMEOUT.as_secs()
        ))??),
        _ = stopped(&mut stopping) => return Ok(()),
    };
    metrics.connected.set(1);
    tracing::info!(broker = %broker::redact(&config.amqp_url), "connected");
    amqp::relay_outbox(&conn, dispatcher, registry, Owed::Mine).await?;
    conn_slot.send_replace(Some(conn.clone()));
    // On shared state, rows a host that died committed and never confirmed
    // are this host's to publish once their claim runs out.
    let orphans = dispatcher.state().is_shared().then(|| {
        let (conn, dispatcher, registry) = (conn.clone(), dispatcher.clone(), registry.clone());
        AbortOnDrop(tokio::spawn(async move {
            let mut every = tokio::time::interval(ORPHAN_SCAN);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(e) =
                    amqp::relay_outbox(&conn, &dispatcher, &registry, Owed::Orphaned).await
                {
                    tracing::warn!("relaying outbox rows other hosts left: {e:#}");
                }
            }
        }))
    });
    let mut tasks = JoinSet::new();
    let mut serving = std::collections::HashSet::new();
    let mut added = registry.watch_added();
    *failures = 0;
    let drain = Duration::from_secs(config.drain_timeout_secs);
    let mut result = Ok(());
    let mut stopping = stop.clone();
    loop {
        added.mark_unchanged();
        for entry in registry.entries() {
            if serving.insert(entry.name().to_owned()) {
                let (conn, dispatcher, metrics, stop) = (
                    conn.clone(),
                    dispatcher.clone(),
                    metrics.clone(),
                    stop.clone(),
                );
                tasks.spawn(handler_loop(conn, dispatcher, entry, metrics, stop));
            }
        }
        tokio::select! {
            _ = added.changed() => {}
            joined = tasks.join_next(), if !tasks.is_empty() => match joined {
                None | Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => { result = Err(e); break; }
                Some(Err(e)) => { result = Err(anyhow::anyhow!("consumer task panicked: {e}")); break; }
            },
            _ = stopped(&mut stopping) => {
                // Graceful: consumers cancel, in-flight events settle.
                match tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await {
                    Ok(()) => {}
                    Err(_) => tracing::warn!(seconds = drain.as_secs(), "drain timeout: unsettled events will be redelivered"),
                }
                break;
            }
        }
    }
    conn_slot.send_replace(None);
    drop(orphans);
    tasks.abort_all();
    // Outbox rows confirmed since the last commit wait for the next one to
    // delete them; with no next commit in this session they would be
    // relayed again by the next one — duplicate output.
    let state = dispatcher.state().clone();
    match tokio::task::spawn_blocking(move || state.flush_confirmed_outbox()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("clearing confirmed outbox rows: {e:#}"),
        Err(e) => tracing::warn!("clearing confirmed outbox rows: {e}"),
    }
    // A broken connection may never answer the close.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        conn.close(200, "event-host stopping".into()),
    )
    .await;
    metrics.connected.set(0);
    result
}

/// One handler on one connection: consume while it is active (on embedded
/// state, only while no other consumer is on its queue); sit out a
/// breaker pause (resuming after the cool-off) or a removal; return when
/// the host stops, or with the error that broke the connection.
async fn handler_loop(
    conn: Arc<lapin::Connection>,
    dispatcher: Dispatcher,
    entry: Arc<Entry>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut lifecycle = entry.watch_lifecycle();
    let label = Metrics::label(entry.name());
    // Its series at zero from now on, so rates see its first events.
    metrics.init_handler(entry.name());
    loop {
        let current = lifecycle.borrow_and_update().clone();
        match current {
            Lifecycle::Active => {}
            Lifecycle::Paused { until } => {
                metrics.paused.get_or_create(&label).set(1);
                tokio::select! {
                    _ = tokio::time::sleep_until(until.into()) => {
                        tracing::info!(handler = entry.name(), "breaker cool-off over: consuming again");
                        entry.resume();
                    }
                    _ = lifecycle.changed() => {}
                    _ = stopped(&mut stop) => return Ok(()),
                }
                continue;
            }
            Lifecycle::Removed => {
                tokio::select! {
                    _ = lifecycle.changed() => {}
                    _ = stopped(&mut stop) => return Ok(()),
                }
                continue;
            }
        }
        metrics.paused.get_or_create(&label).set(0);
        if *stop.borrow() {
            return Ok(());
        }
        declare_topology(&conn, &entry.version()).await?;
        remove_stale_bindings(&conn, &entry).await;
        let state = dispatcher.state();
        let (shared, backend) = (state.is_shared(), state.backend_name());
        // Embedded state is this host's alone: consume only a queue no one
        // else consumes, and stop when someone else joins (see split_guard).
        let (serve_stop, guard) = if shared {
            (stop.clone(), None)
        } else {
            match split_guard::wait_alone(
                &conn,
                &entry,
                backend,
                &metrics,
                &mut stop,
                &mut lifecycle,
            )
            .await?
            {
                Waited::Alone => {}
                Waited::Stopped => return Ok(()),
                Waited::LifecycleChanged => continue,
            }
            let (leave, serve_stop) = watch::channel(false);
            let guard = tokio::spawn(split_guard::watch_consumers(
                conn.clone(),
                entry.clone(),
                backend,
                metrics.clone(),
                stop.clone(),
                leave,
            ));
            (serve_stop, Some(guard))
        };
        let served = amqp::serve(
            conn.clone(),
            dispatcher.clone(),
            entry.clone(),
            metrics.clone(),
            serve_stop,
        )
        .await;
        if let Some(guard) = guard {
            guard.abort();
        }
        served?;
        if *stop.borrow() {
            return Ok(());
        }
        // Not active any more (paused or removed), or another consumer
        // joined the queue: look again.
    }
}
