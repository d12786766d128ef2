//! Quorum queues — what a fleet runs on — with the host's whole retry and
//! dead-letter topology: the work queue, the dead-letter queue and every
//! delay queue are quorum queues; retries go round the delay queues and
//! dead-letter after exactly `max_attempts`; the delay queues dead-letter
//! back at least once (RabbitMQ's `at-least-once` strategy), so retry
//! copies waiting there survive a broker restart.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::amqp_support::{header, unique, Client, TestHost};
use crate::node::PrivateBroker;

const RECONNECTS: &str = "event_host_broker_reconnects_total";

fn config(queue: &str, exchange: &str, retry_base_ms: u64) -> String {
    format!(
        r##"
[handlers.chaos]
queue = "{queue}"
subscriptions = [{{ exchange = "{exchange}", kind = "topic", binding_keys = ["#"] }}]
queue_type = "quorum"
max_attempts = 3
retry_base_ms = {retry_base_ms}
# Every retry is a failed attempt: not a crash loop here.
breaker_failures = 1000
"##
    )
}

/// Publish a chaos event with `id` as its message id.
fn send(client: &Client, exchange: &str, id: &str, payload: &str) {
    client.publish(
        exchange,
        "k",
        payload.as_bytes(),
        BasicProperties::default().with_message_id(id.into()),
    );
}

fn text_arg(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// Redeclare `queue` with exactly `args`: the broker accepts it only when
/// they are the arguments the queue has (it refuses a redeclare whose
/// type, dead-letter strategy or overflow differ).
fn redeclare(client: &Client, queue: &str, args: &[(&str, AMQPValue)]) -> Result<(), String> {
    let mut table = FieldTable::default();
    for (k, v) in args {
        table.insert(ShortString::try_new(*k).unwrap(), v.clone());
    }
    client.rt.block_on(async {
        let ch = client.conn.create_channel().await.unwrap();
        let declared = ch
            .queue_declare(
                ShortString::try_new(queue).unwrap(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                table,
            )
            .await;
        if declared.is_ok() {
            let _ = ch.close(200, "checked".into()).await;
        }
        declared.map(drop).map_err(|e| e.to_string())
    })
}

/// Dead-lettered messages by message id, with their attempts.
fn attempts_by_id(dead: &[lapin::message::BasicGetMessage]) -> BTreeMap<String, String> {
    dead.iter()
        .map(|m| {
            let id = m
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default();
            (id, header(m, "x-event-host-attempts").unwrap_or_default())
        })
        .collect()
}

#[test]
fn quorum_queues_retry_through_delay_queues_then_dead_letter_and_lose_nothing() {
    const RETRIED: usize = 20;
    const OK: usize = 20;
    const REJECTED: usize = 5;
    let (exchange, queue) = (unique("quorum"), unique("quorum-q"));
    let dlq = format!("{queue}.dlq");
    let mut client = Client::connect();
    client.cleanup_handler(&queue, 50, &[&exchange]);
    let host = TestHost::start(&["chaos"], &config(&queue, &exchange, 50));
    let mut expected = BTreeMap::new();
    for i in 0..RETRIED {
        let id = format!("retry-{i}");
        send(
            &client,
            &exchange,
            &id,
            r#"{"action":"retry","reason":"not yet"}"#,
        );
        expected.insert(id, "3".to_owned());
    }
    for i in 0..OK {
        send(
            &client,
            &exchange,
            &format!("ok-{i}"),
            r#"{"action":"kv-incr","key":"ok"}"#,
        );
    }
    for i in 0..REJECTED {
        let id = format!("reject-{i}");
        send(
            &client,
            &exchange,
            &id,
            r#"{"action":"reject","reason":"no"}"#,
        );
        expected.insert(id, "1".to_owned());
    }
    host.wait_counter("chaos", "dead_lettered", (RETRIED + REJECTED) as u64);
    host.wait_counter("chaos", "acked", OK as u64);
    let dead = client.take(&dlq, RETRIED + REJECTED, Duration::from_secs(10));
    assert_eq!(
        attempts_by_id(&dead),
        expected,
        "each failing event dead-lettered once, after exactly its attempts"
    );
    let counters = host.counters("chaos");
    assert_eq!(counters["retried"], (RETRIED * 2) as u64, "{counters}");
    assert_eq!(counters["rejected"], REJECTED as u64, "{counters}");
    assert_eq!(
        counters["instantiations"],
        (RETRIED * 3 + OK + REJECTED) as u64,
        "{counters}"
    );
    assert_eq!(counters["requeued"], 0, "{counters}");
    let (_, body) = host.get("/state/chaos/ok");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["value"],
        OK as u64
    );
    host.stop().unwrap();

    // Nothing left anywhere, and every queue of the topology is a quorum
    // queue; the delay queues dead-letter at least once.
    // One delay queue per retry: two for three attempts.
    let retry_queues: Vec<String> = [50, 100]
        .iter()
        .map(|ms| format!("{queue}.retry.{ms}ms"))
        .collect();
    for q in [&queue, &dlq].into_iter().chain(&retry_queues) {
        assert_eq!(client.depth(q), 0, "{q} is empty");
    }
    let quorum = [("x-queue-type", text_arg("quorum"))];
    redeclare(&client, &queue, &quorum).expect("the work queue is a quorum queue");
    redeclare(&client, &dlq, &quorum).expect("the dead-letter queue is a quorum queue");
    for (q, ms) in retry_queues.iter().zip([50i64, 100]) {
        redeclare(
            &client,
            q,
            &[
                ("x-queue-type", text_arg("quorum")),
                ("x-dead-letter-strategy", text_arg("at-least-once")),
                ("x-overflow", text_arg("reject-publish")),
                ("x-dead-letter-exchange", text_arg("")),
                ("x-dead-letter-routing-key", text_arg(&queue)),
                ("x-message-ttl", AMQPValue::LongLongInt(ms)),
            ],
        )
        .unwrap_or_else(|e| {
            panic!("{q}: a quorum delay queue with at-least-once dead-lettering: {e}")
        });
    }
}

/// Retry copies are in the quorum delay queues when the broker restarts:
/// they come back, are retried, and dead-letter after exactly
/// `max_attempts`, each once.
#[test]
fn quorum_retries_waiting_in_delay_queues_survive_a_broker_restart() {
    const EVENTS: usize = 10;
    let mut broker = PrivateBroker::start();
    let url = broker.url();
    let (exchange, queue) = (unique("quorum"), unique("quorum-q"));
    let dlq = format!("{queue}.dlq");
    // Long enough for the restart to begin while every first retry waits.
    let host = TestHost::start_with_url(&["chaos"], &config(&queue, &exchange, 4_000), &url);
    let mut expected = BTreeMap::new();
    {
        let client = Client::connect_to(&url);
        for i in 0..EVENTS {
            let id = format!("retry-{i}");
            send(
                &client,
                &exchange,
                &id,
                r#"{"action":"retry","reason":"not yet"}"#,
            );
            expected.insert(id, "3".to_owned());
        }
        // Each retry copy is confirmed by the broker before its event is
        // acked and counted: all wait in the first delay queue now.
        host.wait_counter("chaos", "retried", EVENTS as u64);
    }
    broker.stop_app();
    broker.start_app();
    host.wait_counter("chaos", "dead_lettered", EVENTS as u64);
    assert!(host.metric(RECONNECTS) >= 1.0, "the host reconnected");
    let client = Client::connect_to(&url);
    let dead = client.take(&dlq, EVENTS, Duration::from_secs(10));
    assert_eq!(attempts_by_id(&dead), expected);
    // An attempt cut short by the restart itself would run again (at least
    // once), hence no exact count of calls.
    let counters = host.counters("chaos");
    assert!(
        counters["instantiations"].as_u64() >= Some((EVENTS * 3) as u64),
        "{counters}"
    );
    host.stop().unwrap();
}
