#!/usr/bin/env bash
# Runs every test of the workspace, exactly as CI does: real redis-server and nats-server
# processes are started by the tests themselves on free ports (never the standard ones).
#   scripts/test.sh               all tests
#   scripts/test.sh -p fleet      one package (arguments go to nextest / cargo test)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh

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
