//! The boundary where AMQP deliveries become WIT events, fuzzed with
//! proptest. Arbitrary lapin deliveries — payload bytes (empty to ~64 KiB),
//! exchange and routing key of any Unicode, every `BasicProperties` field
//! optionally set, headers holding every `AMQPValue` variant nested several
//! levels (non-UTF-8 long strings, NaN and infinite floats, decimals,
//! timestamps past `i64::MAX`, void), the redelivered flag and the host's
//! own `x-event-host-*` headers with wrong types, zero, negative and huge
//! values — go through `broker::to_delivery`, which must not panic and must
//! keep every promise an independent model of it states. A sample then runs
//! through real guests (`inventory`, `chaos`): the host must not fail and
//! every event must end acked, retried or rejected for a reason.
//!
//! The default case counts keep this to a few seconds in a debug build.
//! `PROPTEST_CASES=N` runs N cases of each property instead, e.g.
//! `PROPTEST_CASES=100000 cargo test -p event-host --test e2e boundary`;
//! `PROPTEST_RNG_SEED` replays a seed. A failure prints the shrunk input.

use std::collections::BTreeMap;

use event_host::broker::{
    to_delivery, ATTEMPTS_HEADER, ATTEMPT_HEADER, EXCHANGE_HEADER, HANDLER_HEADER, REASON_HEADER,
    ROUTING_KEY_HEADER, VERSION_HEADER,
};
use event_host::dispatch::{HeaderValue, Outcome};
use lapin::message::Delivery as AmqpDelivery;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::BasicProperties;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};

use crate::amqp_support::{unique, Client};
use crate::process::{event_host, free_port, http_status};
use crate::support::{guest, Harness};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        // A failure prints its shrunk input; nothing is written to the tree.
        failure_persistence: None,
        ..Config::default()
    }
}

// ---- generators -----------------------------------------------------------

/// Any Unicode text of at most `max` bytes (AMQP short strings hold 255).
fn text(max_chars: usize, max_bytes: usize) -> BoxedStrategy<String> {
    vec(any::<char>(), 0..=max_chars)
        .prop_map(move |chars| {
            let mut s = String::new();
            for c in chars {
                if s.len() + c.len_utf8() > max_bytes {
                    break;
                }
                s.push(c);
            }
            s
        })
        .boxed()
}

fn short_string() -> BoxedStrategy<ShortString> {
    prop_oneof![
        4 => text(24, 255),
        1 => text(300, 255),
    ]
    .prop_map(ShortString::from)
    .boxed()
}

/// Bytes that are mostly UTF-8 text, sometimes not.
fn long_string() -> BoxedStrategy<LongString> {
    prop_oneof![
        text(40, 4096).prop_map(String::into_bytes),
        vec(any::<u8>(), 0..48),
        // Valid text with one invalid byte inside.
        (text(16, 64), any::<u8>().prop_map(|b| b | 0x80)).prop_map(|(s, b)| {
            let mut v = s.into_bytes();
            let at = v.len() / 2;
            v.insert(at, b);
            v
        }),
    ]
    .prop_map(LongString::from)
    .boxed()
}

fn decimal() -> BoxedStrategy<DecimalValue> {
    (any::<u8>(), any::<u32>())
        .prop_map(|(scale, value)| DecimalValue { scale, value })
        .boxed()
}

/// Every `AMQPValue` variant; arrays and tables nest several levels.
fn amqp_value() -> BoxedStrategy<AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        // `any` floats are finite: ask for NaNs and infinities too.
        (proptest::num::f32::ANY
            | proptest::num::f32::INFINITE
            | proptest::num::f32::QUIET_NAN
            | proptest::num::f32::SIGNALING_NAN)
            .prop_map(AMQPValue::Float),
        (proptest::num::f64::ANY
            | proptest::num::f64::INFINITE
            | proptest::num::f64::QUIET_NAN
            | proptest::num::f64::SIGNALING_NAN)
            .prop_map(AMQPValue::Double),
        decimal().prop_map(AMQPValue::DecimalValue),
        short_string().prop_map(AMQPValue::ShortString),
        long_string().prop_map(AMQPValue::LongString),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        vec(any::<u8>(), 0..32).prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            btree_map(short_string(), inner, 0..6)
                .prop_map(|m| AMQPValue::FieldTable(FieldTable::from(m))),
        ]
    })
    .boxed()
}

/// Integers of every width around the edges that matter for an attempt
/// number (0, 1, negative, `u32::MAX`, past it).
fn attempt_like() -> BoxedStrategy<AMQPValue> {
    let edge = prop_oneof![
        Just(0i64),
        Just(1),
        Just(2),
        Just(-1),
        Just(u32::MAX as i64),
        Just(u32::MAX as i64 + 1),
        Just(i64::MIN),
        Just(i64::MAX),
        -10i64..10,
        1i64..100,
    ];
    prop_oneof![
        edge.clone().prop_map(AMQPValue::LongLongInt),
        edge.clone()
            .prop_map(|n| AMQPValue::LongInt(n.clamp(i32::MIN as i64, i32::MAX as i64) as i32)),
        edge.clone().prop_map(|n| AMQPValue::ShortShortInt(n as i8)),
        edge.clone().prop_map(|n| AMQPValue::LongUInt(n as u32)),
        edge.prop_map(|n| AMQPValue::Timestamp(n as u64)),
        // The wrong type altogether: text, a float, a table...
        amqp_value(),
    ]
    .boxed()
}

/// Header keys: anything, the host's own, and RabbitMQ's `x-death`.
fn header_key() -> BoxedStrategy<ShortString> {
    prop_oneof![
        6 => short_string(),
        1 => prop_oneof![
            Just(ATTEMPT_HEADER),
            Just(EXCHANGE_HEADER),
            Just(ROUTING_KEY_HEADER),
            Just(REASON_HEADER),
            Just(HANDLER_HEADER),
            Just(VERSION_HEADER),
            Just(ATTEMPTS_HEADER),
            Just("x-event-host-"),
            Just("x-event-host-other"),
            Just("X-Event-Host-Attempt"),
            Just("x-death"),
        ]
        .prop_map(ShortString::from),
    ]
    .boxed()
}

fn headers() -> BoxedStrategy<FieldTable> {
    (
        btree_map(header_key(), amqp_value(), 0..8),
        proptest::option::of(attempt_like()),
        proptest::option::of(prop_oneof![
            short_string().prop_map(AMQPValue::ShortString),
            long_string().prop_map(AMQPValue::LongString),
            amqp_value(),
        ]),
        proptest::option::of(prop_oneof![
            short_string().prop_map(AMQPValue::ShortString),
            long_string().prop_map(AMQPValue::LongString),
            amqp_value(),
        ]),
    )
        .prop_map(|(mut table, attempt, exchange, routing_key)| {
            for (k, v) in [
                (ATTEMPT_HEADER, attempt),
                (EXCHANGE_HEADER, exchange),
                (ROUTING_KEY_HEADER, routing_key),
            ] {
                if let Some(v) = v {
                    table.insert(ShortString::from(k), v);
                }
            }
            FieldTable::from(table)
        })
        .boxed()
}

/// Every `BasicProperties` field, each optionally set.
fn properties() -> BoxedStrategy<BasicProperties> {
    let s = || proptest::option::of(short_string());
    (
        (
            s(),
            s(),
            proptest::option::of(headers()),
            proptest::option::of(any::<u8>()),
        ),
        (proptest::option::of(any::<u8>()), s(), s(), s()),
        (
            // Message ids: arbitrary, or one that repeats (dedupe).
            proptest::option::of(prop_oneof![
                6 => short_string(),
                1 => Just(ShortString::from("evh-boundary-repeated-id")),
            ]),
            proptest::option::of(any::<u64>()),
            s(),
            s(),
        ),
        (s(), s()),
    )
        .prop_map(
            |(
                (content_type, content_encoding, headers, delivery_mode),
                (priority, correlation_id, reply_to, expiration),
                (message_id, timestamp, kind, user_id),
                (app_id, cluster_id),
            )| {
                let mut p = BasicProperties::default();
                if let Some(v) = content_type {
                    p = p.with_content_type(v);
                }
                if let Some(v) = content_encoding {
                    p = p.with_content_encoding(v);
                }
                if let Some(v) = headers {
                    p = p.with_headers(v);
                }
                if let Some(v) = delivery_mode {
                    p = p.with_delivery_mode(v);
                }
                if let Some(v) = priority {
                    p = p.with_priority(v);
                }
                if let Some(v) = correlation_id {
                    p = p.with_correlation_id(v);
                }
                if let Some(v) = reply_to {
                    p = p.with_reply_to(v);
                }
                if let Some(v) = expiration {
                    p = p.with_expiration(v);
                }
                if let Some(v) = message_id {
                    p = p.with_message_id(v);
                }
                if let Some(v) = timestamp {
                    p = p.with_timestamp(v);
                }
                if let Some(v) = kind {
                    p = p.with_type(v);
                }
                if let Some(v) = user_id {
                    p = p.with_user_id(v);
                }
                if let Some(v) = app_id {
                    p = p.with_app_id(v);
                }
                if let Some(v) = cluster_id {
                    p = p.with_cluster_id(v);
                }
                p
            },
        )
        .boxed()
}

/// What the `chaos` guest is asked to do (the quick actions).
const CHAOS_ACTIONS: [&str; 8] = [
    "ok",
    "log",
    "print",
    "reject",
    "retry",
    "kv-set",
    "panic",
    "no-such-action",
];

/// Payloads: arbitrary bytes, empty, large-ish, and ones the guests
/// understand (inventory orders, chaos actions) so every path is taken.
fn payload() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..256),
        1 => Just(Vec::new()),
        1 => vec(any::<u8>(), 16_384..65_536),
        2 => (
            prop_oneof![Just("Laptop".to_owned()), text(12, 64)],
            -2i64..5,
            any::<u32>(),
        )
            .prop_map(|(item, quantity, id)| {
                json!({"id": id, "item": item, "quantity": quantity})
                    .to_string()
                    .into_bytes()
            }),
        2 => (0..CHAOS_ACTIONS.len(), 0u8..8, text(12, 64)).prop_map(|(i, k, t)| {
            json!({"action": CHAOS_ACTIONS[i], "key": format!("k{k}"), "value": t,
                   "message": t, "text": t, "reason": t})
            .to_string()
            .into_bytes()
        }),
    ]
    .boxed()
}

fn delivery() -> BoxedStrategy<AmqpDelivery> {
    (
        payload(),
        short_string(),
        short_string(),
        any::<bool>(),
        any::<u64>(),
        properties(),
    )
        .prop_map(
            |(data, exchange, routing_key, redelivered, tag, properties)| {
                let mut d = AmqpDelivery::mock(tag, exchange, routing_key, redelivered, data);
                d.properties = properties;
                d
            },
        )
        .boxed()
}

// ---- the model: what to_delivery promises ----------------------------------

/// "Any AMQP integer type, widened" (the WIT), a timestamp included.
fn model_int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

/// Plain JSON, as a replayed event's headers would carry it.
fn model_json(v: &AMQPValue) -> Value {
    let float = |f: f64| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number);
    let bytes = |b: &[u8]| Value::Array(b.iter().map(|&b| json!(b)).collect());
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::Timestamp(n) => json!(n),
        AMQPValue::Float(f) => float(*f as f64),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(d) => float(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => match String::from_utf8(s.as_bytes().to_vec()) {
            Ok(t) => json!(t),
            Err(_) => bytes(s.as_bytes()),
        },
        AMQPValue::ByteArray(b) => bytes(b.as_slice()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(model_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), model_json(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
        other => json!(model_int(other).expect("the other variants are integers")),
    }
}

/// The WIT header value a field value must become.
fn model_header(v: &AMQPValue) -> HeaderValue {
    if let Some(n) = model_int(v) {
        return HeaderValue::Integer(n);
    }
    match v {
        AMQPValue::Boolean(b) => HeaderValue::Boolean(*b),
        AMQPValue::Float(f) => HeaderValue::Float(*f as f64),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::ShortString(s) => HeaderValue::Text(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match String::from_utf8(s.as_bytes().to_vec()) {
            Ok(t) => HeaderValue::Text(t),
            Err(_) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        other => HeaderValue::Json(model_json(other).to_string()),
    }
}

/// Equal header values (a NaN equals the same NaN; JSON compares parsed).
fn same_header(got: &HeaderValue, want: &HeaderValue) -> bool {
    match (got, want) {
        (HeaderValue::Float(a), HeaderValue::Float(b)) => a.to_bits() == b.to_bits(),
        (HeaderValue::Json(a), HeaderValue::Json(b)) => {
            serde_json::from_str::<Value>(a).ok() == serde_json::from_str::<Value>(b).ok()
                && serde_json::from_str::<Value>(a).is_ok()
        }
        _ => got == want,
    }
}

/// Check one conversion against the model.
fn check_conversion(raw: &AmqpDelivery) -> Result<(), TestCaseError> {
    let d = to_delivery(raw);
    let props = &raw.properties;
    let empty = FieldTable::default();
    let table = props.headers().as_ref().unwrap_or(&empty).inner();

    prop_assert_eq!(&d.payload, &raw.data, "payload preserved byte for byte");
    prop_assert_eq!(d.redelivered, raw.redelivered);
    prop_assert_eq!(
        d.message_id.as_deref(),
        props.message_id().as_ref().map(|s| s.as_str())
    );
    prop_assert_eq!(
        d.correlation_id.as_deref(),
        props.correlation_id().as_ref().map(|s| s.as_str())
    );
    prop_assert_eq!(
        d.content_type.as_deref(),
        props.content_type().as_ref().map(|s| s.as_str())
    );
    prop_assert_eq!(d.timestamp, *props.timestamp());

    // The attempt, exchange and routing key: the host's headers are
    // trusted only with its signature (`to_delivery_signed`, the broker
    // path); unsigned, as here, a delivery is attempt 1 from its own
    // exchange and routing key, whatever a publisher put there.
    prop_assert_eq!(d.attempt, 1);
    let want_exchange = raw.exchange.as_str().to_owned();
    let want_key = raw.routing_key.as_str().to_owned();
    prop_assert_eq!(&d.exchange, &want_exchange);
    prop_assert_eq!(&d.routing_key, &want_key);

    // Headers: every application header once, in table order, none of the
    // host's own; each value as the WIT says.
    let want: Vec<(&str, &AMQPValue)> = table
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .filter(|(k, _)| !k.starts_with("x-event-host-"))
        .collect();
    prop_assert_eq!(d.headers.len(), want.len(), "header count");
    for ((name, got), (want_name, v)) in d.headers.iter().zip(&want) {
        prop_assert_eq!(name.as_str(), *want_name);
        let want_value = model_header(v);
        prop_assert!(
            same_header(got, &want_value),
            "header {:?}: got {:?}, want {:?}",
            name,
            got,
            want_value
        );
    }
    Ok(())
}

// ---- the properties --------------------------------------------------------

#[test]
fn any_amqp_delivery_converts_as_promised() {
    let cases = config(5000).cases;
    let mut runner = TestRunner::new(config(5000));
    let seen = Coverage::default();
    let result = runner.run(&delivery(), |raw| {
        seen.record(&raw);
        check_conversion(&raw)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    seen.assert_covered(cases);
}

/// How often the generated deliveries hit each interesting shape, so the
/// property cannot pass on inputs that never reach the edge cases.
#[derive(Default)]
struct Coverage(std::cell::RefCell<BTreeMap<&'static str, u32>>);

impl Coverage {
    fn bump(&self, what: &'static str) {
        *self.0.borrow_mut().entry(what).or_default() += 1;
    }

    fn record(&self, raw: &AmqpDelivery) {
        self.bump("deliveries");
        if raw.data.is_empty() {
            self.bump("empty payload");
        }
        if raw.data.len() >= 16_384 {
            self.bump("payload >= 16 KiB");
        }
        if raw.redelivered {
            self.bump("redelivered");
        }
        if !raw.exchange.as_str().is_ascii() {
            self.bump("non-ASCII exchange");
        }
        let Some(table) = raw.properties.headers() else {
            return;
        };
        if let Some(v) = table.inner().get(ATTEMPT_HEADER) {
            match model_int(v).map(|n| (1..=u32::MAX as i64).contains(&n)) {
                Some(true) => self.bump("attempt header in range"),
                Some(false) => self.bump("attempt header out of range"),
                None => self.bump("attempt header of another type"),
            }
        }
        for (k, v) in table.inner() {
            if k.as_str().starts_with("x-event-host-") {
                self.bump("x-event-host-* header");
            }
            match model_header(v) {
                HeaderValue::Json(j) if j.starts_with('{') => self.bump("nested table header"),
                HeaderValue::Json(j) if j.starts_with('[') => self.bump("array header"),
                HeaderValue::Bytes(_) => self.bump("bytes header"),
                HeaderValue::Float(f) if !f.is_finite() => self.bump("NaN/infinite header"),
                _ => {}
            }
            if matches!(v, AMQPValue::LongString(s) if std::str::from_utf8(s.as_bytes()).is_err()) {
                self.bump("non-UTF-8 long string header");
            }
            if matches!(v, AMQPValue::DecimalValue(_)) {
                self.bump("decimal header");
            }
        }
    }

    /// With enough cases, every shape was generated at least once.
    fn assert_covered(&self, cases: u32) {
        let seen = self.0.borrow();
        eprintln!("boundary coverage over {cases} cases: {seen:?}");
        if cases < 500 {
            return;
        }
        for what in [
            "empty payload",
            "payload >= 16 KiB",
            "redelivered",
            "non-ASCII exchange",
            "attempt header in range",
            "attempt header out of range",
            "attempt header of another type",
            "x-event-host-* header",
            "nested table header",
            "array header",
            "bytes header",
            "NaN/infinite header",
            "non-UTF-8 long string header",
            "decimal header",
        ] {
            assert!(
                seen.get(what).copied().unwrap_or(0) > 0,
                "never generated: {what}"
            );
        }
    }
}

#[test]
fn any_amqp_delivery_ends_in_a_clean_disposition_in_real_guests() {
    let harness = Harness::new(
        &["inventory", "chaos"],
        r#"
[handlers.inventory.config]
"stock.Laptop" = "1000"
"#,
    );
    let cases = config(500).cases;
    let mut runner = TestRunner::new(config(500));
    let outcomes = Coverage::default();
    let result = runner.run(&delivery(), |raw| {
        let delivery = to_delivery(&raw);
        let action = serde_json::from_slice::<Value>(&delivery.payload)
            .ok()
            .and_then(|v| v.get("action").and_then(Value::as_str).map(str::to_owned));
        for name in ["inventory", "chaos"] {
            let handler = &harness.handlers[name];
            let handled = harness
                .dispatcher
                .dispatch(handler, &delivery)
                .map_err(|e| TestCaseError::fail(format!("{name}: host fault: {e:#}")))?;
            prop_assert_ne!(
                handled.outcome,
                Outcome::Requeue,
                "{}: requeued (a host-side failure): {:?}",
                name,
                handled.reason
            );
            if handled.outcome != Outcome::Ack {
                prop_assert!(
                    handled.reason.is_some(),
                    "{}: {:?} without a reason",
                    name,
                    handled.outcome
                );
            }
            outcomes.bump(match (name, handled.outcome, handled.duplicate) {
                (_, _, true) => "duplicate (acked)",
                ("inventory", Outcome::Ack, _) => "inventory ack",
                ("inventory", Outcome::Retry, _) => "inventory retry",
                ("inventory", _, _) => "inventory reject",
                (_, Outcome::Ack, _) => "chaos ack",
                (_, Outcome::Retry, _) => "chaos retry",
                _ => "chaos reject",
            });
            // The event reached the guest intact: chaos does what it said.
            if name == "chaos" && !handled.duplicate {
                let want: &[Outcome] = match action.as_deref() {
                    Some("ok" | "log" | "print" | "kv-set") => &[Outcome::Ack],
                    Some("retry" | "panic") => &[Outcome::Retry, Outcome::Reject],
                    _ => &[Outcome::Reject],
                };
                prop_assert!(
                    want.contains(&handled.outcome),
                    "chaos {:?}: {:?} ({:?})",
                    action,
                    handled.outcome,
                    handled.reason
                );
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = outcomes.0.borrow();
    eprintln!("boundary outcomes over {cases} cases: {seen:?}");
    if cases >= 100 {
        for what in [
            "inventory ack",
            "inventory reject",
            "chaos ack",
            "chaos retry",
            "chaos reject",
        ] {
            assert!(
                seen.get(what).copied().unwrap_or(0) > 0,
                "never happened: {what}"
            );
        }
    }
}

/// The shape RabbitMQ gives `x-death` after a retry-queue round trip
/// arrives as the same plain JSON a replayed event carries.
#[test]
fn x_death_arrives_as_plain_json() {
    let death = |queue: &str, count: i64| {
        let mut t = BTreeMap::new();
        t.insert(ShortString::from("count"), AMQPValue::LongLongInt(count));
        t.insert(
            ShortString::from("exchange"),
            AMQPValue::LongString("".into()),
        );
        t.insert(
            ShortString::from("queue"),
            AMQPValue::LongString(queue.into()),
        );
        t.insert(
            ShortString::from("reason"),
            AMQPValue::LongString("expired".into()),
        );
        t.insert(
            ShortString::from("routing-keys"),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                "inventory".into(),
            )])),
        );
        t.insert(
            ShortString::from("time"),
            AMQPValue::Timestamp(1_700_000_000),
        );
        AMQPValue::FieldTable(FieldTable::from(t))
    };
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![death("inventory.retry.1000ms", 2)])),
    );
    let mut raw = AmqpDelivery::mock(1, "".into(), "inventory".into(), false, b"{}".to_vec());
    raw.properties = BasicProperties::default().with_headers(headers);
    let d = to_delivery(&raw);
    let HeaderValue::Json(text) = &d.headers[0].1 else {
        panic!("x-death is JSON: {:?}", d.headers);
    };
    let v: Value = serde_json::from_str(text).unwrap();
    assert_eq!(
        v,
        json!([{
            "count": 2,
            "exchange": "",
            "queue": "inventory.retry.1000ms",
            "reason": "expired",
            "routing-keys": ["inventory"],
            "time": 1_700_000_000u64,
        }])
    );
}

/// Nesting depth of the header in the test below: about 50 KB on the wire,
/// inside one frame (RabbitMQ's default `frame_max` is 128 KiB, room for
/// ~26 000 levels).
const DEEP: usize = 10_000;

/// A message whose one header nests arrays `DEEP` levels must not take the
/// host down. lapin parses field tables recursively, with no depth limit,
/// on its IO thread; with the default 2 MiB stack that overflowed at about
/// 130 levels, the process aborted, and the unacked message was
/// redelivered to the restarted host, which aborted again. The binary now
/// gives its threads a 256 MiB stack (address space) unless
/// `RUST_MIN_STACK` says otherwise (host/src/main.rs).
#[test]
fn deeply_nested_headers_do_not_crash_the_host() {
    if let Ok(exchange) = std::env::var("EVH_BOUNDARY_PUBLISH_DEEP") {
        // Child mode, started below with a stack big enough for lapin to
        // serialise the message.
        let mut deep = AMQPValue::FieldArray(FieldArray::default());
        for _ in 1..DEEP {
            deep = AMQPValue::FieldArray(FieldArray::from(vec![deep]));
        }
        let mut headers = FieldTable::default();
        headers.insert("deep".into(), deep);
        let client = Client::connect();
        client.publish(
            &exchange,
            "",
            br#"{"action":"ok"}"#,
            BasicProperties::default().with_headers(headers),
        );
        return;
    }
    let exchange = unique("deep-x");
    let queue = unique("deep-q");
    let mut client = Client::connect();
    client.cleanup(
        &[&queue, &format!("{queue}.dlq")],
        &[&exchange, &format!("{queue}.dlx")],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(guest("chaos"), dir.path().join("chaos.wasm")).unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "handlers_dir = {:?}\nstate_path = \"state\"\ndurability = \"normal\"\n\
             [handlers.chaos]\nqueue = {queue:?}\nmax_attempts = 1\n\
             subscriptions = [{{ exchange = {exchange:?}, kind = \"fanout\" }}]\n",
            dir.path().to_str().unwrap()
        ),
    )
    .unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("host.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut host = event_host(dir.path())
        .args(["run", "--config", config.to_str().unwrap()])
        .args(["--admin-addr", &admin])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let alive = |host: &mut std::process::Child| host.try_wait().unwrap().is_none();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while http_status(&admin, "/readyz") != 200 {
        assert!(
            alive(&mut host) && std::time::Instant::now() < deadline,
            "host not ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let published = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "boundary::deeply_nested_headers_do_not_crash_the_host",
        ])
        .env("EVH_BOUNDARY_PUBLISH_DEEP", &exchange)
        .env("RUST_MIN_STACK", (256usize << 20).to_string())
        .output()
        .unwrap();
    assert!(published.status.success(), "publishing: {published:?}");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let survived = alive(&mut host);
    if survived {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &host.id().to_string()])
            .status();
    }
    let _ = host.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        survived,
        "a {DEEP}-level header killed the host: {}",
        text.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
    );
}

// ---- the whole broker path ---------------------------------------------------

/// What `chaos` is asked to do on the broker path: every hostile action a
/// guest has (huge reasons, long and odd publish properties, publishes to
/// exchanges it did not declare, oversized state, sleeping past its
/// deadline, panics), beside plain successes and raw bytes.
fn hostile_payload(out: String) -> BoxedStrategy<Vec<u8>> {
    let reason_bytes = prop_oneof![Just(0usize), 1usize..2048, Just(300_000usize)];
    let odd_text = prop_oneof![text(12, 64), text(300, 1200)];
    let odd_headers = btree_map(
        prop_oneof![
            3 => text(12, 300),
            1 => Just(ATTEMPT_HEADER.to_owned()),
            1 => Just(REASON_HEADER.to_owned()),
        ],
        text(40, 20_000),
        0..4,
    );
    let target = prop_oneof![
        4 => Just(out),
        1 => Just(String::new()),
        1 => Just("amq.direct".to_owned()),
        1 => Just("evh-undeclared".to_owned()),
        1 => text(300, 400),
    ];
    prop_oneof![
        2 => Just(json!({"action": "ok"})),
        2 => (prop_oneof![Just("reject"), Just("retry")], reason_bytes)
            .prop_map(|(action, n)| json!({"action": action, "reason_bytes": n})),
        4 => (target, 0i64..4, proptest::option::of(odd_text.clone()),
              proptest::option::of(odd_text.clone()), proptest::option::of(odd_text), odd_headers)
            .prop_map(|(exchange, n, message_id, correlation_id, content_type, headers)| {
                json!({"action": "publish", "exchange": exchange, "routing_key": "k", "n": n,
                       "message_id": message_id, "correlation_id": correlation_id,
                       "content_type": content_type, "headers": headers})
            }),
        2 => (0usize..2048, 0usize..(2 << 20), 0usize..1500).prop_map(|(k, v, n)| {
            json!({"action": "kv-big", "key_bytes": k, "value_bytes": v, "writes": n})
        }),
        1 => (0i64..1500).prop_map(|ms| json!({"action": "sleep", "ms": ms})),
        1 => Just(json!({"action": "panic"})),
    ]
    .prop_map(|v| v.to_string().into_bytes())
    .boxed()
}

/// Properties a plain client can publish: everything `properties()` makes
/// except what RabbitMQ itself refuses from a publisher — a `user-id` other
/// than the login's, an `expiration` that is not a number, a delivery mode
/// other than 1 or 2, NaN and infinite floats and short-string values in
/// headers (it closes the publisher's connection) — sometimes with a header set near the host's
/// header cap or past it.
fn publishable(p: BasicProperties, big_header: Option<usize>) -> BasicProperties {
    let mut out = BasicProperties::default();
    macro_rules! copy {
        ($($get:ident => $with:ident),*) => {
            $(if let Some(v) = p.$get().clone() { out = out.$with(v); })*
        };
    }
    copy!(content_type => with_content_type, content_encoding => with_content_encoding,
          priority => with_priority,
          correlation_id => with_correlation_id, reply_to => with_reply_to,
          message_id => with_message_id, timestamp => with_timestamp, kind => with_type,
          app_id => with_app_id, cluster_id => with_cluster_id);
    if let Some(mode) = p.delivery_mode() {
        out = out.with_delivery_mode(1 + mode % 2);
    }
    let mut headers = FieldTable::default();
    for (k, v) in p.headers().clone().unwrap_or_default().inner() {
        headers.insert(k.clone(), finite(v.clone()));
    }
    if let Some(n) = big_header {
        headers.insert("big".into(), AMQPValue::LongString(vec![b'h'; n].into()));
    }
    out.with_headers(headers)
}

/// Generated deliveries — long and odd ids, any header names and values,
/// nested tables, forged `x-event-host-*` headers, header sets near and
/// past the cap — published by a plain client through a real broker to a
/// real host process, whose guest then does something hostile with each:
/// the host never panics, never loses its broker session, and every event
/// ends acked or in its dead-letter queue, nothing requeued or lost.
#[test]
fn generated_deliveries_through_the_real_broker_path_settle_and_never_stop_the_host() {
    let cases = config(300).cases as usize;
    let exchange = unique("bpath-x");
    let queue = unique("bpath-q");
    let out = unique("bpath-out");
    let mut client = Client::connect();
    let dlq = format!("{queue}.dlq");
    client.cleanup_handler(&queue, 20, &[&exchange, &out]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(guest("chaos"), dir.path().join("chaos.wasm")).unwrap();
    let config_file = dir.path().join("host.toml");
    std::fs::write(
        &config_file,
        format!(
            "handlers_dir = {:?}\nstate_path = \"state\"\ndurability = \"normal\"\n\
             [handlers.chaos]\nqueue = {queue:?}\nmax_attempts = 2\nretry_base_ms = 20\n\
             deadline_ms = 200\nbreaker_failures = 1000000\n\
             subscriptions = [{{ exchange = {exchange:?}, kind = \"fanout\" }}]\n\
             publishes_to = [{{ exchange = {out:?}, kind = \"fanout\" }}]\n",
            dir.path().to_str().unwrap()
        ),
    )
    .unwrap();
    let mut host = crate::process::Run::start("bpath", dir.path(), {
        let mut cmd = event_host(dir.path());
        cmd.args(["run", "--config", config_file.to_str().unwrap()]);
        cmd
    });
    host.wait_ready();

    let strategy = (
        hostile_payload(out.clone()),
        properties(),
        short_string(),
        proptest::option::of(prop_oneof![Just(30_000usize), Just(70_000usize)]),
    );
    let mut runner = TestRunner::new(config(300));
    // Published with confirms, each awaited. RabbitMQ itself refuses a few
    // generated messages (it closes the publisher's connection on some
    // header values it cannot parse, e.g. NaN floats): those never reach
    // the host, so they are skipped, counted, and a new connection made.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (published, refused) = rt.block_on(async {
        let open = || async {
            let conn = lapin::Connection::connect(
                &crate::amqp_support::amqp_url(),
                lapin::ConnectionProperties::default(),
            )
            .await
            .unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(Default::default()).await.unwrap();
            (conn, ch)
        };
        let (mut conn, mut ch) = open().await;
        let (mut published, mut refused) = (0u64, Vec::new());
        for _ in 0..cases {
            use proptest::strategy::ValueTree;
            let (payload, props, routing_key, big) =
                strategy.new_tree(&mut runner).unwrap().current();
            let props = publishable(props, big);
            let confirmed = match ch
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.clone(),
                    Default::default(),
                    &payload,
                    props,
                )
                .await
            {
                Ok(confirm) => confirm.await.map(drop),
                Err(e) => Err(e),
            };
            match confirmed {
                Ok(()) => published += 1,
                Err(e) => {
                    refused.push(e.to_string());
                    let _ = conn.close(200, "refused".into()).await;
                    (conn, ch) = open().await;
                }
            }
        }
        let _ = conn.close(200, "published".into()).await;
        (published, refused)
    });
    assert!(
        published as usize >= cases * 3 / 4,
        "the broker refused too many generated messages: {refused:?}"
    );
    let cases = published;

    // Every event ends acked or dead-lettered (retries are on the way).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    loop {
        host.assert_running();
        let c = host.counters("chaos");
        let settled = c["acked"].as_u64().unwrap_or(0) + c["dead_lettered"].as_u64().unwrap_or(0);
        if settled >= cases {
            break;
        }
        if std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(&host.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!("only {settled} of {cases} events settled: {c}; log tail: {tail:#?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let c = host.counters("chaos");
    let (_, metrics) = crate::amqp_support::http_get(&host.admin, "/metrics");
    let reconnects = metrics
        .lines()
        .find(|l| l.starts_with("event_host_broker_reconnects_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let log = std::fs::read_to_string(&host.log).unwrap_or_default();
    let dead = c["dead_lettered"].as_u64().unwrap_or(0);
    let in_dlq = client.depth(&dlq) as u64;
    let _ = host.terminate();
    // A guest's own panic message is logged too (from `chaos`'s source);
    // any other is the host's.
    let host_panics: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("panicked at") && !l.contains("chaos/src/"))
        .collect();
    assert!(
        host_panics.is_empty(),
        "the host panicked: {host_panics:#?}"
    );
    assert_eq!(reconnects, 0.0, "the broker session was lost");
    // An output the broker refuses is dead-lettered beside its acked
    // event: counted in both.
    let refused_outputs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("broker refused publish to exchange"))
        .collect();
    assert_eq!(
        c["acked"].as_u64().unwrap_or(0) + dead,
        cases + refused_outputs.len() as u64,
        "every event settled exactly once: {c}; refused outputs: {refused_outputs:#?}"
    );
    assert_eq!(c["requeued"].as_u64().unwrap_or(0), 0, "requeued: {c}");
    assert_eq!(in_dlq, dead, "every dead-lettered event is in the DLQ");
    eprintln!(
        "broker path over {cases} generated deliveries ({} refused by the broker itself): {c}",
        refused.len()
    );
}

/// `v` as RabbitMQ parses it from a publisher: NaN and infinite floats
/// replaced by zero, short-string values sent as long strings (RabbitMQ
/// reads field type `s` as a short integer and closes the connection).
fn finite(v: AMQPValue) -> AMQPValue {
    match v {
        AMQPValue::ShortString(s) => AMQPValue::LongString(s.as_str().into()),
        AMQPValue::Float(f) if !f.is_finite() => AMQPValue::Float(0.0),
        AMQPValue::Double(f) if !f.is_finite() => AMQPValue::Double(0.0),
        AMQPValue::FieldArray(a) => AMQPValue::FieldArray(FieldArray::from(
            a.as_slice().iter().cloned().map(finite).collect::<Vec<_>>(),
        )),
        AMQPValue::FieldTable(t) => {
            let mut out = FieldTable::default();
            for (k, v) in t.inner() {
                out.insert(k.clone(), finite(v.clone()));
            }
            AMQPValue::FieldTable(out)
        }
        other => other,
    }
}
