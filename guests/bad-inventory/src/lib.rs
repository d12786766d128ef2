//! A broken build of `inventory`: the same name, one more subscription
//! (`orders-audit`, so a swap changes the topology), and a `handle` that
//! traps on every event — the bad deploy that hot-reload tests roll back
//! from.

wit_bindgen::generate!({ world: "handler", path: "../../wit", generate_all });

use event_host::handler::types::{ExchangeKind, Output, Subscription};

struct BadInventory;

impl Guest for BadInventory {
    fn manifest() -> Manifest {
        Manifest {
            name: "inventory".into(),
            version: "1.0.1-broken".into(),
            subscriptions: vec![
                Subscription {
                    exchange: "orders".into(),
                    kind: ExchangeKind::Fanout,
                    binding_keys: vec![],
                },
                Subscription {
                    exchange: "orders-audit".into(),
                    kind: ExchangeKind::Fanout,
                    binding_keys: vec![],
                },
            ],
            publishes: vec![Output {
                exchange: "inventory".into(),
                kind: ExchangeKind::Topic,
            }],
            max_attempts: None,
        }
    }

    fn handle(_event: Event) -> Result<(), HandleError> {
        panic!("this build of inventory is broken")
    }
}

export!(BadInventory);
