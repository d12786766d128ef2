//! Inventory: reserves stock for every order published to the `orders`
//! fanout exchange, and announces the result on the `inventory` topic
//! exchange (`inventory.reserved`, `inventory.low`, `inventory.rejected`;
//! config `inventory-exchange` renames it).
//!
//! State (per handler, transactional per event):
//! - `stock.<item>`: units left, ASCII decimal; seeded from the handler
//!   config key of the same name the first time an item is seen.
//! - `order.<id>`: "reserved" or "rejected" once an order was handled, so
//!   the same order delivered twice reserves stock once.

wit_bindgen::generate!({ world: "handler", path: "../../wit", generate_all });

use event_host::handler::publisher::{publish, Properties};
use event_host::handler::types::{ExchangeKind, Subscription};
use serde_json::{json, Value};
use wasi::config::store as config;
use wasi::keyvalue::atomics::{self, Cas, CasError};
use wasi::keyvalue::store::{self as kv, Bucket};
use wasi::logging::logging::{log, Level};

struct Inventory;

/// A validated order.
struct Order {
    /// The id exactly as given (number or string), echoed in publishes.
    id: Value,
    /// The id as text, for state keys.
    key: String,
    item: String,
    quantity: i64,
}

fn parse_order(payload: &[u8]) -> Result<Order, String> {
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("payload is not a JSON object")?;
    let id = obj.get("id").ok_or("missing field `id`")?.clone();
    let key = match &id {
        Value::Number(n) => n.to_string(),
        Value::String(s) if !s.is_empty() => s.clone(),
        _ => return Err("`id` must be a number or a non-empty string".into()),
    };
    let item = match obj.get("item") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err("`item` must be a non-empty string".into()),
        None => return Err("missing field `item`".into()),
    };
    let quantity = match obj.get("quantity") {
        None => return Err("missing field `quantity`".into()),
        Some(q) => q.as_i64().ok_or("`quantity` must be an integer")?,
    };
    if quantity <= 0 {
        return Err(format!("`quantity` must be positive, got {quantity}"));
    }
    Ok(Order {
        id,
        key,
        item,
        quantity,
    })
}

fn store_err(e: kv::Error) -> HandleError {
    // A state failure is the host's problem, and transient: try again.
    HandleError::Retry(format!("state error: {e:?}"))
}

fn parse_int(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

fn send(routing_key: &str, body: Value) -> Result<(), HandleError> {
    let props = Properties {
        content_type: Some("application/json".into()),
        message_id: None,
        correlation_id: None,
        headers: vec![],
    };
    // Operators may rename the exchange; tests give each run its own.
    let exchange = config::get("inventory-exchange").ok().flatten();
    publish(
        exchange.as_deref().unwrap_or("inventory"),
        routing_key,
        body.to_string().as_bytes(),
        &props,
    )
    .map_err(|e| HandleError::Retry(format!("publish refused: {e:?}")))
}

/// Current stock of `item`, seeding it from config when state has none.
/// Returns the CAS handle the decrement goes through, or `None` for an
/// item neither state nor config knows.
fn stock_of(bucket: &Bucket, item: &str) -> Result<Option<(Cas, i64)>, HandleError> {
    let key = format!("stock.{item}");
    let cas = Cas::new(bucket, &key).map_err(store_err)?;
    let current = match cas.current().map_err(store_err)? {
        Some(bytes) => parse_int(&bytes)
            .ok_or_else(|| HandleError::Retry(format!("state `{key}` is not an integer")))?,
        None => match config::get(&key)
            .map_err(|e| HandleError::Retry(format!("config error: {e:?}")))?
        {
            Some(seed) => seed.trim().parse().map_err(|_| {
                HandleError::Reject(format!("config `{key}` is not an integer: {seed:?}"))
            })?,
            None => return Ok(None),
        },
    };
    Ok(Some((cas, current)))
}

impl Guest for Inventory {
    fn manifest() -> Manifest {
        Manifest {
            name: "inventory".into(),
            version: "1.0.0".into(),
            subscriptions: vec![Subscription {
                exchange: "orders".into(),
                kind: ExchangeKind::Fanout,
                binding_keys: vec![],
            }],
            max_attempts: None,
        }
    }

    fn handle(event: Event) -> Result<(), HandleError> {
        let order = parse_order(&event.payload).map_err(HandleError::Reject)?;
        let bucket = kv::open("").map_err(store_err)?;
        let seen_key = format!("order.{}", order.key);
        if bucket.exists(&seen_key).map_err(store_err)? {
            log(
                Level::Debug,
                "inventory",
                &format!("order {} already handled", order.key),
            );
            return Ok(());
        }

        let (outcome, remaining) = match stock_of(&bucket, &order.item)? {
            None => ("unknown item", 0),
            Some((_, available)) if available < order.quantity => ("insufficient stock", available),
            Some((cas, available)) => {
                let remaining = available - order.quantity;
                match atomics::swap(cas, remaining.to_string().as_bytes()) {
                    Ok(()) => {}
                    // The host runs each call in its own transaction, so a
                    // concurrent change shows up here only as a conflict:
                    // let the event run again on fresh state.
                    Err(CasError::CasFailed(_)) => {
                        return Err(HandleError::Retry("stock changed concurrently".into()))
                    }
                    Err(CasError::StoreError(e)) => return Err(store_err(e)),
                }
                ("reserved", remaining)
            }
        };

        if outcome == "reserved" {
            bucket.set(&seen_key, b"reserved").map_err(store_err)?;
            send(
                "inventory.reserved",
                json!({"order_id": order.id, "item": order.item, "quantity": order.quantity, "remaining": remaining}),
            )?;
            log(
                Level::Info,
                "inventory",
                &format!(
                    "reserved {} x {} for order {}, {} left",
                    order.quantity, order.item, order.key, remaining
                ),
            );
            let threshold = config::get("low-stock-threshold")
                .ok()
                .flatten()
                .and_then(|t| t.trim().parse::<i64>().ok());
            if let Some(threshold) = threshold {
                if remaining < threshold {
                    send(
                        "inventory.low",
                        json!({"item": order.item, "remaining": remaining, "threshold": threshold}),
                    )?;
                }
            }
        } else {
            bucket.set(&seen_key, b"rejected").map_err(store_err)?;
            send(
                "inventory.rejected",
                json!({"order_id": order.id, "item": order.item, "quantity": order.quantity,
                       "reason": outcome, "available": remaining}),
            )?;
        }
        Ok(())
    }
}

export!(Inventory);
