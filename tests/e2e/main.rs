//! End-to-end tests, one binary made of modules. Tests that need no broker
//! (sandbox, state, business logic, replay, check) run anywhere; the guests
//! are built automatically on first use.

mod amqp_support;
mod backend;
mod otlp_support;
mod pg_support;
mod support;

mod boundary;
mod broker;
mod business;
mod cli;
mod crash;
mod credentials;
mod deploy;
mod dlq;
mod faults;
mod fleet;
mod hostile;
mod ledger;
mod network;
mod node;
mod otlp;
mod process;
mod proxy;
mod python;
mod quorum;
mod reload;
mod sandbox;
mod scaffold;
mod seed;
mod split;
mod state;
mod status;
