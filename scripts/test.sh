#!/usr/bin/env bash
# Runs every test of the workspace, exactly as CI does: real redis-server and nats-server
# processes are started by the tests themselves on free ports (never the standard ones).
#   scripts/test.sh               all tests
#   scripts/test.sh -p fleet      one package (arguments go to nextest / cargo test)
#   scripts/test.sh --help        this text
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' scripts/test.sh
  exit 0
fi
if ! scripts/ensure-deps.sh; then
  echo "scripts/test.sh: could not install what the tests need (above): redis-server and" \
    "nats-server (on PATH or in /usr/sbin), Python 3 with redis and msgpack." >&2
  exit 1
fi

# Cross-binary tests run the binaries as processes: build them first. `--all-targets` builds
# them with the same features as the tests below, so nextest reuses every artifact.
cargo build --workspace --all-targets --quiet

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  echo "cargo-nextest not found; using cargo test" >&2
  cargo test --workspace --no-fail-fast "$@"
fi
if [ $# -eq 0 ]; then
  cargo test --workspace --doc --quiet
fi
