//! Chaos: one adversarial test guest whose behaviour the payload chooses,
//! `{"action": "...", ...}`. Tests use it to prove that nothing a guest
//! does can crash, hang or escape the host, and that state and publishes
//! take effect only when a call succeeds.
//!
//! Probes of the sandbox (`read-file`, `env`, `socket`) reject with a
//! reason starting `denied:` when the host refused them and `LEAK:` when it
//! did not, so a test can tell a refusal from any other failure.

wit_bindgen::generate!({ world: "handler", path: "../../wit", generate_all });

#[path = "../../shared/json.rs"]
mod json;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use event_host::handler::publisher::{publish, Properties};
use event_host::handler::types::{ExchangeKind, Subscription};
use serde_json::Value;
use wasi::config::store as config;
use wasi::keyvalue::{atomics, store as kv};
use wasi::logging::logging::{log, Level};

struct Chaos;

/// Events this instance has handled (`calls`): shows whether the host
/// gave the event a fresh instance or one that served events before.
static CALLS: AtomicU64 = AtomicU64::new(0);

fn text<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or_default()
}

fn number(v: &Value, field: &str, default: i64) -> i64 {
    v.get(field).and_then(Value::as_i64).unwrap_or(default)
}

fn bucket() -> Result<kv::Bucket, HandleError> {
    kv::open("").map_err(|e| HandleError::Retry(format!("state error: {e:?}")))
}

fn kv_set(v: &Value) -> Result<(), HandleError> {
    bucket()?
        .set(text(v, "key"), text(v, "value").as_bytes())
        .map_err(|e| HandleError::Retry(format!("state error: {e:?}")))
}

/// `field` as an optional string.
fn maybe_text(v: &Value, field: &str) -> Option<String> {
    v.get(field).and_then(Value::as_str).map(str::to_owned)
}

/// The payload's `reason`, or `reason_bytes` bytes of `x` (a reason too
/// long for a header, say).
fn reason(v: &Value) -> String {
    match v.get("reason_bytes").and_then(Value::as_u64) {
        Some(n) => "x".repeat(n as usize),
        None => text(v, "reason").into(),
    }
}

fn publish_n(v: &Value) -> Result<(), HandleError> {
    // Properties pass through from the payload, so tests can send what
    // the host must refuse (long ids, the host's own headers, ...).
    let headers = v
        .get("headers")
        .and_then(Value::as_object)
        .map(|h| {
            h.iter()
                .map(|(name, value)| (name.clone(), value.as_str().unwrap_or_default().into()))
                .collect()
        })
        .unwrap_or_default();
    let props = Properties {
        content_type: Some(maybe_text(v, "content_type").unwrap_or("application/json".into())),
        message_id: maybe_text(v, "message_id"),
        correlation_id: maybe_text(v, "correlation_id"),
        headers,
    };
    for i in 0..number(v, "n", 1) {
        publish(
            text(v, "exchange"),
            text(v, "routing_key"),
            format!("{{\"seq\": {i}}}").as_bytes(),
            &props,
        )
        .map_err(|e| HandleError::Reject(format!("publish refused: {e:?}")))?;
    }
    Ok(())
}

/// A ledger event of the fault-survival harness (`tests/e2e/ledger.rs`):
/// count its application in state — `applied.<id>` incremented by 1,
/// atomically, so an event applied twice shows as 2 — and publish one
/// output carrying the id, so a checker can read back both effects. The id
/// is the payload's `id`, else the message id; the output goes to the
/// payload's `exchange`, else the config key `ledger-exchange`. With a
/// `counter` in the payload, that key is incremented by 1 too: one key
/// every event of the stream updates (as every order updates a stock
/// level), so a lost update or a double application shows in its total.
fn ledger(v: &Value, event: &Event) -> Result<(), HandleError> {
    let id = match text(v, "id") {
        "" => event.message_id.clone().unwrap_or_default(),
        id => id.to_owned(),
    };
    if id.is_empty() {
        return Err(HandleError::Reject("ledger event without an id".into()));
    }
    let bucket = bucket()?;
    atomics::increment(&bucket, &format!("applied.{id}"), 1)
        .map_err(|e| HandleError::Retry(format!("state error: {e:?}")))?;
    if let Some(counter) = maybe_text(v, "counter") {
        atomics::increment(&bucket, &counter, 1)
            .map_err(|e| HandleError::Retry(format!("state error: {e:?}")))?;
    }
    let exchange = match text(v, "exchange") {
        "" => config::get("ledger-exchange")
            .ok()
            .flatten()
            .unwrap_or_default(),
        exchange => exchange.to_owned(),
    };
    let routing_key = match text(v, "routing_key") {
        "" => "ledger",
        key => key,
    };
    let props = Properties {
        content_type: Some("application/json".into()),
        message_id: None,
        correlation_id: None,
        headers: vec![],
    };
    let body = serde_json::json!({ "id": id }).to_string();
    publish(&exchange, routing_key, body.as_bytes(), &props)
        .map_err(|e| HandleError::Reject(format!("publish refused: {e:?}")))
}

/// `writes` keys (`big.<i>` padded with `k` to `key_bytes`) of
/// `value_bytes` each; the first refusal is a retry naming it.
fn kv_big(v: &Value) -> Result<(), HandleError> {
    let bucket = bucket()?;
    let key_bytes = number(v, "key_bytes", 8).max(0) as usize;
    let value = vec![b'v'; number(v, "value_bytes", 1).max(0) as usize];
    for i in 0..number(v, "writes", 1) {
        let mut key = format!("big.{i}");
        while key.len() < key_bytes {
            key.push('k');
        }
        bucket
            .set(&key, &value)
            .map_err(|e| HandleError::Retry(format!("state error: {e:?}")))?;
    }
    Ok(())
}

/// Hold `n` live state resources at once — buckets, or CAS handles on
/// `key` when `cas` is true — and report the first refusal as a retry.
fn hold_many(v: &Value) -> Result<(), HandleError> {
    let state_err = |e: kv::Error| HandleError::Retry(format!("state error: {e:?}"));
    let first = bucket()?;
    let mut buckets = Vec::new();
    let mut handles = Vec::new();
    for _ in 1..number(v, "n", 1) {
        if v.get("cas").and_then(Value::as_bool).unwrap_or(false) {
            handles.push(atomics::Cas::new(&first, text(v, "key")).map_err(state_err)?);
        } else {
            buckets.push(kv::open("").map_err(state_err)?);
        }
    }
    black_box((&buckets, &handles));
    Ok(())
}

fn probe<T, E: std::fmt::Display>(
    result: Result<T, E>,
    leak: impl FnOnce(T) -> String,
) -> Result<(), HandleError> {
    Err(HandleError::Reject(match result {
        Ok(v) => format!("LEAK: {}", leak(v)),
        Err(e) => format!("denied: {e}"),
    }))
}

/// Recursion the optimiser cannot turn into a loop: each frame keeps a
/// buffer alive across the recursive call.
#[allow(unconditional_recursion)] // unbounded on purpose: the host must stop it
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 256];
    frame[(depth % 256) as usize] = depth as u8;
    let below = recurse(black_box(depth + 1));
    black_box(&frame);
    below + frame[0] as u64
}

impl Guest for Chaos {
    fn manifest() -> Manifest {
        Manifest {
            name: "chaos".into(),
            version: "1.0.0".into(),
            subscriptions: vec![Subscription {
                exchange: "chaos".into(),
                kind: ExchangeKind::Topic,
                binding_keys: vec!["#".into()],
            }],
            // None: tests allow what each needs with `publishes_to`, so
            // the allow-list itself is under test.
            publishes: vec![],
            max_attempts: None,
        }
    }

    fn handle(event: Event) -> Result<(), HandleError> {
        let v = json::parse(&event.payload)
            .map_err(|e| HandleError::Reject(format!("unknown action: {e}")))?;
        match text(&v, "action") {
            "ok" => Ok(()),
            "loop" => {
                let mut n = 0u64;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Non-zero bytes, so every page is really touched.
                    hoard.push(vec![0xA5; 1 << 20]);
                    black_box(&hoard);
                }
            }
            "recurse" => {
                black_box(recurse(0));
                Ok(())
            }
            "panic" => panic!("chaos panic"),
            // WASI p2's `exit` carries only success or failure: any non-zero
            // code reaches the host as 1.
            "exit" => std::process::exit(number(&v, "code", 1) as i32),
            "read-file" => probe(std::fs::read_to_string(text(&v, "path")), |s| {
                format!("read {} bytes", s.len())
            }),
            "env" => {
                let count = std::env::vars().count();
                if count > 0 {
                    return Err(HandleError::Reject(format!(
                        "LEAK: {count} environment variables"
                    )));
                }
                probe(std::env::var(text(&v, "name")), |value| value)
            }
            "socket" => probe(std::net::TcpStream::connect(text(&v, "addr")), |_| {
                "connected".into()
            }),
            "retry" => Err(HandleError::Retry(reason(&v))),
            "reject" => Err(HandleError::Reject(reason(&v))),
            // Waits the deadline must cut short: one long sleep, and
            // short sleeps for ever.
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_millis(
                    number(&v, "ms", 0).max(0) as u64
                ));
                Ok(())
            }
            "sleep-loop" => loop {
                std::thread::sleep(std::time::Duration::from_millis(10));
            },
            // Stdin is closed: the read ends at once, with nothing.
            "read-stdin" => {
                let mut input = Vec::new();
                match std::io::Read::read_to_end(&mut std::io::stdin(), &mut input) {
                    Ok(0) => Ok(()),
                    Ok(n) => Err(HandleError::Reject(format!(
                        "LEAK: read {n} bytes from stdin"
                    ))),
                    Err(e) => Err(HandleError::Reject(format!("denied: {e}"))),
                }
            }
            "kv-big" => kv_big(&v),
            "hold-many" => hold_many(&v),
            "publish" => publish_n(&v),
            "publish-then-fail" => {
                publish_n(&v)?;
                Err(HandleError::Retry("failed after publishing".into()))
            }
            "ledger" => ledger(&v, &event),
            // How many events this instance has run, written to state
            // `key`: 1 every time with a fresh instance per event.
            "calls" => {
                let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
                bucket()?
                    .set(text(&v, "key"), calls.to_string().as_bytes())
                    .map_err(|e| HandleError::Retry(format!("state error: {e:?}")))
            }
            "kv-set" => kv_set(&v),
            "kv-set-then-fail" => {
                kv_set(&v)?;
                Err(HandleError::Retry("failed after write".into()))
            }
            "kv-set-then-panic" => {
                kv_set(&v)?;
                panic!("chaos panic after write")
            }
            "kv-incr" => atomics::increment(&bucket()?, text(&v, "key"), number(&v, "delta", 1))
                .map(drop)
                .map_err(|e| HandleError::Retry(format!("state error: {e:?}"))),
            "burn" => {
                let until = std::time::Instant::now()
                    + std::time::Duration::from_micros(number(&v, "micros", 0).max(0) as u64);
                while std::time::Instant::now() < until {
                    black_box(0);
                }
                Ok(())
            }
            "print" => {
                let line = text(&v, "text");
                for _ in 0..number(&v, "times", 1) {
                    println!("{line}");
                }
                eprintln!("{line}");
                Ok(())
            }
            "log" => {
                log(Level::Info, "chaos", text(&v, "message"));
                Ok(())
            }
            other => Err(HandleError::Reject(format!("unknown action {other:?}"))),
        }
    }
}

export!(Chaos);
