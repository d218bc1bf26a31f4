#!/usr/bin/env bash
# Installs what Fleet's dev run and tests need and the machine lacks: redis-server, nats-server
# and curl (Debian packages), and Python 3 with the Python executor example's packages
# (redis, msgpack; from PyPI, or Debian's python3-redis / python3-msgpack where pip cannot).
# Rust itself is expected (rustup).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]; }

sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
updated=false
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get is not available to install $*: install them with this system's package manager" >&2
    return 1
  fi
  if [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; then
    echo "need root (or sudo) to apt-get install $*" >&2
    return 1
  fi
  echo "installing: $*" >&2
  if ! $updated; then $sudo apt-get update -qq; updated=true; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

missing=()
have redis-server || missing+=(redis-server)
have nats-server || missing+=(nats-server)
have curl || missing+=(curl)
# The Python executor example (and its test) needs Python 3 with redis-py and msgpack.
have python3 || missing+=(python3 python3-redis python3-msgpack)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

command -v cargo >/dev/null 2>&1 || { echo "cargo is missing: install Rust from https://rustup.rs" >&2; exit 1; }

python_ok() { python3 -c "import redis, msgpack" >/dev/null 2>&1; }
if ! python_ok; then
  echo "installing the Python executor's packages (redis, msgpack)" >&2
  root=$(cd "$(dirname "$0")/.." && pwd)
  req="$root/examples/python-executor/requirements.txt"
  # pip where there is one (an externally managed Python needs --break-system-packages);
  # Debian's packages for Debian's Python otherwise.
  python3 -m pip install -q -r "$req" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages -r "$req" 2>/dev/null \
    || { [ "$(command -v python3)" = /usr/bin/python3 ] && apt_install python3-redis python3-msgpack; } \
    || true
  python_ok || echo "warning: python3 cannot import redis and msgpack; the Python executor's test will fail (pip install -r $req)" >&2
fi
