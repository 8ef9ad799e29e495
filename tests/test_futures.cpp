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
/// invalid_argument; otherwise sleeps s x 0.2 s and returns s.  Used only where
/// no order between workers is checked (it would depend on start-up times).
int sleeper(int s) {
    if (s > 10) {
        sleep_ms(s * 20);
        throw std::invalid_argument("sleeper " + std::to_string(s));
    }
    sleep_ms(s * 200);
    return s;
}

/// The sleeper with its end in the test's hands: returns s (or, for s > 10,
/// throws invalid_argument) once `go` is set.  The order in which workers end
/// is then the order in which the test opens their gates, whatever the load.
int gated(mp::Event go, int s) {
    if (!go.wait(std::chrono::seconds(120))) throw std::runtime_error("gate never opened");
    if (s > 10) throw std::invalid_argument("gated " + std::to_string(s));
    return s;
}

bool contains(const mp::WorkerList& l, const mp::Worker* w) { return std::find(l.begin(), l.end(), w) != l.end(); }

}  // namespace

#define CONTEXTS mp::SpawnContext, mp::ForkServerContext, mp::ForkContext

TEST_CASE_TEMPLATE("wait with a timeout, processes and a thread mixed", Ctx, CONTEXTS) {
    mp::Event g2, g3, g4;
    mp::Process p2(Ctx{}, gated, g2, 2), p3(Ctx{}, gated, g3, 3);
    mp::Thread t4(gated, g4, 4);
    p2.start();
    p3.start();
    t4.start();
    auto [none_yet, all_running] = mp::wait({&p2, &p3, &t4}, 100ms);  // every gate is closed
    CHECK(none_yet.empty());
    CHECK(all_running.size() == 3);
    g2.set();
    auto [first, others] = mp::wait({&p2, &p3, &t4}, mp::FIRST_COMPLETED);
    CHECK(first == mp::WorkerList{&p2});
    auto [done, not_done] = mp::wait({&p2, &p3, &t4}, 100ms);  // times out: p2 only
    CHECK(done == mp::WorkerList{&p2});
    CHECK(not_done.size() == 2);
    CHECK(contains(not_done, &p3));
    CHECK(contains(not_done, &t4));
    g3.set();
    g4.set();
    auto [all, none] = mp::wait({&p2, &p3, &t4});
    CHECK(all.size() == 3);
    CHECK(none.empty());
    CHECK(p2.result() == 2);
    CHECK(t4.result() == 4);
}

TEST_CASE_TEMPLATE("wait FIRST_EXCEPTION over processes", Ctx, CONTEXTS) {
    mp::Event g3, g2, g13;
    mp::Process p3(Ctx{}, gated, g3, 3), p2(Ctx{}, gated, g2, 2), p13(Ctx{}, gated, g13, 13);
    p3.start();
    p2.start();
    p13.start();
    g13.set();  // p13 fails; the others wait for their gates until terminated
    auto [done, not_done] = mp::wait({&p3, &p2, &p13}, mp::FIRST_EXCEPTION);
    CHECK(done == mp::WorkerList{&p13});
    CHECK(not_done.size() == 2);
    CHECK_THROWS_AS(p13.result(), std::invalid_argument);
    p3.terminate();
    p2.terminate();
}

TEST_CASE_TEMPLATE("wait FIRST_EXCEPTION, processes and a failing thread", Ctx, CONTEXTS) {
    mp::Event g3, g2, g25;
    mp::Process p3(Ctx{}, gated, g3, 3), p2(Ctx{}, gated, g2, 2);
    mp::Thread t25(gated, g25, 25);
    p3.start();
    p2.start();
    t25.start();
    g25.set();
    auto [done, not_done] = mp::wait({&p3, &p2, &t25}, mp::FIRST_EXCEPTION);
    CHECK(done == mp::WorkerList{&t25});
    CHECK(contains(not_done, &p3));
    CHECK(contains(not_done, &p2));
    g2.set();
    g3.set();
    CHECK(p3.result() == 3);
}

TEST_CASE_TEMPLATE("wait FIRST_COMPLETED, and FIRST_EXCEPTION when nothing fails", Ctx, CONTEXTS) {
    mp::Event g1, g3, g2;
    mp::Process p1(Ctx{}, gated, g1, 1), p3(Ctx{}, gated, g3, 3);
    mp::Thread t2(gated, g2, 2);
    p1.start();
    p3.start();
    t2.start();
    g1.set();
    auto [first, rest] = mp::wait({&p1, &p3, &t2}, mp::FIRST_COMPLETED);
    CHECK(first == mp::WorkerList{&p1});
    CHECK(rest.size() == 2);
    g2.set();
    g3.set();
    auto [done, not_done] = mp::wait({&p1, &p3, &t2}, mp::FIRST_EXCEPTION);  // none fails: all
    CHECK(done.size() == 3);
    CHECK(not_done.empty());
}

TEST_CASE_TEMPLATE("as_completed yields in completion order", Ctx, CONTEXTS) {
    mp::Event g3, g2, g4;
    mp::Process p3(Ctx{}, gated, g3, 3), p2(Ctx{}, gated, g2, 2), p4(Ctx{}, gated, g4, 4);
    p3.start();
    p2.start();
    p4.start();
    // Each worker's end opens the next gate: the order is p2, p3, p4.
    std::vector<std::pair<mp::Worker*, mp::Event*>> next = {{&p2, &g3}, {&p3, &g4}};
    g2.set();
    std::vector<mp::Worker*> order;
    for (mp::Worker* w : mp::as_completed({&p3, &p2, &p4})) {
        order.push_back(w);
        for (auto& [after, gate] : next)
            if (after == w) gate->set();
    }
    CHECK(order == std::vector<mp::Worker*>{&p2, &p3, &p4});
}

TEST_CASE("as_completed over a process and threads mixed") {
    mp::Event g2, g1, g3;
    mp::Process p2(gated, g2, 2);
    mp::Thread t1(gated, g1, 1), t3(gated, g3, 3);
    p2.start();
    t1.start();
    t3.start();
    std::vector<std::pair<mp::Worker*, mp::Event*>> next = {{&t1, &g2}, {&p2, &g3}};
    g1.set();
    std::vector<std::string> names;
    for (mp::Worker* w : mp::as_completed({&p2, &t1, &t3}, 60s)) {
        names.push_back(w->name());
        for (auto& [after, gate] : next)
            if (after == w) gate->set();
    }
    CHECK(names == std::vector<std::string>{t1.name(), p2.name(), t3.name()});
}

TEST_CASE("as_completed throws TimeoutError when the timeout expires") {
    mp::Event g1, g4;
    mp::Process p1(gated, g1, 1), p4(gated, g4, 4);
    p1.start();
    p4.start();
    g1.set();
    p1.join();  // p1 is done before the clock starts; p4 waits for its gate
    std::vector<mp::Worker*> got;
    auto t0 = Clock::now();
    CHECK_THROWS_AS(
        {
            for (mp::Worker* w : mp::as_completed({&p1, &p4}, 300ms)) got.push_back(w);
        },
        mp::TimeoutError);
    CHECK(Clock::now() - t0 >= 300ms);
    CHECK(Clock::now() - t0 < 30s);  // a hang guard, not a timing check
    CHECK(got == std::vector<mp::Worker*>{&p1});
    g4.set();
    CHECK(p4.result() == 4);
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
