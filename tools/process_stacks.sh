#!/usr/bin/env bash
# process_stacks.sh PID: what a process that should have finished is doing -
# its state, the kernel function it waits in, its system call, and (where gdb
# is installed) the innermost 30 frames of each of its threads; then the same
# for each of its children (an addr2line it runs, say).  Used by
# tools/hang_watch.sh (a suite that runs too long) and by the tests
# (forktest::describe_stuck_process: a child that does not answer).
set -u
describe() {
  echo "=== pid $1 ($(cat "/proc/$1/comm" 2>/dev/null)): $(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | cut -c1-200)"
  echo "    state: $(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)  wchan: $(cat "/proc/$1/wchan" 2>/dev/null)" \
       " syscall: $(cat "/proc/$1/syscall" 2>/dev/null)"
  if command -v gdb >/dev/null 2>&1; then
    timeout 60 gdb -nx -p "$1" -batch -ex 'thread apply all bt 30' 2>&1 |
      grep -E '^(#|Thread )|ptrace|No such process' | head -n 400
  else
    echo "    (no gdb: no stacks)"
  fi
}
describe "$1"
for child in $(pgrep -P "$1" 2>/dev/null); do describe "$child"; done
