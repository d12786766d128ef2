//! Network faults on the path to the shared broker, through a proxy of the
//! test's own (`proxy.rs`): nobody else's connections are touched.

use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use serde_json::Value;

use crate::amqp_support::{amqp_url, Client, Inventory, TestHost};
use crate::proxy::Proxy;

/// host:port of the broker under test.
fn broker_addr() -> std::net::SocketAddr {
    let url = amqp_url();
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    };
    hostport.to_socket_addrs().unwrap().next().unwrap()
}

fn order(id: u64) -> Vec<u8> {
    format!(r#"{{"id": {id}, "item": "Laptop", "quantity": 1}}"#).into_bytes()
}

fn metric(host: &TestHost, name: &str) -> Option<f64> {
    let (_, text) = host.get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_silent_network_cut_is_noticed_within_two_heartbeats_and_the_host_recovers() {
    const HEARTBEAT: Duration = Duration::from_secs(1);
    let proxy = Proxy::start(broker_addr());
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let host = TestHost::start_with_url(
        &["inventory"],
        &format!(
            "heartbeat_secs = {}\n{}",
            HEARTBEAT.as_secs(),
            inv.config("")
        ),
        &proxy.url(&amqp_url()),
    );
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_counter("inventory", "acked", 1);

    // Bytes stop flowing; nothing tells either end.
    let cut = Instant::now();
    proxy.freeze();
    let detected = loop {
        if metric(&host, "event_host_broker_connected") == Some(0.0) {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "the cut was never noticed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        detected <= 2 * HEARTBEAT + Duration::from_millis(500),
        "noticed after {detected:?}, more than twice the {HEARTBEAT:?} heartbeat"
    );
    assert_ne!(host.get("/readyz").0, 200, "not ready while not consuming");

    // Events published meanwhile wait at the broker.
    for id in 2..=4 {
        client.publish(&inv.orders, "", &order(id), BasicProperties::default());
    }
    proxy.thaw();
    host.wait_counter("inventory", "acked", 4);
    host.wait_for("/readyz", |s, _| s == 200, "ready again");
    assert!(metric(&host, "event_host_broker_reconnects_total").unwrap_or(0.0) >= 1.0);
    let (_, body) = host.get("/state/inventory/stock.Laptop");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["value"], 6);
    eprintln!("silent cut noticed after {detected:?} (heartbeat {HEARTBEAT:?})");
    host.stop().unwrap();
}

#[test]
fn a_consumer_cancelled_by_the_broker_is_redeclared_and_resumed() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let host = TestHost::start(&["inventory"], &inv.config(""));
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_counter("inventory", "acked", 1);

    // An operator deletes the work queue: the broker cancels the consumer.
    client.rt.block_on(async {
        client
            .ch
            .queue_delete(inv.queue.as_str().into(), Default::default())
            .await
            .unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&host, "event_host_broker_reconnects_total").unwrap_or(0.0) < 1.0 {
        assert!(Instant::now() < deadline, "the cancel went unnoticed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Topology redeclared (queue and binding), consuming again.
    host.wait_for("/readyz", |s, _| s == 200, "ready again");
    client.publish(&inv.orders, "", &order(2), BasicProperties::default());
    host.wait_counter("inventory", "acked", 2);
    let (_, body) = host.get("/state/inventory/stock.Laptop");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["value"], 8);
    host.stop().unwrap();
}
