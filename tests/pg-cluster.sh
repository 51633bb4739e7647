#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for tests, from Debian's `postgresql` package (no Docker):
#   pg-cluster.sh start DIR   initdb in DIR, start on a free loopback port, print its URL
#                             (again on a stopped cluster: the same data and port)
#   pg-cluster.sh stop DIR    stop it (DIR is the caller's to remove)
#   pg-cluster.sh run CMD...  start one in a temporary folder, run CMD with
#                             GRAFT_TEST_DATABASE_URL set to it, stop it and remove it
# As root (CI), the server runs as the `postgres` user (initdb refuses root). Durability
# settings are off (fsync, full-page writes): only an OS crash could lose a commit, and the
# tests never crash the OS (they do stop PostgreSQL at once: its own recovery replays the log).
# GRAFT_PG_BIN names the folder of initdb/pg_ctl when they are not in the usual places.
set -euo pipefail

bindir() {
    if [ -n "${GRAFT_PG_BIN:-}" ]; then echo "$GRAFT_PG_BIN"; return; fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ]; then echo "$d"; return; fi
    done
    if command -v initdb >/dev/null; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
    echo "PostgreSQL's server programs (initdb, pg_ctl) are not installed: apt-get install postgresql, or set GRAFT_PG_BIN" >&2
    exit 1
}

owner() { getent passwd postgres >/dev/null && echo postgres || echo nobody; }

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u "$(owner)" -- "$@"; else "$@"; fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir=$1 bin port
    bin=$(bindir)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown "$(owner)" "$dir"; fi
    if [ -d "$dir/data" ]; then
        port=$(cat "$dir/port")
    else
        as_owner "$bin/initdb" -D "$dir/data" -U graft --auth=trust -E UTF8 --locale=C --no-sync \
            >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
        port=$(free_port)
        echo "$port" >"$dir/port"
    fi
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=300" \
        start >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    echo "postgres://graft@127.0.0.1:$port/postgres"
}

stop() {
    local dir=$1
    [ -d "$dir/data" ] || return 0
    as_owner "$(bindir)/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
}

case "${1:-}" in
start) start "$2" ;;
stop) stop "$2" ;;
run)
    shift
    dir=$(mktemp -d "${TMPDIR:-/tmp}/graft-pg.XXXXXX")
    trap 'stop "$dir"; rm -rf "$dir"' EXIT
    url=$(start "$dir")
    echo "PostgreSQL for the tests: $url" >&2
    GRAFT_TEST_DATABASE_URL=$url "$@"
    ;;
*)
    echo "usage: $0 start DIR | stop DIR | run CMD..." >&2
    exit 2
    ;;
esac
