// probe: starting this program by hand as a would-be child (the bad-input and
// security rows play a forger or a confused parent), and watching its exit.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace stress {

/// This executable's path.
std::string self_path();

/// fork + exec of `path` with `args` (argv[1..]); `fd` becomes descriptor
/// `as_fd` in the new program.  Only async-signal-safe calls after the fork.
pid_t exec_with_fd(const std::string& path, const std::vector<std::string>& args, int fd, int as_fd);

/// Waits for `pid` at most `limit`; returns its exit code, -signal, or
/// -1000 if it did not end in time (it is then SIGKILLed and reaped).
int wait_exit(pid_t pid, std::chrono::milliseconds limit);

/// Reads what arrives on `fd` until end of stream or `limit`; returns the bytes.
std::string read_until_eof(int fd, std::chrono::milliseconds limit);

/// The marker a parent gives a spawned child: "--mpservice-child=FD:PARENT_PID".
std::string child_marker(int fd, long parent_pid);

/// Exit codes of a would-be child that mean "main() ran" (the program's main
/// returns 66 when init() returned with a marker in argv).
constexpr int main_ran_code = 66;

}  // namespace stress
