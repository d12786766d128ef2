#!/usr/bin/env bash
# Build the host and every guest in release mode.
#   host:   target/release/event-host
#   guests: guests/target/wasm32-wasip2/release/*.wasm
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-toolchain.sh
cargo build --release -p event-host
(cd guests && cargo build --release)
echo "host:   target/release/event-host"
echo "guests: $(ls guests/target/wasm32-wasip2/release/*.wasm | tr '\n' ' ')"
