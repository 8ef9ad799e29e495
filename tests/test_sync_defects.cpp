// Defects of issue 8 in synchronization and the codec, each as the issue
// describes it, under every context a Process can start in.
#include <doctest/doctest.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <thread>
#include <vector>

#include "fork_helpers.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;

#define ALL_CONTEXTS mp::SpawnContext, mp::ForkContext, mp::ForkServerContext

namespace {
void hold_lock_and_return(mp::Lock l) { l.acquire(); }
void hold_rlock_and_return(mp::RLock l) {
    l.acquire();
    l.acquire();
}
void hold_condition_and_return(mp::Condition c) { c.acquire(); }
void hold_value_lock_and_return(mp::Value<long> v) { v.get_lock().acquire(); }
}  // namespace

// ============================================================================ defect 3

TEST_CASE_TEMPLATE("defect 3: a target that returns holding a lock leaves it to the next acquirer, who is told",
                   Ctx, ALL_CONTEXTS) {
    mp::Lock lock;
    mp::Process p(Ctx{}, hold_lock_and_return, lock);
    p.start();
    p.join();
    CHECK(p.exitcode() == 0);
    // The guard only ends the test if the defect is back (the acquire would hang).
    REQUIRE(lock.acquire_checked(20s) == mp::LockStatus::owner_died);
    lock.release();
    CHECK(lock.try_lock());
    lock.release();

    mp::RLock rlock;
    mp::Process r(Ctx{}, hold_rlock_and_return, rlock);
    r.start();
    r.join();
    REQUIRE(rlock.acquire_checked(20s) == mp::LockStatus::owner_died);
    CHECK(rlock.depth() == 1);
    rlock.release();

    mp::Condition cond;
    mp::Process c(Ctx{}, hold_condition_and_return, cond);
    c.start();
    c.join();
    CHECK_THROWS_AS(cond.acquire(20s), mp::OwnerDiedError);
    cond.release();

    mp::Value<long> value(7);
    mp::Process v(Ctx{}, hold_value_lock_and_return, value);
    v.start();
    v.join();
    REQUIRE(value.get_lock().acquire_checked(20s) == mp::LockStatus::owner_died);
    value.get_lock().release();
}

TEST_CASE("defect 3: a thread that ends holding a lock through its own handle; the next acquirer is told") {
    mp::Lock lock;
    mp::Encoder e;
    e.write(lock);
    const std::string bytes = e.bytes();
    const std::vector<mp::detail::os::handle_t> handles = e.handles();
    std::thread t([&] {
        // A handle of its own (its own mapping), gone before the thread ends.
        mp::Decoder d(bytes, &handles);
        mp::Lock mine = d.read<mp::Lock>();
        mine.acquire();
    });
    t.join();
    REQUIRE(lock.acquire_checked(20s) == mp::LockStatus::owner_died);
    lock.release();
    CHECK(lock.try_lock());
    lock.release();
}

// ============================================================================ defect 4

namespace {
unsigned wait_at_barrier(mp::Barrier b) { return b.wait(); }

template <class Ctx>
void kill_the_waiting_party(mp::Barrier& b) {
    mp::Process p(Ctx{}, wait_at_barrier, b);
    p.start();
    REQUIRE(forktest::await([&] { return b.n_waiting() == 1; }));
    p.kill();
    CHECK_THROWS_AS(p.join(), mp::ProcessError);
}
}  // namespace

TEST_CASE_TEMPLATE("defect 4: a party that dies while waiting breaks the barrier for the next arrivals", Ctx,
                   ALL_CONTEXTS) {
    SUBCASE("Barrier(2): the one other arrival is told") {
        mp::Barrier b(2);
        kill_the_waiting_party<Ctx>(b);
        CHECK_THROWS_AS(b.wait(20s), mp::BrokenBarrierError);
        CHECK(b.broken());
        CHECK_THROWS_AS(b.wait(20s), mp::BrokenBarrierError);  // later waiters too
        b.reset();
        std::thread other([&] { b.wait(20s); });
        CHECK(b.wait(20s) < 2u);
        other.join();
    }
    SUBCASE("Barrier(3): both later arrivals are told, however quickly they come") {
        mp::Barrier b(3);
        kill_the_waiting_party<Ctx>(b);
        bool other_broken = false;
        std::thread other([&] {
            try {
                b.wait(20s);
            } catch (const mp::BrokenBarrierError&) {
                other_broken = true;
            }
        });
        REQUIRE(forktest::await([&] { return b.n_waiting() == 2 || b.broken(); }));
        CHECK_THROWS_AS(b.wait(20s), mp::BrokenBarrierError);
        other.join();
        CHECK(other_broken);
        b.reset();
        std::thread t1([&] { b.wait(20s); });
        std::thread t2([&] { b.wait(20s); });
        CHECK(b.wait(20s) < 3u);
        t1.join();
        t2.join();
    }
}

// ============================================================================ defect 6

namespace {
/// Says it started, waits for `go`, then waits once on `cond`; returns whether
/// that wait said it was notified (1) or timed out (0).
int wait_once(mp::Condition cond, mp::Semaphore started, mp::Event go, mp::RawValue<int> registered) {
    started.release();
    if (!go.wait(30s)) return 2;
    std::unique_lock<mp::Condition> g(cond);
    registered.set(registered.get() + 1);
    return cond.wait(2s) ? 1 : 0;
}

template <class Ctx>
int notified_of_three(int n) {
    mp::Condition cond;
    mp::Semaphore started(0);
    mp::Event go;
    mp::RawValue<int> registered(0);
    std::vector<mp::Process<int>> waiters;
    for (int i = 0; i < 3; ++i) waiters.emplace_back(Ctx{}, wait_once, cond, started, go, registered);
    for (auto& w : waiters) w.start();
    for (int i = 0; i < 3; ++i) REQUIRE(started.acquire(30s));
    go.set();
    // All three inside wait(): they registered under the lock before releasing it.
    REQUIRE(forktest::await([&] {
        std::lock_guard<mp::Condition> g(cond);
        if (registered.get() < 3) return false;
        cond.notify(n);
        return true;
    }));
    int notified = 0;
    for (auto& w : waiters) {
        int r = w.result(30s);
        CHECK(r != 2);
        notified += r;
    }
    return notified;
}
}  // namespace

TEST_CASE_TEMPLATE("defect 6: notify(n) wakes at most n of three waiting processes; the others time out", Ctx,
                   ALL_CONTEXTS) {
    CHECK(notified_of_three<Ctx>(1) == 1);
    CHECK(notified_of_three<Ctx>(2) == 2);
}

TEST_CASE("defect 6: a waiter that arrives after a notify does not take it; notify with nobody waiting is lost") {
    mp::Condition cond;
    {
        std::lock_guard<mp::Condition> g(cond);
        cond.notify();  // nobody waits: nothing to hand out
        CHECK_FALSE(cond.wait(50ms));
    }
}

// ============================================================================ defect 7

TEST_CASE("defect 7: try_lock and timed acquires of a Lock the caller holds return false, after the timeout") {
    mp::Lock lock;
    lock.acquire();
    CHECK_FALSE(lock.try_lock());
    CHECK_FALSE(lock.acquire(0ms));
    CHECK(lock.acquire_checked(0ms) == mp::LockStatus::timed_out);
    auto start = std::chrono::steady_clock::now();
    CHECK_FALSE(lock.acquire(100ms));
    CHECK(std::chrono::steady_clock::now() - start >= 100ms);  // a lower bound: never too early
    CHECK_FALSE(lock.try_lock_for(10ms));
    CHECK(lock.is_mine());
    CHECK_THROWS_AS(lock.acquire(), mp::InvalidStateError);  // a certain deadlock
    lock.release();
    CHECK(lock.try_lock());
    lock.release();

    mp::Condition over_lock{mp::Lock()};
    over_lock.acquire();
    CHECK_FALSE(over_lock.try_lock());
    CHECK_FALSE(over_lock.acquire(10ms));
    over_lock.release();
}

// ============================================================================ defect 11

namespace {
struct WithBool {
    int a;
    bool flag;
    double d;
};
struct WithNested {
    WithBool inner[2];
    char c;
};
}  // namespace

TEST_CASE("defect 11: a bytewise struct's bool fields are checked; a bad byte is a DecodeError") {
    std::string bytes = mp::encode(WithBool{1, true, 2.5});
    REQUIRE(bytes.size() == sizeof(WithBool));  // a bytewise struct travels as its bytes
    auto back = mp::decode<WithBool>(bytes);
    CHECK(back.a == 1);
    CHECK(back.flag);
    CHECK(back.d == 2.5);
    for (int bad : {2, 0x7f, 0xff}) {
        bytes[offsetof(WithBool, flag)] = char(bad);
        CHECK_THROWS_AS(mp::decode<WithBool>(bytes), mp::DecodeError);
    }
    bytes[offsetof(WithBool, flag)] = 0;
    CHECK_FALSE(mp::decode<WithBool>(bytes).flag);

    // In a container (no longer one unchecked block) and nested in arrays of structs.
    std::string vb = mp::encode(std::vector<WithBool>{{1, true, 0}, {2, false, 0}});
    const std::size_t second_flag = vb.size() - sizeof(WithBool) + offsetof(WithBool, flag);
    vb[second_flag] = char(2);
    CHECK_THROWS_AS(mp::decode<std::vector<WithBool>>(vb), mp::DecodeError);
    vb[second_flag] = 1;
    CHECK(mp::decode<std::vector<WithBool>>(vb)[1].flag);

    WithNested n{};
    n.inner[1].flag = true;
    std::string nb = mp::encode(n);
    REQUIRE(nb.size() == sizeof(WithNested));
    const std::size_t nested_flag = offsetof(WithNested, inner) + sizeof(WithBool) + offsetof(WithBool, flag);
    CHECK(mp::decode<WithNested>(nb).inner[1].flag);
    nb[nested_flag] = char(0x80);
    CHECK_THROWS_AS(mp::decode<WithNested>(nb), mp::DecodeError);

    std::string ab = mp::encode(std::array<WithBool, 2>{});
    ab[offsetof(WithBool, flag)] = char(3);
    CHECK_THROWS_AS((mp::decode<std::array<WithBool, 2>>(ab)), mp::DecodeError);
}
