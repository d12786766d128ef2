//! The Wasm side: engine policy, compiling and checking components, and
//! running one handler call in a bounded instance — fresh per event by
//! default, or kept for a few events of a batch where the handler's
//! settings allow it.
//!
//! Engine policy lives here and nowhere else: the pooling allocator (so an
//! instance is a few page-table operations, not an `mmap`), copy-on-write
//! memory images, epoch interruption for deadlines, and the resource
//! limiter for memory caps. The dispatcher asks for "run this event on this
//! handler version" and gets back a [`CallOutcome`] whatever the guest did.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline,
};

use crate::bindings::{self, Handler, HandlerPre};
use crate::guest::{CallEffects, CallLimits, GuestState, MemoryLimitExceeded};
use crate::manifest::Manifest;
use crate::state::StateStore;

/// Time a component gets to instantiate and answer `manifest()` when it is
/// loaded (or checked). A manifest is a constant; this only stops one that
/// loops or sleeps from holding a loader thread.
const MANIFEST_DEADLINE: Duration = Duration::from_secs(1);

/// Engine-wide settings. Per-handler limits (deadline, memory) are in
/// [`CallLimits`] and the handler config; these bound the whole process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Instances that may exist at once (pool slots). Too low and events
    /// wait for a slot (they fail with "pool exhausted"); each slot costs
    /// only address space until used. Default 64.
    pub max_instances: u32,
    /// Largest memory cap any handler may be given, in MiB; per-handler
    /// `memory_mb` is checked against it. Default 1024.
    pub max_memory_mb: u64,
    /// Epoch tick in milliseconds: the granularity of per-event deadlines.
    /// Smaller is more precise and costs a wakeup per tick. Default 5.
    pub epoch_tick_ms: u64,
    /// Largest `.wasm` file accepted, in MiB. Default 64.
    pub max_component_mb: u64,
    /// Low bytes of each instance memory (KiB) that stay resident between
    /// events and are reset by copying instead of `madvise`. Larger keeps
    /// more memory per pool slot committed; smaller makes guests whose
    /// memory is larger re-fault their pages on every event. Default 2048.
    pub keep_resident_kb: u64,
    /// Use Linux's `PAGEMAP_SCAN` (kernel 6.7+) to reset only the pages an
    /// event dirtied. Costs one ioctl (~2-3 µs) per instance; saves far
    /// more for guests with the default 1 MiB Rust stack (measured: 50 µs
    /// instead of 85 µs per inventory event). Turn off only for tiny guests
    /// with a small `keep_resident_kb`. Default true; ignored where absent.
    pub pagemap_scan: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_instances: 64,
            max_memory_mb: 1024,
            epoch_tick_ms: 5,
            max_component_mb: 64,
            keep_resident_kb: 2048,
            pagemap_scan: true,
        }
    }
}

/// A compiled, linked, checked handler component, ready to instantiate.
pub struct Prepared {
    /// Pre-instantiation: imports resolved once, so each event only
    /// allocates and initialises an instance.
    pub pre: HandlerPre<GuestState>,
    /// What the component says about itself.
    pub manifest: Manifest,
}

/// The per-event budget of one call.
#[derive(Debug, Clone)]
pub struct CallBudget {
    /// Wall-clock deadline for the call (epoch-based).
    pub deadline: Duration,
    /// Memory, publish and output limits.
    pub limits: CallLimits,
    /// Events one instance may serve, one after another, before it is
    /// discarded (1: a fresh instance per event). See
    /// [`Runtime::call_in`].
    pub events_per_instance: u32,
}

/// How a call ended, from the host's point of view.
#[derive(Debug)]
pub enum CallResult {
    /// `handle` returned `ok`.
    Ok,
    /// `handle` returned `retry(reason)`.
    Retry(String),
    /// `handle` returned `reject(reason)`.
    Reject(String),
    /// The guest trapped, timed out, hit its memory cap or exited: a failed
    /// attempt, with a human reason.
    Trapped(Failure),
    /// The host failed (state I/O, instantiation): not the guest's fault.
    HostError(String),
}

/// Why a guest call failed without returning.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The epoch deadline passed.
    Timeout(Duration),
    /// Linear memory growth past the cap.
    MemoryLimit(String),
    /// Any other trap (panic, stack overflow, bad memory access, exit...).
    Trap(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout(d) => write!(f, "deadline of {} ms exceeded", d.as_millis()),
            Failure::MemoryLimit(m) => f.write_str(m),
            Failure::Trap(m) => write!(f, "trap: {m}"),
        }
    }
}

/// Everything a call returned: how it ended and what it produced.
#[derive(Debug)]
pub struct CallOutcome {
    /// How it ended.
    pub result: CallResult,
    /// State transaction, publishes, captured output.
    pub effects: CallEffects,
    /// Time spent instantiating and running.
    pub elapsed: Duration,
    /// Whether the call made a new instance (rather than reusing a warm one).
    pub instantiated: bool,
}

/// The Wasm engine and the linker every handler is instantiated against.
pub struct Runtime {
    engine: Engine,
    linker: Linker<GuestState>,
    config: RuntimeConfig,
    /// Names this engine's compiled-code format in cache file names, so a
    /// host built differently never loads another's native code.
    compat: String,
    /// Ticks the epoch; stops when the engine is dropped.
    _ticker: std::thread::JoinHandle<()>,
    /// Compiled code being written to the cache in the background.
    cache_writes: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Runtime {
    /// The linker handlers are instantiated against, for tests of what it
    /// offers.
    #[cfg(test)]
    pub(crate) fn linker(&self) -> &Linker<GuestState> {
        &self.linker
    }

    /// Build the engine with this process's policy.
    pub fn new(config: RuntimeConfig) -> Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        let slots = config.max_instances.max(1);
        // A wasm32-wasip2 Rust component is a handful of core instances
        // (the program plus adapter shims), usually one or two memories.
        pool.total_component_instances(slots)
            .total_core_instances(slots * 8)
            .total_memories(slots * 2)
            .total_tables(slots * 8)
            .total_stacks(slots)
            .max_memory_size((config.max_memory_mb as usize) << 20)
            // Reset a finished instance's memory by copying back only the
            // pages it dirtied and keeping them resident, instead of
            // madvise: the next instance in the slot then takes no page
            // faults, and no TLB shootdown runs. See the two knobs.
            .pagemap_scan(if config.pagemap_scan {
                Enabled::Auto
            } else {
                Enabled::No
            })
            .linear_memory_keep_resident((config.keep_resident_kb as usize) << 10)
            // Handler tables are a few entries; one page covers them.
            .table_keep_resident(4 << 10);

        let mut wasm = Config::new();
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            .memory_init_cow(true)
            // The guest's own shadow stack lives in its linear memory; this
            // bounds the native stack wasm frames may use.
            .max_wasm_stack(512 << 10)
            .wasm_component_model(true);
        let engine = Engine::new(&wasm)
            .map_err(anyhow::Error::from)
            .context("creating the Wasm engine")?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking WASI")?;
        crate::guest::bound_guest_timers(&mut linker)
            .map_err(anyhow::Error::from)
            .context("bounding guest timers by the deadline")?;
        Handler::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(anyhow::Error::from)
            .context("linking the handler world")?;
        crate::guest::link_unversioned_logging(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking wasi:logging without a version")?;

        let weak = engine.weak();
        let tick = Duration::from_millis(config.epoch_tick_ms.max(1));
        let ticker = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                // Epochs follow the wall clock: every wake-up of a sleeping
                // thread comes a little late (much later on a loaded
                // machine), and counting one epoch per wake-up would
                // stretch a deadline by the sum of those delays. Never
                // ahead of the wall clock, so no deadline is cut short.
                let start = Instant::now();
                let mut ticks: u128 = 0;
                loop {
                    std::thread::sleep(tick);
                    let Some(engine) = weak.upgrade() else {
                        return;
                    };
                    let due = start.elapsed().as_nanos() / tick.as_nanos();
                    while ticks < due {
                        engine.increment_epoch();
                        ticks += 1;
                    }
                }
            })
            .context("starting the epoch ticker")?;

        let compat = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            env!("CARGO_PKG_VERSION").hash(&mut h);
            format!("{:016x}", h.finish())
        };
        Ok(Self {
            engine,
            linker,
            config,
            compat,
            _ticker: ticker,
            cache_writes: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The engine-wide settings.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Compile `bytes`, check them against the `handler` world and read the
    /// manifest. Anything that is not a valid handler component fails here
    /// with a one-line reason, before it could serve an event.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Prepared> {
        self.prepare_cached(bytes, None).map(|(p, _)| p)
    }

    /// [`Runtime::prepare`], reusing compiled code from `cache` (folder and
    /// the bytes' sha256) when it holds it and storing it there otherwise.
    /// Returns whether the cache had it.
    pub fn prepare_cached(
        &self,
        bytes: &[u8],
        cache: Option<(&Path, &str)>,
    ) -> Result<(Prepared, bool)> {
        let max = (self.config.max_component_mb as usize) << 20;
        if bytes.len() > max {
            bail!(
                "component is {} bytes, over the {} MiB limit",
                bytes.len(),
                self.config.max_component_mb
            );
        }
        if !is_component(bytes) {
            bail!("not a WebAssembly component (a core module or another file type)");
        }
        let (component, hit) = self.compile(bytes, cache)?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow!("{e:#}"))
            .context("component imports something the handler world does not provide")?;
        let pre = HandlerPre::new(instance_pre)
            .map_err(|e| anyhow!("{e:#}"))
            .context("component does not export the handler world (manifest, handle)")?;
        let manifest = self.read_manifest(&pre)?;
        Ok((Prepared { pre, manifest }, hit))
    }

    /// Compile, or load what an earlier compile of the same bytes left in
    /// the cache. The cache is an optimisation: any trouble with it is
    /// logged and the component compiled.
    fn compile(&self, bytes: &[u8], cache: Option<(&Path, &str)>) -> Result<(Component, bool)> {
        let file = cache.map(|(dir, sha)| dir.join(format!("{sha}-{}.cwasm", self.compat)));
        if let Some(file) = file.as_ref().filter(|f| f.is_file()) {
            // Read into memory rather than `deserialize_file`, which maps
            // the file: anything truncating a mapped file would crash the
            // host with SIGBUS.
            let compiled = std::fs::read(file).map_err(anyhow::Error::from);
            // SAFETY: deserializing runs native code from the file. Only
            // this host writes the cache folder (config documents that),
            // each file from exactly the bytes whose sha256 names it, for an
            // engine whose compatibility hash is in the name; wasmtime
            // checks the header against the engine's settings too.
            match compiled.and_then(|c| {
                unsafe { Component::deserialize(&self.engine, c) }.map_err(anyhow::Error::from)
            }) {
                Ok(component) => return Ok((component, true)),
                Err(e) => {
                    tracing::warn!(file = %file.display(), "compiled-code cache entry unusable, compiling: {e:#}");
                    let _ = std::fs::remove_file(file);
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| anyhow!("{}", first_line(&format!("{e:#}"))))
            .context("compiling component")?;
        if let Some(file) = file {
            // Serializing and writing is off the reload's critical path.
            let component = component.clone();
            let write = std::thread::spawn(move || {
                if let Err(e) = store_compiled(&component, &file) {
                    tracing::warn!(file = %file.display(), "could not cache compiled code: {e:#}");
                }
            });
            let mut writes = self.cache_writes.lock().unwrap_or_else(|p| p.into_inner());
            writes.retain(|w| !w.is_finished());
            writes.push(write);
        }
        Ok((component, false))
    }

    /// Wait until the compiled code being written to the cache is written:
    /// a one-shot command (`check`, `replay`) would otherwise exit before
    /// its large component is cached, and compile it again next time.
    pub fn wait_for_cache_writes(&self) {
        let writes =
            std::mem::take(&mut *self.cache_writes.lock().unwrap_or_else(|p| p.into_inner()));
        for write in writes {
            let _ = write.join();
        }
    }

    fn read_manifest(&self, pre: &HandlerPre<GuestState>) -> Result<Manifest> {
        let limits = CallLimits {
            memory_bytes: 64 << 20,
            max_publishes: 0,
            max_publish_bytes: 0,
            max_output_bytes: 4096,
            max_log_lines: 10,
            allowed_exchanges: Arc::default(),
            // No state while reading the manifest: these never apply.
            max_key_bytes: 0,
            max_value_bytes: 0,
            max_writes: 0,
            max_written_bytes: 0,
            max_read_bytes: 0,
        };
        let data = GuestState::new("(loading)".into(), None, Arc::new(BTreeMap::new()), limits);
        let mut store = self.store(data, MANIFEST_DEADLINE);
        let raw = pre
            .instantiate(&mut store)
            .and_then(|h| h.call_manifest(&mut store))
            .and_then(|raw| {
                if store.data().overran_deadline() {
                    return Err(wasmtime::Error::new(Trap::Interrupt));
                }
                Ok(raw)
            })
            .map_err(|e| anyhow!("{}", describe_error(&e, MANIFEST_DEADLINE)))
            .context("calling manifest()")?;
        Manifest::try_from(raw)
    }

    fn store(&self, data: GuestState, deadline: Duration) -> Store<GuestState> {
        let mut store = Store::new(&self.engine, data);
        store.limiter(|s| s.limiter());
        self.set_deadline(&mut store, deadline);
        // The epoch is a prompt, the wall clock the judge: the ticker may
        // lag behind (a loaded machine wakes it late), and an epoch
        // deadline counted from a lagging epoch would fire before the
        // event's time is up. So a call is interrupted only once its
        // wall-clock deadline has passed; before that it runs on, checked
        // again at the next tick.
        store.epoch_deadline_callback(|ctx| {
            if ctx.data().deadline_passed() {
                Err(wasmtime::Error::new(Trap::Interrupt))
            } else {
                Ok(UpdateDeadline::Continue(1))
            }
        });
        store
    }

    /// Trap the store's next call once `deadline` has passed from now:
    /// the epoch interrupt stops running wasm, and the same instant bounds
    /// every timer the guest sets (see [`crate::guest::bound_guest_timers`]).
    fn set_deadline(&self, store: &mut Store<GuestState>, deadline: Duration) {
        store.data_mut().set_deadline(Instant::now() + deadline);
        let tick = self.config.epoch_tick_ms.max(1);
        // The first check comes at the tick after the deadline (+1 for
        // the ticker's phase); the wall clock then decides (see `store`).
        store.set_epoch_deadline(deadline.as_millis() as u64 / tick + 1);
    }

    /// Run one event in a fresh instance. Never fails and never panics on
    /// anything the guest does; every failure is a [`CallResult`].
    pub fn call(
        &self,
        pre: &HandlerPre<GuestState>,
        handler: Arc<str>,
        state: StateStore,
        config: Arc<BTreeMap<String, String>>,
        budget: &CallBudget,
        event: &bindings::Event,
    ) -> CallOutcome {
        self.call_in(&mut None, pre, budget, event, || {
            GuestState::new(handler, Some(state), config, budget.limits.clone())
        })
    }

    /// Run one event in `warm`'s instance when it holds one, else in a
    /// fresh instance whose store data `data` builds. Afterwards `warm`
    /// keeps the instance for the next event only if this call returned
    /// `ok` and the instance has served fewer than
    /// `budget.events_per_instance` events: anything else (a trap, a
    /// timeout, a memory-cap hit, `retry` or `reject`) discards it, so a
    /// guest left in a bad state never sees another event.
    ///
    /// `warm` must only ever hold instances of this `pre` (the caller keeps
    /// one per handler version).
    pub fn call_in(
        &self,
        warm: &mut Option<WarmInstance>,
        pre: &HandlerPre<GuestState>,
        budget: &CallBudget,
        event: &bindings::Event,
        data: impl FnOnce() -> GuestState,
    ) -> CallOutcome {
        let started = Instant::now();
        let instantiated = warm.is_none();
        let mut instance = match warm.take() {
            Some(mut instance) => {
                // Each event gets its whole deadline, counted from now.
                self.set_deadline(&mut instance.store, budget.deadline);
                instance
            }
            None => {
                let mut store = self.store(data(), budget.deadline);
                match pre.instantiate(&mut store) {
                    Ok(handler) => WarmInstance {
                        store,
                        handler,
                        served: 0,
                    },
                    Err(e) => {
                        let result = classify(&e, budget.deadline, &mut store, true);
                        return CallOutcome {
                            result,
                            effects: store.into_data().into_effects(),
                            elapsed: started.elapsed(),
                            instantiated,
                        };
                    }
                }
            }
        };
        let result = match instance.handler.call_handle(&mut instance.store, event) {
            // A guest whose timer was cut to the deadline resumed after it;
            // whatever it returned, it asked to run longer than allowed.
            Ok(_) if instance.store.data().overran_deadline() => {
                CallResult::Trapped(Failure::Timeout(budget.deadline))
            }
            Ok(Ok(())) => CallResult::Ok,
            Ok(Err(bindings::HandleError::Retry(r))) => CallResult::Retry(r),
            Ok(Err(bindings::HandleError::Reject(r))) => CallResult::Reject(r),
            Err(e) => classify(&e, budget.deadline, &mut instance.store, false),
        };
        instance.served += 1;
        let effects = instance.store.data_mut().take_effects();
        let elapsed = started.elapsed();
        if matches!(result, CallResult::Ok) && instance.served < budget.events_per_instance {
            *warm = Some(instance);
        }
        // Otherwise the instance is dropped here: its pool slot is reset
        // and freed.
        CallOutcome {
            result,
            effects,
            elapsed,
            instantiated,
        }
    }
}

/// A live handler instance kept between events of one batch, for handlers
/// whose settings let one instance serve several events
/// (`events_per_instance`): instantiating and tearing down a fresh
/// instance is most of the per-event cost of a small handler.
pub struct WarmInstance {
    store: Store<GuestState>,
    handler: Handler,
    /// Events it has run.
    served: u32,
}

/// Turn a wasmtime error from instantiating or calling into a result.
fn classify(
    e: &wasmtime::Error,
    deadline: Duration,
    store: &mut Store<GuestState>,
    instantiating: bool,
) -> CallResult {
    if let Some(fault) = store.data().host_fault() {
        return CallResult::HostError(fault);
    }
    if instantiating
        && e.downcast_ref::<Trap>().is_none()
        && e.downcast_ref::<MemoryLimitExceeded>().is_none()
    {
        // Pool exhaustion and the like: the guest never ran.
        return CallResult::HostError(format!(
            "instantiation failed: {}",
            first_line(&format!("{e:#}"))
        ));
    }
    CallResult::Trapped(describe_error(e, deadline))
}

fn describe_error(e: &wasmtime::Error, deadline: Duration) -> Failure {
    if let Some(limit) = e.downcast_ref::<MemoryLimitExceeded>() {
        return Failure::MemoryLimit(limit.to_string());
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Failure::Trap(format!("guest called exit({})", exit.0));
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Failure::Timeout(deadline),
        Some(Trap::StackOverflow) => Failure::Trap("stack overflow".into()),
        Some(Trap::UnreachableCodeReached) => {
            Failure::Trap("unreachable executed (a Rust guest panicked or aborted)".into())
        }
        Some(trap) => Failure::Trap(trap.to_string()),
        // An error a host function returned: its own message is the root
        // cause (the outer context is only "error while executing at wasm
        // backtrace").
        None => Failure::Trap(first_line(&e.root_cause().to_string()).to_owned()),
    }
}

/// Write compiled code atomically (temp file, then rename): a crash
/// mid-write never leaves a truncated entry under the final name.
fn store_compiled(component: &Component, file: &Path) -> Result<()> {
    let dir = file.parent().context("cache file without a folder")?;
    std::fs::create_dir_all(dir)?;
    let bytes = component.serialize().map_err(anyhow::Error::from)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file.file_name().and_then(|n| n.to_str()).unwrap_or("cwasm"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Components start with the wasm magic and the component layer/version
/// (`0d 00 01 00`); core modules have version `01 00 00 00`.
pub fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[..4] == b"\0asm" && bytes[4..8] == [0x0d, 0x00, 0x01, 0x00]
}
