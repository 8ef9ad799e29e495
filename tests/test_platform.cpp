// Platform contracts that every back-end keeps (detail/os.hpp), exercised
// through the public API with real child processes: a spawned child gets its
// channel and its shared-memory arguments, a lock whose holder dies is handed
// on with OwnerDiedError, a killed child reports -SIGKILL, and the start
// methods a platform lacks are a clear error.
#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <system_error>

#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;

namespace {
int add_in_child(mp::Value<int> v, int n) {
    v.store(v.load() + n);
    return n;
}

[[noreturn]] void die_holding(mp::Lock lock) {
    lock.acquire();
    std::_Exit(7);  // no release, no unwinding
}

[[noreturn]] void wait_forever(mp::Event never) {
    never.wait();
    std::_Exit(0);
}
}  // namespace

TEST_CASE("a spawned child gets its channel and a shared value") {
    mp::Value<int> v(40);
    mp::Process p(add_in_child, v, 2);
    p.start();
    CHECK(p.result() == 2);
    CHECK(v.load() == 42);
    CHECK(*p.exitcode() == 0);
}

TEST_CASE("a lock whose holder died is handed on with OwnerDiedError") {
    mp::Lock lock;
    mp::Process p(die_holding, lock);
    p.start();
    CHECK_THROWS(p.join());  // it exited with 7
    CHECK(*p.exitcode() == 7);
    CHECK_THROWS_AS(lock.acquire(), mp::OwnerDiedError);
    lock.release();  // the lock is usable again
    CHECK(lock.acquire(1s));
    lock.release();
}

TEST_CASE("a killed child reports -SIGKILL, a terminated one -SIGTERM") {
    mp::Event never;
    mp::Process a(wait_forever, never), b(wait_forever, never);
    a.start();
    b.start();
    a.kill();
    b.terminate();
    CHECK_THROWS_AS(a.join(), mp::ProcessError);  // killed: an error, as Python's sentinel of a killed worker
    b.join();
    CHECK(*a.exitcode() == -9);
    CHECK(*b.exitcode() == -15);
}

#if defined(_WIN32)
TEST_CASE("the fork and forkserver start methods are a clear error on Windows") {
    mp::Value<int> v(0);
    mp::Process f(mp::ForkContext{}, add_in_child, v, 1);
    CHECK_THROWS_WITH_AS(f.start(), doctest::Contains("does not exist on Windows"), std::system_error);
}
#endif
