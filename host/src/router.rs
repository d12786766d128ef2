//! AMQP routing semantics in memory, for `replay`: which handlers' queues a
//! message published to an exchange reaches, following RabbitMQ's rules for
//! fanout, direct, topic and headers exchanges.

use std::collections::HashMap;

use crate::dispatch::HeaderValue;
use crate::manifest::ExchangeKind;

/// Bindings of handler queues to exchanges.
#[derive(Debug, Default)]
pub struct Router {
    /// Exchange kind by name: the first declaration wins, as at a broker.
    kinds: HashMap<String, ExchangeKind>,
    /// (exchange, binding key, handler index).
    bindings: Vec<(String, String, usize)>,
}

impl Router {
    /// Declare `exchange` of `kind` (a later different kind is ignored with
    /// a warning, where a broker would refuse the declaration).
    pub fn declare(&mut self, exchange: &str, kind: ExchangeKind) {
        let existing = *self.kinds.entry(exchange.to_owned()).or_insert(kind);
        if existing != kind {
            tracing::warn!(
                exchange,
                declared = existing.as_str(),
                wanted = kind.as_str(),
                "exchange kind mismatch; keeping the first"
            );
        }
    }

    /// Bind handler `target`'s queue to `exchange` with `key`.
    pub fn bind(&mut self, exchange: &str, key: &str, target: usize) {
        self.bindings
            .push((exchange.to_owned(), key.to_owned(), target));
    }

    /// The handlers a message reaches, each once, in binding order.
    pub fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: &[(String, HeaderValue)],
    ) -> Vec<usize> {
        let Some(kind) = self.kinds.get(exchange) else {
            return Vec::new();
        };
        let mut targets = Vec::new();
        for (ex, key, target) in &self.bindings {
            if ex != exchange || targets.contains(target) {
                continue;
            }
            let hit = match kind {
                ExchangeKind::Fanout => true,
                ExchangeKind::Direct => key == routing_key,
                ExchangeKind::Topic => topic_matches(key, routing_key),
                ExchangeKind::Headers => headers_match(key, headers),
            };
            if hit {
                targets.push(*target);
            }
        }
        targets
    }
}

/// RabbitMQ topic matching: words split on `.`, `*` matches exactly one
/// word, `#` matches zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|skip| go(rest, &k[skip..])),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
            Some((word, rest)) => k.first() == Some(word) && go(rest, &k[1..]),
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    go(&p, &k)
}

/// Headers-exchange binding, written in a manifest as `k=v,k2=v2`, with an
/// optional `x-match=any` (default `all`). Values compare as text.
fn headers_match(binding: &str, headers: &[(String, HeaderValue)]) -> bool {
    let mut any = false;
    let mut wanted = Vec::new();
    for pair in binding.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "x-match" {
            any = v == "any";
        } else {
            wanted.push((k, v));
        }
    }
    let has = |k: &str, v: &str| {
        headers.iter().any(|(hk, hv)| {
            hk == k
                && match hv {
                    HeaderValue::Text(s) | HeaderValue::Json(s) => s == v,
                    HeaderValue::Integer(i) => i.to_string() == v,
                    HeaderValue::Boolean(b) => b.to_string() == v,
                    HeaderValue::Float(f) => f.to_string() == v,
                    HeaderValue::Bytes(b) => b == v.as_bytes(),
                }
        })
    };
    if any {
        wanted.iter().any(|(k, v)| has(k, v))
    } else {
        wanted.iter().all(|(k, v)| has(k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("inventory.*", "inventory.reserved"));
        assert!(!topic_matches("inventory.*", "inventory.low.now"));
        assert!(topic_matches("inventory.#", "inventory"));
        assert!(topic_matches("inventory.#", "inventory.low.now"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#.low", "inventory.low"));
        assert!(topic_matches("*.low.#", "inventory.low"));
        assert!(!topic_matches("*", ""));
        assert!(!topic_matches("a.b", "a.c"));
    }

    #[test]
    fn routing_by_kind() {
        let mut r = Router::default();
        r.declare("f", ExchangeKind::Fanout);
        r.declare("d", ExchangeKind::Direct);
        r.declare("h", ExchangeKind::Headers);
        r.bind("f", "", 0);
        r.bind("f", "ignored", 1);
        r.bind("d", "a", 0);
        r.bind("d", "b", 1);
        r.bind("h", "kind=x,x-match=any,other=y", 2);
        assert_eq!(r.route("f", "whatever", &[]), vec![0, 1]);
        assert_eq!(r.route("d", "b", &[]), vec![1]);
        assert!(r.route("d", "c", &[]).is_empty());
        assert!(r.route("nope", "a", &[]).is_empty());
        assert_eq!(
            r.route("h", "", &[("kind".into(), HeaderValue::Text("x".into()))]),
            vec![2]
        );
        assert!(r.route("h", "", &[]).is_empty());
    }
}
