#![allow(dead_code)] // the broker and fleet benchmarks each use a subset

//! What the broker and fleet benchmarks share: the order events, a
//! prefilled queue, the plain lapin consumer they are compared with, and
//! CPU per event read from `/proc` — this process's, the broker's
//! (`beam.smp`) and the PostgreSQL server's.

use std::time::Instant;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use crate::amqp_support::Client;

pub const PREFETCH: u16 = 256;
pub const ACK_EVERY: u64 = 30;

/// `BENCH_EVENTS` overrides how many events each drain takes (default
/// 200 000).
pub fn events() -> usize {
    std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// `BENCH_ROUNDS` overrides how many times every consumer drains (default 3).
pub fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1)
}

pub fn order(i: usize) -> Vec<u8> {
    format!(r#"{{"id": {i}, "item": "Laptop", "quantity": 1}}"#).into_bytes()
}

/// Publish `n` orders to `exchange` with confirms, pipelined in windows.
pub fn prefill(client: &Client, exchange: &str, routing_key: &str, n: usize) {
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
        let _ = ch.close(200, "prefilled".into()).await;
    });
}

/// The example deployment's two exchanges: `orders` (fanout, where orders
/// come in) and inventory's topic `out`.
pub fn declare_order_exchanges(client: &Client, orders: &str, out: &str) {
    client.rt.block_on(async {
        for (name, kind) in [
            (orders, lapin::ExchangeKind::Fanout),
            (out, lapin::ExchangeKind::Topic),
        ] {
            client
                .ch
                .exchange_declare(name.into(), kind, Default::default(), Default::default())
                .await
                .unwrap();
        }
    });
}

pub fn declare_queue(client: &Client, queue: &str) {
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

/// What the plain lapin consumer does with each order beside parsing it.
#[derive(Clone, Copy)]
pub enum Work<'a> {
    /// Nothing more: parse and ack.
    Parse,
    /// What the example deployment does per order: publish a persistent
    /// JSON reservation with a message id to this exchange, and ack a
    /// window only once the broker has confirmed its publishes — windows
    /// pipelined two deep, so it does not stall a round trip per window.
    Announce(&'a str),
    /// What inventory does with stock updates only, written by hand as a
    /// service without event-host would: skip an order already recorded,
    /// decrement the item's stock, record the order — in an SQLite file
    /// with the host's table, pragmas and writes ([`HandState`]), one
    /// transaction per ack window, committed before the ack.
    Sqlite,
}

/// Inventory's state kept by hand for [`Work::Sqlite`]: the embedded
/// store's `kv` table and pragmas (WAL, `synchronous=NORMAL`, exclusive
/// lock), statements prepared once, the seed stock read from SQLite like
/// any other value.
pub struct HandState {
    conn: rusqlite::Connection,
    _dir: tempfile::TempDir,
}

impl HandState {
    const NS: &'static str = "inventory";

    pub fn open() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conn = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
        conn.execute_batch(
            "CREATE TABLE kv (ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                 PRIMARY KEY (ns, key)) WITHOUT ROWID;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO kv (ns, key, value) VALUES (?1, 'stock.Laptop', ?2)",
            rusqlite::params![Self::NS, b"1000000000000".as_slice()],
        )
        .unwrap();
        HandState { conn, _dir: dir }
    }

    /// Reserve one order inside the open transaction.
    fn reserve(&self, order: &serde_json::Value, quantity: i64) {
        let read = |key: &str| -> Option<Vec<u8>> {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT value FROM kv WHERE ns = ?1 AND key = ?2")
                .unwrap();
            let mut rows = stmt.query(rusqlite::params![Self::NS, key]).unwrap();
            rows.next().unwrap().map(|r| r.get(0).unwrap())
        };
        let seen = format!("order.{}", order["id"]);
        if read(&seen).is_some() {
            return;
        }
        let stock = format!("stock.{}", order["item"].as_str().unwrap());
        let available: i64 = std::str::from_utf8(&read(&stock).unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert!(available >= quantity);
        let mut put = self
            .conn
            .prepare_cached(
                "INSERT INTO kv (ns, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value",
            )
            .unwrap();
        let remaining = (available - quantity).to_string();
        put.execute(rusqlite::params![Self::NS, stock, remaining.as_bytes()])
            .unwrap();
        put.execute(rusqlite::params![Self::NS, seen, b"reserved".as_slice()])
            .unwrap();
    }
}

/// The plain lapin consumer: parse, do `work`, ack multiple every
/// ACK_EVERY.
pub fn lapin_drain(client: &Client, queue: &str, n: usize, work: Work<'_>) -> f64 {
    let state = matches!(work, Work::Sqlite).then(HandState::open);
    client.rt.block_on(async {
        let ch = client.conn.create_channel().await.unwrap();
        ch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        let publish_ch = client.conn.create_channel().await.unwrap();
        publish_ch.confirm_select(Default::default()).await.unwrap();
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
        let mut remaining = 1_000_000_000_000i64;
        // Windows whose publishes are out: (last delivery tag, confirms).
        let mut windows = std::collections::VecDeque::new();
        let mut confirms = Vec::new();
        while let Some(Ok(d)) = consumer.next().await {
            start.get_or_insert_with(Instant::now);
            let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            let quantity = v["quantity"].as_i64().unwrap();
            assert!(quantity > 0);
            if let Some(state) = &state {
                if (seen as u64).is_multiple_of(ACK_EVERY) {
                    state.conn.execute_batch("BEGIN").unwrap();
                }
                state.reserve(&v, quantity);
            }
            if let Work::Announce(exchange) = work {
                remaining -= quantity;
                let body = serde_json::to_vec(&serde_json::json!({
                    "order_id": v["id"], "item": v["item"],
                    "quantity": quantity, "remaining": remaining,
                }))
                .unwrap();
                let mut headers = FieldTable::default();
                headers.insert("x-handler".into(), AMQPValue::LongString("bench".into()));
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(format!("bench:{}:0", v["id"]).into())
                    .with_headers(headers);
                confirms.push(
                    publish_ch
                        .basic_publish(
                            exchange.into(),
                            "inventory.reserved".into(),
                            BasicPublishOptions::default(),
                            &body,
                            props,
                        )
                        .await
                        .unwrap(),
                );
            }
            seen += 1;
            if (seen as u64).is_multiple_of(ACK_EVERY) || seen == n {
                if let Some(state) = &state {
                    state.conn.execute_batch("COMMIT").unwrap();
                }
                windows.push_back((d.delivery_tag, std::mem::take(&mut confirms)));
                while windows.len() > 2 || (seen == n && !windows.is_empty()) {
                    let (tag, confirms) = windows.pop_front().unwrap();
                    for c in confirms {
                        assert!(c.await.unwrap().is_ack());
                    }
                    ch.basic_ack(tag, BasicAckOptions { multiple: true })
                        .await
                        .unwrap();
                }
            }
            if seen == n {
                break;
            }
        }
        let _ = ch.close(200, "drained".into()).await;
        let _ = publish_ch.close(200, "drained".into()).await;
        n as f64 / start.unwrap().elapsed().as_secs_f64()
    })
}

/// The servers whose CPU a drain is charged with, when they run on this
/// machine: the broker (`beam.smp`) and the PostgreSQL server (its
/// postmaster, whose children are the backends and background workers).
#[derive(Clone, Copy, Default)]
pub struct Servers {
    pub broker: Option<u32>,
    pub postgres: Option<u32>,
}

impl Servers {
    pub fn find() -> Self {
        Self {
            broker: broker_pid(),
            postgres: postmaster_pid(),
        }
    }
}

/// CPU seconds used so far: by this process, by its waited-for children,
/// by the local broker and by the local PostgreSQL server.
#[derive(Clone, Copy)]
pub struct Cpu {
    own: f64,
    children: f64,
    broker: Option<f64>,
    postgres: Option<f64>,
}

impl Cpu {
    pub fn now(servers: Servers) -> Self {
        let own = proc_cpu("self");
        Self {
            own: own.map_or(0.0, |(own, _)| own),
            children: own.map_or(0.0, |(_, children)| children),
            broker: servers
                .broker
                .and_then(|pid| proc_cpu(&pid.to_string()))
                .map(|(own, _)| own),
            postgres: servers.postgres.and_then(server_tree_cpu),
        }
    }
}

/// One timed drain.
pub struct Drain {
    pub rate: f64,
    /// CPU µs per event: the consumer's own (this process, or its child
    /// for pika), the broker's and PostgreSQL's.
    pub own: f64,
    pub broker: Option<f64>,
    pub postgres: Option<f64>,
}

impl Drain {
    /// A drain of `n` events at `rate`, between CPU readings `start` and
    /// `end`. `child`: the consumer was a child process.
    pub fn new(rate: f64, start: Cpu, end: Cpu, n: usize, child: bool) -> Self {
        let per = |s: f64| s * 1e6 / n as f64;
        let own = if child {
            end.children - start.children
        } else {
            end.own - start.own
        };
        let server = |e: Option<f64>, s: Option<f64>| e.zip(s).map(|(e, s)| per(e - s));
        Self {
            rate,
            own: per(own),
            broker: server(end.broker, start.broker),
            postgres: server(end.postgres, start.postgres),
        }
    }
}

/// The median of some drains' figure, `-` when a drain lacks it.
pub fn median_of(drains: &[Drain], figure: impl Fn(&Drain) -> Option<f64>) -> String {
    if drains.iter().all(|d| figure(d).is_some()) {
        format!("{:.1}", median(drains.iter().filter_map(figure)))
    } else {
        "-".into()
    }
}

pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The fields of `/proc/<pid>/stat` after the command name (which may
/// hold spaces): state is field 0, ppid 1, utime 11, stime 12, cutime 13,
/// cstime 14.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// (own, waited-for children) CPU seconds of a process, from
/// `/proc/<pid>/stat` (utime + stime, cutime + cstime).
pub fn proc_cpu(pid: &str) -> Option<(f64, f64)> {
    let fields = stat_fields(pid)?;
    let f = |i: usize| -> f64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    let tick = clock_ticks();
    Some(((f(11) + f(12)) / tick, (f(13) + f(14)) / tick))
}

/// CPU seconds a server has used with all its children, live and exited:
/// its own, its reaped children's (cutime, cstime: a PostgreSQL backend's
/// CPU lands there when its connection ends), and its live children's.
fn server_tree_cpu(pid: u32) -> Option<f64> {
    let (own, reaped) = proc_cpu(&pid.to_string())?;
    let live: f64 = pids()
        .filter(|p| parent(*p) == Some(pid))
        .filter_map(|p| proc_cpu(&p.to_string()))
        .map(|(own, _)| own)
        .sum();
    Some(own + reaped + live)
}

fn clock_ticks() -> f64 {
    static TICK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned())
}

fn parent(pid: u32) -> Option<u32> {
    stat_fields(&pid.to_string())?.get(1)?.parse().ok()
}

/// Of the processes named `name`, the one that has used the most CPU
/// (short-lived ones, such as `rabbitmqctl`, have used little).
fn busiest(candidates: impl Iterator<Item = u32>, cpu: impl Fn(u32) -> f64) -> Option<u32> {
    candidates.max_by(|a, b| cpu(*a).total_cmp(&cpu(*b)))
}

/// The local RabbitMQ's Erlang VM: the busiest `beam.smp`.
pub fn broker_pid() -> Option<u32> {
    busiest(
        pids().filter(|p| comm(*p).as_deref() == Some("beam.smp")),
        |p| proc_cpu(&p.to_string()).map_or(0.0, |(own, _)| own),
    )
}

/// The local PostgreSQL server: a `postgres` process whose parent is not
/// one (the postmaster), the busiest if several clusters run.
pub fn postmaster_pid() -> Option<u32> {
    busiest(
        pids().filter(|p| {
            comm(*p).as_deref() == Some("postgres")
                && parent(*p).and_then(comm).as_deref() != Some("postgres")
        }),
        |p| server_tree_cpu(p).unwrap_or(0.0),
    )
}
