# Process and port helpers of the throw-away brokers (scripts/kafka.sh, scripts/apache-kafka.sh),
# sourced by both. Needs $py: a python3 to run the small socket checks with.

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_port PORT SECONDS PID: until something accepts on PORT, or PID died, or time ran out.
wait_port() {
  "$py" - "$1" "$2" "$3" <<'PY'
import os, socket, sys, time
port, limit, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + limit
while time.monotonic() < end:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"process {pid} exited before listening on {port}")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(f"nothing listens on 127.0.0.1:{port} after {limit:.0f} s")
PY
}

# running PID: the process exists and is not a zombie (a killed process whose parent has gone
# stays one until init reaps it, which may take a second or two; it holds no port or file).
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat:0:1}" != Z ]
}

alive() { [ -f "$1" ] && running "$(cat "$1")"; }

kill_pidfile() {
  if alive "$1"; then
    local pid
    pid=$(cat "$1")
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do running "$pid" || break; sleep 0.05; done
  fi
  rm -f "$1"
}
