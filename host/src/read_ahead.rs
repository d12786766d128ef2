//! Which state keys a batch's events will read, known before they run
//! (config `read_ahead`).
//!
//! On shared state every key a guest reads is a round trip to PostgreSQL,
//! made while the guest waits, and a batch's events run one after
//! another: inventory's `order.<id>` check alone costs one trip per event.
//! Most handlers read keys named by fields of the event (`order.{/id}`,
//! `stock.{/item}`), so the operator can declare them. The dispatcher
//! then reads and locks every declared key of a batch in one round trip
//! before the first event runs, together with the batch's dedupe records;
//! the guests' reads of those keys are answered from memory.
//!
//! A declaration is a hint, never a contract: a key an event does not end
//! up reading was only locked early (until the batch commits, as if it had
//! been read), a key the guest reads that no template names is read as
//! before, and an event whose body lacks a field simply has no key from
//! that template. Embedded state ignores it (its reads are local).

use std::fmt;

use serde::Deserialize;

use crate::idempotency::scalar_at;

/// Templates a handler may declare: each is one more key per event to
/// lock, so a long list is a sign of a wrong one.
pub const MAX_TEMPLATES: usize = 16;

/// Keys read ahead for one batch at most (the batch size is at most 128;
/// this bounds what one batch locks and holds in memory together with
/// [`crate::state`]'s cap on each value kept).
pub const MAX_KEYS_PER_BATCH: usize = 512;

/// Longest template accepted, in bytes.
const MAX_TEMPLATE_BYTES: usize = 512;

/// One declared key: literal text with JSON pointers into the event's body
/// in braces, e.g. `stock.{/item}` or `order.{/order/id}`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct KeyTemplate {
    /// As written, for messages.
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// An RFC 6901 pointer; the value there must be a string or a number.
    Field(String),
}

impl TryFrom<String> for KeyTemplate {
    type Error = String;

    fn try_from(source: String) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "read_ahead {source:?}: {why} (write keys as text with JSON pointers in braces, e.g. \"stock.{{/item}}\")"
            )
        };
        if source.is_empty() || source.len() > MAX_TEMPLATE_BYTES {
            return Err(bad(&format!("use 1 to {MAX_TEMPLATE_BYTES} bytes")));
        }
        let mut parts = Vec::new();
        let mut rest = source.as_str();
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Text(rest.to_owned()));
                    break;
                }
                Some(at) if rest.as_bytes()[at] == b'}' => {
                    return Err(bad("a `}` with no `{` before it"));
                }
                Some(at) => {
                    if at > 0 {
                        parts.push(Part::Text(rest[..at].to_owned()));
                    }
                    let field = &rest[at + 1..];
                    let Some(end) = field.find('}') else {
                        return Err(bad("a `{` with no `}` after it"));
                    };
                    let pointer = &field[..end];
                    if !pointer.starts_with('/') || pointer.contains('{') {
                        return Err(bad(&format!(
                            "`{{{pointer}}}` is not a JSON pointer such as `{{/id}}`"
                        )));
                    }
                    parts.push(Part::Field(pointer.to_owned()));
                    rest = &field[end + 1..];
                }
            }
        }
        Ok(Self { source, parts })
    }
}

impl fmt::Debug for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl KeyTemplate {
    /// The key this template names for an event with `body`, if every
    /// field it uses is there (a string or a number).
    pub fn key_for(&self, body: &serde_json::Value) -> Option<String> {
        let mut key = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => key.push_str(text),
                Part::Field(pointer) => key.push_str(&scalar_at(body, pointer)?),
            }
        }
        Some(key)
    }

    /// Whether the template names a key without looking at the body.
    fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }
}

/// Check a handler's list (the parts of it serde cannot).
pub fn validate(handler: &str, templates: &[KeyTemplate]) -> Result<(), String> {
    if templates.len() > MAX_TEMPLATES {
        return Err(format!(
            "handler {handler:?}: read_ahead names {} keys, at most {MAX_TEMPLATES} are read ahead",
            templates.len()
        ));
    }
    Ok(())
}

/// The keys `templates` name for a batch of event bodies, each at most
/// `max_key_bytes` long (a longer one the guest could not read either),
/// deduplicated, sorted (the order PostgreSQL locks them in, the same on
/// every host) and capped at [`MAX_KEYS_PER_BATCH`]. A body that is not
/// JSON names only the constant keys.
pub fn keys<'a>(
    templates: &[KeyTemplate],
    bodies: impl IntoIterator<Item = &'a [u8]>,
    max_key_bytes: usize,
) -> Vec<String> {
    let mut keys = Vec::new();
    if templates.is_empty() {
        return keys;
    }
    let mut push = |key: String| {
        if !key.is_empty() && key.len() <= max_key_bytes {
            keys.push(key);
        }
    };
    for template in templates.iter().filter(|t| t.is_constant()) {
        push(template.source.clone());
    }
    let fields: Vec<&KeyTemplate> = templates.iter().filter(|t| !t.is_constant()).collect();
    if !fields.is_empty() {
        for body in bodies {
            let Ok(body) = serde_json::from_slice::<serde_json::Value>(body) else {
                continue;
            };
            for template in &fields {
                if let Some(key) = template.key_for(&body) {
                    push(key);
                }
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys.truncate(MAX_KEYS_PER_BATCH);
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(s: &str) -> KeyTemplate {
        KeyTemplate::try_from(s.to_owned()).unwrap()
    }

    #[test]
    fn templates_are_text_with_pointers_in_braces() {
        assert_eq!(
            template("stock.{/item}").parts,
            vec![Part::Text("stock.".into()), Part::Field("/item".into())]
        );
        assert_eq!(
            template("{/a}-{/b/c}!").parts,
            vec![
                Part::Field("/a".into()),
                Part::Text("-".into()),
                Part::Field("/b/c".into()),
                Part::Text("!".into())
            ]
        );
        assert_eq!(template("rates").parts, vec![Part::Text("rates".into())]);
        for bad in [
            "",
            "stock.{item}",
            "stock.{/item",
            "stock.}",
            "a{/b{/c}}",
            "{}",
        ] {
            let err = KeyTemplate::try_from(bad.to_owned()).unwrap_err();
            assert!(err.contains("read_ahead"), "{bad:?}: {err}");
        }
        assert!(KeyTemplate::try_from("k".repeat(MAX_TEMPLATE_BYTES + 1)).is_err());
    }

    #[test]
    fn a_batch_names_each_key_once_in_order_and_skips_what_it_cannot_name() {
        let templates = [
            template("stock.{/item}"),
            template("order.{/id}"),
            template("rates"),
        ];
        let bodies: [&[u8]; 6] = [
            br#"{"id": 2, "item": "Laptop"}"#,
            br#"{"id": "1", "item": "Laptop"}"#,
            br#"{"id": 3}"#,                     // no item: no stock key
            br#"{"id": true, "item": "Mouse"}"#, // a boolean id names nothing
            b"not json",
            br#"{"id": 4, "item": "x"}"#,
        ];
        assert_eq!(
            keys(&templates, bodies, 512),
            [
                "order.1",
                "order.2",
                "order.3",
                "order.4",
                "rates",
                "stock.Laptop",
                "stock.Mouse",
                "stock.x"
            ]
        );
        // Too long for the guest to read: not read ahead either.
        assert_eq!(
            keys(&templates, bodies, 7),
            ["order.1", "order.2", "order.3", "order.4", "rates", "stock.x"]
        );
        assert!(keys(&[], bodies, 512).is_empty());
    }

    #[test]
    fn a_batch_reads_ahead_a_bounded_number_of_keys() {
        let templates = [template("order.{/id}")];
        let bodies: Vec<Vec<u8>> = (0..MAX_KEYS_PER_BATCH + 10)
            .map(|i| format!(r#"{{"id": {i}}}"#).into_bytes())
            .collect();
        let found = keys(&templates, bodies.iter().map(Vec::as_slice), 512);
        assert_eq!(found.len(), MAX_KEYS_PER_BATCH);
    }

    #[test]
    fn a_handler_declares_a_bounded_number_of_templates() {
        let many: Vec<KeyTemplate> = (0..=MAX_TEMPLATES)
            .map(|i| template(&format!("k{i}")))
            .collect();
        assert!(validate("inventory", &many[..MAX_TEMPLATES]).is_ok());
        assert!(validate("inventory", &many)
            .unwrap_err()
            .contains("at most"));
    }
}
