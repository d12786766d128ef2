#!/usr/bin/env bash
# Builds the Python inventory handler into a component:
#
#   guests/inventory-py/build.sh [OUTPUT.wasm [MODULE.py EXTRA.py...]]
#
# OUTPUT defaults to inventory-py.wasm next to this script, the modules to
# app.py (the handler; the first module is the component's entry) and
# rustcompat.py. parity.sh builds its tap handler with the same script.
#
# - installs componentize-py $CPY_VERSION from PyPI into a cached virtualenv,
#   ${XDG_CACHE_HOME:-$HOME/.cache}/event-host/componentize-py-$CPY_VERSION
#   (made once, reused after; set PYTHON to pick the interpreter, default python3);
# - writes the Python bindings of the WIT world to build/<output>/bindings
#   (for editors and type checkers: PYTHONPATH=build/inventory-py/bindings);
# - builds the component, unless OUTPUT is newer than every input (the
#   Python sources, the WIT files, this script).
#
# Prints one line on success; on failure, the failing tool's output.
set -euo pipefail

CPY_VERSION=0.25.1
WORLD=handler

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wit="$(cd "$here/../../wit" && pwd)"
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
out="$(abspath "${1:-$here/inventory-py.wasm}")"
sources=()
if [[ $# -gt 1 ]]; then
    for f in "${@:2}"; do sources+=("$(abspath "$f")"); done
else
    sources=("$here/app.py" "$here/rustcompat.py")
fi
app="$(basename "${sources[0]}" .py)"
python="${PYTHON:-python3}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/event-host"
venv="$cache/componentize-py-$CPY_VERSION"
cpy="$venv/bin/componentize-py"
# Per output, so two builds (the handler, parity's tap) never share one.
build="$here/build/$(basename "$out" .wasm)"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Run a step with its output kept aside, shown only if it fails.
quietly() {
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "build.sh: failed: $*" >&2
        exit 1
    fi
}

# ---- up to date? ------------------------------------------------------------
inputs=("${sources[@]}" "$here/build.sh")
while IFS= read -r -d '' f; do inputs+=("$f"); done < <(find "$wit" -name '*.wit' -print0)
if [[ -f "$out" ]]; then
    stale=0
    for f in "${inputs[@]}"; do
        if [[ "$f" -nt "$out" ]]; then stale=1; break; fi
    done
    if [[ $stale == 0 ]]; then
        echo "up to date: $out"
        exit 0
    fi
fi

# ---- componentize-py, once per version --------------------------------------
# A `.complete` marker is written last: a virtualenv left half-made by an
# interrupted install is thrown away and made again. flock keeps two builds
# from installing into it at once.
install_cpy() {
    [[ -f "$venv/.complete" ]] && return 0
    rm -rf "$venv"
    mkdir -p "$cache"
    # Debian's python3 has no ensurepip unless python3-venv is installed:
    # then make the virtualenv without pip and install with the system's pip.
    if "$python" -m venv "$venv" >"$log" 2>&1; then
        quietly "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            "componentize-py==$CPY_VERSION"
    else
        rm -rf "$venv"
        quietly "$python" -m venv --without-pip "$venv"
        quietly "$python" -m pip --python "$venv/bin/python" install --quiet \
            --disable-pip-version-check "componentize-py==$CPY_VERSION"
    fi
    "$cpy" --version >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    touch "$venv/.complete"
}
mkdir -p "$cache"
if command -v flock >/dev/null; then
    exec 9>"$cache/.componentize-py.lock"
    flock 9
fi
install_cpy
if command -v flock >/dev/null; then flock -u 9; fi

# ---- bindings and component ---------------------------------------------------
rm -rf "$build"
mkdir -p "$build/src"
quietly "$cpy" -d "$wit" -w "$WORLD" bindings "$build/bindings"
# Only the sources go into the component (componentize-py bundles the
# whole python path): staged in a folder of their own.
cp "${sources[@]}" "$build/src/"
mkdir -p "$(dirname "$out")"
tmp="$(dirname "$out")/.$(basename "$out").$$.tmp"
trap 'rm -f "$log" "$tmp"' EXIT
quietly env PYTHONDONTWRITEBYTECODE=1 "$cpy" -d "$wit" -w "$WORLD" \
    componentize "$app" -p "$build/src" -o "$tmp"
mv -f "$tmp" "$out"
size="$(wc -c <"$out")"
echo "built $out ($((size / 1024)) KiB, componentize-py $CPY_VERSION)"
