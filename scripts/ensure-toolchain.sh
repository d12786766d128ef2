#!/usr/bin/env bash
# Install the toolchain rust-toolchain.toml names, with the wasm32-wasip2
# target. rustup does this by itself only when auto-install is on, and it
# never adds a missing target to an installed toolchain, so do both here.
set -euo pipefail
cd "$(dirname "$0")/.."
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
rustup toolchain list | grep -q "^$toolchain" || rustup toolchain install "$toolchain" --profile minimal --component rustfmt,clippy
rustup target list --installed --toolchain "$toolchain" | grep -qx wasm32-wasip2 \
    || rustup target add --toolchain "$toolchain" wasm32-wasip2
