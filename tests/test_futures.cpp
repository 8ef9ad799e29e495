// wait() and as_completed() over mixes of started Process and Thread objects.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

/// SPEC §7's sleeper in units of 0.2 s: for s > 10 sleeps s x 0.02 s and throws
/// invalid_argument; otherwise sleeps s x 0.2 s and returns s.
int sleeper(int s) {
    if (s > 10) {
        sleep_ms(s * 20);
        throw std::invalid_argument("sleeper " + std::to_string(s));
    }
    sleep_ms(s * 200);
    return s;
}

bool contains(const mp::WorkerList& l, const mp::Worker* w) { return std::find(l.begin(), l.end(), w) != l.end(); }

}  // namespace

#define CONTEXTS mp::SpawnContext, mp::ForkServerContext, mp::ForkContext

TEST_CASE_TEMPLATE("wait with a timeout, processes and a thread mixed", Ctx, CONTEXTS) {
    mp::Process p2(Ctx{}, sleeper, 2), p3(Ctx{}, sleeper, 3);
    mp::Thread t4(sleeper, 4);
    p2.start();
    p3.start();
    t4.start();
    auto [done, not_done] = mp::wait({&p2, &p3, &t4}, 500ms);
    CHECK(done.size() <= 1);
    if (done.size() == 1) CHECK(done[0] == &p2);
    CHECK(done.size() + not_done.size() == 3);
    CHECK(contains(not_done, &p3));
    CHECK(contains(not_done, &t4));
    auto [all, none] = mp::wait({&p2, &p3, &t4});
    CHECK(all.size() == 3);
    CHECK(none.empty());
    CHECK(p2.result() == 2);
    CHECK(t4.result() == 4);
}

TEST_CASE_TEMPLATE("wait FIRST_EXCEPTION over processes", Ctx, CONTEXTS) {
    // p13 fails at 0.26 s; the others would run for 1.8 s and 2 s (a wide margin
    // for slow sanitizer builds), and are terminated once the check is done.
    mp::Process p3(Ctx{}, sleeper, 10), p2(Ctx{}, sleeper, 9), p13(Ctx{}, sleeper, 13);
    p3.start();
    p2.start();
    p13.start();
    auto [done, not_done] = mp::wait({&p3, &p2, &p13}, mp::FIRST_EXCEPTION);
    CHECK(done.size() == 1);
    CHECK(contains(done, &p13));
    CHECK(not_done.size() == 2);
    CHECK_THROWS_AS(p13.result(), std::invalid_argument);
    p3.terminate();
    p2.terminate();
}

TEST_CASE_TEMPLATE("wait FIRST_EXCEPTION, processes and a failing thread", Ctx, CONTEXTS) {
    mp::Process p3(Ctx{}, sleeper, 3), p2(Ctx{}, sleeper, 2);
    mp::Thread t25(sleeper, 25);
    p3.start();
    p2.start();
    t25.start();
    auto [done, not_done] = mp::wait({&p3, &p2, &t25}, mp::FIRST_EXCEPTION);
    CHECK(done.size() >= 1);
    CHECK(done.size() <= 2);
    CHECK(contains(done, &t25));
    CHECK(contains(not_done, &p3));
}

TEST_CASE_TEMPLATE("wait FIRST_COMPLETED, and FIRST_EXCEPTION when nothing fails", Ctx, CONTEXTS) {
    mp::Process p1(Ctx{}, sleeper, 1), p3(Ctx{}, sleeper, 3);
    mp::Thread t2(sleeper, 2);
    p1.start();
    p3.start();
    t2.start();
    auto [first, rest] = mp::wait({&p1, &p3, &t2}, mp::FIRST_COMPLETED);
    REQUIRE(first.size() == 1);
    CHECK(first[0] == &p1);
    CHECK(rest.size() == 2);
    auto [done, not_done] = mp::wait({&p1, &p3, &t2}, mp::FIRST_EXCEPTION);  // none fails: all
    CHECK(done.size() == 3);
    CHECK(not_done.empty());
}

TEST_CASE_TEMPLATE("as_completed yields in completion order", Ctx, CONTEXTS) {
    mp::Process p3(Ctx{}, sleeper, 3), p2(Ctx{}, sleeper, 2), p4(Ctx{}, sleeper, 4);
    p3.start();
    p2.start();
    p4.start();
    std::vector<mp::Worker*> order;
    for (mp::Worker* w : mp::as_completed({&p3, &p2, &p4})) order.push_back(w);
    CHECK(order == std::vector<mp::Worker*>{&p2, &p3, &p4});
}

TEST_CASE("as_completed over a process and threads mixed") {
    mp::Process p2(sleeper, 2);
    mp::Thread t1(sleeper, 1), t3(sleeper, 3);
    p2.start();
    t1.start();
    t3.start();
    std::vector<std::string> names;
    for (mp::Worker* w : mp::as_completed({&p2, &t1, &t3}, 10s)) names.push_back(w->name());
    CHECK(names == std::vector<std::string>{t1.name(), p2.name(), t3.name()});
}

TEST_CASE("as_completed throws TimeoutError when the timeout expires") {
    mp::Process p1(sleeper, 1), p4(sleeper, 4);
    p1.start();
    p4.start();
    std::vector<mp::Worker*> got;
    auto t0 = Clock::now();
    CHECK_THROWS_AS(
        {
            for (mp::Worker* w : mp::as_completed({&p1, &p4}, 500ms)) got.push_back(w);
        },
        mp::TimeoutError);
    CHECK(Clock::now() - t0 < 750ms);
    CHECK(got == std::vector<mp::Worker*>{&p1});
}

TEST_CASE("a terminated process counts as finished normally; a killed one completes") {
    mp::Process term(sleeper, 9), killed(sleeper, 9), slow(sleeper, 5);
    term.start();
    killed.start();
    slow.start();
    term.terminate();
    auto [done, not_done] = mp::wait({&term, &slow}, mp::FIRST_EXCEPTION);
    CHECK(done.size() == 2);  // SIGTERM is not an exception: waited for all
    killed.kill();
    auto [d2, nd2] = mp::wait({&killed}, 10s);  // never hangs on a signal death
    CHECK(d2.size() == 1);
    CHECK_THROWS_AS(killed.join(), mp::ProcessError);
}

TEST_CASE("unstarted workers are a clear error") {
    mp::Process p(sleeper, 1);
    mp::Thread t(sleeper, 1);
    CHECK_THROWS_AS(mp::wait({&p}), mp::InvalidStateError);
    CHECK_THROWS_AS(mp::wait({&t}, 1s), mp::InvalidStateError);
    CHECK_THROWS_AS(mp::as_completed({&p, &t}), mp::InvalidStateError);
    t.start();
    CHECK_THROWS_AS(mp::wait({&t, &p}), mp::InvalidStateError);
    CHECK(t.result() == 1);
}

TEST_CASE("wait right after start is safe, and an empty list returns at once") {
    mp::Thread t(sleeper, 0);
    t.start();
    auto [done, not_done] = mp::wait({&t});
    CHECK(done.size() == 1);
    auto [d0, n0] = mp::wait({});
    CHECK(d0.empty());
    CHECK(n0.empty());
}
