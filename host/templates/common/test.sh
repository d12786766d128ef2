#!/bin/sh
# Build, check the component, and replay events.jsonl through it with no
# broker: the first event is handled (ack), the second is not JSON and is
# rejected. EVENT_HOST names the binary when it is not on PATH.
set -eu
cd "$(dirname "$0")"
event_host="${EVENT_HOST:-event-host}"
./build.sh
"$event_host" check {{name}}.wasm >/dev/null
out=$("$event_host" replay --handlers . --events events.jsonl)
printf '%s\n' "$out"
got=$(printf '%s\n' "$out" | sed -n 's/.*"outcome":"\([a-z]*\)".*/\1/p' | tr '\n' ' ')
if [ "$got" != "ack reject " ]; then
    echo "test: expected outcomes 'ack reject', got '$got'" >&2
    exit 1
fi
echo "test: ok"
