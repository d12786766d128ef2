//! Which events are "the same event": the key an event is deduplicated on.
//!
//! A redelivery (a crash between commit and ack, a lost ack) must not
//! apply an event twice. The host records, with each commit, the event's
//! idempotency key and skips any later delivery with a key already
//! recorded. By default the key is the AMQP `message-id`, but many
//! publishers set none (the seed's Order Service, for one); a handler can
//! name where its key is instead — a field of the JSON body or a header.
//!
//! An event that lacks its key falls back to its message id, then to no
//! key at all: it is processed at least once (a redelivery runs it again),
//! counted in `event_host_events_without_idempotency_key_total`, and never
//! rejected for that alone.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use serde::Deserialize;

use crate::dispatch::{Delivery, HeaderValue};
use crate::handler::sha256_hex;

/// Longest key (and derived message id) kept as it is: an AMQP short
/// string holds 255 bytes. Longer ones are replaced by their sha256, so the
/// same input always gives the same key.
pub const MAX_KEY_BYTES: usize = crate::broker::MAX_SHORT_STRING_BYTES;

/// Prefix of a hashed key, so it cannot be mistaken for an id a publisher
/// chose.
const HASHED_PREFIX: &str = "sha256:";

/// Where a handler's events carry their idempotency key (config
/// `idempotency_key`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum IdempotencyKey {
    /// The AMQP `message-id` property (`"message-id"`, the default).
    #[default]
    MessageId,
    /// A JSON pointer (RFC 6901) into the body, e.g. `/id` or
    /// `/order/id`; the value there must be a string or a number.
    Pointer(String),
    /// An application header (`"header:NAME"`); its value must be text or
    /// an integer.
    Header(String),
}

impl TryFrom<String> for IdempotencyKey {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s == "message-id" {
            Ok(Self::MessageId)
        } else if s.starts_with('/') {
            Ok(Self::Pointer(s))
        } else if let Some(name) = s.strip_prefix("header:") {
            if name.is_empty() || name.len() > MAX_KEY_BYTES {
                return Err(format!(
                    "idempotency_key {s:?}: a header name of 1 to {MAX_KEY_BYTES} bytes must follow `header:`"
                ));
            }
            Ok(Self::Header(name.to_owned()))
        } else {
            Err(format!(
                "idempotency_key {s:?}: use \"message-id\", a JSON pointer such as \"/id\", or \"header:NAME\""
            ))
        }
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MessageId => f.write_str("message-id"),
            Self::Pointer(p) => f.write_str(p),
            Self::Header(h) => write!(f, "header:{h}"),
        }
    }
}

/// The key `delivery` is deduplicated on under `spec`: its configured key,
/// else its message id, else `None` (processed at least once).
///
/// A key found in the body or a header is prefixed with where it came
/// from, so an order id `42` cannot collide with a message id `42`; a
/// message id is used as it is (the dedupe records of earlier versions
/// stay valid). Keys over [`MAX_KEY_BYTES`] are hashed.
pub fn key_for(spec: &IdempotencyKey, delivery: &Delivery) -> Option<String> {
    let found = match spec {
        IdempotencyKey::MessageId => None,
        IdempotencyKey::Pointer(pointer) => {
            pointer_value(&delivery.payload, pointer).map(|v| format!("{pointer}={v}"))
        }
        IdempotencyKey::Header(name) => {
            header_value(&delivery.headers, name).map(|v| format!("header:{name}={v}"))
        }
    };
    found
        .or_else(|| delivery.message_id.clone().filter(|id| !id.is_empty()))
        .map(bounded)
}

/// `id` as it is when it fits an AMQP short string, else
/// `sha256:<hex of id>`: deterministic, so a re-run derives the same one.
pub fn bounded(id: String) -> String {
    if id.len() <= MAX_KEY_BYTES {
        id
    } else {
        format!("{HASHED_PREFIX}{}", sha256_hex(id.as_bytes()))
    }
}

/// An id unique to this call (for the output of an event with no key): a
/// process-wide random seed and a counter. Never derived from the body, so
/// two events with identical bodies get different ids.
pub fn unique_id() -> String {
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        // std's RandomState is seeded from the OS per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        h.finish()
    });
    format!("{seed:016x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The string or number at `pointer` in a JSON body; anything else
/// (no JSON, no such field, another type, an empty string) is no key.
fn pointer_value(payload: &[u8], pointer: &str) -> Option<String> {
    let body: serde_json::Value = serde_json::from_slice(payload).ok()?;
    scalar_at(&body, pointer)
}

/// The non-empty string or the number at `pointer` in `body`, as text (a
/// number as JSON writes it): how a field of a body becomes part of a key.
pub(crate) fn scalar_at(body: &serde_json::Value, pointer: &str) -> Option<String> {
    match body.pointer(pointer)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn header_value(headers: &[(String, HeaderValue)], name: &str) -> Option<String> {
    match &headers.iter().find(|(k, _)| k == name)?.1 {
        HeaderValue::Text(s) if !s.is_empty() => Some(s.clone()),
        HeaderValue::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> IdempotencyKey {
        IdempotencyKey::try_from(s.to_owned()).unwrap()
    }

    fn delivery(body: &str, message_id: Option<&str>) -> Delivery {
        Delivery {
            payload: body.as_bytes().to_vec(),
            message_id: message_id.map(str::to_owned),
            ..Delivery::default()
        }
    }

    #[test]
    fn parses_the_three_forms_and_refuses_others() {
        assert_eq!(spec("message-id"), IdempotencyKey::MessageId);
        assert_eq!(spec("/id"), IdempotencyKey::Pointer("/id".into()));
        assert_eq!(
            spec("header:x-order"),
            IdempotencyKey::Header("x-order".into())
        );
        for bad in ["", "id", "header:", "messageid"] {
            assert!(IdempotencyKey::try_from(bad.to_owned()).is_err(), "{bad:?}");
        }
        assert_eq!(spec("header:x-order").to_string(), "header:x-order");
    }

    #[test]
    fn message_id_is_the_default_and_used_as_it_is() {
        let d = delivery("{}", Some("m-1"));
        assert_eq!(key_for(&IdempotencyKey::default(), &d), Some("m-1".into()));
        assert_eq!(
            key_for(&IdempotencyKey::default(), &delivery("{}", None)),
            None
        );
        assert_eq!(
            key_for(&IdempotencyKey::default(), &delivery("{}", Some(""))),
            None
        );
    }

    #[test]
    fn a_pointer_takes_strings_and_numbers_from_the_body() {
        let id = spec("/id");
        assert_eq!(
            key_for(&id, &delivery(r#"{"id":42}"#, None)),
            Some("/id=42".into())
        );
        assert_eq!(
            key_for(&id, &delivery(r#"{"id":"p-1"}"#, Some("m"))),
            Some("/id=p-1".into())
        );
        let nested = spec("/order/id");
        assert_eq!(
            key_for(&nested, &delivery(r#"{"order":{"id":7}}"#, None)),
            Some("/order/id=7".into())
        );
        // RFC 6901 escapes: `~1` is `/`.
        assert_eq!(
            key_for(&spec("/a~1b"), &delivery(r#"{"a/b":"x"}"#, None)),
            Some("/a~1b=x".into())
        );
    }

    #[test]
    fn a_missing_key_falls_back_to_the_message_id_then_to_none() {
        let id = spec("/id");
        for body in [
            r#"{"item":"x"}"#,
            "not json",
            r#"{"id":null}"#,
            r#"{"id":{"a":1}}"#,
            r#"{"id":""}"#,
            r#"{"id":true}"#,
        ] {
            assert_eq!(
                key_for(&id, &delivery(body, Some("m-9"))),
                Some("m-9".into()),
                "{body}"
            );
            assert_eq!(key_for(&id, &delivery(body, None)), None, "{body}");
        }
    }

    #[test]
    fn a_header_key_takes_text_and_integers() {
        let h = spec("header:x-order");
        let mut d = delivery("{}", Some("m"));
        d.headers = vec![("x-order".into(), HeaderValue::Text("o-1".into()))];
        assert_eq!(key_for(&h, &d), Some("header:x-order=o-1".into()));
        d.headers = vec![("x-order".into(), HeaderValue::Integer(5))];
        assert_eq!(key_for(&h, &d), Some("header:x-order=5".into()));
        d.headers = vec![("x-order".into(), HeaderValue::Boolean(true))];
        assert_eq!(key_for(&h, &d), Some("m".into()));
        d.headers.clear();
        d.message_id = None;
        assert_eq!(key_for(&h, &d), None);
    }

    #[test]
    fn long_keys_are_hashed_deterministically() {
        let long = "x".repeat(300);
        let d = delivery("{}", Some(&long));
        let key = key_for(&IdempotencyKey::MessageId, &d).unwrap();
        assert!(key.len() <= MAX_KEY_BYTES);
        assert_eq!(key, format!("sha256:{}", sha256_hex(long.as_bytes())));
        assert_eq!(key_for(&IdempotencyKey::MessageId, &d), Some(key));
        let body = format!(r#"{{"id":"{long}"}}"#);
        let a = key_for(&spec("/id"), &delivery(&body, None)).unwrap();
        assert!(a.starts_with("sha256:") && a.len() <= MAX_KEY_BYTES);
        assert_eq!(key_for(&spec("/id"), &delivery(&body, None)), Some(a));
        assert_eq!(bounded("x".repeat(255)), "x".repeat(255));
    }

    #[test]
    fn unique_ids_differ() {
        let (a, b) = (unique_id(), unique_id());
        assert_ne!(a, b);
        assert!(a.len() < 64);
    }
}
