//! The broker path of the dispatcher: one handler's queue in, dispositions
//! out.
//!
//! Three stages per handler, so the broker round trips, the Wasm calls and
//! the fsyncs overlap instead of adding up:
//!
//! 1. lapin's consumer receives deliveries (prefetch-bounded);
//! 2. a worker thread waits on it, takes whatever has arrived as one
//!    batch, runs each event in a fresh instance (or, where the handler
//!    allows it, in one instance kept for several events of the batch;
//!    later events of the batch see earlier ones' staged writes) and
//!    commits the whole batch in one transaction — one fsync for many
//!    events;
//! 3. the acker task publishes the batch's outbox messages and retry /
//!    dead-letter copies, waits for the broker's confirms, and only then
//!    acks — one `multiple` ack for the batch.
//!
//! Nothing is acked before its effects are durable and its publishes
//! confirmed; a failure anywhere leaves the events unacked, so the broker
//! redelivers them and the dedupe record (message id) or the handler's
//! own idempotency keeps their effects single.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use tokio::sync::{mpsc, watch};

use super::{
    decide, Cause, Committed, Delivery, Dispatcher, Handled, Happened, Outcome, Oversize,
    PendingBatch, Warm,
};
use crate::broker::{self, text, KeepHeaders, RetryFacts, RetrySigner};
use crate::guest::GuestLog;
use crate::handler::HandlerVersion;
use crate::health::Verdict;
use crate::metrics::Metrics;
use crate::otlp::{EventSpan, Exporter, VersionSpans};
use crate::registry::{Entry, Lifecycle, Registry, Status};
use crate::state::{Outgoing, Owed};
use crate::trace::Span;

/// Most deliveries one worker batch takes (and so one transaction holds).
const MAX_BATCH: usize = 128;

/// A delivery with how it was settled.
struct Settled {
    delivery: lapin::message::Delivery,
    handled: Handled,
    version: Arc<HandlerVersion>,
    attempt: u32,
    exchange: String,
    routing_key: String,
    /// The attempt's span: retry and dead-letter copies carry it on.
    span: Option<Span>,
    /// When the host started on it, while spans are exported (`None` for
    /// an event given back unrun: it had no attempt).
    started: Option<SystemTime>,
    /// The guest's log lines, for the exported span.
    logs: Vec<GuestLog>,
}

impl Settled {
    /// `traceparent` for a copy of this event (retry, dead letter): the
    /// attempt's span as the parent of the next.
    fn traceparent(&self) -> Option<(&'static str, AMQPValue)> {
        self.span
            .map(|span| (crate::trace::TRACEPARENT, text(&span.traceparent())))
    }

    /// The trace id, for log lines about the event.
    fn trace_id(&self) -> String {
        self.span.map(|s| s.trace_id()).unwrap_or_default()
    }
}

/// Serve one handler's queue on `conn` until `stop` turns true (graceful:
/// in-flight events finish and are acked) or the connection fails (error).
pub async fn serve(
    conn: Arc<Connection>,
    dispatcher: Dispatcher,
    entry: Arc<Entry>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let version = entry.version();
    let name = version.name.to_string();
    let settings = &version.settings.broker;
    let state = dispatcher.state().clone();
    let secret = tokio::task::spawn_blocking(move || state.host_secret())
        .await
        .context("reading the host secret")??;
    let signer = RetrySigner::new(secret);
    let consume_ch = broker::consumer_channel(&conn, settings.prefetch).await?;
    let publish_ch = broker::confirm_channel(&conn).await?;
    let tag = format!("event-host.{name}");
    let consumer = consume_ch
        .basic_consume(
            broker::name(&version.topology.queue)?,
            broker::name(&tag)?,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming from {:?}", version.topology.queue))?;
    entry.set_status(Status::Consuming);
    tracing::info!(handler = %name, queue = %version.topology.queue, version = %version.short_version(), "consuming");
    let mut lifecycle = entry.watch_lifecycle();

    // Deliveries received and not yet settled; those left when this
    // consumer ends go back to the broker, and out of the in-flight gauge.
    let unsettled = Unsettled {
        gauge: metrics
            .in_flight
            .get_or_create(&Metrics::label(&name))
            .clone(),
        count: Arc::new(AtomicI64::new(0)),
    };
    let (done_tx, done_rx) = mpsc::channel::<Vec<Settled>>(16);
    let worker = {
        let worker = Worker {
            dispatcher: dispatcher.clone(),
            entry: entry.clone(),
            metrics: metrics.clone(),
            runtime: tokio::runtime::Handle::current(),
            in_flight: unsettled.gauge.clone(),
            unsettled: unsettled.count.clone(),
            signer: signer.clone(),
            in_place: std::cell::Cell::new(0),
        };
        std::thread::Builder::new()
            .name(format!("dispatch-{name}"))
            .spawn(move || worker.run(consumer, done_tx))
            .context("starting the dispatch thread")?
    };
    let mut acker = tokio::spawn(acks(
        Acker {
            conn: conn.clone(),
            consume_ch: consume_ch.clone(),
            publish_ch,
            dispatcher: dispatcher.clone(),
            entry: entry.clone(),
            metrics: metrics.clone(),
            unsettled: unsettled.count.clone(),
            signer,
            exchanges: ExchangeCheck::default(),
            suspect: false,
        },
        done_rx,
    ));
    // Why serving stopped, when it was not asked to.
    let mut failure = None;
    tokio::select! {
        // Paused by the breaker or its file deleted: stop taking
        // deliveries like a shutdown does; the queue keeps the rest.
        _ = left_active(&mut lifecycle) => {
            if let Err(e) = consume_ch.basic_cancel(broker::short(&tag), BasicCancelOptions::default()).await {
                failure = Some(anyhow::Error::from(e).context("cancelling the consumer"));
            }
        }
        _ = stop.changed() => {
            // Stop taking deliveries; what is in flight still settles.
            if let Err(e) = consume_ch.basic_cancel(broker::short(&tag), BasicCancelOptions::default()).await {
                failure = Some(anyhow::Error::from(e).context("cancelling the consumer"));
            }
        }
        // The acker stops early only when the worker did (its consumer
        // ended: see below) or on a broker error.
        finished = &mut acker => {
            failure = match finished {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(e) => Some(anyhow::anyhow!("acker of {name} panicked: {e}")),
            };
        }
    }
    entry.consumer_ended();
    if failure.is_some() {
        // The worker may be waiting for deliveries that will never be
        // acked now: closing the channel ends its consumer.
        let _ = consume_ch
            .close(200, broker::short("consumer failed"))
            .await;
    }
    // Once cancelled, the consumer yields what the broker had already sent
    // and then ends: the worker runs those, closes the acker's channel, and
    // the acker settles everything left.
    if !acker.is_finished() {
        match acker.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(anyhow::anyhow!("acker panicked: {e}"))),
        }
    }
    let ended = tokio::task::spawn_blocking(move || worker.join()).await;
    let graceful = *stop.borrow() || !entry.is_active();
    if failure.is_none() && !graceful {
        failure = Some(match ended {
            Ok(Ok(ConsumerEnd::Failed(e))) => e.context("consumer stream failed"),
            Ok(Ok(ConsumerEnd::Cancelled)) => {
                anyhow::anyhow!("the broker cancelled the consumer of {name}")
            }
            Ok(Ok(ConsumerEnd::AckerGone)) => anyhow::anyhow!("acker of {name} stopped"),
            Ok(Err(_)) | Err(_) => anyhow::anyhow!("dispatch thread of {name} panicked"),
        });
    }
    if graceful {
        let _ = consume_ch
            .close(200, broker::short("consumer stopped"))
            .await;
    }
    match failure {
        Some(e) if !graceful => Err(e),
        Some(e) => {
            tracing::warn!(handler = %name, "while stopping: {e:#}");
            Ok(())
        }
        None => Ok(()),
    }
}

/// Why a worker stopped taking deliveries.
enum ConsumerEnd {
    /// The consumer was cancelled (by this host, or by the broker).
    Cancelled,
    /// The consumer failed (the channel or connection broke).
    Failed(anyhow::Error),
    /// The acker is gone: nothing could settle another batch.
    AckerGone,
}

/// A consumer's received-but-unsettled deliveries. Dropped when the
/// consumer ends (or its task is aborted), it takes those still counted out
/// of the in-flight gauge: the broker redelivers them, nothing holds them.
struct Unsettled {
    gauge: prometheus_client::metrics::gauge::Gauge,
    count: Arc<AtomicI64>,
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        self.gauge.dec_by(self.count.swap(0, Ordering::Relaxed));
    }
}

/// Resolves once the handler is no longer active (the `Ref` `wait_for`
/// returns is not `Send`, so it is dropped here).
async fn left_active(lifecycle: &mut watch::Receiver<Lifecycle>) {
    let _ = lifecycle.wait_for(|l| *l != Lifecycle::Active).await;
}

/// The worker thread's context: it takes deliveries straight from the
/// lapin consumer — no task in between, so an event crosses one thread
/// (lapin's I/O thread to this one) on its way in — runs them in batches,
/// and hands settled batches to the acker.
struct Worker {
    dispatcher: Dispatcher,
    entry: Arc<Entry>,
    metrics: Arc<Metrics>,
    /// To wait on the consumer from this plain thread.
    runtime: tokio::runtime::Handle,
    /// The handler's in-flight gauge, and the consumer's share of it.
    in_flight: prometheus_client::metrics::gauge::Gauge,
    unsettled: Arc<AtomicI64>,
    /// Verifies the host's retry copies.
    signer: RetrySigner,
    /// Batches still to commit in place (settled before the next runs)
    /// since one run while its predecessor committed did not commit
    /// cleanly: see [`Worker::run_after`].
    in_place: std::cell::Cell<u32>,
}

/// Batches committed in place after a batch run beside its predecessor's
/// commit failed to commit cleanly. Another host changing a key the two
/// share (a fleet's hot key) is what makes that happen, and while it
/// goes on the hosts do better taking turns on the key's lock than
/// reading it ahead of the lock and running again; after this many
/// batches the worker tries again.
const IN_PLACE_AFTER_CONFLICT: u32 = 64;

impl Worker {
    /// Batches in, settled batches out, until the consumer ends.
    ///
    /// Where the state store is a round trip away, a batch's commit runs
    /// in the background while the next batch, if one has arrived, runs
    /// its events ([`Dispatcher::commit_in_background`]). The first is
    /// settled and handed to the acker before the second commits, so
    /// batches still commit and settle in order.
    fn run(self, mut consumer: lapin::Consumer, tx: mpsc::Sender<Vec<Settled>>) -> ConsumerEnd {
        // The batch whose commit is under way.
        let mut committing: Option<Ran> = None;
        loop {
            // Take one delivery (waiting for it only once the batch in
            // flight is settled: its acks must not wait for more events),
            // then whatever else has arrived.
            let first = match consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    if !self.settle(committing.take(), &tx) {
                        return ConsumerEnd::AckerGone;
                    }
                    self.runtime.block_on(consumer.next())
                }
            };
            let mut end = None;
            let mut batch = Vec::new();
            match first {
                Some(Ok(first)) => batch.push(first),
                Some(Err(e)) => end = Some(ConsumerEnd::Failed(anyhow::Error::from(e))),
                None => end = Some(ConsumerEnd::Cancelled),
            }
            while end.is_none() && batch.len() < MAX_BATCH {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(d))) => batch.push(d),
                    Some(Some(Err(e))) => end = Some(ConsumerEnd::Failed(anyhow::Error::from(e))),
                    Some(None) => end = Some(ConsumerEnd::Cancelled),
                    None => break, // nothing more has arrived yet
                }
            }
            if !batch.is_empty() {
                self.in_flight.inc_by(batch.len() as i64);
                self.unsettled
                    .fetch_add(batch.len() as i64, Ordering::Relaxed);
                // A batch runs on the version current when it starts;
                // events already in flight keep theirs.
                let version = self.entry.version();
                if self.entry.is_active() {
                    let ran = self.run_after(committing.take(), version, batch, &tx);
                    let in_place = self.in_place.get();
                    self.in_place.set(in_place.saturating_sub(1));
                    match ran {
                        Some(ran) if ran.commit.is_done() || in_place > 0 => {
                            if !self.settle(Some(ran), &tx) {
                                return ConsumerEnd::AckerGone;
                            }
                        }
                        Some(ran) => committing = Some(ran),
                        None => return ConsumerEnd::AckerGone,
                    }
                } else {
                    // Paused or removed since these arrived: they go back
                    // to the queue unrun, without spending an attempt
                    // (after the batch before them).
                    if !self.settle(committing.take(), &tx)
                        || tx
                            .blocking_send(requeue_unrun(&version, &self.signer, batch))
                            .is_err()
                    {
                        return ConsumerEnd::AckerGone;
                    }
                }
            }
            if let Some(end) = end {
                if !self.settle(committing.take(), &tx) {
                    return ConsumerEnd::AckerGone;
                }
                return end;
            }
        }
    }

    /// Run `batch`'s events while `previous` commits, settle `previous`,
    /// then start `batch`'s commit. Should `previous` not commit cleanly
    /// (a conflict, a store failure), what `batch` built on its writes is
    /// void: `batch` runs again once `previous`'s events have run again,
    /// and the next [`IN_PLACE_AFTER_CONFLICT`] batches commit in place.
    /// `None` when the acker is gone.
    fn run_after(
        &self,
        previous: Option<Ran>,
        version: Arc<HandlerVersion>,
        batch: Vec<lapin::message::Delivery>,
        tx: &mpsc::Sender<Vec<Settled>>,
    ) -> Option<Ran> {
        let executed = self.execute(&version, batch);
        let Some(previous) = previous else {
            return Some(executed.commit(&self.dispatcher));
        };
        let (previous, committed) = previous.finish();
        let clean = committed
            .as_ref()
            .is_ok_and(|c| c.iter().all(|c| matches!(c, Committed::Done(_))));
        if clean {
            let settled = previous.settle(&self.dispatcher, &self.entry, committed);
            return self
                .hand_over(settled, tx)
                .then(|| executed.commit(&self.dispatcher));
        }
        // Its staged writes go, and on shared state its transaction,
        // before the previous batch's re-runs.
        self.dispatcher.state().end_batch(&version.name);
        self.in_place.set(IN_PLACE_AFTER_CONFLICT);
        let batch = executed.into_deliveries();
        let settled = previous.settle(&self.dispatcher, &self.entry, committed);
        self.hand_over(settled, tx)
            .then(|| self.execute(&version, batch).commit(&self.dispatcher))
    }

    fn execute(
        &self,
        version: &Arc<HandlerVersion>,
        batch: Vec<lapin::message::Delivery>,
    ) -> Executed {
        execute_batch(
            &self.dispatcher,
            &self.entry,
            version,
            &self.metrics,
            &self.signer,
            batch,
        )
    }

    /// Wait for `ran`'s commit, settle it and hand it to the acker; false
    /// when the acker is gone.
    fn settle(&self, ran: Option<Ran>, tx: &mpsc::Sender<Vec<Settled>>) -> bool {
        let Some(ran) = ran else { return true };
        let (ran, committed) = ran.finish();
        let settled = ran.settle(&self.dispatcher, &self.entry, committed);
        self.hand_over(settled, tx)
    }

    fn hand_over(&self, settled: Vec<Settled>, tx: &mpsc::Sender<Vec<Settled>>) -> bool {
        judge(&self.entry, &self.metrics, &settled);
        tx.blocking_send(settled).is_ok()
    }
}

/// One event of a batch on its way through the worker.
struct InBatch {
    raw: lapin::message::Delivery,
    input: Delivery,
    /// Settled without a commit (too large, a host fault), or once its
    /// commit's outcome is known.
    handled: Option<Handled>,
    /// When the host started on it, while spans are exported.
    started: Option<SystemTime>,
    /// The guest's log lines, for the exported span.
    logs: Vec<GuestLog>,
}

/// A batch's events on their way through the worker, and which of them
/// are executions handed to the commit.
struct BatchRun {
    version: Arc<HandlerVersion>,
    events: Vec<InBatch>,
    /// Which events the executions are, in order.
    pending: Vec<usize>,
}

/// A batch whose events ran, their commit not yet started.
struct Executed {
    run: BatchRun,
    executions: Vec<super::Execution>,
}

impl Executed {
    /// Start the commit (in the background where the store allows).
    fn commit(self, dispatcher: &Dispatcher) -> Ran {
        let commit = dispatcher.commit_in_background(&self.run.version.name, self.executions);
        Ran {
            run: self.run,
            commit,
        }
    }

    /// Give up on this run (its writes built on a commit that failed):
    /// the deliveries, to run again.
    fn into_deliveries(self) -> Vec<lapin::message::Delivery> {
        self.run.events.into_iter().map(|e| e.raw).collect()
    }
}

/// A batch whose commit is under way.
struct Ran {
    run: BatchRun,
    commit: PendingBatch,
}

impl Ran {
    /// Wait for the commit.
    fn finish(self) -> (BatchRun, Result<Vec<Committed>>) {
        (self.run, self.commit.finish())
    }
}

impl BatchRun {
    /// Every event's outcome once its commit is over: a conflicted one
    /// runs again, a failed commit is a host fault for each of its events.
    fn settle(
        mut self,
        dispatcher: &Dispatcher,
        entry: &Entry,
        committed: Result<Vec<Committed>>,
    ) -> Vec<Settled> {
        let version = &self.version;
        let conflicted = apply(&mut self.events, self.pending, committed);
        rerun(dispatcher, entry, version, &mut self.events, conflicted);
        self.events
            .into_iter()
            .map(|e| Settled {
                delivery: e.raw,
                handled: e
                    .handled
                    .unwrap_or_else(|| host_fault(&anyhow::anyhow!("event was not settled"))),
                version: version.clone(),
                attempt: e.input.attempt,
                exchange: e.input.exchange,
                routing_key: e.input.routing_key,
                span: e.input.span,
                started: e.started,
                logs: e.logs,
            })
            .collect()
    }
}

/// Settle `events[pending]` (in order) as their commit came out: each
/// done one with its outcome, every one as a host fault when the commit
/// failed. Returns the ones that conflicted, to run again.
fn apply(
    events: &mut [InBatch],
    pending: Vec<usize>,
    committed: Result<Vec<Committed>>,
) -> Vec<usize> {
    let mut conflicted = Vec::new();
    match committed {
        Ok(results) => {
            for (index, result) in pending.into_iter().zip(results) {
                match result {
                    Committed::Done(handled) => events[index].handled = Some(handled),
                    // Another writer changed what it read.
                    Committed::Conflict(_) => conflicted.push(index),
                }
            }
        }
        Err(e) => {
            let fault = host_fault(&e);
            for index in pending {
                events[index].handled = Some(fault.clone());
            }
        }
    }
    conflicted
}

/// Run `events[indices]`, reading ahead for them first, in one instance
/// where the handler allows it, staging each one's writes for the next
/// (nothing is committed). Returns which events ran and their executions,
/// in order; `ran` sees each execution first. An event the host failed to
/// run is settled as a host fault.
fn run_events(
    dispatcher: &Dispatcher,
    entry: &Entry,
    version: &Arc<HandlerVersion>,
    events: &mut [InBatch],
    indices: Vec<usize>,
    mut ran: impl FnMut(&super::Execution),
) -> (Vec<usize>, Vec<super::Execution>) {
    let ns = &*version.name;
    {
        let inputs: Vec<&Delivery> = indices.iter().map(|&i| &events[i].input).collect();
        dispatcher.prefetch(version, &inputs);
    }
    let exporting = dispatcher.exporter().is_some();
    // One instance may serve several events, when the handler allows it;
    // it never outlives them.
    let mut warm = Warm::default();
    let mut pending = Vec::with_capacity(indices.len());
    let mut executions = Vec::with_capacity(indices.len());
    for index in indices {
        let event = &mut events[index];
        event.started = exporting.then(SystemTime::now);
        // Bracketed so `/readyz` can tell a call stuck past its deadline.
        entry.call_started(version);
        let executed = dispatcher.execute_in(version, &event.input, &mut warm);
        entry.call_ended();
        match executed {
            Ok(mut execution) => {
                event.logs = std::mem::take(&mut execution.logs);
                if let Some(commit) = &execution.commit {
                    dispatcher.state().stage(ns, &commit.writes);
                }
                ran(&execution);
                pending.push(index);
                executions.push(execution);
            }
            Err(e) => event.handled = Some(host_fault(&e)),
        }
    }
    (pending, executions)
}

/// Run the events whose commit conflicted again: together, as a batch of
/// their own committed in place (one transaction, not one per event),
/// then any that conflict once more one at a time, as
/// [`Dispatcher::dispatch`] runs an event.
fn rerun(
    dispatcher: &Dispatcher,
    entry: &Entry,
    version: &Arc<HandlerVersion>,
    events: &mut [InBatch],
    conflicted: Vec<usize>,
) {
    let ns = &*version.name;
    let alone = if conflicted.len() > 1 {
        let (ran, executions) = run_events(dispatcher, entry, version, events, conflicted, |_| {});
        let committed = dispatcher.commit(ns, executions);
        dispatcher.state().end_batch(ns);
        apply(events, ran, committed)
    } else {
        conflicted
    };
    for index in alone {
        entry.call_started(version);
        let rerun = dispatcher.dispatch(version, &events[index].input);
        entry.call_ended();
        events[index].handled = Some(rerun.unwrap_or_else(|e| host_fault(&e)));
    }
}

/// Run a batch's events (reading ahead first), staging each one's writes
/// for the next; nothing is committed yet.
fn execute_batch(
    dispatcher: &Dispatcher,
    entry: &Entry,
    version: &Arc<HandlerVersion>,
    metrics: &Metrics,
    signer: &RetrySigner,
    batch: Vec<lapin::message::Delivery>,
) -> Executed {
    let ns = &*version.name;
    // Resolved once per batch: a family lookup per event is a lock and a
    // hash of the label.
    let label = Metrics::label(ns);
    let instantiations = metrics.instantiations.get_or_create(&label).clone();
    let latency = metrics.latency.get_or_create(&label).clone();
    let keyless = metrics
        .without_idempotency_key
        .get_or_create(&label)
        .clone();
    let max_payload = version.settings.broker.max_payload_bytes;
    let traced = dispatcher.trace_context();
    let ratio = dispatcher.sample_ratio();
    let exporting = dispatcher.exporter().is_some();
    let mut events: Vec<InBatch> = batch
        .into_iter()
        .map(|raw| {
            let mut input = broker::to_delivery_signed(&raw, signer, &version.topology.queue);
            if traced {
                input.span = Some(Span::for_delivery(&input.headers, ratio));
            }
            InBatch {
                raw,
                input,
                handled: None,
                started: None,
                logs: Vec::new(),
            }
        })
        .collect();
    let mut runnable = Vec::with_capacity(events.len());
    for (index, event) in events.iter_mut().enumerate() {
        let header_bytes = broker::headers_size(&event.raw.properties);
        let too_large = if header_bytes > broker::MAX_HEADER_BYTES {
            Some(Happened::TooLarge(Oversize::Headers {
                bytes: header_bytes,
                cap: broker::MAX_HEADER_BYTES,
            }))
        } else if event.raw.data.len() > max_payload {
            Some(Happened::TooLarge(Oversize::Payload {
                bytes: event.raw.data.len(),
                cap: max_payload,
            }))
        } else {
            None
        };
        match too_large {
            Some(happened) => {
                event.started = exporting.then(SystemTime::now);
                event.handled = Some(Handled::without_effects(
                    decide(happened, event.input.attempt, 1),
                    Default::default(),
                ))
            }
            None => runnable.push(index),
        }
    }
    let (pending, executions) =
        run_events(dispatcher, entry, version, &mut events, runnable, |e| {
            if e.instantiated {
                instantiations.inc();
            }
            if e.keyless {
                keyless.inc();
            }
            latency.observe(e.elapsed.as_secs_f64());
        });
    Executed {
        run: BatchRun {
            version: version.clone(),
            events,
            pending,
        },
        executions,
    }
}

/// Feed the batch's outcomes to the handler's health tracker and count
/// what it decided.
fn judge(entry: &Entry, metrics: &Metrics, settled: &[Settled]) {
    for s in settled {
        let verdict = entry.record(&s.version, s.handled.is_failure());
        if verdict == Verdict::Healthy {
            continue; // the common case: no label to build
        }
        let label = Metrics::label(&s.version.name);
        match verdict {
            Verdict::Healthy => {}
            Verdict::RollBack { .. } => {
                // `record` rolled back when it had a version to go to; with
                // none it paused the handler instead.
                if entry.is_active() {
                    metrics.rollbacks.get_or_create(&label).inc();
                } else {
                    metrics.breaker_trips.get_or_create(&label).inc();
                    metrics.paused.get_or_create(&label).set(1);
                }
            }
            Verdict::Trip { .. } => {
                metrics.breaker_trips.get_or_create(&label).inc();
                metrics.paused.get_or_create(&label).set(1);
            }
        }
    }
}

fn requeue_unrun(
    version: &Arc<HandlerVersion>,
    signer: &RetrySigner,
    batch: Vec<lapin::message::Delivery>,
) -> Vec<Settled> {
    batch
        .into_iter()
        .map(|delivery| {
            let input = broker::to_delivery_signed(&delivery, signer, &version.topology.queue);
            Settled {
                delivery,
                handled: Handled::without_effects(
                    decide(Happened::Inactive, input.attempt, 1),
                    Default::default(),
                ),
                version: version.clone(),
                attempt: input.attempt,
                exchange: input.exchange,
                routing_key: input.routing_key,
                span: None,
                started: None,
                logs: Vec::new(),
            }
        })
        .collect()
}

/// A host fault: the event goes back unsettled, and counts as a failure
/// for the breaker ([`Handled::is_failure`]).
fn host_fault(e: &anyhow::Error) -> Handled {
    tracing::error!("host fault while dispatching: {e:#}");
    let fault = format!("{e:#}");
    Handled::without_effects(
        decide(Happened::HostFault(&fault), 1, 1),
        Default::default(),
    )
}

/// Which exchanges handlers publish to exist. Publishing to a missing one
/// is a channel error that would take the whole session down and stall the
/// queue in a reconnect loop; AMQP drops unroutable messages silently, and
/// a message for an exchange that does not exist is the same case, so it
/// is dropped with a warning.
#[derive(Default)]
struct ExchangeCheck {
    /// Whether it existed, and when that was checked.
    known: std::collections::HashMap<String, (bool, std::time::Instant)>,
}

impl ExchangeCheck {
    /// A missing exchange is checked again after this long: someone may
    /// create it, and from then on its messages must flow.
    const RECHECK_MISSING: std::time::Duration = std::time::Duration::from_secs(5);

    async fn exists(&mut self, conn: &Connection, exchange: &str) -> Result<bool> {
        if exchange.is_empty() {
            return Ok(true); // the default exchange always exists
        }
        if let Some((exists, at)) = self.known.get(exchange) {
            if *exists || at.elapsed() < Self::RECHECK_MISSING {
                return Ok(*exists);
            }
        }
        let exists = broker::exchange_exists(conn, exchange).await?;
        if !exists {
            tracing::warn!(exchange, "a handler published to an exchange that does not exist; message dropped as unroutable");
        }
        self.known
            .insert(exchange.to_owned(), (exists, std::time::Instant::now()));
        Ok(exists)
    }
}

/// What the acker works with: the consumer's context, moved into its task.
struct Acker {
    conn: Arc<Connection>,
    consume_ch: lapin::Channel,
    /// The confirm channel; reopened when the broker closes it over a
    /// refused publish.
    publish_ch: lapin::Channel,
    dispatcher: Dispatcher,
    entry: Arc<Entry>,
    metrics: Arc<Metrics>,
    unsettled: Arc<AtomicI64>,
    signer: RetrySigner,
    exchanges: ExchangeCheck,
    /// Set after a publish failed: the broker may be closing the channel,
    /// so the next publish takes a fresh one.
    suspect: bool,
}

/// What a message the acker publishes is, for when the broker refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendKind {
    /// A message a handler published: refused, it goes to the handler's
    /// DLX and the event is acked as usual.
    Output,
    /// A retry copy: refused, the event is dead-lettered instead.
    Retry,
    /// A dead-letter copy: refused, the batch stays unsettled.
    DeadLetter,
}

/// One message to publish for a settled batch.
struct Send {
    /// Index of the settled event it comes from.
    from: usize,
    kind: SendKind,
    exchange: String,
    routing_key: String,
    payload: Arc<[u8]>,
    props: BasicProperties,
    /// Set when it cannot be sent at all (headers over the cap): treated
    /// as refused without asking the broker.
    refused: Option<String>,
}

impl Send {
    /// A handler's output message.
    fn output(from: usize, p: &Outgoing) -> Self {
        let props = broker::outgoing_properties(p);
        let header_bytes = broker::headers_size(&props);
        let refused = (header_bytes > broker::MAX_HEADER_BYTES).then(|| {
            format!(
                "headers of {header_bytes} bytes over the {}-byte cap",
                broker::MAX_HEADER_BYTES
            )
        });
        Self {
            from,
            kind: SendKind::Output,
            exchange: p.exchange.clone(),
            routing_key: p.routing_key.clone(),
            payload: Arc::from(p.payload.as_slice()),
            props,
            refused,
        }
    }
}

/// A new confirm channel in place of `old`, which is closed if still open
/// (so a run of refusals does not use up the connection's channels).
async fn fresh_channel(conn: &Connection, old: lapin::Channel) -> Result<lapin::Channel> {
    if old.status().connected() {
        let _ = old.close(200, broker::short("replaced")).await;
    }
    broker::confirm_channel(conn).await
}

/// Publish `send` on `ch` and wait for its confirm: `Ok` once the broker
/// acked it, `Err` with why not.
async fn publish_one(ch: &lapin::Channel, send: &Send) -> std::result::Result<(), String> {
    publish_all(ch, std::slice::from_ref(send))
        .await
        .pop()
        .unwrap_or_else(|| Err("nothing was published".into()))
}

/// Publish every send, pipelined on `ch` (one round trip for the batch):
/// for each, `Ok` once confirmed, else why not.
async fn publish_all(ch: &lapin::Channel, sends: &[Send]) -> Vec<std::result::Result<(), String>> {
    let publishes = sends.iter().map(|send| async move {
        if let Some(why) = &send.refused {
            return Err(why.clone());
        }
        ch.basic_publish(
            broker::short(&send.exchange),
            broker::short(&send.routing_key),
            BasicPublishOptions::default(),
            &send.payload,
            send.props.clone(),
        )
        .await
        .map_err(|e| e.to_string())
    });
    let issued = futures_util::future::join_all(publishes).await;
    let confirms = issued.into_iter().map(|issued| async move {
        match issued?.await {
            Ok(c) if c.is_ack() => Ok(()),
            Ok(c) if c.is_nack() => {
                Err("nack (a queue refused it: full, with reject-publish?)".to_owned())
            }
            Ok(_) => Err("no confirm".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    });
    futures_util::future::join_all(confirms).await
}

impl Acker {
    /// The publish channel; a fresh one after a failed publish (the
    /// broker closes a channel over a refused publish, and lapin may not
    /// know it yet).
    async fn channel(&mut self) -> Result<&lapin::Channel> {
        if self.suspect || !self.publish_ch.status().connected() {
            let fresh = broker::confirm_channel(&self.conn).await?;
            let old = std::mem::replace(&mut self.publish_ch, fresh);
            if old.status().connected() {
                let _ = old.close(200, broker::short("replaced")).await;
            }
            self.suspect = false;
        }
        Ok(&self.publish_ch)
    }

    /// Publish `sends`; what the broker refuses is isolated and handled
    /// by kind (see [`SendKind`]) so one refused message never ends the
    /// session. Errors only when the connection is gone or a dead-letter
    /// copy itself is refused.
    async fn publish(&mut self, batch: &[Settled], sends: Vec<Send>) -> Result<()> {
        if sends.is_empty() {
            return Ok(());
        }
        let results = publish_all(self.channel().await?, &sends).await;
        if results.iter().all(Result::is_ok) {
            return Ok(());
        }
        self.suspect = true;
        if !self.conn.status().connected() {
            bail!("the connection closed while publishing the batch");
        }
        // Something was refused: publish the failed ones again one at a
        // time, on a fresh channel if the broker closed this one, to tell
        // a refusal of that message from a passing failure.
        for (send, first) in sends.iter().zip(results) {
            let Err(first) = first else { continue };
            let refused = match &send.refused {
                Some(why) => why.clone(),
                None => match publish_one(self.channel().await?, send).await {
                    Ok(()) => continue,
                    Err(_) if !self.conn.status().connected() => {
                        bail!("the connection closed while publishing the batch ({first})")
                    }
                    Err(why) => {
                        self.suspect = true;
                        why
                    }
                },
            };
            let s = &batch[send.from];
            match send.kind {
                SendKind::Output => {
                    let reason = format!(
                        "broker refused publish to exchange {:?}: {refused}",
                        send.exchange
                    );
                    tracing::warn!(handler = %s.version.name, "{}; the message goes to the dead-letter exchange", broker::cap_reason(&reason));
                    let copy = refused_output(&s.version, send, &reason);
                    self.publish_dead_letter(&copy).await?;
                    self.metrics
                        .dead_lettered
                        .get_or_create(&Metrics::label(&s.version.name))
                        .inc();
                }
                SendKind::Retry => {
                    let reason = format!("broker refused the retry copy: {refused}");
                    tracing::warn!(handler = %s.version.name, "{}; dead-lettering the event", broker::cap_reason(&reason));
                    let copy = dead_letter_copy(
                        s,
                        &reason,
                        self.keep_headers(s),
                        self.dispatcher.host_id(),
                        &self.signer,
                    );
                    self.publish_dead_letter(&copy).await?;
                    self.metrics
                        .dead_lettered
                        .get_or_create(&Metrics::label(&s.version.name))
                        .inc();
                }
                SendKind::DeadLetter => {
                    bail!(
                        "the broker refused a dead-letter copy to {:?}: {refused}",
                        send.exchange
                    )
                }
            }
        }
        Ok(())
    }

    async fn publish_dead_letter(&mut self, copy: &Send) -> Result<()> {
        let result = publish_one(self.channel().await?, copy).await;
        result.map_err(|e| {
            self.suspect = true;
            anyhow!(
                "the broker refused a dead-letter copy to {:?}: {e}",
                copy.exchange
            )
        })
    }

    fn keep_headers(&self, s: &Settled) -> KeepHeaders {
        if matches!(
            s.handled.cause(),
            Some(Cause::TooLarge(Oversize::Headers { .. }))
        ) {
            KeepHeaders::None
        } else {
            KeepHeaders::Original
        }
    }
}

/// An output the broker refused, as a dead-letter message of `version`'s
/// handler: its body and properties (its own headers only when under the
/// cap), with the host's reason headers naming where it was going.
fn refused_output(version: &HandlerVersion, send: &Send, reason: &str) -> Send {
    let keep = if broker::headers_size(&send.props) > broker::MAX_HEADER_BYTES {
        KeepHeaders::None
    } else {
        KeepHeaders::Original
    };
    let props = broker::republish_properties(
        &send.props,
        keep,
        &[
            (broker::REASON_HEADER, broker::reason_text(reason)),
            (broker::HANDLER_HEADER, text(&version.name)),
            (broker::VERSION_HEADER, text(&version.sha256)),
            (broker::EXCHANGE_HEADER, text(&send.exchange)),
            (broker::ROUTING_KEY_HEADER, text(&send.routing_key)),
        ],
    );
    Send {
        from: send.from,
        kind: SendKind::DeadLetter,
        exchange: version.topology.dlx.clone(),
        routing_key: version.topology.queue.clone(),
        payload: send.payload.clone(),
        props,
        refused: None,
    }
}

/// A dead-letter copy of a settled event: its body and properties (its
/// headers unless `keep` says not, without the attempt and signature, so
/// a message moved back from the DLQ starts afresh), plus why, when and by
/// whom (handler, version and, in a fleet, `host`). The original exchange
/// and routing key are signed (as a retry copy's are, for attempt
/// [`broker::DEAD_LETTER_ATTEMPT`]): `dlq redrive` restores them only
/// for a copy the fleet's secret signed.
fn dead_letter_copy(
    s: &Settled,
    reason: &str,
    keep: KeepHeaders,
    host: Option<&str>,
    signer: &RetrySigner,
) -> Send {
    let signature = signer.sign(&RetryFacts {
        queue: &s.version.topology.queue,
        attempt: broker::DEAD_LETTER_ATTEMPT,
        exchange: &s.exchange,
        routing_key: &s.routing_key,
        payload: &s.delivery.data,
    });
    let mut headers = vec![
        (broker::REASON_HEADER, broker::reason_text(reason)),
        (broker::HANDLER_HEADER, text(&s.version.name)),
        (broker::VERSION_HEADER, text(&s.version.sha256)),
        (
            broker::ATTEMPTS_HEADER,
            AMQPValue::LongLongInt(i64::from(s.attempt)),
        ),
        (broker::EXCHANGE_HEADER, text(&s.exchange)),
        (broker::ROUTING_KEY_HEADER, text(&s.routing_key)),
        (broker::SIGNATURE_HEADER, text(&signature)),
        (
            broker::DEAD_LETTERED_AT_HEADER,
            AMQPValue::LongLongInt(broker::unix_now()),
        ),
    ];
    if let Some(host) = host {
        headers.push((broker::HOST_HEADER, text(host)));
    }
    headers.extend(s.traceparent());
    let props = broker::republish_properties(&s.delivery.properties, keep, &headers);
    Send {
        from: 0,
        kind: SendKind::DeadLetter,
        exchange: s.version.topology.dlx.clone(),
        routing_key: s.version.topology.queue.clone(),
        payload: Arc::from(s.delivery.data.as_slice()),
        props,
        refused: None,
    }
}

/// The acker: for each settled batch, publish, wait for confirms, ack.
async fn acks(mut acker: Acker, mut rx: mpsc::Receiver<Vec<Settled>>) -> Result<()> {
    while let Some(mut batch) = rx.recv().await {
        // Publishes of the batch are issued together and their confirms
        // awaited together: one broker round trip per batch, not per message.
        let mut sends = Vec::new();
        let mut outbox = Vec::new();
        let mut requeue = Vec::new();
        let mut ack_up_to = None;
        // A batch is one handler's: its label is built once, and the
        // common counters are added once per batch.
        let Some(label) = batch.first().map(|s| Metrics::label(&s.version.name)) else {
            continue;
        };
        let metrics = acker.metrics.clone();
        let (mut acked, mut duplicates) = (0, 0);
        for (index, s) in batch.iter().enumerate() {
            let tag = s.delivery.delivery_tag;
            let reason = s.handled.reason.as_ref().map(ToString::to_string);
            match s.handled.outcome {
                Outcome::Ack => {
                    for p in &s.handled.published {
                        if !acker.exchanges.exists(&acker.conn, &p.exchange).await? {
                            continue;
                        }
                        sends.push(Send::output(index, p));
                    }
                    outbox.extend_from_slice(&s.handled.outbox_ids);
                    acked += 1;
                    if s.handled.duplicate {
                        duplicates += 1;
                    }
                }
                Outcome::Retry => {
                    let queue = s
                        .version
                        .topology
                        .retry_queue(s.attempt)
                        .context("retry outcome with no retry queue")?;
                    let next = s.attempt.saturating_add(1);
                    let signature = acker.signer.sign(&RetryFacts {
                        queue: &s.version.topology.queue,
                        attempt: next,
                        exchange: &s.exchange,
                        routing_key: &s.routing_key,
                        payload: &s.delivery.data,
                    });
                    let mut headers = vec![
                        (
                            broker::ATTEMPT_HEADER,
                            AMQPValue::LongLongInt(i64::from(next)),
                        ),
                        (broker::EXCHANGE_HEADER, text(&s.exchange)),
                        (broker::ROUTING_KEY_HEADER, text(&s.routing_key)),
                        (broker::SIGNATURE_HEADER, text(&signature)),
                        (
                            broker::REASON_HEADER,
                            broker::reason_text(reason.as_deref().unwrap_or("")),
                        ),
                    ];
                    headers.extend(s.traceparent());
                    let props = broker::republish_properties(
                        &s.delivery.properties,
                        KeepHeaders::ForDelayQueue,
                        &headers,
                    );
                    sends.push(Send {
                        from: index,
                        kind: SendKind::Retry,
                        exchange: String::new(),
                        routing_key: queue.to_owned(),
                        payload: Arc::from(s.delivery.data.as_slice()),
                        props,
                        refused: None,
                    });
                    metrics.retried.get_or_create(&label).inc();
                }
                Outcome::Reject => {
                    let reason = reason.as_deref().unwrap_or("rejected");
                    let mut copy = dead_letter_copy(
                        s,
                        reason,
                        acker.keep_headers(s),
                        acker.dispatcher.host_id(),
                        &acker.signer,
                    );
                    copy.from = index;
                    sends.push(copy);
                    if matches!(s.handled.cause(), Some(Cause::GuestReject(_))) {
                        metrics.rejected.get_or_create(&label).inc();
                    }
                    metrics.dead_lettered.get_or_create(&label).inc();
                    tracing::info!(handler = %s.version.name, trace_id = %s.trace_id(), reason = %broker::cap_reason(reason), "event dead-lettered");
                }
                Outcome::Requeue => {
                    requeue.push(tag);
                    metrics.requeued.get_or_create(&label).inc();
                    continue;
                }
            }
            ack_up_to = Some(ack_up_to.map_or(tag, |t: u64| t.max(tag)));
        }
        acker
            .publish(&batch, sends)
            .await
            .context("publishing the batch")?;
        // Confirmed (or refused and dead-lettered): the rows go with the
        // next commit's transaction (a crash before that republishes them,
        // with the same message ids).
        acker.dispatcher.state().forget_outbox_later(outbox);
        // Requeues first: a later `multiple` ack must not cover them.
        for tag in requeue {
            acker
                .consume_ch
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await?;
        }
        if let Some(tag) = ack_up_to {
            acker
                .consume_ch
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
        }
        if let Some(exporter) = acker.dispatcher.exporter() {
            export_spans(exporter, &mut batch);
        }
        // Counted once settled at the broker, like the in-flight gauge:
        // `acked` means acked, not "about to be".
        metrics.acked.get_or_create(&label).inc_by(acked);
        // The status page's last minutes, from the same single place.
        metrics.activity.record(
            &label.handler,
            batch
                .iter()
                .map(|s| crate::activity::Sample::from(&s.handled)),
        );
        if duplicates > 0 {
            metrics.duplicates.get_or_create(&label).inc_by(duplicates);
        }
        metrics
            .in_flight
            .get_or_create(&label)
            .dec_by(batch.len() as i64);
        acker
            .unsettled
            .fetch_sub(batch.len() as i64, Ordering::Relaxed);
        // A rollback on the worker thread leaves the bad version's extra
        // bindings to remove; this is the first async place to do it.
        if acker.entry.has_stale_bindings() {
            crate::reload::remove_stale_bindings(&acker.conn, &acker.entry).await;
        }
    }
    Ok(())
}

/// Hand each settled event's span to the exporter: the attempt's ids, what
/// it was, how it ended, and the guest's log lines as span events. Called
/// once the batch is settled at the broker, so a span's end is when the
/// event's outcome became durable.
fn export_spans(exporter: &Exporter, batch: &mut [Settled]) {
    let end = SystemTime::now();
    // A batch runs on one version: what its spans share is built once.
    let Some(v) = batch.first().map(|s| s.version.clone()) else {
        return;
    };
    let version = VersionSpans::new(&v.name, &v.sha256, &v.declared.version, &v.topology.queue);
    for s in batch {
        let (Some(span), Some(start)) = (s.span, s.started) else {
            continue;
        };
        let outcome = match s.handled.outcome {
            Outcome::Ack if s.handled.duplicate => "duplicate",
            Outcome::Ack => "ack",
            Outcome::Retry => "retry",
            Outcome::Reject => "dead_letter",
            Outcome::Requeue => "requeue",
        };
        let props = &s.delivery.properties;
        let tracestate = broker::header_text(props, crate::trace::TRACESTATE);
        exporter.export(EventSpan {
            span,
            tracestate: tracestate.as_deref(),
            version: &version,
            exchange: &s.exchange,
            routing_key: &s.routing_key,
            message_id: props.message_id().as_ref().map(|id| id.as_str()),
            attempt: s.attempt,
            outcome,
            reason: s.handled.reason.as_ref().map(ToString::to_string),
            start,
            end,
            guest_time: s.handled.elapsed,
            logs: std::mem::take(&mut s.logs),
        });
    }
}

/// Publish outbox rows left by a session (or a run) that ended between
/// committing an event and the broker confirming its publishes. Their
/// events were acked or will be redelivered as duplicates; either way these
/// messages are owed exactly once more (with their stable message ids).
/// Rows already confirmed are deleted first, not sent again; messages for
/// an exchange that no longer exists are dropped like any unroutable
/// publish, so one of them cannot stall every reconnect. A message the
/// broker refuses goes to its handler's dead-letter exchange (dropped with
/// an error when the handler or its dead-letter exchange is gone), so one
/// bad row never blocks startup.
///
/// `owed` says whose rows: at a (re)connect everything this host owes
/// ([`Owed::Mine`]); periodically, on shared state, what hosts that died
/// left behind ([`Owed::Orphaned`]).
pub async fn relay_outbox(
    conn: &Connection,
    dispatcher: &Dispatcher,
    registry: &Registry,
    owed: Owed,
) -> Result<()> {
    let state = dispatcher.state().clone();
    let pending = tokio::task::spawn_blocking(move || match owed {
        Owed::Mine => {
            state.flush_confirmed_outbox()?;
            state.pending_outbox()
        }
        Owed::Orphaned => state.orphaned_outbox(),
    })
    .await??;
    if pending.is_empty() {
        return Ok(());
    }
    let mut ch = broker::confirm_channel(conn).await?;
    let mut exchanges = ExchangeCheck::default();
    let mut sends = Vec::with_capacity(pending.len());
    let mut owners = Vec::with_capacity(pending.len());
    for (_, ns, message) in &pending {
        if !exchanges.exists(conn, &message.exchange).await? {
            continue;
        }
        sends.push(Send::output(0, message));
        owners.push(ns.as_str());
    }
    let results = publish_all(&ch, &sends).await;
    for ((send, ns), first) in sends.iter().zip(owners).zip(results) {
        let Err(first) = first else { continue };
        if !conn.status().connected() {
            bail!("the connection closed while relaying the outbox ({first})");
        }
        // The broker may be closing the channel over the refusal.
        ch = fresh_channel(conn, ch).await?;
        let refused = match &send.refused {
            Some(why) => why.clone(),
            None => match publish_one(&ch, send).await {
                Ok(()) => continue,
                Err(_) if !conn.status().connected() => {
                    bail!("the connection closed while relaying the outbox ({first})")
                }
                Err(why) => why,
            },
        };
        let reason = format!(
            "broker refused publish to exchange {:?}: {refused}",
            send.exchange
        );
        let Some(entry) = registry.get(ns) else {
            tracing::error!(
                handler = ns,
                "{}; the handler is gone, message dropped",
                broker::cap_reason(&reason)
            );
            continue;
        };
        let version = entry.version();
        tracing::warn!(
            handler = ns,
            "{}; the message goes to the dead-letter exchange",
            broker::cap_reason(&reason)
        );
        ch = fresh_channel(conn, ch).await?;
        let copy = Send {
            from: 0,
            ..refused_output(&version, send, &reason)
        };
        // Relaying runs before the handlers declare their topology: with
        // the dead-letter exchange gone too, the message is dropped (and
        // said so) rather than blocking every start.
        if let Err(e) = publish_one(&ch, &copy).await {
            if !conn.status().connected() {
                bail!("the connection closed while relaying the outbox ({e})");
            }
            tracing::error!(handler = ns, exchange = %send.exchange, "{}; its dead-letter copy was refused too ({e}): message dropped", broker::cap_reason(&reason));
            ch = fresh_channel(conn, ch).await?;
        }
    }
    let ids: Vec<i64> = pending.iter().map(|(id, _, _)| *id).collect();
    let state = dispatcher.state().clone();
    tokio::task::spawn_blocking(move || state.clear_outbox(&ids)).await??;
    match owed {
        Owed::Mine => tracing::info!(
            messages = pending.len(),
            "released outbox messages left by a previous run"
        ),
        Owed::Orphaned => tracing::warn!(
            messages = pending.len(),
            "released outbox messages another host committed and left unconfirmed (it stopped or lost the broker)"
        ),
    }
    let _ = ch.close(200, broker::short("outbox relayed")).await;
    Ok(())
}
