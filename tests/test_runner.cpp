// ProcessRunner: one persistent process holding a T, called many times.
#include <doctest/doctest.h>

#if !defined(_WIN32)
#include <signal.h>
#include <unistd.h>
#endif

#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "fork_helpers.hpp"  // forktest::self_pid, kill_process, killed (POSIX and Windows)
#include "mpservice.hpp"

namespace mp = mpservice;

// Under ThreadSanitizer: libstdc++ is not instrumented, so the atomic reference
// count of an exception_ptr is invisible to it, and freeing the last reference
// on the pool's result thread looks like a race with the thread that read the
// exception through another reference.  A robust mutex taken over from a
// worker that died holding it (killed inside a put) was locked in another
// process, which it cannot see either.
extern "C" const char* __tsan_default_suppressions() {
    return "race:std::__exception_ptr::exception_ptr::_M_release\n"
           "mutex:mpservice::detail::os::robust_mutex_unlock_status\n";
}
using namespace std::chrono_literals;

namespace {

/// Keeps a running total across calls; its constructor runs once, in the child.
struct Accumulator {
    long total;
    explicit Accumulator(long start) : total(start) {}
    long operator()(long x) {
        if (x < 0) throw std::invalid_argument("negative: " + std::to_string(x));
        total += x;
        return total;
    }
    long operator()(std::string cmd) {
        if (cmd == "pid") return forktest::self_pid();
#if !defined(_WIN32)
        if (cmd == "segv") ::raise(SIGSEGV);
#else
        if (cmd == "segv") {  // a real access violation: Windows reports it as SIGSEGV
            volatile long* volatile nowhere = nullptr;  // (both volatile: the store must happen)
            *nowhere = 1;
        }
#endif
        if (cmd == "exit") std::exit(4);
        return -1;
    }
};

/// Built from library handles: writes every call's result to a queue.
struct Scaler {
    mp::Queue<int> out;
    int factor;
    Scaler(mp::Queue<int> q, int f) : out(std::move(q)), factor(f) {}
    int operator()(int x) {
        out.put(x * factor);
        return x * factor;
    }
};

/// Blocks until the event is set, so that a test can kill it mid-call.
struct Blocker {
    mp::Event go;
    explicit Blocker(mp::Event e) : go(std::move(e)) {}
    long operator()(int) {
        go.wait();
        return forktest::self_pid();
    }
};

}  // namespace

#define CONTEXTS mp::SpawnContext, mp::ForkServerContext

TEST_CASE_TEMPLATE("state persists across 1,000 calls in one process", Ctx, CONTEXTS) {
    mp::ProcessRunner<Accumulator> r(Ctx{}, 100L);
    long pid = r(std::string("pid"));
    CHECK(pid != forktest::self_pid());
    CHECK(pid == r.pid());
    for (long i = 1; i <= 1000; ++i) REQUIRE(r(1L) == 100 + i);
    CHECK(r(std::string("pid")) == pid);  // the same process all along
    // submit: futures, served in order
    std::vector<mp::AsyncResult<long>> fs;
    for (int i = 0; i < 10; ++i) fs.push_back(r.submit(2L));
    for (int i = 0; i < 10; ++i) CHECK(fs[static_cast<std::size_t>(i)].get(30s) == 1100 + 2 * (i + 1));
    r.join();
    CHECK_THROWS_AS(r(1L), mp::InvalidStateError);
}

TEST_CASE("constructor arguments may be library handles") {
    mp::Queue<int> q;
    mp::ProcessRunner<Scaler> r(q, 3);
    CHECK(r(14) == 42);
    CHECK(r(2) == 6);
    CHECK(q.get(30s) == 42);
    CHECK(q.get(30s) == 6);
}

TEST_CASE("an exception comes back typed and the runner keeps serving") {
    mp::ProcessRunner<Accumulator> r(0L);
    CHECK(r(5L) == 5);
    try {
        r(-3L);
        FAIL("should throw");
    } catch (const std::invalid_argument& e) {
        CHECK(std::string(e.what()) == "negative: -3");
        CHECK(mp::is_remote(e));
    }
    auto f = r.submit(-1L);
    CHECK_THROWS_AS(f.get(), std::invalid_argument);
    CHECK(r(5L) == 10);  // the state survived the exceptions
}

TEST_CASE_TEMPLATE("a crash fails the pending call with ProcessError, later calls at once", Ctx, CONTEXTS) {
    SUBCASE("killed from outside during a call; queued calls fail too") {
        mp::Event go;
        mp::ProcessRunner<Blocker> r(Ctx{}, go);
        long pid = r.pid();
        REQUIRE(pid > 0);
        auto pending = r.submit(1);
        auto queued = r.submit(2);
        // The first call has started once the worker is busy; kill it now or
        // while it waits for the event - either way that call is the one running.
        forktest::kill_process(pid);
        try {
            pending.get(60s);
            FAIL("should fail");
        } catch (const mp::ProcessError& e) {
            CHECK(std::string(e.what()).find("SIGKILL") != std::string::npos);
            CHECK(e.exitcode() == forktest::killed);
        }
        CHECK_THROWS_AS(queued.get(60s), mp::ProcessError);
        CHECK_THROWS_AS(r(3), mp::ProcessError);
        CHECK_THROWS_AS(r.submit(3), mp::ProcessError);
        r.join();  // quietly
    }
    SUBCASE("exit(n) inside a call") {
        mp::ProcessRunner<Accumulator> r(Ctx{}, 0L);
        CHECK(r(1L) == 1);
        try {
            r(std::string("exit"));
            FAIL("should fail");
        } catch (const mp::ProcessError& e) {
            CHECK(e.exitcode() == 4);
        }
        CHECK_THROWS_AS(r(1L), mp::ProcessError);
    }
}

TEST_CASE("terminate stops a busy runner promptly; its calls fail") {
    mp::Event never;
    auto t0 = std::chrono::steady_clock::now();
    mp::ProcessRunner<Blocker> r(never);
    auto f = r.submit(1);
    r.terminate();
    CHECK(std::chrono::steady_clock::now() - t0 < 10s);
    CHECK_THROWS_AS(f.get(30s), mp::InvalidStateError);
}
