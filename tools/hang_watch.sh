#!/usr/bin/env bash
# hang_watch.sh LOG [SECONDS]: while it runs, every test process (a command
# named test_*) that has been running for SECONDS (default 240, below ctest's
# 300 s TIMEOUT) gets its threads' stacks, and those of its children, written
# to LOG by gdb, once.  CI starts it beside the suites, so that a suite that
# hangs on a CI machine - which ctest then kills without a word - leaves in
# the log where it waited (tools/process_stacks.sh).  Does nothing where gdb is
# missing.
set -u
here=$(cd "$(dirname "$0")" && pwd)
log=$1
limit=${2:-240}
command -v gdb >/dev/null 2>&1 || exit 0
declare -A seen=()

while :; do
  # pid, seconds running, command name of every process
  while read -r pid secs comm; do
    case "$comm" in test_*) ;; *) continue ;; esac
    [ "$secs" -ge "$limit" ] || continue
    [ -z "${seen[$pid]:-}" ] || continue
    seen[$pid]=1
    {
      echo "--- hang_watch: $comm (pid $pid) has run for ${secs} s; its stacks and its children's:"
      "$here/process_stacks.sh" "$pid"
    } >>"$log" 2>&1
  done < <(ps -eo pid=,etimes=,comm= 2>/dev/null)
  sleep 10
done
