//! Per-event dispatch cost: event bytes in, outcome out, a fresh instance
//! per event, through the real dispatcher (state commit included, against
//! an in-memory SQLite so the figure is the dispatch path, not the disk).
//!
//! Run: `cargo bench -p event-host --bench dispatch`
//!
//! Prints p50/p99 in µs for the no-op handler and for `inventory`, beside a
//! native Rust function doing the same JSON work, and the ratio of each to
//! its native baseline measured in the same process. Two more rows run
//! inventory the way the broker path does — batches executed, staged and
//! committed together — with a fresh instance per event and with one
//! instance for the whole batch (`events_per_instance`).
//!
//! `cargo bench -p event-host --bench dispatch -- --python FILE` instead
//! compares the Python build of inventory (`guests/inventory-py/build.sh`
//! makes FILE) with the Rust one: size, first compile, cached load, and
//! per-event cost in fresh and reused instances.

#[path = "../../tests/e2e/support.rs"]
mod support;

use std::collections::HashMap;
use std::time::Instant;

use event_host::dispatch::{Committed, Delivery, Outcome, Warm};
use serde_json::{json, Value};

const WARMUP: usize = 2_000;
const DEFAULT_ITERATIONS: usize = 20_000;

struct Stats {
    p50: f64,
    p99: f64,
}

/// `BENCH_ITERATIONS` overrides the sample count (e.g. for profiling).
fn iterations() -> usize {
    std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS)
}

fn measure(f: impl FnMut(usize)) -> Stats {
    measure_n(WARMUP, iterations(), f)
}

/// [`measure`] with `warmup` and `iterations` of its own (a Python event
/// costs milliseconds).
fn measure_n(warmup: usize, iterations: usize, mut f: impl FnMut(usize)) -> Stats {
    for i in 0..warmup {
        f(i);
    }
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let start = Instant::now();
        f(warmup + i);
        samples.push(start.elapsed().as_nanos() as f64 / 1000.0);
    }
    percentiles(samples)
}

fn percentiles(mut samples: Vec<f64>) -> Stats {
    samples.sort_by(|a, b| a.total_cmp(b));
    Stats {
        p50: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
    }
}

/// What `inventory` does for one order, natively: parse, validate, check
/// the dedupe key, decrement stock, serialise the reservation.
fn native_inventory(
    stock: &mut HashMap<String, i64>,
    seen: &mut HashMap<String, &'static str>,
    payload: &[u8],
) -> Vec<u8> {
    let v: Value = serde_json::from_slice(payload).expect("order JSON");
    let id = v["id"].clone();
    let item = v["item"].as_str().expect("item").to_owned();
    let quantity = v["quantity"].as_i64().expect("quantity");
    let key = format!("order.{id}");
    if seen.contains_key(&key) {
        return Vec::new();
    }
    let current = stock
        .entry(format!("stock.{item}"))
        .or_insert(1_000_000_000_000);
    *current -= quantity;
    seen.insert(key, "reserved");
    serde_json::to_vec(
        &json!({"order_id": id, "item": item, "quantity": quantity, "remaining": *current}),
    )
    .expect("serialise")
}

/// The handler config both runs share: inventory never runs out of stock.
const HANDLERS: &str = r#"
[handlers.inventory.config]
"stock.Laptop" = "1000000000000"
"#;

/// Engine tuning for small guests (the example guests use a 32 KiB shadow
/// stack, so their whole memory is 64 KiB): reset by memset, no
/// PAGEMAP_SCAN ioctl. See `RuntimeConfig` for the trade-off.
const SMALL_GUEST_TUNING: &str = "[runtime]\npagemap_scan = false\nkeep_resident_kb = 256\n";

fn delivery(payload: Vec<u8>) -> Delivery {
    Delivery {
        payload,
        exchange: "bench".into(),
        attempt: 1,
        ..Delivery::default()
    }
}

fn bench_noop(h: &support::Harness) -> Stats {
    let payload = br#"{"id": 1, "item": "Laptop", "quantity": 1}"#.to_vec();
    measure(|_| {
        let handled = h.send_delivery("noop", delivery(payload.clone()));
        assert_eq!(handled.outcome, Outcome::Ack);
    })
}

fn order(i: usize) -> Vec<u8> {
    format!(r#"{{"id": {i}, "item": "Laptop", "quantity": 1}}"#).into_bytes()
}

fn bench_inventory(h: &support::Harness) -> Stats {
    measure(|i| {
        let handled = h.send_delivery("inventory", delivery(order(i)));
        assert_eq!(handled.outcome, Outcome::Ack);
        assert_eq!(handled.published.len(), 1);
    })
}

/// Events per batch in the batched cases: the broker path's largest batch.
const BATCH: usize = 128;

/// The broker path's shape: batches of [`BATCH`] orders, each event
/// executed (in one instance for several events when the handler's config
/// allows it), its writes staged for the next, then the batch committed in
/// one transaction. Samples are µs per event of each batch.
fn bench_inventory_batches(h: &support::Harness) -> Stats {
    // Enough batches for a stable median (a batch is one sample).
    bench_inventory_batches_n(h, WARMUP / BATCH, (iterations() / 8).max(10))
}

/// [`bench_inventory_batches`] with `warmup` and `batches` of its own.
fn bench_inventory_batches_n(h: &support::Harness, warmup: usize, batches: usize) -> Stats {
    let handler = &h.handlers["inventory"];
    let state = h.dispatcher.state();
    let run = |b: usize| {
        let mut warm = Warm::default();
        let mut executions = Vec::with_capacity(BATCH);
        for i in b * BATCH..(b + 1) * BATCH {
            let execution = h
                .dispatcher
                .execute_in(handler, &delivery(order(i)), &mut warm)
                .expect("no host fault");
            if let Some(commit) = &execution.commit {
                state.stage("inventory", &commit.writes);
            }
            executions.push(execution);
        }
        drop(warm);
        let committed = h.dispatcher.commit("inventory", executions);
        state.end_batch("inventory");
        for c in committed.expect("commit") {
            assert!(matches!(c, Committed::Done(ref d) if d.outcome == Outcome::Ack));
        }
    };
    for b in 0..warmup {
        run(b);
    }
    let mut samples = Vec::with_capacity(batches);
    for b in 0..batches {
        let start = Instant::now();
        run(warmup + b);
        samples.push(start.elapsed().as_nanos() as f64 / 1000.0 / BATCH as f64);
    }
    percentiles(samples)
}

/// A harness running inventory with `events_per_instance` set.
fn reusing_harness(events_per_instance: &str) -> support::Harness {
    support::Harness::new(
        &["inventory"],
        &format!("[handlers.inventory]\nevents_per_instance = {events_per_instance}\n{HANDLERS}"),
    )
}

/// `--python FILE`: the Python build of inventory (`guests/inventory-py`,
/// componentize-py) beside the Rust one, in this process: file size,
/// first compile, load from the compiled-code cache, and the cost of an
/// event in a fresh instance and in one instance per batch.
fn bench_python(python: &str) {
    const EVENTS: usize = 300;
    const BATCHES: usize = 4;
    let cache = tempfile::tempdir().unwrap();
    let config_text = format!(
        "cache_dir = {:?}\n[handlers.inventory]\nevents_per_instance = {BATCH}\n{HANDLERS}",
        cache.path().to_str().unwrap()
    );
    let config = event_host::config::Config::parse(&config_text).unwrap();
    let runtime = event_host::runtime::Runtime::new(config.runtime.clone()).unwrap();
    let rust = support::guest("inventory");
    let rust = rust.to_str().unwrap();
    struct Row {
        bytes: u64,
        compile_s: f64,
        cached_ms: f64,
        fresh: Stats,
        reused: Stats,
    }
    let measure_one = |file: &str| {
        let path = std::path::Path::new(file);
        let bytes = std::fs::read(path).unwrap();
        let load = || {
            let start = Instant::now();
            event_host::handler::load_bytes(&runtime, &config, path, &bytes, Some(cache.path()))
                .expect("loads");
            let took = start.elapsed().as_secs_f64();
            // The cache is written in the background: done before the next.
            runtime.wait_for_cache_writes();
            took
        };
        let compile_s = load();
        let cached_ms = load() * 1000.0;
        // Both harnesses load from the cache just filled.
        let fresh_harness = support::Harness::new(
            &[file],
            &format!(
                "cache_dir = {:?}\n{HANDLERS}",
                cache.path().to_str().unwrap()
            ),
        );
        let fresh = measure_n(20, EVENTS, |i| {
            let handled = fresh_harness.send_delivery("inventory", delivery(order(i)));
            assert_eq!(handled.outcome, Outcome::Ack);
        });
        let reused =
            bench_inventory_batches_n(&support::Harness::new(&[file], &config_text), 1, BATCHES);
        Row {
            bytes: bytes.len() as u64,
            compile_s,
            cached_ms,
            fresh,
            reused,
        }
    };
    let (r, p) = (measure_one(rust), measure_one(python));
    println!("Python inventory (componentize-py) beside the Rust one, same process; {EVENTS} events in fresh instances, {BATCHES} batches of {BATCH} in one instance each");
    println!("{:<44} {:>12} {:>12} {:>8}", "", "Rust", "Python", "ratio");
    let line = |what: &str, a: f64, b: f64, unit: &str| {
        println!(
            "{what:<44} {:>12} {:>12} {:>7.0}x",
            format!("{a:.2} {unit}"),
            format!("{b:.2} {unit}"),
            b / a
        );
    };
    line(
        "component size",
        r.bytes as f64 / 1e6,
        p.bytes as f64 / 1e6,
        "MB",
    );
    line("first compile", r.compile_s, p.compile_s, "s");
    line(
        "load from the compiled-code cache",
        r.cached_ms,
        p.cached_ms,
        "ms",
    );
    line(
        "per event, fresh instance, p50",
        r.fresh.p50,
        p.fresh.p50,
        "µs",
    );
    line(
        "per event, fresh instance, p99",
        r.fresh.p99,
        p.fresh.p99,
        "µs",
    );
    line(
        "per event, one instance per batch, p50",
        r.reused.p50,
        p.reused.p50,
        "µs",
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--python") {
        let file = args
            .get(at + 1)
            .expect("--python FILE (guests/inventory-py/inventory-py.wasm)");
        bench_python(file);
        return;
    }
    let default = support::Harness::new(&["noop", "inventory"], HANDLERS);
    let tuned = support::Harness::new(
        &["noop", "inventory"],
        &format!("{SMALL_GUEST_TUNING}{HANDLERS}"),
    );

    if std::env::args().any(|a| a == "--noop-only") {
        let s = bench_noop(&default);
        println!("noop (wasm) p50 {:.2} µs p99 {:.2} µs", s.p50, s.p99);
        return;
    }

    if std::env::args().any(|a| a == "--batched-only") {
        // For profiling the broker path's dispatch share on its own.
        let reuse = std::env::var("BENCH_REUSE").unwrap_or_else(|_| BATCH.to_string());
        let s = bench_inventory_batches(&reusing_harness(&reuse));
        println!(
            "inventory batched, events_per_instance {reuse}: p50 {:.2} µs p99 {:.2} µs",
            s.p50, s.p99
        );
        return;
    }

    let noop = bench_noop(&default);
    let noop_tuned = bench_noop(&tuned);
    let inventory = bench_inventory(&default);
    let inventory_tuned = bench_inventory(&tuned);
    let batched = bench_inventory_batches(&default);
    let batched_reused = bench_inventory_batches(&reusing_harness(&BATCH.to_string()));
    let mut stock = HashMap::new();
    let mut seen = HashMap::new();
    let native = measure(|i| {
        let out = native_inventory(&mut stock, &mut seen, &order(i));
        std::hint::black_box(out);
    });

    println!(
        "dispatch benchmark: {} events each after {WARMUP} warm-up, fresh instance per event",
        iterations()
    );
    println!(
        "{:<44} {:>10} {:>10} {:>12}",
        "case", "p50 µs", "p99 µs", "p50 ratio"
    );
    let row = |name: &str, s: &Stats| {
        println!(
            "{name:<44} {:>10.2} {:>10.2} {:>11.1}x",
            s.p50,
            s.p99,
            s.p50 / native.p50
        );
    };
    row("native Rust inventory logic (baseline)", &native);
    row("noop, default engine config", &noop);
    row("noop, small-guest tuning", &noop_tuned);
    row("inventory, default engine config", &inventory);
    row("inventory, small-guest tuning", &inventory_tuned);
    row("inventory, batches of 128, fresh instances", &batched);
    row("inventory, batches of 128, one instance", &batched_reused);
    println!("(ratio = p50 / native baseline p50, same process; batched rows: µs per event of a");
    println!(" batch run and committed as the broker path does, events_per_instance 1 / {BATCH})");
}
