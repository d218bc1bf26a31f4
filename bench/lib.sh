# Helpers shared by bench/run.sh and bench/profile.sh (sourced, not run).

# Installs Debian packages "$@" with apt-get (through sudo when not root), saying which.
apt_install() {
  echo "installing $*"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# The first TCP port from $1 up that nothing listens on.
free_port() {
  local p=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
  echo "$p"
}

# Waits up to 5 s for the redis-server on port $1 to answer; exits with a pointer to its log ($2)
# if it does not.
wait_for_redis() {
  for _ in $(seq 1 50); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "redis-server did not start on port $1; see $2" >&2
  exit 1
}

# Stops the processes of the array `pids` (TERM, up to 10 s, then KILL), then `redis_pid` last
# (the fleet drains through Redis).
stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  if [ -n "${redis_pid:-}" ]; then
    kill -TERM "$redis_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$redis_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$redis_pid" 2>/dev/null || true
  fi
  wait 2>/dev/null || true
}
