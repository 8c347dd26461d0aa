# shellcheck shell=bash
# Helpers shared by deploy/local/kafka and deploy/local/redis (sourced, not run).

# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() { echo "$PROG: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

# pid_alive PIDFILE PATTERN -> prints the pid and returns 0 when the process in
# PIDFILE is alive and its command line contains PATTERN (guards against a
# stale pid file whose number the kernel has since given to another process).
pid_alive() {
  local pidfile=$1 pattern=$2 pid
  [[ -s $pidfile ]] || return 1
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern" || return 1
  echo "$pid"
}

# port_busy PORT -> 0 when something on this machine listens on 127.0.0.1:PORT
port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# stop_pid PID SECONDS -> SIGTERM, wait, then SIGKILL
stop_pid() {
  local pid=$1 grace=$2 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "$PROG: pid $pid still running after ${grace}s, sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
}

log_tail() {
  local log=$1 n=${2:-60}
  echo "----- last $n lines of $log -----" >&2
  tail -n "$n" "$log" >&2 2>/dev/null || echo "(no log)" >&2
  echo "-----" >&2
}
