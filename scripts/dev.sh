#!/usr/bin/env bash
# Runs the whole fleet locally and shows a chat streaming back.
#
#   scripts/dev.sh              build, start every binary, run the demo, keep running (Ctrl-C stops)
#   scripts/dev.sh --demo-only  stop after the demo
#   scripts/dev.sh --help       this text
#
# Uses REDIS_URL and NATS_URL when set; otherwise starts a local redis-server and a nats-server
# with JetStream on free ports (data and logs in .fleet-dev/). Installs them with apt-get when
# missing. Every port is printed, and written to .fleet-dev/env for other shells to source.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$root/scripts/dev.sh"; }
demo_only=false
for arg in "$@"; do
  case "$arg" in
    --demo-only) demo_only=true ;;
    -h|--help) usage; exit 0 ;;
    *) echo "scripts/dev.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done

# The servers this script starts (those whose URL is not set): installed when missing.
server_bin() {
  command -v "$1" 2>/dev/null || { for d in /usr/sbin /usr/local/sbin; do
    [ -x "$d/$1" ] && echo "$d/$1" && return 0; done; return 1; }
}
needed=()
[ -z "${REDIS_URL:-}" ] && ! server_bin redis-server >/dev/null && needed+=(redis-server)
[ -z "${NATS_URL:-}" ] && ! server_bin nats-server >/dev/null && needed+=(nats-server)
command -v curl >/dev/null 2>&1 || needed+=(curl)
if [ ${#needed[@]} -gt 0 ] && ! scripts/ensure-deps.sh; then
  echo "scripts/dev.sh: could not install ${needed[*]} (above). Install what is missing, or set" \
    "REDIS_URL and NATS_URL to a running Redis and NATS server (with JetStream)." >&2
  exit 1
fi
command -v cargo >/dev/null 2>&1 || { echo "scripts/dev.sh: cargo is missing: install Rust from https://rustup.rs" >&2; exit 1; }
command -v curl >/dev/null 2>&1 || { echo "scripts/dev.sh: curl is missing (it checks that each process is ready)" >&2; exit 1; }
dev="$root/.fleet-dev"
mkdir -p "$dev/logs" "$dev/redis"
pids=()     # the fleet's processes
servers=()  # the redis-server and nats-server this script started
# The fleet stops first, while Redis is still there for it to finish and ack what it has in
# hand (with Redis gone, each process would wait out its shutdown grace); then the servers.
cleanup() {
  trap - EXIT INT TERM HUP
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for p in "${servers[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM HUP
# The servers run in a session of their own, out of reach of a Ctrl-C at the terminal (which
# signals its whole process group): cleanup stops them, after the fleet.
detach=()
command -v setsid >/dev/null 2>&1 && detach=(setsid)

# pick VAR PORT: the first port from PORT up that nothing listens on and this script has not
# handed out already (the processes bind them only later), into VAR.
taken=" "
pick() {
  local p=$2
  while [[ "$taken" == *" $p "* ]] || (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do
    p=$((p + 1))
  done
  taken+="$p "
  printf -v "$1" '%s' "$p"
}

# listening NAME PID PORT: waits until server NAME (process PID) listens on PORT, or says why not.
listening() {
  local name=$1 pid=$2 port=$3
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "$name did not start on port $port; the end of .fleet-dev/logs/$name.log:" >&2
  tail -n 20 "$dev/logs/$name.log" >&2
  exit 1
}

if [ -z "${REDIS_URL:-}" ]; then
  pick port 6390
  redis_bin=$(server_bin redis-server)
  : >"$dev/logs/redis.log"
  "${detach[@]}" "$redis_bin" --port "$port" --bind 127.0.0.1 --dir "$dev/redis" --appendonly yes \
    --save "" --daemonize no --logfile "$dev/logs/redis.log" &
  servers+=($!)
  listening redis "$!" "$port"
  export REDIS_URL="redis://127.0.0.1:$port"
  echo "started redis-server on $REDIS_URL (data in .fleet-dev/redis)"
fi
if [ -z "${NATS_URL:-}" ]; then
  pick nats_port 4232
  nats_bin=$(server_bin nats-server)
  mkdir -p "$dev/nats"
  : >"$dev/logs/nats-server.log"
  "${detach[@]}" "$nats_bin" -a 127.0.0.1 -p "$nats_port" -js -sd "$dev/nats" -l "$dev/logs/nats-server.log" &
  servers+=($!)
  listening nats-server "$!" "$nats_port"
  export NATS_URL="nats://127.0.0.1:$nats_port"
  echo "started nats-server with JetStream on $NATS_URL (data in .fleet-dev/nats)"
fi

echo "building (cargo build --workspace --bins)..."
cargo build --workspace --bins --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

pick edge 8001
pick gateway 8002
pick grpc 50055
pick admin_dispatcher 9101
pick admin_callback 9102
pick admin_gateway 9104
pick admin_bridge 9105
pick admin_exec 9106
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
start dispatcher --admin-addr "127.0.0.1:$admin_dispatcher"
start callback-worker --admin-addr "127.0.0.1:$admin_callback"
start exec-worker --mode echo --admin-addr "127.0.0.1:$admin_exec"
start ws-gateway --http-addr "127.0.0.1:$gateway" --admin-addr "127.0.0.1:$admin_gateway"
start nats-bridge --admin-addr "127.0.0.1:$admin_bridge"
start edge-api --http-addr "127.0.0.1:$edge" --grpc-addr "127.0.0.1:$grpc"

# Every process answers its readiness check, or the script says which one did not and why.
ready() {
  local name=$1 url=$2
  for _ in $(seq 1 100); do
    curl -fsS "$url" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$name did not become ready at $url; the end of .fleet-dev/logs/$name.log:" >&2
  tail -n 20 "$dev/logs/$name.log" >&2
  exit 1
}
ready edge-api "http://127.0.0.1:$edge/health/ready"
ready ws-gateway "http://127.0.0.1:$admin_gateway/health/ready"
ready dispatcher "http://127.0.0.1:$admin_dispatcher/health/ready"
ready callback-worker "http://127.0.0.1:$admin_callback/health/ready"
ready exec-worker "http://127.0.0.1:$admin_exec/health/ready"
ready nats-bridge "http://127.0.0.1:$admin_bridge/health/ready"

# For another shell: `. .fleet-dev/env` points fleetctl (and anything else) at this fleet.
cat >"$dev/env" <<ENV
export REDIS_URL=$REDIS_URL
export NATS_URL=$NATS_URL
export FLEET_API_URL=http://127.0.0.1:$edge
export PATH="$bin:\$PATH"
ENV

cat <<MSG

Fleet is running (logs in .fleet-dev/logs):
  REST      http://127.0.0.1:$edge/api/v1/chat/init        health http://127.0.0.1:$edge/health/detailed
  WS / SSE  ws://127.0.0.1:$gateway/ws/chat/{session_id}   http://127.0.0.1:$gateway/sse/chat/{session_id}
  gRPC      127.0.0.1:$grpc (orchestrator.v1.OrchestratorService)
  Redis     $REDIS_URL
  NATS      $NATS_URL (nats-bridge: planning events in, results out)
  Metrics   http://127.0.0.1:{$admin_dispatcher,$admin_callback,$admin_gateway,$admin_bridge,$admin_exec}/metrics

In another shell, '. .fleet-dev/env' puts fleetctl on PATH and points it at this fleet:
  fleetctl chat --agent demo "your message"     fleetctl dlq list

Demo: fleetctl chat --agent demo "Hello from Fleet: ..."
MSG
"$bin/fleetctl" chat --api "http://127.0.0.1:$edge" --agent demo \
  "Hello from Fleet: this answer streams back token by token through Redis Streams."

if $demo_only; then
  exit 0
fi
echo
echo "Ctrl-C stops the fleet."
wait
