#!/usr/bin/env bash
# Make sure a RabbitMQ broker accepts connections on 127.0.0.1:5672:
# if nothing listens there, install the Debian package when missing and
# start a local node. Does nothing when a broker is already running.
set -euo pipefail

listening() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if listening; then
    exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "installing rabbitmq-server (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq rabbitmq-server >/dev/null
fi
echo "starting rabbitmq-server" >&2
rabbitmq-server -detached
for _ in $(seq 1 120); do
    if listening; then
        # The port opens before the node is fully booted.
        rabbitmqctl await_startup >/dev/null 2>&1 || true
        echo "rabbitmq is up" >&2
        exit 0
    fi
    sleep 1
done
echo "rabbitmq did not start within 120 s" >&2
exit 1
