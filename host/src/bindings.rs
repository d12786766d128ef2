//! The one `bindgen!` site: Rust types and traits generated from `wit/`.
//!
//! Every other module talks about the WIT contract through these types, so
//! a change to the WIT package shows up as a compile error in exactly the
//! places that must follow it.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "handler",
    // Every import may trap: a host-side fault (a state store I/O error, a
    // missing resource) must fail the call, not be smuggled to the guest as
    // a business error.
    imports: { default: trappable },
    with: {
        "wasi:keyvalue/store.bucket": crate::guest::Bucket,
        "wasi:keyvalue/atomics.cas": crate::guest::Cas,
    },
});

pub use self::event_host::handler::publisher::{Properties as PublishProperties, PublishError};
pub use self::event_host::handler::types::{ExchangeKind, HeaderValue, Subscription};
