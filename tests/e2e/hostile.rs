//! Hostile inputs against a real RabbitMQ (issue 11, the broker side):
//! nothing a publisher sends and nothing a guest produces may panic the
//! host, end its broker session or loop hot. Each test checks that the
//! session was never reconnected (`event_host_broker_reconnects_total`)
//! and that the next events still flow.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde_json::Value;

use crate::amqp_support::{declare_topic, header, unique, Client, Inventory, TestHost};

const RECONNECTS: &str = "event_host_broker_reconnects_total";

/// Names for one chaos deployment (its topology deleted when `client`
/// drops).
struct Chaos {
    exchange: String,
    queue: String,
    dlq: String,
}

impl Chaos {
    fn new(client: &mut Client) -> Self {
        let (exchange, queue) = (unique("chaos"), unique("chaos-q"));
        client.cleanup_handler(&queue, 50, &[&exchange]);
        Self {
            dlq: format!("{queue}.dlq"),
            exchange,
            queue,
        }
    }

    /// Its config section; `publishes_to` lists every exchange it
    /// publishes to (the allow-list).
    fn config(&self, publishes_to: &[&str], extra: &str) -> String {
        let outs: Vec<String> = publishes_to
            .iter()
            .map(|e| format!("{{ exchange = {e:?}, kind = \"topic\" }}"))
            .collect();
        format!(
            r##"
[handlers.chaos]
queue = "{}"
subscriptions = [{{ exchange = "{}", kind = "topic", binding_keys = ["#"] }}]
retry_base_ms = 50
publishes_to = [{}]
{extra}
"##,
            self.queue,
            self.exchange,
            outs.join(", ")
        )
    }

    fn send(&self, client: &Client, payload: &str, props: BasicProperties) {
        client.publish(&self.exchange, "k", payload.as_bytes(), props);
    }
}

fn order(id: u64) -> Vec<u8> {
    format!(r#"{{"id": {id}, "item": "Laptop", "quantity": 1}}"#).into_bytes()
}

#[test]
fn an_order_with_a_250_byte_message_id_is_applied_acked_and_published() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    declare_topic(&client, &inv.events);
    let reserved = client.bind_probe(&inv.events, "#");
    let host = TestHost::start(&["inventory"], &inv.config(""));
    let long_id = "m".repeat(250);
    client.publish(
        &inv.orders,
        "",
        &order(1),
        BasicProperties::default().with_message_id(ShortString::try_new(long_id).unwrap()),
    );
    host.wait_counter("inventory", "acked", 1);
    let got = client.take(&reserved, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "the reservation was published");
    let id = got[0]
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap();
    // `inventory:{250 bytes}:0` shortened: a readable prefix and a hash.
    assert!(id.len() <= 255 && id.starts_with("inventory:mmm"), "{id}");
    // The next order flows, and the session never dropped.
    client.publish(&inv.orders, "", &order(2), BasicProperties::default());
    host.wait_for(
        "/state/inventory/stock.Laptop",
        |s, b| s == 200 && b.contains("\"value\":8"),
        "both orders applied",
    );
    assert_eq!(host.metric(RECONNECTS), 0.0);
    host.stop().unwrap();
    // Nothing left behind: the queue is empty and a new host starts.
    assert_eq!(client.depth(&inv.queue), 0);
    let again = TestHost::start(&["inventory"], &inv.config(""));
    assert_eq!(again.metric(RECONNECTS), 0.0);
    again.stop().unwrap();
}

/// An order whose id makes inventory's `order.<id>` key longer than
/// `max_key_bytes`: the host refuses the state call, inventory asks for a
/// retry (to it, a state error is transient), and the host dead-letters
/// the order on its first attempt, saying why, instead of retrying what
/// would be refused again. The next order flows.
#[test]
fn an_order_over_the_key_limit_is_dead_lettered_at_once_with_the_limit_named() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    declare_topic(&client, &inv.events);
    let host = TestHost::start(&["inventory"], &inv.config("max_attempts = 5"));
    let id = "i".repeat(600);
    client.publish(
        &inv.orders,
        "",
        format!(r#"{{"id": "{id}", "item": "Laptop", "quantity": 1}}"#).as_bytes(),
        BasicProperties::default(),
    );
    let dead = client.take(&format!("{}.dlq", inv.queue), 1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1, "dead-lettered");
    assert_eq!(
        header(&dead[0], "x-event-host-attempts").as_deref(),
        Some("1")
    );
    let reason = header(&dead[0], "x-event-host-reason").unwrap();
    assert!(
        reason.starts_with("a state call went over a per-event limit (key of 606 bytes")
            && reason.contains("(max_key_bytes)"),
        "{reason}"
    );
    assert_eq!(host.counter("inventory", "retried"), 0, "never retried");
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_for(
        "/state/inventory/stock.Laptop",
        |s, b| s == 200 && b.contains("\"value\":9"),
        "the next order applied",
    );
    assert_eq!(host.metric(RECONNECTS), 0.0);
    host.stop().unwrap();
}

#[test]
fn a_300_kb_reject_reason_is_capped_and_the_other_handler_keeps_consuming() {
    let mut client = Client::connect();
    let chaos = Chaos::new(&mut client);
    let inv = Inventory::new();
    inv.cleanup(&mut client);
    declare_topic(&client, &inv.events);
    let config = format!("{}{}", chaos.config(&[], ""), inv.config(""));
    let host = TestHost::start(&["chaos", "inventory"], &config);
    chaos.send(
        &client,
        r#"{"action":"reject","reason_bytes":300000}"#,
        BasicProperties::default(),
    );
    let dead = client.take(&chaos.dlq, 1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1, "dead-lettered");
    let reason = header(&dead[0], "x-event-host-reason").unwrap();
    assert!(reason.len() <= 1024, "{} bytes", reason.len());
    assert!(reason.starts_with("xxxx"), "{reason}");
    assert!(reason.contains("300000 bytes"), "{reason}");
    client.publish(&inv.orders, "", &order(1), BasicProperties::default());
    host.wait_for(
        "/state/inventory/stock.Laptop",
        |s, b| s == 200 && b.contains("\"value\":9"),
        "inventory applied its order",
    );
    assert_eq!(host.metric(RECONNECTS), 0.0, "the session never dropped");
    host.stop().unwrap();
}

#[test]
fn a_forged_attempt_header_does_not_skip_the_retries() {
    let mut client = Client::connect();
    let chaos = Chaos::new(&mut client);
    let host = TestHost::start(&["chaos"], &chaos.config(&[], "max_attempts = 3"));
    let mut forged = FieldTable::default();
    forged.insert(
        ShortString::try_new("x-event-host-attempt").unwrap(),
        AMQPValue::LongLongInt(99),
    );
    forged.insert(
        ShortString::try_new("x-event-host-exchange").unwrap(),
        AMQPValue::LongString(LongString::from("forged")),
    );
    chaos.send(
        &client,
        r#"{"action":"retry","reason":"not yet"}"#,
        BasicProperties::default().with_headers(forged),
    );
    let dead = client.take(&chaos.dlq, 1, Duration::from_secs(20));
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "x-event-host-attempts").as_deref(),
        Some("3")
    );
    assert_eq!(
        header(&dead[0], "x-event-host-exchange").as_deref(),
        Some(chaos.exchange.as_str()),
        "the delivery's own exchange, not the forged one"
    );
    // A dead-letter copy carries no attempt: moved back to the work queue
    // (by hand, or by `dlq redrive`), it starts afresh. Its signature
    // covers attempt 0, which no delivery is: `dlq redrive` checks it, the
    // work queue's consumer never counts it as a retry.
    assert_eq!(header(&dead[0], "x-event-host-attempt"), None);
    assert!(header(&dead[0], "x-event-host-signature").is_some());
    let counters = host.counters("chaos");
    assert_eq!(counters["retried"], 2, "{counters}");
    assert_eq!(counters["instantiations"], 3, "{counters}");
    host.stop().unwrap();
}

/// RabbitMQ reads a message's `x-death` when a queue dead-letters it; a
/// publisher's malformed one (here a number where it keeps a table)
/// crashed the delay queue's process, which then nacked every retry copy
/// of the handler. Retry copies carry no death records of the publisher's.
#[test]
fn a_forged_x_death_header_does_not_break_the_retry_path() {
    let mut client = Client::connect();
    let chaos = Chaos::new(&mut client);
    let host = TestHost::start(&["chaos"], &chaos.config(&[], "max_attempts = 3"));
    let mut forged = FieldTable::default();
    forged.insert(
        ShortString::try_new("x-death").unwrap(),
        AMQPValue::FieldArray(vec![AMQPValue::ShortInt(22055)].into()),
    );
    forged.insert(
        ShortString::try_new("x-last-death-queue").unwrap(),
        AMQPValue::LongLongInt(7),
    );
    for _ in 0..2 {
        chaos.send(
            &client,
            r#"{"action":"retry","reason":"not yet"}"#,
            BasicProperties::default().with_headers(forged.clone()),
        );
    }
    let dead = client.take(&chaos.dlq, 2, Duration::from_secs(30));
    assert_eq!(dead.len(), 2, "both went through every retry to the DLQ");
    for m in &dead {
        assert_eq!(header(m, "x-event-host-attempts").as_deref(), Some("3"));
    }
    let counters = host.counters("chaos");
    assert_eq!(counters["retried"], 4, "{counters}");
    assert_eq!(counters["dead_lettered"], 2, "{counters}");
    assert_eq!(host.metric(RECONNECTS), 0.0);
    host.stop().unwrap();
}

/// An internal topic exchange: the broker refuses (403) any publish to it.
fn declare_internal(client: &Client, exchange: &str) {
    client.rt.block_on(async {
        client
            .ch
            .exchange_declare(
                ShortString::try_new(exchange).unwrap(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    internal: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
    });
}

/// Declare a queue bound to `exchange` that holds one message and refuses
/// more (`x-overflow = reject-publish`), filled.
fn full_queue(client: &Client, exchange: &str, queue: &str) {
    client.rt.block_on(async {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::try_new("x-max-length").unwrap(),
            AMQPValue::LongLongInt(1),
        );
        args.insert(
            ShortString::try_new("x-overflow").unwrap(),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
        client
            .ch
            .queue_declare(
                ShortString::try_new(queue).unwrap(),
                QueueDeclareOptions::default(),
                args,
            )
            .await
            .unwrap();
        client
            .ch
            .queue_bind(
                ShortString::try_new(queue).unwrap(),
                ShortString::try_new(exchange).unwrap(),
                ShortString::try_new("#").unwrap(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    });
    client.publish(exchange, "x", b"filler", BasicProperties::default());
}

#[test]
fn a_publish_the_broker_refuses_is_dead_lettered_and_the_session_stays_up() {
    let mut client = Client::connect();
    let chaos = Chaos::new(&mut client);
    let (internal, full_x, full_q, ok) = (
        unique("internal"),
        unique("full-x"),
        unique("full-q"),
        unique("ok"),
    );
    client.cleanup(&[&full_q], &[&internal, &full_x, &ok]);
    declare_internal(&client, &internal);
    declare_topic(&client, &full_x);
    declare_topic(&client, &ok);
    full_queue(&client, &full_x, &full_q);
    let probe = client.bind_probe(&ok, "#");
    let host = TestHost::start(
        &["chaos"],
        &chaos.config(&[&internal, &full_x, &ok], "max_attempts = 2"),
    );
    for exchange in [&internal, &full_x] {
        chaos.send(
            &client,
            &format!(r#"{{"action":"publish","exchange":"{exchange}","routing_key":"x"}}"#),
            BasicProperties::default(),
        );
    }
    let dead = client.take(&chaos.dlq, 2, Duration::from_secs(15));
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| header(m, "x-event-host-reason").unwrap_or_default())
        .collect();
    assert_eq!(dead.len(), 2, "{reasons:?}");
    for exchange in [&internal, &full_x] {
        assert!(
            reasons.iter().any(|r| r
                .starts_with(&format!("broker refused publish to exchange {exchange:?}"))),
            "{exchange}: {reasons:?}"
        );
    }
    // The outputs themselves went to the DLQ: their bodies, not the inputs'.
    assert!(dead
        .iter()
        .all(|m| serde_json::from_slice::<Value>(&m.delivery.data).unwrap()["seq"] == 0));
    // The events were acked; the next ones flow on the same session.
    host.wait_counter("chaos", "acked", 2);
    chaos.send(
        &client,
        &format!(r#"{{"action":"publish","exchange":"{ok}","routing_key":"x"}}"#),
        BasicProperties::default(),
    );
    assert_eq!(client.take(&probe, 1, Duration::from_secs(10)).len(), 1);
    assert_eq!(host.metric(RECONNECTS), 0.0, "the session never dropped");
    assert_eq!(client.depth(&chaos.queue), 0);
    host.stop().unwrap();
}

#[test]
fn a_delivery_with_oversized_headers_goes_to_its_dlq_with_the_hosts_headers_only() {
    let mut client = Client::connect();
    let chaos = Chaos::new(&mut client);
    let host = TestHost::start(&["chaos"], &chaos.config(&[], ""));
    let mut big = FieldTable::default();
    for i in 0..80 {
        big.insert(
            ShortString::try_new(format!("h{i}")).unwrap(),
            AMQPValue::LongString(LongString::from("y".repeat(1000))),
        );
    }
    chaos.send(
        &client,
        r#"{"action":"ok"}"#,
        BasicProperties::default().with_headers(big),
    );
    chaos.send(&client, r#"{"action":"ok"}"#, BasicProperties::default());
    let dead = client.take(&chaos.dlq, 1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1);
    let reason = header(&dead[0], "x-event-host-reason").unwrap();
    assert!(
        reason.starts_with("headers of ") && reason.ends_with("bytes over the 65536-byte cap"),
        "{reason}"
    );
    assert_eq!(
        header(&dead[0], "h0"),
        None,
        "the publisher's headers dropped"
    );
    assert_eq!(
        header(&dead[0], "x-event-host-handler").as_deref(),
        Some("chaos")
    );
    host.wait_counter("chaos", "acked", 1);
    assert_eq!(host.counter("chaos", "instantiations"), 1, "never ran");
    assert_eq!(host.metric(RECONNECTS), 0.0);
    host.stop().unwrap();
}

#[test]
fn quorum_retry_queues_dead_letter_at_least_once_and_retry_exactly_max_attempts() {
    let mut client = Client::connect();
    let chaos = Chaos::new(&mut client);
    let host = TestHost::start(
        &["chaos"],
        &chaos.config(&[], "max_attempts = 3\nqueue_type = \"quorum\""),
    );
    chaos.send(
        &client,
        r#"{"action":"retry","reason":"not yet"}"#,
        BasicProperties::default(),
    );
    let dead = client.take(&chaos.dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "x-event-host-attempts").as_deref(),
        Some("3")
    );
    let counters = host.counters("chaos");
    assert_eq!(counters["instantiations"], 3, "{counters}");
    assert_eq!(counters["retried"], 2, "{counters}");
    host.stop().unwrap();
    // The delay queues were declared with at-least-once dead-lettering: a
    // redeclare with exactly those arguments succeeds (the broker refuses a
    // redeclare whose arguments differ).
    for ms in [50, 100] {
        let queue = format!("{}.retry.{ms}ms", chaos.queue);
        let mut args = FieldTable::default();
        for (k, v) in [
            ("x-queue-type", "quorum"),
            ("x-dead-letter-strategy", "at-least-once"),
            ("x-overflow", "reject-publish"),
            ("x-dead-letter-exchange", ""),
            ("x-dead-letter-routing-key", chaos.queue.as_str()),
        ] {
            args.insert(
                ShortString::try_new(k).unwrap(),
                AMQPValue::LongString(LongString::from(v)),
            );
        }
        args.insert(
            ShortString::try_new("x-message-ttl").unwrap(),
            AMQPValue::LongLongInt(ms),
        );
        let declared = client.rt.block_on(async {
            let ch = client.conn.create_channel().await.unwrap();
            ch.queue_declare(
                ShortString::try_new(queue.as_str()).unwrap(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
        });
        assert!(declared.is_ok(), "{queue}: {declared:?}");
    }
}

#[test]
fn a_quorum_delay_queue_declared_by_an_older_host_is_kept_rather_than_refusing_the_handler() {
    let mut client = Client::connect();
    let chaos = Chaos::new(&mut client);
    // What hosts before at-least-once dead-lettering declared.
    let old = format!("{}.retry.50ms", chaos.queue);
    client.rt.block_on(async {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::try_new("x-queue-type").unwrap(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args.insert(
            ShortString::try_new("x-message-ttl").unwrap(),
            AMQPValue::LongLongInt(50),
        );
        args.insert(
            ShortString::try_new("x-dead-letter-exchange").unwrap(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            ShortString::try_new("x-dead-letter-routing-key").unwrap(),
            AMQPValue::LongString(LongString::from(chaos.queue.as_str())),
        );
        client
            .ch
            .queue_declare(
                ShortString::try_new(old.as_str()).unwrap(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
    });
    let host = TestHost::start(
        &["chaos"],
        &chaos.config(&[], "max_attempts = 2\nqueue_type = \"quorum\""),
    );
    chaos.send(
        &client,
        r#"{"action":"retry","reason":"not yet"}"#,
        BasicProperties::default(),
    );
    let dead = client.take(&chaos.dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "retried through the old delay queue");
    assert_eq!(host.counter("chaos", "retried"), 1);
    host.stop().unwrap();
}

#[test]
fn outbox_rows_the_broker_refuses_or_with_long_ids_never_block_startup() {
    use event_host::state::{Commit, Outgoing};
    let mut client = Client::connect();
    let chaos = Chaos::new(&mut client);
    let (internal, ok) = (unique("internal"), unique("ok"));
    client.cleanup(&[], &[&internal, &ok]);
    declare_internal(&client, &internal);
    declare_topic(&client, &ok);
    let probe = client.bind_probe(&ok, "#");
    let message = |exchange: &str, id: String| Outgoing {
        exchange: exchange.to_owned(),
        routing_key: "x".into(),
        payload: br#"{"seq": 0}"#.to_vec(),
        content_type: None,
        message_id: Some(id),
        correlation_id: None,
        headers: vec![("h".repeat(300), "v".into())],
    };
    // A previous run declared the topology, committed these and died
    // before the broker confirmed them (outbox rows from before ids were
    // checked may be over-long).
    TestHost::start(&["chaos"], &chaos.config(&[&internal, &ok], ""))
        .stop()
        .unwrap();
    let host = TestHost::start_prepared(
        &["chaos"],
        &chaos.config(&[&internal, &ok], ""),
        &crate::amqp_support::amqp_url(),
        |state| {
            let store = crate::backend::open_state(state);
            let commit = Commit {
                ns: "chaos".into(),
                message_id: None,
                reads: Vec::new(),
                writes: Vec::new(),
                outbox: vec![
                    message(&internal, "refused".into()),
                    message(&ok, "i".repeat(300)),
                ],
            };
            store.commit(&[commit]).unwrap();
        },
    );
    let relayed = client.take(&probe, 1, Duration::from_secs(10));
    assert_eq!(relayed.len(), 1, "the good row relayed");
    let id = relayed[0]
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap();
    assert!(id.len() <= 255 && id.starts_with("iii"), "{id}");
    let dead = client.take(&chaos.dlq, 1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1, "the refused row dead-lettered");
    let reason = header(&dead[0], "x-event-host-reason").unwrap();
    assert!(
        reason.starts_with(&format!("broker refused publish to exchange {internal:?}")),
        "{reason}"
    );
    assert_eq!(host.metric(RECONNECTS), 0.0);
    host.stop().unwrap();
}
