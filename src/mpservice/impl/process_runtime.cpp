// process_runtime: process-wide state of the process machinery (who we are,
// the fork server link, build fingerprints) and small shared helpers.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <iostream>
#include <map>
#include <thread>
#include <unordered_map>
#include <unordered_set>

namespace mpservice {
namespace detail {
namespace {
using namespace wire;

// ---------------------------------------------------------------- process-wide state

/// The fork server as seen from its parent.
struct ForkServerLink {
    os::handle_t control = os::invalid_handle;
    long pid = 0;
};

std::mutex& fingerprints_mutex() {
    static auto* m = new std::mutex;  // never destroyed, like the runtime
    return *m;
}

struct Runtime {
    bool initialized = false;
    bool is_child = false;
    std::string argv0 = "/proc/self/exe";
    std::string identity;  // "" in the main process, "2" or "2:1" in children
    std::atomic<int> next_child{1};
    std::optional<ProcessInfo> parent;
    // Made afresh in every forked child: the thread that starts a fork server
    // forks while holding it.
    std::mutex* forkserver_mutex = new std::mutex;
    ForkServerLink forkserver;
    std::mutex* fingerprint_mutex = &fingerprints_mutex();  // a fork lock (os::at_fork_protect)
    std::map<std::string, std::string> fingerprints;
    std::atomic<bool> corrupt_next_fingerprint{false};
    // How long start() waits for the fork server to make a worker: a stopped
    // or wedged server must not block start() for ever.
    std::atomic<long long> forkserver_timeout_ms{30000};
};

void reset_after_fork_in_child();  // process_fork.cpp

/// Registers, once, the at-fork hook that makes a forked child forget its
/// parent's reactor, fork server and child link.  Called by whatever makes
/// one of them: a program that never does (a codec-only program, linked with
/// --gc-sections) then carries none of that code.  Registered at any time, the
/// hook still runs after the fork locks' own (registered before main).
void register_after_fork_reset() {
    static const bool registered = (os::at_fork_child(&reset_after_fork_in_child), true);
    (void)registered;
}

Runtime& rt() {
    static Runtime* r = [] {
        register_after_fork_reset();
        return new Runtime;  // never destroyed: the reactor thread outlives static destruction
    }();
    return *r;
}

// Before main(), before any thread exists: a fork while another thread fills
// the fingerprint cache must not copy its lock held.  (Only the lock: the
// runtime itself is made at first use, by a program that uses processes.)
[[maybe_unused]] const bool g_fingerprints_fork_safe = (os::at_fork_protect(&fingerprints_mutex(), 25), true);

void flush_stdio() noexcept {
    try {
        std::cout.flush();
        std::cerr.flush();
        std::clog.flush();
    } catch (...) {
    }
    std::fflush(nullptr);
}

std::atomic<std::int64_t*> g_phase_slots{nullptr};

/// Records `phase` when a bench asked for it (test_trace_start_phases).
inline void trace_phase(StartPhase phase) noexcept {
    if (std::int64_t* slots = g_phase_slots.load(std::memory_order_relaxed))
        slots[static_cast<int>(phase)] =
            std::chrono::duration_cast<std::chrono::nanoseconds>(os::Clock::now().time_since_epoch()).count();
}

std::string describe(const std::string& name, long pid) {
    return "process '" + name + "' (pid " + std::to_string(pid) + ")";
}

}  // namespace

std::string fingerprint_of(const std::string& module) {
    Runtime& r = rt();
    std::lock_guard<std::mutex> lk(*r.fingerprint_mutex);
    auto it = r.fingerprints.find(module);
    if (it != r.fingerprints.end()) return it->second;
    return r.fingerprints[module] = os::module_fingerprint(module);
}

void test_trace_start_phases(std::int64_t* slots) noexcept { g_phase_slots.store(slots, std::memory_order_relaxed); }

}  // namespace detail
}  // namespace mpservice
