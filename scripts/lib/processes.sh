# shellcheck shell=bash
# Process helpers for the project's bash scripts. Source it, e.g. from scripts/guest/selftest:
#   . "$here/../lib/processes.sh"
# Safe under `set -euo pipefail`: every function returns 0.

# stop_process PID [SIGNAL]: sends SIGNAL (default TERM) if PID still runs, then SIGKILL if it has not
# ended 5 s later; then reaps it (when it is a child of this shell; otherwise the wait is a no-op).
stop_process() {
  local pid=$1 signal=${2:-TERM} i
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$signal" "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  wait "$pid" 2>/dev/null || true
  return 0
}
