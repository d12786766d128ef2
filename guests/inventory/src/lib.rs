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

#[path = "../../shared/json.rs"]
mod json;

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
    let v = json::parse(payload)?;
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

/// How many tries a reservation gets when its compare-and-swap finds the
/// stock changed under it. The host runs each call in its own transaction,
/// so that should never happen; if it does, the bound keeps a livelocked
/// call from spinning until its deadline.
const CAS_TRIES: u32 = 3;

/// The stock a CAS handle saw for `key`, seeded from the config key of the
/// same name when state has none yet. `None` is an item neither knows.
fn current_stock(cas: &Cas, key: &str) -> Result<Option<i64>, HandleError> {
    match cas.current().map_err(store_err)? {
        Some(bytes) => parse_int(&bytes)
            .map(Some)
            .ok_or_else(|| HandleError::Retry(format!("state `{key}` is not an integer"))),
        None => match config::get(key)
            .map_err(|e| HandleError::Retry(format!("config error: {e:?}")))?
        {
            Some(seed) => seed.trim().parse().map(Some).map_err(|_| {
                HandleError::Reject(format!("config `{key}` is not an integer: {seed:?}"))
            }),
            None => Ok(None),
        },
    }
}

/// What became of an order.
enum Outcome {
    Reserved {
        remaining: i64,
    },
    Rejected {
        reason: &'static str,
        available: i64,
    },
}

/// Takes `quantity` units of `item` off the stock, through a CAS so the
/// decrement applies only to the value it was computed from.
fn reserve(bucket: &Bucket, item: &str, quantity: i64) -> Result<Outcome, HandleError> {
    let key = format!("stock.{item}");
    let mut cas = Cas::new(bucket, &key).map_err(store_err)?;
    let mut tries = 1;
    loop {
        let Some(available) = current_stock(&cas, &key)? else {
            return Ok(Outcome::Rejected {
                reason: "unknown item",
                available: 0,
            });
        };
        if available < quantity {
            return Ok(Outcome::Rejected {
                reason: "insufficient stock",
                available,
            });
        }
        let remaining = available - quantity;
        match atomics::swap(cas, remaining.to_string().as_bytes()) {
            Ok(()) => return Ok(Outcome::Reserved { remaining }),
            // The failed swap hands back a handle on the new value: decide
            // again from that.
            Err(CasError::CasFailed(fresh)) if tries < CAS_TRIES => {
                tries += 1;
                cas = fresh;
            }
            Err(CasError::CasFailed(_)) => {
                return Err(HandleError::Retry(format!(
                    "`{key}` kept changing during the reservation"
                )))
            }
            Err(CasError::StoreError(e)) => return Err(store_err(e)),
        }
    }
}

/// The configured low-stock threshold, if any. A malformed one is logged
/// and ignored: it must not hold up orders.
fn low_stock_threshold() -> Option<i64> {
    let raw = config::get("low-stock-threshold").ok().flatten()?;
    let parsed = raw.trim().parse().ok();
    if parsed.is_none() {
        log(
            Level::Warn,
            "inventory",
            &format!("config `low-stock-threshold` is not an integer: {raw:?}"),
        );
    }
    parsed
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

        match reserve(&bucket, &order.item, order.quantity)? {
            Outcome::Reserved { remaining } => {
                bucket.set(&seen_key, b"reserved").map_err(store_err)?;
                send(
                    "inventory.reserved",
                    json!({"order_id": order.id, "item": order.item,
                           "quantity": order.quantity, "remaining": remaining}),
                )?;
                log(
                    Level::Info,
                    "inventory",
                    &format!(
                        "reserved {} x {} for order {}, {} left",
                        order.quantity, order.item, order.key, remaining
                    ),
                );
                if let Some(threshold) = low_stock_threshold().filter(|t| remaining < *t) {
                    send(
                        "inventory.low",
                        json!({"item": order.item, "remaining": remaining, "threshold": threshold}),
                    )?;
                }
            }
            Outcome::Rejected { reason, available } => {
                bucket.set(&seen_key, b"rejected").map_err(store_err)?;
                send(
                    "inventory.rejected",
                    json!({"order_id": order.id, "item": order.item, "quantity": order.quantity,
                           "reason": reason, "available": available}),
                )?;
            }
        }
        Ok(())
    }
}

export!(Inventory);
