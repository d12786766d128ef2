#!/usr/bin/env bash
# The whole test suite, with its set-up: toolchain and wasm target (from
# rust-toolchain.toml), a local RabbitMQ when none is running, then every
# test. Guests are built by the tests themselves on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-toolchain.sh
if [ -z "${EVENT_HOST_AMQP_URL:-}" ]; then
    scripts/ensure-rabbitmq.sh
fi
cargo test --workspace "$@"
