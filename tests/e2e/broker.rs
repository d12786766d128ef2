//! Against a real RabbitMQ (`EVENT_HOST_AMQP_URL`, default local): interop
//! with plain clients both ways, retry with backoff then the DLQ, reject,
//! traps and timeouts, the outbox, effectively-once, poison inputs.
//! Every test uses its own exchange and queue names and deletes them.

use std::time::Duration;

use lapin::BasicProperties;
use serde_json::{json, Value};

use crate::amqp_support::{declare_topic, header, unique, Client, Inventory, TestHost};

/// Inventory on names of its own, and a queue bound to its
/// `inventory.reserved` announcements: (names, client, that queue, host).
fn inventory_with_a_reservations_probe() -> (Inventory, Client, String, TestHost) {
    inventory_configured_with_a_reservations_probe("")
}

/// [`inventory_with_a_reservations_probe`], with `top` (top-level config
/// lines) in the host's config.
pub(crate) fn inventory_configured_with_a_reservations_probe(
    top: &str,
) -> (Inventory, Client, String, TestHost) {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    declare_topic(&client, &inv.events);
    let reserved = client.bind_probe(&inv.events, "inventory.reserved");
    let host = TestHost::start(&["inventory"], &format!("{top}{}", inv.config("")));
    (inv, client, reserved, host)
}

#[test]
fn a_plain_client_publishing_with_no_properties_changes_stock() {
    let (inv, client, reserved, host) = inventory_with_a_reservations_probe();

    // Exactly what a pika script sends: a body, no properties at all.
    client.publish(
        &inv.orders,
        "",
        br#"{"id": 1, "item": "Laptop", "quantity": 1}"#,
        BasicProperties::default(),
    );
    let path = "/state/inventory/stock.Laptop";
    let body = host.wait_for(path, |s, _| s == 200, "stock to change");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"key": "stock.Laptop", "value": 9})
    );

    // ... and a plain consumer sees what inventory published.
    let got = client.take(&reserved, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    let body: Value = serde_json::from_slice(&got[0].delivery.data).unwrap();
    assert_eq!(body["remaining"], 9);
    assert_eq!(
        got[0]
            .delivery
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
        Some("application/json")
    );
    // Which host made it: by default `<hostname>-<pid>` (the host runs in
    // this process; the suite's PostgreSQL run names its hosts), the id
    // `/handlers` shows too, beside the backend.
    let made_by = header(&got[0], "x-event-host-host").unwrap_or_default();
    let (expected_id, backend) = if crate::backend::on_postgres() {
        (crate::backend::host_id_for(&host.state_dir()), "postgres")
    } else {
        (format!("-{}", std::process::id()), "sqlite")
    };
    assert!(made_by.ends_with(&expected_id), "{made_by}");
    let entry = host.handler("inventory");
    assert_eq!(entry["host_id"].as_str(), Some(made_by.as_str()), "{entry}");
    assert_eq!(entry["state_backend"], backend, "{entry}");
    assert_eq!(host.get("/state/inventory/no-such-key").0, 404);
    host.stop().unwrap();
}

/// A headers exchange: the broker routes on the message's headers by the
/// subscription's bindings (`k=v,...`, all must match; `x-match=any` for
/// one), and ignores routing keys.
#[test]
fn a_headers_exchange_subscription_is_routed_by_the_broker() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    let config = format!(
        r#"
[handlers.inventory]
queue = "{q}"
subscriptions = [{{ exchange = "{o}", kind = "headers", binding_keys = ["type=order,region=eu", "x-match=any,vip=yes,rush=yes"] }}]
publishes_to = [{{ exchange = "{e}", kind = "topic" }}]
# As `Inventory::config` has it: the retry queues `Inventory::cleanup`
# deletes are named from this base.
retry_base_ms = 50
[handlers.inventory.config]
"stock.Laptop" = "10"
"inventory-exchange" = "{e}"
"#,
        q = inv.queue,
        o = inv.orders,
        e = inv.events,
    );
    let host = TestHost::start(&["inventory"], &config);
    let headers = |pairs: &[(&str, &str)]| {
        let mut table = lapin::types::FieldTable::default();
        for (k, v) in pairs {
            table.insert(
                (*k).into(),
                lapin::types::AMQPValue::LongString((*v).into()),
            );
        }
        BasicProperties::default().with_headers(table)
    };
    // (order id, its headers, whether a binding routes it)
    type Order<'a> = (u32, &'a [(&'a str, &'a str)], bool);
    let orders: [Order; 5] = [
        (1, &[("type", "order"), ("region", "eu")], true),
        (2, &[("type", "order"), ("region", "us")], false),
        (3, &[("type", "order")], false),
        (4, &[("rush", "yes")], true),
        (5, &[], false),
    ];
    for (id, pairs, _) in orders {
        client.publish(
            &inv.orders,
            "any.routing.key",
            format!(r#"{{"id": {id}, "item": "Laptop", "quantity": 1}}"#).as_bytes(),
            headers(pairs),
        );
    }
    let routed = orders.iter().filter(|(_, _, routed)| *routed).count() as u64;
    host.wait_counter("inventory", "acked", routed);
    // Give a wrongly routed order the time to arrive: none does.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(host.counter("inventory", "acked"), routed);
    for (id, _, routed) in orders {
        let (status, _) = host.get(&format!("/state/inventory/order.{id}"));
        assert_eq!(status == 200, routed, "order {id}");
    }
    host.stop().unwrap();
}

#[test]
fn the_exchanges_a_handler_publishes_to_are_declared_with_its_topology() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    // Nobody declares inventory's output exchange: the host does, from
    // `publishes_to` (which `Inventory::config` sets, as the renamed
    // output must be allowed), before the first event can publish to it.
    let host = TestHost::start(&["inventory"], &inv.config(""));
    // Binding fails (and the test with it) if the exchange is missing; the
    // pattern matches only on a topic exchange, and the other binding
    // would match too on a fanout one.
    let reserved = client.bind_probe(&inv.events, "inventory.*");
    let elsewhere = client.bind_probe(&inv.events, "audit.#");
    client.publish(
        &inv.orders,
        "",
        br#"{"id": 7, "item": "Laptop", "quantity": 2}"#,
        BasicProperties::default(),
    );
    let got = client.take(&reserved, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "the reservation was routed");
    assert_eq!(got[0].delivery.routing_key.as_str(), "inventory.reserved");
    assert!(client
        .take(&elsewhere, 1, Duration::from_millis(300))
        .is_empty());
    host.stop().unwrap();
}

#[test]
fn a_plain_queue_receives_what_order_publisher_publishes() {
    let checkout = unique("checkout");
    let orders = unique("orders");
    let queue = unique("order-publisher");
    let mut client = Client::connect();
    client.cleanup_handler(&queue, 1000, &[&checkout, &orders]);
    client.rt.block_on(async {
        client
            .ch
            .exchange_declare(
                orders.as_str().into(),
                lapin::ExchangeKind::Fanout,
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
    });
    let probe = client.bind_probe(&orders, "");
    let config = format!(
        r#"
[handlers.order-publisher]
queue = "{queue}"
subscriptions = [{{ exchange = "{checkout}", kind = "direct", binding_keys = ["checkout.requested"] }}]
publishes_to = [{{ exchange = "{orders}", kind = "fanout" }}]
[handlers.order-publisher.config]
"orders-exchange" = "{orders}"
"#
    );
    let host = TestHost::start(&["order-publisher"], &config);
    client.publish(
        &checkout,
        "checkout.requested",
        br#"{"item": "Laptop", "quantity": 2, "customer": "c-7"}"#,
        BasicProperties::default(),
    );
    client.publish(
        &checkout,
        "other.key",
        br#"{"item": "Laptop", "quantity": 1}"#,
        BasicProperties::default(),
    );
    let got = client.take(&probe, 2, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "only the checkout.requested key is bound");
    let m = &got[0].delivery;
    assert_eq!(
        serde_json::from_slice::<Value>(&m.data).unwrap(),
        json!({"id": 1, "item": "Laptop", "quantity": 2, "customer": "c-7"})
    );
    assert_eq!(
        m.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("order-1")
    );
    assert_eq!(
        m.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    host.stop().unwrap();
}

pub(crate) fn chaos_config(queue: &str, exchange: &str, extra: &str) -> String {
    format!(
        r##"
[handlers.chaos]
queue = "{queue}"
subscriptions = [{{ exchange = "{exchange}", kind = "topic", binding_keys = ["#"] }}]
retry_base_ms = 50
{extra}
"##
    )
}

pub(crate) struct Chaos {
    pub(crate) exchange: String,
    pub(crate) queue: String,
    pub(crate) client: Client,
    pub(crate) dlq: String,
}

impl Chaos {
    pub(crate) fn new() -> Self {
        let (exchange, queue) = (unique("chaos"), unique("chaos-q"));
        let mut client = Client::connect();
        let dlq = format!("{queue}.dlq");
        let retries: Vec<String> = [50, 100, 200, 400]
            .iter()
            .map(|ms| format!("{queue}.retry.{ms}ms"))
            .collect();
        let mut queues: Vec<&str> = vec![&queue, &dlq];
        queues.extend(retries.iter().map(String::as_str));
        client.cleanup(&queues, &[&exchange, &format!("{queue}.dlx")]);
        Self {
            exchange,
            queue,
            client,
            dlq,
        }
    }

    fn start(&self, extra: &str) -> TestHost {
        TestHost::start(
            &["chaos"],
            &chaos_config(&self.queue, &self.exchange, extra),
        )
    }

    /// Publish an event the guest retries until it is dead-lettered
    /// (after the config's `max_attempts`), with the trace [`TRACE`] from
    /// [`PARENT`]; its dead-letter copy.
    pub(crate) fn retried_until_dead_with_a_trace(&self) -> lapin::message::BasicGetMessage {
        self.client.publish(
            &self.exchange,
            "k",
            br#"{"action": "retry", "reason": "not yet"}"#,
            traced(&format!("00-{TRACE}-{PARENT}-01")),
        );
        let mut dead = self.client.take(&self.dlq, 1, Duration::from_secs(20));
        assert_eq!(dead.len(), 1);
        dead.remove(0)
    }

    fn send(&self, payload: &str) {
        self.client.publish(
            &self.exchange,
            "k",
            payload.as_bytes(),
            BasicProperties::default(),
        );
    }
}

#[test]
fn retry_backs_off_then_dead_letters_after_exactly_max_attempts() {
    let c = Chaos::new();
    let host = c.start("max_attempts = 3");
    c.send(r#"{"action":"retry","reason":"not yet"}"#);
    let dead = c.client.take(&c.dlq, 1, Duration::from_secs(20));
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "x-event-host-attempts").as_deref(),
        Some("3")
    );
    assert_eq!(
        header(&dead[0], "x-event-host-handler").as_deref(),
        Some("chaos")
    );
    assert!(header(&dead[0], "x-event-host-reason")
        .unwrap()
        .contains("attempts exhausted (3/3): not yet"));
    assert_eq!(
        header(&dead[0], "x-event-host-version").map(|v| v.len()),
        Some(64)
    );
    assert_eq!(
        header(&dead[0], "x-event-host-host"),
        host.handler("chaos")["host_id"].as_str().map(str::to_owned),
        "the host that dead-lettered it"
    );
    let counters = host.counters("chaos");
    assert_eq!(
        counters["instantiations"], 3,
        "exactly max-attempts deliveries: {counters}"
    );
    assert_eq!(counters["retried"], 2);
    assert_eq!(counters["dead_lettered"], 1);
    host.stop().unwrap();
}

#[test]
fn reject_dead_letters_on_the_first_attempt_with_its_reason() {
    let c = Chaos::new();
    let host = c.start("max_attempts = 5");
    c.send(r#"{"action":"reject","reason":"bad order"}"#);
    let dead = c.client.take(&c.dlq, 1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "x-event-host-reason").as_deref(),
        Some("bad order")
    );
    assert_eq!(
        header(&dead[0], "x-event-host-attempts").as_deref(),
        Some("1")
    );
    assert_eq!(host.counters("chaos")["instantiations"], 1);
    host.stop().unwrap();
}

#[test]
fn traps_and_timeouts_take_the_retry_path() {
    let c = Chaos::new();
    let host = c.start("max_attempts = 2\ndeadline_ms = 100");
    c.send(r#"{"action":"panic"}"#);
    c.send(r#"{"action":"loop"}"#);
    let dead = c.client.take(&c.dlq, 2, Duration::from_secs(20));
    assert_eq!(dead.len(), 2);
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| header(m, "x-event-host-reason").unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("(2/2)") && r.contains("unreachable")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("(2/2)") && r.contains("deadline of 100 ms")),
        "{reasons:?}"
    );
    assert_eq!(host.counters("chaos")["retried"], 2);
    host.stop().unwrap();
}

#[test]
fn a_handler_that_publishes_then_fails_publishes_nothing() {
    let mut c = Chaos::new();
    let out = unique("out");
    c.client.cleanup(&[], &[&out]);
    declare_topic(&c.client, &out);
    let probe = c.client.bind_probe(&out, "#");
    let host = c.start(&format!(
        "max_attempts = 2\npublishes_to = [{{ exchange = {out:?}, kind = \"topic\" }}]"
    ));
    c.send(&format!(
        r#"{{"action":"publish-then-fail","n":3,"exchange":"{out}","routing_key":"x"}}"#
    ));
    assert_eq!(
        c.client.take(&c.dlq, 1, Duration::from_secs(10)).len(),
        1,
        "the failing event was dead-lettered"
    );
    c.send(&format!(
        r#"{{"action":"publish","n":2,"exchange":"{out}","routing_key":"x"}}"#
    ));
    let got = c.client.take(&probe, 5, Duration::from_secs(5));
    assert_eq!(
        got.len(),
        2,
        "only the successful call's two publishes went out"
    );
    host.stop().unwrap();
}

#[test]
fn a_redelivered_committed_event_is_not_applied_twice() {
    let c = Chaos::new();
    let props = || BasicProperties::default().with_message_id("order-42".into());
    let payload = br#"{"action":"kv-incr","key":"n","delta":1}"#;
    let host = c.start("");
    c.client.publish(&c.exchange, "k", payload, props());
    host.wait_for(
        "/state/chaos/n",
        |s, b| s == 200 && b.contains("\"value\":1"),
        "first apply",
    );
    // The broker redelivers the same message (as it does when an ack is
    // lost with its channel): same message id, same body.
    c.client.publish(&c.exchange, "k", payload, props());
    host.wait_counter("chaos", "duplicates", 1);
    let (_, body) = host.get("/state/chaos/n");
    assert!(body.contains("\"value\":1"), "applied once: {body}");
    host.stop().unwrap();
}

#[test]
fn malformed_and_oversized_inputs_reach_the_dlq_while_the_rest_flows() {
    let inv = Inventory::new();
    let mut client = Client::connect();
    inv.cleanup(&mut client);
    declare_topic(&client, &inv.events);
    let host = TestHost::start(&["inventory"], &inv.config("max_payload_kb = 1"));
    let big = format!(
        r#"{{"id": 99, "item": "Laptop", "quantity": 1, "pad": "{}"}}"#,
        "x".repeat(2048)
    );
    for (i, body) in [
        r#"{"id": 1, "item": "Laptop", "quantity": 1}"#.to_owned(),
        "not json".to_owned(),
        r#"{"id": 2, "item": "Laptop", "quantity": 1}"#.to_owned(),
        big,
        r#"{"id": 3, "item": "Laptop", "quantity": 1}"#.to_owned(),
    ]
    .iter()
    .enumerate()
    {
        client.publish(
            &inv.orders,
            "",
            body.as_bytes(),
            BasicProperties::default().with_message_id(format!("m{i}").into()),
        );
    }
    host.wait_for(
        "/state/inventory/stock.Laptop",
        |s, b| s == 200 && b.contains("\"value\":7"),
        "three orders applied",
    );
    let dead = client.take(&format!("{}.dlq", inv.queue), 2, Duration::from_secs(10));
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| header(m, "x-event-host-reason").unwrap())
        .collect();
    assert_eq!(dead.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("over the 1024-byte cap")),
        "{reasons:?}"
    );
    host.stop().unwrap();
}

/// How many events the instance that ran `calls.{i}` had run, for each
/// event `0..n` (the chaos guest's `calls` action), read from `/state`.
fn calls_per_instance(host: &TestHost, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let (status, body) = host.get(&format!("/state/chaos/calls.{i}"));
            assert_eq!(status, 200, "calls.{i}: {body}");
            serde_json::from_str::<Value>(&body).unwrap()["value"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn instances_serve_several_events_of_a_backlog_only_where_the_handler_allows_it() {
    let c = Chaos::new();
    // Declare the topology, then let a backlog build so that batches form.
    c.start("").stop().unwrap();
    let n = 300;
    for i in 0..n {
        c.send(&format!(r#"{{"action":"calls","key":"calls.{i}"}}"#));
    }
    let host = c.start("events_per_instance = 50");
    host.wait_counter("chaos", "acked", n as u64);
    let instances = host.counters("chaos")["instantiations"].as_u64().unwrap();
    let calls = calls_per_instance(&host, n);
    // How batches form depends on timing; that some instance served
    // several events, and none more than 50, does not.
    assert!(
        (n as u64 / 50..n as u64).contains(&instances),
        "{n} events took {instances} instances"
    );
    let most = calls.iter().max().copied().unwrap_or(0);
    assert!((2..=50).contains(&most), "an instance ran {most} events");
    assert_eq!(
        host.handler("chaos")["events_per_instance"],
        50,
        "/handlers shows the setting"
    );
    host.stop().unwrap();

    // The default: a fresh instance for every event, backlog or not.
    let c = Chaos::new();
    c.start("").stop().unwrap();
    for i in 0..n {
        c.send(&format!(r#"{{"action":"calls","key":"calls.{i}"}}"#));
    }
    let host = c.start("");
    host.wait_counter("chaos", "acked", n as u64);
    assert_eq!(host.counters("chaos")["instantiations"], n as u64);
    assert!(calls_per_instance(&host, n).iter().all(|&c| c == 1));
    host.stop().unwrap();
}

/// The `traceparent` of a message, split: (trace id, span id, flags).
pub(crate) fn traceparent(m: &lapin::message::BasicGetMessage) -> (String, String, String) {
    let value = header(m, "traceparent").expect("a traceparent");
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    assert!(parts[1].len() == 32 && parts[2].len() == 16, "{value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

pub(crate) fn traced(traceparent: &str) -> BasicProperties {
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString(traceparent.into()),
    );
    headers.insert(
        "tracestate".into(),
        lapin::types::AMQPValue::LongString("vendor=abc".into()),
    );
    BasicProperties::default().with_headers(headers)
}

/// Publish order 1 with the trace [`TRACE`] from [`PARENT`] (and a
/// `tracestate`); the reservation inventory published for it.
pub(crate) fn a_traced_order_s_reservation(
    inv: &Inventory,
    client: &Client,
    reserved: &str,
) -> lapin::message::BasicGetMessage {
    client.publish(
        &inv.orders,
        "",
        br#"{"id": 1, "item": "Laptop", "quantity": 1}"#,
        traced(&format!("00-{TRACE}-{PARENT}-01")),
    );
    let mut got = client.take(reserved, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    got.remove(0)
}

pub(crate) const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
pub(crate) const PARENT: &str = "b7ad6b7169203331";

/// W3C Trace Context: an order's trace comes back on inventory's
/// reservation, with the attempt's own span as the parent; an order with
/// none starts a trace of its own.
#[test]
fn a_trace_published_on_an_order_comes_back_on_the_reservation() {
    let (inv, client, reserved, host) = inventory_with_a_reservations_probe();
    let got = [a_traced_order_s_reservation(&inv, &client, &reserved)];
    let (trace, span, flags) = traceparent(&got[0]);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_ne!(span, PARENT, "a span of its own");
    assert_eq!(header(&got[0], "tracestate").as_deref(), Some("vendor=abc"));

    // A plain client's order, with no trace: a new one.
    client.publish(
        &inv.orders,
        "",
        br#"{"id": 2, "item": "Laptop", "quantity": 1}"#,
        BasicProperties::default(),
    );
    let got = client.take(&reserved, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    let (trace, span, _) = traceparent(&got[0]);
    assert_ne!(trace, TRACE);
    assert_ne!(trace, "0".repeat(32));
    assert_ne!(span, "0".repeat(16));
    host.stop().unwrap();
}

/// A retried event's copies carry its trace on: the dead-letter copy after
/// the last attempt has the trace id it came with and a span of that
/// attempt, not the publisher's.
#[test]
fn retry_and_dead_letter_copies_carry_the_trace_on() {
    let chaos = Chaos::new();
    let host = chaos.start("max_attempts = 3");
    let dead = [chaos.retried_until_dead_with_a_trace()];
    assert_eq!(
        header(&dead[0], "x-event-host-attempts").as_deref(),
        Some("3")
    );
    let (trace, span, flags) = traceparent(&dead[0]);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_ne!(span, PARENT, "the last attempt's span, not the publisher's");
    assert_eq!(
        header(&dead[0], "tracestate").as_deref(),
        Some("vendor=abc")
    );
    host.stop().unwrap();
}

/// Every line logged about an event names its trace, in both log formats:
/// the guest's own lines, and the host's (here: the dead-lettering).
#[test]
fn log_lines_about_an_event_carry_its_trace_id() {
    for format in ["human", "json"] {
        let chaos = Chaos::new();
        let dir = tempfile::tempdir().unwrap();
        let handlers = dir.path().join("handlers");
        std::fs::create_dir_all(&handlers).unwrap();
        std::fs::copy(crate::support::guest("chaos"), handlers.join("chaos.wasm")).unwrap();
        let config = dir.path().join("host.toml");
        std::fs::write(
            &config,
            format!(
                "handlers_dir = {:?}\namqp_url = {:?}\n{}",
                handlers.to_str().unwrap(),
                crate::amqp_support::amqp_url(),
                chaos_config(&chaos.queue, &chaos.exchange, "max_attempts = 1"),
            ),
        )
        .unwrap();
        let mut cmd = crate::process::event_host(dir.path());
        cmd.args([
            "--log-format",
            format,
            "run",
            "--config",
            config.to_str().unwrap(),
        ]);
        let mut host = crate::process::Run::start("traced", dir.path(), cmd);
        host.wait_ready();
        for (action, message) in [("log", "hello from the guest"), ("reject", "")] {
            chaos.client.publish(
                &chaos.exchange,
                "k",
                format!(r#"{{"action": "{action}", "message": "{message}", "reason": "no"}}"#)
                    .as_bytes(),
                traced(&format!("00-{TRACE}-{PARENT}-01")),
            );
        }
        host.wait_log("hello from the guest", 1);
        host.wait_log("event dead-lettered", 1);
        let log = std::fs::read_to_string(&host.log).unwrap();
        for needle in ["hello from the guest", "event dead-lettered"] {
            let line = log.lines().find(|l| l.contains(needle)).unwrap();
            assert!(line.contains(TRACE), "{format}: {line}");
        }
    }
}
