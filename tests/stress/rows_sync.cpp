// Rows: the synchronization primitives and shared values - holders that end
// while holding, waiters that die or stop while waiting, and parents killed
// while children are blocked.
#include "harness.hpp"

#include <signal.h>

namespace stress {
namespace {

// Slots of the small shared status array every row here uses.
enum Slot : std::size_t {
    progress = 0,  // the child's loop count / "started"
    dirty = 1,     // 1 while inside the critical section
    holding = 2,   // 1 once the child holds the lock
    go = 3,        // set by the parent: the stopped child may finish
    flag = 4,      // a Condition's predicate
    slot_a = 5,    // per-waiter states: 1 waiting, 2 done, 3 timed out, 4 broken
    slot_b = 6,
    slot_c = 7,
    woken = 8,
    slots = 9,
};
using Status = mp::RawArray<long>;

enum class Got { acquired, owner_died, timed_out };

/// Acquire with a guard, OwnerDiedError turned into a status.
template <class L>
Got acquire_guarded(L& l, milliseconds timeout = guard) {
    try {
        return l.acquire(timeout) ? Got::acquired : Got::timed_out;
    } catch (const mp::OwnerDiedError&) {
        return Got::owner_died;
    }
}

// ---------------------------------------------------------------- holders

/// The objects a holder row covers: a lock, and how to mark its protected state.
struct LockObj {
    using T = mp::Lock;
    static T make() { return T(); }
    static mp::Lock& lock(T& t) { return t; }
    static void write(T&, long) {}
    static bool consistent(T&) { return true; }
    static constexpr int depth = 1;
};
struct RLockObj {
    using T = mp::RLock;
    static T make() { return T(); }
    static mp::RLock& lock(T& t) { return t; }
    static void write(T&, long) {}
    static bool consistent(T&) { return true; }
    static constexpr int depth = 2;  // held recursively
};
struct ValueObj {
    using T = mp::Value<long>;
    static T make() { return T(0); }
    static mp::RLock& lock(T& t) { return t.get_lock(); }
    static void write(T& t, long k) { t.get_obj() = k; }
    static bool consistent(T&) { return true; }
    static constexpr int depth = 1;
};
struct ArrayObj {
    using T = mp::Array<long>;
    static T make() { return T(64, 0L); }
    static mp::RLock& lock(T& t) { return t.get_lock(); }
    static void write(T& t, long k) {
        for (std::size_t i = 0; i < t.size(); ++i) t[i] = k;
    }
    static bool consistent(T& t) {
        for (std::size_t i = 1; i < t.size(); ++i)
            if (t[i] != t[0]) return false;
        return true;
    }
    static constexpr int depth = 1;
};

template <class O>
int holder_child(typename O::T obj, Status st, int ending) {
    const auto e = static_cast<Ending>(ending);
    auto& l = O::lock(obj);
    if (e == Ending::sigkill) {
        for (long k = 1;; ++k) {
            l.acquire();
            st[dirty] = 1;
            O::write(obj, k);
            st[dirty] = 0;
            l.release();
            st[progress] = k;
        }
    }
    if (e == Ending::parent_killed) {
        st[progress] += 1;  // not atomic, but only "> 0" is read
        l.acquire();        // the parent holds it: blocked here when the parent dies
        return 0;
    }
    for (int i = 0; i < O::depth; ++i) l.acquire();
    st[dirty] = 1;
    O::write(obj, -1);  // half-way through an update
    st[holding] = 1;
    if (e == Ending::sigstop) {
        while (st[go] == 0) std::this_thread::yield();
        st[dirty] = 0;
        O::write(obj, 7);
        for (int i = 0; i < O::depth; ++i) l.release();
        return 0;
    }
    end_child(e);  // returns only for Ending::ret: returning while holding the lock
    return 0;
}

template <class O>
void holder_row(Round& r) {
    const Ending e = r.ending();
    auto obj = O::make();
    auto& l = O::lock(obj);
    Status st(slots, 0L);
    if (e == Ending::parent_killed) {
        l.acquire();
        mp::Process a(r.context(), holder_child<O>, obj, st, static_cast<int>(e));
        mp::Process b(r.context(), holder_child<O>, obj, st, static_cast<int>(e));
        a.start();
        b.start();
        STRESS_KILL_ON_EXIT(a, b);
        if (!await([&] { return st[progress] >= 2; })) return r.hang("the children never started");
        r.random_pause(2000);
        r.ready_to_be_killed();
    }
    mp::Process p(r.context(), holder_child<O>, obj, st, static_cast<int>(e));
    p.start();
    STRESS_KILL_ON_EXIT(p);
    if (e == Ending::sigstop) {
        if (!await([&] { return st[holding] == 1; })) return r.hang("the child never took the lock");
        signal_process(p.pid(), SIGSTOP);
        auto t0 = Clock::now();
        Got g = acquire_guarded(l, milliseconds(100));
        if (g != Got::timed_out) r.wrong("acquire(100ms) of a lock held by a stopped process did not time out");
        if (Clock::now() - t0 > milliseconds(100) + late_slack) r.wrong("acquire(100ms) returned late");
        if (g != Got::timed_out) l.release();
        signal_process(p.pid(), SIGCONT);
        st[go] = 1;
        if (acquire_guarded(l) != Got::acquired) return r.hang("the lock did not come back after SIGCONT");
        if (!O::consistent(obj)) r.wrong("the protected state is inconsistent after a clean release");
        l.release();
        check_ending(r, p, Ending::ret, 0, "the continued holder");
        return;
    }
    if (e == Ending::sigkill) {
        if (!await([&] { return st[progress] > 0; })) return r.hang("the child never started its loop");
        r.random_pause(5000);
        p.kill();
    }
    check_ending(r, p, e, 0, "the holder");
    switch (acquire_guarded(l)) {
        case Got::timed_out:
            return r.hang("acquire() timed out: the lock is still held by a process that ended");
        case Got::acquired:
            if (e != Ending::sigkill)
                r.wrong("acquired without OwnerDiedError although the holder ended holding the lock");
            else if (st[dirty] == 1)
                r.wrong("acquired without OwnerDiedError while the dead holder was inside its critical section");
            else if (!O::consistent(obj))
                r.wrong("acquired normally, but the protected state is torn");
            break;
        case Got::owner_died:
            O::write(obj, 0);  // the repair
            break;
    }
    l.release();
    // Never poisoned: the next acquire is an ordinary one.
    Got again = acquire_guarded(l);
    if (again != Got::acquired) r.wrong("the lock is poisoned after its dead owner was reported");
    if (again != Got::timed_out) l.release();
}

#define HOLDER_ROWS(object, O)                            \
    ROW(object, Ending::ret, holder_row<O>);              \
    ROW(object, Ending::thrw, holder_row<O>);             \
    ROW(object, Ending::exit_n, holder_row<O>);           \
    ROW(object, Ending::abrt, holder_row<O>);             \
    ROW(object, Ending::segv, holder_row<O>);             \
    ROW(object, Ending::sigkill, holder_row<O>);          \
    ROW(object, Ending::sigstop, holder_row<O>);          \
    ROW(object, Ending::parent_killed, holder_row<O>)

HOLDER_ROWS("Lock holder", LockObj);
HOLDER_ROWS("RLock holder", RLockObj);
HOLDER_ROWS("Value lock holder", ValueObj);
HOLDER_ROWS("Array writer", ArrayObj);

// ---------------------------------------------------------------- waiters

/// A waiter blocks in the primitive's wait; the parent "frees" it later.
struct LockWait {
    using T = mp::Lock;
    static T make() { return T(); }
    static void block_others(T& t) { t.acquire(); }
    static void free_one(T& t) { t.release(); }
    static void free_again(T&) {}  // the first waiter passes the lock on
    static void wait(T& t, Status&) {
        if (t.acquire(2 * guard)) t.release();
    }
};
struct RLockWait : LockWait {
    using T = mp::RLock;
    static T make() { return T(); }
    static void block_others(T& t) { t.acquire(); }
    static void free_one(T& t) { t.release(); }
    static void free_again(T&) {}
    static void wait(T& t, Status&) {
        if (!t.acquire(2 * guard)) return;
        t.acquire();
        t.release();
        t.release();
    }
};
struct SemaphoreWait {
    using T = mp::Semaphore;
    static T make() { return T(0); }
    static void block_others(T&) {}
    static void free_one(T& t) { t.release(); }
    static void free_again(T& t) { t.release(); }
    static void wait(T& t, Status&) { t.acquire(2 * guard); }
};
struct BoundedSemaphoreWait {
    using T = mp::BoundedSemaphore;
    static T make() {
        T t(2);
        t.acquire();
        t.acquire();
        return t;
    }
    static void block_others(T&) {}
    static void free_one(T& t) { t.release(); }
    static void free_again(T& t) { t.release(); }
    static void wait(T& t, Status&) { t.acquire(2 * guard); }
};
struct EventWait {
    using T = mp::Event;
    static T make() { return T(); }
    static void block_others(T&) {}
    static void free_one(T& t) { t.set(); }
    static void free_again(T&) {}
    static void wait(T& t, Status&) { t.wait(2 * guard); }
};
struct ConditionWait {
    using T = mp::Condition;
    static T make() { return T(); }
    static void block_others(T&) {}
    static void free_one(T& t) {
        t.acquire();
        t.notify_all();
        t.release();
    }
    static void free_again(T& t) { free_one(t); }
    static void wait(T& t, Status& st) {
        t.acquire();
        t.wait_for([&] { return st[flag] == 1; }, 2 * guard);
        t.release();
    }
};

template <class W>
int waiter_child(typename W::T obj, Status st, int slot) {
    st[static_cast<std::size_t>(slot)] = 1;
    W::wait(obj, st);
    st[static_cast<std::size_t>(slot)] = 2;
    return 0;
}

template <class W>
void waiter_row(Round& r) {
    const Ending e = r.ending();
    auto obj = W::make();
    Status st(slots, 0L);
    W::block_others(obj);
    mp::Process a(r.context(), waiter_child<W>, obj, st, static_cast<int>(slot_a));
    mp::Process b(r.context(), waiter_child<W>, obj, st, static_cast<int>(slot_b));
    a.start();
    b.start();
    STRESS_KILL_ON_EXIT(a, b);
    if (!await([&] { return st[slot_a] >= 1 && st[slot_b] >= 1; })) return r.hang("the waiters never started");
    r.random_pause(3000);  // both are (or are about to be) asleep in the wait
    if (e == Ending::parent_killed) r.ready_to_be_killed();
    st[flag] = 1;
    if (e == Ending::sigkill) {
        a.kill();
        check_ending(r, a, Ending::sigkill, 0, "the killed waiter");
        W::free_one(obj);
        if (!await([&] { return st[slot_b] == 2; }))
            return r.hang("a live waiter never woke after another waiter was killed and the object freed");
        check_ending(r, b, Ending::ret, 0, "the live waiter");
    } else {  // sigstop
        signal_process(a.pid(), SIGSTOP);
        W::free_one(obj);
        if (!await([&] { return st[slot_b] == 2; }))
            return r.hang("a live waiter never woke while another waiter was stopped");
        signal_process(a.pid(), SIGCONT);
        W::free_again(obj);  // for primitives that hand out one wake-up per free
        if (!await([&] { return st[slot_a] == 2; })) return r.hang("the continued waiter never woke");
        check_ending(r, a, Ending::ret, 0, "the continued waiter");
        check_ending(r, b, Ending::ret, 0, "the other waiter");
    }
}

#define WAITER_ROWS(object, W)                    \
    ROW(object, Ending::sigkill, waiter_row<W>);  \
    ROW(object, Ending::sigstop, waiter_row<W>);  \
    ROW(object, Ending::parent_killed, waiter_row<W>)

WAITER_ROWS("Lock waiter", LockWait);
WAITER_ROWS("RLock waiter", RLockWait);
WAITER_ROWS("Condition waiter", ConditionWait);
WAITER_ROWS("Semaphore waiter", SemaphoreWait);
WAITER_ROWS("BoundedSemaphore waiter", BoundedSemaphoreWait);
WAITER_ROWS("Event waiter", EventWait);

// ---------------------------------------------------------------- Condition: the notifier ends holding the lock

int notifier_child(mp::Condition c, Status st, int ending) {
    const auto e = static_cast<Ending>(ending);
    c.acquire();
    st[flag] = 1;
    c.notify_all();
    st[holding] = 1;
    if (e == Ending::sigkill) for (;;) std::this_thread::yield();  // killed holding the lock
    end_child(e);
    return 0;
}

void notifier_row(Round& r) {
    const Ending e = r.ending();
    mp::Condition c;
    Status st(slots, 0L);
    std::atomic<int> waiter_saw{0};  // 1 woke with the predicate, 2 owner died, 3 timed out, 4 other
    std::thread waiter([&] {
        try {
            c.acquire();
            st[slot_a] = 1;  // under the lock: once the child has the lock, this thread is inside wait_for
            bool ok = c.wait_for([&] { return st[flag] == 1; }, guard);
            waiter_saw = ok ? 1 : 3;
        } catch (const mp::OwnerDiedError&) {
            waiter_saw = 2;
        } catch (...) {
            waiter_saw = 4;
            return;
        }
        c.release();
    });
    if (!await([&] { return st[slot_a] == 1; })) {
        waiter.join();
        return r.hang("the waiter never waited");
    }
    mp::Process p(r.context(), notifier_child, c, st, static_cast<int>(e));
    p.start();
    STRESS_KILL_ON_EXIT(p);
    if (e == Ending::sigkill) {
        if (!await([&] { return st[holding] == 1; })) {
            p.kill();
            waiter.join();
            return r.hang("the notifier never took the lock");
        }
        r.random_pause(2000);
        p.kill();
    }
    check_ending(r, p, e, 0, "the notifier");
    waiter.join();
    if (waiter_saw == 3) return r.hang("the waiter did not wake after its notifier died holding the lock");
    if (waiter_saw == 4) return r.wrong("the waiter got an unexpected exception");
    if (waiter_saw == 1) r.wrong("the waiter re-acquired the lock of a dead notifier without OwnerDiedError");
    if (acquire_guarded(c) != Got::acquired) return r.wrong("the Condition's lock is not free after the repair");
    c.release();
}

ROW("Condition notifier", Ending::ret, notifier_row, Setup::none, 10);
ROW("Condition notifier", Ending::thrw, notifier_row, Setup::none, 10);
ROW("Condition notifier", Ending::exit_n, notifier_row, Setup::none, 10);
ROW("Condition notifier", Ending::abrt, notifier_row, Setup::none, 10);
ROW("Condition notifier", Ending::segv, notifier_row, Setup::none, 10);
ROW("Condition notifier", Ending::sigkill, notifier_row, Setup::none, 10);

// ---------------------------------------------------------------- Semaphore: holders that end with a token

int semaphore_holder(mp::Semaphore s, Status st, int ending) {
    const auto e = static_cast<Ending>(ending);
    if (e == Ending::sigkill) {
        for (long k = 1;; ++k) {
            s.acquire();
            s.release();
            st[progress] = k;
        }
    }
    s.acquire();
    st[holding] = 1;
    end_child(e);
    return 0;
}

void semaphore_holder_row(Round& r) {
    const Ending e = r.ending();
    mp::Semaphore s(2);
    Status st(slots, 0L);
    mp::Process p(r.context(), semaphore_holder, s, st, static_cast<int>(e));
    p.start();
    STRESS_KILL_ON_EXIT(p);
    if (e == Ending::sigkill) {
        if (!await([&] { return st[progress] > 0; })) return r.hang("the child never started its loop");
        r.random_pause(5000);
        p.kill();
    }
    check_ending(r, p, e, 0, "the holder");
    // A semaphore has no owner: a dead holder's token is gone (as in
    // Python), the other one must still be there and nothing may block.
    if (!s.acquire(guard)) return r.hang("the token the dead holder did not take is not available");
    s.release();
    const unsigned v = s.get_value();
    if (e != Ending::sigkill && v != 1) r.wrong("value " + std::to_string(v) + " after the holder died, expected 1");
    if (e == Ending::sigkill && (v < 1 || v > 2)) r.wrong("value " + std::to_string(v) + " after the holder died");
}

ROW("Semaphore holder", Ending::ret, semaphore_holder_row);
ROW("Semaphore holder", Ending::exit_n, semaphore_holder_row);
ROW("Semaphore holder", Ending::segv, semaphore_holder_row);
ROW("Semaphore holder", Ending::sigkill, semaphore_holder_row);

// ---------------------------------------------------------------- Barrier

int barrier_party(mp::Barrier b, Status st, int slot) {
    st[static_cast<std::size_t>(slot)] = 1;
    try {
        b.wait(guard);
        st[static_cast<std::size_t>(slot)] = 2;
    } catch (const mp::BrokenBarrierError&) {
        st[static_cast<std::size_t>(slot)] = 4;
    }
    return 0;
}

ROW("Barrier waiter", Ending::sigkill, [](Round& r) {
    // Barrier(3): one party arrives and is killed while waiting; the two
    // that arrive next must not pass a cycle one live party short.
    mp::Barrier b(3);
    Status st(slots, 0L);
    mp::Process a(r.context(), barrier_party, b, st, static_cast<int>(slot_a));
    a.start();
    STRESS_KILL_ON_EXIT(a);
    if (!await([&] { return st[slot_a] == 1 && b.n_waiting() == 1; })) return r.hang("the party never arrived");
    r.random_pause(2000);
    a.kill();
    check_ending(r, a, Ending::sigkill, 0, "the killed party");
    mp::Process c(r.context(), barrier_party, b, st, static_cast<int>(slot_b));
    c.start();
    auto t0 = Clock::now();
    bool passed = false, broken = false;
    try {
        b.wait(guard);
        passed = true;
    } catch (const mp::BrokenBarrierError&) {
        broken = true;
    }
    check_ending(r, c, Ending::ret, 0, "the other party");
    if (passed || st[slot_b] == 2) return r.wrong("two live parties passed a Barrier(3) whose third party died waiting");
    if (broken && Clock::now() - t0 >= guard - milliseconds(200))
        r.wrong("the barrier broke only by the waiters' timeout, not by the party's death");
});

ROW("Barrier waiter", Ending::sigstop, [](Round& r) {
    // A party stopped before it arrives: the others' timed wait still ends.
    mp::Barrier b(2);
    Status st(slots, 0L);
    mp::Process a(r.context(), barrier_party, b, st, static_cast<int>(slot_a));
    a.start();
    signal_process(a.pid(), SIGSTOP);
    auto t0 = Clock::now();
    try {
        b.wait(milliseconds(100));
        if (st[slot_a] != 1) r.wrong("wait(100ms) passed while the other party was stopped");
    } catch (const mp::BrokenBarrierError&) {
        if (Clock::now() - t0 > milliseconds(100) + late_slack) r.wrong("wait(100ms) returned late");
    }
    signal_process(a.pid(), SIGCONT);
    check_ending(r, a, Ending::ret, 0, "the continued party");
});

ROW("Barrier waiter", Ending::parent_killed, [](Round& r) {
    mp::Barrier b(3);
    Status st(slots, 0L);
    mp::Process a(r.context(), barrier_party, b, st, static_cast<int>(slot_a));
    mp::Process c(r.context(), barrier_party, b, st, static_cast<int>(slot_b));
    a.start();
    c.start();
    STRESS_KILL_ON_EXIT(a, c);
    if (!await([&] { return b.n_waiting() == 2; })) return r.hang("the parties never arrived");
    r.ready_to_be_killed();
});

// ---------------------------------------------------------------- issue 8 #6 and #7

int counted_waiter(mp::Condition c, Status st, int slot) {
    c.acquire();
    st[static_cast<std::size_t>(slot)] = 1;
    if (c.wait(guard)) st[woken] += 1;  // under the lock
    c.release();
    return 0;
}

ROW("Condition notify(1) of 3 waiters", Ending::none, [](Round& r) {
    mp::Condition c;
    Status st(slots, 0L);
    std::vector<mp::Process<int>> ps;
    ps.reserve(3);
    for (std::size_t s : {slot_a, slot_b, slot_c}) ps.emplace_back(r.context(), counted_waiter, c, st, static_cast<int>(s));
    for (auto& p : ps) p.start();
    STRESS_KILL_ON_EXIT(ps[0], ps[1], ps[2]);
    if (!await([&] { return st[slot_a] == 1 && st[slot_b] == 1 && st[slot_c] == 1; }))
        return r.hang("the waiters never started");
    c.acquire();  // all three set their slot under the lock: they are inside wait() now
    c.notify(1);
    c.release();
    if (!await([&] { return st[woken] >= 1; })) r.hang("notify(1) woke nobody");
    // "At most one" can only be watched for a while: 300 ms is far longer than a wake-up.
    std::this_thread::sleep_for(milliseconds(300));
    c.acquire();
    long n = st[woken];
    c.notify_all();
    c.release();
    if (n > 1) r.wrong("notify(1) woke " + std::to_string(n) + " of 3 waiters");
    for (auto& p : ps) check_ending(r, p, Ending::ret, 0, "a waiter");
});

ROW("Lock try_lock of own lock", Ending::none, [](Round& r) {
    mp::Lock l;
    l.acquire();
    try {
        if (l.try_lock()) r.wrong("try_lock() of a held Lock succeeded");
        if (l.acquire(milliseconds(0))) r.wrong("acquire(0ms) of a held Lock succeeded");
        auto t0 = Clock::now();
        if (l.acquire(milliseconds(50))) r.wrong("acquire(50ms) of a held Lock succeeded");
        if (Clock::now() - t0 < milliseconds(45)) r.wrong("acquire(50ms) of one's own Lock returned before its timeout");
    } catch (const std::exception& e) {
        r.wrong(std::string("a non-blocking or timed acquire of one's own Lock threw: ") + e.what());
    }
    l.release();
});

}  // namespace
}  // namespace stress
