//! Dead letters as a workflow (`event-host dlq`, `/dlq/{handler}`): a bad
//! deploy dead-letters 300 orders; the handler is fixed by dropping the
//! good file in; the operator lists the DLQ and sends everything back —
//! with the first re-drive killed halfway — and every order is applied
//! exactly once. What the fleet did not sign stays where it is.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::Value;

use crate::amqp_support::{amqp_url, http_get_with, Client, Inventory, TestHost};
use crate::process::{event_host, run_to_end as run};
use crate::support::guest;

const ORDERS: u64 = 300;
const STOCK: u64 = 1000;

/// A config file for the CLI beside `host`'s state folder: the broker and
/// inventory's queue (the state comes from that folder, or on the suite's
/// PostgreSQL run from the environment `event_host` sets for it).
fn cli_config(host: &TestHost, inv: &Inventory) -> std::path::PathBuf {
    let state = host.state_dir();
    let file = state.parent().unwrap().join("cli.toml");
    std::fs::write(
        &file,
        format!(
            "amqp_url = {:?}\nstate_path = {:?}\n[handlers.inventory]\nqueue = {:?}\n",
            amqp_url(),
            state.to_str().unwrap(),
            inv.queue
        ),
    )
    .unwrap();
    file
}

fn dlq(host: &TestHost, config: &Path, args: &[&str]) -> Command {
    let mut cmd = event_host(host.state_dir().parent().unwrap());
    cmd.arg("dlq").args(args).arg("--config").arg(config);
    cmd
}

fn wait_depth(client: &Client, queue: &str, ok: impl Fn(u32) -> bool, what: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let depth = client.depth(queue);
        if ok(depth) {
            return depth;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {depth}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dlq_list_says_clearly_when_the_dlq_is_empty_or_the_handler_unknown() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let host = TestHost::start(&["inventory"], &inv.config(""));
    let config = cli_config(&host, &inv);
    let (ok, out, err) = run(dlq(&host, &config, &["list", "inventory"]));
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        format!("inventory: no dead letters ({}.dlq is empty)", inv.queue)
    );
    let (ok, _, err) = run(dlq(&host, &config, &["list", "no-such-handler"]));
    assert!(!ok);
    assert!(
        err.starts_with("error: ")
            && err.contains("no-such-handler")
            && err.contains("has no dead-letter queue"),
        "{err}"
    );
    // The admin endpoint knows its handlers.
    let (status, body) = http_get_with(&host.admin, "/dlq/no-such-handler", None);
    assert_eq!(status, 404, "{body}");
    let (status, body) = http_get_with(&host.admin, "/dlq/inventory", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["depth"], 0);
    host.stop().unwrap();
}

#[test]
fn a_redrive_killed_halfway_and_run_again_applies_every_dead_letter_once() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let dlq_name = format!("{}.dlq", inv.queue);
    // The bad deploy: every event traps, and goes to the DLQ at once (one
    // attempt; the breaker would otherwise pause the handler first).
    let host = TestHost::start(
        &["bad-inventory"],
        &inv.config_with_stock(
            "idempotency_key = \"/id\"\nmax_attempts = 1\nbreaker_failures = 1000000\n",
            STOCK,
        ),
    );
    for id in 1..=ORDERS {
        client.publish(
            &inv.orders,
            "",
            format!(r#"{{"id": {id}, "item": "Laptop", "quantity": 1}}"#).as_bytes(),
            BasicProperties::default(),
        );
    }
    wait_depth(
        &client,
        &dlq_name,
        |d| d == ORDERS as u32,
        "300 dead letters",
    );
    // Something the fleet did not sign, published straight to the
    // dead-letter exchange: it must not be sent to the work queue.
    let mut forged = FieldTable::default();
    forged.insert(
        "x-event-host-exchange".into(),
        AMQPValue::LongString("orders".into()),
    );
    client.publish(
        &format!("{}.dlx", inv.queue),
        "",
        br#"{"id": 9999, "item": "Laptop", "quantity": 500}"#,
        BasicProperties::default()
            .with_message_id("forged".into())
            .with_headers(forged),
    );
    wait_depth(
        &client,
        &dlq_name,
        |d| d == ORDERS as u32 + 1,
        "the forged one",
    );

    let config = cli_config(&host, &inv);
    let (ok, out, err) = run(dlq(&host, &config, &["list", "inventory", "--limit", "3"]));
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!(
            "inventory: 301 dead letters in {dlq_name}, the first 3"
        )),
        "{out}"
    );
    assert!(
        out.contains("attempts 1") && out.contains(r#"{"id": 1, "item": "Laptop""#),
        "{out}"
    );
    assert!(out.contains("reason: "), "{out}");
    // Listing moves nothing.
    assert_eq!(client.depth(&dlq_name), ORDERS as u32 + 1);

    // The fix: the good build of inventory, hot-reloaded.
    std::fs::copy(
        guest("inventory"),
        host.handlers_dir().join("bad-inventory.wasm"),
    )
    .unwrap();
    host.wait_handler(
        "inventory",
        |h| h["guest_version"] == "1.0.0" && h["status"] == "consuming",
        "the fixed inventory",
    );

    // First re-drive, slowed down, killed about halfway.
    let mut first = dlq(
        &host,
        &config,
        &["redrive", "inventory", "--all", "--rate", "100"],
    );
    let mut child = first
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_depth(&client, &dlq_name, |d| d <= 150, "half of them moved");
    child.kill().unwrap();
    let _ = child.wait();
    let left = client.depth(&dlq_name);
    assert!(left > 1, "killed before the end ({left} left)");

    // Run again: the rest go, the forged one stays.
    let (ok, out, err) = run(dlq(&host, &config, &["redrive", "inventory", "--all"]));
    assert!(ok, "{err}");
    assert!(out.contains("1 not signed by this fleet"), "{out}");
    wait_depth(&client, &dlq_name, |d| d == 1, "only the forged one left");
    let stock = host.wait_for(
        "/state/inventory/stock.Laptop",
        |_, body| serde_json::from_str::<Value>(body).is_ok_and(|v| v["value"] == STOCK - ORDERS),
        "every order applied",
    );
    // Once each: a copy sent twice (confirmed, then killed before its dead
    // letter was acked) is absorbed by the dedupe, not applied again.
    std::thread::sleep(Duration::from_secs(1));
    let (_, now) = host.get("/state/inventory/stock.Laptop");
    assert_eq!(now, stock, "applied once, no more");
    for id in [1, ORDERS / 2, ORDERS] {
        let (status, body) = host.get(&format!("/state/inventory/order.{id}"));
        assert_eq!(status, 200, "order {id}: {body}");
        assert!(body.contains("reserved"), "order {id}: {body}");
    }
    assert_eq!(client.depth(&inv.queue), 0);

    // The same from the admin endpoint: it must be told which, and it
    // sends back nothing the fleet did not sign.
    let (status, body) = post(&host.admin, "/dlq/inventory/redrive");
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&host.admin, "/dlq/inventory/redrive?message_id=forged");
    assert_eq!(status, 200, "{body}");
    let done: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (done["moved"].as_u64(), done["unsigned"].as_u64()),
        (Some(0), Some(1)),
        "{body}"
    );
    assert_eq!(client.depth(&dlq_name), 1);
    host.stop().unwrap();
}

/// `POST path` to the admin endpoint at `addr`: (status, body).
fn post(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: test\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}
