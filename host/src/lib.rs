//! event-host: a RabbitMQ sidecar that runs every event through
//! hot-reloadable WebAssembly components.
//!
//! # Layout
//!
//! - [`bindings`]: the one `bindgen!` site, generated from `wit/`.
//! - [`runtime`]: the Wasm side — engine policy (pooling, epochs, limits),
//!   compiling and checking components, one call in a fresh instance.
//! - [`guest`]: what a guest sees of the host — store data and the host side
//!   of every WIT import (state, publish, logging, config).
//! - [`state`]: the durable, transactional per-handler state store, dedupe
//!   records and the outbox — embedded SQLite or PostgreSQL shared by a
//!   fleet, behind one interface.
//! - [`manifest`], [`handler`]: a handler's self-description and loading a
//!   `.wasm` file into an immutable, ready-to-run version.
//! - [`config`]: the TOML file and every knob, with defaults.
//! - [`dispatch`]: the only module that knows both sides — delivery in,
//!   handler call, state commit, one ack decision ([`dispatch::decide`]).
//! - [`idempotency`]: which key an event is deduplicated on (message id,
//!   a body field, a header).
//! - [`read_ahead`]: the state keys a batch's events will read, named by
//!   the operator from their bodies, read in one round trip on shared
//!   state.
//! - [`cli`]: argument parsing and the commands; `main` only calls it.
//! - [`broker`]: the AMQP side — connection (password redacted), each
//!   handler's topology (queue, retry delay queues, dead-letter queue),
//!   envelope conversion.
//! - [`dispatch::amqp`]: the broker path of the dispatcher — consume,
//!   batch, commit, publish with confirms, ack.
//! - [`dlq`]: dead letters as a workflow — list a handler's, send them
//!   back to its queue once fixed (`event-host dlq`, the admin endpoint).
//! - [`registry`], [`metrics`], [`admin`]: live handlers (current and
//!   previous version, active / paused / removed), Prometheus metrics, the
//!   admin HTTP endpoint.
//! - [`activity`], [`journal`], [`status`]: the status page — the last
//!   minutes per handler second by second (rate, outcomes, p50/p99), the
//!   recent lifecycle changes, and the `/status` document and page built
//!   from them.
//! - [`reload`]: the folder watcher — load changed files off the hot path
//!   (compiled-code cache), declare their topology, swap atomically.
//! - [`health`]: the crash-loop breaker and a new version's probation
//!   (automatic rollback).
//! - [`server`]: `event-host run` — reconnecting broker sessions and
//!   graceful shutdown.
//! - [`trace`]: W3C Trace Context — an event's trace continued from its
//!   `traceparent`, carried on to what it publishes and its retry and
//!   dead-letter copies, named in its log lines.
//! - [`otlp`]: each event's span exported to an OpenTelemetry collector
//!   (OTLP/HTTP, off unless configured), off the event's path.
//! - [`split_guard`]: a host on embedded state consumes a queue only
//!   alone (no silent split of state across hosts).
//! - [`router`], [`replay`]: AMQP routing in memory and the offline
//!   `replay` command built on the real dispatcher.
//! - [`scaffold`]: `event-host new`, a handler project in Rust or Python
//!   with the WIT this binary implements.

pub mod activity;
pub mod admin;
pub mod bindings;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod dlq;
pub mod guest;
pub mod handler;
pub mod health;
pub mod idempotency;
pub mod journal;
pub mod manifest;
pub mod metrics;
pub mod otlp;
pub mod read_ahead;
pub mod registry;
pub mod reload;
pub mod replay;
pub mod router;
pub mod runtime;
pub mod scaffold;
pub mod server;
pub mod split_guard;
pub mod state;
pub mod status;
pub mod trace;
