#!/usr/bin/env bash
# Starts a throw-away PostgreSQL cluster on 127.0.0.1 for the storage contract tests and prints
# its URL; `stop DIR` removes it. Prints nothing (exit 0) where no PostgreSQL server is installed,
# so callers can skip those tests. Usage: url=$(scripts/test-postgres.sh start DIR)
set -euo pipefail
action=${1:?start|stop}
dir=${2:?directory}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$bin" ] && [ -x "$bin/initdb" ] || exit 0
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$action" in
  start)
    port=${FEDCOORD_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    rm -rf "$dir" && mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
      chown postgres "$dir"
      chmod o+x "$(dirname "$dir")"  # mktemp -d makes 0700 parents the server cannot enter
    fi
    as_pg "$bin/initdb" -D "$dir/data" -U fedcoord -A trust >/dev/null
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U fedcoord fedcoord_test
    echo "postgresql+psycopg://fedcoord@127.0.0.1:$port/fedcoord_test"
    ;;
  stop)
    [ -d "$dir/data" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null || true
    rm -rf "$dir"
    ;;
esac
