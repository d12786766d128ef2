//! Broker throughput and latency, against the local RabbitMQ.
//!
//! Run: `cargo bench -p event-host --bench broker` (RabbitMQ on
//! `EVENT_HOST_AMQP_URL`, default local; `pip install pika`).
//! `BENCH_EVENTS` overrides the event count (default 200000),
//! `BENCH_ROUNDS` the number of rounds (default 3: every consumer drains
//! once a round, ratios are taken within a round, medians printed);
//! `BENCH_HOST_ONLY=1` runs only the event-host drains (for profiling: the
//! line "draining through event-host" on stderr marks each drain's start);
//! `BENCH_TRACING=1` runs only the tracing overhead comparison (see
//! `tracing_overhead`).
//!
//! In one run, the same number of prefilled order events is drained by:
//! - event-host with the `inventory` handler (state committed durably in
//!   batches, publishes confirmed before the ack), three ways: as
//!   `examples/config.toml` runs it (one instance per batch, a reservation
//!   published per order); with stock updates only (no per-order publish:
//!   the same work as the two baselines, consume-parse-update-ack); and
//!   that again with a fresh instance per event (the engine's default);
//! - a plain lapin consumer doing the same JSON parse, same prefetch, acking
//!   with `multiple` every 30 messages;
//! - a Python pika consumer doing the same (scripts/bench_pika.py);
//! - the plain lapin consumer again, also publishing a persistent
//!   reservation per order and acking a window only after its publishes
//!   are confirmed: the example deployment's work, hand-written.
//!
//! Then, through the example deployment with this process publishing: the
//! most a live stream sustains end to end (publishing as fast as one
//! publisher can; the publisher shares the cores), and publish-to-handled
//! latency at a steady 50% of that and at a low steady 500 events/s.
//!
//! Beside each rate it prints the CPU each drain cost per event, read from
//! `/proc`: the consumer's own (this process for event-host and lapin, the
//! Python child for pika) and the broker's (the local `beam.smp`). On a
//! machine where consumer and broker share the cores, their sum is what
//! bounds the rate.

#[path = "../../tests/e2e/support.rs"]
mod support;

#[path = "../../tests/e2e/amqp_support.rs"]
mod amqp_support;

// amqp_support puts hosts on the suite's state backend.
#[path = "../../tests/e2e/backend.rs"]
mod backend;

#[path = "../../tests/e2e/pg_support.rs"]
mod pg_support;

#[path = "../../tests/e2e/otlp_support.rs"]
mod otlp_support;

mod drain;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_support::{unique, Client, TestHost};
use drain::{
    declare_queue, events, lapin_drain, median, median_of, order, prefill, rounds, Cpu, Drain,
    Servers, Work, ACK_EVERY, PREFETCH,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;

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

/// One way of running the host in the drain.
struct HostVariant {
    what: &'static str,
    events_per_instance: u32,
    /// inventory's `announce-reservations`.
    announce: bool,
}

/// The drains the host runs, in order; the first is also the one whose
/// latency is measured.
const HOST_VARIANTS: [HostVariant; 3] = [
    HostVariant {
        what: "event-host + inventory, as examples/config.toml",
        events_per_instance: 128,
        announce: true,
    },
    HostVariant {
        what: "event-host + inventory, stock only (no per-order publish)",
        events_per_instance: 128,
        announce: false,
    },
    HostVariant {
        what: "event-host + inventory, stock only, fresh instance per event",
        events_per_instance: 1,
        announce: false,
    },
];

fn main() {
    if std::env::var_os("BENCH_OTLP_RECEIVER").is_some() {
        // The tracing comparison's collector, in a process of its own (see
        // `tracing_overhead`): its URL on stdout, then serve until killed.
        let receiver = otlp_support::Receiver::counting();
        println!("{}", receiver.url);
        loop {
            std::thread::park();
        }
    }
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
    let lapin_pub_q = unique("bench-lapin-publishing");
    // Named (not exclusive) so the latency receiver can consume it from a
    // connection of its own; the cleanup deletes it.
    let probe = unique("bench-probe");
    client.cleanup_handler(&host_queue, 1000, &[&orders, &out]);
    client.cleanup(&[&lapin_q, &pika_q, &lapin_pub_q, &probe], &[]);
    drain::declare_order_exchanges(&client, &orders, &out);
    let config = |variant: &HostVariant| {
        format!(
            r#"
[handlers.inventory]
queue = "{host_queue}"
prefetch = {PREFETCH}
events_per_instance = {}
subscriptions = [{{ exchange = "{orders}", kind = "fanout" }}]
publishes_to = [{{ exchange = "{out}", kind = "topic" }}]
[handlers.inventory.config]
"stock.Laptop" = "1000000000000"
"inventory-exchange" = "{out}"
"announce-reservations" = "{}"
"#,
            variant.events_per_instance, variant.announce
        )
    };

    // Only the broker: this benchmark's state is embedded.
    let broker = Servers {
        postgres: None,
        ..Servers::find()
    };

    // event-host: start once to declare its topology; then, per round,
    // each host variant and each baseline drains the same prefilled count.
    TestHost::start(&["inventory"], &config(&HOST_VARIANTS[0]))
        .stop()
        .unwrap();
    let rounds = rounds();
    if std::env::var_os("BENCH_TRACING").is_some() {
        let example = config(&HOST_VARIANTS[0]);
        tracing_overhead(&client, &orders, n, rounds, broker, &example);
        return;
    }
    let only_host = std::env::var_os("BENCH_HOST_ONLY").is_some();
    // Per consumer (host variants, then lapin, pika, and lapin publishing
    // like the example deployment): one drain a round.
    let mut drains: Vec<Vec<Drain>> = (0..HOST_VARIANTS.len() + 3).map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, variant) in HOST_VARIANTS.iter().enumerate() {
            let drain =
                drain_through_host(&client, &orders, n, broker, &config(variant), variant.what);
            drains[i].push(drain);
        }
        if only_host {
            continue;
        }
        // Each baseline drains a queue of its own, prefilled the same way.
        let mut baseline = |index: usize, queue: &str, child: bool, drain: &dyn Fn() -> f64| {
            declare_queue(&client, queue);
            prefill(&client, "", queue, n);
            let cpu = Cpu::now(broker);
            let rate = drain();
            drains[index].push(Drain::new(rate, cpu, Cpu::now(broker), n, child));
        };
        let first = HOST_VARIANTS.len();
        baseline(first, &lapin_q, false, &|| {
            lapin_drain(&client, &lapin_q, n, Work::Parse)
        });
        baseline(first + 1, &pika_q, true, &|| pika_drain(&pika_q, n));
        baseline(first + 2, &lapin_pub_q, false, &|| {
            lapin_drain(&client, &lapin_pub_q, n, Work::Announce(&out))
        });
        let rates: Vec<String> = drains
            .iter()
            .map(|d| format!("{:.0}", d[round - 1].rate))
            .collect();
        eprintln!("round {round}/{rounds}: events/s {}", rates.join(" / "));
    }
    if only_host {
        for (variant, runs) in HOST_VARIANTS.iter().zip(&drains) {
            for d in runs {
                println!(
                    "{:<62} {:>8.0} events/s, own CPU {:.1} µs/ev, broker {} µs/ev",
                    variant.what,
                    d.rate,
                    d.own,
                    d.broker.map_or("-".into(), |b| format!("{b:.1}"))
                );
            }
        }
        return;
    }
    let example_rate = median(drains[0].iter().map(|d| d.rate));

    // Latency at 50% of the example deployment's drain rate: publish at a
    // steady pace, read the reservations inventory publishes, match by
    // order id.
    let host = TestHost::start(&["inventory"], &config(&HOST_VARIANTS[0]));
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
    // The most a live stream sustains end to end — this process
    // publishing as fast as it can while the host consumes and publishes
    // reservations — is lower than a prefilled drain: the publisher and
    // the broker's work for it share the two cores. Latency is measured at
    // half of that, and at a low steady rate.
    let flood = (example_rate * 5.0) as usize;
    let (_, span) = latency(&client, &orders, &probe, None, flood, 10_000_000);
    let live_rate = flood as f64 / span.as_secs_f64();
    let steady = (live_rate * 5.0) as usize;
    let half = (
        live_rate / 2.0,
        latency(
            &client,
            &orders,
            &probe,
            Some(live_rate / 2.0),
            steady,
            20_000_000,
        )
        .0,
    );
    let low = (
        500.0,
        latency(&client, &orders, &probe, Some(500.0), 2500, 30_000_000).0,
    );
    host.stop().unwrap();

    println!(
        "broker benchmark: {n} order events drained from a prefilled queue, prefetch {PREFETCH}, {rounds} rounds"
    );
    println!(
        "{:<62} {:>9} {:>8} {:>7} {:>11} {:>14} {:>12}",
        "consumer (medians over the rounds)",
        "events/s",
        "x lapin",
        "x pika",
        "x same work",
        "own CPU µs/ev",
        "broker µs/ev"
    );
    let (lapin, pika, lapin_publishing) = (
        &drains[HOST_VARIANTS.len()],
        &drains[HOST_VARIANTS.len() + 1],
        &drains[HOST_VARIANTS.len() + 2],
    );
    // Each round's ratio is taken within the round (drains minutes apart
    // on a shared machine differ more than drains seconds apart), then the
    // median of those.
    let ratio = |runs: &[Drain], base: &[Drain]| {
        median(runs.iter().zip(base).map(|(r, b)| r.rate / b.rate))
    };
    let names = HOST_VARIANTS.iter().map(|v| v.what).chain([
        "plain lapin (JSON parse, multiple ack every 30)",
        "python pika (same)",
        "plain lapin, + a confirmed reservation published per order",
    ]);
    for (i, (what, runs)) in names.zip(&drains).enumerate() {
        let (x_lapin, x_pika, x_same) = match HOST_VARIANTS.get(i) {
            Some(variant) => {
                // The lapin consumer that does this variant's work.
                let same = if variant.announce {
                    lapin_publishing
                } else {
                    lapin
                };
                (
                    format!("{:.2}x", ratio(runs, lapin)),
                    format!("{:.2}x", ratio(runs, pika)),
                    format!("{:.2}x", ratio(runs, same)),
                )
            }
            None => Default::default(),
        };
        let broker_cpu = median_of(runs, |d| d.broker);
        println!(
            "{what:<62} {:>9.0} {x_lapin:>8} {x_pika:>7} {x_same:>11} {:>14.1} {broker_cpu:>12}",
            median(runs.iter().map(|d| d.rate)),
            median(runs.iter().map(|d| d.own)),
        );
    }
    println!("(x lapin, x pika = event-host rate / that baseline's rate in the same round; x same work = against the lapin consumer doing that row's work, publishes included; CPU per event drained, from /proc)");
    println!(
        "live stream, one publisher as fast as it can, the example deployment consuming: {live_rate:.0} events/s end to end ({:.2}x its prefilled drain)",
        live_rate / example_rate
    );
    for ((rate, latencies), what) in [
        (half, "50% of the live maximum"),
        (low, "a low, steady rate"),
    ] {
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        println!(
            "latency publish -> reservation received at {rate:.0} events/s ({what}, example deployment), {} events: p50 {:.1} ms, p99 {:.1} ms",
            latencies.len(),
            pct(0.50),
            pct(0.99)
        );
    }
}

/// Prefill `n` orders, then drain them through a host running inventory
/// with `config`, and stop it: the drain's rate (timed from when the host
/// is ready) and CPU (from before it starts).
fn drain_through_host(
    client: &Client,
    orders: &str,
    n: usize,
    broker: Servers,
    config: &str,
    what: &str,
) -> Drain {
    prefill(client, orders, "", n);
    let cpu = Cpu::now(broker);
    let host = TestHost::start(&["inventory"], config);
    // The consumer starts before the host reports ready: time what is
    // left of the queue from here. (Profilers wait for this line.)
    let (before, started) = (host.counter("inventory", "acked"), Instant::now());
    eprintln!("draining through event-host: {what}");
    host.wait_counter("inventory", "acked", n as u64);
    let rate = (n as u64 - before) as f64 / started.elapsed().as_secs_f64();
    let drain = Drain::new(rate, cpu, Cpu::now(broker), n, false);
    host.stop().unwrap();
    drain
}

/// A collector for the tracing comparison: this benchmark run again as a
/// process of its own (`BENCH_OTLP_RECEIVER`), decoding and counting what
/// it is sent, so its CPU is not counted as the host's — but it shares the
/// cores, as a collector on the same node does.
struct Collector {
    child: std::process::Child,
    url: String,
}

impl Collector {
    fn start() -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env("BENCH_OTLP_RECEIVER", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting the OTLP receiver");
        let mut url = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut url)
            .unwrap();
        Self {
            child,
            url: url.trim().to_owned(),
        }
    }

    /// Spans received so far.
    fn received(&self) -> u64 {
        let addr = self.url.trim_start_matches("http://");
        amqp_support::http_get(addr, "/count")
            .1
            .trim()
            .parse()
            .unwrap()
    }

    /// Its CPU seconds so far.
    fn cpu(&self) -> f64 {
        drain::proc_cpu(&self.child.id().to_string()).map_or(0.0, |(own, _)| own)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `BENCH_TRACING=1`: what tracing costs the example deployment. Each
/// round drains the same prefilled count three ways — trace context off
/// (`trace_context = false`), on (the default: a span per event, stamped
/// on what it publishes, named in log lines; nothing exported), and every
/// span exported over OTLP to a collector on this machine (see
/// [`Collector`]), and that with 10% of (new) traces sampled — and takes
/// each rate against the off drain of the same round. The order of the
/// ways turns by one each round (run 4 rounds to give each way each
/// place).
fn tracing_overhead(
    client: &Client,
    orders: &str,
    n: usize,
    rounds: usize,
    broker: Servers,
    example: &str,
) {
    let receiver = Collector::start();
    // BENCH_TRACING_WAYS=1,3 runs only those (0-based), for profiling one.
    let only: Option<Vec<usize>> = std::env::var("BENCH_TRACING_WAYS")
        .ok()
        .map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    let selected = |i: usize| only.as_ref().is_none_or(|o| o.contains(&i));
    let ways = [
        (
            "tracing off (trace_context = false)",
            "trace_context = false\n".to_owned(),
        ),
        ("tracing on, no exporter (the default)", String::new()),
        (
            "tracing on, every span exported over OTLP",
            format!("otlp_endpoint = {:?}\n", receiver.url),
        ),
        (
            "tracing on, OTLP, 10% of traces sampled",
            format!(
                "otlp_endpoint = {:?}\ntrace_sample_ratio = 0.1\n",
                receiver.url
            ),
        ),
    ];
    let mut drains: Vec<Vec<Drain>> = ways.iter().map(|_| Vec::new()).collect();
    let mut exported: Vec<Vec<u64>> = ways.iter().map(|_| Vec::new()).collect();
    let mut collector_cpu: Vec<Vec<f64>> = ways.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        // Each round starts one way further on: no way always drains first
        // (a fresh broker) or last.
        for j in 0..ways.len() {
            let i = (j + round - 1) % ways.len();
            let (what, top) = &ways[i];
            if !selected(i) {
                continue;
            }
            let (before_spans, before_cpu) = (receiver.received(), receiver.cpu());
            let config = format!("{top}{example}");
            drains[i].push(drain_through_host(client, orders, n, broker, &config, what));
            // The host stopped, which flushes the exporter: every span is
            // in by now.
            if top.starts_with("otlp") {
                exported[i].push(receiver.received() - before_spans);
                collector_cpu[i].push((receiver.cpu() - before_cpu) * 1e6 / n as f64);
            }
        }
        let rates: Vec<String> = drains
            .iter()
            .map(|d| {
                d.get(round - 1)
                    .map_or("-".into(), |d| format!("{:.0}", d.rate))
            })
            .collect();
        eprintln!("round {round}/{rounds}: events/s {}", rates.join(" / "));
    }
    println!(
        "tracing overhead: {n} order events drained from a prefilled queue by the example deployment, prefetch {PREFETCH}, {rounds} rounds"
    );
    println!(
        "{:<48} {:>9} {:>13} {:>14} {:>12}",
        "tracing (medians over the rounds)",
        "events/s",
        "x tracing off",
        "own CPU µs/ev",
        "broker µs/ev"
    );
    for ((what, _), runs) in ways.iter().zip(&drains) {
        let x_off = median(runs.iter().zip(&drains[0]).map(|(r, b)| r.rate / b.rate));
        println!(
            "{what:<48} {:>9.0} {:>12.2}x {:>14.1} {:>12}",
            median(runs.iter().map(|d| d.rate)),
            x_off,
            median(runs.iter().map(|d| d.own)),
            median_of(runs, |d| d.broker),
        );
    }
    for (i, (what, _)) in ways.iter().enumerate() {
        if exported[i].is_empty() {
            continue;
        }
        println!(
            "{what}: spans the collector got per drain {:?} (of {n} events each); its CPU µs/ev {:.1} (median)",
            exported[i],
            median(collector_cpu[i].iter().copied())
        );
    }
}

/// Publish `count` orders at a steady `rate` (as fast as the publisher
/// can, with `None`), read the reservations inventory publishes to
/// `probe`, match them by order id: (sorted latencies in ms, the time from
/// the first publish to the last reservation received).
fn latency(
    client: &Client,
    orders: &str,
    probe: &str,
    rate: Option<f64>,
    count: usize,
    base: usize,
) -> (Vec<f64>, Duration) {
    let mut sent = HashMap::with_capacity(count);
    let receiver = receive_reservations(probe.to_owned(), count);
    let start = Instant::now();
    for k in 0..count {
        if let Some(rate) = rate {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        sent.insert(base + k, Instant::now());
        client.publish(orders, "", &order(base + k), BasicProperties::default());
    }
    let received = receiver.join().expect("receiver thread");
    let span = received
        .iter()
        .map(|(_, at)| at.duration_since(start))
        .max()
        .unwrap_or_default();
    let mut latencies: Vec<f64> = received
        .iter()
        .filter_map(|(id, at)| {
            sent.get(id)
                .map(|t| at.duration_since(*t).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    (latencies, span)
}
