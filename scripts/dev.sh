#!/usr/bin/env bash
# Runs the whole fleet locally and shows a chat streaming back.
#
#   scripts/dev.sh              build, start every binary, run the demo, keep running (Ctrl-C stops)
#   scripts/dev.sh --demo-only  stop after the demo
#
# Uses REDIS_URL when set; otherwise starts a local redis-server on a free port (data and logs in
# .fleet-dev/). Installs redis-server with apt-get when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
demo_only=false
[ "${1:-}" = "--demo-only" ] && demo_only=true

scripts/ensure-deps.sh
dev="$root/.fleet-dev"
mkdir -p "$dev/logs" "$dev/redis"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

free_port() {
  local p=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
  echo "$p"
}

if [ -z "${REDIS_URL:-}" ]; then
  port=$(free_port 6390)
  redis_bin=$(command -v redis-server || echo /usr/sbin/redis-server)
  "$redis_bin" --port "$port" --bind 127.0.0.1 --dir "$dev/redis" --appendonly yes \
    --save "" --daemonize no --logfile "$dev/logs/redis.log" &
  pids+=($!)
  export REDIS_URL="redis://127.0.0.1:$port"
  echo "started redis-server on $REDIS_URL (data in .fleet-dev/redis)"
fi

echo "building (cargo build --workspace --bins)..."
cargo build --workspace --bins --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

edge=$(free_port 8001)
gateway=$(free_port 8002)
export FLEET_AGENTS_FILE="$root/deploy/agents.example.toml"
export FLEET_PUBLIC_WS_URL="ws://127.0.0.1:$gateway"
export FLEET_DEV=true
export RUST_LOG="${RUST_LOG:-info}"

# One runtime thread per process: five binaries share this machine's cores (docs/deploy.md).
start() {
  local name=$1; shift
  TOKIO_WORKER_THREADS="${TOKIO_WORKER_THREADS:-1}" "$bin/$name" "$@" >"$dev/logs/$name.log" 2>&1 &
  pids+=($!)
}
start dispatcher --admin-addr "127.0.0.1:$(free_port 9101)"
start callback-worker --admin-addr "127.0.0.1:$(free_port 9102)"
start exec-worker --mode echo --admin-addr "127.0.0.1:$(free_port 9106)"
start ws-gateway --http-addr "127.0.0.1:$gateway" --admin-addr "127.0.0.1:$(free_port 9104)"
start edge-api --http-addr "127.0.0.1:$edge"

for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$edge/health/ready" >/dev/null 2>&1 \
     && curl -fsS "http://127.0.0.1:$gateway/health" >/dev/null 2>&1; then
    break
  fi
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$edge/health/ready" >/dev/null || { echo "edge-api did not become ready; see .fleet-dev/logs" >&2; exit 1; }

cat <<MSG

Fleet is running (logs in .fleet-dev/logs):
  REST      http://127.0.0.1:$edge/api/v1/chat/init        health http://127.0.0.1:$edge/health/detailed
  WS / SSE  ws://127.0.0.1:$gateway/ws/chat/{session_id}   http://127.0.0.1:$gateway/sse/chat/{session_id}
  Redis     $REDIS_URL

Demo: fleetctl chat --agent demo "..."
MSG
"$bin/fleetctl" chat --api "http://127.0.0.1:$edge" --agent demo \
  "Hello from Fleet: this answer streams back token by token through Redis Streams."

if $demo_only; then
  exit 0
fi
echo
echo "Try it yourself: $bin/fleetctl chat --api http://127.0.0.1:$edge --agent demo \"your message\""
echo "Ctrl-C stops the fleet."
wait
