#!/bin/sh
# Build the handler component: {{name}}.wasm, beside this script, with
# componentize-js (installed from npm once, into a cache shared by every
# project: ${XDG_CACHE_HOME:-~/.cache}/event-host/componentize-js-VERSION).
# HTTP is left out: the host grants a handler no network.
set -eu
cd "$(dirname "$0")"
version=0.23.0
tool="${XDG_CACHE_HOME:-$HOME/.cache}/event-host/componentize-js-$version"
mkdir -p "$(dirname "$tool")"
if command -v flock >/dev/null 2>&1; then
    # One install at a time into the shared cache.
    exec 9>"$(dirname "$tool")/.componentize-js.lock"
    flock 9
fi
if [ ! -f "$tool/.complete" ]; then
    rm -rf "$tool"
    mkdir -p "$tool"
    npm install --prefix "$tool" --no-audit --no-fund --silent "@bytecodealliance/componentize-js@$version" >/dev/null
    touch "$tool/.complete"
fi
"$tool/node_modules/.bin/componentize-js" --wit wit --world-name handler \
    --disable http fetch-event --out {{name}}.wasm app.js >/dev/null
echo "built {{name}}.wasm"
