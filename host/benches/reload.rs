//! Hot-reload latency and the throughput dip during swaps, against the
//! local RabbitMQ.
//!
//! Run: `cargo bench -p event-host --bench reload` (`RELOADS` changes the
//! number of reloads per case, default 20).
//!
//! Latency is from the `rename` of a new `inventory.wasm` into the folder
//! to the first reservation stamped with the new version's sha256 reaching
//! a plain consumer, while orders flow at a steady 500/s: it includes the
//! watcher's debounce, compiling (or the compiled-code cache), the swap and
//! one event's trip through the broker. Uncached: every file is new.
//! Cached: two files compiled once, alternated.
//!
//! The dip: the same prefilled queue drained untouched, with a swap every
//! second (a busy deploy day) and every 100 ms (a stress case), as ratios
//! to the untouched rate.

#[path = "../../tests/e2e/support.rs"]
mod support;

#[path = "../../tests/e2e/amqp_support.rs"]
mod amqp_support;

// amqp_support puts hosts on the suite's state backend.
#[path = "../../tests/e2e/backend.rs"]
mod backend;

#[path = "../../tests/e2e/pg_support.rs"]
mod pg_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_support::{declare_topic, Client, Inventory, TestHost};
use event_host::handler::sha256_hex;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use support::{install, variant};

type FirstSeen = Arc<Mutex<HashMap<String, Instant>>>;

fn order(id: usize) -> Vec<u8> {
    format!(r#"{{"id": {id}, "item": "Laptop", "quantity": 1}}"#).into_bytes()
}

/// Consume `queue` on a connection of its own, noting when each version
/// header is first seen.
fn watch_versions(
    queue: String,
    seen: FirstSeen,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    amqp_support::consume_in_thread(queue, done, Duration::from_secs(3600), move |d, at| {
        let version = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-event-host-version").cloned());
        if let Some(AMQPValue::LongString(v)) = version {
            seen.lock().unwrap().entry(v.to_string()).or_insert(at);
        }
        true
    })
}

/// Publish an order every 2 ms until `done`.
fn steady_orders(exchange: String, done: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let client = Client::connect();
        let mut id = 0;
        while !done.load(Ordering::Relaxed) {
            client.publish(&exchange, "", &order(id), BasicProperties::default());
            id += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

/// Install `bytes` and time until its version's first output.
fn reload(host: &TestHost, bytes: &[u8], seen: &FirstSeen) -> f64 {
    let sha = sha256_hex(bytes);
    seen.lock().unwrap().remove(&sha);
    let start = Instant::now();
    install(&host.handlers_dir(), "inventory.wasm", bytes);
    let deadline = start + Duration::from_secs(30);
    loop {
        if let Some(at) = seen.lock().unwrap().get(&sha) {
            return at.duration_since(start).as_secs_f64() * 1000.0;
        }
        assert!(Instant::now() < deadline, "version {sha} never served");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.50), at(0.95))
}

/// Drain `n` orders prefilled while the handler file was out of the
/// folder (its events wait in the queue), from the moment `current` is
/// back; with `swap`, alternate the two files at that interval meanwhile.
/// Returns events/s.
fn drain(
    host: &TestHost,
    client: &Client,
    inv: &Inventory,
    n: usize,
    current: &[u8],
    swap: Option<(&[u8], &[u8], Duration)>,
    base: usize,
) -> f64 {
    let file = host.handlers_dir().join("inventory.wasm");
    std::fs::remove_file(&file).unwrap();
    host.wait_handler("inventory", |h| h["status"] == "removed", "removal");
    let before = host.counters("inventory")["acked"].as_u64().unwrap_or(0);
    for i in 0..n {
        client.publish(
            &inv.orders,
            "",
            &order(base + i),
            BasicProperties::default(),
        );
    }
    let start = Instant::now();
    install(&host.handlers_dir(), "inventory.wasm", current);
    let mut k = 0;
    let mut last_swap = Instant::now();
    loop {
        let acked = host.counters("inventory")["acked"].as_u64().unwrap_or(0);
        if acked >= before + n as u64 {
            break;
        }
        if let Some((a, b, every)) = swap {
            if last_swap.elapsed() >= every {
                install(
                    &host.handlers_dir(),
                    "inventory.wasm",
                    if k % 2 == 0 { a } else { b },
                );
                k += 1;
                last_swap = Instant::now();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if std::env::var_os("EVENT_HOST_TEST_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("EVENT_HOST_TEST_LOG", "warn") };
    }
    let reloads: usize = std::env::var("RELOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    declare_topic(&client, &inv.events);
    let probe = amqp_support::unique("reload-probe");
    client.cleanup(&[&probe], &[]);
    client.rt.block_on(async {
        client
            .ch
            .queue_declare(
                probe.as_str().into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        client
            .ch
            .queue_bind(
                probe.as_str().into(),
                inv.events.as_str().into(),
                "inventory.reserved".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    });
    let host = TestHost::start(&["inventory"], &inv.config_with_stock("", 1_000_000_000));
    let seen: FirstSeen = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = watch_versions(probe.clone(), seen.clone(), done.clone());
    let producer = steady_orders(inv.orders.clone(), done.clone());

    // Uncached: a new file every time.
    let mut uncached = Vec::new();
    for k in 0..reloads {
        uncached.push(reload(
            &host,
            &variant("inventory", &format!("new-{k}")),
            &seen,
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Cached: two files the host has compiled before, alternated.
    let (a, b) = (variant("inventory", "new-0"), variant("inventory", "new-1"));
    let mut cached = Vec::new();
    for k in 0..reloads {
        cached.push(reload(&host, if k % 2 == 0 { &a } else { &b }, &seen));
        std::thread::sleep(Duration::from_millis(100));
    }
    done.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    watcher.join().unwrap();

    // The dip.
    // The cached loop ended on `b` when `reloads` is even, else on `a`.
    let current = if reloads.is_multiple_of(2) { &b } else { &a };
    let other = if reloads.is_multiple_of(2) { &a } else { &b };
    let n = 50_000;
    let steady = drain(&host, &client, &inv, n, current, None, 1 << 40);
    let mut swapping = Vec::new();
    for (k, every) in [Duration::from_secs(1), Duration::from_millis(100)]
        .into_iter()
        .enumerate()
    {
        let rate = drain(
            &host,
            &client,
            &inv,
            n,
            current,
            Some((other, current, every)),
            (k + 2) << 40,
        );
        swapping.push((every, rate));
    }
    host.stop().unwrap();

    let (u50, u95) = percentiles(uncached);
    let (c50, c95) = percentiles(cached);
    println!("reload latency, rename -> first event handled by the new version ({reloads} reloads each, orders at 500/s)");
    println!("{:<40} {:>10} {:>10}", "case", "p50 ms", "p95 ms");
    println!("{:<40} {:>10.1} {:>10.1}", "new file (compiled)", u50, u95);
    println!(
        "{:<40} {:>10.1} {:>10.1}",
        "known file (compiled-code cache)", c50, c95
    );
    println!("throughput draining {n} orders: steady {steady:.0} ev/s");
    for (every, rate) in swapping {
        println!(
            "  swapping every {every:?}: {rate:.0} ev/s, ratio {:.2}x",
            rate / steady
        );
    }
}
