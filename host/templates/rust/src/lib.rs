//! {{name}}: an event-host handler. The host calls `manifest` once when
//! the file is loaded (what to consume, what it may publish to) and
//! `handle` once per event. `wit/handler.wit` is the whole contract.

wit_bindgen::generate!({ world: "handler", path: "wit", generate_all });

use event_host::handler::types::{ExchangeKind, Subscription};
use wasi::keyvalue::{atomics, store as kv};
use wasi::logging::logging::{log, Level};

struct Handler;

impl Guest for Handler {
    fn manifest() -> Manifest {
        Manifest {
            name: "{{name}}".into(),
            version: "0.1.0".into(),
            subscriptions: vec![Subscription {
                exchange: "{{exchange}}".into(),
                kind: ExchangeKind::{{kind_rust}},
                binding_keys: vec![{{binding_keys_rust}}],
            }],
            // Exchanges `publish` may send to (each declared by the host).
            publishes: vec![],
            // None: the host config's `max_attempts` (default 5).
            max_attempts: None,
        }
    }

    fn handle(event: Event) -> Result<(), HandleError> {
        // A body that is not JSON never will be: `Reject` dead-letters it
        // at once, with this reason. `Retry` is for what may pass later.
        let body: serde_json::Value = serde_json::from_slice(&event.payload)
            .map_err(|e| HandleError::Reject(format!("payload is not JSON: {e}")))?;
        // State is per handler and transactional per event: this write
        // commits with the ack, and only if `handle` returns `Ok`. The
        // bucket is the handler's own, named as Spin and wasmCloud name
        // theirs (`""` works too).
        let state = |e| HandleError::Retry(format!("state: {e:?}"));
        let bucket = kv::open("default").map_err(state)?;
        let key = format!("count.{}", event.routing_key);
        let seen = atomics::increment(&bucket, &key, 1).map_err(state)?;
        log(
            Level::Info,
            "{{name}}",
            &format!("event {seen} with routing key {:?}: {body}", event.routing_key),
        );
        Ok(())
    }
}

export!(Handler);
