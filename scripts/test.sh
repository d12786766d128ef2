#!/usr/bin/env bash
# The whole test suite, with its set-up: toolchain and wasm target (from
# rust-toolchain.toml), a local RabbitMQ and a local PostgreSQL when none is
# running (EVENT_HOST_AMQP_URL / EVENT_HOST_TEST_POSTGRES_URL name others
# instead), Chromium and its test driver for the status page, then every
# test. Guests are built by the tests themselves on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-toolchain.sh
scripts/ensure-chromium.sh
# The status page's browser test skips where there is no Chromium, unless
# this is set: here Chromium was just made sure of, so it must run.
export EVENT_HOST_REQUIRE_BROWSER=1
if [ -z "${EVENT_HOST_AMQP_URL:-}" ]; then
    scripts/ensure-rabbitmq.sh
fi
if [ -z "${EVENT_HOST_TEST_POSTGRES_URL:-}" ]; then
    scripts/ensure-postgres.sh
fi
cargo test --workspace "$@"

# The end-to-end suite again with every host's state on PostgreSQL (see
# tests/e2e/backend.rs), in a database of its own, dropped afterwards.
base="${EVENT_HOST_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
suite_db="event_host_suite_$$"
psql "$base" -qAtc "CREATE DATABASE $suite_db" >/dev/null
trap 'psql "$base" -qAtc "DROP DATABASE IF EXISTS $suite_db WITH (FORCE)" >/dev/null || true' EXIT
EVENT_HOST_TEST_STATE=postgres \
EVENT_HOST_TEST_POSTGRES_URL="${base%/*}/$suite_db" \
    cargo test -p event-host --test e2e "$@"
