#!/usr/bin/env bash
# Installs what Fleet's dev run and tests need and the machine lacks: redis-server and
# nats-server (Debian packages), and the Python executor example's packages (PyPI).
# Rust itself is expected (rustup).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]; }

missing=()
have redis-server || missing+=(redis-server)
have nats-server || missing+=(nats-server)

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || { echo "cargo is missing: install Rust from https://rustup.rs" >&2; exit 1; }

# The Python executor example (and its test) needs redis-py and msgpack.
root=$(cd "$(dirname "$0")/.." && pwd)
if command -v python3 >/dev/null 2>&1 && ! python3 -c "import redis, msgpack" >/dev/null 2>&1; then
  echo "installing the Python executor's packages (redis, msgpack)" >&2
  req="$root/examples/python-executor/requirements.txt"
  python3 -m pip install -q -r "$req" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages -r "$req"
fi
