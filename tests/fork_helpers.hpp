// fork_helpers: real child processes for the synchronization tests, made with
// plain fork() (so they share the parent's mappings and inherit its
// descriptors), plus the leak counters.  Children report through their exit
// code: 0 = as expected, anything else names what went wrong.
//
// Windows has no fork(): there this header compiles to stubs that throw, so
// that a suite builds for Windows unchanged, and every test case that makes
// fork()ed children is marked `* forktest::fork_only` (doctest test suite
// "fork"), which tools/windows_ci.sh excludes and counts through
// tests/windows/skip.txt.  On POSIX the mark changes nothing.
#pragma once

#include <doctest/doctest.h>

#if !defined(_WIN32)
#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#else
#include <sys/types.h>
#endif

#include "mpservice.hpp"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace forktest {

/// The mark of a test case whose children are made by fork() (POSIX only).
inline const doctest::test_suite fork_only("fork");
/// Whether a case that forks children of a threaded parent must be skipped
/// here (it says so in the log): under an AddressSanitizer runtime whose
/// allocator takes no lock around fork() and whose locks the library cannot
/// take for it (mp::detail::os::allocator_fork_safe: g++'s shared libasan), a
/// child can inherit an allocator lock held by another parent thread and wait
/// for it forever in operator new (seen in CI; gdb:
/// __sanitizer::SizeClassAllocator64 in the child).  `forks`: whether this
/// case's children are forked at all (spawn and fork server are unaffected).
inline bool skip_fork_of_threaded_parent(bool forks = true) {
    if (!forks || mpservice::detail::os::allocator_fork_safe()) return false;
    MESSAGE("skipped: this AddressSanitizer runtime's allocator is not fork-safe, and its locks are out of the library's reach");
    return true;
}
/// The mark of a test case about a POSIX-only mechanism (SIGSTOP/SIGCONT,
/// memfd's st_blocks...): it compiles on Windows, where it is excluded.
inline const doctest::test_suite posix_only("posix");

#if !defined(_WIN32)
/// Runs body() in a forked child; the child exits with body's return value
/// (99 if it threw).  The child dies with the test if the test dies.
inline pid_t spawn(const std::function<int()>& body) {
    std::fflush(nullptr);
    pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        int rc = 98;
        try {
            rc = body();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "child %d threw: %s\n", int(::getpid()), e.what());
            rc = 99;
        } catch (...) {
            rc = 99;
        }
        std::fflush(nullptr);
        ::_exit(rc);
    }
    return pid;
}

/// Waits for the child (hang guard: `limit`); returns its exit code, or -signal,
/// or -1000 if it did not end in time (it is then killed).
inline int join(pid_t pid, std::chrono::milliseconds limit = std::chrono::seconds(60)) {
    int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (pidfd >= 0) {
        pollfd p{pidfd, POLLIN, 0};
        int r = ::poll(&p, 1, static_cast<int>(limit.count()));
        ::close(pidfd);
        if (r == 0) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, nullptr, 0);
            return -1000;
        }
    }
    int status = 0;
    if (::waitpid(pid, &status, 0) != pid) return -2000;
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return -WTERMSIG(status);
    return -3000;
}

/// SIGKILLs and reaps.
inline int kill_and_join(pid_t pid) {
    ::kill(pid, SIGKILL);
    return join(pid);
}

/// SIGKILLs, without reaping.
inline void kill_hard(pid_t pid) { ::kill(pid, SIGKILL); }

/// The exit code join() reports for a child ended by kill_hard().
inline constexpr int killed = -SIGKILL;

/// Blocks this (child) process until it is killed.
[[noreturn]] inline void pause_forever() {
    for (;;) ::pause();
}
#else   // Windows: no fork().  Only the fork_only test cases call these.
[[noreturn]] inline void no_fork() { throw std::logic_error("forktest: fork() does not exist on Windows"); }
inline pid_t spawn(const std::function<int()>&) { no_fork(); }
inline int join(pid_t, std::chrono::milliseconds = std::chrono::seconds(60)) { no_fork(); }
inline int kill_and_join(pid_t) { no_fork(); }
inline void kill_hard(pid_t) { no_fork(); }
inline constexpr int killed = -9;
[[noreturn]] inline void pause_forever() { no_fork(); }
#endif

/// This process's id, its parent's, and "kill that process hard" (SIGKILL;
/// on Windows TerminateProcess, read back as -9) for any process, not only
/// fork()ed ones (a Pool's workers, a server process).
inline long self_pid() {
#if !defined(_WIN32)
    return static_cast<long>(::getpid());
#else
    return mpservice::detail::os::current_pid();
#endif
}
inline long parent_pid() {
#if !defined(_WIN32)
    return static_cast<long>(::getppid());
#else
    return mpservice::detail::os::parent_pid();
#endif
}
inline bool kill_process(long pid) {
#if !defined(_WIN32)
    return ::kill(static_cast<pid_t>(pid), SIGKILL) == 0;
#else
    namespace os = mpservice::detail::os;
    return os::send_signal(pid, os::invalid_handle, os::signal_kill());
#endif
}

/// SIGSTOP / SIGCONT a process (POSIX only: on Windows, where posix_only test
/// cases use them, they throw).
inline bool stop_process(long pid) {
#if !defined(_WIN32)
    return ::kill(static_cast<pid_t>(pid), SIGSTOP) == 0;
#else
    (void)pid;
    throw std::logic_error("forktest: no SIGSTOP on Windows");
#endif
}
inline bool continue_process(long pid) {
#if !defined(_WIN32)
    return ::kill(static_cast<pid_t>(pid), SIGCONT) == 0;
#else
    (void)pid;
    throw std::logic_error("forktest: no SIGCONT on Windows");
#endif
}

/// Ends this process at once, as SIGKILL would (POSIX: raise(SIGKILL); Windows:
/// TerminateProcess of itself, which a parent reads as -9).
inline void die_hard() {
#if !defined(_WIN32)
    ::raise(SIGKILL);
#else
    namespace os = mpservice::detail::os;
    os::send_signal(os::current_pid(), os::invalid_handle, os::signal_kill());
#endif
}

/// Spins (yielding the CPU) until pred() or the hang guard expires.  For
/// waiting on state another process changes - not a sleep.
template <class Pred>
bool await(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(30)) {
    auto until = std::chrono::steady_clock::now() + limit;
    while (!pred()) {
        if (std::chrono::steady_clock::now() > until) return false;
        std::this_thread::yield();
    }
    return true;
}

/// The reactor thread releases a resolved child's core (its pidfd or process
/// handle) just after resolving it, so just after a join() returns the count
/// may still include it: every count below first waits for the reactor.
inline void settle_reactor() { mpservice::detail::test_reactor_barrier(); }

#if !defined(_WIN32)
constexpr long handle_slack = 0;  // descriptors are exact (see the Windows one below)
/// The open descriptors of this process.
inline std::set<std::string> open_fds() {
    settle_reactor();
    std::set<std::string> out;
    if (DIR* d = ::opendir("/proc/self/fd")) {
        while (dirent* e = ::readdir(d))
            if (e->d_name[0] != '.') out.insert(e->d_name);
        ::closedir(d);
    }
    return out;
}
inline std::size_t fd_count() { return open_fds().size(); }

/// The names in /dev/shm.
inline std::set<std::string> dev_shm_entries() {
    std::set<std::string> out;
    if (DIR* d = ::opendir("/dev/shm")) {
        while (dirent* e = ::readdir(d))
            if (e->d_name[0] != '.') out.insert(e->d_name);
        ::closedir(d);
    }
    return out;
}

/// Number of this process's mappings of the library's shared memory (memfd
/// blocks show up in /proc/self/maps as "/memfd:mpservice (deleted)").
inline std::size_t mapping_count() {
    settle_reactor();
    std::FILE* f = std::fopen("/proc/self/maps", "r");
    if (!f) return 0;
    std::size_t n = 0;
    char line[4096];
    while (std::fgets(line, sizeof line, f))
        if (std::strstr(line, "memfd:mpservice")) ++n;
    std::fclose(f);
    return n;
}

/// What a process that should have finished is doing, for a failing test's
/// log (tools/process_stacks.sh: its state, its children, and its threads'
/// stacks where gdb is installed).  A test that finds a child stuck prints
/// this before it kills the child, so a rare hang on a CI machine names its cause.
inline std::string describe_stuck_process(long pid) {
    std::string out = "process " + std::to_string(pid) + "\n";
#if defined(MPSERVICE_TEST_TOOLS_DIR)
    std::string command = std::string(MPSERVICE_TEST_TOOLS_DIR) + "/process_stacks.sh " + std::to_string(pid) + " 2>&1";
    if (std::FILE* p = ::popen(command.c_str(), "r")) {
        char line[1024];
        while (std::fgets(line, sizeof line, p)) out += line;
        ::pclose(p);
    }
#endif
    return out;
}
#else
// Windows: no descriptor names and no /dev/shm (only fork_only cases read
// those); the counts are the process's handles and the library's mapped views.
inline std::string describe_stuck_process(long pid) { return "process " + std::to_string(pid); }
inline std::set<std::string> open_fds() { return {}; }
inline std::size_t fd_count() {
    settle_reactor();
    return static_cast<std::size_t>(mpservice::detail::os::open_handle_count());
}
inline std::set<std::string> dev_shm_entries() { return {}; }
// Handles the system keeps or drops on its own (under Wine its thread pool's:
// one up or down between two counts was seen); a leak per cycle shows far more.
constexpr long handle_slack = 3;
inline std::size_t mapping_count() {
    settle_reactor();
    return static_cast<std::size_t>(mpservice::detail::os::mapping_count());
}
#endif

/// Encodes `v` in this process and decodes it in a forked child, which
/// inherited the descriptors - as a child receiving it over a channel would -
/// and returns what `body(decoded copy)` returned there.
template <class T, class Body>
int in_child_decoded(const T& v, Body body) {
    mpservice::Encoder e;
    e.write(v);
    std::string bytes = e.bytes();
    std::vector<mpservice::detail::os::handle_t> handles = e.handles();
    pid_t child = spawn([&] {
        mpservice::Decoder d(bytes, &handles);
        T copy = d.read<T>();
        d.expect_end();
        return body(copy);
    });
    return join(child);
}

}  // namespace forktest
