//! Scale out (issue #12): one queue drained by one host on embedded
//! SQLite, by one host on PostgreSQL, and by 2, 3, … hosts sharing it and
//! one PostgreSQL schema — against two plain lapin consumers in the same
//! round: one that parses and acks (less work than the hosts: no state),
//! and one that also makes inventory's state updates itself in SQLite,
//! durably before the ack (the embedded host's work, without the host).
//!
//! Run: `cargo bench -p event-host --bench fleet` (RabbitMQ on
//! `EVENT_HOST_AMQP_URL`, default local; PostgreSQL on
//! `EVENT_HOST_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). `BENCH_EVENTS` (default
//! 200000) and `BENCH_ROUNDS` (default 3) as in the broker benchmark;
//! `BENCH_HOSTS` the largest fleet (default 3); `BENCH_CASES` picks cases
//! (`lapin,lapin-sqlite,sqlite,pg1-per-read,pg1,pg3`: for profiling one);
//! `BENCH_IDEMPOTENCY_KEY`
//! gives inventory an `idempotency_key` (e.g. `/id`, as the example
//! deployment has it: one dedupe check and one dedupe record per event).
//!
//! Every drain takes the same number of prefilled order events, and each
//! host drain starts from fresh state (a new state folder, or a new
//! schema dropped afterwards). Hosts declare inventory's keys in
//! `read_ahead`, as the example fleet does (one case runs without, to
//! show what that costs). The host work is the broker benchmark's
//! like-for-like row: inventory with stock updates only (no per-order
//! publish), one instance per batch — consume, parse, update state
//! durably, ack, as the lapin consumer does without the state.
//!
//! A fleet is N in-process hosts (`server::run`, each with its own
//! runtime, dispatcher, state store and PostgreSQL connections, host id
//! and admin port), started together; the drain is timed from when all are
//! ready, over what is left of the queue. They share a compiled-code
//! cache folder, so a start does not compile.
//!
//! Beside each rate: CPU per event from `/proc` — this process (the
//! consumers: every host of the fleet, or lapin), the broker (`beam.smp`)
//! and the PostgreSQL server (postmaster, backends, background workers);
//! PostgreSQL's transactions per event and rolled-back ones (database-wide
//! counters, so other users of the database show up in them). Then one
//! PostgreSQL round trip measured alone, issued the way the host issues
//! them (a blocked thread, the connection's I/O on a runtime thread).

#[path = "../../tests/e2e/support.rs"]
mod support;

#[path = "../../tests/e2e/amqp_support.rs"]
mod amqp_support;

// amqp_support puts hosts on the suite's state backend.
#[path = "../../tests/e2e/backend.rs"]
mod backend;

#[path = "../../tests/e2e/pg_support.rs"]
mod pg_support;

mod drain;

use std::time::{Duration, Instant};

use amqp_support::{unique, Client, TestHost};
use drain::{
    declare_queue, events, lapin_drain, median, median_of, prefill, rounds, Cpu, Drain, Servers,
    Work, PREFETCH,
};

/// The PostgreSQL the fleet shares.
fn postgres_url() -> String {
    std::env::var("EVENT_HOST_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `BENCH_HOSTS`: the largest fleet (default 3).
fn max_hosts() -> usize {
    std::env::var("BENCH_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1)
}

/// The cases to run: `BENCH_CASES` (comma-separated, of `lapin`,
/// `lapin-sqlite`, `sqlite`, `pg1-per-read`, `pg1`, `pg2`, …; for
/// profiling one), else both lapin consumers, SQLite, one host on
/// PostgreSQL without `read_ahead`, and 1 to [`max_hosts`] hosts on
/// PostgreSQL.
fn cases() -> Vec<Case> {
    match std::env::var("BENCH_CASES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|c| match c.trim() {
                "lapin" => Case::Lapin,
                "lapin-sqlite" => Case::LapinSqlite,
                "sqlite" => Case::Sqlite,
                "pg1-per-read" => Case::PostgresPerRead,
                pg => Case::Postgres(
                    pg.strip_prefix("pg")
                        .and_then(|n| n.parse().ok())
                        .filter(|n| *n > 0)
                        .unwrap_or_else(|| panic!("BENCH_CASES: unknown case {pg:?}")),
                ),
            })
            .collect(),
        _ => [
            Case::Lapin,
            Case::LapinSqlite,
            Case::Sqlite,
            Case::PostgresPerRead,
        ]
        .into_iter()
        .chain((1..=max_hosts()).map(Case::Postgres))
        .collect(),
    }
}

/// One way of draining the queue.
#[derive(Clone, Copy, PartialEq)]
enum Case {
    /// Parse and ack: less than the hosts do (no state).
    Lapin,
    /// Parse, inventory's state updates by hand in SQLite, ack: the
    /// embedded host's work without the host ([`Work::Sqlite`]).
    LapinSqlite,
    Sqlite,
    /// This many hosts on one PostgreSQL schema.
    Postgres(usize),
    /// One host on PostgreSQL without `read_ahead`: a round trip per
    /// state read, while the guest waits.
    PostgresPerRead,
}

impl Case {
    fn what(self) -> String {
        match self {
            Case::Lapin => "plain lapin (JSON parse, multiple ack every 30)".into(),
            Case::LapinSqlite => "plain lapin + the same state writes in SQLite".into(),
            Case::Sqlite => "1 host, SQLite (embedded, synchronous=normal)".into(),
            Case::Postgres(1) => "1 host, PostgreSQL".into(),
            Case::PostgresPerRead => "1 host, PostgreSQL, no read_ahead".into(),
            Case::Postgres(n) => format!("{n} hosts, PostgreSQL, sharing the queue"),
        }
    }
}

/// A connection of the benchmark's own to PostgreSQL: schemas, counters.
struct Pg {
    client: tokio_postgres::Client,
    rt: tokio::runtime::Runtime,
}

impl Pg {
    fn connect(url: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL reachable at {url}: {e}"));
            tokio::spawn(connection);
            client
        });
        Self { client, rt }
    }

    fn execute(&self, sql: &str) {
        self.rt
            .block_on(self.client.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn drop_schema(&self, schema: &str) {
        self.execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
    }

    /// This database's committed and rolled-back transactions so far (as
    /// the statistics collector last heard of them).
    fn transactions(&self) -> (i64, i64) {
        self.rt.block_on(async {
            self.client
                .batch_execute("SELECT pg_stat_clear_snapshot()")
                .await
                .unwrap();
            let row = self
                .client
                .query_one(
                    "SELECT xact_commit, xact_rollback FROM pg_stat_database
                     WHERE datname = current_database()",
                    &[],
                )
                .await
                .unwrap();
            (row.get(0), row.get(1))
        })
    }
}

/// What one host drain saw besides its rate.
#[derive(Default, Clone, Copy)]
struct Extra {
    /// PostgreSQL transactions committed and rolled back per 1000 events.
    commits: Option<f64>,
    rollbacks: Option<f64>,
    /// Events re-queued (conflicts past the re-run limit, retries).
    requeued: u64,
}

fn main() {
    // As in the broker benchmark: a log line per event would measure the
    // terminal.
    if std::env::var_os("EVENT_HOST_TEST_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("EVENT_HOST_TEST_LOG", "warn") };
    }
    let n = events();
    let rounds = rounds();
    let url = postgres_url();
    let pg = Pg::connect(&url);
    let idempotency = std::env::var("BENCH_IDEMPOTENCY_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let mut client = Client::connect();
    let orders = unique("fleet-orders");
    let out = unique("fleet-inventory-events");
    let host_queue = unique("fleet-inventory");
    let lapin_q = unique("fleet-lapin");
    client.cleanup_handler(&host_queue, 1000, &[&orders, &out]);
    client.cleanup(&[&lapin_q], &[]);
    drain::declare_order_exchanges(&client, &orders, &out);
    // One compiled-code cache for every host of the run.
    let cache = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let config = |case: Case, host: usize, schema: &str| {
        let state = match case {
            Case::Postgres(_) | Case::PostgresPerRead => format!(
                "state_url = {url:?}\nstate_schema = {schema:?}\nhost_id = \"bench-{host}\"\n"
            ),
            _ => String::new(),
        };
        let key = idempotency
            .as_ref()
            .map(|k| format!("idempotency_key = {k:?}"))
            .unwrap_or_default();
        // The example fleet's declaration (ignored on embedded state).
        let read_ahead = if case == Case::PostgresPerRead {
            ""
        } else {
            r#"read_ahead = ["order.{/id}", "stock.{/item}"]"#
        };
        format!(
            r#"cache_dir = {cache:?}
{state}
[handlers.inventory]
queue = "{host_queue}"
prefetch = {PREFETCH}
events_per_instance = 128
{key}
{read_ahead}
subscriptions = [{{ exchange = "{orders}", kind = "fanout" }}]
publishes_to = [{{ exchange = "{out}", kind = "topic" }}]
[handlers.inventory.config]
"stock.Laptop" = "1000000000000"
"inventory-exchange" = "{out}"
"announce-reservations" = "false"
"#,
            cache = cache.path().to_str().unwrap(),
        )
    };

    // Declare the topology and fill the compiled-code cache (written in
    // the background: wait for it).
    let first = TestHost::start(&["inventory"], &config(Case::Sqlite, 0, ""));
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(cache.path()).map_or(0, |d| d.count()) == 0 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    first.stop().unwrap();

    let servers = Servers::find();
    let cases = cases();
    let mut drains: Vec<Vec<Drain>> = cases.iter().map(|_| Vec::new()).collect();
    let mut extras: Vec<Vec<Extra>> = cases.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, &case) in cases.iter().enumerate() {
            if let Case::Lapin | Case::LapinSqlite = case {
                declare_queue(&client, &lapin_q);
                prefill(&client, "", &lapin_q, n);
                let work = if case == Case::Lapin {
                    Work::Parse
                } else {
                    Work::Sqlite
                };
                let cpu = Cpu::now(servers);
                let rate = lapin_drain(&client, &lapin_q, n, work);
                drains[i].push(Drain::new(rate, cpu, Cpu::now(servers), n, false));
                extras[i].push(Extra::default());
                continue;
            }
            let hosts = match case {
                Case::Postgres(hosts) => hosts,
                _ => 1,
            };
            let schema = format!("bench_{pid}_r{round}_{i}");
            prefill(&client, &orders, "", n);
            let transactions = pg.transactions();
            let fleet: Vec<TestHost> = std::thread::scope(|s| {
                let starting: Vec<_> = (0..hosts)
                    .map(|h| {
                        let text = config(case, h, &schema);
                        s.spawn(move || TestHost::start(&["inventory"], &text))
                    })
                    .collect();
                starting.into_iter().map(|t| t.join().unwrap()).collect()
            });
            // The hosts consume as soon as each is ready: time what is
            // left of the queue once all are.
            let acked = |fleet: &[TestHost]| -> Vec<u64> {
                fleet
                    .iter()
                    .map(|h| h.counter("inventory", "acked"))
                    .collect()
            };
            let before: u64 = acked(&fleet).iter().sum();
            let (cpu, started) = (Cpu::now(servers), Instant::now());
            eprintln!("draining through {}", case.what());
            let (mut last, mut moved) = (before, Instant::now());
            let shares = loop {
                let now = acked(&fleet);
                let total: u64 = now.iter().sum();
                if total >= n as u64 {
                    break now;
                }
                if total != last {
                    (last, moved) = (total, Instant::now());
                }
                // Not a timing: a drain that stops moving for minutes is stuck.
                assert!(
                    moved.elapsed() < Duration::from_secs(300),
                    "{}: stuck at {total} of {n} acked",
                    case.what()
                );
                std::thread::sleep(Duration::from_millis(10));
            };
            let drained = n - before as usize;
            let rate = drained as f64 / started.elapsed().as_secs_f64();
            drains[i].push(Drain::new(rate, cpu, Cpu::now(servers), drained, false));
            let requeued = fleet
                .iter()
                .map(|h| h.counter("inventory", "requeued"))
                .sum();
            for host in fleet {
                host.stop().unwrap();
            }
            let mut extra = Extra {
                requeued,
                ..Extra::default()
            };
            if let Case::Postgres(_) | Case::PostgresPerRead = case {
                // The backends report their counters when they end (the
                // hosts' connections closed with them) or within a second.
                std::thread::sleep(Duration::from_millis(1500));
                let (commits, rollbacks) = pg.transactions();
                let per_k = |d: i64| d as f64 * 1000.0 / n as f64;
                extra.commits = Some(per_k(commits - transactions.0));
                extra.rollbacks = Some(per_k(rollbacks - transactions.1));
                pg.drop_schema(&schema);
            }
            extras[i].push(extra);
            eprintln!(
                "  {rate:.0} events/s, acked per host {shares:?} ({before} before all were ready)"
            );
        }
        let rates: Vec<String> = drains
            .iter()
            .map(|d| format!("{:.0}", d[round - 1].rate))
            .collect();
        eprintln!("round {round}/{rounds}: events/s {}", rates.join(" / "));
    }
    let rtt_schema = format!("bench_{pid}_rtt");
    let io_thread = round_trip(&url, &rtt_schema, servers, false);
    let same_thread = round_trip(&url, &rtt_schema, servers, true);
    pg.drop_schema(&rtt_schema);

    println!(
        "fleet benchmark: {n} order events drained from one prefilled queue per case, prefetch {PREFETCH}, {rounds} rounds; inventory, stock updates only, one instance per batch{}",
        idempotency
            .as_ref()
            .map(|k| format!(", idempotency_key {k:?}"))
            .unwrap_or_default()
    );
    println!(
        "{:<47} {:>8} {:>7} {:>10} {:>8} {:>7} {:>21} {:>8} {:>8} {:>7} {:>9} {:>8}",
        "case (medians over the rounds)",
        "events/s",
        "x lapin",
        "x same work",
        "x sqlite",
        "x 1 pg",
        "CPU µs/ev: consumers",
        "broker",
        "postgres",
        "total",
        "xact/1k ev",
        "rollback"
    );
    // Ratios within each round, then their median.
    let ratio = |runs: &[Drain], base: &[Drain]| {
        median(runs.iter().zip(base).map(|(r, b)| r.rate / b.rate))
    };
    let index = |case: Case| cases.iter().position(|c| *c == case);
    let lapin = index(Case::Lapin).map(|i| &drains[i]);
    let by_hand = index(Case::LapinSqlite).map(|i| &drains[i]);
    let sqlite = index(Case::Sqlite).map(|i| &drains[i]);
    let one_pg = index(Case::Postgres(1)).map(|i| &drains[i]);
    for (i, &case) in cases.iter().enumerate() {
        let runs = &drains[i];
        let x = |base: Option<&Vec<Drain>>, applies: bool| match base {
            Some(base) if applies => format!("{:.2}x", ratio(runs, base)),
            _ => String::new(),
        };
        let x_lapin = x(lapin, case != Case::Lapin);
        let x_same = x(by_hand, case == Case::Sqlite);
        let x_sqlite = x(
            sqlite,
            matches!(case, Case::Postgres(_) | Case::PostgresPerRead),
        );
        let x_pg = x(one_pg, matches!(case, Case::Postgres(h) if h > 1));
        let total = median(
            runs.iter()
                .map(|d| d.own + d.broker.unwrap_or(0.0) + d.postgres.unwrap_or(0.0)),
        );
        let per_k = |f: fn(&Extra) -> Option<f64>| {
            let v: Vec<f64> = extras[i].iter().filter_map(f).collect();
            if v.is_empty() {
                String::new()
            } else {
                format!("{:.1}", median(v.into_iter()))
            }
        };
        println!(
            "{:<47} {:>8.0} {x_lapin:>7} {x_same:>10} {x_sqlite:>8} {x_pg:>7} {:>21.1} {:>8} {:>8} {total:>7.1} {:>9} {:>8}",
            case.what(),
            median(runs.iter().map(|d| d.rate)),
            median(runs.iter().map(|d| d.own)),
            median_of(runs, |d| d.broker),
            median_of(runs, |d| d.postgres),
            per_k(|e| e.commits),
            per_k(|e| e.rollbacks),
        );
    }
    let requeued: u64 = extras.iter().flatten().map(|e| e.requeued).sum();
    println!(
        "(x = rate / that case's rate in the same round; x same work: the SQLite host against plain lapin with the same state writes; CPU per event drained, from /proc: consumers = this process, every host of the fleet; xact, rollback = PostgreSQL transactions per 1000 events, database-wide; events re-queued over all drains: {requeued})"
    );
    println!("PostgreSQL round trip alone, SELECT … FOR UPDATE of an absent key in a transaction:");
    println!("  I/O on another thread, this one blocked (the host until 2026-12-02), {io_thread}");
    println!(
        "  the connection driven on the calling thread (as the host sends it now), {same_thread}"
    );
}

/// One PostgreSQL round trip, measured alone.
struct RoundTrip {
    trips: usize,
    p50: f64,
    p99: f64,
    /// CPU µs per trip.
    own: f64,
    postgres: Option<f64>,
}

impl std::fmt::Display for RoundTrip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} trips: p50 {:.1} µs, p99 {:.1} µs; CPU per trip: this process {:.1} µs, postgres {}",
            self.trips,
            self.p50,
            self.p99,
            self.own,
            self.postgres.map_or("-".into(), |p| format!("{p:.1} µs"))
        )
    }
}

/// Time `SELECT … FOR UPDATE` round trips of absent keys, one
/// transaction per 100 reads (as a batch), in `schema` (created here,
/// dropped by the caller). `same_thread` false: the way the state store
/// sent them until 2026-12-02 — the connection's I/O on a one-thread
/// runtime, this thread blocked on each query; true: the connection
/// driven on this thread, no hand-over between threads (the store's way
/// now).
fn round_trip(url: &str, schema: &str, servers: Servers, same_thread: bool) -> RoundTrip {
    const TRIPS: usize = 10_000;
    let rt = if same_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(1);
        b
    }
    .enable_all()
    .build()
    .unwrap();
    let client = rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    });
    let wait = |f: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>| {
        if same_thread {
            rt.block_on(f)
        } else {
            futures_executor::block_on(f)
        }
    };
    let setup = format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; SET search_path TO \"{schema}\";
         CREATE TABLE IF NOT EXISTS kv (ns text NOT NULL, key text NOT NULL,
                                        value bytea NOT NULL, PRIMARY KEY (ns, key));"
    );
    rt.block_on(client.batch_execute(&setup)).unwrap();
    let read = rt
        .block_on(client.prepare("SELECT value FROM kv WHERE ns = $1 AND key = $2 FOR UPDATE"))
        .unwrap();
    let mut took = Vec::with_capacity(TRIPS);
    let cpu = Cpu::now(servers);
    for i in 0..TRIPS {
        if i % 100 == 0 {
            let sql = if i == 0 { "BEGIN" } else { "COMMIT; BEGIN" };
            rt.block_on(client.batch_execute(sql)).unwrap();
        }
        let key = format!("order.{i}");
        let t = Instant::now();
        wait(Box::pin(async {
            client.query(&read, &[&"inventory", &key]).await.unwrap();
        }));
        took.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let used = Drain::new(0.0, cpu, Cpu::now(servers), TRIPS, false);
    rt.block_on(client.batch_execute("COMMIT")).unwrap();
    took.sort_by(|a, b| a.total_cmp(b));
    RoundTrip {
        trips: TRIPS,
        p50: took[TRIPS / 2],
        p99: took[TRIPS * 99 / 100],
        own: used.own,
        postgres: used.postgres,
    }
}
