#!/usr/bin/env bash
# The main job on a machine without Docker: build the host and the example
# handlers, start a local RabbitMQ if none is running, install the handlers
# into ./handlers, run the sidecar, and push one order through it with a
# plain AMQP client. The sidecar keeps running until Ctrl-C (SIGINT drains
# in-flight events and exits 0).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
scripts/ensure-rabbitmq.sh
python3 -c "import pika" 2>/dev/null || python3 -m pip install --quiet pika

mkdir -p handlers
for h in inventory order_publisher; do
    # Write beside, then rename into place: the documented safe install.
    cp "guests/target/wasm32-wasip2/release/$h.wasm" "handlers/.$h.wasm.tmp"
    mv "handlers/.$h.wasm.tmp" "handlers/${h//_/-}.wasm"
done

admin=${EVENT_HOST_ADMIN_ADDR:-127.0.0.1:9090}
target/release/event-host run --config examples/config.toml --admin-addr "$admin" &
host=$!
trap 'kill -TERM $host 2>/dev/null; wait $host' INT TERM

get() { python3 -c "import sys,urllib.request as u
try: print(u.urlopen('http://$admin'+sys.argv[1]).read().decode())
except Exception as e: sys.exit(1)" "$1"; }
for _ in $(seq 1 100); do get /readyz >/dev/null 2>&1 && break; sleep 0.2; done
get /readyz

order_id=$(date +%s)
scripts/publish.py orders "" "{\"id\": $order_id, \"item\": \"Laptop\", \"quantity\": 1}"
sleep 1
echo "stock now: $(get /state/inventory/stock.Laptop)"
echo "handlers:  http://$admin/handlers   metrics: http://$admin/metrics"
echo "event-host is running (pid $host); Ctrl-C to stop."
wait $host
