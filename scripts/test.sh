#!/usr/bin/env bash
# The whole test suite, with its set-up: toolchain and wasm target (from
# rust-toolchain.toml), a local RabbitMQ and a local PostgreSQL when none is
# running (EVENT_HOST_AMQP_URL / EVENT_HOST_TEST_POSTGRES_URL name others
# instead), then every test. Guests are built by the tests themselves on
# first use.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-toolchain.sh
if [ -z "${EVENT_HOST_AMQP_URL:-}" ]; then
    scripts/ensure-rabbitmq.sh
fi
if [ -z "${EVENT_HOST_TEST_POSTGRES_URL:-}" ]; then
    scripts/ensure-postgres.sh
fi
cargo test --workspace "$@"
