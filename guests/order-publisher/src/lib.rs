//! Order publisher: turns checkout requests (direct exchange `checkout`,
//! key `checkout.requested`) into numbered orders on the `orders` fanout
//! exchange (config `orders-exchange` renames it), in the shape the
//! inventory service consumes.
//!
//! Order ids come from an atomic counter in state (`order-seq`), which
//! commits with the event: a failed or re-run event does not burn an id.

wit_bindgen::generate!({ world: "handler", path: "../../wit", generate_all });

#[path = "../../shared/json.rs"]
mod json;

use event_host::handler::publisher::{publish, Properties};
use event_host::handler::types::{ExchangeKind, Output, Subscription};
use serde_json::{json, Map, Value};
use wasi::config::store as config;
use wasi::keyvalue::{atomics, store as kv};

struct OrderPublisher;

fn validate(payload: &[u8]) -> Result<(String, i64, Option<String>), String> {
    let v = json::parse(payload)?;
    let obj = v.as_object().ok_or("payload is not a JSON object")?;
    let item = match obj.get("item") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err("`item` must be a non-empty string".into()),
    };
    let quantity = obj
        .get("quantity")
        .and_then(Value::as_i64)
        .ok_or("`quantity` must be an integer")?;
    if quantity <= 0 {
        return Err(format!("`quantity` must be positive, got {quantity}"));
    }
    let customer = match obj.get("customer") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("`customer` must be a string".into()),
    };
    Ok((item, quantity, customer))
}

impl Guest for OrderPublisher {
    fn manifest() -> Manifest {
        Manifest {
            name: "order-publisher".into(),
            version: "1.0.0".into(),
            subscriptions: vec![Subscription {
                exchange: "checkout".into(),
                kind: ExchangeKind::Direct,
                binding_keys: vec!["checkout.requested".into()],
            }],
            // Orders go here (a config that renames it, `orders-exchange`,
            // must name the new one in `publishes_to`).
            publishes: vec![Output {
                exchange: "orders".into(),
                kind: ExchangeKind::Fanout,
            }],
            max_attempts: None,
        }
    }

    fn handle(event: Event) -> Result<(), HandleError> {
        let (item, quantity, customer) = validate(&event.payload).map_err(HandleError::Reject)?;
        let bucket = kv::open("").map_err(|e| HandleError::Retry(format!("state error: {e:?}")))?;
        let id = atomics::increment(&bucket, "order-seq", 1)
            .map_err(|e| HandleError::Retry(format!("state error: {e:?}")))?;

        let mut order = Map::new();
        order.insert("id".into(), json!(id));
        order.insert("item".into(), json!(item));
        order.insert("quantity".into(), json!(quantity));
        if let Some(customer) = customer {
            order.insert("customer".into(), json!(customer));
        }
        let props = Properties {
            content_type: Some("application/json".into()),
            message_id: Some(format!("order-{id}")),
            // The host copies the checkout request's.
            correlation_id: None,
            headers: vec![],
        };
        // Operators may rename the exchange; tests give each run its own.
        let exchange = config::get("orders-exchange").ok().flatten();
        publish(
            exchange.as_deref().unwrap_or("orders"),
            "",
            Value::Object(order).to_string().as_bytes(),
            &props,
        )
        .map_err(|e| HandleError::Retry(format!("publish refused: {e:?}")))
    }
}

export!(OrderPublisher);
