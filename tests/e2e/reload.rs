//! Hot reload against a real RabbitMQ: versions swapped under a stream
//! lose and repeat nothing, refused files change nothing, a half-written
//! file is never activated, a deleted handler's events wait for it, a bad
//! version is rolled back, and a crash-looping handler is paused.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_host::handler::sha256_hex;
use lapin::BasicProperties;
use serde_json::Value;

use crate::amqp_support::{declare_topic, header, Client, Inventory, TestHost};
use crate::support::{guest, install, variant};

fn order(id: usize) -> Vec<u8> {
    format!(r#"{{"id": {id}, "item": "Laptop", "quantity": 1}}"#).into_bytes()
}

fn stock(host: &TestHost) -> i64 {
    let (_, body) = host.get("/state/inventory/stock.Laptop");
    serde_json::from_str::<Value>(&body).unwrap()["value"]
        .as_i64()
        .unwrap()
}

fn counter(host: &TestHost, name: &str) -> u64 {
    host.counters("inventory")[name].as_u64().unwrap_or(0)
}

fn version_is(sha: &str) -> impl Fn(&Value) -> bool + '_ {
    move |h| h["version"] == sha && h["status"] == "consuming"
}

#[test]
fn ten_thousand_events_across_five_swaps_and_a_refused_file_lose_and_repeat_nothing() {
    const N: usize = 10_000;
    const STOCK: u64 = 1_000_000;
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    declare_topic(&client, &inv.events);
    let probe = client.bind_probe(&inv.events, "inventory.reserved");
    let host = TestHost::start(&["inventory"], &inv.config_with_stock("", STOCK));
    let dir = host.handlers_dir();
    let v1 = std::fs::read(guest("inventory")).unwrap();
    let v2 = variant("inventory", "v2");
    let (sha1, sha2) = (sha256_hex(&v1), sha256_hex(&v2));

    // The stream: N orders at a steady pace, from a client of its own.
    let orders = inv.orders.clone();
    let producer = std::thread::spawn(move || {
        let client = Client::connect();
        for chunk in 0..N / 250 {
            for i in chunk * 250..(chunk + 1) * 250 {
                client.publish(&orders, "", &order(i), BasicProperties::default());
            }
            std::thread::sleep(Duration::from_millis(60));
        }
    });

    // Five swaps while it flows, and a garbage file dropped in between.
    host.wait_counter("inventory", "acked", 500);
    for (k, (bytes, sha)) in [
        (&v2, &sha2),
        (&v1, &sha1),
        (&v2, &sha2),
        (&v1, &sha1),
        (&v2, &sha2),
    ]
    .into_iter()
    .enumerate()
    {
        install(&dir, "inventory.wasm", bytes);
        host.wait_handler("inventory", version_is(sha), "the swap");
        if k == 2 {
            install(&dir, "broken.wasm", b"\0asm this is not a component");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    producer.join().unwrap();
    host.wait_counter("inventory", "acked", N as u64);
    std::thread::sleep(Duration::from_millis(300)); // anything extra would show now

    let c = host.counters("inventory");
    assert_eq!(c["acked"], N as u64, "every event acked exactly once: {c}");
    for zero in ["duplicates", "retried", "dead_lettered", "requeued"] {
        assert_eq!(c[zero], 0, "{zero}: {c}");
    }
    assert_eq!(c["reloads"], 6, "the first load and five swaps: {c}");
    assert_eq!(
        stock(&host),
        (STOCK - N as u64) as i64,
        "applied exactly once"
    );

    // Every order produced exactly one reservation, stamped with exactly
    // one of the two versions, and both versions served.
    let out = client.take(&probe, N, Duration::from_secs(60));
    assert_eq!(out.len(), N, "one reservation per order");
    let extra = client.take(&probe, 1, Duration::from_millis(300));
    assert!(extra.is_empty(), "more reservations than orders");
    let mut ids = HashSet::new();
    let mut by_version: HashMap<String, usize> = HashMap::new();
    for m in &out {
        let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
        assert!(ids.insert(body["order_id"].as_u64().unwrap()), "{body}");
        let v = header(m, "x-event-host-version").expect("version header");
        assert!(v == sha1 || v == sha2, "unknown version {v}");
        *by_version.entry(v).or_default() += 1;
    }
    assert_eq!(
        by_version.len(),
        2,
        "both versions handled events: {by_version:?}"
    );

    // The refused file is reported and changed nothing.
    let refused: Vec<Value> = host
        .handlers()
        .into_iter()
        .filter(|h| h["status"] == "refused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0]["file"]
        .as_str()
        .unwrap()
        .ends_with("broken.wasm"));
    assert!(!refused[0]["error"].as_str().unwrap().is_empty());
    let (_, metrics) = host.get("/metrics");
    assert!(
        metrics.contains("event_host_handler_load_failures_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("event_host_handler_broken_files 1"),
        "{metrics}"
    );
    host.stop().unwrap();
}

#[test]
fn a_slow_in_place_write_is_never_activated_half_written() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let host = TestHost::start(&["inventory"], &inv.config(""));
    let v1 = sha256_hex(&std::fs::read(guest("inventory")).unwrap());
    let full = variant("inventory", "slow");
    let v2 = sha256_hex(&full);

    // Record every version /handlers shows while the file is written.
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let done = Arc::new(AtomicBool::new(false));
    let admin = host.admin.clone();
    let poller = {
        let (seen, done) = (seen.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(list) = get_handlers(&admin) {
                    for h in list.iter().filter(|h| h["name"] == "inventory") {
                        seen.lock()
                            .unwrap()
                            .insert(h["version"].as_str().unwrap().to_owned());
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // In place, in 7 KiB pieces with pauses longer than the debounce.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(host.handlers_dir().join("inventory.wasm")).unwrap();
        for piece in full.chunks(7 * 1024) {
            f.write_all(piece).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(60));
        }
    }
    host.wait_handler("inventory", version_is(&v2), "the complete file to load");
    done.store(true, Ordering::Relaxed);
    poller.join().unwrap();

    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().all(|v| *v == v1 || *v == v2),
        "only whole versions ever served: {seen:?}"
    );
    // The partial file really was looked at (and refused) on the way.
    let (_, metrics) = host.get("/metrics");
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("event_host_handler_load_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        failures >= 1,
        "the half-written file was never read: {metrics}"
    );
    // Whole again: nothing is reported as refused any more.
    assert!(host.handlers().iter().all(|h| h["status"] != "refused"));
    // And it serves.
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_counter("inventory", "acked", 1);
    host.stop().unwrap();
}

fn get_handlers(admin: &str) -> std::io::Result<Vec<Value>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin)?;
    write!(s, "GET /handlers HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok(serde_json::from_str(body).unwrap_or_default())
}

#[test]
fn a_deleted_handlers_events_wait_in_its_queue_and_flow_when_it_returns() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let host = TestHost::start(&["inventory"], &inv.config(""));
    let file = host.handlers_dir().join("inventory.wasm");
    let bytes = std::fs::read(&file).unwrap();
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_counter("inventory", "acked", 1);

    std::fs::remove_file(&file).unwrap();
    host.wait_handler("inventory", |h| h["status"] == "removed", "removal");
    for id in 2..=6 {
        client.publish(&inv.orders, "", &order(id), BasicProperties::default());
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(client.depth(&inv.queue), 5, "the events wait in the queue");
    assert_eq!(counter(&host, "acked"), 1);
    assert_eq!(stock(&host), 9);
    // Ready means every present handler consumes; a removed one is absent.
    assert_eq!(host.get("/readyz").0, 503);

    install(&host.handlers_dir(), "inventory.wasm", &bytes);
    host.wait_counter("inventory", "acked", 6);
    assert_eq!(stock(&host), 4);
    assert_eq!(client.depth(&inv.queue), 0);
    host.stop().unwrap();
}

#[test]
fn a_bad_version_is_rolled_back_and_not_activated_again() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let host = TestHost::start(
        &["inventory"],
        &inv.config("rollback_events = 10\nrollback_failure_rate = 0.5"),
    );
    let good = sha256_hex(&std::fs::read(guest("inventory")).unwrap());
    let bad_bytes = std::fs::read(guest("bad-inventory")).unwrap();
    let bad = sha256_hex(&bad_bytes);
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_counter("inventory", "acked", 1);

    install(&host.handlers_dir(), "inventory.wasm", &bad_bytes);
    host.wait_handler("inventory", version_is(&bad), "the bad version");
    for id in 2..=7 {
        client.publish(&inv.orders, "", &order(id), BasicProperties::default());
    }
    // Five failures of its first ten events cross 50%: back to the good one.
    let h = host.wait_handler("inventory", version_is(&good), "the rollback");
    let note = h["note"].as_str().unwrap_or_default();
    assert!(note.contains("rolled back from"), "{h}");
    // The failed attempts come back through the retry queue to the good
    // version: nothing is lost, nothing dead-lettered.
    host.wait_counter("inventory", "acked", 7);
    assert_eq!(stock(&host), 3);
    let c = host.counters("inventory");
    assert_eq!(c["rollbacks"], 1, "{c}");
    assert_eq!(c["dead_lettered"], 0, "{c}");
    let (_, metrics) = host.get("/metrics");
    assert!(
        metrics.contains(r#"event_host_handler_rollbacks_total{handler="inventory"} 1"#),
        "{metrics}"
    );
    // The bad file is still in the folder; it is not activated again.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(host.handler("inventory")["version"], good);
    host.stop().unwrap();
}

#[test]
fn a_crash_looping_handler_is_paused_and_a_new_version_resumes_it() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    // No earlier version to roll back to: the breaker is what acts.
    let host = TestHost::start(
        &["bad-inventory"],
        &inv.config(
            "max_attempts = 50\nretry_max_ms = 100\nbreaker_failures = 3\nbreaker_window_secs = 10\nbreaker_cooloff_secs = 1",
        ),
    );
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_handler("inventory", |h| h["status"] == "paused", "the pause");
    let (_, metrics) = host.get("/metrics");
    assert!(
        metrics.contains(r#"event_host_handler_paused{handler="inventory"} 1"#),
        "{metrics}"
    );
    // After the cool-off it tries again, fails again, pauses again.
    host.wait_handler(
        "inventory",
        |h| h["counters"]["breaker_trips"].as_u64() >= Some(2),
        "a second pause after the cool-off",
    );
    let c = host.counters("inventory");
    assert_eq!(c["dead_lettered"], 0, "paused, not burnt into the DLQ: {c}");
    assert!(c["retried"].as_u64().unwrap() < 10, "{c}");

    // A fixed build resumes it at once, and the waiting event is applied.
    let good = std::fs::read(guest("inventory")).unwrap();
    install(&host.handlers_dir(), "bad-inventory.wasm", &good);
    host.wait_counter("inventory", "acked", 1);
    assert_eq!(stock(&host), 9);
    assert_eq!(host.handler("inventory")["status"], "consuming");
    host.stop().unwrap();
}

/// Wait until `dir` holds a compiled-code cache entry (written in the
/// background after a compile).
fn wait_for_cache_entry(dir: &std::path::Path) -> std::path::PathBuf {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let entry = std::fs::read_dir(dir).ok().and_then(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        });
        if let Some(entry) = entry {
            return entry;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cache entry written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn known_files_load_from_the_compiled_code_cache_across_restarts() {
    use event_host::config::Config;
    use event_host::handler::load_bytes;
    use event_host::runtime::Runtime;

    let cache = tempfile::tempdir().unwrap();
    let config = Config::default();
    let path = guest("inventory");
    let bytes = std::fs::read(&path).unwrap();
    let load = |runtime: &Runtime| {
        load_bytes(runtime, &config, &path, &bytes, Some(cache.path())).unwrap()
    };

    let runtime = Runtime::new(Default::default()).unwrap();
    let first = load(&runtime);
    assert!(!first.cached, "nothing cached yet");
    let entry = wait_for_cache_entry(cache.path());
    assert!(
        entry
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&first.sha256),
        "keyed by the file's sha256: {entry:?}"
    );
    let again = load(&runtime);
    assert!(again.cached, "a re-drop of a known file does not recompile");
    assert_eq!(again.declared, first.declared);

    // A restarted host (a new engine with the same settings) uses it too.
    let restarted = Runtime::new(Default::default()).unwrap();
    assert!(load(&restarted).cached);

    // A damaged entry is not trusted: compiled again, and it still works.
    std::fs::write(&entry, b"not compiled code").unwrap();
    let recovered = load(&restarted);
    assert!(!recovered.cached);
    assert_eq!(recovered.declared, first.declared);
}

/// Exchanges `queue` is bound to (besides the default exchange).
fn bound_to(queue: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_bindings",
            "-q",
            "--no-table-headers",
            "source_name",
            "destination_name",
        ])
        .output()
        .expect("rabbitmqctl");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(source, dest)| *dest == queue && !source.is_empty())
        .map(|(source, _)| source.to_owned())
        .collect()
}

#[test]
fn a_new_versions_bindings_exist_before_it_serves_and_dropped_ones_are_removed() {
    // The guests' own subscriptions, not pinned by config: inventory binds
    // `orders`; bad-inventory binds `orders` and `orders-audit`.
    let queue = crate::amqp_support::unique("inventory");
    let mut client = Client::connect();
    let q = queue.as_str();
    // `orders` stays: other software on this broker may use it.
    client.cleanup_handler(q, 1000, &["orders-audit"]);
    let host = TestHost::start(
        &["inventory"],
        &format!("[handlers.inventory]\nqueue = {q:?}\n"),
    );
    assert_eq!(bound_to(q), ["orders"]);

    let bad = std::fs::read(guest("bad-inventory")).unwrap();
    install(&host.handlers_dir(), "inventory.wasm", &bad);
    host.wait_handler("inventory", version_is(&sha256_hex(&bad)), "v2");
    let mut now = bound_to(q);
    now.sort();
    assert_eq!(now, ["orders", "orders-audit"], "declared before the swap");

    let good = std::fs::read(guest("inventory")).unwrap();
    install(&host.handlers_dir(), "inventory.wasm", &good);
    host.wait_handler("inventory", version_is(&sha256_hex(&good)), "v1 again");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while bound_to(q) != ["orders"] {
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped binding stayed: {:?}",
            bound_to(q)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    host.stop().unwrap();
}

#[test]
fn renaming_a_handler_file_keeps_it_serving() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let host = TestHost::start(&["inventory"], &inv.config(""));
    let dir = host.handlers_dir();
    std::fs::rename(dir.join("inventory.wasm"), dir.join("inventory-v1.wasm")).unwrap();
    // Give the watcher a pass over the folder, then check nothing stopped.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(host.handler("inventory")["status"], "consuming");
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_counter("inventory", "acked", 1);
    host.stop().unwrap();
}

/// Wait until `/handlers` reports `file` refused.
fn wait_refused(host: &TestHost, file: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let refused = host.handlers().into_iter().find(|h| {
            h["status"] == "refused" && h["file"].as_str().is_some_and(|f| f.ends_with(file))
        });
        if let Some(r) = refused {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {file} to be refused: {:?}",
            host.handlers()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_second_file_of_a_handler_takes_over_when_the_first_is_deleted() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let host = TestHost::start(&["inventory"], &inv.config(""));
    let dir = host.handlers_dir();
    let second = variant("inventory", "second file");
    install(&dir, "inventory-b.wasm", &second);
    let refused = wait_refused(&host, "inventory-b.wasm");
    assert!(
        refused["error"].as_str().unwrap().contains("also declares"),
        "{refused}"
    );

    std::fs::remove_file(dir.join("inventory.wasm")).unwrap();
    host.wait_handler(
        "inventory",
        version_is(&sha256_hex(&second)),
        "the second file taking over",
    );
    assert!(
        host.handlers().iter().all(|h| h["status"] != "refused"),
        "{:?}",
        host.handlers()
    );
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_counter("inventory", "acked", 1);
    assert_eq!(stock(&host), 9);
    host.stop().unwrap();
}

/// Names for a `noop` handler beside inventory, cleaned up with the
/// client: its queue, and a config with both.
fn inventory_and_noop(inv: &Inventory, client: &mut Client) -> (String, String) {
    let noop_in = crate::amqp_support::unique("noop-in");
    let noop_queue = crate::amqp_support::unique("noop");
    inv.cleanup(client);
    client.cleanup_handler(&noop_queue, 50, &[&noop_in]);
    let config = inv.config(&format!(
        r#"
[handlers.noop]
queue = "{noop_queue}"
subscriptions = [{{ exchange = "{noop_in}", kind = "fanout" }}]
retry_base_ms = 50
"#
    ));
    (noop_queue, config)
}

#[test]
fn a_file_replaced_by_another_handler_stops_the_old_one_and_keeps_its_queue() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    let (_, config) = inventory_and_noop(&inv, &mut client);
    let host = TestHost::start(&["inventory"], &config);
    let noop = std::fs::read(guest("noop")).unwrap();
    install(&host.handlers_dir(), "inventory.wasm", &noop);
    host.wait_handler("noop", |h| h["status"] == "consuming", "the new handler");
    host.wait_handler(
        "inventory",
        |h| h["status"] == "removed",
        "the replaced handler stopping",
    );

    // Its events wait in its queue, for a file that provides it again.
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.depth(&inv.queue) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the order never waited in the queue"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counter(&host, "acked"), 0);
    install(
        &host.handlers_dir(),
        "inventory-again.wasm",
        &std::fs::read(guest("inventory")).unwrap(),
    );
    host.wait_counter("inventory", "acked", 1);
    host.stop().unwrap();
}

#[test]
fn a_file_the_broker_refused_to_declare_is_tried_again() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    let (noop_queue, config) = inventory_and_noop(&inv, &mut client);
    // Its queue exists, not durable: declaring its topology fails, as it
    // would in a broker blip.
    client.rt.block_on(async {
        client
            .ch
            .queue_declare(
                noop_queue.as_str().into(),
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
    });
    let host = TestHost::start(&["inventory"], &config);
    install(
        &host.handlers_dir(),
        "noop.wasm",
        &std::fs::read(guest("noop")).unwrap(),
    );
    let refused = wait_refused(&host, "noop.wasm");
    assert!(
        refused["error"].as_str().unwrap().contains("topology"),
        "{refused}"
    );

    // The conflict goes away; the unchanged file is not refused for good.
    client.rt.block_on(async {
        client
            .ch
            .queue_delete(noop_queue.as_str().into(), Default::default())
            .await
            .unwrap();
    });
    host.wait_handler("noop", |h| h["status"] == "consuming", "the retried file");
    assert!(
        host.handlers().iter().all(|h| h["status"] != "refused"),
        "{:?}",
        host.handlers()
    );
    host.stop().unwrap();
}
