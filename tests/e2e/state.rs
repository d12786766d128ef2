//! Transactional state and the outbox, through real guest calls: a call's
//! writes and publishes take effect only if the call succeeds.

use event_host::dispatch::{Delivery, Outcome};

use crate::support::Harness;

#[test]
fn a_failed_calls_writes_are_invisible() {
    let h = Harness::new(&["chaos"], "");
    let ok = h.send(
        "chaos",
        r#"{"action":"kv-set","key":"k","value":"committed"}"#,
    );
    assert_eq!(ok.outcome, Outcome::Ack, "{ok:?}");
    assert_eq!(h.state("chaos", "k").as_deref(), Some("committed"));

    let failed = h.send(
        "chaos",
        r#"{"action":"kv-set-then-fail","key":"k","value":"lost"}"#,
    );
    assert_eq!(failed.outcome, Outcome::Retry);
    assert_eq!(h.state("chaos", "k").as_deref(), Some("committed"));

    let trapped = h.send(
        "chaos",
        r#"{"action":"kv-set-then-panic","key":"k","value":"lost"}"#,
    );
    assert_eq!(trapped.outcome, Outcome::Retry);
    assert_eq!(h.state("chaos", "k").as_deref(), Some("committed"));
}

#[test]
fn increments_commit_per_event() {
    let h = Harness::new(&["chaos"], "");
    for _ in 0..3 {
        let r = h.send("chaos", r#"{"action":"kv-incr","key":"n","delta":5}"#);
        assert_eq!(r.outcome, Outcome::Ack, "{r:?}");
    }
    assert_eq!(h.state("chaos", "n").as_deref(), Some("15"));
}

#[test]
fn a_handler_that_publishes_then_fails_publishes_nothing() {
    let h = Harness::new(
        &["chaos"],
        "[handlers.chaos]\npublishes_to = [{ exchange = 'x', kind = 'topic' }]",
    );
    let failed = h.send(
        "chaos",
        r#"{"action":"publish-then-fail","n":3,"exchange":"x","routing_key":"k"}"#,
    );
    assert_eq!(failed.outcome, Outcome::Retry);
    assert!(failed.published.is_empty());
    assert!(
        h.dispatcher.state().pending_outbox().unwrap().is_empty(),
        "nothing reached the outbox"
    );

    let ok = h.send(
        "chaos",
        r#"{"action":"publish","n":3,"exchange":"x","routing_key":"k"}"#,
    );
    assert_eq!(ok.outcome, Outcome::Ack);
    assert_eq!(ok.published.len(), 3);
    assert_eq!(
        h.dispatcher.state().pending_outbox().unwrap().len(),
        3,
        "held until confirmed"
    );
}

#[test]
fn publish_limits_are_enforced() {
    let h = Harness::new(&["chaos"], "[handlers.chaos]\nmax_publishes = 2");
    let r = h.send(
        "chaos",
        r#"{"action":"publish","n":3,"exchange":"x","routing_key":"k"}"#,
    );
    assert_ne!(r.outcome, Outcome::Ack, "a third publish is refused: {r:?}");
}

#[test]
fn a_redelivered_message_id_is_not_applied_twice() {
    let h = Harness::new(&["chaos"], "");
    let delivery = Delivery {
        payload: br#"{"action":"kv-incr","key":"n","delta":1}"#.to_vec(),
        exchange: "chaos".into(),
        message_id: Some("m-1".into()),
        attempt: 1,
        ..Delivery::default()
    };
    assert_eq!(
        h.send_delivery("chaos", delivery.clone()).outcome,
        Outcome::Ack
    );
    let again = h.send_delivery(
        "chaos",
        Delivery {
            redelivered: true,
            ..delivery
        },
    );
    assert_eq!(again.outcome, Outcome::Ack);
    assert!(again.duplicate);
    assert_eq!(h.state("chaos", "n").as_deref(), Some("1"));
}

/// chaos, deduplicating on the ledger payload's `id`, publishing to `out`.
const KEYED: &str = r#"
[handlers.chaos]
idempotency_key = "/id"
publishes_to = [{ exchange = "out", kind = "topic" }]
"#;

fn ledger_event(id: &str) -> Delivery {
    Delivery {
        payload: format!(r#"{{"action":"ledger","id":"{id}","exchange":"out"}}"#).into_bytes(),
        exchange: "chaos".into(),
        attempt: 1,
        ..Delivery::default()
    }
}

#[test]
fn an_idempotency_key_in_the_body_dedupes_events_without_a_message_id() {
    let h = Harness::new(&["chaos"], KEYED);
    let first = h.send_delivery("chaos", ledger_event("o-1"));
    assert_eq!(first.outcome, Outcome::Ack, "{first:?}");
    let again = h.send_delivery(
        "chaos",
        Delivery {
            redelivered: true,
            ..ledger_event("o-1")
        },
    );
    assert!(again.duplicate, "{again:?}");
    assert_eq!(h.state("chaos", "applied.o-1").as_deref(), Some("1"));
    // Its output's id is derived from the key: a re-run after a crash
    // publishes the same id, and downstream dedupe works.
    assert_eq!(
        first.published[0].message_id.as_deref(),
        Some("chaos:/id=o-1:0")
    );
    let elsewhere = Harness::new(&["chaos"], KEYED).send_delivery("chaos", ledger_event("o-1"));
    assert_eq!(
        elsewhere.published[0].message_id,
        first.published[0].message_id
    );

    // Another id is another event.
    assert!(!h.send_delivery("chaos", ledger_event("o-2")).duplicate);
    assert_eq!(h.state("chaos", "applied.o-2").as_deref(), Some("1"));
}

#[test]
fn an_event_without_its_key_falls_back_to_its_message_id_and_is_never_rejected() {
    let h = Harness::new(&["chaos"], KEYED);
    // No `id` in the body (the ledger action takes the message id then).
    let keyless = |message_id: Option<&str>| Delivery {
        payload: br#"{"action":"ledger","exchange":"out"}"#.to_vec(),
        exchange: "chaos".into(),
        message_id: message_id.map(str::to_owned),
        attempt: 1,
        ..Delivery::default()
    };
    assert_eq!(
        h.send_delivery("chaos", keyless(Some("m-1"))).outcome,
        Outcome::Ack
    );
    assert!(h.send_delivery("chaos", keyless(Some("m-1"))).duplicate);
    assert_eq!(h.state("chaos", "applied.m-1").as_deref(), Some("1"));
}

#[test]
fn without_any_key_events_run_at_least_once_and_outputs_never_share_an_id() {
    // The default key (message id), and messages without one: two orders
    // with identical bodies are two events.
    let h = Harness::new(
        &["chaos"],
        "[handlers.chaos]\npublishes_to = [{ exchange = \"out\", kind = \"topic\" }]",
    );
    let a = h.send_delivery("chaos", ledger_event("same"));
    let b = h.send_delivery("chaos", ledger_event("same"));
    assert!(!a.duplicate && !b.duplicate);
    assert_eq!(h.state("chaos", "applied.same").as_deref(), Some("2"));
    let (ida, idb) = (&a.published[0].message_id, &b.published[0].message_id);
    assert!(ida.is_some() && idb.is_some());
    assert_ne!(ida, idb, "identical bodies, different events");
}

#[test]
fn the_running_host_prunes_dedupe_records_past_the_window_and_keeps_fresh_ones() {
    use event_host::state::{Durability, StateStore, Txn};
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    {
        let store = StateStore::open(&state_dir, Durability::Normal).unwrap();
        store
            .commit(&[Txn::default().into_commit("h", Some("fresh".into()), Vec::new())])
            .unwrap();
    }
    // A record from eight days ago (the window defaults to seven).
    let db = rusqlite::Connection::open(state_dir.join("state.sqlite3")).unwrap();
    let eight_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 8 * 24 * 3600;
    db.execute(
        "INSERT INTO processed (ns, message_id, at) VALUES ('h', 'old', ?1)",
        [eight_days_ago as i64],
    )
    .unwrap();
    drop(db);

    let admin = format!("127.0.0.1:{}", crate::amqp_support::free_port());
    let config = event_host::config::Config::parse(&format!(
        "handlers_dir = {:?}\nstate_path = {:?}\namqp_url = {:?}\nadmin_addr = {admin:?}\nwatch = false\n",
        dir.path().join("handlers").to_str().unwrap(),
        state_dir.to_str().unwrap(),
        crate::amqp_support::amqp_url(),
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let host = rt.spawn(event_host::server::run(config, async {
        let _ = rx.await;
    }));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, metrics) = crate::amqp_support::http_get(&admin, "/metrics");
        if metrics.contains("event_host_dedupe_records_pruned_total 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no prune: {metrics}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = tx.send(());
    rt.block_on(host).unwrap().unwrap();

    let store = StateStore::open(&state_dir, Durability::Normal).unwrap();
    assert!(!store.is_processed("h", "old").unwrap());
    assert!(store.is_processed("h", "fresh").unwrap());
}

#[test]
fn events_run_without_any_idempotency_key_are_counted_and_still_applied() {
    use crate::amqp_support::{Client, Inventory, TestHost};
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    // Keyed on a header: an order without it and without a message id
    // runs at least once, counted; one with it is not counted.
    let host = TestHost::start(
        &["inventory"],
        &inv.config("idempotency_key = \"header:x-order\""),
    );
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-order".into(),
        lapin::types::AMQPValue::LongString("o-1".into()),
    );
    let keyed = lapin::BasicProperties::default().with_headers(headers);
    let order = |id: u32| format!(r#"{{"id": {id}, "item": "Laptop", "quantity": 1}}"#);
    client.publish(&inv.orders, "", order(1).as_bytes(), keyed);
    client.publish(
        &inv.orders,
        "",
        order(2).as_bytes(),
        lapin::BasicProperties::default(),
    );
    host.wait_counter("inventory", "acked", 2);
    let (_, metrics) = host.get("/metrics");
    assert!(
        metrics
            .contains("event_host_events_without_idempotency_key_total{handler=\"inventory\"} 1\n"),
        "{metrics}"
    );
    let (_, stock) = host.get("/state/inventory/stock.Laptop");
    assert!(stock.contains("\"value\":8"), "both applied: {stock}");
    host.stop().unwrap();
}
