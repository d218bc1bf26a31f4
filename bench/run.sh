#!/usr/bin/env bash
# Fleet's benchmark, on one machine, in one run (docs/performance.md explains the method).
#
#   bench/run.sh                      everything, 10 s measured + 2 s warm-up per run
#   bench/run.sh --duration 30        longer runs
#   bench/run.sh --scaling            also: sessions 1 / 64 / 1024 and worker replicas 1 vs 2
#                                     (at max and at --scale-rate, default 200/s)
#   bench/run.sh --only e2e           only some parts: limit,queue,bullmq,e2e,route,tracing,ws (comma separated)
#
# Other flags: --warmup S, --payload-bytes N, --ws-connections "10000 50000", --out DIR,
# --ws-connect-rate N (new idle WebSockets per second, default 0: as fast as they open),
# --skip-build, --scale-rate N, --worker-threads N (runtime threads of each fleet process,
# default 1: what a pod limited to one CPU gets, see docs/deploy.md). It:
#   1. installs what is missing (redis-server, redis-tools, curl, python3, nodejs and npm with apt-get, BullMQ
#      with npm ci, or npm install);
#   2. builds the release binaries (cargo build --release --workspace --bins);
#   3. starts its own redis-server on a free port, persistence off (no RDB, no AOF) for every run;
#   4. measures the limit (redis-benchmark XADD, unpipelined and -P 16), Fleet's queue hop
#      (fleet-bench queue), the peer (BullMQ, no-op worker; and the same work as the whole path,
#      bench.js --round-trip: progress and result heard back by the client), then starts the fleet (dispatcher,
#      callback-worker, exec-worker --mode echo --echo-delay-ms 0, edge-api --dev, ws-gateway
#      --dev) and measures the whole path (fleet-bench e2e: max, 1k/s, 5k/s; fanout), the same
#      through the dispatchers (FLEET_DIRECT_DISPATCH=false: max, 1k/s), the cost of tracing
#      (the whole path with no exporter, then exporting to fleet-bench otlp-sink at 0 %, 1 %
#      and 100 % sampling), then idle WebSocket capacity (fleet-bench ws-idle);
#   5. prints every run's table and JSON line, then the summary table, ratios and targets, and
#      the summary's JSON line. Everything is kept in the output directory (.bench/<time>/).
# Every process it starts is stopped by pid at the end; the machine's own Redis is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck source=bench/lib.sh
source bench/lib.sh

duration=10
warmup=2
payload=64
ws_connections="10000 50000"
ws_connect_rate=0
scaling=false
scale_rate=200
skip_build=false
worker_threads=1
only="limit,queue,bullmq,e2e,route,tracing,ws"
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --payload-bytes) payload=$2; shift 2 ;;
    --ws-connections) ws_connections=$2; shift 2 ;;
    --ws-connect-rate) ws_connect_rate=$2; shift 2 ;;
    --scaling) scaling=true; shift ;;
    --scale-rate) scale_rate=$2; shift 2 ;;
    --skip-build) skip_build=true; shift ;;
    --worker-threads) worker_threads=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,/^# Every process/p' "$0"; exit 0 ;;
    *) echo "unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
want() { [[ ",$only," == *",$1,"* ]]; }

out=${out:-$root/.bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/logs" "$out/redis"
# Absolute: Redis changes to its --dir before it opens its --logfile.
out=$(cd "$out" && pwd)
results="$out/results.jsonl"
: >"$results"

pids=()
redis_pid=""
cleanup() {
  trap - EXIT INT TERM
  stop_all
}
trap cleanup EXIT INT TERM

log() { printf '\n### %s\n' "$*"; }
# A failed measurement is noted and the run goes on (the summary shows what is missing).
try() { "$@" || echo "FAILED ($?): $*" | tee -a "$out/failures.txt"; }

# --- 1. dependencies ------------------------------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
missing=()
have redis-server || missing+=(redis-server)
have redis-benchmark || missing+=(redis-tools)
have curl || missing+=(curl)
have python3 || missing+=(python3)
if want bullmq; then
  have node || missing+=(nodejs)
  have npm || missing+=(npm)
fi
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
redis_server=$(command -v redis-server || echo /usr/sbin/redis-server)
if want bullmq; then
  command -v node >/dev/null || { echo "node is needed for the BullMQ peer (or pass --only without bullmq)" >&2; exit 1; }
  if [ ! -d bench/bullmq/node_modules/bullmq ] || [ bench/bullmq/package-lock.json -nt bench/bullmq/node_modules/.package-lock.json ]; then
    log "installing the BullMQ peer (npm ci)"
    # npm ci needs the lock to list every platform's optional packages, which a registry
    # mirror may not carry; npm install then resolves the same pinned versions without saving.
    (cd bench/bullmq &&
      { npm ci --no-audit --no-fund --ignore-scripts --loglevel=error 2>/dev/null ||
        npm install --no-save --no-audit --no-fund --ignore-scripts --loglevel=error; })
  fi
fi

# --- 2. build -------------------------------------------------------------------------------
target="${CARGO_TARGET_DIR:-$root/target}"
bin="$target/release"
if ! $skip_build; then
  log "building (cargo build --release --workspace --bins)"
  cargo build --release --workspace --bins
fi
bench="$bin/fleet-bench"

# Idle WebSocket capacity needs a file descriptor per connection in the gateway and the tool.
# Raising the hard limit needs CAP_SYS_RESOURCE; without it the soft limit goes up to the hard one.
ulimit -Hn "$(cat /proc/sys/fs/nr_open 2>/dev/null || echo 1048576)" 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)

# --- machine --------------------------------------------------------------------------------
{
  echo "date: $(date -Is)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel: $(uname -r)"
  echo "transparent huge pages: $(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo unknown)"
  echo "redis: $("$redis_server" --version | awk '{print $3}')"
  echo "node: $(node --version 2>/dev/null || echo none)"
  echo "open files limit: $nofile"
  echo "runtime threads per fleet process: $worker_threads (TOKIO_WORKER_THREADS)"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out/machine.txt"

# --- 3. Redis -------------------------------------------------------------------------------
redis_port=$(free_port 6400)
"$redis_server" --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$out/redis" --logfile "$out/logs/redis.log" --daemonize no &
redis_pid=$!
export REDIS_URL="redis://127.0.0.1:$redis_port"
wait_for_redis "$redis_port" "$out/logs/redis.log"
echo "redis-server on port $redis_port (persistence off: no RDB, no AOF)"

common=(--duration "$duration" --warmup "$warmup" --payload-bytes "$payload" --json-out "$results")

# --- 4a. the limit --------------------------------------------------------------------------
if want limit; then
  log "limit: redis-benchmark XADD"
  try "$bench" limit --payload-bytes "$payload" --json-out "$results"
fi

# --- 4b. Fleet's queue hop ------------------------------------------------------------------
if want queue; then
  log "fleet queue hop, max (closed loop)"
  try "$bench" queue "${common[@]}" --concurrency 256 --label fleet-queue-max --pids "redis-server=$redis_pid"
  log "fleet queue hop, 1000/s"
  try "$bench" queue "${common[@]}" --rate 1000 --label fleet-queue-1k --pids "redis-server=$redis_pid"
fi

# --- 4c. the peer ---------------------------------------------------------------------------
if want bullmq; then
  # The peer at its best: two worker concurrencies, the summary takes the faster.
  for wc in 50 256; do
    log "BullMQ, max (closed loop, worker concurrency $wc)"
    try node bench/bullmq/bench.js --redis-url "$REDIS_URL" --duration "$duration" --warmup "$warmup" \
      --payload-bytes "$payload" --concurrency 256 --worker-concurrency "$wc" \
      --label "bullmq-max-w$wc" --json-out "$results" --redis-pid "$redis_pid"
  done
  log "BullMQ, 1000/s"
  try node bench/bullmq/bench.js --redis-url "$REDIS_URL" --duration "$duration" --warmup "$warmup" \
    --payload-bytes "$payload" --rate 1000 --worker-concurrency 50 \
    --label bullmq-1k --json-out "$results" --redis-pid "$redis_pid"
  # The peer doing the whole path's work: the worker sends one progress update and the result,
  # and the client hears both on BullMQ's event stream (QueueEvents). Not a target; compared
  # like for like with fleet-e2e-max and fleet-e2e-1k in the summary's ratios.
  for wc in 50 256; do
    log "BullMQ round trip (progress and result heard back), max (worker concurrency $wc)"
    try node bench/bullmq/bench.js --redis-url "$REDIS_URL" --duration "$duration" --warmup "$warmup" \
      --payload-bytes "$payload" --concurrency 256 --worker-concurrency "$wc" --round-trip \
      --label "bullmq-rt-max-w$wc" --json-out "$results" --redis-pid "$redis_pid"
  done
  log "BullMQ round trip, 1000/s"
  try node bench/bullmq/bench.js --redis-url "$REDIS_URL" --duration "$duration" --warmup "$warmup" \
    --payload-bytes "$payload" --rate 1000 --worker-concurrency 50 --round-trip \
    --label bullmq-rt-1k --json-out "$results" --redis-pid "$redis_pid"
fi

# --- 4d. the fleet --------------------------------------------------------------------------
edge_port=""
gw_port=""
fleet_pids=()
start_fleet() {
  edge_port=$(free_port 18001)
  gw_port=$(free_port $((edge_port + 1)))
  export FLEET_AGENTS_FILE="$root/bench/agents.toml"
  export FLEET_PUBLIC_WS_URL="ws://127.0.0.1:$gw_port"
  export FLEET_DEV=true
  export FLEET_LOG_FORMAT=json
  export RUST_LOG="${FLEET_BENCH_RUST_LOG:-warn}"
  start() {
    local name=$1 admin=$2; shift 2
    TOKIO_WORKER_THREADS="$worker_threads" FLEET_ADMIN_ADDR="127.0.0.1:$admin" \
      "$bin/$name" "$@" >>"$out/logs/$name.log" 2>&1 &
    pids+=($!)
    fleet_pids+=("$name=$!")
  }
  fleet_pids=()
  start dispatcher "$(free_port 19101)"
  start callback-worker "$(free_port 19102)"
  start exec-worker "$(free_port 19106)" --mode echo --echo-delay-ms 0
  start ws-gateway "$(free_port 19104)" --http-addr "127.0.0.1:$gw_port"
  FLEET_GRPC_ADDR="127.0.0.1:$(free_port 50155)" start edge-api "$(free_port 19105)" \
    --http-addr "127.0.0.1:$edge_port"
  for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$edge_port/health/ready" >/dev/null 2>&1 &&
      curl -fsS "http://127.0.0.1:$gw_port/health" >/dev/null 2>&1; then
      break
    fi
    sleep 0.2
  done
  curl -fsS "http://127.0.0.1:$edge_port/health/ready" >/dev/null ||
    { echo "the fleet did not become ready; see $out/logs" >&2; exit 1; }
  echo "fleet up: REST :$edge_port, WS :$gw_port (${fleet_pids[*]})"
}
fleet_pid_list() { local IFS=,; echo "${fleet_pids[*]},redis-server=$redis_pid"; }
stop_fleet() {
  local kv p
  for kv in "${fleet_pids[@]}"; do
    p=${kv#*=}
    kill -TERM "$p" 2>/dev/null || true
  done
  for kv in "${fleet_pids[@]}"; do
    p=${kv#*=}
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    # Forget it, so that the final cleanup never signals a reused pid.
    local keep=() q
    for q in "${pids[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
    pids=("${keep[@]}")
  done
  fleet_pids=()
}
e2e() {
  try "$bench" "$@" --api "http://127.0.0.1:$edge_port" --ws "ws://127.0.0.1:$gw_port" \
    --pids "$(fleet_pid_list)"
}

if want e2e; then
  log "starting the fleet"
  start_fleet
fi
if want e2e; then
  log "fleet whole path, max (closed loop, 64 sessions x 4 in flight)"
  e2e e2e "${common[@]}" --sessions 64 --concurrency 256 --label fleet-e2e-max
  log "fleet whole path, 1000/s (64 sessions)"
  e2e e2e "${common[@]}" --sessions 64 --rate 1000 --label fleet-e2e-1k
  log "fleet whole path, 5000/s (64 sessions)"
  e2e e2e "${common[@]}" --sessions 64 --rate 5000 --label fleet-e2e-5k
  log "fleet whole path over REST, 1000/s (64 sessions)"
  e2e e2e "${common[@]}" --sessions 64 --rate 1000 --via rest --label fleet-e2e-rest-1k
  log "fan-out: 64 sessions x (1 + 3 listening) connections, 1000/s"
  e2e fanout "${common[@]}" --sessions 64 --watchers 3 --rate 1000 --label fleet-fanout-1k
fi

if $scaling && want e2e; then
  # The fixed rate of the scaling runs (--scale-rate, default 200/s) stays below what the whole
  # fleet sustains on a small machine, so their latencies and per-task costs compare.
  for s in 1 64 1024; do
    log "scaling: $s sessions, $scale_rate/s"
    e2e e2e "${common[@]}" --sessions "$s" --rate "$scale_rate" --label "scale-sessions-$s-rate"
    if [ "$s" != 64 ]; then
      log "scaling: $s sessions, max"
      e2e e2e "${common[@]}" --sessions "$s" --concurrency 256 --label "scale-sessions-$s-max"
    fi
  done
  log "scaling: 2 replicas of dispatcher, callback-worker and exec-worker, max"
  n_before=${#fleet_pids[@]}
  start dispatcher "$(free_port 19111)"
  start callback-worker "$(free_port 19112)"
  start exec-worker "$(free_port 19116)" --mode echo --echo-delay-ms 0
  sleep 1
  e2e e2e "${common[@]}" --sessions 64 --concurrency 256 --label scale-replicas-2-max
  e2e e2e "${common[@]}" --sessions 64 --rate "$scale_rate" --label scale-replicas-2-rate
  echo "(replicas started: $((${#fleet_pids[@]} - n_before)))"
fi

# --- 4d'. the route through the dispatchers ----------------------------------------------------
# Chat tasks go from the front doors straight to their pool; FLEET_DIRECT_DISPATCH=false sends
# them through fleet:tasks and the dispatchers instead (docs/ARCHITECTURE.md). The same whole
# path, max and 1000/s, on a fresh fleet with that route, beside the direct runs above.
if want route; then
  stop_fleet
  export FLEET_DIRECT_DISPATCH=false
  start_fleet
  log "through the dispatchers: whole path, max"
  e2e e2e "${common[@]}" --sessions 64 --concurrency 256 --label route-dispatchers-max
  log "through the dispatchers: whole path, 1000/s"
  e2e e2e "${common[@]}" --sessions 64 --rate 1000 --label route-dispatchers-1k
  stop_fleet
  unset FLEET_DIRECT_DISPATCH
  log "direct to the pool vs through the dispatchers (whole path)"
  python3 - "$results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    rows[r.get("label", "")] = r
def cpu(r):
    return sum(p["cpu_us_per_task"] for p in r.get("processes", [])) if r else float("nan")
def get(r, *path):
    for k in path:
        r = (r or {}).get(k)
    return float("nan") if r is None else r
print(f"{'route':>12} {'max tasks/s':>12} {'cpu us/task':>12} {'cmds/task':>10} {'1k cpu us/task':>15} {'1k p50 ms':>10} {'1k p99 ms':>10}")
for name, m, k in [("direct", "fleet-e2e-max", "fleet-e2e-1k"),
                   ("dispatchers", "route-dispatchers-max", "route-dispatchers-1k")]:
    m, k = rows.get(m), rows.get(k)
    print(f"{name:>12} {get(m, 'throughput_per_s'):>12.0f} {cpu(m):>12.0f} "
          f"{get(m, 'redis', 'commands_per_task'):>10.1f} {cpu(k):>15.0f} "
          f"{get(k, 'latency_ms', 'final', 'p50'):>10.2f} {get(k, 'latency_ms', 'final', 'p99'):>10.2f}")
PY
fi

# --- 4d''. what tracing costs ------------------------------------------------------------------
# The whole path with no exporter at all, then exporting over OTLP to a sink that only counts
# (fleet-bench otlp-sink) with 0 %, 1 % and 100 % of the traces sampled.
if want tracing; then
  sink_port=$(free_port 14317)
  "$bench" otlp-sink --addr "127.0.0.1:$sink_port" >"$out/logs/otlp-sink.log" 2>&1 &
  pids+=($!)
  for sampling in off 0 0.01 1; do
    stop_fleet
    if [ "$sampling" = off ]; then
      unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_TRACES_SAMPLER OTEL_TRACES_SAMPLER_ARG
    else
      export OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink_port"
      export OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=$sampling
    fi
    start_fleet
    log "tracing $sampling: whole path, max"
    e2e e2e "${common[@]}" --sessions 64 --concurrency 256 --label "tracing-$sampling-max"
    log "tracing $sampling: whole path, 1000/s"
    e2e e2e "${common[@]}" --sessions 64 --rate 1000 --label "tracing-$sampling-1k"
  done
  stop_fleet
  unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_TRACES_SAMPLER OTEL_TRACES_SAMPLER_ARG
  log "the cost of tracing (whole path)"
  python3 - "$results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("label", "").startswith("tracing-"):
        rows[r["label"]] = r
print(f"{'sampling':>9} {'max tasks/s':>12} {'p99 ms @max':>12} {'p50 ms @1k/s':>13} {'p99 ms @1k/s':>13}")
for s in ["off", "0", "0.01", "1"]:
    m, k = rows.get(f"tracing-{s}-max"), rows.get(f"tracing-{s}-1k")
    lat = lambda r, q: r["latency_ms"].get("final", {}).get(q, float("nan")) if r else float("nan")
    tput = m["throughput_per_s"] if m else float("nan")
    name = {"off": "off", "0": "0 %", "0.01": "1 %", "1": "100 %"}[s]
    print(f"{name:>9} {tput:>12.0f} {lat(m, 'p99'):>12.2f} {lat(k, 'p50'):>13.2f} {lat(k, 'p99'):>13.2f}")
PY
fi

# --- 4e. idle WebSocket capacity ------------------------------------------------------------
if want ws; then
  for k in $ws_connections; do
    # A fresh fleet for each capacity run, so the gateway's RSS starts from its idle size
    # (memory freed by earlier runs would hide the connections' cost).
    stop_fleet
    start_fleet
    label="ws-idle-$k"
    if [ "$nofile" != unlimited ] && [ $((k + 200)) -gt "$nofile" ]; then
      fit=$((nofile - 500))
      echo "note: the open-files limit is $nofile here (the hard limit cannot be raised);" \
        "$k connections do not fit in one process: measuring $fit instead (bench/vm.sh runs them in a virtual machine)" | tee -a "$out/machine.txt"
      k=$fit
      label="ws-idle-max"
    fi
    # --per-ip spreads the connections over 127.0.0.1, .2, ... so that the ports an earlier
    # run left in TIME_WAIT do not run out (one source address has ~28k ephemeral ports).
    log "idle WebSockets: $k connections on one gateway"
    gw_pid=""
    for kv in "${fleet_pids[@]}"; do [ "${kv%%=*}" = ws-gateway ] && gw_pid=${kv#*=}; done
    try "$bench" ws-idle --api "http://127.0.0.1:$edge_port" --ws "ws://127.0.0.1:$gw_port" \
      --gateway-pid "$gw_pid" --connections "$k" --sessions 100 --hold 5 --per-ip 5000 --connect-rate "$ws_connect_rate" \
      --label "$label" --json-out "$results"
  done
fi

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/machine.txt"

# --- 5. summary -----------------------------------------------------------------------------
log "summary ($out)"
cat "$out/machine.txt"
echo
"$bench" summarize "$results" --json-out "$out/summary.jsonl" | tee "$out/summary.txt"
