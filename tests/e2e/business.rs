//! The two business handlers, through the real dispatcher and state.

use event_host::dispatch::Outcome;
use serde_json::{json, Value};

use crate::support::Harness;

const INVENTORY: &str = r#"
[handlers.inventory.config]
"stock.Laptop" = "10"
"stock.Phone" = 1
"low-stock-threshold" = "3"
"#;

fn payloads(h: &event_host::dispatch::Handled) -> Vec<(String, Value)> {
    h.published
        .iter()
        .map(|p| {
            (
                p.routing_key.clone(),
                serde_json::from_slice(&p.payload).expect("JSON publish"),
            )
        })
        .collect()
}

#[test]
fn inventory_reserves_stock_and_publishes() {
    let h = Harness::new(&["inventory"], INVENTORY);
    let r = h.send("inventory", r#"{"id": 1, "item": "Laptop", "quantity": 2}"#);
    assert_eq!(r.outcome, Outcome::Ack, "{r:?}");
    assert_eq!(
        payloads(&r),
        vec![(
            "inventory.reserved".into(),
            json!({"order_id": 1, "item": "Laptop", "quantity": 2, "remaining": 8})
        )]
    );
    assert_eq!(r.published[0].exchange, "inventory");
    assert_eq!(
        r.published[0].content_type.as_deref(),
        Some("application/json")
    );
    assert!(
        r.published[0].message_id.is_some(),
        "the host stamps a message id"
    );
    assert_eq!(h.state("inventory", "stock.Laptop").as_deref(), Some("8"));
}

#[test]
fn inventory_publishes_low_stock_below_the_threshold() {
    let h = Harness::new(&["inventory"], INVENTORY);
    let r = h.send(
        "inventory",
        r#"{"id": "a-1", "item": "Laptop", "quantity": 8}"#,
    );
    let published = payloads(&r);
    assert_eq!(published.len(), 2, "{published:?}");
    assert_eq!(
        published[0].1["order_id"],
        json!("a-1"),
        "string ids are kept as strings"
    );
    assert_eq!(
        published[1],
        (
            "inventory.low".into(),
            json!({"item": "Laptop", "remaining": 2, "threshold": 3})
        )
    );
}

#[test]
fn inventory_rejects_orders_it_cannot_fill_as_a_business_outcome() {
    let h = Harness::new(&["inventory"], INVENTORY);
    let r = h.send("inventory", r#"{"id": 2, "item": "Phone", "quantity": 5}"#);
    assert_eq!(r.outcome, Outcome::Ack, "not enough stock is not an error");
    let p = payloads(&r);
    assert_eq!(p[0].0, "inventory.rejected");
    assert_eq!(p[0].1["reason"], "insufficient stock");
    assert_eq!(p[0].1["available"], 1);
    // Stock is unchanged: the one Phone can still be reserved.
    let r = h.send("inventory", r#"{"id": 4, "item": "Phone", "quantity": 1}"#);
    assert_eq!(payloads(&r)[0].0, "inventory.reserved", "{r:?}");
    assert_eq!(h.state("inventory", "stock.Phone").as_deref(), Some("0"));

    let r = h.send(
        "inventory",
        r#"{"id": 3, "item": "Unicorn", "quantity": 1}"#,
    );
    assert_eq!(r.outcome, Outcome::Ack);
    assert_eq!(payloads(&r)[0].1["reason"], "unknown item");
}

#[test]
fn inventory_is_idempotent_per_order_id() {
    let h = Harness::new(&["inventory"], INVENTORY);
    let order = r#"{"id": 7, "item": "Laptop", "quantity": 1}"#;
    let first = h.send("inventory", order);
    let second = h.send("inventory", order);
    assert_eq!(first.outcome, Outcome::Ack);
    assert_eq!(second.outcome, Outcome::Ack);
    assert_eq!(first.published.len(), 1);
    assert!(
        second.published.is_empty(),
        "the same order twice reserves once"
    );
    assert_eq!(h.state("inventory", "stock.Laptop").as_deref(), Some("9"));
}

#[test]
fn inventory_rejects_malformed_payloads() {
    let h = Harness::new(&["inventory"], INVENTORY);
    for bad in [
        "not json",
        "[1,2]",
        r#"{"item": "Laptop", "quantity": 1}"#,
        r#"{"id": 1, "quantity": 1}"#,
        r#"{"id": 1, "item": "", "quantity": 1}"#,
        r#"{"id": 1, "item": "Laptop"}"#,
        r#"{"id": 1, "item": "Laptop", "quantity": 0}"#,
        r#"{"id": 1, "item": "Laptop", "quantity": -2}"#,
        r#"{"id": 1, "item": "Laptop", "quantity": 1.5}"#,
        r#"{"id": {"x": 1}, "item": "Laptop", "quantity": 1}"#,
    ] {
        let r = h.send("inventory", bad);
        assert_eq!(r.outcome, Outcome::Reject, "{bad}: {r:?}");
        assert!(
            r.reason.as_deref().is_some_and(|s| !s.is_empty()),
            "{bad}: a reason is given"
        );
        assert!(r.published.is_empty());
    }
    assert_eq!(
        h.state("inventory", "stock.Laptop"),
        None,
        "no state touched"
    );
}

#[test]
fn order_publisher_numbers_and_publishes_orders() {
    let h = Harness::new(&["order-publisher"], "");
    for n in 1..=3 {
        let r = h.send(
            "order-publisher",
            r#"{"item": "Laptop", "quantity": 1, "customer": "c-7"}"#,
        );
        assert_eq!(r.outcome, Outcome::Ack, "{r:?}");
        assert_eq!(r.published.len(), 1);
        let p = &r.published[0];
        assert_eq!(
            (p.exchange.as_str(), p.routing_key.as_str()),
            ("orders", "")
        );
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.message_id.as_deref(), Some(format!("order-{n}").as_str()));
        let body: Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(
            body,
            json!({"id": n, "item": "Laptop", "quantity": 1, "customer": "c-7"})
        );
    }
    assert_eq!(
        h.state("order-publisher", "order-seq").as_deref(),
        Some("3")
    );
}

#[test]
fn order_publisher_rejects_invalid_requests() {
    let h = Harness::new(&["order-publisher"], "");
    for bad in [
        "{",
        r#"{"quantity": 1}"#,
        r#"{"item": "Laptop", "quantity": 0}"#,
        r#"{"item": 5, "quantity": 1}"#,
    ] {
        let r = h.send("order-publisher", bad);
        assert_eq!(r.outcome, Outcome::Reject, "{bad}: {r:?}");
    }
    assert_eq!(
        h.state("order-publisher", "order-seq"),
        None,
        "no order id consumed"
    );
}
