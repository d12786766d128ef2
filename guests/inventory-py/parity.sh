#!/usr/bin/env bash
# Parity of the Python inventory handler with the Rust one (guests/inventory):
# replays the same event streams through each with `event-host replay`, and
# diffs what they did. Exits non-zero on any difference.
#
#   guests/inventory-py/parity.sh [--keep] [SCENARIO...]
#
# --keep leaves the work folder (replay output, state dumps, logs); it is
# always kept when something differs. SCENARIO names limit the run to some
# of parity/scenarios (default: all).
#
# Environment:
#   EVENT_HOST  the host binary   (default: target/release/event-host, else `event-host` on PATH)
#   RUST_WASM   the Rust inventory (default: guests/target/wasm32-wasip2/release/inventory.wasm)
#   PY_WASM     the Python one     (default: built by build.sh, guests/inventory-py/inventory-py.wasm)
#
# Each scenario is parity/scenarios/NAME.toml (host config) with NAME.jsonl
# as its events, or small.jsonl when there is none. Both builds run next to
# parity-tap (parity/tap), a handler that stores every message inventory
# publishes byte for byte, since replay prints payloads re-parsed; a
# scenario whose config says "# parity: no tap" (nothing reaches the tap)
# runs without it.
#
# Compared, per scenario: replay's output lines (outcome, reason, publishes
# with their message ids), the state each run left (every key and value of
# inventory and of the tap, the processed message ids), and the manifests
# `event-host check` prints. Normalised: the handler version (the sha256 of
# each .wasm file, which differs by construction) becomes <version>. Replay
# prints nothing else that varies between runs; its log (stderr, with
# timestamps) is kept aside, not compared.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
keep=0
if [[ "${1:-}" == "--keep" ]]; then keep=1; shift; fi
only=("$@")

host="${EVENT_HOST:-$root/target/release/event-host}"
if [[ ! -x "$host" ]]; then
    host="$(command -v event-host || true)"
    [[ -n "$host" ]] || { echo "parity.sh: no event-host binary: build it (scripts/build.sh) or set EVENT_HOST" >&2; exit 2; }
fi
rust_wasm="${RUST_WASM:-$root/guests/target/wasm32-wasip2/release/inventory.wasm}"
[[ -f "$rust_wasm" ]] || { echo "parity.sh: no $rust_wasm: cd guests && cargo build --release -p inventory, or set RUST_WASM" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/inventory-parity.XXXXXX")"
cleanup() { if [[ $keep == 0 ]]; then rm -rf "$work"; else echo "kept $work"; fi; }
trap cleanup EXIT

if [[ -n "${PY_WASM:-}" ]]; then
    py_wasm="$PY_WASM"
else
    py_wasm="$here/inventory-py.wasm"
    "$here/build.sh" "$py_wasm" >/dev/null
fi
tap_wasm="$here/build/parity-tap.wasm"
"$here/build.sh" "$tap_wasm" "$here/parity/tap/tap.py" >/dev/null

# Compiled code, reused across scenarios and runs (a Python component
# takes ~20 s to compile; a new build has a new sha, so a new entry).
cache="$here/build/compiled"
mkdir -p "$cache"

sha() { sha256sum "$1" | cut -d' ' -f1; }
declare -A wasm=([rust]="$rust_wasm" [py]="$py_wasm")
declare -A version=([rust]="$(sha "$rust_wasm")" [py]="$(sha "$py_wasm")")
for impl in rust py; do
    mkdir -p "$work/$impl/handlers" "$work/$impl/handlers-no-tap"
    cp "${wasm[$impl]}" "$work/$impl/handlers/inventory.wasm"
    cp "${wasm[$impl]}" "$work/$impl/handlers-no-tap/inventory.wasm"
    cp "$tap_wasm" "$work/$impl/handlers/parity-tap.wasm"
done

normalise() { sed -e "s/${version[$1]}/<version>/g"; }

failed=0
compare() { # name, rust file, py file
    if ! diff -u --label "rust/$1" --label "python/$1" "$2" "$3" >"$work/$1.diff"; then
        echo "DIFFERENT: $1"
        head -n 60 "$work/$1.diff"
        failed=1
        return 1
    fi
}

# The manifests, as the host reads them.
for impl in rust py; do
    "$host" check --cache-dir "$cache" "${wasm[$impl]}" 2>"$work/$impl/check.log" | grep -v '"file":' | normalise "$impl" >"$work/$impl/manifest.txt" \
        || { cat "$work/$impl/check.log" >&2; echo "parity.sh: event-host check refused the $impl build" >&2; exit 1; }
done
compare manifest "$work/rust/manifest.txt" "$work/py/manifest.txt" && echo "same: manifest"

for config in "$here"/parity/scenarios/*.toml; do
    name="$(basename "$config" .toml)"
    if [[ ${#only[@]} -gt 0 && " ${only[*]} " != *" $name "* ]]; then continue; fi
    events="$here/parity/scenarios/$name.jsonl"
    [[ -f "$events" ]] || events="$here/parity/scenarios/small.jsonl"
    handlers=handlers
    if grep -q '^# parity: no tap' "$config"; then handlers=handlers-no-tap; fi
    for impl in rust py; do
        dir="$work/$impl/$name"
        mkdir -p "$dir"
        if ! "$host" replay --handlers "$work/$impl/$handlers" --events "$events" --config "$config" \
            --state "$dir/state" --cache-dir "$cache" >"$dir/replay.raw" 2>"$dir/replay.log"; then
            cat "$dir/replay.log" >&2
            echo "parity.sh: replay failed for the $impl build, scenario $name" >&2
            exit 1
        fi
        normalise "$impl" <"$dir/replay.raw" >"$dir/replay.jsonl"
        python3 "$here/parity/dump_state.py" "$dir/state" | normalise "$impl" >"$dir/state.txt"
    done
    ok=1
    compare "$name.replay" "$work/rust/$name/replay.jsonl" "$work/py/$name/replay.jsonl" || ok=0
    compare "$name.state" "$work/rust/$name/state.txt" "$work/py/$name/state.txt" || ok=0
    if [[ $ok == 1 ]]; then
        echo "same: $name ($(grep -c '' <"$events") events, $(grep -c '' <"$work/rust/$name/replay.jsonl") invocations, $(grep -c '^kv ' <"$work/rust/$name/state.txt") state keys)"
    fi
done

if [[ $failed != 0 ]]; then
    keep=1
    echo "parity: FAILED (diffs in $work)"
    exit 1
fi
echo "parity: the Python and Rust inventory handlers behave the same"
