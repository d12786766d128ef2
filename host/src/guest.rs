//! What a guest sees of the host: the per-instance store data and the host
//! side of every WIT import (state, publish, logging, config).
//!
//! One [`GuestState`] lives exactly as long as one handler instance, which by
//! default is one event (a handler may allow more: `events_per_instance`).
//! Everything it collects (state transaction, publishes, captured output)
//! is handed back to the dispatcher when each call ends, so no effect of
//! one event is ever attributed to another.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::bindings::wasi::config::store as config_store;
use crate::bindings::wasi::keyvalue::{atomics, store as kv};
use crate::bindings::wasi::logging::logging;
use crate::bindings::{event_host::handler::publisher, event_host::handler::types};
use crate::state::{Outgoing, StateStore, Txn};

/// The handler's one bucket (its own namespace). A unit: which namespace it
/// is follows from the instance it lives in.
pub struct Bucket;

/// A compare-and-swap handle: the key and the value seen when it was made.
pub struct Cas {
    key: String,
    seen: Option<Vec<u8>>,
}

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
    effects: CallEffects,
}

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
        Self {
            wasi: None,
            table: ResourceTable::new(),
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
            effects: CallEffects::default(),
        }
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
            tracing::warn!(
                handler = %self.handler,
                dropped = self.log_lines - self.limits.max_log_lines,
                "guest log lines over the per-event limit were dropped"
            );
        }
        self.log_lines = 0;
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
        match self.effects.txn.get(store, &self.handler, key) {
            Ok(v) => Ok(v),
            Err(e) => {
                let msg = format!("state read of {key:?} failed: {e:#}");
                self.effects.host_fault = Some(msg.clone());
                Err(wasmtime::format_err!("{msg}"))
            }
        }
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
            // network: WASI's defaults minus sockets.
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

// ---- wasi:keyvalue/store ----------------------------------------------------

impl kv::Host for GuestState {
    fn open(
        &mut self,
        identifier: String,
    ) -> wasmtime::Result<Result<Resource<Bucket>, kv::Error>> {
        // The handler's own namespace is the only bucket; naming it by the
        // handler's name is accepted too, so guests can be explicit.
        if !identifier.is_empty() && *identifier != *self.handler {
            return Ok(Err(kv::Error::NoSuchStore));
        }
        if let Err(e) = self.state_available() {
            return Ok(Err(e));
        }
        Ok(Ok(self.table.push(Bucket)?))
    }
}

impl kv::HostBucket for GuestState {
    fn get(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, kv::Error>> {
        Ok(Ok(self.read(&key)?))
    }

    fn set(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), kv::Error>> {
        self.effects.txn.set(&key, value);
        Ok(Ok(()))
    }

    fn delete(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<(), kv::Error>> {
        self.effects.txn.delete(&key);
        Ok(Ok(()))
    }

    fn exists(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, kv::Error>> {
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
        self.effects.txn.set(&key, next.to_string().into_bytes());
        Ok(Ok(next))
    }

    fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), atomics::CasError>> {
        let cas = self.table.delete(cas)?;
        let current = self.read(&cas.key)?;
        if current == cas.seen {
            self.effects.txn.set(&cas.key, value);
            return Ok(Ok(()));
        }
        let fresh = self.table.push(Cas {
            key: cas.key,
            seen: current,
        })?;
        Ok(Err(atomics::CasError::CasFailed(fresh)))
    }
}

impl atomics::HostCas for GuestState {
    fn new(
        &mut self,
        _bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Resource<Cas>, kv::Error>> {
        let seen = self.read(&key)?;
        Ok(Ok(self.table.push(Cas { key, seen })?))
    }

    fn current(
        &mut self,
        cas: Resource<Cas>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, kv::Error>> {
        Ok(Ok(self.table.get(&cas)?.seen.clone()))
    }

    fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

/// Integers in state are ASCII decimal text, the encoding `increment` uses
/// and the admin endpoint shows as JSON numbers.
pub fn parse_int(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

// ---- wasi:logging -----------------------------------------------------------

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
        let handler = &*self.handler;
        match level {
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
        }
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
