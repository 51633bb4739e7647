#!/usr/bin/env bash
# A throw-away S3-protocol server for tests: moto's `moto_server` (PyPI's `moto[server]`, in
# the venv `make moto` makes under target/moto), on a free loopback port, with one bucket.
#   s3-server.sh start DIR   start it (state and log in DIR), create bucket graft-test,
#                            print its endpoint (again on a stopped one: the same port;
#                            moto keeps objects in memory, so a restart starts empty)
#   s3-server.sh stop DIR    stop it
#   s3-server.sh run CMD...  start one in a temporary folder, run CMD with the AWS_*
#                            variables graftd reads and GRAFT_TEST_BLOB_STORE=s3://graft-test,
#                            stop it and remove the folder
# GRAFT_MOTO_SERVER names the moto_server program when it is not target/moto/bin/moto_server.
set -euo pipefail

server_bin() {
    local b=${GRAFT_MOTO_SERVER:-target/moto/bin/moto_server}
    [ -x "$b" ] || { echo "moto_server not found at $b: run make moto, or set GRAFT_MOTO_SERVER" >&2; exit 1; }
    echo "$b"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir=$1 bin port
    bin=$(server_bin)
    mkdir -p "$dir"
    if [ -f "$dir/port" ]; then port=$(cat "$dir/port"); else port=$(free_port); echo "$port" >"$dir/port"; fi
    "$bin" -H 127.0.0.1 -p "$port" >>"$dir/server.log" 2>&1 &
    echo $! >"$dir/pid"
    local url="http://127.0.0.1:$port"
    for _ in $(seq 1 200); do
        if python3 - "$url" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(urllib.request.Request(sys.argv[1] + "/graft-test", method="PUT"), timeout=1)
PY
        kill -0 "$(cat "$dir/pid")" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "$url"
}

stop() {
    local dir=$1
    [ -f "$dir/pid" ] || return 0
    kill "$(cat "$dir/pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$(cat "$dir/pid")" 2>/dev/null || break; sleep 0.1; done
    rm -f "$dir/pid"
}

case "${1:-}" in
start) start "$2" ;;
stop) stop "$2" ;;
run)
    shift
    dir=$(mktemp -d "${TMPDIR:-/tmp}/graft-s3.XXXXXX")
    trap 'stop "$dir"; rm -rf "$dir"' EXIT
    url=$(start "$dir")
    echo "S3 server for the tests: $url (bucket graft-test)" >&2
    AWS_ENDPOINT=$url AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
        AWS_DEFAULT_REGION=us-east-1 GRAFT_TEST_BLOB_STORE=s3://graft-test "$@"
    ;;
*)
    echo "usage: $0 start DIR | stop DIR | run CMD..." >&2
    exit 2
    ;;
esac
