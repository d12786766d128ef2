//! The seed article's own services beside the host, unchanged: an Order
//! Service and an Inventory Service, plain pika scripts. Each declares
//! the `orders` fanout exchange with pika's defaults (not durable) before
//! it publishes or binds; RabbitMQ refuses a declaration whose attributes
//! differ from the exchange's, so the host must declare `orders` the same
//! way (`[exchanges.orders]` in `examples/config.toml`) or the second to
//! start fails with PRECONDITION_FAILED. Both start orders are tested,
//! with the AMQP calls the scripts make, and the example's section (under
//! this test's exchange name, so tests do not share an exchange).

use std::time::Duration;

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::Value;

use crate::amqp_support::{Client, Inventory, TestHost};
use crate::support::repo_root;

/// `channel.exchange_declare(exchange='orders', exchange_type='fanout')`,
/// as both seed scripts start: pika's defaults, not durable.
fn seed_declares_orders(client: &Client, exchange: &str) -> Result<(), lapin::Error> {
    client.rt.block_on(client.ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
}

/// The seed's Inventory Service up to `start_consuming`: the exchange, a
/// server-named exclusive queue, bound to it. Returns the queue.
fn seed_inventory_service(client: &Client, exchange: &str) -> Result<String, lapin::Error> {
    seed_declares_orders(client, exchange)?;
    Ok(client.bind_probe(exchange, ""))
}

/// The seed's Order Service: declare, then publish the order with no
/// properties at all.
fn seed_order_service(client: &Client, exchange: &str, order: &str) -> Result<(), lapin::Error> {
    seed_declares_orders(client, exchange)?;
    client.publish(exchange, "", order.as_bytes(), BasicProperties::default());
    Ok(())
}

/// `examples/config.toml`'s `[exchanges.orders]`, for `exchange`.
fn example_orders_section(exchange: &str) -> String {
    let path = repo_root().join("examples/config.toml");
    let config: toml::Table = std::fs::read_to_string(&path)
        .expect("reading examples/config.toml")
        .parse()
        .expect("examples/config.toml parses");
    let orders = config
        .get("exchanges")
        .and_then(|e| e.get("orders"))
        .and_then(toml::Value::as_table)
        .expect("examples/config.toml has [exchanges.orders]");
    format!(
        "\n[exchanges.{exchange:?}]\n{}",
        toml::to_string(orders).expect("serialises")
    )
}

fn stock(host: &TestHost) -> Option<i64> {
    let (status, body) = host.get("/state/inventory/stock.Laptop");
    (status == 200)
        .then(|| serde_json::from_str::<Value>(&body).ok())
        .flatten()
        .and_then(|v| v["value"].as_i64())
}

fn seed_and_host(host_first: bool) {
    let names = Inventory::new();
    let mut client = Client::connect();
    names.cleanup(&mut client);
    let config = names.config("") + &example_orders_section(&names.orders);
    let (host, seed_queue) = if host_first {
        let host = TestHost::start(&["inventory"], &config);
        let queue = seed_inventory_service(&client, &names.orders)
            .expect("the seed's Inventory Service declares `orders` after the host");
        (host, queue)
    } else {
        let queue = seed_inventory_service(&client, &names.orders)
            .expect("the seed's Inventory Service starts on an empty broker");
        (TestHost::start(&["inventory"], &config), queue)
    };
    let order = r#"{"id": 1, "item": "Laptop", "quantity": 1}"#;
    seed_order_service(&client, &names.orders, order)
        .expect("the seed's Order Service declares `orders` beside the host");

    // Both consumers get the order: the seed's print and the host's stock.
    let got = client.take(&seed_queue, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "the seed's Inventory Service got the order");
    assert_eq!(got[0].delivery.data, order.as_bytes());
    host.wait_counter("inventory", "acked", 1);
    assert_eq!(stock(&host), Some(9), "the host reserved the Laptop");
    host.stop().unwrap();
}

#[test]
fn the_seed_services_then_the_host_share_orders() {
    seed_and_host(false);
}

#[test]
fn the_host_then_the_seed_services_share_orders() {
    seed_and_host(true);
}

/// Without the section, the host declares `orders` durable and the seed's
/// declaration is refused: what the section is for (and what a user with
/// the old example sees).
#[test]
fn a_durable_orders_exchange_refuses_the_seed_services_declaration() {
    let names = Inventory::new();
    let mut client = Client::connect();
    names.cleanup(&mut client);
    let host = TestHost::start(&["inventory"], &names.config(""));
    let err = seed_declares_orders(&client, &names.orders).expect_err("refused");
    assert!(
        err.to_string().contains("PRECONDITION_FAILED") || err.to_string().contains("406"),
        "{err}"
    );
    host.stop().unwrap();
}
