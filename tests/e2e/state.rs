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
