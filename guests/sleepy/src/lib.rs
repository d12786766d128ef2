//! A handler whose `manifest()` sleeps for a minute: loading or checking it
//! must fail within the manifest's deadline, not wait the minute out, as
//! a guest blocked in a WASI timer is not running wasm for the epoch
//! interrupt to stop.

wit_bindgen::generate!({ world: "handler", path: "../../wit", generate_all });

struct Sleepy;

impl Guest for Sleepy {
    fn manifest() -> Manifest {
        std::thread::sleep(std::time::Duration::from_secs(60));
        Manifest {
            name: "sleepy".into(),
            version: "1.0.0".into(),
            subscriptions: vec![],
            publishes: vec![],
            max_attempts: None,
        }
    }

    fn handle(_event: Event) -> Result<(), HandleError> {
        Ok(())
    }
}

export!(Sleepy);
