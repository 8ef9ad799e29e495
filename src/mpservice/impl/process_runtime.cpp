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

// ---------------------------------------------------------------- process-wide state

std::mutex& fingerprints_mutex() {
    static auto* m = new std::mutex;  // never destroyed, like the runtime
    return *m;
}

namespace {

void reset_after_fork_in_child();  // process_fork.cpp

// Before main(), before any thread exists: a fork while another thread fills
// the fingerprint cache must not copy its lock held.  (Only the lock: the
// runtime itself is made at first use, by a program that uses processes.)
[[maybe_unused]] const bool g_fingerprints_fork_safe = (os::at_fork_protect(&fingerprints_mutex(), 25), true);

}  // namespace

// Called by whatever makes one of the things the hook resets: a program that
// never does (a codec-only program, linked with --gc-sections) then carries
// none of that code.  Registered at any time, the hook still runs after the
// fork locks' own (registered before main).
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

void flush_stdio() noexcept {
    try {
        std::cout.flush();
        std::cerr.flush();
        std::clog.flush();
    } catch (...) {
    }
    std::fflush(nullptr);
}

std::string describe_process(const std::string& name, long pid) {
    return "process '" + name + "' (pid " + std::to_string(pid) + ")";
}

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
