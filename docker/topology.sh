#!/usr/bin/env bash
# The topology of docker/compose.yaml as plain processes of the release binary, for machines
# without a Docker engine: an origin, two relays of it, a relay chained behind the first, a
# publisher into the origin and a tail at the end of the chain.
#
#   docker/topology.sh [--check] [TAPELINE_BINARY]
#
# Without --check it runs until Ctrl-C (the tail prints to the terminal; the origin's status page
# is on http://127.0.0.1:7412/). With --check (CI) it publishes 500 records, waits until every
# relay holds all of them and the chained relay's tail has printed them in order, then stops
# everything; it fails (non-zero) otherwise, within 60 s.
set -euo pipefail
check=false
if [ "${1:-}" = "--check" ]; then check=true; shift; fi
bin=${1:-target/release/tapeline}
[ -x "$bin" ] || { echo "topology: no broker binary at $bin (cargo build --release)" >&2; exit 1; }
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
dir=$(mktemp -d -t tapeline-topology.XXXXXX)
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap stop EXIT

# Free ports for the four brokers (one more for the origin's admin listener) when checking, so
# that CI never collides with anything; the compose file's ports otherwise.
if $check; then
  read -r origin relay_a relay_b relay_c admin < <(python3 -c '
import socket
ports = []
sockets = [socket.socket() for _ in range(5)]
for s in sockets:
    s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1])
print(*ports)')
else
  origin=7411 relay_a=7421 relay_b=7431 relay_c=7441 admin=7412
fi

serve() { # NAME PORT ARGS...
  local name=$1 port=$2; shift 2
  "$bin" serve --listen "127.0.0.1:$port" --data "$dir/$name" --heartbeat 500ms "$@" \
    > "$dir/$name.out" 2> "$dir/$name.log" &
  pids+=($!)
  for _ in $(seq 1 100); do
    grep -q "tapeline listening on" "$dir/$name.out" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "topology: $name did not start; its log:" >&2
  cat "$dir/$name.log" >&2
  return 1
}

serve origin "$origin" --admin-listen "127.0.0.1:$admin"
serve relay-a "$relay_a" --upstream "http://127.0.0.1:$origin" --mirror 'plant/**'
serve relay-b "$relay_b" --upstream "http://127.0.0.1:$origin" --mirror 'plant/**'
serve relay-c "$relay_c" --upstream "http://127.0.0.1:$relay_a" --mirror 'plant/**'

if ! $check; then
  echo "origin 127.0.0.1:$origin (status page http://127.0.0.1:$admin/), relays :$relay_a :$relay_b, chained :$relay_c"
  (for i in $(seq 1 100000); do echo "$i"; sleep 0.1; done | "$bin" publish plant/press-1 -s "127.0.0.1:$origin") &
  pids+=($!)
  "$bin" tail 'plant/**' -s "127.0.0.1:$relay_c" --output raw
  exit 0
fi

"$bin" tail 'plant/**' -s "127.0.0.1:$relay_c" --output raw > "$dir/tail.out" 2> "$dir/tail.err" &
pids+=($!)
seq 1 500 | "$bin" publish plant/press-1 -s "127.0.0.1:$origin" 2> "$dir/publish.err"
records() { # PORT: records of plant/press-1 it holds
  "$bin" streams -s "127.0.0.1:$1" -o json | python3 -c '
import json, sys
print(sum(s["records"] for s in json.load(sys.stdin) if s["stream"] == "plant/press-1"))'
}
deadline=$((SECONDS + 60))
while [ $SECONDS -lt $deadline ]; do
  held="$(records "$relay_a") $(records "$relay_b") $(records "$relay_c") $(wc -l < "$dir/tail.out")"
  [ "$held" = "500 500 500 500" ] && break
  sleep 0.1
done
if [ "$held" != "500 500 500 500" ]; then
  echo "topology: relays a, b, c and the tail hold $held of 500 records" >&2
  exit 1
fi
if ! seq 1 500 | cmp -s - "$dir/tail.out"; then
  echo "topology: the chained relay's tail is not the published sequence" >&2
  exit 1
fi
status=$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$admin/readyz').read().decode().strip())")
[ "$status" = "ready" ] || { echo "topology: the origin is not ready: $status" >&2; exit 1; }
echo "topology: origin -> relay-a -> relay-c and origin -> relay-b each hold the 500 records; the tail at relay-c printed them in order"
