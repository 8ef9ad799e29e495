// Thread: the future API of Process, on a thread; cooperative stop.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

/// SPEC §7's delay_double with a 0.4 s workload.
int delay_double(int x) {
    sleep_ms(400);
    if (x < 10) return 2 * x;
    if (x < 100) throw std::invalid_argument("bad value " + std::to_string(x));
    throw std::runtime_error("interrupted " + std::to_string(x));
}

/// Runs until asked to stop; returns how many rounds it did.
int until_stopped(mp::StopToken stop, int step_ms) {
    int rounds = 0;
    while (!stop.stop_requested()) {
        sleep_ms(step_ms);
        ++rounds;
    }
    return rounds;
}

}  // namespace

TEST_CASE("a value arrives; timeouts expire while the thread works") {
    mp::Thread t(delay_double, 3);
    static_assert(std::is_same_v<decltype(t), mp::Thread<int>>);
    t.start();
    sleep_ms(100);
    CHECK_FALSE(t.done());
    CHECK(t.is_alive());
    CHECK_THROWS_AS(t.result(100ms), mp::TimeoutError);
    CHECK_THROWS_AS(t.exception(100ms), mp::TimeoutError);
    t.join(10ms);
    CHECK(t.result() == 6);
    CHECK(t.exception() == nullptr);
    CHECK_NOTHROW(t.join());
    CHECK(t.done());
    CHECK_FALSE(t.is_alive());
}

TEST_CASE("exceptions are re-thrown by join and result, every time") {
    mp::Thread t12(delay_double, 12), t13(delay_double, 13), t200(delay_double, 200);
    t12.start();
    t13.start();
    t200.start();
    CHECK_THROWS_AS(t13.result(200ms), mp::TimeoutError);
    CHECK_THROWS_AS(t12.join(), std::invalid_argument);
    CHECK_THROWS_WITH_AS(t13.result(), "bad value 13", std::invalid_argument);
    auto e = t13.exception();
    REQUIRE(e);
    CHECK_THROWS_AS(std::rethrow_exception(e), std::invalid_argument);
    CHECK_THROWS_AS(t13.join(), std::invalid_argument);
    CHECK_THROWS_AS(t13.join(), std::invalid_argument);
    CHECK_THROWS_AS(t200.join(), std::runtime_error);
    CHECK_THROWS_AS(t200.result(), std::runtime_error);
}

TEST_CASE("cooperative stop: a StopToken first parameter, request_stop") {
    mp::Thread t(until_stopped, 5);
    static_assert(std::is_same_v<decltype(t), mp::Thread<int>>);
    t.start();
    sleep_ms(50);
    CHECK(t.is_alive());
    t.request_stop();
    CHECK(t.stop_requested());
    CHECK(t.result(5s) >= 1);
    CHECK_FALSE(t.is_alive());
}

TEST_CASE("destroying a running Thread requests a stop and joins") {
    auto t0 = Clock::now();
    std::shared_ptr<std::atomic<bool>> finished = std::make_shared<std::atomic<bool>>(false);
    {
        mp::Thread t([finished](mp::StopToken stop) {
            while (!stop.stop_requested()) sleep_ms(2);
            finished->store(true);
        });
        t.start();
        sleep_ms(20);
    }
    CHECK(finished->load());
    CHECK(Clock::now() - t0 < 5s);
}

TEST_CASE("targets: void, lambdas with captures, move-only arguments") {
    int seen = 0;
    mp::Thread v([&seen](int x) { seen = x; }, 7);
    v.start();
    CHECK_NOTHROW(v.result());
    CHECK(seen == 7);
    mp::Thread u([](std::unique_ptr<int> p) { return *p * 2; }, std::make_unique<int>(21));
    u.start();
    CHECK(u.result() == 42);
    mp::Thread s([](const std::string& a, std::string b) { return a + b; }, std::string("ab"), "cd");
    s.start();
    CHECK(s.result() == "abcd");
}

TEST_CASE("misuse is a clear error") {
    mp::Thread t(delay_double, 1);
    CHECK_THROWS_AS(t.join(), mp::InvalidStateError);
    CHECK_THROWS_AS(t.result(), mp::InvalidStateError);
    CHECK_THROWS_AS(t.exception(1ms), mp::InvalidStateError);
    CHECK_FALSE(t.done());
    CHECK_FALSE(t.is_alive());
    t.start();
    CHECK_THROWS_AS(t.start(), mp::InvalidStateError);
    CHECK(t.result() == 2);
}

TEST_CASE("names") {
    mp::Thread a(delay_double, 1), b(delay_double, 1);
    CHECK(a.name().rfind("Thread-", 0) == 0);
    CHECK(a.name() != b.name());
    b.set_name("loader");
    CHECK(b.name() == "loader");
}

TEST_CASE("a Thread may be moved before it starts") {
    mp::Thread a(delay_double, 2);
    mp::Thread b(std::move(a));
    b.start();
    CHECK(b.result() == 4);
}
