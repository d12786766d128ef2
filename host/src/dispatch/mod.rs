//! The dispatcher: the one place that turns a delivery into a handler call
//! and a handler call into a disposition (ack, retry, reject).
//!
//! The broker consumer and `replay` both go through [`Dispatcher::dispatch`],
//! so offline runs exercise exactly the code that serves production events.
//! [`decide`] is the single ack decision.

use std::time::Duration;

pub mod amqp;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::bindings;
use crate::broker::{self, HANDLER_HEADER, HOST_HEADER, VERSION_HEADER};
use crate::guest::GuestState;
use crate::handler::HandlerVersion;
use crate::idempotency;
use crate::read_ahead;
use crate::runtime::{CallResult, Runtime, WarmInstance};
use crate::state::{Commit, CommitOutcome, Contended, Outgoing, PendingCommit, StateStore};
use crate::trace;

/// One message as it arrived, in host terms (the broker adapter and replay
/// build these).
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    /// Body bytes.
    pub payload: Vec<u8>,
    /// Exchange it was published to.
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// `message-id` property.
    pub message_id: Option<String>,
    /// `correlation-id` property.
    pub correlation_id: Option<String>,
    /// `content-type` property.
    pub content_type: Option<String>,
    /// Application headers.
    pub headers: Vec<(String, HeaderValue)>,
    /// `timestamp` property (Unix seconds).
    pub timestamp: Option<u64>,
    /// Broker redelivery flag.
    pub redelivered: bool,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// This attempt's span of the event's trace (W3C Trace Context): set
    /// for deliveries from the broker, carried on to what the attempt
    /// publishes. `None` (replay, tools): nothing is stamped.
    pub span: Option<trace::Span>,
}

/// A header value in host terms (mirrors the WIT `header-value`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HeaderValue {
    /// Text.
    Text(String),
    /// Integer.
    Integer(i64),
    /// Float.
    Float(f64),
    /// Boolean.
    Boolean(bool),
    /// Bytes.
    Bytes(Vec<u8>),
    /// Nested table or array as JSON text.
    Json(String),
}

impl Delivery {
    fn to_event(&self) -> bindings::Event {
        bindings::Event {
            payload: self.payload.clone(),
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            message_id: self.message_id.clone(),
            correlation_id: self.correlation_id.clone(),
            content_type: self.content_type.clone(),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        HeaderValue::Text(s) => bindings::HeaderValue::Text(s.clone()),
                        HeaderValue::Integer(i) => bindings::HeaderValue::Integer(*i),
                        HeaderValue::Float(f) => bindings::HeaderValue::Float(*f),
                        HeaderValue::Boolean(b) => bindings::HeaderValue::Boolean(*b),
                        HeaderValue::Bytes(b) => bindings::HeaderValue::Bytes(b.clone()),
                        HeaderValue::Json(j) => bindings::HeaderValue::Json(j.clone()),
                    };
                    (k.clone(), v)
                })
                .collect(),
            timestamp: self.timestamp,
            redelivered: self.redelivered,
            attempt: self.attempt.max(1),
        }
    }
}

/// What to do with a delivery after its handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Effects are durable; ack the input.
    Ack,
    /// Try again later (retry path), counting an attempt.
    Retry,
    /// Dead-letter now.
    Reject,
    /// Put the event back without counting an attempt (a host fault, a
    /// paused handler). Host faults and exhausted conflict re-runs count
    /// as failures for the crash-loop breaker, so a poison event that
    /// faults the host pauses its handler instead of looping hot.
    Requeue,
}

/// What happened to an event, as [`decide`] takes it.
#[derive(Debug, Clone, Copy)]
pub enum Happened<'a> {
    /// The guest ran, with this result.
    Called(&'a CallResult),
    /// The guest ran, with this result, after the host refused one of its
    /// state calls for going over a per-event limit (the refusal's text).
    /// A failed call is then not retried: the same event would go over the
    /// limit again.
    OverLimit(&'a CallResult, &'a str),
    /// Over a bound before its guest ran (payload, headers) or before its
    /// effects could commit (the batch budget).
    TooLarge(Oversize),
    /// Its message id had already committed.
    Duplicate,
    /// The host failed (the state store, for example).
    HostFault(&'a str),
    /// Re-run `MAX_CONFLICT_RERUNS` (8) times, what it read kept changing.
    Conflict(&'a str),
    /// The handler was paused or removed before the event ran.
    Inactive,
}

/// A bound an event went over, with its size and the cap (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversize {
    /// The body, over the handler's `max_payload_kb`: the guest did not run.
    Payload {
        /// Body size.
        bytes: usize,
        /// The cap.
        cap: usize,
    },
    /// The header table, over [`crate::broker::MAX_HEADER_BYTES`]: the
    /// guest did not run, and the dead-letter copy carries only the
    /// host's headers.
    Headers {
        /// Encoded size.
        bytes: usize,
        /// The cap.
        cap: usize,
    },
    /// The event's own writes and publishes, over the batch budget
    /// ([`MAX_BATCH_COMMIT_BYTES`]): its effects are dropped.
    Commit {
        /// Their size.
        bytes: usize,
        /// The budget.
        cap: usize,
    },
}

impl std::fmt::Display for Oversize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Oversize::Payload { bytes, cap } => {
                write!(f, "payload of {bytes} bytes is over the {cap}-byte cap")
            }
            Oversize::Headers { bytes, cap } => {
                write!(f, "headers of {bytes} bytes over the {cap}-byte cap")
            }
            Oversize::Commit { bytes, cap } => write!(
                f,
                "writes and publishes of {bytes} bytes over the {cap}-byte batch budget"
            ),
        }
    }
}

impl<'a> From<&'a CallResult> for Happened<'a> {
    fn from(result: &'a CallResult) -> Self {
        Happened::Called(result)
    }
}

/// Why an event was not simply acked, typed: the acker, the breaker and
/// the metrics match on this. Only [`decide`] makes [`Reason`]s.
#[derive(Debug, Clone, PartialEq)]
pub enum Cause {
    /// The guest returned `retry`.
    GuestRetry(String),
    /// The guest returned `reject`.
    GuestReject(String),
    /// The guest trapped, timed out or hit a resource cap.
    GuestFault(String),
    /// Failed attempts used up: dead-lettered after the last one.
    AttemptsExhausted {
        /// The attempt that failed last.
        attempt: u32,
        /// The handler's max attempts.
        max: u32,
        /// How the last attempt failed.
        last: Box<Cause>,
    },
    /// See [`Happened::TooLarge`].
    TooLarge(Oversize),
    /// See [`Happened::OverLimit`]: the refusal, and how the call failed
    /// after it.
    OverLimit {
        /// What the host refused.
        limit: String,
        /// How the call failed.
        then: Box<Cause>,
    },
    /// Its message id had already committed: acked, not run again.
    Duplicate,
    /// A host fault: requeued, counted by the breaker.
    HostFault(String),
    /// A state key kept changing under the event: requeued, counted by
    /// the breaker.
    Conflict(String),
    /// The handler was not active: requeued unrun.
    Inactive,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::GuestRetry(r) | Cause::GuestReject(r) | Cause::GuestFault(r) => f.write_str(r),
            Cause::AttemptsExhausted { attempt, max, last } => {
                write!(f, "{ATTEMPTS_EXHAUSTED} ({attempt}/{max}): {last}")
            }
            Cause::TooLarge(over) => write!(f, "{over}"),
            Cause::OverLimit { limit, then } => write!(
                f,
                "{OVER_LIMIT} ({limit}), which the event would do again: {then}"
            ),
            Cause::Duplicate => f.write_str(DUPLICATE),
            Cause::HostFault(e) => write!(f, "host error: {e}"),
            Cause::Conflict(key) => write!(f, "state key {key:?} kept changing under the event"),
            Cause::Inactive => f.write_str("handler not active"),
        }
    }
}

/// A [`Cause`] with its text, rendered once by [`decide`]: the text is
/// what headers and logs show (and it derefs to it); code matches on
/// [`Reason::cause`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reason {
    cause: Option<Cause>,
    text: String,
}

impl Reason {
    fn new(cause: Cause) -> Self {
        Self {
            text: cause.to_string(),
            cause: Some(cause),
        }
    }

    /// Why, typed (`None` only for the empty default reason).
    pub fn cause(&self) -> Option<&Cause> {
        self.cause.as_ref()
    }
}

impl std::ops::Deref for Reason {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// An outcome and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What to do with the input.
    pub outcome: Outcome,
    /// Why, for anything but a plain ack.
    pub reason: Option<Reason>,
}

/// The ack decision, and the only producer of [`Reason`]s: how what
/// happened maps to an outcome, given the attempt this was and the
/// handler's max attempts. Traps, timeouts and memory-cap hits are failed
/// attempts like `retry`; once attempts are used up the event is
/// dead-lettered rather than retried forever.
pub fn decide<'a>(happened: impl Into<Happened<'a>>, attempt: u32, max_attempts: u32) -> Decision {
    let decision = |outcome, cause| Decision {
        outcome,
        reason: Some(Reason::new(cause)),
    };
    let failed_attempt = |cause: Cause| {
        if attempt >= max_attempts {
            decision(
                Outcome::Reject,
                Cause::AttemptsExhausted {
                    attempt,
                    max: max_attempts,
                    last: Box::new(cause),
                },
            )
        } else {
            decision(Outcome::Retry, cause)
        }
    };
    match happened.into() {
        Happened::Called(CallResult::Ok) => Decision {
            outcome: Outcome::Ack,
            reason: None,
        },
        Happened::Called(CallResult::Reject(r)) => {
            decision(Outcome::Reject, Cause::GuestReject(r.clone()))
        }
        Happened::Called(CallResult::Retry(r)) => failed_attempt(Cause::GuestRetry(r.clone())),
        Happened::Called(CallResult::Trapped(failure)) => {
            failed_attempt(Cause::GuestFault(failure.to_string()))
        }
        Happened::Called(CallResult::HostError(e)) => {
            decision(Outcome::Requeue, Cause::HostFault(e.clone()))
        }
        Happened::OverLimit(result, limit) => {
            let then = match result {
                CallResult::Retry(r) => Cause::GuestRetry(r.clone()),
                CallResult::Trapped(failure) => Cause::GuestFault(failure.to_string()),
                // Handled by the guest, or not the guest's doing: as ever.
                other => return decide(Happened::Called(other), attempt, max_attempts),
            };
            decision(
                Outcome::Reject,
                Cause::OverLimit {
                    limit: limit.to_owned(),
                    then: Box::new(then),
                },
            )
        }
        Happened::HostFault(e) => decision(Outcome::Requeue, Cause::HostFault(e.to_owned())),
        Happened::TooLarge(over) => decision(Outcome::Reject, Cause::TooLarge(over)),
        Happened::Duplicate => decision(Outcome::Ack, Cause::Duplicate),
        Happened::Conflict(key) => decision(Outcome::Requeue, Cause::Conflict(key.to_owned())),
        Happened::Inactive => decision(Outcome::Requeue, Cause::Inactive),
    }
}

/// The result of dispatching one delivery to one handler.
#[derive(Debug, Clone, Serialize)]
pub struct Handled {
    /// What to do with the input.
    pub outcome: Outcome,
    /// Why, for anything but a plain ack.
    pub reason: Option<Reason>,
    /// What the handler published (released: the call committed).
    pub published: Vec<Outgoing>,
    /// Outbox rows holding `published`, to clear once confirmed.
    #[serde(skip)]
    pub outbox_ids: Vec<i64>,
    /// True when the event had already committed and was not run again.
    pub duplicate: bool,
    /// Time spent in the guest (all runs, if a conflict re-ran it).
    #[serde(skip)]
    pub elapsed: Duration,
}

impl Handled {
    /// A failure for the crash-loop breaker and rollback: a failed attempt
    /// (trap, timeout, `retry`, attempts exhausted, a commit over the
    /// budget) or an event given back unsettled by a host fault or endless
    /// conflicts — so nothing can requeue in a hot loop without tripping
    /// the breaker. A deliberate `reject` is the handler working, not
    /// failing; an oversized input is the publisher's fault.
    pub fn is_failure(&self) -> bool {
        self.outcome == Outcome::Retry
            || matches!(
                self.cause(),
                Some(
                    Cause::AttemptsExhausted { .. }
                        | Cause::TooLarge(Oversize::Commit { .. })
                        | Cause::HostFault(_)
                        | Cause::Conflict(_)
                )
            )
    }

    /// Why, typed (`None` for a plain ack).
    pub fn cause(&self) -> Option<&Cause> {
        self.reason.as_ref().and_then(Reason::cause)
    }

    /// An outcome with no effects released (failures, skipped duplicates,
    /// read-only calls).
    pub(crate) fn without_effects(decision: Decision, elapsed: Duration) -> Self {
        Self {
            duplicate: decision.reason.as_ref().and_then(Reason::cause) == Some(&Cause::Duplicate),
            outcome: decision.outcome,
            reason: decision.reason,
            published: Vec::new(),
            outbox_ids: Vec::new(),
            elapsed,
        }
    }
}

/// How the status page counts a settled event (see [`crate::activity`]).
impl From<&Handled> for crate::activity::Sample {
    fn from(h: &Handled) -> Self {
        use crate::activity::Settled;
        let settled = match h.outcome {
            Outcome::Ack if h.duplicate => Settled::Duplicate,
            Outcome::Ack => Settled::Acked,
            Outcome::Retry => Settled::Retried,
            Outcome::Reject => Settled::DeadLettered,
            Outcome::Requeue => Settled::Requeued,
        };
        // No time in the guest: it did not run (duplicate, over a bound,
        // handler inactive), and a zero would drag the percentiles down.
        let latency = (!h.duplicate && !h.elapsed.is_zero()).then_some(h.elapsed);
        Self { settled, latency }
    }
}

/// How the reason of a dead-lettered, repeatedly failing event starts.
const ATTEMPTS_EXHAUSTED: &str = "attempts exhausted";

/// How the reason of an event dead-lettered for going over a per-event
/// state limit begins.
const OVER_LIMIT: &str = "a state call went over a per-event limit";

/// Reason given for an event whose idempotency key already committed.
const DUPLICATE: &str = "duplicate: idempotency key already committed";

/// How many times an event is re-run when another event of the same
/// handler changed what it read before it could commit.
const MAX_CONFLICT_RERUNS: u32 = 8;

/// Most bytes (written keys and values, published messages) one state
/// transaction of a batch holds. A batch over it commits as several
/// transactions; one event over it alone is dead-lettered
/// ([`Oversize::Commit`]). SQLite refuses a blob over 1 GB
/// (SQLITE_TOOBIG), and a batch's outbox is one blob.
pub const MAX_BATCH_COMMIT_BYTES: usize = 64 << 20;

/// What a commit puts in the store, roughly: keys, values, and the
/// messages' bodies, routing and headers.
fn commit_bytes(commit: &Commit) -> usize {
    let writes = commit
        .writes
        .iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len));
    let messages = commit.outbox.iter().map(|m| {
        m.payload.len()
            + m.exchange.len()
            + m.routing_key.len()
            + m.headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + [&m.content_type, &m.message_id, &m.correlation_id]
                .iter()
                .map(|s| s.as_ref().map_or(0, String::len))
                .sum::<usize>()
    });
    writes.chain(messages).fold(0, usize::saturating_add)
}

/// Runs deliveries through handlers and commits their effects.
#[derive(Clone)]
pub struct Dispatcher {
    runtime: std::sync::Arc<Runtime>,
    state: StateStore,
    /// The host id stamped on outputs (`x-event-host-host`), if any.
    host_id: Option<std::sync::Arc<str>>,
    /// Continue and pass on W3C trace context (see [`crate::trace`]).
    trace_context: bool,
    /// Share of new traces sampled (see [`crate::trace::sampled`]).
    sample_ratio: f64,
    /// Where event spans are exported, when OTLP export is on.
    exporter: Option<std::sync::Arc<crate::otlp::Exporter>>,
}

impl Dispatcher {
    /// A dispatcher over this runtime and state store.
    pub fn new(runtime: std::sync::Arc<Runtime>, state: StateStore) -> Self {
        Self {
            runtime,
            state,
            host_id: None,
            trace_context: true,
            sample_ratio: 1.0,
            exporter: None,
        }
    }

    /// Whether each event gets a span of its own (continuing the
    /// delivery's `traceparent`), passed on to what it causes. On by
    /// default; `trace_context = false` turns it off.
    pub fn with_trace_context(mut self, on: bool) -> Self {
        self.trace_context = on;
        self
    }

    /// Whether events get spans (see [`Dispatcher::with_trace_context`]).
    pub fn trace_context(&self) -> bool {
        self.trace_context
    }

    /// Sample this share of new traces (0 to 1; default 1): the rest are
    /// stamped unsampled, and not exported here or after.
    pub fn with_sample_ratio(mut self, ratio: f64) -> Self {
        self.sample_ratio = ratio;
        self
    }

    /// The share of new traces sampled.
    pub fn sample_ratio(&self) -> f64 {
        self.sample_ratio
    }

    /// Export every event's span through `exporter` (when trace context
    /// is on: with it off, events have no spans to export).
    pub fn with_exporter(mut self, exporter: std::sync::Arc<crate::otlp::Exporter>) -> Self {
        self.exporter = Some(exporter);
        self
    }

    /// The span exporter, when OTLP export is on.
    pub fn exporter(&self) -> Option<&crate::otlp::Exporter> {
        self.exporter.as_deref()
    }

    /// Stamp `host_id` on every message handlers publish
    /// (`x-event-host-host`), so a fleet's outputs say which host made
    /// them. `replay` and tests run without one.
    pub fn with_host_id(mut self, host_id: &str) -> Self {
        self.host_id = Some(host_id.into());
        self
    }

    /// The host id stamped on outputs, if any.
    pub fn host_id(&self) -> Option<&str> {
        self.host_id.as_deref()
    }

    /// The state store.
    pub fn state(&self) -> &StateStore {
        &self.state
    }

    /// The Wasm runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Run `delivery` through `handler` and make its effects durable.
    ///
    /// Errors only for host faults (the state store failing); everything a
    /// guest does is an [`Outcome`].
    pub fn dispatch(&self, handler: &HandlerVersion, delivery: &Delivery) -> Result<Handled> {
        let mut reruns = 0;
        loop {
            let execution = self.execute(handler, delivery);
            let elapsed = execution.as_ref().map(|e| e.elapsed).unwrap_or_default();
            let committed = execution.and_then(|e| self.commit(&handler.name, vec![e]));
            // Whatever happened, this event's batch is over (on shared
            // state: its transaction ends, its locks go).
            self.state.end_batch(&handler.name);
            match committed?.pop() {
                Some(Committed::Done(handled)) => return Ok(handled),
                Some(Committed::Conflict(key)) if reruns < MAX_CONFLICT_RERUNS => {
                    reruns += 1;
                    tracing::debug!(handler = %handler.name, key, "state conflict, running the event again");
                }
                Some(Committed::Conflict(key)) => {
                    return Ok(Handled::without_effects(
                        decide(Happened::Conflict(&key), delivery.attempt, 1),
                        elapsed,
                    ));
                }
                None => anyhow::bail!("state store returned no outcome for a commit"),
            }
        }
    }

    /// Read ahead what `deliveries` (a batch about to run through
    /// `handler`) will ask of shared state: their dedupe records and the
    /// keys the handler's `read_ahead` names, in one round trip instead of
    /// one per event and read.
    pub fn prefetch(&self, handler: &HandlerVersion, deliveries: &[&Delivery]) {
        if !self.state.is_shared() {
            return; // embedded: a point lookup is cheaper than the batching
        }
        let settings = &handler.settings;
        let ids: Vec<String> = deliveries
            .iter()
            .filter_map(|d| idempotency::key_for(&settings.idempotency_key, d))
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        // Bodies over the payload cap are dead-lettered unread: not parsed
        // here either.
        let bodies = deliveries
            .iter()
            .map(|d| d.payload.as_slice())
            .filter(|body| body.len() <= settings.broker.max_payload_bytes);
        let keys = read_ahead::keys(
            &settings.read_ahead,
            bodies,
            settings.budget.limits.max_key_bytes,
        );
        self.state.prefetch(&handler.name, &ids, &keys);
    }

    /// Run `delivery` through `handler` in a fresh instance without
    /// committing: the outcome and, for a successful call, the commit that
    /// makes it durable.
    pub fn execute(&self, handler: &HandlerVersion, delivery: &Delivery) -> Result<Execution> {
        self.execute_in(handler, delivery, &mut Warm::default())
    }

    /// [`Dispatcher::execute`], in `warm`'s instance when the handler's
    /// `events_per_instance` allows one instance to serve several events
    /// (the broker path keeps one `Warm` per batch).
    pub fn execute_in(
        &self,
        handler: &HandlerVersion,
        delivery: &Delivery,
        warm: &mut Warm,
    ) -> Result<Execution> {
        let ns = &*handler.name;
        // Every line logged about the event, the guest's included, names
        // its trace and span (see `trace::about_event`).
        let _running = crate::trace::running(delivery.span);
        let key = idempotency::key_for(&handler.settings.idempotency_key, delivery);
        if let Some(key) = &key {
            let processed = match self.state.is_processed(ns, key) {
                Err(e) if e.downcast_ref::<Contended>().is_some() => {
                    return Ok(Execution::contended(
                        format!("{e:#}"),
                        delivery,
                        Duration::ZERO,
                    ));
                }
                processed => processed?,
            };
            if processed {
                return Ok(Execution::settled(
                    decide(Happened::Duplicate, delivery.attempt, 1),
                    Duration::ZERO,
                ));
            }
        }
        let event = delivery.to_event();
        let slot = warm.slot_for(handler);
        let budget = &handler.settings.budget;
        let mut call = self
            .runtime
            .call_in(slot, &handler.pre, budget, &event, || {
                GuestState::new(
                    handler.name.clone(),
                    Some(self.state.clone()),
                    handler.settings.config.clone(),
                    budget.limits.clone(),
                )
                .capturing_logs(self.exporter.is_some())
            });
        log_output(handler, "stdout", &call.effects.stdout);
        log_output(handler, "stderr", &call.effects.stderr);
        let logs = std::mem::take(&mut call.effects.logs);
        let mut execution = self.conclude(handler, delivery, key, call)?;
        execution.logs = logs;
        Ok(execution)
    }

    /// What a finished call comes to: a conflict to run again, a failed
    /// attempt, or the commit that makes a successful one durable.
    fn conclude(
        &self,
        handler: &HandlerVersion,
        delivery: &Delivery,
        key: Option<String>,
        call: crate::runtime::CallOutcome,
    ) -> Result<Execution> {
        let ns = &*handler.name;
        if let Some(why) = call.effects.contended {
            // Another host got there first; run it again, as a conflict.
            return Ok(Execution {
                instantiated: call.instantiated,
                ..Execution::contended(why, delivery, call.elapsed)
            });
        }
        let happened = match &call.effects.refused {
            Some(limit) => Happened::OverLimit(&call.result, limit),
            None => Happened::Called(&call.result),
        };
        let decision = decide(
            happened,
            delivery.attempt.max(1),
            handler.settings.max_attempts,
        );
        if decision.outcome != Outcome::Ack {
            crate::trace::about_event(tracing::Level::DEBUG, || {
                tracing::debug!(handler = %handler.name, outcome = ?decision.outcome, reason = %DisplayReason(&decision.reason), "event failed");
            });
            return Ok(Execution {
                instantiated: call.instantiated,
                ..Execution::settled(decision, call.elapsed)
            });
        }
        let publishes = stamp_publishes(
            handler,
            self.host_id(),
            delivery,
            key.as_deref(),
            call.effects.publishes,
        );
        if publishes.is_empty() && key.is_none() && !call.effects.txn.has_writes() {
            // Nothing to make durable (a read-only call's reads need no
            // validation: it changed nothing based on them).
            return Ok(Execution {
                instantiated: call.instantiated,
                keyless: true,
                ..Execution::settled(decision, call.elapsed)
            });
        }
        let keyless = key.is_none();
        let commit = call.effects.txn.into_commit(ns, key, publishes);
        Ok(Execution {
            outcome: decision.outcome,
            reason: decision.reason,
            commit: Some(commit),
            elapsed: call.elapsed,
            instantiated: call.instantiated,
            keyless,
            contended: None,
            logs: Vec::new(),
        })
    }

    /// Commit the executions of one handler's events, in order: in one
    /// transaction, or in several when their writes and publishes are over
    /// [`MAX_BATCH_COMMIT_BYTES`] (chunks commit in order, so a later
    /// event's reads of an earlier one's writes validate against what is
    /// then committed). A conflicted event is reported for re-running;
    /// everything else is settled. An event over the budget on its own is
    /// dead-lettered; a chunk the store fails after an earlier one
    /// committed settles as a host fault (the earlier ones stand).
    pub fn commit(&self, ns: &str, executions: Vec<Execution>) -> Result<Vec<Committed>> {
        self.commit_prepared(ns, Prepared::new(executions))
    }

    /// [`Dispatcher::commit`] and the end of the batch, overlapped with the
    /// next batch where the store is a round trip away (see
    /// [`StateStore::commit_in_background`]): the next batch of `ns` may
    /// run once this returns, and must not commit before
    /// [`PendingBatch::finish`]. A batch over the commit budget commits
    /// here, in chunks, as does one with nothing to commit.
    pub fn commit_in_background(&self, ns: &str, executions: Vec<Execution>) -> PendingBatch {
        let mut prepared = Prepared::new(executions);
        prepared.chunks.retain(|c| !c.is_empty());
        if prepared.chunks.len() != 1 {
            let committed = self.commit_prepared(ns, prepared);
            self.state.end_batch(ns);
            return PendingBatch(Pending::Done(committed));
        }
        let Prepared { out, mut chunks } = prepared;
        let (indices, commits) = split(chunks.pop().unwrap_or_default());
        PendingBatch(Pending::Committing {
            ns: ns.to_owned(),
            out,
            indices,
            commit: self.state.commit_in_background(ns, commits),
        })
    }

    fn commit_prepared(&self, ns: &str, prepared: Prepared) -> Result<Vec<Committed>> {
        let Prepared { mut out, chunks } = prepared;
        let mut committed_any = false;
        let mut failed: Option<String> = None;
        for chunk in chunks.into_iter().filter(|c| !c.is_empty()) {
            let (indices, commits) = split(chunk);
            // Once a chunk failed, the later ones are not tried: they are
            // given back as the same host fault.
            let committed = match &failed {
                Some(fault) => Err(fault.clone()),
                None => match self
                    .state
                    .commit(&commits)
                    .with_context(|| format!("committing state of handler {ns}"))
                {
                    Ok(outcomes) => Ok(outcomes),
                    // Nothing committed yet: the caller sees the store
                    // failing, as for an unchunked batch.
                    Err(e) if !committed_any => return Err(e),
                    Err(e) => {
                        tracing::error!("host fault while committing: {e:#}");
                        let fault = format!("{e:#}");
                        failed = Some(fault.clone());
                        Err(fault)
                    }
                },
            };
            let outcomes = match committed {
                Ok(outcomes) => outcomes,
                Err(fault) => {
                    for (index, elapsed) in indices {
                        out[index] = Some(Committed::Done(Handled::without_effects(
                            decide(Happened::HostFault(&fault), 1, 1),
                            elapsed,
                        )));
                    }
                    continue;
                }
            };
            committed_any = true;
            settle_chunk(&mut out, indices, commits, outcomes)?;
        }
        collect_committed(out)
    }
}

/// A batch's executions sorted for the store: those settled without a
/// commit, and the commits in chunks within [`MAX_BATCH_COMMIT_BYTES`].
struct Prepared {
    /// One per execution; `None` until its commit's outcome is known.
    out: Vec<Option<Committed>>,
    /// (execution index, commit, time in the guest), in order.
    chunks: Vec<Vec<(usize, Commit, Duration)>>,
}

impl Prepared {
    fn new(executions: Vec<Execution>) -> Self {
        // Commits move out of their executions: a batch's writes and
        // publishes are not copied on the way to the store.
        let mut chunks: Vec<Vec<(usize, Commit, Duration)>> = vec![Vec::new()];
        let mut chunk_bytes = 0usize;
        let mut out: Vec<Option<Committed>> = Vec::with_capacity(executions.len());
        for e in executions {
            let index = out.len();
            out.push(None);
            if let Some(why) = e.contended {
                out[index] = Some(Committed::Conflict(why));
                continue;
            }
            let Some(commit) = e.commit else {
                let decision = Decision {
                    outcome: e.outcome,
                    reason: e.reason,
                };
                out[index] = Some(Committed::Done(Handled::without_effects(
                    decision, e.elapsed,
                )));
                continue;
            };
            let bytes = commit_bytes(&commit);
            if bytes > MAX_BATCH_COMMIT_BYTES {
                let cap = MAX_BATCH_COMMIT_BYTES;
                out[index] = Some(Committed::Done(Handled::without_effects(
                    decide(Happened::TooLarge(Oversize::Commit { bytes, cap }), 1, 1),
                    e.elapsed,
                )));
                continue;
            }
            let current = chunks.last().map_or(0, Vec::len);
            if current > 0 && chunk_bytes.saturating_add(bytes) > MAX_BATCH_COMMIT_BYTES {
                chunks.push(Vec::new());
                chunk_bytes = 0;
            }
            chunk_bytes = chunk_bytes.saturating_add(bytes);
            if let Some(chunk) = chunks.last_mut() {
                chunk.push((index, commit, e.elapsed));
            }
        }
        Self { out, chunks }
    }
}

/// A chunk's commits apart from which executions they are (and their time
/// in the guest).
fn split(chunk: Vec<(usize, Commit, Duration)>) -> (Vec<(usize, Duration)>, Vec<Commit>) {
    chunk
        .into_iter()
        .map(|(index, commit, elapsed)| ((index, elapsed), commit))
        .unzip()
}

/// Fill in what the store said of one chunk's commits.
fn settle_chunk(
    out: &mut [Option<Committed>],
    indices: Vec<(usize, Duration)>,
    commits: Vec<Commit>,
    outcomes: Vec<CommitOutcome>,
) -> Result<()> {
    if outcomes.len() != commits.len() || indices.len() != commits.len() {
        bail!(
            "state store returned {} outcomes for {} commits",
            outcomes.len(),
            commits.len()
        );
    }
    for (((index, elapsed), commit), outcome) in indices.into_iter().zip(commits).zip(outcomes) {
        out[index] = Some(match outcome {
            CommitOutcome::Committed { outbox_ids } => Committed::Done(Handled {
                outcome: Outcome::Ack,
                reason: None,
                published: commit.outbox,
                outbox_ids,
                duplicate: false,
                elapsed,
            }),
            CommitOutcome::Duplicate => Committed::Done(Handled::without_effects(
                decide(Happened::Duplicate, 1, 1),
                elapsed,
            )),
            CommitOutcome::Conflict { key } => Committed::Conflict(key),
        });
    }
    Ok(())
}

fn collect_committed(out: Vec<Option<Committed>>) -> Result<Vec<Committed>> {
    out.into_iter()
        .map(|c| c.context("commit list out of step"))
        .collect()
}

/// A batch's commit, maybe still under way
/// ([`Dispatcher::commit_in_background`]).
pub struct PendingBatch(Pending);

enum Pending {
    /// Committed (or failed) in place.
    Done(Result<Vec<Committed>>),
    /// Committing on another thread.
    Committing {
        ns: String,
        out: Vec<Option<Committed>>,
        indices: Vec<(usize, Duration)>,
        commit: PendingCommit,
    },
}

impl PendingBatch {
    /// Whether the commit is over: the batch can be settled at once.
    pub fn is_done(&self) -> bool {
        match &self.0 {
            Pending::Done(_) => true,
            Pending::Committing { commit, .. } => commit.is_done(),
        }
    }

    /// How each execution fared, as [`Dispatcher::commit`] says.
    pub fn finish(self) -> Result<Vec<Committed>> {
        match self.0 {
            Pending::Done(committed) => committed,
            Pending::Committing {
                ns,
                mut out,
                indices,
                commit,
            } => {
                let (outcomes, commits) = commit.finish();
                let outcomes =
                    outcomes.with_context(|| format!("committing state of handler {ns}"))?;
                settle_chunk(&mut out, indices, commits, outcomes)?;
                collect_committed(out)
            }
        }
    }
}

/// At most one live instance, of one handler version, kept between the
/// events of a batch (see [`Runtime::call_in`]). Dropping it frees the
/// instance.
#[derive(Default)]
pub struct Warm {
    /// sha256 of the version `instance` belongs to.
    version: Option<String>,
    instance: Option<WarmInstance>,
}

impl Warm {
    /// The slot for `handler`'s instances. An instance of another version
    /// (a batch never spans two, but nothing here relies on that) is
    /// dropped rather than given this version's events.
    fn slot_for(&mut self, handler: &HandlerVersion) -> &mut Option<WarmInstance> {
        if self.version.as_deref() != Some(handler.sha256.as_str()) {
            self.instance = None;
            self.version = Some(handler.sha256.clone());
        }
        &mut self.instance
    }
}

/// A handler call whose effects are not yet committed.
#[derive(Debug)]
pub struct Execution {
    /// Outcome if the commit succeeds (or the final one, with no commit).
    pub outcome: Outcome,
    /// Why, when not a plain ack.
    pub reason: Option<Reason>,
    /// What to make durable; `None` when there is nothing.
    pub commit: Option<Commit>,
    /// Time spent in the guest.
    pub elapsed: Duration,
    /// Whether running it made a new instance.
    pub instantiated: bool,
    /// The event had no idempotency key (nor message id): it ran at least
    /// once, a redelivery would run it again.
    pub keyless: bool,
    /// Shared state lost a race while it ran: it runs again (see
    /// [`crate::state::Contended`]).
    pub contended: Option<String>,
    /// The guest's `wasi:logging` lines, when spans are exported.
    pub logs: Vec<crate::guest::GuestLog>,
}

impl Execution {
    fn settled(decision: Decision, elapsed: Duration) -> Self {
        Self {
            outcome: decision.outcome,
            reason: decision.reason,
            commit: None,
            elapsed,
            instantiated: false,
            keyless: false,
            contended: None,
            logs: Vec::new(),
        }
    }

    /// Shared state lost a race while `delivery` ran: it runs again (its
    /// fallback outcome, should the re-runs run out, is a conflict's).
    fn contended(why: String, delivery: &Delivery, elapsed: Duration) -> Self {
        Self {
            contended: Some(why.clone()),
            ..Self::settled(
                decide(Happened::Conflict(&why), delivery.attempt, 1),
                elapsed,
            )
        }
    }
}

/// How one execution fared at commit.
#[derive(Debug)]
pub enum Committed {
    /// Settled: act on the outcome.
    Done(Handled),
    /// What it read changed before it committed: run it again.
    Conflict(String),
}

/// Give every publish a message id derived from the event's idempotency
/// key (so a re-run after a crash publishes the same ids and downstream
/// dedupe works; with no key, ids unique to this call, so identical bodies
/// never share one), carry the input's correlation id when the guest set
/// none, and say which handler version produced it
/// (`x-event-host-handler`, `x-event-host-version`) and, in a fleet, which
/// host (`x-event-host-host`): after a hot reload, or with hosts at
/// different versions, consumers and operators can tell the output apart.
fn stamp_publishes(
    handler: &HandlerVersion,
    host_id: Option<&str>,
    delivery: &Delivery,
    key: Option<&str>,
    mut publishes: Vec<Outgoing>,
) -> Vec<Outgoing> {
    if publishes.is_empty() {
        return publishes;
    }
    let base = match key {
        Some(key) => format!("{}:{key}", handler.name),
        None => format!("{}:{}", handler.name, idempotency::unique_id()),
    };
    for (i, p) in publishes.iter_mut().enumerate() {
        if p.message_id.is_none() {
            // A long key makes a long derived id: shortened
            // deterministically, so a re-run derives the same id.
            p.message_id = Some(broker::short(&format!("{base}:{i}")).to_string());
        }
        if p.correlation_id.is_none() {
            p.correlation_id = delivery.correlation_id.clone();
        }
        p.headers
            .retain(|(k, _)| k != HANDLER_HEADER && k != VERSION_HEADER);
        p.headers
            .push((HANDLER_HEADER.to_owned(), handler.name.to_string()));
        p.headers
            .push((VERSION_HEADER.to_owned(), handler.sha256.clone()));
        if let Some(host) = host_id {
            p.headers.push((HOST_HEADER.to_owned(), host.to_owned()));
        }
        if let Some(span) = &delivery.span {
            // The event's trace goes on, with this attempt as the parent.
            p.headers.retain(|(k, _)| {
                !k.eq_ignore_ascii_case(trace::TRACEPARENT)
                    && !k.eq_ignore_ascii_case(trace::TRACESTATE)
            });
            p.headers
                .push((trace::TRACEPARENT.to_owned(), span.traceparent()));
            if let Some(state) = trace::tracestate(&delivery.headers) {
                p.headers
                    .push((trace::TRACESTATE.to_owned(), state.to_owned()));
            }
        }
    }
    publishes
}

/// An optional reason for a log field.
pub(crate) struct DisplayReason<'a>(pub(crate) &'a Option<Reason>);

impl std::fmt::Display for DisplayReason<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(reason) => write!(f, "{}", broker::cap_reason(&reason.to_string())),
            None => Ok(()),
        }
    }
}

fn log_output(handler: &HandlerVersion, stream: &str, bytes: &[u8]) {
    if !bytes.is_empty() {
        crate::trace::about_event(tracing::Level::INFO, || {
            tracing::info!(
                target: "guest",
                handler = %handler.name,
                stream,
                "{}",
                String::from_utf8_lossy(bytes).trim_end()
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Failure;

    #[test]
    fn decide_counts_attempts_and_never_acks_failures() {
        let outcome = |r: &CallResult, a, m| decide(r, a, m).outcome;
        assert_eq!(outcome(&CallResult::Ok, 1, 3), Outcome::Ack);
        assert_eq!(
            outcome(&CallResult::Retry("x".into()), 1, 3),
            Outcome::Retry
        );
        assert_eq!(
            outcome(&CallResult::Retry("x".into()), 3, 3),
            Outcome::Reject
        );
        let trap = CallResult::Trapped(Failure::Timeout(Duration::from_millis(5)));
        assert_eq!(outcome(&trap, 2, 3), Outcome::Retry);
        let d = decide(&trap, 3, 3);
        assert_eq!(d.outcome, Outcome::Reject);
        assert!(matches!(
            d.reason.as_ref().and_then(Reason::cause),
            Some(Cause::AttemptsExhausted { .. })
        ));
        assert!(d
            .reason
            .unwrap()
            .to_string()
            .contains("attempts exhausted (3/3)"));
        assert_eq!(
            outcome(&CallResult::Reject("bad".into()), 1, 3),
            Outcome::Reject
        );
        assert_eq!(
            outcome(&CallResult::HostError("io".into()), 9, 3),
            Outcome::Requeue
        );
    }

    #[test]
    fn a_call_failing_after_a_refused_state_call_is_dead_lettered_at_once() {
        let limit = "key of 600 bytes is over the limit of 512 bytes (max_key_bytes)";
        let retry = CallResult::Retry("state error".into());
        let d = decide(Happened::OverLimit(&retry, limit), 1, 5);
        assert_eq!(d.outcome, Outcome::Reject);
        let reason = d.reason.expect("a reason");
        assert!(matches!(reason.cause(), Some(Cause::OverLimit { .. })));
        assert_eq!(
            reason.to_string(),
            format!("{OVER_LIMIT} ({limit}), which the event would do again: state error")
        );
        let trap = CallResult::Trapped(Failure::Timeout(Duration::from_millis(5)));
        assert_eq!(
            decide(Happened::OverLimit(&trap, limit), 1, 5).outcome,
            Outcome::Reject
        );
        // A guest that handled the refusal, or a host fault, as ever.
        assert_eq!(
            decide(Happened::OverLimit(&CallResult::Ok, limit), 1, 5).outcome,
            Outcome::Ack
        );
        let host = CallResult::HostError("io".into());
        assert_eq!(
            decide(Happened::OverLimit(&host, limit), 1, 5).outcome,
            Outcome::Requeue
        );
    }

    #[test]
    fn everything_that_gives_an_event_back_counts_for_the_breaker() {
        let handled = |h: Happened<'_>| Handled::without_effects(decide(h, 1, 3), Duration::ZERO);
        let fault = CallResult::HostError("disk".into());
        for h in [
            Happened::Called(&fault),
            Happened::HostFault("disk"),
            Happened::Conflict("k"),
        ] {
            let h = handled(h);
            assert_eq!(h.outcome, Outcome::Requeue);
            assert!(h.is_failure(), "{h:?}");
        }
        // A paused handler's events go back unrun without counting.
        assert!(!handled(Happened::Inactive).is_failure());
        let reject = CallResult::Reject("no".into());
        assert!(!handled(Happened::Called(&reject)).is_failure());
        let over = |o| handled(Happened::TooLarge(o)).is_failure();
        assert!(!over(Oversize::Payload { bytes: 2, cap: 1 }));
        assert!(!over(Oversize::Headers { bytes: 2, cap: 1 }));
        assert!(over(Oversize::Commit { bytes: 2, cap: 1 }));
        let dup = handled(Happened::Duplicate);
        assert!(dup.duplicate && dup.outcome == Outcome::Ack && !dup.is_failure());
    }

    #[test]
    fn a_batch_over_the_budget_commits_in_chunks_and_an_oversized_event_alone_is_rejected() {
        let store = StateStore::in_memory().unwrap();
        let runtime = std::sync::Arc::new(Runtime::new(Default::default()).unwrap());
        let dispatcher = Dispatcher::new(runtime, store.clone());
        let big = MAX_BATCH_COMMIT_BYTES / 2 + 1;
        let execution = |key: &str, bytes: usize| {
            let mut txn = crate::state::Txn::default();
            txn.set(key, vec![7u8; bytes]);
            Execution {
                commit: Some(txn.into_commit("ns", None, Vec::new())),
                ..Execution::settled(decide(&CallResult::Ok, 1, 1), Duration::ZERO)
            }
        };
        let results = dispatcher
            .commit(
                "ns",
                vec![
                    execution("a", big),
                    execution("b", big),
                    execution("huge", MAX_BATCH_COMMIT_BYTES + 1),
                    execution("c", 10),
                ],
            )
            .unwrap();
        let outcomes: Vec<(Outcome, Option<Cause>)> = results
            .into_iter()
            .map(|c| match c {
                Committed::Done(h) => (h.outcome, h.cause().cloned()),
                Committed::Conflict(k) => panic!("conflict on {k}"),
            })
            .collect();
        assert_eq!(outcomes[0], (Outcome::Ack, None));
        assert_eq!(outcomes[1], (Outcome::Ack, None));
        assert!(matches!(
            outcomes[2],
            (
                Outcome::Reject,
                Some(Cause::TooLarge(Oversize::Commit { .. }))
            )
        ));
        assert_eq!(outcomes[3], (Outcome::Ack, None));
        for key in ["a", "b", "c"] {
            assert!(store.get("ns", key).unwrap().is_some(), "{key} committed");
        }
        assert!(store.get("ns", "huge").unwrap().is_none());
    }
}
