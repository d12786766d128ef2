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
use lapin::options::BasicPublishOptions;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, AdminState};
use crate::broker;
use crate::config::Config;
use crate::dispatch::{amqp, Dispatcher};
use crate::metrics::Metrics;
use crate::registry::{Entry, Lifecycle, Registry, Status};
use crate::reload::{remove_stale_bindings, Reloader};
use crate::runtime::Runtime;
use crate::state::StateStore;

/// Run the sidecar until `shutdown` resolves, then drain and return.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let config = Arc::new(config);
    let runtime = Arc::new(Runtime::new(config.runtime.clone())?);
    let state = StateStore::open(&config.state_path, config.durability)?;
    let dispatcher = Dispatcher::new(runtime.clone(), state.clone());
    let registry = Arc::new(Registry::default());
    let metrics = Arc::new(Metrics::new());
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
    let admin_state = Arc::new(AdminState {
        registry: registry.clone(),
        state: state.clone(),
        metrics: metrics.clone(),
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
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    tracing::info!("stopped");
    Ok(())
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
    registry: &Registry,
    metrics: &Arc<Metrics>,
    conn_slot: &watch::Sender<Option<Arc<lapin::Connection>>>,
    stop: watch::Receiver<bool>,
    failures: &mut u32,
) -> Result<()> {
    let conn = Arc::new(broker::connect(&config.amqp_url, config.heartbeat_secs).await?);
    metrics.connected.set(1);
    tracing::info!(broker = %broker::redact(&config.amqp_url), "connected");
    relay_outbox(&conn, dispatcher).await?;
    conn_slot.send_replace(Some(conn.clone()));
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
    tasks.abort_all();
    let _ = conn.close(200, "event-host stopping".into()).await;
    metrics.connected.set(0);
    result
}

/// One handler on one connection: consume while it is active; sit out a
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
        let version = entry.version();
        broker::declare(
            &conn,
            &version.topology,
            &version.settings.manifest.subscriptions,
            &version.settings.broker,
        )
        .await
        .with_context(|| format!("topology of handler {}", version.name))?;
        remove_stale_bindings(&conn, &entry).await;
        amqp::serve(
            conn.clone(),
            dispatcher.clone(),
            entry.clone(),
            metrics.clone(),
            stop.clone(),
        )
        .await?;
        if *stop.borrow() {
            return Ok(());
        }
        // Not active any more (paused or removed): wait for the next change.
    }
}

/// Publish outbox rows left by a run that stopped between committing an
/// event and the broker confirming its publishes. Their events were acked
/// or will be redelivered as duplicates; either way these messages are
/// owed exactly once more (with their stable message ids).
async fn relay_outbox(conn: &lapin::Connection, dispatcher: &Dispatcher) -> Result<()> {
    let state = dispatcher.state().clone();
    let pending = tokio::task::spawn_blocking(move || state.pending_outbox()).await??;
    if pending.is_empty() {
        return Ok(());
    }
    let ch = broker::confirm_channel(conn).await?;
    let mut confirms = Vec::with_capacity(pending.len());
    for (_, _, message) in &pending {
        confirms.push(
            ch.basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &message.payload,
                broker::outgoing_properties(message),
            )
            .await?,
        );
    }
    for confirm in confirms {
        if confirm.await?.is_nack() {
            anyhow::bail!("the broker refused an outbox message");
        }
    }
    let ids: Vec<i64> = pending.iter().map(|(id, _, _)| *id).collect();
    let state = dispatcher.state().clone();
    tokio::task::spawn_blocking(move || state.clear_outbox(&ids)).await??;
    tracing::info!(
        messages = pending.len(),
        "released outbox messages left by a previous run"
    );
    let _ = ch.close(200, "outbox relayed".into()).await;
    Ok(())
}
