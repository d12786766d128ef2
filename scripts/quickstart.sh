#!/usr/bin/env bash
# Build the host and the example handlers, install them into ./handlers and
# run the example events through them offline with `event-host replay`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
mkdir -p handlers
for h in inventory order_publisher; do
    # Copy beside, then rename into place: the documented safe install.
    cp "guests/target/wasm32-wasip2/release/$h.wasm" "handlers/.$h.wasm.tmp"
    mv "handlers/.$h.wasm.tmp" "handlers/${h//_/-}.wasm"
done
target/release/event-host check handlers/inventory.wasm
target/release/event-host replay --handlers handlers --events examples/events.jsonl --config examples/config.toml
