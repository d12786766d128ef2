#!/usr/bin/env bash
# Make sure the status page's browser test can run: Debian's Chromium at
# /usr/bin/chromium (installed when missing, as ensure-rabbitmq.sh does
# for RabbitMQ) and the test's driver, playwright-core, from the lockfile
# in tests/browser (it drives that Chromium; it downloads no browser).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
    echo "installing chromium (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "installing nodejs and npm (Debian packages)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq nodejs npm >/dev/null
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
