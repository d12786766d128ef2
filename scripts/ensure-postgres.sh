#!/usr/bin/env bash
# Make sure PostgreSQL accepts connections on 127.0.0.1:5432 for the test
# suite: if nothing listens there, install the Debian package when missing
# and start the local cluster. Does nothing when a server is already
# running.
#
# A cluster this script creates is a throwaway test server: it trusts
# connections from this machine (user postgres, no password) and has a
# database `test`. An existing cluster's authentication is left as it is.
set -euo pipefail

listening() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
newest() { ls "$1" 2>/dev/null | sort -V | tail -n 1; }
as_postgres() { runuser -u postgres -- "$@"; }
have_server() {
    command -v pg_ctlcluster >/dev/null 2>&1 \
        && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

if listening; then
    exit 0
fi

fresh=false
if ! have_server; then
    echo "installing postgresql (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
    fresh=true
fi
version=$(newest /etc/postgresql)
if [ -z "$version" ] || [ ! -d "/etc/postgresql/$version/main" ]; then
    version=${version:-$(newest /usr/lib/postgresql)}
    echo "creating cluster $version/main" >&2
    pg_createcluster "$version" main >/dev/null
    fresh=true
fi
if $fresh; then
    # Loopback only (listen_addresses stays 'localhost'), for tests.
    cat >"/etc/postgresql/$version/main/pg_hba.conf" <<'EOF'
# Written by scripts/ensure-postgres.sh: a test server, trusted from this machine only.
local all all trust
host  all all 127.0.0.1/32 trust
host  all all ::1/128 trust
EOF
    # The package may have started the cluster already: make it re-read that.
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload >/dev/null 2>&1 || true
fi

if ! listening; then
    echo "starting postgresql $version/main" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi
for _ in $(seq 1 60); do
    if pg_isready -q -h 127.0.0.1 -p 5432; then
        if [ -z "$(as_postgres psql -Atc "SELECT 1 FROM pg_database WHERE datname = 'test'")" ]; then
            as_postgres createdb test
        fi
        if ! psql -w -h 127.0.0.1 -U postgres -d test -Atc 'SELECT 1' >/dev/null 2>&1; then
            echo "postgresql is up, but postgres@127.0.0.1/test needs a password:" \
                 "set EVENT_HOST_TEST_POSTGRES_URL" >&2
        fi
        echo "postgresql is up" >&2
        exit 0
    fi
    sleep 1
done
echo "postgresql did not accept connections within 60 s" \
     "(see /var/log/postgresql/postgresql-$version-main.log)" >&2
exit 1
