//! A ledger-based harness, in the spirit of the Jepsen checker RabbitMQ
//! itself is tested with: a producer stamps every event with a run id and a
//! sequence number and keeps the set of sequence numbers the broker
//! confirmed; a checker reads back everything the host did — handler state,
//! the dead-letter queue, the published outputs — and reports which
//! confirmed events were lost, which were applied more than once, and
//! anything it did not expect.
//!
//! The handler is the chaos guest's `ledger` action: it increments state
//! key `applied.<id>` by one and publishes one output carrying the id, so
//! "applied exactly once" is `applied.<id> == 1` and an event applied twice
//! shows as 2. Events carry `message_id = "<run>-<seq>"`, so the host's
//! message-id dedupe is what is under test when the broker redelivers; a
//! ledger made [`Ledger::without_message_ids`] sends none, as the seed's
//! Order Service does, and the handler's `idempotency_key` (the body's
//! `id`) is under test instead.
//! Mixed into the stream, hostile events (`loop`, `alloc`, `panic`, …)
//! must end in the dead-letter queue instead. A ledger made
//! [`Ledger::with_counter`] has every healthy event increment one shared
//! key as well — a hot key, like the stock level every order updates — so
//! that key ends at exactly the number of events applied.

#![allow(dead_code)] // each test uses a subset

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_host::state::StateStore;
use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::Value;

use crate::amqp_support::{unique, TestHost};

/// The handler under test (the chaos guest) and its state namespace.
pub const HANDLER: &str = "chaos";

/// The longest a producer keeps trying to get its stream confirmed.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(150);

/// What one event of the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A healthy ledger event: must be applied exactly once.
    Ledger,
    /// A chaos action that fails every attempt (`loop`, `alloc`, `panic`,
    /// …): must reach the dead-letter queue, with no effect.
    Hostile(&'static str),
}

/// Deletes a ledger run's queues and exchanges on the shared broker when
/// dropped, also when the test fails.
pub struct Cleanup<'a>(pub &'a Ledger);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.0.delete();
    }
}

/// Which kind each sequence number is.
pub type Mix = Arc<dyn Fn(u64) -> Kind + Send + Sync>;

/// Every event a healthy ledger event.
pub fn all_ledger() -> Mix {
    Arc::new(|_| Kind::Ledger)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(url: &str, name: &str) -> Result<Connection, String> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(Duration::from_secs(5), Connection::connect(url, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connecting timed out".into()),
    }
}

/// One deployment of the chaos handler for a ledger run: names, settings,
/// and the run id its events are stamped with.
pub struct Ledger {
    /// The broker.
    pub url: String,
    /// Run id: every event id is `<run>-<seq>`.
    pub run: String,
    /// Exchange the stream is published to (topic).
    pub exchange: String,
    /// The handler's work queue.
    pub queue: String,
    /// Exchange the handler publishes its outputs to (topic).
    pub out_exchange: String,
    /// A durable queue collecting every output.
    pub out_queue: String,
    /// Deliveries of an event before it is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub retry_base_ms: u64,
    /// Whether events carry a `message-id` (default true).
    pub message_ids: bool,
    /// A state key every healthy event increments too (default none).
    pub counter: Option<String>,
}

impl Ledger {
    /// Fresh names on the broker at `url`.
    pub fn new(url: &str, max_attempts: u32, retry_base_ms: u64) -> Self {
        let run = unique("run").replace("evh-t", "r");
        Self {
            url: url.to_owned(),
            exchange: unique("ledger-in"),
            queue: unique("ledger-q"),
            out_exchange: unique("ledger-out"),
            out_queue: unique("ledger-outputs"),
            run,
            max_attempts,
            retry_base_ms,
            message_ids: true,
            counter: None,
        }
    }

    /// The same ledger with every healthy event also incrementing state
    /// key `key` of the handler: it ends at the number of events applied.
    pub fn with_counter(self, key: &str) -> Self {
        Self {
            counter: Some(key.to_owned()),
            ..self
        }
    }

    /// The same ledger with a producer that sets no `message-id`: only the
    /// body's `id` tells a redelivery from a new event.
    pub fn without_message_ids(self) -> Self {
        Self {
            message_ids: false,
            ..self
        }
    }

    /// The dead-letter queue.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    /// The retry delay queues, as the host names them.
    pub fn retry_queues(&self) -> Vec<String> {
        (0..self.max_attempts.saturating_sub(1))
            .map(|n| format!("{}.retry.{}ms", self.queue, self.retry_base_ms << n))
            .collect()
    }

    /// The host config for the chaos handler (`extra`: more settings of
    /// its section). A ledger without message ids has chaos deduplicate on
    /// the body's `id`.
    pub fn config(&self, extra: &str) -> String {
        let key = if self.message_ids {
            ""
        } else {
            "idempotency_key = \"/id\""
        };
        format!(
            r##"
[handlers.{HANDLER}]
queue = "{queue}"
subscriptions = [{{ exchange = "{exchange}", kind = "topic", binding_keys = ["#"] }}]
max_attempts = {attempts}
retry_base_ms = {base}
retry_max_ms = {max}
publishes_to = [{{ exchange = "{out}", kind = "topic" }}]
{key}
{extra}
[handlers.{HANDLER}.config]
"ledger-exchange" = "{out}"
"##,
            queue = self.queue,
            exchange = self.exchange,
            attempts = self.max_attempts,
            base = self.retry_base_ms,
            max = self.retry_base_ms << self.max_attempts,
            out = self.out_exchange,
        )
    }

    /// The id of event `seq`.
    pub fn id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.run)
    }

    /// The sequence number in an id of this run.
    pub fn seq_of(&self, id: &str) -> Option<u64> {
        id.strip_prefix(&self.run)?.strip_prefix('-')?.parse().ok()
    }

    /// The body of event `seq`.
    pub fn body(&self, seq: u64, kind: Kind) -> Vec<u8> {
        let id = self.id(seq);
        match kind {
            Kind::Ledger => match &self.counter {
                Some(counter) => {
                    serde_json::json!({"action": "ledger", "id": id, "counter": counter})
                }
                None => serde_json::json!({"action": "ledger", "id": id}),
            },
            Kind::Hostile(action) => serde_json::json!({"action": action, "id": id}),
        }
        .to_string()
        .into_bytes()
    }

    /// Declare the output exchange and a durable queue collecting every
    /// output (before the host starts, so no output is unroutable).
    pub fn declare_outputs(&self) {
        rt().block_on(async {
            let conn = connect(&self.url, "ledger-setup").await.expect("broker");
            let ch = conn.create_channel().await.unwrap();
            ch.exchange_declare(
                self.out_exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
            ch.queue_declare(
                self.out_queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            ch.queue_bind(
                self.out_queue.as_str().into(),
                self.out_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            let _ = conn.close(200, "set up".into()).await;
        });
    }

    /// Delete everything this run declared (for runs on the shared
    /// broker; a private node goes away with its data).
    pub fn delete(&self) {
        rt().block_on(async {
            let Ok(conn) = connect(&self.url, "ledger-cleanup").await else {
                return;
            };
            let Ok(ch) = conn.create_channel().await else {
                return;
            };
            let mut queues = vec![self.queue.clone(), self.dlq(), self.out_queue.clone()];
            queues.extend(self.retry_queues());
            for q in &queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for e in [
                &self.exchange,
                &self.out_exchange,
                &format!("{}.dlx", self.queue),
            ] {
                let _ = ch
                    .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "cleaned up".into()).await;
        });
    }

    /// Start a producer of `count` events at about `rate` per second
    /// (not catching up after an outage), `mix` choosing each one's kind.
    pub fn produce(&self, count: u64, rate: f64, mix: Mix) -> Producer {
        let progress = Arc::new(Progress::default());
        let spec = Spec {
            url: self.url.clone(),
            exchange: self.exchange.clone(),
            run: self.run.clone(),
            bodies: (0..count).map(|seq| self.body(seq, mix(seq))).collect(),
            rate,
            batch: 250,
            message_ids: self.message_ids,
        };
        let p = progress.clone();
        let thread = std::thread::Builder::new()
            .name("ledger-producer".into())
            .spawn(move || {
                let result = rt().block_on(produce(spec, &p));
                p.done.store(true, Ordering::SeqCst);
                result
            })
            .unwrap();
        Producer {
            progress,
            thread: Some(thread),
        }
    }

    /// Messages ready in the work queue and the retry queues (`None` while
    /// the broker cannot be asked).
    pub fn backlog(&self) -> Option<u64> {
        let mut queues = vec![self.queue.clone()];
        queues.extend(self.retry_queues());
        let probe = async {
            let conn = connect(&self.url, "ledger-probe").await.ok()?;
            let mut total = 0u64;
            for q in &queues {
                let ch = conn.create_channel().await.ok()?;
                let declared = crate::amqp_support::passive_declare(&ch, q.as_str()).await;
                match declared {
                    Ok(queue) => total += u64::from(queue.message_count()),
                    // A retry queue not declared yet holds nothing.
                    Err(_) if conn.status().connected() => {}
                    Err(_) => return None,
                }
                let _ = ch.close(200, "probe".into()).await;
            }
            let _ = conn.close(200, "probe".into()).await;
            Some(total)
        };
        // A broker going down mid-probe may never answer a close.
        rt().block_on(async {
            tokio::time::timeout(Duration::from_secs(10), probe)
                .await
                .ok()
                .flatten()
        })
    }

    /// Wait until the host has nothing left to do: no message ready in the
    /// work or retry queues and the handler's counters unchanged for a
    /// second. Returns the time it took. This never waits for a figure the
    /// checker is about to judge, so a lost event shows in the report
    /// rather than as a timeout.
    pub fn wait_settled(&self, host: &TestHost, timeout: Duration) -> Duration {
        let start = Instant::now();
        let mut last = (u64::MAX, Instant::now());
        loop {
            let c = host.counters(HANDLER);
            let moved: u64 = [
                "acked",
                "dead_lettered",
                "retried",
                "requeued",
                "instantiations",
            ]
            .iter()
            .map(|k| c[k].as_u64().unwrap_or(0))
            .sum();
            if moved != last.0 {
                last = (moved, Instant::now());
            }
            if last.1.elapsed() >= Duration::from_secs(1) && self.backlog() == Some(0) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "the host did not settle within {timeout:?}: backlog {:?}, counters {c}",
                self.backlog()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stop the host (gracefully) and read back what it did: the state,
    /// the dead-letter queue and the outputs.
    pub fn check(&self, host: &mut TestHost, produced: &Produced, mix: &Mix) -> Report {
        host.stop_in_place().expect("the host stopped cleanly");
        let store = crate::backend::open_state(&host.state_dir());
        let outbox_pending = store.pending_outbox().expect("outbox").len();
        self.check_store(&store, outbox_pending, produced, mix)
    }

    /// Read back what the hosts did, once none runs: the state in `store`
    /// (either backend: a host's SQLite folder, or the schema a fleet
    /// shares), the dead-letter queue and the outputs. `outbox_pending`:
    /// outbox rows left unpublished, as the caller counts them (on shared
    /// state `pending_outbox` shows only one host id's rows — and claims
    /// them — so a fleet's check asks the table).
    pub fn check_store(
        &self,
        store: &StateStore,
        outbox_pending: usize,
        produced: &Produced,
        mix: &Mix,
    ) -> Report {
        let applied = read_applied(store);
        let dlq = read_queue(&self.url, &self.dlq());
        let outputs = read_queue(&self.url, &self.out_queue);
        self.judge(produced, mix, &applied, &dlq, &outputs, outbox_pending)
    }

    /// The checker proper: what was produced against what was applied,
    /// dead-lettered and published.
    pub fn judge(
        &self,
        produced: &Produced,
        mix: &Mix,
        applied: &BTreeMap<String, i64>,
        dlq: &[Message],
        outputs: &[Message],
        outbox_pending: usize,
    ) -> Report {
        let mut r = Report {
            run: self.run.clone(),
            sent: produced.sent.len(),
            confirmed: produced.confirmed.len(),
            republished: produced.republished,
            outbox_pending,
            ..Report::default()
        };
        let mut applied_seqs = BTreeSet::new();
        for (id, &n) in applied {
            let Some(seq) = self.seq_of(id) else {
                r.unexpected.push(format!(
                    "state applied.{id} = {n}: not an event of this run"
                ));
                continue;
            };
            if !produced.sent.contains(&seq) {
                r.unexpected
                    .push(format!("state applied.{id} = {n}: never sent"));
            }
            if let Kind::Hostile(action) = mix(seq) {
                r.unexpected.push(format!(
                    "state applied.{id} = {n}: a hostile `{action}` event"
                ));
            }
            match n {
                1 => {}
                n if n > 1 => r.duplicated.push((seq, n)),
                n => r.unexpected.push(format!("state applied.{id} = {n}")),
            }
            if n >= 1 {
                applied_seqs.insert(seq);
            }
        }
        let mut dead = BTreeSet::new();
        for m in dlq {
            r.dead_lettered_raw += 1;
            // Without message ids, the body says which event it was.
            let id = m.message_id.clone().unwrap_or_else(|| {
                serde_json::from_slice::<Value>(&m.body)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_owned))
                    .unwrap_or_default()
            });
            match self.seq_of(&id) {
                None => r
                    .unexpected
                    .push(format!("dead-lettered {id:?}: not an event of this run")),
                Some(seq) => {
                    if mix(seq) == Kind::Ledger {
                        r.unexpected.push(format!(
                            "healthy event {id} dead-lettered: {}",
                            m.reason.as_deref().unwrap_or("no reason")
                        ));
                    }
                    dead.insert(seq);
                    r.dead_reasons
                        .push((seq, m.reason.clone().unwrap_or_default()));
                }
            }
        }
        r.dead_lettered = dead.len();
        for &seq in &produced.confirmed {
            let ok = match mix(seq) {
                Kind::Ledger => {
                    let once = applied.get(&self.id(seq)) == Some(&1);
                    if once {
                        r.applied_once += 1;
                    }
                    applied_seqs.contains(&seq)
                }
                Kind::Hostile(_) => dead.contains(&seq),
            };
            if !ok {
                r.lost.push(seq);
            }
        }
        r.applied_unconfirmed = applied_seqs
            .iter()
            .filter(|s| !produced.confirmed.contains(s))
            .count();
        // Per applied event, the message ids its outputs carried: one, however
        // often it was published (an outbox relayed again after a crash
        // repeats the id, and downstream dedupes on it).
        let mut out_ids: BTreeMap<u64, BTreeSet<Option<String>>> = BTreeMap::new();
        for m in outputs {
            r.outputs_raw += 1;
            let id = serde_json::from_slice::<Value>(&m.body)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned))
                .unwrap_or_default();
            match self.seq_of(&id) {
                Some(seq) if applied_seqs.contains(&seq) => {
                    out_ids.entry(seq).or_default().insert(m.message_id.clone());
                }
                _ => r.unexpected.push(format!(
                    "output {:?} for an event not applied",
                    String::from_utf8_lossy(&m.body)
                )),
            }
        }
        r.outputs_distinct = out_ids.len();
        r.outputs_missing = applied_seqs
            .iter()
            .filter(|seq| !out_ids.contains_key(seq))
            .copied()
            .collect();
        for (seq, ids) in out_ids {
            if ids.len() > 1 || ids.contains(&None) {
                r.outputs_reissued.push((seq, ids.into_iter().collect()));
            }
        }
        r
    }
}

/// What the producer was asked to do.
struct Spec {
    url: String,
    exchange: String,
    run: String,
    bodies: Vec<Vec<u8>>,
    rate: f64,
    batch: usize,
    message_ids: bool,
}

/// A producer's progress, readable while it runs.
#[derive(Default)]
pub struct Progress {
    /// Distinct events published at least once.
    pub sent: AtomicU64,
    /// Distinct events the broker confirmed.
    pub confirmed: AtomicU64,
    /// Publishes waiting for their confirm right now.
    pub awaiting: AtomicU64,
    /// Connections it had to open again.
    pub reconnects: AtomicU64,
    /// True once it finished (or gave up).
    pub done: AtomicBool,
    /// Events to publish at once, beyond the rate (see [`Producer::burst`]).
    pub burst: AtomicU64,
    /// Set when the test no longer wants the stream (it failed half-way).
    pub cancelled: AtomicBool,
}

/// What a producer did.
#[derive(Debug, Default)]
pub struct Produced {
    /// Sequence numbers published at least once.
    pub sent: BTreeSet<u64>,
    /// Sequence numbers the broker confirmed (ack, routed).
    pub confirmed: BTreeSet<u64>,
    /// Publishes of an event already published before (its confirm was
    /// lost with a connection, or the broker refused it).
    pub republished: u64,
    /// Connections it had to open again.
    pub reconnects: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// A running producer.
pub struct Producer {
    pub progress: Arc<Progress>,
    thread: Option<std::thread::JoinHandle<Result<Produced, String>>>,
}

impl Producer {
    /// Events confirmed so far.
    pub fn confirmed(&self) -> u64 {
        self.progress.confirmed.load(Ordering::SeqCst)
    }

    /// Events sent so far.
    pub fn sent(&self) -> u64 {
        self.progress.sent.load(Ordering::SeqCst)
    }

    /// Publishes waiting for their confirm right now (a fault now catches
    /// the producer mid-batch).
    pub fn awaiting(&self) -> u64 {
        self.progress.awaiting.load(Ordering::SeqCst)
    }

    /// Whether it has finished.
    pub fn done(&self) -> bool {
        self.progress.done.load(Ordering::SeqCst)
    }

    /// Publish `n` more events at once, on top of the rate: a backlog
    /// for the host to drain.
    pub fn burst(&self, n: u64) {
        self.progress.burst.fetch_add(n, Ordering::SeqCst);
    }

    /// Block until at least `n` events are confirmed.
    pub fn wait_confirmed(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.confirmed() < n {
            assert!(
                !self.done() && Instant::now() < deadline,
                "producer stuck at {} confirmed (waiting for {n})",
                self.confirmed()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for the whole stream to be confirmed.
    pub fn join(mut self) -> Produced {
        match self.thread.take().unwrap().join() {
            Ok(Ok(produced)) => produced,
            Ok(Err(e)) => panic!("producer failed: {e}"),
            Err(_) => panic!("producer panicked"),
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // A test that failed half-way does not wait for a stream nobody
        // will check: the thread stops at its next batch.
        self.progress.cancelled.store(true, Ordering::SeqCst);
        drop(self.thread.take());
    }
}

async fn open_channel(spec: &Spec) -> Result<(Connection, Channel), String> {
    let conn = connect(&spec.url, "ledger-producer").await?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok((conn, ch))
}

/// Publish every event with confirms, in batches of `spec.batch` at about
/// `spec.rate` per second. An event whose confirm does not come back (the
/// connection died, the broker nacked, it was unroutable) is published
/// again on the next connection: the broker may now hold it twice, which
/// is exactly the redelivery the host must absorb.
async fn produce(spec: Spec, progress: &Progress) -> Result<Produced, String> {
    let count = spec.bodies.len() as u64;
    let start = Instant::now();
    let mut produced = Produced::default();
    let mut pending: VecDeque<u64> = VecDeque::new();
    let mut next = 0u64;
    let mut session: Option<(Connection, Channel)> = None;
    let mut returned = 0u64;
    let (mut tokens, mut tick) = (0.0f64, Instant::now());
    while (produced.confirmed.len() as u64) < count {
        if progress.cancelled.load(Ordering::SeqCst) {
            return Err("cancelled".into());
        }
        if start.elapsed() > PRODUCE_TIMEOUT {
            return Err(format!(
                "gave up after {PRODUCE_TIMEOUT:?}: {} of {count} confirmed, {returned} unroutable, {} reconnects",
                produced.confirmed.len(),
                produced.reconnects
            ));
        }
        if session.is_none() {
            match open_channel(&spec).await {
                Ok(s) => session = Some(s),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        // A token bucket: new events at `rate`, bursts of one batch at
        // most, so the stream does not rush to catch up after an outage
        // (events waiting for a re-publish go first and cost nothing);
        // `Producer::burst` adds tokens beyond that.
        let now = Instant::now();
        let refill = now.duration_since(tick).as_secs_f64() * spec.rate;
        tokens = (tokens + refill).min(tokens.max(spec.batch as f64));
        tokens += progress.burst.swap(0, Ordering::SeqCst) as f64;
        tick = now;
        // Batches of 50 ms worth of events: a confirm round trip each.
        if pending.is_empty()
            && next < count
            && tokens < (spec.rate / 20.0).clamp(1.0, spec.batch as f64)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let mut batch = Vec::with_capacity(spec.batch);
        while batch.len() < spec.batch {
            if let Some(seq) = pending.pop_front() {
                batch.push(seq);
            } else if next < count && tokens >= 1.0 {
                batch.push(next);
                next += 1;
                tokens -= 1.0;
            } else {
                break;
            }
        }
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let (_, ch) = session.as_ref().unwrap();
        let mut broken = false;
        let mut waiting = Vec::with_capacity(batch.len());
        for (i, &seq) in batch.iter().enumerate() {
            let mut props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            if spec.message_ids {
                props = props.with_message_id(format!("{}-{seq}", spec.run).into());
            }
            let published = ch
                .basic_publish(
                    spec.exchange.as_str().into(),
                    "ledger".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &spec.bodies[seq as usize],
                    props,
                )
                .await;
            match published {
                Ok(confirm) => {
                    if !produced.sent.insert(seq) {
                        produced.republished += 1;
                    }
                    waiting.push((seq, confirm));
                }
                Err(_) => {
                    broken = true;
                    pending.extend(&batch[i..]);
                    break;
                }
            }
        }
        progress
            .sent
            .store(produced.sent.len() as u64, Ordering::SeqCst);
        progress
            .awaiting
            .store(waiting.len() as u64, Ordering::SeqCst);
        // One deadline for the batch's confirms, which a dead connection
        // may never resolve.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for (seq, confirm) in waiting {
            match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => {
                    produced.confirmed.insert(seq);
                }
                Ok(Ok(Confirmation::Ack(Some(_)))) => {
                    // Unroutable: not in any queue, so not confirmed.
                    returned += 1;
                    pending.push_back(seq);
                }
                Ok(Ok(Confirmation::Nack(_))) => pending.push_back(seq),
                Ok(Ok(Confirmation::NotRequested)) => {
                    return Err("publisher confirms are not on".into())
                }
                Ok(Err(_)) | Err(_) => {
                    broken = true;
                    pending.push_back(seq);
                }
            }
        }
        progress.awaiting.store(0, Ordering::SeqCst);
        progress
            .confirmed
            .store(produced.confirmed.len() as u64, Ordering::SeqCst);
        if broken {
            // Closing a broken connection can wait forever for a close-ok:
            // bounded, then dropped.
            if let Some((conn, _)) = session.take() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.close(200, "reconnecting".into()),
                )
                .await;
            }
            produced.reconnects += 1;
            progress.reconnects.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if let Some((conn, _)) = session.take() {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            conn.close(200, "stream confirmed".into()),
        )
        .await;
    }
    produced.elapsed = start.elapsed();
    Ok(produced)
}

/// `applied.<id>` → count, from the committed state (either backend).
pub fn read_applied(store: &StateStore) -> BTreeMap<String, i64> {
    let applied = read_applied_keys(store);
    // Listing keys runs in a batch on shared state: end it, releasing its
    // connection.
    store.end_batch(HANDLER);
    applied
}

fn read_applied_keys(store: &StateStore) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let mut after = "applied.".to_owned();
    loop {
        let keys = store
            .list_keys(HANDLER, Some(&after), 1000)
            .expect("listing state keys");
        let Some(last) = keys.last().cloned() else {
            break;
        };
        for key in keys {
            let Some(id) = key.strip_prefix("applied.") else {
                return out;
            };
            let value = store
                .get_committed(HANDLER, &key)
                .expect("reading state")
                .unwrap_or_default();
            let n = std::str::from_utf8(&value)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(i64::MIN);
            out.insert(id.to_owned(), n);
        }
        after = last;
    }
    out
}

/// A message read back from a queue.
#[derive(Debug, Clone)]
pub struct Message {
    pub message_id: Option<String>,
    pub body: Vec<u8>,
    /// `x-event-host-reason` (dead-lettered messages).
    pub reason: Option<String>,
}

/// Take every message in `queue` (auto-ack: the queue ends up empty).
pub fn read_queue(url: &str, queue: &str) -> Vec<Message> {
    rt().block_on(async {
        let conn = connect(url, "ledger-checker").await.expect("broker");
        let ch = conn.create_channel().await.unwrap();
        let depth = crate::amqp_support::passive_declare(&ch, queue)
            .await
            .map(|q| q.message_count())
            .unwrap_or(0);
        let mut out = Vec::with_capacity(depth as usize);
        if depth > 0 {
            let mut consumer = ch
                .basic_consume(
                    queue.into(),
                    "ledger-checker".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            while out.len() < depth as usize {
                let next = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await;
                let Ok(Some(Ok(d))) = next else {
                    panic!(
                        "reading {queue}: {} of {depth} messages, then nothing",
                        out.len()
                    );
                };
                let reason = d
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("x-event-host-reason").cloned())
                    .and_then(|v| match v {
                        AMQPValue::LongString(s) => {
                            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                        }
                        _ => None,
                    });
                out.push(Message {
                    message_id: d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.as_str().to_owned()),
                    body: d.data,
                    reason,
                });
            }
            let _ = ch
                .basic_cancel("ledger-checker".into(), BasicCancelOptions::default())
                .await;
        }
        let _ = conn.close(200, "read".into()).await;
        out
    })
}

/// The checker's verdict on one run.
#[derive(Debug, Default)]
pub struct Report {
    pub run: String,
    /// Distinct events published at least once.
    pub sent: usize,
    /// Distinct events the broker confirmed.
    pub confirmed: usize,
    /// Publishes repeated by the producer after a lost confirm.
    pub republished: u64,
    /// Confirmed healthy events whose state shows exactly one application.
    pub applied_once: usize,
    /// Confirmed events with no effect: a healthy one never applied, or a
    /// hostile one neither applied nor dead-lettered.
    pub lost: Vec<u64>,
    /// Events applied more than once: (seq, times).
    pub duplicated: Vec<(u64, i64)>,
    /// Effects nobody asked for: ids never sent or of another run, hostile
    /// events applied, healthy ones dead-lettered, outputs without an
    /// applied event, state values that are not a count.
    pub unexpected: Vec<String>,
    /// Distinct events in the dead-letter queue.
    pub dead_lettered: usize,
    /// (seq, `x-event-host-reason`) of every dead-lettered message.
    pub dead_reasons: Vec<(u64, String)>,
    /// Messages in the dead-letter queue (a dead-lettering repeated after a
    /// lost ack counts twice here, once above).
    pub dead_lettered_raw: usize,
    /// Events applied whose publish the broker never confirmed to the
    /// producer (it got there, the confirm was lost): fine.
    pub applied_unconfirmed: usize,
    /// Distinct applied events with an output.
    pub outputs_distinct: usize,
    /// Output messages (the outbox may legitimately publish one again,
    /// with the same message id, after a crash).
    pub outputs_raw: usize,
    /// Applied events with no output.
    pub outputs_missing: Vec<u64>,
    /// Events whose output was published under more than one message id,
    /// or under none: (seq, the ids). Downstream cannot tell such a
    /// repeat from a new message.
    pub outputs_reissued: Vec<(u64, Vec<Option<String>>)>,
    /// Outbox rows left unpublished when the host stopped.
    pub outbox_pending: usize,
}

impl Report {
    /// The verdict of a stream of `n` healthy events through faults: every
    /// one confirmed, applied exactly once, none lost, repeated,
    /// unexpected or dead-lettered.
    pub fn assert_all_applied_once(&self, n: u64) {
        assert_eq!(self.confirmed as u64, n, "every event confirmed: {self}");
        assert!(self.lost.is_empty(), "lost: {self}");
        assert!(self.duplicated.is_empty(), "duplicated: {self}");
        assert!(self.unexpected.is_empty(), "unexpected: {self}");
        assert_eq!(self.applied_once as u64, n, "applied exactly once: {self}");
        assert_eq!(self.dead_lettered, 0, "{self}");
    }
}

impl Report {
    /// Nothing lost, nothing applied twice, nothing unexpected, an output
    /// for every applied event, each under one message id.
    pub fn clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.unexpected.is_empty()
            && self.outputs_missing.is_empty()
            && self.outputs_reissued.is_empty()
    }
}

fn first<T: fmt::Debug>(items: &[T]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = items.iter().take(10).map(|i| format!("{i:?}")).collect();
    let more = items.len().saturating_sub(10);
    format!(
        " [{}{}]",
        shown.join(", "),
        if more > 0 {
            format!(", … {more} more")
        } else {
            String::new()
        }
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {}: sent {}, confirmed {} (re-published {}), applied once {}, \
             lost {}{}, duplicated {}{}, unexpected {}{}, dead-lettered {} ({} messages), \
             applied though unconfirmed {}, outputs {} distinct ({} messages), \
             outputs missing {}{}, outputs under several message ids {}{}, \
             outbox rows left {}",
            self.run,
            self.sent,
            self.confirmed,
            self.republished,
            self.applied_once,
            self.lost.len(),
            first(&self.lost),
            self.duplicated.len(),
            first(&self.duplicated),
            self.unexpected.len(),
            first(&self.unexpected),
            self.dead_lettered,
            self.dead_lettered_raw,
            self.applied_unconfirmed,
            self.outputs_distinct,
            self.outputs_raw,
            self.outputs_missing.len(),
            first(&self.outputs_missing),
            self.outputs_reissued.len(),
            first(&self.outputs_reissued),
            self.outbox_pending,
        )
    }
}

/// Events of each kind in a mix, for figures.
pub fn census(mix: &Mix, count: u64) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for seq in 0..count {
        let name = match mix(seq) {
            Kind::Ledger => "ledger".to_owned(),
            Kind::Hostile(a) => a.to_owned(),
        };
        *out.entry(name).or_default() += 1;
    }
    out
}
