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
use crate::broker::{HANDLER_HEADER, VERSION_HEADER};
use crate::guest::GuestState;
use crate::handler::HandlerVersion;
use crate::idempotency;
use crate::runtime::{CallResult, Runtime, WarmInstance};
use crate::state::{Commit, CommitOutcome, Outgoing, StateStore};

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
    /// A host-side fault: put the event back without counting an attempt.
    Requeue,
}

/// The ack decision: how a call result maps to an outcome, given the
/// attempt this was and the handler's max attempts. Traps, timeouts and
/// memory-cap hits are failed attempts like `retry`; once attempts are
/// used up the event is dead-lettered rather than retried forever.
pub fn decide(result: &CallResult, attempt: u32, max_attempts: u32) -> (Outcome, Option<String>) {
    let failed_attempt = |reason: String| {
        if attempt >= max_attempts {
            (
                Outcome::Reject,
                Some(format!(
                    "{ATTEMPTS_EXHAUSTED} ({attempt}/{max_attempts}): {reason}"
                )),
            )
        } else {
            (Outcome::Retry, Some(reason))
        }
    };
    match result {
        CallResult::Ok => (Outcome::Ack, None),
        CallResult::Reject(reason) => (Outcome::Reject, Some(reason.clone())),
        CallResult::Retry(reason) => failed_attempt(reason.clone()),
        CallResult::Trapped(failure) => failed_attempt(failure.to_string()),
        CallResult::HostError(reason) => (Outcome::Requeue, Some(format!("host error: {reason}"))),
    }
}

/// The result of dispatching one delivery to one handler.
#[derive(Debug, Clone, Serialize)]
pub struct Handled {
    /// What to do with the input.
    pub outcome: Outcome,
    /// Why, for anything but a plain ack.
    pub reason: Option<String>,
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
    /// A failed attempt (trap, timeout, `retry`, attempts exhausted): what
    /// the crash-loop breaker and rollback count. A deliberate `reject` is
    /// the handler working, not failing.
    pub fn is_failure(&self) -> bool {
        match self.outcome {
            Outcome::Retry => true,
            Outcome::Reject => self
                .reason
                .as_deref()
                .is_some_and(|r| r.starts_with(ATTEMPTS_EXHAUSTED)),
            Outcome::Ack | Outcome::Requeue => false,
        }
    }

    /// An outcome with no effects released (failures, skipped duplicates,
    /// read-only calls).
    pub(crate) fn without_effects(
        outcome: Outcome,
        reason: Option<String>,
        elapsed: Duration,
    ) -> Self {
        Self {
            duplicate: reason.as_deref().is_some_and(|r| r.starts_with(DUPLICATE)),
            outcome,
            reason,
            published: Vec::new(),
            outbox_ids: Vec::new(),
            elapsed,
        }
    }
}

/// How the reason of a dead-lettered, repeatedly failing event starts.
const ATTEMPTS_EXHAUSTED: &str = "attempts exhausted";

/// Reason given for an event whose idempotency key already committed.
const DUPLICATE: &str = "duplicate: idempotency key already committed";

/// How many times an event is re-run when another event of the same
/// handler changed what it read before it could commit.
const MAX_CONFLICT_RERUNS: u32 = 8;

/// Runs deliveries through handlers and commits their effects.
#[derive(Clone)]
pub struct Dispatcher {
    runtime: std::sync::Arc<Runtime>,
    state: StateStore,
}

impl Dispatcher {
    /// A dispatcher over this runtime and state store.
    pub fn new(runtime: std::sync::Arc<Runtime>, state: StateStore) -> Self {
        Self { runtime, state }
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
            let execution = self.execute(handler, delivery)?;
            let elapsed = execution.elapsed;
            match self.commit(&handler.name, vec![execution])?.pop() {
                Some(Committed::Done(handled)) => return Ok(handled),
                Some(Committed::Conflict(key)) if reruns < MAX_CONFLICT_RERUNS => {
                    reruns += 1;
                    tracing::debug!(handler = %handler.name, key, "state conflict, running the event again");
                }
                Some(Committed::Conflict(key)) => {
                    let reason = format!("state key {key:?} kept changing under the event");
                    return Ok(Handled::without_effects(
                        Outcome::Requeue,
                        Some(reason),
                        elapsed,
                    ));
                }
                None => anyhow::bail!("state store returned no outcome for a commit"),
            }
        }
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
        let key = idempotency::key_for(&handler.settings.idempotency_key, delivery);
        if let Some(key) = &key {
            if self.state.is_processed(ns, key)? {
                return Ok(Execution::settled(
                    Outcome::Ack,
                    Some(DUPLICATE.into()),
                    Duration::ZERO,
                ));
            }
        }
        let event = delivery.to_event();
        let slot = warm.slot_for(handler);
        let budget = &handler.settings.budget;
        let call = self
            .runtime
            .call_in(slot, &handler.pre, budget, &event, || {
                GuestState::new(
                    handler.name.clone(),
                    Some(self.state.clone()),
                    handler.settings.config.clone(),
                    budget.limits.clone(),
                )
            });
        log_output(handler, "stdout", &call.effects.stdout);
        log_output(handler, "stderr", &call.effects.stderr);
        let (outcome, reason) = decide(&call.result, event.attempt, handler.settings.max_attempts);
        if outcome != Outcome::Ack {
            tracing::debug!(handler = %handler.name, ?outcome, reason = reason.as_deref(), "event failed");
            return Ok(Execution {
                instantiated: call.instantiated,
                ..Execution::settled(outcome, reason, call.elapsed)
            });
        }
        let publishes = stamp_publishes(handler, delivery, key.as_deref(), call.effects.publishes);
        if publishes.is_empty() && key.is_none() && !call.effects.txn.has_writes() {
            // Nothing to make durable (a read-only call's reads need no
            // validation: it changed nothing based on them).
            return Ok(Execution {
                instantiated: call.instantiated,
                keyless: true,
                ..Execution::settled(Outcome::Ack, None, call.elapsed)
            });
        }
        let keyless = key.is_none();
        let commit = call.effects.txn.into_commit(ns, key, publishes);
        Ok(Execution {
            outcome,
            reason,
            commit: Some(commit),
            elapsed: call.elapsed,
            instantiated: call.instantiated,
            keyless,
        })
    }

    /// Commit the executions of one handler's events in one transaction,
    /// in order. A conflicted event is reported for re-running; everything
    /// else is settled.
    pub fn commit(&self, ns: &str, executions: Vec<Execution>) -> Result<Vec<Committed>> {
        // Commits move out of their executions: a batch's writes and
        // publishes are not copied on the way to the store.
        let mut commits = Vec::new();
        let mut settled: Vec<Option<Committed>> = Vec::with_capacity(executions.len());
        let mut elapsed = Vec::new();
        for e in executions {
            match e.commit {
                Some(commit) => {
                    commits.push(commit);
                    elapsed.push(e.elapsed);
                    settled.push(None);
                }
                None => settled.push(Some(Committed::Done(Handled::without_effects(
                    e.outcome, e.reason, e.elapsed,
                )))),
            }
        }
        if commits.is_empty() {
            return Ok(settled.into_iter().flatten().collect());
        }
        let outcomes = self
            .state
            .commit(&commits)
            .with_context(|| format!("committing state of handler {ns}"))?;
        if outcomes.len() != commits.len() {
            bail!(
                "state store returned {} outcomes for {} commits",
                outcomes.len(),
                commits.len()
            );
        }
        let mut results = commits.into_iter().zip(outcomes).zip(elapsed);
        let mut out = Vec::with_capacity(settled.len());
        for slot in settled {
            if let Some(done) = slot {
                out.push(done);
                continue;
            }
            let ((commit, outcome), elapsed) = results.next().context("commit list out of step")?;
            out.push(match outcome {
                CommitOutcome::Committed { outbox_ids } => Committed::Done(Handled {
                    outcome: Outcome::Ack,
                    reason: None,
                    published: commit.outbox,
                    outbox_ids,
                    duplicate: false,
                    elapsed,
                }),
                CommitOutcome::Duplicate => Committed::Done(Handled::without_effects(
                    Outcome::Ack,
                    Some(DUPLICATE.into()),
                    elapsed,
                )),
                CommitOutcome::Conflict { key } => Committed::Conflict(key),
            });
        }
        Ok(out)
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
    pub reason: Option<String>,
    /// What to make durable; `None` when there is nothing.
    pub commit: Option<Commit>,
    /// Time spent in the guest.
    pub elapsed: Duration,
    /// Whether running it made a new instance.
    pub instantiated: bool,
    /// The event had no idempotency key (nor message id): it ran at least
    /// once, a redelivery would run it again.
    pub keyless: bool,
}

impl Execution {
    fn settled(outcome: Outcome, reason: Option<String>, elapsed: Duration) -> Self {
        Self {
            outcome,
            reason,
            commit: None,
            elapsed,
            instantiated: false,
            keyless: false,
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
/// (`x-event-host-handler`, `x-event-host-version`): after a hot reload,
/// consumers and operators can tell the versions' output apart.
fn stamp_publishes(
    handler: &HandlerVersion,
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
            p.message_id = Some(idempotency::bounded(format!("{base}:{i}")));
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
    }
    publishes
}

fn log_output(handler: &HandlerVersion, stream: &str, bytes: &[u8]) {
    if !bytes.is_empty() {
        tracing::info!(
            target: "guest",
            handler = %handler.name,
            stream,
            "{}",
            String::from_utf8_lossy(bytes).trim_end()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Failure;

    #[test]
    fn decide_counts_attempts_and_never_acks_failures() {
        assert_eq!(decide(&CallResult::Ok, 1, 3).0, Outcome::Ack);
        assert_eq!(
            decide(&CallResult::Retry("x".into()), 1, 3).0,
            Outcome::Retry
        );
        assert_eq!(
            decide(&CallResult::Retry("x".into()), 3, 3).0,
            Outcome::Reject
        );
        let trap = CallResult::Trapped(Failure::Timeout(Duration::from_millis(5)));
        assert_eq!(decide(&trap, 2, 3).0, Outcome::Retry);
        let (o, reason) = decide(&trap, 3, 3);
        assert_eq!(o, Outcome::Reject);
        assert!(reason.unwrap().contains("attempts exhausted (3/3)"));
        assert_eq!(
            decide(&CallResult::Reject("bad".into()), 1, 3).0,
            Outcome::Reject
        );
        assert_eq!(
            decide(&CallResult::HostError("io".into()), 9, 3).0,
            Outcome::Requeue
        );
    }
}
