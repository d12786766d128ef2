#!/bin/sh
# Build the handler component: {{name}}.wasm, beside this script.
set -eu
cd "$(dirname "$0")"
if command -v rustup >/dev/null 2>&1; then
    rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
fi
cargo build --release --target wasm32-wasip2 --quiet
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{{artifact}}.wasm" {{name}}.wasm
echo "built {{name}}.wasm"
