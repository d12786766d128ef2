//! No silent split: a host on embedded state never shares a handler's
//! queue with another consumer (issue 12). The second of two hosts on one
//! queue refuses it — log, `/handlers`, `/readyz` — and takes over when
//! the first stops; a consumer that joins a queue an embedded host already
//! consumes makes it step back. Also: a host says who it is (`/handlers`,
//! `/metrics`, `x-event-host-host` on what it publishes).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::Value;

use crate::amqp_support::{header, http_get, Client, Inventory, TestHost};
use crate::process::{event_host, Run};
use crate::support::guest;

fn order(id: u64) -> Vec<u8> {
    format!(r#"{{"id": {id}, "item": "Laptop", "quantity": 1}}"#).into_bytes()
}

/// Publish order `id` with `id` as its message id.
fn publish_order(client: &Client, inv: &Inventory, id: u64) {
    client.publish(
        &inv.orders,
        "",
        &order(id),
        BasicProperties::default().with_message_id(format!("order-{id}").into()),
    );
}

/// The `/handlers` entry of `name` at `admin` (`Null` when absent).
fn handler_entry(admin: &str, name: &str) -> Value {
    let (_, body) = http_get(admin, "/handlers");
    serde_json::from_str::<Vec<Value>>(&body)
        .unwrap_or_default()
        .into_iter()
        .find(|h| h["name"] == name)
        .unwrap_or(Value::Null)
}

/// Poll `admin`'s `/handlers` until `ok` holds for `name` (60 s at most).
fn wait_entry(run: &mut Run, name: &str, ok: impl Fn(&Value) -> bool, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let entry = handler_entry(&run.admin, name);
        if ok(&entry) {
            return entry;
        }
        run.assert_running();
        assert!(
            Instant::now() < deadline,
            "{}: timed out waiting for {what}: {entry}; log: {}",
            run.name,
            run.log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stock(admin: &str) -> Value {
    let (_, body) = http_get(admin, "/state/inventory/stock.Laptop");
    serde_json::from_str::<Value>(&body).unwrap_or_default()["value"].clone()
}

/// A host folder of its own (handlers, state, config) for `host_id`.
fn deploy(dir: &Path, host_id: &str, inv: &Inventory) -> PathBuf {
    let handlers = dir.join("handlers");
    std::fs::create_dir_all(&handlers).unwrap();
    std::fs::copy(guest("inventory"), handlers.join("inventory.wasm")).unwrap();
    let config = dir.join("host.toml");
    std::fs::write(
        &config,
        format!(
            "handlers_dir = {:?}\nstate_path = {:?}\namqp_url = {:?}\nhost_id = {host_id:?}\ndurability = \"normal\"\n{}",
            handlers.to_str().unwrap(),
            dir.join("state").to_str().unwrap(),
            crate::amqp_support::amqp_url(),
            inv.config_with_stock("", 1000),
        ),
    )
    .unwrap();
    config
}

fn start(name: &'static str, dir: &Path, config: &Path) -> Run {
    let mut cmd = event_host(dir);
    // The guard is embedded state's: on shared state both would consume.
    crate::backend::embedded(&mut cmd);
    cmd.args(["run", "--config", config.to_str().unwrap()]);
    Run::start(name, dir, cmd)
}

/// The issue's story on embedded state: two sidecars, each with its own
/// state folder, on inventory's one queue. The second refuses the queue
/// instead of selling the same Laptops again, says why everywhere an
/// operator looks, and serves once the first is gone.
#[test]
fn a_second_host_on_embedded_state_refuses_the_shared_queue_and_takes_over_when_the_first_stops() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let root = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let (config_a, config_b) = (
        deploy(&dir_a, "host-a", &inv),
        deploy(&dir_b, "host-b", &inv),
    );

    let mut a = start("host-a", &dir_a, &config_a);
    a.wait_ready();
    let mut b = start("host-b", &dir_b, &config_b);
    let refused = wait_entry(
        &mut b,
        "inventory",
        |h| h["status"] == "refused_shared_queue",
        "host-b to refuse the queue",
    );
    let reason = refused["status_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("{:?}", inv.queue))
            && reason.contains("1 other consumer")
            && reason.contains("state_url")
            && reason.contains("sqlite"),
        "{refused}"
    );
    assert_eq!(refused["host_id"], "host-b", "{refused}");
    assert_eq!(refused["state_backend"], "sqlite", "{refused}");
    let (status, body) = http_get(&b.admin, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("inventory") && body.contains("state_url"),
        "{body}"
    );
    // `event-host health`, the container healthcheck, says the same.
    let health = |admin: &str| {
        event_host(root.path())
            .args(["health", "--admin-addr", admin])
            .output()
            .unwrap()
    };
    let probe = health(&b.admin);
    let said = String::from_utf8_lossy(&probe.stderr);
    assert!(!probe.status.success(), "{said}");
    assert!(said.contains("503") && said.contains("state_url"), "{said}");
    let probe = health(&a.admin);
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    b.wait_log("not consuming: the queue has another consumer", 1);
    let log = std::fs::read_to_string(&b.log).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("not consuming: the queue has another consumer"))
        .unwrap();
    assert!(
        line.contains("inventory") && line.contains(&inv.queue) && line.contains("state_url"),
        "{line}"
    );
    let (_, metrics) = http_get(&b.admin, "/metrics");
    assert!(
        metrics.contains(r#"event_host_info{host_id="host-b",state_backend="sqlite"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"event_host_handler_refused_shared_queue{handler="inventory"} 1"#),
        "{metrics}"
    );

    // Everything goes to the host that holds the queue, its outputs say so.
    let probe = client.bind_probe(&inv.events, "#");
    for id in 1..=10 {
        publish_order(&client, &inv, id);
    }
    a.wait_counter("inventory", "acked", 10);
    assert_eq!(stock(&a.admin), 990);
    let out = client.take(&probe, 10, Duration::from_secs(10));
    assert_eq!(out.len(), 10);
    assert!(out
        .iter()
        .all(|m| header(m, "x-event-host-host").as_deref() == Some("host-a")));
    assert_eq!(b.counters("inventory")["acked"], 0, "host-b took nothing");
    assert_eq!(
        handler_entry(&b.admin, "inventory")["status"],
        "refused_shared_queue",
        "still refused while host-a consumes"
    );

    // The first host goes: the second notices and serves.
    a.terminate();
    b.wait_ready();
    b.wait_log("the queue's other consumers have gone: consuming", 1);
    let entry = handler_entry(&b.admin, "inventory");
    assert_eq!(entry["status"], "consuming", "{entry}");
    assert_eq!(entry["status_reason"], Value::Null, "{entry}");
    for id in 11..=15 {
        publish_order(&client, &inv, id);
    }
    b.wait_counter("inventory", "acked", 5);
    assert_eq!(stock(&b.admin), 995, "host-b's own state: 5 orders");
    let out = client.take(&probe, 5, Duration::from_secs(10));
    assert_eq!(out.len(), 5);
    assert!(out
        .iter()
        .all(|m| header(m, "x-event-host-host").as_deref() == Some("host-b")));
    let (_, metrics) = http_get(&b.admin, "/metrics");
    assert!(
        metrics.contains(r#"event_host_handler_refused_shared_queue{handler="inventory"} 0"#),
        "{metrics}"
    );
    b.terminate();
}

/// Two hosts that start together both see an empty queue; the guard keeps
/// looking while it consumes. Here the other consumer is a plain client
/// that joins the queue of a running host: the host stops consuming, says
/// why, and consumes again once the client has gone. On classic and on
/// quorum queues (the broker counts consumers of both).
#[test]
fn an_embedded_host_steps_back_when_another_consumer_joins_its_queue_and_returns_when_it_leaves() {
    for queue_type in ["classic", "quorum"] {
        steps_back_and_returns(queue_type);
    }
}

fn steps_back_and_returns(queue_type: &str) {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let host = TestHost::start_embedded(
        &["inventory"],
        &format!(
            "host_id = \"solo\"\n{}",
            inv.config(&format!("queue_type = {queue_type:?}"))
        ),
    );
    let entry = host.handler("inventory");
    assert_eq!(entry["status"], "consuming", "{entry}");
    assert_eq!(entry["host_id"], "solo", "{entry}");
    assert_eq!(entry["state_backend"], "sqlite", "{entry}");
    assert_eq!(
        host.metric(r#"event_host_info{host_id="solo",state_backend="sqlite"}"#),
        1.0
    );

    // A plain consumer joins the queue.
    let tag = "intruder";
    let intruder = client.rt.block_on(async {
        client
            .ch
            .basic_consume(
                inv.queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap()
    });
    let refused = host.wait_handler(
        "inventory",
        |h| h["status"] == "refused_shared_queue",
        &format!("the host to step back ({queue_type})"),
    );
    assert!(
        refused["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains("1 other consumer") && r.contains("state_url")),
        "{refused}"
    );
    let (status, body) = host.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("state_url"), "{body}");

    // It leaves: the host consumes again and events flow to it.
    client.rt.block_on(async {
        client
            .ch
            .basic_cancel(tag.into(), BasicCancelOptions::default())
            .await
            .unwrap()
    });
    drop(intruder);
    host.wait_for("/readyz", |s, _| s == 200, "consuming again");
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_counter("inventory", "acked", 1);
    assert_eq!(
        host.metric(r#"event_host_handler_refused_shared_queue{handler="inventory"}"#),
        0.0
    );
    host.stop().unwrap();
}
