#!/usr/bin/env bash
# Generates the Python stubs from the proto and runs test_client.py against the broker binary
# given (default: target/debug/tapeline). Python packages go to a virtualenv under target/.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=${1:-target/debug/tapeline}
venv=target/python
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check grpcio==1.85.4 grpcio-tools==1.85.4
fi
stubs=target/python-stubs
rm -rf "$stubs" && mkdir -p "$stubs"
"$venv/bin/python" -m grpc_tools.protoc -I proto --python_out="$stubs" --grpc_python_out="$stubs" \
  proto/tapeline/v1/tapeline.proto
PYTHONPATH="$stubs:examples/python" "$venv/bin/python" examples/python/test_client.py "$binary"
