#!/usr/bin/env bash
# Regenerates BENCHMARKS.md: tapeline next to Redis Streams and NATS JetStream, same machine, same
# run. Installs redis-server and nats-server from Debian's packages when they are missing, builds
# tapeline and the load generator (benches/compare) in release mode, and runs every workload.
# Extra arguments go to the load generator (`--help` lists them), e.g. `--workloads publish`.
# A full run took 21 to 28 minutes on 2 cores (the runs of 2026-11-29, counting the release
# build). The largest data dir is Redis's after the 10 M-record replay load, about 3.2 GB under
# ${TMPDIR:-/tmp} (1.26 x 2.56 GB; tapeline's is 1.13 x); each is removed after its figure.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  # The packages start system-wide services; the benchmark starts its own servers.
  $sudo service redis-server stop >/dev/null 2>&1 || true
fi
nats=$(command -v nats-server || echo /usr/sbin/nats-server)

cargo build --release -p tapeline -p tapeline-bench
exec target/release/tapeline-bench --tapeline target/release/tapeline \
  --redis-benchmark "$(command -v redis-benchmark)" \
  --redis-server "$(command -v redis-server)" --nats-server "$nats" "$@"
