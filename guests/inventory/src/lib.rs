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
#[allow(dead_code)] // `parse` builds a whole `Value`; inventory reads a typed shape
mod json;

use event_host::handler::publisher::{publish, Properties};
use event_host::handler::types::{ExchangeKind, Output, Subscription};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
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

/// The fields inventory reads, as given: parsed straight into this shape
/// (other fields are skipped without being built), then validated with
/// reasons of our own.
#[derive(Deserialize)]
struct RawOrder {
    id: Option<Value>,
    item: Option<Value>,
    quantity: Option<Value>,
}

fn parse_order(payload: &[u8]) -> Result<Order, String> {
    json::check_depth(payload)?;
    // A struct would also accept a JSON array, positionally.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<Value>(payload) {
            Ok(_) => "payload is not a JSON object".into(),
            Err(e) => format!("payload is not JSON: {e}"),
        });
    }
    let raw: RawOrder =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    let id = raw.id.ok_or("missing field `id`")?;
    let key = match &id {
        Value::Number(n) => n.to_string(),
        Value::String(s) if !s.is_empty() => s.clone(),
        _ => return Err("`id` must be a number or a non-empty string".into()),
    };
    let item = match raw.item {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(_) => return Err("`item` must be a non-empty string".into()),
        None => return Err("missing field `item`".into()),
    };
    let quantity = match raw.quantity {
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

/// `inventory.reserved`: one per order, so encoded straight from this
/// shape rather than through a JSON map.
#[derive(Serialize)]
struct Reservation<'a> {
    order_id: &'a Value,
    item: &'a str,
    quantity: i64,
    remaining: i64,
}

fn store_err(e: kv::Error) -> HandleError {
    // A state failure is the host's problem, and transient: try again.
    HandleError::Retry(format!("state error: {e:?}"))
}

fn parse_int(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

fn send(routing_key: &str, body: &impl Serialize) -> Result<(), HandleError> {
    let props = Properties {
        content_type: Some("application/json".into()),
        message_id: None,
        correlation_id: None,
        headers: vec![],
    };
    let body = serde_json::to_vec(body)
        .map_err(|e| HandleError::Reject(format!("encoding {routing_key}: {e}")))?;
    publish(&settings().exchange, routing_key, &body, &props)
        .map_err(|e| HandleError::Retry(format!("publish refused: {e:?}")))
}

/// The handler config every event reads, read once per instance: it is
/// fixed for an instance's life (a new version or config means new
/// instances), and each `wasi:config` call is a trip into the host.
struct Settings {
    /// Where announcements go (`inventory-exchange`, default `inventory`;
    /// operators may rename it, tests give each run its own).
    exchange: String,
    /// Whether every reservation is announced (`inventory.reserved`).
    /// `announce-reservations = "false"` keeps only the exceptions —
    /// rejected orders and low-stock alerts — for streams where nobody
    /// consumes a message per order and the broker's cost of routing one
    /// is not wanted.
    announce_reservations: bool,
    /// `low-stock-threshold`: below it, `inventory.low` is published.
    low_stock_threshold: Option<i64>,
}

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let get = |key: &str| config::get(key).ok().flatten();
        Settings {
            exchange: get("inventory-exchange").unwrap_or_else(|| "inventory".into()),
            announce_reservations: get("announce-reservations").is_none_or(|v| v.trim() != "false"),
            low_stock_threshold: get("low-stock-threshold").and_then(|raw| {
                // A malformed threshold is logged and ignored: it must not
                // hold up orders.
                let parsed = raw.trim().parse().ok();
                if parsed.is_none() {
                    log(
                        Level::Warn,
                        "inventory",
                        &format!("config `low-stock-threshold` is not an integer: {raw:?}"),
                    );
                }
                parsed
            }),
        }
    })
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
            // Where reservations and low-stock notices go (a config that
            // renames it, `inventory-exchange`, must name the new one in
            // `publishes_to`).
            publishes: vec![Output {
                exchange: "inventory".into(),
                kind: ExchangeKind::Topic,
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
                if settings().announce_reservations {
                    send(
                        "inventory.reserved",
                        &Reservation {
                            order_id: &order.id,
                            item: &order.item,
                            quantity: order.quantity,
                            remaining,
                        },
                    )?;
                }
                log(
                    Level::Debug,
                    "inventory",
                    &format!(
                        "reserved {} x {} for order {}, {} left",
                        order.quantity, order.item, order.key, remaining
                    ),
                );
                if let Some(threshold) = settings().low_stock_threshold.filter(|t| remaining < *t) {
                    send(
                        "inventory.low",
                        &json!({"item": order.item, "remaining": remaining, "threshold": threshold}),
                    )?;
                }
            }
            Outcome::Rejected { reason, available } => {
                bucket.set(&seen_key, b"rejected").map_err(store_err)?;
                send(
                    "inventory.rejected",
                    &json!({"order_id": order.id, "item": order.item, "quantity": order.quantity,
                           "reason": reason, "available": available}),
                )?;
            }
        }
        Ok(())
    }
}

export!(Inventory);
