//! Broker throughput and latency, against the local RabbitMQ.
//!
//! Run: `cargo bench -p event-host --bench broker` (RabbitMQ on
//! `EVENT_HOST_AMQP_URL`, default local; `pip install pika`).
//! `BENCH_EVENTS` overrides the event count (default 200000).
//!
//! In one run, the same prefilled queue of order events is drained by:
//! - event-host with the `inventory` handler (fresh instance per event,
//!   state committed durably, reservations published with confirms);
//! - a plain lapin consumer doing the same JSON parse, same prefetch, acking
//!   with `multiple` every 30 messages;
//! - a Python pika consumer doing the same (scripts/bench_pika.py).
//!
//! Then publish-to-handled latency through event-host at a steady 50% of
//! the drain rate it just measured, and at a low steady 500 events/s.

#[path = "../../tests/e2e/support.rs"]
mod support;

#[path = "../../tests/e2e/amqp_support.rs"]
mod amqp_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_support::{unique, Client, TestHost};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;

const PREFETCH: u16 = 256;
const ACK_EVERY: u64 = 30;

fn events() -> usize {
    std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

fn order(i: usize) -> Vec<u8> {
    format!(r#"{{"id": {i}, "item": "Laptop", "quantity": 1}}"#).into_bytes()
}

/// Publish `n` orders to `exchange` with confirms, pipelined in windows.
fn prefill(client: &Client, exchange: &str, routing_key: &str, n: usize) {
    client.rt.block_on(async {
        let ch = client.conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for &i in chunk {
                confirms.push(
                    ch.basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        &order(i),
                        BasicProperties::default(),
                    )
                    .await
                    .unwrap(),
                );
            }
            for c in confirms {
                assert!(c.await.unwrap().is_ack());
            }
        }
    });
}

fn declare_queue(client: &Client, queue: &str) {
    client.rt.block_on(async {
        client
            .ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    });
}

/// The plain lapin consumer: parse, ack multiple every ACK_EVERY.
fn lapin_drain(client: &Client, queue: &str, n: usize) -> f64 {
    client.rt.block_on(async {
        let ch = client.conn.create_channel().await.unwrap();
        ch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut start = None;
        let mut seen = 0usize;
        while let Some(Ok(d)) = consumer.next().await {
            start.get_or_insert_with(Instant::now);
            let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            assert!(v["quantity"].as_i64().unwrap() > 0);
            seen += 1;
            if (seen as u64).is_multiple_of(ACK_EVERY) || seen == n {
                ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                    .await
                    .unwrap();
            }
            if seen == n {
                break;
            }
        }
        n as f64 / start.unwrap().elapsed().as_secs_f64()
    })
}

fn pika_drain(queue: &str, n: usize) -> f64 {
    let out = std::process::Command::new("python3")
        .arg(support::repo_root().join("scripts/bench_pika.py"))
        .args([
            queue,
            &n.to_string(),
            &PREFETCH.to_string(),
            &ACK_EVERY.to_string(),
        ])
        .output()
        .expect("python3 with pika (pip install pika)");
    assert!(
        out.status.success(),
        "pika bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("pika_events_per_sec=")
        .and_then(|v| v.parse().ok())
        .expect("pika rate")
}

/// Consume `count` reservations from `queue` on a connection of its own,
/// noting when each order id arrived (60 s at most).
fn receive_reservations(
    queue: String,
    count: usize,
) -> std::thread::JoinHandle<Vec<(usize, Instant)>> {
    let got = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let sink = got.clone();
    let consumer = amqp_support::consume_in_thread(
        queue,
        Arc::default(),
        Duration::from_secs(60),
        move |d, at| {
            let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            let mut got = sink.lock().unwrap();
            got.push((v["order_id"].as_u64().unwrap() as usize, at));
            got.len() < count
        },
    );
    std::thread::spawn(move || {
        consumer.join().unwrap();
        std::mem::take(&mut *got.lock().unwrap())
    })
}

fn main() {
    // Inventory logs every reservation at info; a log line per event on
    // stderr would measure the terminal, not the host. Operators who want
    // speed run at warn too.
    if std::env::var_os("EVENT_HOST_TEST_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("EVENT_HOST_TEST_LOG", "warn") };
    }
    let n = events();
    let mut client = Client::connect();
    let orders = unique("bench-orders");
    let out = unique("bench-inventory-events");
    let host_queue = unique("bench-inventory");
    let (lapin_q, pika_q) = (unique("bench-lapin"), unique("bench-pika"));
    // Named (not exclusive) so the latency receiver can consume it from a
    // connection of its own; the cleanup deletes it.
    let probe = unique("bench-probe");
    client.cleanup_handler(&host_queue, 1000, &[&orders, &out]);
    client.cleanup(&[&lapin_q, &pika_q, &probe], &[]);
    client.rt.block_on(async {
        for (name, kind) in [
            (&orders, lapin::ExchangeKind::Fanout),
            (&out, lapin::ExchangeKind::Topic),
        ] {
            client
                .ch
                .exchange_declare(
                    name.as_str().into(),
                    kind,
                    Default::default(),
                    Default::default(),
                )
                .await
                .unwrap();
        }
    });
    let config = format!(
        r#"
[handlers.inventory]
queue = "{host_queue}"
prefetch = {PREFETCH}
subscriptions = [{{ exchange = "{orders}", kind = "fanout" }}]
[handlers.inventory.config]
"stock.Laptop" = "1000000000000"
"inventory-exchange" = "{out}"
"#
    );

    // event-host: start once to declare its topology, stop, prefill, restart, time the drain.
    TestHost::start(&["inventory"], &config).stop().unwrap();
    prefill(&client, &orders, "", n);
    let host = TestHost::start(&["inventory"], &config);
    let started = Instant::now();
    host.wait_counter("inventory", "acked", n as u64);
    let host_rate = n as f64 / started.elapsed().as_secs_f64();
    host.stop().unwrap();

    declare_queue(&client, &lapin_q);
    prefill(&client, "", &lapin_q, n);
    let lapin_rate = lapin_drain(&client, &lapin_q, n);

    declare_queue(&client, &pika_q);
    prefill(&client, "", &pika_q, n);
    let pika_rate = pika_drain(&pika_q, n);

    // Latency at 50% of the host's drain rate: publish at a steady pace,
    // read the reservations inventory publishes, match by order id.
    let host = TestHost::start(&["inventory"], &config);
    declare_queue(&client, &probe);
    client.rt.block_on(async {
        client
            .ch
            .queue_bind(
                probe.as_str().into(),
                out.as_str().into(),
                "inventory.reserved".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    });
    let half = latency(&client, &orders, &probe, host_rate / 2.0, 10.0, 10_000_000);
    let low = latency(&client, &orders, &probe, 500.0, 5.0, 20_000_000);
    host.stop().unwrap();

    println!(
        "broker benchmark: {n} order events drained from a prefilled queue, prefetch {PREFETCH}"
    );
    println!("{:<52} {:>12} {:>12}", "consumer", "events/s", "ratio");
    println!(
        "{:<52} {:>12.0} {:>12}",
        "event-host + inventory (Wasm, durable state, confirms)", host_rate, ""
    );
    println!(
        "{:<52} {:>12.0} {:>11.2}x",
        "plain lapin (JSON parse, multiple ack every 30)",
        lapin_rate,
        host_rate / lapin_rate
    );
    println!(
        "{:<52} {:>12.0} {:>11.2}x",
        "python pika (same)",
        pika_rate,
        host_rate / pika_rate
    );
    println!("(ratio = event-host rate / that consumer's rate, same run)");
    for ((rate, latencies), what) in [(half, "50% of drain rate"), (low, "a low, steady rate")] {
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        println!(
            "latency publish -> reservation received at {rate:.0} events/s ({what}), {} events: p50 {:.1} ms, p99 {:.1} ms",
            latencies.len(),
            pct(0.50),
            pct(0.99)
        );
    }
}

/// Publish at a steady `rate` for `seconds`, read the reservations
/// inventory publishes to `probe`, match them by order id: (rate, sorted
/// latencies in ms).
fn latency(
    client: &Client,
    orders: &str,
    probe: &str,
    rate: f64,
    seconds: f64,
    base: usize,
) -> (f64, Vec<f64>) {
    let count = (rate * seconds) as usize;
    let mut sent = HashMap::with_capacity(count);
    let receiver = receive_reservations(probe.to_owned(), count);
    let start = Instant::now();
    for k in 0..count {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        sent.insert(base + k, Instant::now());
        client.publish(orders, "", &order(base + k), BasicProperties::default());
    }
    let received = receiver.join().expect("receiver thread");
    let mut latencies: Vec<f64> = received
        .iter()
        .filter_map(|(id, at)| {
            sent.get(id)
                .map(|t| at.duration_since(*t).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    (rate, latencies)
}
