//! Per-event dispatch cost: event bytes in, outcome out, a fresh instance
//! per event, through the real dispatcher (state commit included, against
//! an in-memory SQLite so the figure is the dispatch path, not the disk).
//!
//! Run: `cargo bench -p event-host --bench dispatch`
//!
//! Prints p50/p99 in µs for the no-op handler and for `inventory`, beside a
//! native Rust function doing the same JSON work, and the ratio of each to
//! its native baseline measured in the same process.

#[path = "../../tests/e2e/support.rs"]
mod support;

use std::collections::HashMap;
use std::time::Instant;

use event_host::dispatch::{Delivery, Outcome};
use serde_json::{json, Value};

const WARMUP: usize = 2_000;
const ITERATIONS: usize = 20_000;

struct Stats {
    p50: f64,
    p99: f64,
}

fn measure(mut f: impl FnMut(usize)) -> Stats {
    for i in 0..WARMUP {
        f(i);
    }
    let mut samples = Vec::with_capacity(ITERATIONS);
    for i in 0..ITERATIONS {
        let start = Instant::now();
        f(WARMUP + i);
        samples.push(start.elapsed().as_nanos() as f64 / 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Stats {
        p50: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
    }
}

/// What `inventory` does for one order, natively: parse, validate, check
/// the dedupe key, decrement stock, serialise the reservation.
fn native_inventory(stock: &mut HashMap<String, i64>, seen: &mut HashMap<String, &'static str>, payload: &[u8]) -> Vec<u8> {
    let v: Value = serde_json::from_slice(payload).expect("order JSON");
    let id = v["id"].clone();
    let item = v["item"].as_str().expect("item").to_owned();
    let quantity = v["quantity"].as_i64().expect("quantity");
    let key = format!("order.{id}");
    if seen.contains_key(&key) {
        return Vec::new();
    }
    let current = stock.entry(format!("stock.{item}")).or_insert(1_000_000_000_000);
    *current -= quantity;
    seen.insert(key, "reserved");
    serde_json::to_vec(&json!({"order_id": id, "item": item, "quantity": quantity, "remaining": *current})).expect("serialise")
}

fn main() {
    let h = support::Harness::new(
        &["noop", "inventory"],
        r#"
        [handlers.inventory.config]
        "stock.Laptop" = "1000000000000"
        "#,
    );
    let delivery = |payload: Vec<u8>| Delivery {
        payload,
        exchange: "bench".into(),
        attempt: 1,
        ..Delivery::default()
    };

    let noop_payload = br#"{"id": 1, "item": "Laptop", "quantity": 1}"#.to_vec();
    let noop = measure(|_| {
        let handled = h.send_delivery("noop", delivery(noop_payload.clone()));
        assert_eq!(handled.outcome, Outcome::Ack);
    });
    let native_noop = measure(|_| {
        let d = delivery(noop_payload.clone());
        std::hint::black_box(&d);
    });

    let order = |i: usize| format!(r#"{{"id": {i}, "item": "Laptop", "quantity": 1}}"#).into_bytes();
    let inventory = measure(|i| {
        let handled = h.send_delivery("inventory", delivery(order(i)));
        assert_eq!(handled.outcome, Outcome::Ack);
        assert_eq!(handled.published.len(), 1);
    });
    let mut stock = HashMap::new();
    let mut seen = HashMap::new();
    let native = measure(|i| {
        let out = native_inventory(&mut stock, &mut seen, &order(i));
        std::hint::black_box(out);
    });

    println!("dispatch benchmark: {ITERATIONS} events each after {WARMUP} warm-up, fresh instance per event");
    println!("{:<28} {:>10} {:>10}", "case", "p50 µs", "p99 µs");
    for (name, s) in [
        ("noop (wasm)", &noop),
        ("noop (native baseline)", &native_noop),
        ("inventory (wasm)", &inventory),
        ("inventory (native baseline)", &native),
    ] {
        println!("{name:<28} {:>10.2} {:>10.2}", s.p50, s.p99);
    }
    println!("ratio inventory wasm/native p50: {:.1}x", inventory.p50 / native.p50);
    println!("ratio noop wasm/inventory native p50: {:.1}x", noop.p50 / native.p50);
}
