#!/usr/bin/env bash
# Profiles one fleet binary on the whole path, in instructions (valgrind's callgrind counts
# instructions, so the numbers do not depend on what else the machine is doing).
#
#   bench/profile.sh dispatcher                 callgrind of the dispatcher, 100 tasks/s for 10 s
#   bench/profile.sh ws-gateway --rate 50 --duration 20
#   bench/profile.sh edge-api --via rest        (edge-api only works per task when tasks come over REST)
#   bench/profile.sh redis-server               callgrind of Redis itself (its scripts included)
#   bench/profile.sh perf                       no valgrind: perf record (cpu-clock) of every binary
#                                               and Redis during an e2e run at max
#   bench/profile.sh syscalls --rate 1000       no valgrind: system calls per task of every binary
#                                               and Redis, by kind (perf's syscall tracepoints)
#
# The other binaries run natively. Instrumentation is switched on when the load starts and the
# profile is dumped when it ends, so start-up is not counted; instructions per task = the dump's
# total / tasks started. Prints the top functions (inclusive and exclusive) and writes everything
# to .bench/profile-<time>/ (open the callgrind.out file with kcachegrind or callgrind_annotate).
# Needs release binaries (bench/run.sh builds them, or: cargo build --release --workspace --bins).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck source=bench/lib.sh
source bench/lib.sh

what=${1:-}
[ -n "$what" ] || { sed -n '2,19p' "$0"; exit 2; }
shift
rate=100
duration=10
via=ws
sessions=16
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) rate=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --via) via=$2; shift 2 ;;
    --sessions) sessions=$2; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
case "$what" in
  dispatcher|callback-worker|exec-worker|ws-gateway|edge-api|redis-server|perf|syscalls) ;;
  *) echo "profile one of: dispatcher callback-worker exec-worker ws-gateway edge-api redis-server perf syscalls" >&2; exit 2 ;;
esac

bin="${CARGO_TARGET_DIR:-$root/target}/release"
[ -x "$bin/fleet-bench" ] || { echo "no release binaries in $bin (cargo build --release --workspace --bins)" >&2; exit 1; }
if [ "$what" = perf ] || [ "$what" = syscalls ]; then
  command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 1; }
else
  command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
fi
out="$root/.bench/profile-$(date +%Y%m%d-%H%M%S)-$what"
mkdir -p "$out/logs" "$out/redis"

pids=()
redis_pid=""
cleanup() {
  trap - EXIT INT TERM
  stop_all
}
trap cleanup EXIT INT TERM

redis_port=$(free_port 6450)
redis_cmd=()
[ "$what" = redis-server ] && redis_cmd=(valgrind --tool=callgrind --instr-atstart=no
  --callgrind-out-file="$out/callgrind.out.$what")
"${redis_cmd[@]}" "$(command -v redis-server || echo /usr/sbin/redis-server)" --port "$redis_port" \
  --bind 127.0.0.1 --save "" --appendonly no --dir "$out/redis" --logfile "$out/logs/redis.log" \
  --daemonize no >>"$out/logs/redis.log" 2>&1 &
redis_pid=$!
export REDIS_URL="redis://127.0.0.1:$redis_port"
wait_for_redis "$redis_port" "$out/logs/redis.log"

edge_port=$(free_port 18101)
gw_port=$(free_port $((edge_port + 1)))
export FLEET_AGENTS_FILE="$root/bench/agents.toml"
export FLEET_PUBLIC_WS_URL="ws://127.0.0.1:$gw_port"
export FLEET_DEV=true
export FLEET_LOG_FORMAT=json
export RUST_LOG=warn
# Under valgrind a binary is ~50x slower: give it room before anything is reclaimed.
export FLEET_CLAIM_IDLE_MS=600000

fleet_pids=()
start() {
  local name=$1 admin=$2; shift 2
  # One runtime thread per fleet process, as bench/run.sh runs them.
  if [ "$name" = "$what" ]; then
    TOKIO_WORKER_THREADS=1 FLEET_ADMIN_ADDR="127.0.0.1:$admin" valgrind --tool=callgrind --instr-atstart=no \
      --callgrind-out-file="$out/callgrind.out.$name" "$bin/$name" "$@" >>"$out/logs/$name.log" 2>&1 &
  else
    TOKIO_WORKER_THREADS=1 FLEET_ADMIN_ADDR="127.0.0.1:$admin" "$bin/$name" "$@" >>"$out/logs/$name.log" 2>&1 &
  fi
  pids+=($!)
  fleet_pids+=("$name=$!")
}
start dispatcher "$(free_port 19201)"
start callback-worker "$(free_port 19202)"
start exec-worker "$(free_port 19206)" --mode echo --echo-delay-ms 0
start ws-gateway "$(free_port 19204)" --http-addr "127.0.0.1:$gw_port"
FLEET_GRPC_ADDR="127.0.0.1:$(free_port 50255)" start edge-api "$(free_port 19205)" --http-addr "127.0.0.1:$edge_port"
for _ in $(seq 1 300); do
  if curl -fsS "http://127.0.0.1:$edge_port/health/ready" >/dev/null 2>&1 &&
    curl -fsS "http://127.0.0.1:$gw_port/health" >/dev/null 2>&1; then
    break
  fi
  sleep 0.2
done
sleep 2

if [ "$what" = perf ]; then
  plist=$(for kv in "${fleet_pids[@]}"; do echo "${kv#*=}"; done | paste -sd,)
  "$bin/fleet-bench" e2e --api "http://127.0.0.1:$edge_port" --ws "ws://127.0.0.1:$gw_port" \
    --sessions 64 --concurrency 256 --duration "$duration" --warmup 2 --via "$via" \
    --json-out "$out/e2e.jsonl" >"$out/e2e.txt" 2>&1 &
  load=$!
  sleep 3
  perf record -e cpu-clock -F 499 --call-graph dwarf,8192 -p "$plist,$redis_pid" \
    -o "$out/perf.data" -- sleep "$((duration - 2))" 2>&1 | tail -1
  wait "$load" || true
  grep -E "throughput|final " "$out/e2e.txt" || true
  # perf merges the samples of a function that several processes run (libc's memmove, the
  # kernel's scheduler) into one entry when it sorts by symbol alone, and --pid then keeps that
  # entry whole in one process's list: so sort by thread and symbol, and add up the threads of
  # each process here. Percentages are of the process's own samples.
  total=$(perf report -i "$out/perf.data" --no-children --sort pid -g none --stdio -n \
    2>/dev/null | awk '!/^#/ && NF { n += $2 } END { print n + 0 }') || total=0
  for kv in "${fleet_pids[@]}" "redis-server=$redis_pid"; do
    name=${kv%%=*}
    perf report -i "$out/perf.data" --no-children --pid "${kv#*=}" --sort pid,sym -g none \
      --stdio -n 2>/dev/null | grep -v '^#' | grep -v '^$' |
      awk '{ n = $2; $1 = ""; $2 = ""; $3 = ""; sub(/^ +/, ""); count[$0] += n; all += n }
        END { for (f in count) printf "%7.2f%% %7d  %s\n", 100 * count[f] / all, count[f], f }' |
      sort -k2,2nr >"$out/top-$name.all" || true
    samples=$(awk '{ n += $2 } END { print n + 0 }' "$out/top-$name.all")
    share=$(awk -v s="$samples" -v t="$total" 'BEGIN { printf "%.1f", t ? 100 * s / t : 0 }')
    echo "== $name: top functions (self), $samples samples, $share % of all"
    sed -n '1,25p' "$out/top-$name.all" | tee "$out/top-$name.txt"
    rm -f "$out/top-$name.all"
  done
  echo "profile in $out (perf report -i $out/perf.data)"
  exit 0
fi

if [ "$what" = syscalls ]; then
  kinds="getrandom writev write sendto recvfrom read epoll_wait futex madvise"
  events=$(for k in $kinds; do printf 'syscalls:sys_enter_%s,' "$k"; done)
  "$bin/fleet-bench" e2e --api "http://127.0.0.1:$edge_port" --ws "ws://127.0.0.1:$gw_port" \
    --sessions 64 --rate "$rate" --duration "$duration" --warmup 1 --via "$via" --no-procs \
    --json-out "$out/e2e.jsonl" >"$out/e2e.txt" 2>&1 &
  load=$!
  sleep 2
  # Counted over a window inside the run's, at the fixed rate: tasks = rate x window.
  window=$((duration - 3))
  counters=()
  for kv in "${fleet_pids[@]}" "redis-server=$redis_pid"; do
    perf stat -x, -e "${events%,}" -p "${kv#*=}" -o "$out/syscalls-${kv%%=*}.txt" -- sleep "$window" &
    counters+=($!)
  done
  wait "$load" "${counters[@]}" || true
  grep -E "throughput|final " "$out/e2e.txt" || true
  printf '%-16s' "per task"; for k in $kinds all; do printf '%11s' "$k"; done; echo
  for kv in "${fleet_pids[@]}" "redis-server=$redis_pid"; do
    awk -F, -v name="${kv%%=*}" -v tasks="$((rate * window))" -v kinds="$kinds" '
      $3 ~ /sys_enter_/ { k = $3; sub(/.*sys_enter_/, "", k); n[k] = $1 + 0; all += $1 }
      END {
        printf "%-16s", name
        split(kinds, ks, " ")
        for (i = 1; i in ks; i++) printf "%11.2f", n[ks[i]] / tasks
        printf "%11.2f\n", all / tasks
      }' "$out/syscalls-${kv%%=*}.txt"
  done | tee "$out/summary.txt"
  echo "counts in $out"
  exit 0
fi

target_pid=""
[ "$what" = redis-server ] && target_pid=$redis_pid
for kv in "${fleet_pids[@]}"; do [ "${kv%%=*}" = "$what" ] && target_pid=${kv#*=}; done
# callgrind_control finds the valgrind process by pid.
callgrind_control -i on "$target_pid" >/dev/null
"$bin/fleet-bench" e2e --api "http://127.0.0.1:$edge_port" --ws "ws://127.0.0.1:$gw_port" \
  --sessions "$sessions" --rate "$rate" --duration "$duration" --warmup 0 --drain 30 --via "$via" \
  --no-procs --json-out "$out/e2e.jsonl" | tee "$out/e2e.txt" | grep -E "throughput|final "
callgrind_control -d "$target_pid" >/dev/null
callgrind_control -i off "$target_pid" >/dev/null
sleep 1
tasks=$(grep -o '"tasks_started":[0-9]*' "$out/e2e.jsonl" | tail -1 | cut -d: -f2)
# The first `callgrind_control -d` dump is <file>.1 (the one at exit holds only the shutdown).
dump="$out/callgrind.out.$what.1"
total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ && !t {gsub(",", "", $1); t = $1} END {print t + 0}')
echo
awk -v w="$what" -v t="$total" -v n="${tasks:-0}" 'BEGIN {
  printf "%s: %d instructions for %d tasks = %d instructions per task\n", w, t, n, (n > 0 ? t / n : 0) }' |
  tee "$out/summary.txt"
callgrind_annotate --inclusive=yes "$dump" >"$out/inclusive.txt" 2>/dev/null || true
callgrind_annotate "$dump" >"$out/exclusive.txt" 2>/dev/null || true
echo "== top inclusive"; grep -E '^ *[0-9,]+ \(' "$out/inclusive.txt" | sed -n '1,40p' | cut -c1-220 || true
echo "== top exclusive"; grep -E '^ *[0-9,]+ \(' "$out/exclusive.txt" | sed -n '1,30p' | cut -c1-220 || true
echo "profile in $out"
