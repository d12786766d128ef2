//! What a guest sees of the host: the per-instance store data and the host
//! side of every WIT import (state, publish, logging, config).
//!
//! One [`GuestState`] lives exactly as long as one handler instance, which by
//! default is one event (a handler may allow more: `events_per_instance`).
//! Everything it collects (state transaction, publishes, captured output)
//! is handed back to the dispatcher when each call ends, so no effect of
//! one event is ever attributed to another.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreContextMut, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{subscribe, DynPollable, OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::bindings::wasi::config::store as config_store;
use crate::bindings::wasi::keyvalue::{atomics, store as kv};
use crate::bindings::wasi::logging::logging;
use crate::bindings::{event_host::handler::publisher, event_host::handler::types};
use crate::broker::{HOST_HEADER_PREFIX, MAX_SHORT_STRING_BYTES};
use crate::state::{Contended, Outgoing, StateStore, Txn};

/// The handler's one bucket (its own namespace). A unit: which namespace it
/// is follows from the instance it lives in.
pub struct Bucket;

/// A compare-and-swap handle: the key and the value seen when it was made.
pub struct Cas {
    key: String,
    seen: Option<Vec<u8>>,
}

/// Bytes of header names and values one publish may carry. A message's
/// properties travel in one AMQP frame, and the broker closes the whole
/// connection (every handler's) on a frame over `frame_max` (128 KiB by
/// default): this keeps a guest's headers well under it.
pub const MAX_PUBLISH_HEADER_BYTES: usize = 16 << 10;

/// Live resources (state buckets, CAS handles, WASI streams and pollables)
/// one instance may hold at once. Each costs host memory until dropped,
/// and a guest that never drops them would otherwise grow the table for
/// as long as its deadline lets it.
pub const MAX_LIVE_RESOURCES: usize = 1024;

/// Bytes of values one instance may hold in live CAS handles (each keeps a
/// copy of the value it saw). Past it `cas::new` returns an error.
pub const MAX_CAS_HELD_BYTES: usize = 16 << 20;

/// Per-call limits a guest cannot raise.
#[derive(Debug, Clone)]
pub struct CallLimits {
    /// Bytes one instance's linear memories may grow to, together.
    pub memory_bytes: usize,
    /// Publishes one call may buffer.
    pub max_publishes: u32,
    /// Largest payload one publish may carry.
    pub max_publish_bytes: u32,
    /// Bytes of stdout and of stderr kept per call; the rest is dropped.
    pub max_output_bytes: usize,
    /// Log lines per call forwarded to the host log; the rest are counted.
    pub max_log_lines: u32,
    /// Exchanges `publish` accepts: the manifest's `publishes` and the
    /// config's `publishes_to`. Anything else is `not-allowed`.
    pub allowed_exchanges: Arc<BTreeSet<String>>,
    /// Longest state key, in bytes.
    pub max_key_bytes: usize,
    /// Largest state value one write may store, in bytes.
    pub max_value_bytes: usize,
    /// State writes (`set`, `delete`, `increment`, `swap`) per call.
    pub max_writes: u32,
    /// Bytes of keys and values one call may write, together.
    pub max_written_bytes: usize,
    /// Bytes of state values one call may read (each key counted once).
    pub max_read_bytes: usize,
}

/// What the guest's call accumulated, handed back after the call.
#[derive(Debug, Default)]
pub struct CallEffects {
    /// The state transaction (reads and buffered writes).
    pub txn: Txn,
    /// Buffered publishes, in call order.
    pub publishes: Vec<Outgoing>,
    /// Captured stdout (bounded).
    pub stdout: Vec<u8>,
    /// Captured stderr (bounded).
    pub stderr: Vec<u8>,
    /// A fault on the host side (state I/O) that made the call trap; the
    /// event failed through no fault of the guest.
    pub host_fault: Option<String>,
    /// True when the memory cap stopped the guest.
    pub memory_exceeded: bool,
    /// Shared state lost a race with another host during the call (see
    /// [`crate::state::Contended`]): the call trapped, and the event runs
    /// again rather than failing.
    pub contended: Option<String>,
    /// A state call the host refused for going over a per-event limit
    /// (`max_key_bytes`, `max_value_bytes`, `max_writes`,
    /// `max_written_bytes`), the first one. The same event would go over
    /// it again, so should the call then fail, the event is dead-lettered
    /// at once rather than retried (see [`crate::dispatch::Happened::OverLimit`]).
    pub refused: Option<String>,
    /// What the guest logged through `wasi:logging`, kept (bounded by
    /// `max_log_lines`) only when spans are exported, as their events.
    pub logs: Vec<GuestLog>,
}

/// One `wasi:logging` line of a call, for the event's span.
#[derive(Debug, Clone)]
pub struct GuestLog {
    /// When the guest logged it.
    pub at: std::time::SystemTime,
    /// `trace`, `debug`, `info`, `warn`, `error` or `critical`.
    pub level: &'static str,
    /// The guest's context string (cut to 256 bytes).
    pub context: String,
    /// The message (cut to 4 KiB).
    pub message: String,
}

/// Store data of one handler instance.
pub struct GuestState {
    /// Built on first use: most calls never touch WASI (no printing, no
    /// clocks, no randomness), and building it costs more than the rest of
    /// the store data together.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    limiter: GuestLimiter,
    stdout: BoundedOutput,
    stderr: BoundedOutput,
    /// Handler name, for logs.
    handler: Arc<str>,
    /// State namespace; `None` while reading the manifest (no state then).
    state: Option<StateStore>,
    /// Handler config (`wasi:config`).
    config: Arc<BTreeMap<String, String>>,
    limits: CallLimits,
    log_lines: u32,
    /// State writes and bytes written by the current call.
    writes: u32,
    written_bytes: usize,
    /// Bytes of values held by live CAS handles.
    cas_bytes: usize,
    /// When the current call (or instantiation, or `manifest`) must end.
    /// Every timer the guest sets is cut to it, so no wait outlasts it.
    deadline: Instant,
    /// Whether a timer was cut to the deadline during this call: the guest
    /// asked to wait past it, so returning after it is a timeout.
    waited_past_deadline: bool,
    /// How far the deadline was moved for waits on other hosts' locks this
    /// call (see [`GuestState::read`]); bounded by [`MAX_LOCK_WAIT_CREDIT`].
    lock_wait_credit: Duration,
    effects: CallEffects,
    /// Keep `wasi:logging` lines in [`CallEffects::logs`] (span export on).
    capture_logs: bool,
}

/// A state read slower than this waited on a row another host's batch
/// holds (a plain read is a round trip, well under it): the wait is the
/// fleet's, not the guest's, and does not count against its deadline.
const LOCK_WAIT: Duration = Duration::from_millis(2);

/// The most a call's deadline moves for such waits: as long as one read
/// may wait for a lock (PostgreSQL `lock_timeout`, 10 s). A guest reading
/// key after key cannot stretch its deadline further than that.
const MAX_LOCK_WAIT_CREDIT: Duration = Duration::from_secs(10);

impl GuestState {
    /// Fresh store data for one instance.
    pub fn new(
        handler: Arc<str>,
        state: Option<StateStore>,
        config: Arc<BTreeMap<String, String>>,
        limits: CallLimits,
    ) -> Self {
        let stdout = BoundedOutput::new(limits.max_output_bytes);
        let stderr = BoundedOutput::new(limits.max_output_bytes);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_LIVE_RESOURCES);
        Self {
            wasi: None,
            table,
            limiter: GuestLimiter {
                memory_cap: limits.memory_bytes,
                memory_used: 0,
                exceeded: false,
            },
            stdout,
            stderr,
            handler,
            state,
            config,
            limits,
            log_lines: 0,
            writes: 0,
            written_bytes: 0,
            cas_bytes: 0,
            // The runtime sets the real one before the guest runs.
            deadline: Instant::now(),
            waited_past_deadline: false,
            lock_wait_credit: Duration::ZERO,
            effects: CallEffects::default(),
            capture_logs: false,
        }
    }

    /// Keep the guest's `wasi:logging` lines for the event's span (they
    /// are logged either way).
    pub fn capturing_logs(mut self, on: bool) -> Self {
        self.capture_logs = on;
        self
    }

    /// Start a new call (or instantiation) that must end by `deadline`.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
        self.waited_past_deadline = false;
        self.lock_wait_credit = Duration::ZERO;
    }

    /// True once the current call's wall-clock deadline has passed.
    pub fn deadline_passed(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// True when the guest waited on a timer cut to the deadline and the
    /// deadline has passed: the call overran it even if it returned before
    /// the epoch interrupt caught it.
    pub fn overran_deadline(&self) -> bool {
        self.waited_past_deadline && self.deadline_passed()
    }

    /// A pollable for a guest timer of `wait`, cut to the call's deadline.
    /// Past the deadline the guest traps at once, as the epoch interrupt
    /// would trap it: a guest sleeping in a loop cannot outlast its call.
    fn bounded_timer(&mut self, wait: Duration) -> wasmtime::Result<Resource<DynPollable>> {
        let now = Instant::now();
        let remaining = self.deadline.saturating_duration_since(now);
        if wait > remaining {
            if remaining.is_zero() {
                return Err(wasmtime::Error::new(Trap::Interrupt));
            }
            self.waited_past_deadline = true;
        }
        let timer = self.table.push(Timer {
            until: tokio::time::Instant::from_std(now + wait.min(remaining)),
            yielded: false,
        })?;
        subscribe(&mut self.table, timer)
    }

    /// The resource limiter wasmtime consults on every memory/table growth.
    pub fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limiter
    }

    /// Consume the state, returning what the call produced.
    pub fn into_effects(mut self) -> CallEffects {
        self.take_effects()
    }

    /// What the call that just ended produced, leaving the state ready for
    /// another call in the same instance (see `events_per_instance`): its
    /// transaction, publishes and captured output start empty again.
    pub fn take_effects(&mut self) -> CallEffects {
        let mut effects = std::mem::take(&mut self.effects);
        effects.stdout = self.stdout.take();
        effects.stderr = self.stderr.take();
        effects.memory_exceeded = self.limiter.exceeded;
        if self.log_lines > self.limits.max_log_lines {
            crate::trace::about_event(tracing::Level::WARN, || {
                tracing::warn!(
                    handler = %self.handler,
                    dropped = self.log_lines - self.limits.max_log_lines,
                    "guest log lines over the per-event limit were dropped"
                );
            });
        }
        self.log_lines = 0;
        self.writes = 0;
        self.written_bytes = 0;
        effects
    }

    /// The host-side fault that trapped the call, if any.
    pub fn host_fault(&self) -> Option<String> {
        self.effects.host_fault.clone()
    }

    /// Read a key through the call's transaction. A store failure traps the
    /// call and is remembered as a host fault.
    fn read(&mut self, key: &str) -> wasmtime::Result<Option<Vec<u8>>> {
        let Some(store) = &self.state else {
            return Err(wasmtime::format_err!("state is not available here"));
        };
        let started = Instant::now();
        let read = self.effects.txn.get(store, &self.handler, key);
        let took = started.elapsed();
        if took > LOCK_WAIT && store.is_shared() {
            // Waiting for another host's batch to release the key: give
            // the time back, up to the credit.
            let credit = took.min(MAX_LOCK_WAIT_CREDIT.saturating_sub(self.lock_wait_credit));
            self.lock_wait_credit += credit;
            self.deadline += credit;
        }
        match read {
            // Every value read stays in the transaction until commit: a
            // guest reading key after key of large values would otherwise
            // grow host memory without bound.
            Ok(_) if self.effects.txn.read_bytes() > self.limits.max_read_bytes => {
                Err(wasmtime::format_err!(
                    "more than {} bytes of state read in one event (max_read_bytes)",
                    self.limits.max_read_bytes
                ))
            }
            Ok(v) => Ok(v),
            Err(e) if e.downcast_ref::<Contended>().is_some() => {
                let msg = format!("state read of {key:?}: {e:#}");
                self.effects.contended = Some(msg.clone());
                Err(wasmtime::format_err!("{msg}"))
            }
            Err(e) => {
                let msg = format!("state read of {key:?} failed: {e:#}");
                self.effects.host_fault = Some(msg.clone());
                Err(wasmtime::format_err!("{msg}"))
            }
        }
    }

    /// Refuse a key over the configured size, before anything keeps it.
    fn check_key(&mut self, key: &str) -> Result<(), kv::Error> {
        if key.len() > self.limits.max_key_bytes {
            return Err(self.refuse(format!(
                "key of {} bytes is over the limit of {} bytes (max_key_bytes)",
                key.len(),
                self.limits.max_key_bytes
            )));
        }
        Ok(())
    }

    /// The error for a state call refused for going over a per-event
    /// limit, the first such refusal kept in the effects (see
    /// [`CallEffects::refused`]).
    fn refuse(&mut self, why: String) -> kv::Error {
        self.effects.refused.get_or_insert_with(|| why.clone());
        kv::Error::Other(why)
    }

    /// Count one write of `key` and `value_len` bytes against the per-call
    /// bounds, refusing it (nothing buffered) when it would exceed one.
    fn admit_write(&mut self, key: &str, value_len: usize) -> Result<(), kv::Error> {
        self.check_key(key)?;
        if value_len > self.limits.max_value_bytes {
            return Err(self.refuse(format!(
                "value of {value_len} bytes is over the limit of {} bytes (max_value_bytes)",
                self.limits.max_value_bytes
            )));
        }
        if self.writes >= self.limits.max_writes {
            return Err(self.refuse(format!(
                "more than {} writes in one event (max_writes)",
                self.limits.max_writes
            )));
        }
        let written = self.written_bytes + key.len() + value_len;
        if written > self.limits.max_written_bytes {
            return Err(self.refuse(format!(
                "more than {} bytes of keys and values written in one event (max_written_bytes)",
                self.limits.max_written_bytes
            )));
        }
        self.writes += 1;
        self.written_bytes = written;
        Ok(())
    }

    fn state_available(&self) -> Result<(), kv::Error> {
        match self.state {
            Some(_) => Ok(()),
            None => Err(kv::Error::Other(
                "state is not available while reading the manifest".into(),
            )),
        }
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let (stdout, stderr) = (&self.stdout, &self.stderr);
        let ctx = self.wasi.get_or_insert_with(|| {
            // No preopened directories, no environment, no arguments, no
            // network: WASI's defaults minus sockets. Stdin is WASI's
            // default, a closed stream: a read returns end-of-file at once
            // instead of waiting.
            WasiCtxBuilder::new()
                .stdout(stdout.clone())
                .stderr(stderr.clone())
                .allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false)
                .build()
        });
        WasiCtxView {
            ctx,
            table: &mut self.table,
        }
    }
}

/// Caps an instance's memory. Denying growth with an error (rather than
/// returning `false`) traps at once with a reason the dispatcher can name,
/// instead of leaving the guest to fail its allocation in some other way.
struct GuestLimiter {
    memory_cap: usize,
    /// Bytes across all of the instance's memories (a component may have
    /// several core instances, each with its own memory).
    memory_used: usize,
    exceeded: bool,
}

/// The error a guest hits when it grows past its memory cap.
#[derive(Debug, thiserror::Error)]
#[error("memory limit exceeded: growing to {desired} bytes, cap is {cap} bytes")]
pub struct MemoryLimitExceeded {
    /// Total bytes the growth would have reached.
    pub desired: usize,
    /// The configured cap.
    pub cap: usize,
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory_used - current.min(self.memory_used) + desired;
        if total > self.memory_cap {
            self.exceeded = true;
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                desired: total,
                cap: self.memory_cap,
            }));
        }
        self.memory_used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; 100k entries is far beyond any
        // real handler and bounds host memory used through them.
        Ok(desired <= 100_000)
    }
}

/// Guest stdout/stderr: keeps the first `cap` bytes, silently drops the
/// rest. Silently, because a guest whose `println!` fails would panic: a
/// chatty handler must not turn into a failing one.
#[derive(Clone)]
struct BoundedOutput {
    buf: Arc<Mutex<Vec<u8>>>,
    cap: usize,
}

impl BoundedOutput {
    fn new(cap: usize) -> Self {
        Self {
            buf: Arc::new(Mutex::new(Vec::new())),
            cap,
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.cap.saturating_sub(buf.len());
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl IsTerminal for BoundedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for BoundedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for BoundedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for BoundedOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for BoundedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

// ---- wasi:clocks/monotonic-clock -------------------------------------------

/// The monotonic-clock interface as wasmtime-wasi registers it; a guest
/// importing any `0.2.x` version of it is linked to this one. Should a
/// wasmtime-wasi upgrade change the version, the sleep tests in
/// `tests/e2e/sandbox.rs` fail: the functions here would then shadow
/// nothing.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Redefine the two ways a guest sets a timer (`subscribe-duration`,
/// `subscribe-instant`) so every timer ends by the call's deadline. The
/// epoch interrupt only stops wasm code that runs; a guest blocked in
/// `wasi:io/poll` on a long timer (`std::thread::sleep`) would otherwise
/// hold its host thread past the deadline, for ever if it likes. Every
/// other wait a guest can start is on something ready at once (closed
/// stdin, the bounded stdout and stderr; no files, no sockets).
///
/// Must follow `wasmtime_wasi::p2::add_to_linker_sync`.
pub(crate) fn bound_guest_timers(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::clocks::WasiClocksView as _;
    use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host as _;

    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: StoreContextMut<'_, GuestState>, (nanos,): (u64,)| {
            let timer = store
                .data_mut()
                .bounded_timer(Duration::from_nanos(nanos))?;
            Ok((timer,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: StoreContextMut<'_, GuestState>, (when,): (u64,)| {
            let state = store.data_mut();
            // The guest's instant is on WASI's clock, not `Instant`'s.
            let now = state.clocks().now()?;
            let timer = state.bounded_timer(Duration::from_nanos(when.saturating_sub(now)))?;
            Ok((timer,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A guest timer: ready at `until`, which is never past the deadline.
struct Timer {
    until: tokio::time::Instant,
    yielded: bool,
}

#[wasmtime_wasi::async_trait]
impl Pollable for Timer {
    async fn ready(&mut self) {
        if self.until > tokio::time::Instant::now() {
            tokio::time::sleep_until(self.until).await;
        } else if !self.yielded {
            // As wasmtime-wasi's own timer does: a zero timeout polled in a
            // busy loop must still let the I/O driver run.
            self.yielded = true;
            tokio::task::yield_now().await;
        }
    }
}

// ---- wasi:keyvalue/store ----------------------------------------------------

impl kv::Host for GuestState {
    fn open(
        &mut self,
        identifier: String,
    ) -> wasmtime::Result<Result<Resource<Bucket>, kv::Error>> {
        // The handler's own namespace is the only bucket. Besides `""`, it
        // answers to the handler's name (to be explicit) and to
        // `"default"`, the bucket Spin's and wasmCloud's guests open, so
        // theirs run unchanged.
        if !identifier.is_empty() && identifier != "default" && *identifier != *self.handler {
            return Ok(Err(kv::Error::NoSuchStore));
        }
        if let Err(e) = self.state_available() {
            return Ok(Err(e));
        }
        Ok(self.table.push(Bucket).map_err(|e| too_many_resources(&e)))
    }
}

impl kv::HostBucket for GuestState {
    fn get(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, kv::Error>> {
        // Reads are remembered for the commit check: keys are bounded here too.
        if let Err(e) = self.check_key(&key) {
            return Ok(Err(e));
        }
        Ok(Ok(self.read(&key)?))
    }

    fn set(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), kv::Error>> {
        if let Err(e) = self.admit_write(&key, value.len()) {
            return Ok(Err(e));
        }
        self.effects.txn.set(&key, value);
        Ok(Ok(()))
    }

    fn delete(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<(), kv::Error>> {
        if let Err(e) = self.admit_write(&key, 0) {
            return Ok(Err(e));
        }
        self.effects.txn.delete(&key);
        Ok(Ok(()))
    }

    fn exists(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, kv::Error>> {
        if let Err(e) = self.check_key(&key) {
            return Ok(Err(e));
        }
        Ok(Ok(self.read(&key)?.is_some()))
    }

    fn list_keys(
        &mut self,
        _bucket: Resource<Bucket>,
        cursor: Option<String>,
    ) -> wasmtime::Result<Result<kv::KeyResponse, kv::Error>> {
        const PAGE: usize = 1000;
        let Some(store) = &self.state else {
            return Ok(Err(kv::Error::Other("state is not available".into())));
        };
        // Committed keys merged with this call's own pending writes, so a
        // guest sees its writes in listings as it does in reads.
        let committed = match store.list_keys(&self.handler, cursor.as_deref(), PAGE) {
            Ok(keys) => keys,
            Err(e) if e.downcast_ref::<Contended>().is_some() => {
                // The batch's transaction is over: nothing the call does
                // now can commit. Trap, and the event runs again.
                let msg = format!("listing keys: {e:#}");
                self.effects.contended = Some(msg.clone());
                return Err(wasmtime::format_err!("{msg}"));
            }
            Err(e) => return Ok(Err(kv::Error::Other(format!("{e:#}")))),
        };
        let full_page = committed.len() == PAGE;
        let last = committed.last().cloned();
        let mut keys: std::collections::BTreeSet<String> = committed.into_iter().collect();
        for (key, value) in self.effects.txn.pending() {
            let after_cursor = cursor.as_ref().is_none_or(|c| key > c);
            let within_page = !full_page || last.as_ref().is_some_and(|l| key <= l);
            if after_cursor && within_page {
                match value {
                    Some(_) => keys.insert(key.clone()),
                    None => keys.remove(key),
                };
            }
        }
        Ok(Ok(kv::KeyResponse {
            keys: keys.into_iter().collect(),
            cursor: if full_page { last } else { None },
        }))
    }

    fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

// ---- wasi:keyvalue/atomics --------------------------------------------------

impl atomics::Host for GuestState {
    fn increment(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> wasmtime::Result<Result<i64, kv::Error>> {
        if let Err(e) = self.check_key(&key) {
            return Ok(Err(e));
        }
        let current = match self.read(&key)? {
            None => 0,
            Some(bytes) => match parse_int(&bytes) {
                Some(n) => n,
                None => {
                    return Ok(Err(kv::Error::Other(format!(
                        "value at {key:?} is not an ASCII decimal integer"
                    ))))
                }
            },
        };
        let Some(next) = current.checked_add(delta) else {
            return Ok(Err(kv::Error::Other(format!(
                "increment of {key:?} overflows"
            ))));
        };
        let value = next.to_string().into_bytes();
        if let Err(e) = self.admit_write(&key, value.len()) {
            return Ok(Err(e));
        }
        self.effects.txn.set(&key, value);
        Ok(Ok(next))
    }

    fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), atomics::CasError>> {
        let cas = self.table.delete(cas)?;
        self.release_cas(&cas);
        let current = self.read(&cas.key)?;
        if current == cas.seen {
            if let Err(e) = self.admit_write(&cas.key, value.len()) {
                return Ok(Err(atomics::CasError::StoreError(e)));
            }
            self.effects.txn.set(&cas.key, value);
            return Ok(Ok(()));
        }
        // The handle just released makes room for the fresh one.
        match self.hold_cas(cas.key, current) {
            Ok(fresh) => Ok(Err(atomics::CasError::CasFailed(fresh))),
            Err(e) => Ok(Err(atomics::CasError::StoreError(e))),
        }
    }
}

impl atomics::HostCas for GuestState {
    fn new(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Resource<Cas>, kv::Error>> {
        if let Err(e) = self.check_key(&key) {
            return Ok(Err(e));
        }
        let seen = self.read(&key)?;
        Ok(self.hold_cas(key, seen))
    }

    fn current(
        &mut self,
        cas: Resource<Cas>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, kv::Error>> {
        Ok(Ok(self.table.get(&cas)?.seen.clone()))
    }

    fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        let cas = self.table.delete(cas)?;
        self.release_cas(&cas);
        Ok(())
    }
}

impl GuestState {
    /// A new CAS handle holding `seen`, within the bounds on live resources
    /// and on the bytes CAS handles hold.
    fn hold_cas(&mut self, key: String, seen: Option<Vec<u8>>) -> Result<Resource<Cas>, kv::Error> {
        let size = key.len() + seen.as_ref().map_or(0, Vec::len);
        if self.cas_bytes + size > MAX_CAS_HELD_BYTES {
            return Err(kv::Error::Other(format!(
                "live CAS handles would hold more than {MAX_CAS_HELD_BYTES} bytes; drop some"
            )));
        }
        let cas = self
            .table
            .push(Cas { key, seen })
            .map_err(|e| too_many_resources(&e))?;
        self.cas_bytes += size;
        Ok(cas)
    }

    fn release_cas(&mut self, cas: &Cas) {
        let size = cas.key.len() + cas.seen.as_ref().map_or(0, Vec::len);
        self.cas_bytes = self.cas_bytes.saturating_sub(size);
    }
}

/// The error a guest sees when its resource table is full.
fn too_many_resources(e: &wasmtime::component::ResourceTableError) -> kv::Error {
    kv::Error::Other(format!(
        "{e}: at most {MAX_LIVE_RESOURCES} live resources per instance; drop some"
    ))
}

/// Integers in state are ASCII decimal text, the encoding `increment` uses
/// and the admin endpoint shows as JSON numbers.
pub fn parse_int(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

// ---- wasi:logging -----------------------------------------------------------

/// `wasi:logging/logging` without a version, as the host's WIT named it
/// before pinning the published `@0.1.0-draft`: handlers built then import
/// it so, and must keep loading. The same function under the old name.
pub fn link_unversioned_logging(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.instance("wasi:logging/logging")?.func_wrap(
        "log",
        |mut store: StoreContextMut<'_, GuestState>,
         (level, context, message): (logging::Level, String, String)| {
            logging::Host::log(store.data_mut(), level, context, message)
        },
    )
}

/// Longest guest log message forwarded; longer ones are cut.
const MAX_LOG_MESSAGE: usize = 4096;

impl logging::Host for GuestState {
    fn log(
        &mut self,
        level: logging::Level,
        context: String,
        message: String,
    ) -> wasmtime::Result<()> {
        self.log_lines += 1;
        if self.log_lines > self.limits.max_log_lines {
            return Ok(());
        }
        let message = truncate(&message, MAX_LOG_MESSAGE);
        let context = truncate(&context, 256);
        if self.capture_logs {
            self.effects.logs.push(GuestLog {
                at: std::time::SystemTime::now(),
                level: match level {
                    logging::Level::Trace => "trace",
                    logging::Level::Debug => "debug",
                    logging::Level::Info => "info",
                    logging::Level::Warn => "warn",
                    logging::Level::Error => "error",
                    logging::Level::Critical => "critical",
                },
                context: context.to_owned(),
                message: message.to_owned(),
            });
        }
        let handler = &*self.handler;
        let at = match level {
            logging::Level::Trace => tracing::Level::TRACE,
            logging::Level::Debug => tracing::Level::DEBUG,
            logging::Level::Info => tracing::Level::INFO,
            logging::Level::Warn => tracing::Level::WARN,
            logging::Level::Error | logging::Level::Critical => tracing::Level::ERROR,
        };
        crate::trace::about_event(at, || match level {
            logging::Level::Trace => {
                tracing::trace!(target: "guest", handler, context, "{message}")
            }
            logging::Level::Debug => {
                tracing::debug!(target: "guest", handler, context, "{message}")
            }
            logging::Level::Info => tracing::info!(target: "guest", handler, context, "{message}"),
            logging::Level::Warn => tracing::warn!(target: "guest", handler, context, "{message}"),
            logging::Level::Error | logging::Level::Critical => {
                tracing::error!(target: "guest", handler, context, "{message}")
            }
        });
        Ok(())
    }
}

/// Cut `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---- wasi:config ------------------------------------------------------------

impl config_store::Host for GuestState {
    fn get(
        &mut self,
        key: String,
    ) -> wasmtime::Result<Result<Option<String>, config_store::Error>> {
        Ok(Ok(self.config.get(&key).cloned()))
    }

    fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, config_store::Error>> {
        Ok(Ok(self
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()))
    }
}

// ---- event-host:handler/publisher -------------------------------------------

impl types::Host for GuestState {}

impl publisher::Host for GuestState {
    fn publish(
        &mut self,
        exchange: String,
        routing_key: String,
        payload: Vec<u8>,
        properties: publisher::Properties,
    ) -> wasmtime::Result<Result<(), publisher::PublishError>> {
        if self.effects.publishes.len() as u32 >= self.limits.max_publishes {
            return Ok(Err(publisher::PublishError::TooMany(
                self.limits.max_publishes,
            )));
        }
        if payload.len() > self.limits.max_publish_bytes as usize {
            return Ok(Err(publisher::PublishError::TooLarge(
                self.limits.max_publish_bytes,
            )));
        }
        if let Err(reason) = check_publish(&exchange, &routing_key, &properties) {
            return Ok(Err(publisher::PublishError::Invalid(reason)));
        }
        if !self.limits.allowed_exchanges.contains(&exchange) {
            return Ok(Err(publisher::PublishError::NotAllowed(format!(
                "exchange {exchange:?} is not an output of this handler: name it in the \
                 manifest's `publishes` or the config's `publishes_to`"
            ))));
        }
        self.effects.publishes.push(Outgoing {
            exchange,
            routing_key,
            payload,
            content_type: properties.content_type,
            message_id: properties.message_id,
            correlation_id: properties.correlation_id,
            headers: properties.headers,
        });
        Ok(Ok(()))
    }
}

/// Why the host cannot carry a publish to the broker, if it cannot: every
/// short string within 255 bytes, header names non-empty and not the
/// host's own, header bytes within [`MAX_PUBLISH_HEADER_BYTES`].
fn check_publish(
    exchange: &str,
    routing_key: &str,
    properties: &publisher::Properties,
) -> Result<(), String> {
    let short = |what: &str, value: Option<&str>| match value {
        Some(v) if v.len() > MAX_SHORT_STRING_BYTES => Err(format!(
            "{what} is {} bytes, over the AMQP limit of {MAX_SHORT_STRING_BYTES}",
            v.len()
        )),
        _ => Ok(()),
    };
    short("exchange name", Some(exchange))?;
    short("routing key", Some(routing_key))?;
    short("content-type", properties.content_type.as_deref())?;
    short("message-id", properties.message_id.as_deref())?;
    short("correlation-id", properties.correlation_id.as_deref())?;
    let mut header_bytes = 0usize;
    for (name, value) in &properties.headers {
        if name.is_empty() {
            return Err("a header name is empty".into());
        }
        short("a header name", Some(name))?;
        if name.to_ascii_lowercase().starts_with(HOST_HEADER_PREFIX) {
            return Err(format!(
                "header {name:?}: `{HOST_HEADER_PREFIX}*` headers are the host's own"
            ));
        }
        header_bytes = header_bytes.saturating_add(name.len() + value.len());
    }
    if header_bytes > MAX_PUBLISH_HEADER_BYTES {
        return Err(format!(
            "headers are {header_bytes} bytes, over the limit of {MAX_PUBLISH_HEADER_BYTES}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component that only imports `wasi:logging`'s `log` under `name`.
    fn logging_import(name: &str) -> String {
        format!(
            r#"(component
                (import "{name}" (instance
                    (type $level' (enum "trace" "debug" "info" "warn" "error" "critical"))
                    (export "level" (type $level (eq $level')))
                    (export "log" (func (param "level" $level) (param "context" string) (param "message" string)))
                ))
            )"#
        )
    }

    #[test]
    fn handlers_importing_logging_at_its_version_or_without_one_both_link() {
        let runtime = crate::runtime::Runtime::new(Default::default()).unwrap();
        let links = |name: &str| {
            let component = wasmtime::component::Component::new(
                runtime.linker().engine(),
                logging_import(name),
            )
            .expect("valid component");
            runtime.linker().instantiate_pre(&component).is_ok()
        };
        assert!(
            links("wasi:logging/logging@0.1.0-draft"),
            "the published version"
        );
        assert!(
            links("wasi:logging/logging"),
            "handlers built before it was pinned"
        );
        assert!(
            !links("wasi:logging/logging@9.9.9"),
            "an unknown version does not link"
        );
    }

    fn props(headers: Vec<(String, String)>) -> publisher::Properties {
        publisher::Properties {
            content_type: None,
            message_id: None,
            correlation_id: None,
            headers,
        }
    }

    #[test]
    fn publishes_the_broker_cannot_carry_are_invalid() {
        let long = "x".repeat(MAX_SHORT_STRING_BYTES + 1);
        let fits = "x".repeat(MAX_SHORT_STRING_BYTES);
        assert!(check_publish(&fits, &fits, &props(vec![])).is_ok());
        assert!(check_publish(&long, "", &props(vec![])).is_err());
        assert!(check_publish("e", &long, &props(vec![])).is_err());
        for field in 0..3 {
            let with = |value: &str| {
                let mut p = props(vec![]);
                let slot = match field {
                    0 => &mut p.content_type,
                    1 => &mut p.message_id,
                    _ => &mut p.correlation_id,
                };
                *slot = Some(value.to_owned());
                p
            };
            assert!(check_publish("e", "", &with(&fits)).is_ok());
            assert!(check_publish("e", "", &with(&long)).is_err());
        }
        for bad in [
            "",
            long.as_str(),
            "x-event-host-attempt",
            "X-Event-Host-Reason",
        ] {
            let p = props(vec![(bad.to_owned(), "v".into())]);
            assert!(check_publish("e", "", &p).is_err(), "{bad:?}");
        }
        let at_cap = props(vec![("h".into(), "v".repeat(MAX_PUBLISH_HEADER_BYTES - 1))]);
        assert!(check_publish("e", "", &at_cap).is_ok());
        let over = props(vec![("h".into(), "v".repeat(MAX_PUBLISH_HEADER_BYTES))]);
        assert!(check_publish("e", "", &over).is_err());
    }
}
