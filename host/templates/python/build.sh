#!/bin/sh
# Build the handler component: {{name}}.wasm, beside this script, with
# componentize-py (installed from PyPI once, into a cache shared by every
# project: ${XDG_CACHE_HOME:-~/.cache}/event-host/componentize-py-VERSION).
set -eu
cd "$(dirname "$0")"
version=0.25.1
venv="${XDG_CACHE_HOME:-$HOME/.cache}/event-host/componentize-py-$version"
mkdir -p "$(dirname "$venv")"
if command -v flock >/dev/null 2>&1; then
    # One install at a time into the shared cache.
    exec 9>"$(dirname "$venv")/.componentize-py.lock"
    flock 9
fi
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if python3 -m venv "$venv" >/dev/null 2>&1; then
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "componentize-py==$version"
    else
        # Debian's python3 without python3-venv: no ensurepip in the venv.
        rm -rf "$venv"
        python3 -m venv --without-pip "$venv"
        python3 -m pip --python "$venv/bin/python" install --quiet --disable-pip-version-check "componentize-py==$version"
    fi
    touch "$venv/.complete"
fi
cpy="$venv/bin/componentize-py"
rm -rf build
"$cpy" -d wit -w handler bindings build/bindings >/dev/null
mkdir -p build/src
cp app.py build/src/
PYTHONDONTWRITEBYTECODE=1 "$cpy" -d wit -w handler componentize app -p build/src -o {{name}}.wasm >/dev/null
echo "built {{name}}.wasm"
