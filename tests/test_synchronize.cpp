// Lock, RLock, Condition, Semaphore, BoundedSemaphore, Event, Barrier: across
// real processes (fork()ed children sharing the objects' memory, or decoding
// their handles) and across threads; dead owners and dead waiters (SIGKILL);
// descriptor and /dev/shm leaks.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "fork_helpers.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;
using forktest::await;
using forktest::join;
using forktest::kill_and_join;
using forktest::spawn;
using forktest::in_child_decoded;

namespace {

/// A child that takes `lock`, says so, and waits to be killed.
template <class L>
pid_t hold_until_killed(L& lock, mp::Event& held) {
    return spawn([&] {
        lock.acquire();
        held.set();
        forktest::pause_forever();
        return 0;
    });
}

std::uint32_t sleepers(const mp::Condition& c) { return c.state_ref()->sleepers.load(); }
std::uint32_t notify_count(const mp::Condition& c) { return c.state_ref()->sequence.load(); }

/// In a child that waits on a Condition: turns the sleepers' periodic recheck
/// off (an hour), so that only a real wake-up ends the wait before its guard.
void only_real_wakeups() { mp::detail::condition_recheck_ms.store(3'600'000); }

/// Waits on `cond` (held) for flag == value; false if that took until the
/// hang guard: a wait that times out reports the notify it finds then as a
/// wake-up, but the wake-up itself must come.
bool woken_for_flag(mp::Condition& cond, mp::RawValue<int>& flag, int value = 1) {
    const auto guard = std::chrono::steady_clock::now() + 20s;
    while (flag.get() != value)
        if (!cond.wait(30s)) return false;
    return std::chrono::steady_clock::now() < guard;
}

/// A child that waits on `cond` for flag == 1 and wakes up only when woken.
pid_t real_waiter(mp::Condition& cond, mp::RawValue<int>& flag) {
    return spawn([&] {
        only_real_wakeups();
        std::unique_lock<mp::Condition> g(cond);
        return woken_for_flag(cond, flag) ? 0 : 1;
    });
}
std::uint32_t sleepers(const mp::Event& e) { return e.state_ref()->sleepers.load(); }
std::uint32_t sleepers(const mp::Semaphore& s) { return s.state_ref()->sleepers.load(); }

}  // namespace

// ============================================================================ Lock

TEST_CASE("Lock: acquire, try_lock, timeouts and release across processes" * forktest::fork_only) {
    mp::Lock lock;
    CHECK(lock.acquire(0ms));
    CHECK(lock.is_mine());
    pid_t child = spawn([&] {
        if (lock.is_mine()) return 1;  // the child is another thread
        if (lock.try_lock()) return 2;
        auto t0 = std::chrono::steady_clock::now();
        if (lock.acquire(50ms)) return 3;
        if (std::chrono::steady_clock::now() - t0 < 45ms) return 4;
        return 0;
    });
    CHECK(join(child) == 0);
    lock.release();
    CHECK_FALSE(lock.is_mine());

    child = spawn([&] {
        if (!lock.acquire(10s)) return 1;
        if (!lock.is_mine()) return 2;
        lock.release();
        return 0;
    });
    CHECK(join(child) == 0);
    CHECK(lock.try_lock());
    lock.release();
}

TEST_CASE("Lock: a blocked process gets the lock when the holder releases it" * forktest::fork_only) {
    mp::Lock lock;
    mp::Event got_it;
    lock.acquire();
    pid_t child = spawn([&] {
        lock.acquire();
        got_it.set();
        lock.release();
        return 0;
    });
    CHECK_FALSE(got_it.wait(30ms));  // excluded while we hold it
    lock.release();
    CHECK(got_it.wait(30s));
    CHECK(join(child) == 0);
}

TEST_CASE("Lock: misuse is an error, not a deadlock or undefined behaviour") {
    mp::Lock lock;
    CHECK_THROWS_AS(lock.release(), mp::InvalidStateError);
    CHECK_THROWS_AS(lock.make_consistent(), mp::InvalidStateError);
    lock.acquire();
    CHECK_THROWS_AS(lock.acquire(), mp::InvalidStateError);
    CHECK_FALSE(lock.acquire(10ms));  // a timed acquire gives up, as in Python
    bool release_threw = false, try_lock_result = true;
    std::thread t([&] {
        try {
            lock.release();
        } catch (const mp::InvalidStateError&) {
            release_threw = true;
        }
        try_lock_result = lock.try_lock();
    });
    t.join();
    CHECK(release_threw);
    CHECK_FALSE(try_lock_result);
    CHECK(lock.is_mine());
    lock.release();
}

TEST_CASE("Lock: std::lock_guard, std::unique_lock and std::scoped_lock") {
    mp::Lock a, b;
    {
        std::lock_guard<mp::Lock> g(a);
        CHECK(a.is_mine());
    }
    CHECK_FALSE(a.is_mine());
    {
        std::unique_lock<mp::Lock> g(a, 100ms);
        CHECK(g.owns_lock());
        std::unique_lock<mp::Lock> g2(b, std::try_to_lock);
        CHECK(g2.owns_lock());
    }
    {
        std::scoped_lock g(a, b);
        CHECK(a.is_mine());
        CHECK(b.is_mine());
    }
    CHECK_FALSE(a.is_mine());
    CHECK_FALSE(b.is_mine());
}

TEST_CASE("Lock: mutual exclusion among threads of several processes" * forktest::fork_only) {
    constexpr int processes = 2, threads = 2, iterations = 20000;
    mp::Lock lock;
    mp::RawValue<long> counter(0);
    auto work = [&] {
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
            ts.emplace_back([&] {
                for (int i = 0; i < iterations; ++i) {
                    std::lock_guard<mp::Lock> g(lock);
                    counter.set(counter.get() + 1);
                }
            });
        for (auto& t : ts) t.join();
    };
    std::vector<pid_t> children;
    for (int p = 0; p < processes; ++p)
        children.push_back(spawn([&] {
            work();
            return 0;
        }));
    work();
    for (pid_t c : children) CHECK(join(c) == 0);
    CHECK(counter.get() == long(processes + 1) * threads * iterations);
}

// ============================================================================ RLock

TEST_CASE("RLock: re-entry depth, and exclusion until fully released" * forktest::fork_only) {
    mp::RLock r;
    for (int i = 0; i < 1000; ++i) r.acquire();
    CHECK(r.depth() == 1000);
    CHECK(r.is_mine());
    CHECK(r.acquire(0ms));
    CHECK(r.try_lock());
    CHECK(r.depth() == 1002);
    for (int i = 0; i < 1001; ++i) r.release();
    CHECK(r.depth() == 1);
    pid_t child = spawn([&] { return r.try_lock() ? 1 : 0; });
    CHECK(join(child) == 0);

    bool other_thread_threw = false;
    std::thread t([&] {
        try {
            r.release();
        } catch (const mp::InvalidStateError&) {
            other_thread_threw = true;
        }
    });
    t.join();
    CHECK(other_thread_threw);

    r.release();
    CHECK(r.depth() == 0);
    CHECK_THROWS_AS(r.release(), mp::InvalidStateError);
    child = spawn([&] {
        if (!r.acquire(10s)) return 1;
        r.acquire();
        if (r.depth() != 2) return 2;
        r.release();
        r.release();
        return 0;
    });
    CHECK(join(child) == 0);
    CHECK(r.try_lock());
    r.release();
}

// ============================================================================ Condition

namespace {
/// Producer/consumer: the parent produces `items`, `consumers` children take
/// them under the condition; returns whether every item was consumed once.
template <class Cond>
void producer_consumer(Cond& cond) {
    constexpr int items = 2000, consumers = 2;
    mp::RawValue<int> available(0), consumed(0), done(0);
    std::vector<pid_t> children;
    for (int c = 0; c < consumers; ++c)
        children.push_back(spawn([&] {
            for (;;) {
                std::unique_lock<Cond> g(cond);
                if (!cond.wait_for([&] { return available.get() > 0 || done.get(); }, 30s)) return 1;
                if (available.get() > 0) {
                    available.set(available.get() - 1);
                    consumed.set(consumed.get() + 1);
                } else {
                    return 0;
                }
            }
        }));
    for (int i = 0; i < items; ++i) {
        std::lock_guard<Cond> g(cond);
        available.set(available.get() + 1);
        cond.notify();
    }
    {
        std::lock_guard<Cond> g(cond);
        done.set(1);
        cond.notify_all();
    }
    for (pid_t c : children) CHECK(join(c) == 0);
    CHECK(consumed.get() == items);
    CHECK(available.get() == 0);
}
}  // namespace

TEST_CASE("Condition: producer/consumer across processes, over its own RLock, a Lock and an RLock" * forktest::fork_only) {
    SUBCASE("own RLock") {
        mp::Condition cond;
        producer_consumer(cond);
    }
    SUBCASE("Lock") {
        mp::Condition cond{mp::Lock()};
        producer_consumer(cond);
    }
    SUBCASE("RLock") {
        mp::Condition cond{mp::RLock()};
        producer_consumer(cond);
    }
}

TEST_CASE("Condition: timeouts, predicates, RLock depth, and misuse" * forktest::fork_only) {
    mp::RLock r;
    mp::Condition cond(r);
    CHECK_THROWS_AS(cond.wait(10ms), mp::InvalidStateError);
    CHECK_THROWS_AS(cond.notify(), mp::InvalidStateError);
    CHECK_THROWS_AS(cond.notify_all(), mp::InvalidStateError);

    r.acquire();
    r.acquire();
    r.acquire();
    auto t0 = std::chrono::steady_clock::now();
    CHECK_FALSE(cond.wait(30ms));
    CHECK(std::chrono::steady_clock::now() - t0 >= 25ms);
    CHECK(r.is_mine());
    CHECK(r.depth() == 3);  // every level released during the wait, restored after
    CHECK_FALSE(cond.wait_for([] { return false; }, 20ms));
    CHECK(cond.wait_for([] { return true; }, 0ms));
    CHECK(cond.wait_for([] { return true; }));
    cond.notify(0);  // nothing to do
    cond.notify(5);  // nobody waits: fine
    r.release();
    r.release();
    r.release();

    // While a waiter waits, every level of its RLock is free for others.
    mp::Event waiting;
    pid_t child = spawn([&] {
        std::lock_guard<mp::RLock> g1(r);
        std::lock_guard<mp::RLock> g2(r);
        waiting.set();
        if (!cond.wait(30s)) return 1;
        return r.depth() == 2 ? 0 : 2;
    });
    CHECK(waiting.wait(30s));
    CHECK(await([&] { return sleepers(cond) == 1; }));
    {
        std::lock_guard<mp::Condition> g(cond);  // the child's two levels are released
        cond.notify();
    }
    CHECK(join(child) == 0);
}

TEST_CASE("Condition: notify_all wakes every waiting process, notify(n) at least n" * forktest::fork_only) {
    constexpr int waiters = 3;
    mp::Condition cond;
    mp::RawValue<int> go(0), woke(0);
    auto waiter = [&] {
        std::unique_lock<mp::Condition> g(cond);
        if (!cond.wait_for([&] { return go.get() != 0; }, 30s)) return 1;
        woke.set(woke.get() + 1);
        return 0;
    };
    std::vector<pid_t> children;
    for (int i = 0; i < waiters; ++i) children.push_back(spawn(waiter));
    CHECK(await([&] { return sleepers(cond) == waiters; }));
    {
        std::lock_guard<mp::Condition> g(cond);
        go.set(1);
        cond.notify(2);
    }
    CHECK(await([&] {
        std::lock_guard<mp::Condition> g(cond);
        return woke.get() >= 2;
    }));
    {
        std::lock_guard<mp::Condition> g(cond);
        cond.notify_all();
    }
    for (pid_t c : children) CHECK(join(c) == 0);
    CHECK(woke.get() == waiters);
}

TEST_CASE("Condition: ping-pong between threads of one process") {
    mp::Condition cond;
    mp::RawValue<int> turn(0);
    constexpr int rounds = 2000;
    std::thread other([&] {
        for (int i = 0; i < rounds; ++i) {
            std::unique_lock<mp::Condition> g(cond);
            cond.wait_for([&] { return turn.get() == 1; });
            turn.set(0);
            cond.notify();
        }
    });
    for (int i = 0; i < rounds; ++i) {
        std::unique_lock<mp::Condition> g(cond);
        turn.set(1);
        cond.notify();
        CHECK(cond.wait_for([&] { return turn.get() == 0; }, 30s));
    }
    other.join();
}

TEST_CASE("Condition: notify wakes when the lock is released, by whichever handle and at any depth" * forktest::fork_only) {
    mp::RawValue<int> flag(0);
    SUBCASE("over a Lock, released through the Lock") {
        mp::Lock lock;
        mp::Condition cond(lock);
        pid_t waiter = real_waiter(cond, flag);
        CHECK(await([&] { return sleepers(cond) == 1; }));
        lock.acquire();
        flag.set(1);
        cond.notify();
        lock.release();
        CHECK(join(waiter) == 0);
    }
    SUBCASE("over an RLock held three levels deep: the last release wakes") {
        mp::RLock r;
        mp::Condition cond(r);
        pid_t waiter = real_waiter(cond, flag);
        CHECK(await([&] { return sleepers(cond) == 1; }));
        r.acquire();
        r.acquire();
        cond.acquire();
        flag.set(1);
        cond.notify();
        cond.release();
        r.release();
        CHECK(r.depth() == 1);
        r.release();
        CHECK(join(waiter) == 0);
    }
    SUBCASE("the notifying handle is gone before the release") {
        mp::Lock lock;
        auto cond = std::make_unique<mp::Condition>(lock);
        pid_t waiter = real_waiter(*cond, flag);
        CHECK(await([&] { return sleepers(*cond) == 1; }));
        lock.acquire();
        flag.set(1);
        cond->notify();
        cond.reset();  // this process's last handle: the pending wake keeps the memory mapped
        lock.release();
        CHECK(join(waiter) == 0);
    }
    SUBCASE("ping-pong: each side's wait releases the lock and so wakes the other") {
        mp::Condition cond;
        pid_t other = spawn([&] {
            only_real_wakeups();
            std::unique_lock<mp::Condition> g(cond);
            for (int i = 0; i < 200; ++i) {
                if (!woken_for_flag(cond, flag, 1)) return 1;
                flag.set(0);
                cond.notify();
            }
            return 0;
        });
        const auto saved = mp::detail::condition_recheck_ms.exchange(3'600'000);
        for (int i = 0; i < 200; ++i) {
            std::unique_lock<mp::Condition> g(cond);
            flag.set(1);
            cond.notify();
            bool answered = woken_for_flag(cond, flag, 0);
            CHECK(answered);
            if (!answered) break;
        }
        mp::detail::condition_recheck_ms.store(saved);
        CHECK(join(other) == 0);
    }
}

TEST_CASE("Condition: more conditions notified under one lock than wakes are deferred: all wake" * forktest::fork_only) {
    constexpr int conditions = 7;  // more than a thread's pending wakes hold: the rest wake at once
    mp::Lock lock;
    std::vector<mp::Condition> conds;
    for (int i = 0; i < conditions; ++i) conds.emplace_back(lock);
    mp::RawValue<int> flag(0);
    std::vector<pid_t> waiters;
    for (auto& c : conds) waiters.push_back(real_waiter(c, flag));
    for (auto& c : conds) CHECK(await([&] { return sleepers(c) == 1; }));
    {
        std::lock_guard<mp::Lock> g(lock);
        flag.set(1);
        for (auto& c : conds) c.notify();
        for (auto& c : conds) c.notify_all();  // the same ones again: merged, not more entries
    }
    for (pid_t w : waiters) CHECK(join(w) == 0);
}

TEST_CASE("Condition: notify without holding the lock stays an error and wakes nobody" * forktest::fork_only) {
    mp::Condition cond;
    mp::RawValue<int> flag(0);
    pid_t waiter = real_waiter(cond, flag);
    CHECK(await([&] { return sleepers(cond) == 1; }));
    const std::uint32_t before = notify_count(cond);
    CHECK_THROWS_AS(cond.notify(), mp::InvalidStateError);
    CHECK_THROWS_AS(cond.notify_all(), mp::InvalidStateError);
    mp::Event held;
    pid_t holder = hold_until_killed(cond, held);  // the lock held by another process
    CHECK(held.wait(30s));
    CHECK_THROWS_AS(cond.notify(), mp::InvalidStateError);
    CHECK(notify_count(cond) == before);
    CHECK(kill_and_join(holder) == forktest::killed);
    CHECK_THROWS_AS(cond.acquire(), mp::OwnerDiedError);  // wakes the sleeper: it sleeps again
    flag.set(1);
    cond.notify();
    cond.release();
    CHECK(join(waiter) == 0);
}

// ============================================================================ Semaphore

TEST_CASE("Semaphore: counts across processes" * forktest::fork_only) {
    mp::Semaphore s(3);
    CHECK(s.get_value() == 3);
    CHECK(s.try_acquire());
    CHECK(s.try_acquire());
    CHECK(s.acquire(0ms));
    CHECK_FALSE(s.try_acquire());
    CHECK_FALSE(s.acquire(20ms));
    CHECK(s.get_value() == 0);

    constexpr int children_n = 4;
    std::vector<pid_t> children;
    for (int i = 0; i < children_n; ++i) children.push_back(spawn([&] { return s.acquire(30s) ? 0 : 1; }));
    CHECK(await([&] { return sleepers(s) == children_n; }));
    s.release(children_n);  // one release wakes four
    for (pid_t c : children) CHECK(join(c) == 0);
    CHECK(s.get_value() == 0);

    // Anyone may release: a child releases what the parent waits for.
    pid_t child = spawn([&] {
        s.release(2);
        return 0;
    });
    s.acquire();
    CHECK(s.acquire(30s));
    CHECK(join(child) == 0);
    CHECK(s.get_value() == 0);

    mp::Semaphore zero(0);
    zero.release(1000);
    CHECK(zero.get_value() == 1000);
    {
        std::lock_guard<mp::Semaphore> g(zero);
        CHECK(zero.get_value() == 999);
    }
    CHECK(zero.get_value() == 1000);
}

TEST_CASE("BoundedSemaphore: over-release throws and changes nothing" * forktest::fork_only) {
    mp::BoundedSemaphore b(2);
    CHECK_THROWS_AS(b.release(), mp::InvalidStateError);
    CHECK(b.get_value() == 2);
    b.acquire();
    CHECK_THROWS_AS(b.release(2), mp::InvalidStateError);
    CHECK(b.get_value() == 1);
    pid_t child = spawn([&] {
        try {
            b.release(2);
            return 1;
        } catch (const mp::InvalidStateError&) {
        }
        b.release();
        return b.get_value() == 2 ? 0 : 2;
    });
    CHECK(join(child) == 0);
    CHECK(b.get_value() == 2);
    mp::BoundedSemaphore none(0);
    CHECK_THROWS_AS(none.release(), mp::InvalidStateError);
    CHECK_FALSE(none.try_acquire());
}

// ============================================================================ Event

TEST_CASE("Event: set wakes every waiting process; timeouts; clear" * forktest::fork_only) {
    mp::Event e;
    CHECK_FALSE(e.is_set());
    CHECK_FALSE(e.wait(0ms));
    auto t0 = std::chrono::steady_clock::now();
    CHECK_FALSE(e.wait(30ms));
    CHECK(std::chrono::steady_clock::now() - t0 >= 25ms);

    constexpr int waiters = 3;
    std::vector<pid_t> children;
    for (int i = 0; i < waiters; ++i) children.push_back(spawn([&] { return e.wait(30s) ? 0 : 1; }));
    CHECK(await([&] { return sleepers(e) == waiters; }));
    e.set();
    for (pid_t c : children) CHECK(join(c) == 0);
    CHECK(e.is_set());
    CHECK(e.wait(0ms));
    e.wait();
    e.set();  // setting a set event changes nothing
    CHECK(e.is_set());
    e.clear();
    CHECK_FALSE(e.is_set());
    CHECK_FALSE(e.wait(1ms));
}

TEST_CASE("Event: a set() followed at once by clear() still wakes the sleepers" * forktest::fork_only) {
    mp::Event e;
    pid_t child = spawn([&] { return e.wait(30s) ? 0 : 1; });
    CHECK(await([&] { return sleepers(e) == 1; }));
    e.set();
    e.clear();
    CHECK(join(child) == 0);
    CHECK_FALSE(e.is_set());
}

// ============================================================================ Barrier

namespace {
mp::RawValue<int>* g_action_runs = nullptr;
void count_action() { g_action_runs->set(g_action_runs->get() + 1); }
void failing_action() { throw std::runtime_error("action failed"); }
}  // namespace

TEST_CASE("Barrier: arrival indices and one action per cycle, across processes" * forktest::fork_only) {
    constexpr int parties = 3, cycles = 20;
    mp::RawValue<int> runs(0);
    g_action_runs = &runs;
    mp::Barrier b(parties, &count_action);
    CHECK(b.parties() == parties);
    mp::RawArray<int> seen(parties * cycles, -1);
    auto party = [&](int who) {
        for (int c = 0; c < cycles; ++c) {
            unsigned index = b.wait(30s);
            if (index >= unsigned(parties)) return 1;
            seen[c * parties + who] = int(index);
            if (runs.get() < c + 1) return 2;  // the action ran before anyone was released
        }
        return 0;
    };
    std::vector<pid_t> children;
    for (int who = 1; who < parties; ++who) children.push_back(spawn([&, who] { return party(who); }));
    CHECK(party(0) == 0);
    for (pid_t c : children) CHECK(join(c) == 0);
    CHECK(runs.get() == cycles);
    for (int c = 0; c < cycles; ++c) {
        std::vector<int> indices(seen.begin() + c * parties, seen.begin() + (c + 1) * parties);
        std::sort(indices.begin(), indices.end());
        CHECK(indices == std::vector<int>{0, 1, 2});
    }
    CHECK_FALSE(b.broken());
    CHECK(b.n_waiting() == 0);
    g_action_runs = nullptr;
}

TEST_CASE("Barrier: a timeout breaks it, reset() repairs it" * forktest::fork_only) {
    mp::Barrier b(2);
    auto t0 = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(b.wait(30ms), mp::BrokenBarrierError);
    CHECK(std::chrono::steady_clock::now() - t0 >= 25ms);
    CHECK(b.broken());
    CHECK_THROWS_AS(b.wait(), mp::BrokenBarrierError);  // at once: still broken
    b.reset();
    CHECK_FALSE(b.broken());
    CHECK(b.n_waiting() == 0);
    pid_t child = spawn([&] { return b.wait(30s) <= 1 ? 0 : 1; });
    unsigned index = b.wait(30s);
    CHECK(index <= 1);
    CHECK(join(child) == 0);

    mp::Barrier with_default(2, nullptr, 20ms);
    CHECK_THROWS_AS(with_default.wait(), mp::BrokenBarrierError);

    mp::Barrier one(1);
    CHECK(one.wait() == 0);
    CHECK(one.wait(0ms) == 0);
    CHECK_THROWS_AS(mp::Barrier(0), std::invalid_argument);
}

TEST_CASE("Barrier: abort() and reset() release the waiters with BrokenBarrierError" * forktest::fork_only) {
    for (bool use_reset : {false, true}) {
        mp::Barrier b(3);
        auto waiter = [&] {
            try {
                b.wait();
                return 1;
            } catch (const mp::BrokenBarrierError&) {
                return 0;
            }
        };
        pid_t c1 = spawn(waiter), c2 = spawn(waiter);
        CHECK(await([&] { return b.n_waiting() == 2; }));
        if (use_reset)
            b.reset();
        else
            b.abort();
        CHECK(join(c1) == 0);
        CHECK(join(c2) == 0);
        CHECK(b.broken() == !use_reset);
    }
}

TEST_CASE("Barrier: an action that throws breaks the barrier; the thrower gets its exception" * forktest::fork_only) {
    mp::Barrier b(2, &failing_action);
    pid_t child = spawn([&] {
        try {
            b.wait(30s);
            return 1;
        } catch (const mp::BrokenBarrierError&) {
            return 0;
        }
    });
    CHECK(await([&] { return b.n_waiting() == 1; }));
    CHECK_THROWS_AS(b.wait(30s), std::runtime_error);  // we arrive last: the action runs here
    CHECK(join(child) == 0);
    CHECK(b.broken());
}

TEST_CASE("Barrier: threads of one process") {
    mp::Barrier b(4);
    std::vector<std::thread> ts;
    std::atomic<int> index_sum{0};
    for (int i = 0; i < 4; ++i) ts.emplace_back([&] { index_sum += int(b.wait(30s)); });
    for (auto& t : ts) t.join();
    CHECK(index_sum == 0 + 1 + 2 + 3);
}

// ============================================================================ dead owners

TEST_CASE("Lock: a holder killed by SIGKILL leaves the lock to the next acquirer, who is told" * forktest::fork_only) {
    mp::Lock lock;
    SUBCASE("acquire() throws OwnerDiedError holding the lock; release() keeps the lock usable") {
        mp::Event held;
        pid_t child = hold_until_killed(lock, held);
        CHECK(held.wait(30s));
        CHECK(kill_and_join(child) == forktest::killed);
        CHECK_THROWS_AS(lock.acquire(), mp::OwnerDiedError);
        CHECK(lock.is_mine());
        lock.release();  // without make_consistent(): not poisoned
        for (int i = 0; i < 3; ++i) {
            CHECK(lock.acquire_checked(1s) == mp::LockStatus::acquired);
            lock.release();
        }
        pid_t other = spawn([&] {
            if (lock.acquire_checked(10s) != mp::LockStatus::acquired) return 1;
            lock.release();
            return 0;
        });
        CHECK(join(other) == 0);
    }
    SUBCASE("acquire_checked() reports owner_died; make_consistent() then release()") {
        mp::Event held;
        pid_t child = hold_until_killed(lock, held);
        CHECK(held.wait(30s));
        CHECK(kill_and_join(child) == forktest::killed);
        CHECK(lock.acquire_checked() == mp::LockStatus::owner_died);
        lock.make_consistent();
        lock.release();
        CHECK(lock.acquire_checked(0ms) == mp::LockStatus::acquired);
        lock.release();
    }
    SUBCASE("a thread already blocked in acquire is told when the holder dies") {
        mp::Event held;
        pid_t child = hold_until_killed(lock, held);
        CHECK(held.wait(30s));
        mp::LockStatus status = mp::LockStatus::timed_out;
        std::thread waiter([&] {
            // Untimed: ThreadSanitizer (LLVM 14) models EOWNERDEAD only for pthread_mutex_lock,
            // not for the timed variants, and would report the release as unbalanced.
            status = lock.acquire_checked();
            if (status != mp::LockStatus::timed_out) lock.release();
        });
        CHECK(kill_and_join(child) == forktest::killed);
        waiter.join();
        CHECK(status == mp::LockStatus::owner_died);
    }
}

TEST_CASE("Lock: a holder that exits normally counts as dead; try_lock() is told too" * forktest::fork_only) {
    mp::Lock lock;
    pid_t child = spawn([&] {
        lock.acquire();
        return 0;
    });
    CHECK(join(child) == 0);
    CHECK_THROWS_AS(lock.try_lock(), mp::OwnerDiedError);
    CHECK(lock.is_mine());
    lock.release();
}

TEST_CASE("RLock: a dead owner at depth 3; the next owner starts at depth 1" * forktest::fork_only) {
    mp::RLock r;
    mp::Event held;
    pid_t child = spawn([&] {
        r.acquire();
        r.acquire();
        r.acquire();
        held.set();
        forktest::pause_forever();
        return 0;
    });
    CHECK(held.wait(30s));
    CHECK(kill_and_join(child) == forktest::killed);
    CHECK_THROWS_AS(r.acquire(), mp::OwnerDiedError);
    CHECK(r.depth() == 1);
    r.make_consistent();
    r.release();
    CHECK(r.depth() == 0);
    CHECK(r.try_lock());
    r.release();
}

TEST_CASE("Condition: its lock's holder dies; the condition keeps working" * forktest::fork_only) {
    mp::Condition cond;
    mp::Event held;
    pid_t child = spawn([&] {
        cond.acquire();
        held.set();
        forktest::pause_forever();
        return 0;
    });
    CHECK(held.wait(30s));
    CHECK(kill_and_join(child) == forktest::killed);
    CHECK_THROWS_AS(cond.acquire(), mp::OwnerDiedError);
    cond.make_consistent();
    cond.release();

    mp::RawValue<int> flag(0);
    pid_t waiter = spawn([&] {
        std::unique_lock<mp::Condition> g(cond);
        return cond.wait_for([&] { return flag.get() == 1; }, 30s) ? 0 : 1;
    });
    CHECK(await([&] { return sleepers(cond) == 1; }));
    {
        std::lock_guard<mp::Condition> g(cond);
        flag.set(1);
        cond.notify();
    }
    CHECK(join(waiter) == 0);
}

TEST_CASE("Condition: a notifier SIGKILLed before releasing the lock does not strand the sleeper" * forktest::fork_only) {
    mp::RawValue<int> flag(0);
    mp::Event notified;
    auto notifier = [&](mp::Condition& cond) {
        return spawn([&] {
            cond.acquire();
            flag.set(1);
            cond.notify();
            notified.set();
            forktest::pause_forever();
            return 0;
        });
    };
    auto check_both_ways = [&](mp::Condition& cond) {
        SUBCASE("the sleeper's own recheck: it takes the lock and is told") {
            pid_t waiter = spawn([&] {
                std::unique_lock<mp::Condition> g(cond);
                const auto guard = std::chrono::steady_clock::now() + 20s;
                try {
                    woken_for_flag(cond, flag);
                } catch (const mp::OwnerDiedError&) {
                    if (std::chrono::steady_clock::now() >= guard) return 3;
                    return flag.get() == 1 && mp::detail::lock_is_mine(cond.lock_ref()) ? 0 : 2;
                }
                return 1;
            });
            CHECK(await([&] { return sleepers(cond) == 1; }));
            pid_t n = notifier(cond);
            CHECK(notified.wait(30s));
            CHECK(kill_and_join(n) == forktest::killed);
            CHECK(join(waiter) == 0);
        }
        SUBCASE("the next acquirer through the Condition wakes it") {
            pid_t waiter = real_waiter(cond, flag);
            CHECK(await([&] { return sleepers(cond) == 1; }));
            pid_t n = notifier(cond);
            CHECK(notified.wait(30s));
            CHECK(kill_and_join(n) == forktest::killed);
            CHECK_THROWS_AS(cond.acquire(), mp::OwnerDiedError);
            cond.release();
            CHECK(join(waiter) == 0);
        }
    };
    SUBCASE("own RLock") {
        mp::Condition cond;
        check_both_ways(cond);
    }
    SUBCASE("Lock") {
        mp::Condition cond{mp::Lock()};
        check_both_ways(cond);
    }
    SUBCASE("RLock") {
        mp::Condition cond{mp::RLock()};
        check_both_ways(cond);
    }
}

TEST_CASE("Condition: a thread that ends holding the lock after notify wakes the sleepers" * forktest::fork_only) {
    mp::Condition cond{mp::Lock()};
    mp::RawValue<int> flag(0);
    pid_t waiter = spawn([&] {
        only_real_wakeups();
        std::unique_lock<mp::Condition> g(cond);
        const auto guard = std::chrono::steady_clock::now() + 20s;
        try {
            woken_for_flag(cond, flag);
        } catch (const mp::OwnerDiedError&) {
            if (std::chrono::steady_clock::now() >= guard) return 3;
            return flag.get() == 1 ? 0 : 2;
        }
        return 1;
    });
    CHECK(await([&] { return sleepers(cond) == 1; }));
    std::thread([&] {
        cond.acquire();
        flag.set(1);
        cond.notify();
    }).join();  // ends holding the lock
    CHECK(join(waiter) == 0);
}

TEST_CASE("Lock: SIGKILL at a random point of lock/unlock loops never wedges the others" * forktest::fork_only) {
    constexpr int workers = 3, iterations = 20000, rounds = 8;
    std::mt19937 rng(12345);
    for (int round = 0; round < rounds; ++round) {
        mp::Lock lock;
        mp::RawValue<int> in_critical(0), violations(0), owner_died_reports(0);
        mp::RawValue<long> counter(0);
        mp::Event started;
        auto worker = [&](bool victim) {
            for (int i = 0; victim || i < iterations; ++i) {
                if (lock.acquire_checked() == mp::LockStatus::owner_died) {
                    // The victim died inside: its critical-section mark is still set.
                    owner_died_reports.set(owner_died_reports.get() + 1);
                    in_critical.set(0);
                    lock.make_consistent();
                }
                if (in_critical.get() != 0) violations.set(violations.get() + 1);
                in_critical.set(1);
                counter.set(counter.get() + 1);
                in_critical.set(0);
                lock.release();
                if (victim && i == 100) started.set();
            }
            return 0;
        };
        pid_t victim = spawn([&] { return worker(true); });
        std::vector<pid_t> others;
        for (int w = 1; w < workers; ++w) others.push_back(spawn([&] { return worker(false); }));
        CHECK(started.wait(30s));
        // A random delay of up to ~0.5 ms, then the kill lands wherever the victim is.
        volatile unsigned spin = std::uniform_int_distribution<unsigned>(0, 20000)(rng);
        while (spin > 0) spin = spin - 1;  // not --spin: C++20 deprecates ++/-- on volatile
        CHECK(kill_and_join(victim) == forktest::killed);
        for (pid_t o : others) CHECK(join(o) == 0);
        mp::LockStatus last = lock.acquire_checked(10s);
        CHECK(last != mp::LockStatus::timed_out);
        if (last == mp::LockStatus::owner_died) {  // the victim died holding it after the others finished
            owner_died_reports.set(owner_died_reports.get() + 1);
            in_critical.set(0);
        }
        CHECK(in_critical.get() == 0);
        lock.release();
        CHECK(violations.get() == 0);
        CHECK(owner_died_reports.get() <= 1);
        CHECK(counter.get() >= long(workers - 1) * iterations + 100);
    }
}

// ============================================================================ dead waiters

TEST_CASE("Condition: a waiter SIGKILLed while waiting does not wedge the others" * forktest::fork_only) {
    mp::Condition cond;
    mp::RawValue<int> flag(0);
    auto waiter = [&] {
        std::unique_lock<mp::Condition> g(cond);
        return cond.wait_for([&] { return flag.get() == 1; }, 30s) ? 0 : 1;
    };
    pid_t doomed = spawn(waiter);
    pid_t survivor = spawn(waiter);
    CHECK(await([&] { return sleepers(cond) == 2; }));
    CHECK(kill_and_join(doomed) == forktest::killed);
    {
        std::lock_guard<mp::Condition> g(cond);
        flag.set(1);
        cond.notify();  // one notify: it must reach the survivor, not the dead
    }
    CHECK(join(survivor) == 0);
    // and it keeps working
    flag.set(0);
    pid_t later = spawn(waiter);
    CHECK(await([&] { return sleepers(cond) >= 1; }));
    {
        std::lock_guard<mp::Condition> g(cond);
        flag.set(1);
        cond.notify();
    }
    CHECK(join(later) == 0);
}

TEST_CASE("Event and Semaphore: a waiter SIGKILLed while waiting does not wedge the others" * forktest::fork_only) {
    mp::Event e;
    pid_t doomed = spawn([&] { return e.wait(30s) ? 0 : 1; });
    pid_t survivor = spawn([&] { return e.wait(30s) ? 0 : 1; });
    CHECK(await([&] { return sleepers(e) == 2; }));
    CHECK(kill_and_join(doomed) == forktest::killed);
    e.set();
    CHECK(join(survivor) == 0);

    mp::Semaphore s(0);
    doomed = spawn([&] { return s.acquire(30s) ? 0 : 1; });
    survivor = spawn([&] { return s.acquire(30s) ? 0 : 1; });
    CHECK(await([&] { return sleepers(s) == 2; }));
    CHECK(kill_and_join(doomed) == forktest::killed);
    s.release();
    CHECK(join(survivor) == 0);
    CHECK(s.get_value() == 0);
}

TEST_CASE("Barrier: a party SIGKILLed while waiting breaks the barrier for the others" * forktest::fork_only) {
    mp::Barrier b(3);
    pid_t doomed = spawn([&] {
        b.wait();
        return 1;
    });
    pid_t survivor = spawn([&] {
        try {
            b.wait();  // no timeout: only the liveness check can end this
            return 1;
        } catch (const mp::BrokenBarrierError&) {
            return 0;
        }
    });
    CHECK(await([&] { return b.n_waiting() == 2; }));
    forktest::kill_hard(doomed);  // not reaped yet: a zombie must count as dead
    CHECK(join(survivor) == 0);
    CHECK(join(doomed) == forktest::killed);
    CHECK(b.broken());
    CHECK_THROWS_AS(b.wait(), mp::BrokenBarrierError);
    b.reset();
    pid_t c1 = spawn([&] { return b.wait(30s) < 3 ? 0 : 1; });
    pid_t c2 = spawn([&] { return b.wait(30s) < 3 ? 0 : 1; });
    CHECK(b.wait(30s) < 3);
    CHECK(join(c1) == 0);
    CHECK(join(c2) == 0);
}

// ============================================================================ handles travel


TEST_CASE("Codec: a decoded handle is the same object, in this process and in another" * forktest::fork_only) {
    mp::Lock lock;
    {
        mp::Encoder e;
        e.write(lock);
        CHECK(e.handles().size() == 1);
        mp::Decoder d(e.bytes(), &e.handles());
        mp::Lock same = d.read<mp::Lock>();
        same.acquire();
        CHECK(lock.is_mine());
        bool other_thread_got_it = true;
        std::thread t([&] { other_thread_got_it = lock.try_lock(); });
        t.join();
        CHECK_FALSE(other_thread_got_it);
        same.release();  // through the mapping that locked it (ThreadSanitizer tracks mutexes by address)
    }
    lock.acquire();
    CHECK(in_child_decoded(lock, [](mp::Lock l) { return l.try_lock() ? 1 : 0; }) == 0);
    lock.release();

    mp::Event e;
    CHECK(in_child_decoded(e, [](mp::Event ev) {
              ev.set();
              return 0;
          }) == 0);
    CHECK(e.is_set());

    mp::BoundedSemaphore bs(1);
    CHECK(in_child_decoded(bs, [](mp::BoundedSemaphore s) {
              try {
                  s.release();
                  return 1;
              } catch (const mp::InvalidStateError&) {
                  return s.try_acquire() ? 0 : 2;
              }
          }) == 0);
    CHECK(bs.get_value() == 0);

    mp::Condition cond;  // its own lock travels in the same block: one handle
    {
        mp::Encoder enc;
        enc.write(cond);
        CHECK(enc.handles().size() == 1);
    }
    mp::RawValue<int> flag(0);
    CHECK(in_child_decoded(cond, [&](mp::Condition c) {
              std::lock_guard<mp::Condition> g(c);
              flag.set(7);
              c.notify_all();
              return 0;
          }) == 0);
    CHECK(flag.get() == 7);

    g_action_runs = &flag;
    mp::Barrier b(2, &count_action);
    mp::Encoder be;
    be.write(b);
    std::string bytes = be.bytes();
    std::vector<mp::detail::os::handle_t> handles = be.handles();
    pid_t child = spawn([&] {
        mp::Decoder d(bytes, &handles);
        auto copy = d.read<mp::Barrier>();
        return copy.wait(30s) <= 1 ? 0 : 1;
    });
    CHECK(b.wait(30s) <= 1);
    CHECK(join(child) == 0);
    CHECK(flag.get() == 8);  // the action ran once, in whichever process came last
    g_action_runs = nullptr;
}

TEST_CASE("Codec: malformed handles are DecodeErrors") {
    mp::Lock lock;
    mp::Encoder e;
    e.write(lock);
    std::string bytes = e.bytes();
    std::vector<mp::detail::os::handle_t> handles = e.handles();
    CHECK_THROWS_AS(mp::Decoder(bytes).read<mp::Lock>(), mp::DecodeError);  // no handles came with it
    {
        std::string truncated = bytes.substr(0, bytes.size() - 1);
        mp::Decoder d(truncated, &handles);
        CHECK_THROWS_AS(d.read<mp::Lock>(), mp::DecodeError);
    }
    {
        std::string bad = bytes;
        std::uint64_t huge = 1u << 30;
        std::memcpy(&bad[bad.size() - sizeof huge], &huge, sizeof huge);  // offset outside the block
        mp::Decoder d(bad, &handles);
        CHECK_THROWS_AS(d.read<mp::Lock>(), mp::DecodeError);
    }
    {
        std::string bad = bytes;
        std::uint64_t odd = 3;  // misaligned
        std::memcpy(&bad[bad.size() - sizeof odd], &odd, sizeof odd);
        mp::Decoder d(bad, &handles);
        CHECK_THROWS_AS(d.read<mp::Lock>(), mp::DecodeError);
    }
    {
        std::vector<mp::detail::os::handle_t> wrong = {handles[0] + 1000};
        mp::Decoder d(bytes, &wrong);
        CHECK_THROWS(d.read<mp::Lock>());  // not a descriptor: the dup fails
    }
}

// ============================================================================ leaks

#if !defined(_WIN32)
TEST_CASE("No descriptor, mapping or /dev/shm leak after 1,000 create/use/destroy cycles") {
    auto fds = forktest::open_fds();
    auto shm = forktest::dev_shm_entries();
    auto maps = forktest::mapping_count();
    {
        mp::Lock probe;  // the counters do see the objects
        CHECK(forktest::open_fds().size() == fds.size() + 1);
        CHECK(forktest::mapping_count() == maps + 1);
    }
#else
// Windows: the process's handle count and the library's own count of views.
TEST_CASE("No handle or mapping leak after 1,000 create/use/destroy cycles") {
    namespace os = mp::detail::os;
    const long handles = os::open_handle_count(), maps = os::mapping_count();
    {
        mp::Lock probe;  // the view count does see the objects (a Lock keeps no handle open: its view does)
        CHECK(os::mapping_count() == maps + 1);
    }
    CHECK(os::open_handle_count() == handles);
#endif
    for (int i = 0; i < 1000; ++i) {
        mp::Lock l;
        mp::RLock r;
        mp::Condition c;
        mp::Condition c2(l);
        mp::Semaphore s(1);
        mp::BoundedSemaphore bs(1);
        mp::Event e;
        mp::Barrier b(1);
        std::lock_guard<mp::Lock> g(l);
        std::lock_guard<mp::RLock> g2(r);
        s.acquire();
        s.release();
        e.set();
        b.wait();
        mp::Lock copy = l;
        mp::Encoder enc;
        enc.write(c);
        mp::Decoder d(enc.bytes(), &enc.handles());
        mp::Condition decoded = d.read<mp::Condition>();
    }
#if !defined(_WIN32)
    CHECK(forktest::open_fds() == fds);
    CHECK(forktest::dev_shm_entries() == shm);
    CHECK(forktest::mapping_count() == maps);
#else
    CHECK(os::open_handle_count() == handles);
    CHECK(os::mapping_count() == maps);
#endif
}

TEST_CASE("No descriptor or /dev/shm leak after a SIGKILLed child that used the objects" * forktest::fork_only) {
    auto fds = forktest::open_fds();
    auto shm = forktest::dev_shm_entries();
    {
        mp::Lock l;
        mp::Condition c;
        mp::Event e, held;
        mp::Barrier b(3);
        pid_t child = spawn([&] {
            l.acquire();
            c.acquire();
            held.set();
            b.wait();
            return 0;
        });
        CHECK(held.wait(30s));
        CHECK(await([&] { return b.n_waiting() == 1; }));
        CHECK(kill_and_join(child) == forktest::killed);
        CHECK_THROWS_AS(l.acquire(), mp::OwnerDiedError);
        l.release();
    }
    CHECK(forktest::open_fds() == fds);
    CHECK(forktest::dev_shm_entries() == shm);
}

// ============================================================================ barrier actions travel

#if !defined(_WIN32)
#define A_LIBC_FUNCTION ::getpid
#else
#define A_LIBC_FUNCTION std::fopen  // (a fork_only case: only compiled on Windows)
#endif

TEST_CASE("CodeRef: a function is found again by module and offset; non-code is refused" * forktest::fork_only) {
    namespace os = mp::detail::os;
    auto here = os::code_ref_of(reinterpret_cast<const void*>(&count_action));
    CHECK_FALSE(here.empty());
    CHECK(os::code_ref_resolve(here) == reinterpret_cast<const void*>(&count_action));
    // A function of a shared library (libc) works the same way.
    auto in_libc = os::code_ref_of(reinterpret_cast<const void*>(&A_LIBC_FUNCTION));
    CHECK(in_libc.module != here.module);
    CHECK(os::code_ref_resolve(in_libc) == reinterpret_cast<const void*>(&A_LIBC_FUNCTION));
    // In another process (same layout under fork; after exec only module + offset remain).
    pid_t child = spawn([&] { return os::code_ref_resolve(here) == reinterpret_cast<const void*>(&count_action) ? 0 : 1; });
    CHECK(join(child) == 0);
    // A module that is not loaded, or an offset outside its code, resolves to nothing.
    os::CodeRef unknown{here.module ^ 0x5a5a5a5aULL, here.offset};
    CHECK(os::code_ref_resolve(unknown) == nullptr);
    os::CodeRef outside{here.module, std::uint64_t(1) << 46};
    CHECK(os::code_ref_resolve(outside) == nullptr);
    int on_stack = 0;
    CHECK_THROWS_AS(os::code_ref_of(&on_stack), std::invalid_argument);
    CHECK(os::code_ref_resolve(os::CodeRef{}) == nullptr);
}

// ============================================================================ as Process arguments

#define SYNC_CONTEXTS mp::SpawnContext, mp::ForkServerContext

namespace {
int take_and_die(mp::Lock lock, mp::Event held) {
    lock.acquire();
    held.set();
    forktest::die_hard();
    return 0;
}
int wait_for_event(mp::Event e) { return e.wait(30s) ? 0 : 1; }
int rlock_depth_in_child(mp::RLock r) {
    r.acquire();
    r.acquire();
    int depth = int(r.depth());
    r.release();
    r.release();
    return depth;
}
int over_release(mp::BoundedSemaphore b) {
    try {
        b.release();
        return 1;
    } catch (const mp::InvalidStateError&) {
        return b.try_acquire() ? 0 : 2;
    }
}
int consume_all(mp::Condition cond, mp::RawValue<int> available, mp::RawValue<int> consumed, mp::RawValue<int> done) {
    for (;;) {
        std::unique_lock<mp::Condition> g(cond);
        if (!cond.wait_for([&] { return available.get() > 0 || done.get(); }, 30s)) return 1;
        if (available.get() == 0) return 0;
        available.set(available.get() - 1);
        consumed.set(consumed.get() + 1);
    }
}
int barrier_party(mp::Barrier b, mp::RawValue<int> runs, int cycles) {
    g_action_runs = &runs;  // the action, if it runs here, counts in the parent's memory
    int index_sum = 0;
    for (int c = 0; c < cycles; ++c) index_sum += int(b.wait(30s));
    g_action_runs = nullptr;
    return index_sum;
}
}  // namespace

TEST_CASE_TEMPLATE("Process arguments: children attach to the same Lock, RLock, Event, semaphores", Ctx,
                   SYNC_CONTEXTS) {
    mp::RLock r;
    r.acquire();
    mp::Process depth(Ctx{}, rlock_depth_in_child, r);
    depth.start();
    CHECK_THROWS_AS(depth.result(100ms), mp::TimeoutError);  // blocked: we hold it
    r.release();
    CHECK(depth.result(30s) == 2);

    mp::Event e;
    mp::Process waiter(Ctx{}, wait_for_event, e);
    waiter.start();
    CHECK(await([&] { return sleepers(e) == 1; }));
    e.set();
    CHECK(waiter.result(30s) == 0);

    mp::BoundedSemaphore b(1);
    mp::Process over(Ctx{}, over_release, b);
    over.start();
    CHECK(over.result(30s) == 0);
    CHECK(b.get_value() == 0);
}

TEST_CASE_TEMPLATE("Process arguments: a child SIGKILLed holding a Lock; the parent is told", Ctx, SYNC_CONTEXTS) {
    mp::Lock lock;
    mp::Event held;
    mp::Process p(Ctx{}, take_and_die, lock, held);
    p.start();
    CHECK(held.wait(30s));
    CHECK_THROWS_AS(p.join(), mp::ProcessError);
    CHECK_THROWS_AS(lock.acquire(), mp::OwnerDiedError);
    lock.release();
    CHECK(lock.acquire(1s));
    lock.release();
}

int take_and_wait(mp::Lock lock, mp::Event held) {
    lock.acquire();
    held.set();
    std::this_thread::sleep_for(120s);  // until it is killed
    return 0;
}
int take_and_return(mp::Lock lock) {
    lock.acquire();
    return 0;  // ends holding it
}

TEST_CASE_TEMPLATE("Process arguments: waiters blocked on a Lock wake with OwnerDiedError when its holder is killed",
                   Ctx, SYNC_CONTEXTS) {
    mp::Lock lock;
    mp::Event held;
    mp::Process p(Ctx{}, take_and_wait, lock, held);
    p.start();
    REQUIRE(held.wait(30s));
    // Two threads wait (asleep, or about to be: either way the holder's end
    // must reach them); exactly one of them is told, the other then gets the lock.
    std::atomic<int> told{0}, acquired{0}, other{0};
    auto waiter = [&] {
        switch (lock.acquire_checked(60s)) {
            case mp::LockStatus::owner_died: ++told; break;
            case mp::LockStatus::acquired: ++acquired; break;
            default: ++other; return;
        }
        lock.release();
    };
    std::thread a(waiter), b(waiter);
    p.kill();
    a.join();
    b.join();
    CHECK_THROWS_AS(p.join(), mp::ProcessError);
    CHECK(told == 1);
    CHECK(acquired == 1);
    CHECK(other == 0);
}

TEST_CASE_TEMPLATE("Process arguments: a child that returns holding a Lock counts as dead; try_lock() is told", Ctx,
                   SYNC_CONTEXTS) {
    mp::Lock lock;
    mp::Process p(Ctx{}, take_and_return, lock);
    p.start();
    CHECK(p.result(30s) == 0);
    CHECK_THROWS_AS(lock.try_lock(), mp::OwnerDiedError);
    CHECK(lock.is_mine());
    lock.release();
    CHECK(lock.try_lock());
    lock.release();
}

TEST_CASE_TEMPLATE("Process arguments: Condition producer/consumer", Ctx, SYNC_CONTEXTS) {
    constexpr int items = 500;
    mp::Condition cond;
    mp::RawValue<int> available(0), consumed(0), done(0);
    mp::Process c1(Ctx{}, consume_all, cond, available, consumed, done);
    mp::Process c2(Ctx{}, consume_all, cond, available, consumed, done);
    c1.start();
    c2.start();
    for (int i = 0; i < items; ++i) {
        std::lock_guard<mp::Condition> g(cond);
        available.set(available.get() + 1);
        cond.notify();
    }
    {
        std::lock_guard<mp::Condition> g(cond);
        done.set(1);
        cond.notify_all();
    }
    CHECK(c1.result(30s) == 0);
    CHECK(c2.result(30s) == 0);
    CHECK(consumed.get() == items);
}

TEST_CASE_TEMPLATE("Process arguments: Barrier with an action that runs in whichever process arrives last", Ctx,
                   SYNC_CONTEXTS) {
    constexpr int cycles = 10;
    mp::RawValue<int> runs(0);
    mp::Barrier b(3, &count_action);
    mp::Process p1(Ctx{}, barrier_party, b, runs, cycles);
    mp::Process p2(Ctx{}, barrier_party, b, runs, cycles);
    p1.start();
    p2.start();
    int mine = barrier_party(b, runs, cycles);
    int total = mine + p1.result(30s) + p2.result(30s);
    CHECK(total == cycles * (0 + 1 + 2));
    CHECK(runs.get() == cycles);  // the action's address was found again in spawned children
}
