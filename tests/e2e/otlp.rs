//! OpenTelemetry export against a real OTLP/HTTP receiver run by the test
//! (`otlp_support`). Spans reach it when the host stops (a graceful
//! shutdown flushes them), so nothing here waits on a timer.

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;

use crate::amqp_support::{header, TestHost};
use crate::broker::{
    a_traced_order_s_reservation, chaos_config, inventory_configured_with_a_reservations_probe,
    traced, traceparent, Chaos, PARENT, TRACE,
};
use crate::otlp_support::{find, Receiver};

/// The top-level config lines that switch export on, to `receiver`.
fn exporting_to(receiver: &Receiver) -> String {
    format!("otlp_endpoint = {:?}\n", receiver.url)
}

/// An order with a trace id is one span per event at the receiver: a child
/// of the publisher's span, the parent of the reservation it caused, with
/// the handler, version, queue, attempt and outcome as attributes, the
/// guest's log lines as events, and the host as the service instance. A
/// bad order's span says it was dead-lettered, and why; a trace the
/// publisher did not sample is not exported.
#[test]
fn each_event_is_a_span_at_a_real_otlp_receiver() {
    let receiver = Receiver::start();
    let (inv, client, reserved, host) =
        inventory_configured_with_a_reservations_probe(&exporting_to(&receiver));
    client.publish(
        &inv.orders,
        "",
        br#"{"id": 1, "item": "Laptop", "quantity": 1}"#,
        traced(&format!("00-{TRACE}-{PARENT}-01")).with_message_id("order-1".into()),
    );
    let got = client.take(&reserved, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    let (_, reservation_parent, _) = traceparent(&got[0]);

    const BAD_TRACE: &str = "1af7651916cd43dd8448eb211c80319d";
    client.publish(
        &inv.orders,
        "",
        b"not an order",
        traced(&format!("00-{BAD_TRACE}-{PARENT}-01")),
    );
    const UNSAMPLED: &str = "2af7651916cd43dd8448eb211c80319e";
    client.publish(
        &inv.orders,
        "",
        br#"{"id": 2, "item": "Laptop", "quantity": 1}"#,
        traced(&format!("00-{UNSAMPLED}-{PARENT}-00")),
    );
    host.wait_counter("inventory", "acked", 2);
    host.wait_counter("inventory", "dead_lettered", 1);
    let version = host.handler("inventory")["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let host_id = host.handler("inventory")["host_id"]
        .as_str()
        .unwrap()
        .to_owned();
    host.stop().unwrap();

    let spans = receiver.of_trace(TRACE);
    assert_eq!(spans.len(), 1, "one span for the one event: {spans:#?}");
    let s = &spans[0];
    assert_eq!(s.parent(), PARENT, "a child of the publisher's span");
    assert_eq!(
        s.span_id(),
        reservation_parent,
        "the parent of what the event published"
    );
    assert_eq!(s.span.kind(), SpanKind::Consumer);
    assert_eq!(s.span.name, "process inventory");
    assert_eq!(s.span.trace_state, "vendor=abc");
    for (key, want) in [
        ("event_host.handler", "inventory"),
        ("event_host.version", version.as_str()),
        ("event_host.queue", inv.queue.as_str()),
        ("event_host.attempt", "1"),
        ("event_host.outcome", "ack"),
        ("messaging.system", "rabbitmq"),
        ("messaging.destination.name", inv.orders.as_str()),
        ("messaging.message.id", "order-1"),
    ] {
        assert_eq!(s.attr(key).as_deref(), Some(want), "{key}: {s:#?}");
    }
    assert!(s.attr("event_host.guest_version").is_some());
    assert!(s.span.end_time_unix_nano > s.span.start_time_unix_nano);
    assert_eq!(s.status(), Some(SpanStatus::Ok));
    let logged: Vec<&str> = s.span.events.iter().map(|e| e.name.as_str()).collect();
    assert!(
        logged.iter().any(|l| l.starts_with("reserved 1 x Laptop")),
        "the guest's log lines are span events: {logged:?}"
    );
    assert_eq!(
        find(&s.span.events[0].attributes, "level").as_deref(),
        Some("debug")
    );
    assert_eq!(
        s.resource.get("service.name").map(String::as_str),
        Some("event-host")
    );
    assert_eq!(
        s.resource.get("service.instance.id"),
        Some(&host_id),
        "the host is the service instance"
    );

    let bad = receiver.of_trace(BAD_TRACE);
    assert_eq!(bad.len(), 1, "{bad:#?}");
    assert_eq!(
        bad[0].attr("event_host.outcome").as_deref(),
        Some("dead_letter")
    );
    assert_eq!(bad[0].status(), Some(SpanStatus::Error));
    assert!(bad[0].attr("event_host.reason").is_some(), "{:#?}", bad[0]);

    assert!(
        receiver.of_trace(UNSAMPLED).is_empty(),
        "a trace its publisher did not sample is not exported"
    );
}

/// Every attempt at a retried event is a span of one trace, each the
/// parent of the next (the retry copy carries it), the last one's outcome
/// the dead letter.
#[test]
fn each_attempt_at_a_retried_event_is_a_span_parented_by_the_one_before() {
    let receiver = Receiver::start();
    let chaos = Chaos::new();
    let host = TestHost::start(
        &["chaos"],
        &format!(
            "{}{}",
            exporting_to(&receiver),
            chaos_config(&chaos.queue, &chaos.exchange, "max_attempts = 3")
        ),
    );
    let dead = chaos.retried_until_dead_with_a_trace();
    let (_, dead_parent, _) = traceparent(&dead);
    host.stop().unwrap();

    let spans = receiver.of_trace(TRACE);
    let outcomes: Vec<(String, String)> = spans
        .iter()
        .map(|s| {
            (
                s.attr("event_host.attempt").unwrap_or_default(),
                s.attr("event_host.outcome").unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [("1", "retry"), ("2", "retry"), ("3", "dead_letter")]
            .map(|(a, o)| (a.to_owned(), o.to_owned())),
        "{spans:#?}"
    );
    assert_eq!(spans[0].parent(), PARENT);
    assert_eq!(spans[1].parent(), spans[0].span_id());
    assert_eq!(spans[2].parent(), spans[1].span_id());
    assert_eq!(spans[2].span_id(), dead_parent, "the dead letter's parent");
    assert!(spans.iter().all(|s| s
        .attr("event_host.reason")
        .is_some_and(|r| r.contains("not yet"))));
}

/// `trace_context = false`: nothing is stamped on what an event causes,
/// and nothing is exported, an endpoint set or not.
#[test]
fn with_trace_context_off_nothing_is_stamped() {
    let receiver = Receiver::start();
    let (inv, client, reserved, host) = inventory_configured_with_a_reservations_probe(&format!(
        "trace_context = false\n{}",
        exporting_to(&receiver)
    ));
    let got = a_traced_order_s_reservation(&inv, &client, &reserved);
    assert_eq!(header(&got, "traceparent"), None);
    host.stop().unwrap();
    assert!(receiver.spans().is_empty(), "{:#?}", receiver.spans());
}
