//! The cheapest possible handler: acks every event without looking at it.
//! It exists to measure the host's per-event dispatch cost in isolation.

wit_bindgen::generate!({ world: "handler", path: "../../wit", generate_all });

use event_host::handler::types::{ExchangeKind, Subscription};

struct Noop;

impl Guest for Noop {
    fn manifest() -> Manifest {
        Manifest {
            name: "noop".into(),
            version: "1.0.0".into(),
            subscriptions: vec![Subscription {
                exchange: "bench".into(),
                kind: ExchangeKind::Fanout,
                binding_keys: vec![],
            }],
            max_attempts: None,
        }
    }

    fn handle(_event: Event) -> Result<(), HandleError> {
        Ok(())
    }
}

export!(Noop);
