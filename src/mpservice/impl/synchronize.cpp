// synchronize: Lock, RLock, Condition, Semaphore, Event, Barrier.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <string>

// Helpers live in detail::sync_impl: every implementation part shares one
// translation unit, so file-local names must not collide with other parts'.
namespace mpservice::detail {

// ---------------------------------------------------------------- thread identity

namespace sync_impl {
// fork() copies the forking thread's cache into the child's only thread, which
// is a different thread: it must not look like the parent's owner of a lock.
void drop_pending_wakes() noexcept;
void forget_thread_token() {
    t_thread_token = 0;
    drop_pending_wakes();
}

std::uint64_t mix64(std::uint64_t x) noexcept {  // splitmix64 finalizer
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

bool expired(os::Deadline deadline) noexcept {
    return deadline != os::no_deadline && os::Clock::now() >= deadline;
}
}  // namespace sync_impl

std::uint64_t new_thread_token() noexcept {
    using namespace sync_impl;
    static const bool fork_hook = [] {
        try {
            os::at_fork_child(&forget_thread_token);
        } catch (...) {
            // Without the hook a forked child could pass for its parent's thread; that
            // needs pthread_atfork to fail (ENOMEM), which leaves bigger problems.
        }
        return true;
    }();
    (void)fork_hook;
    static std::atomic<std::uint64_t> counter{0};
    // The tid is unique among live threads, the time and counter make the token
    // differ from the one of any earlier thread that had the same tid.
    std::uint64_t t = mix64(static_cast<std::uint64_t>(os::current_tid()) ^
                            (static_cast<std::uint64_t>(os::current_pid()) << 32));
    t = mix64(t ^ static_cast<std::uint64_t>(os::Clock::now().time_since_epoch().count()));
    t = mix64(t ^ counter.fetch_add(1, std::memory_order_relaxed));
    return t ? t : 1;
}

// ---------------------------------------------------------------- deferred Condition wakes

namespace sync_impl {
/// Wakes the sleepers of a Condition, if it has any.
void wake_sleepers(ConditionState* cs, int n) noexcept {
    // Pairs with the waiter's sleepers increment before its last look at the
    // counter: either it saw the bump, or we see it sleeping.  A sleeper that
    // left meanwhile (spurious or periodic wake-up) saw the bump on its way out.
    if (cs->sleepers.load(std::memory_order_seq_cst) != 0) {
        os::futex_wake(&cs->sequence, n);
        t_woke_a_sleeper = true;
    }
}

/// The wakes the calling thread owes: Conditions it notified under a lock it
/// still holds.  The lock's release makes them (see condition_notify).
class PendingWakes {
public:
    /// Records n wakes of `c` for the release of `lock`; false if there is no
    /// room (the caller then wakes at once).  Allocates nothing.
    bool add(LockState* lock, const SharedRef<ConditionState>& c, int n) noexcept {
        for (int i = 0; i < size_; ++i) {
            Entry& e = entries_[i];
            if (e.lock == lock && e.condition.get() == c.get()) {
                e.count = e.count > INT_MAX - n ? INT_MAX : e.count + n;
                return true;
            }
        }
        if (size_ == capacity) return false;
        entries_[size_++] = Entry{lock, c, n};
        return true;
    }
    /// Makes the wakes recorded for `lock` (just released).
    void flush(const LockState* lock) noexcept {
        for (int i = 0; i < size_;) {
            Entry& e = entries_[i];
            if (e.lock != lock) {
                ++i;
                continue;
            }
            wake_sleepers(e.condition.get(), e.count);
            if (i != --size_) e = std::move(entries_[size_]);
            entries_[size_] = Entry{};
        }
    }
    /// Forgets everything (a forked child: the wakes are its parent's to make).
    void drop() noexcept {
        for (int i = 0; i < size_; ++i) entries_[i] = Entry{};
        size_ = 0;
    }
    /// A thread that ends holding the lock wakes the sleepers now: the lock
    /// passes to the next acquirer as a dead owner's, which the sleepers can
    /// then take and learn about.
    /// (At thread exit, after the thread's thread_local storage is gone on
    /// some platforms: only the futex wake of wake_sleepers, not its note.)
    ~PendingWakes() {
        for (int i = 0; i < size_; ++i) {
            ConditionState* cs = entries_[i].condition.get();
            if (cs->sleepers.load(std::memory_order_seq_cst) != 0) os::futex_wake(&cs->sequence, entries_[i].count);
        }
    }

private:
    /// A thread rarely holds more than one notified Condition's lock at a time.
    static constexpr int capacity = 4;
    struct Entry {
        LockState* lock = nullptr;
        SharedRef<ConditionState> condition;  // keeps the futex word mapped until the wake
        int count = 0;
    };
    Entry entries_[capacity];
    int size_ = 0;
};

/// The calling thread's (os::thread_object, not thread_local: its destructor
/// must run on live storage, see there).
PendingWakes& pending_wakes() { return os::thread_object<PendingWakes>(); }
void drop_pending_wakes() noexcept {
    try {
        pending_wakes().drop();
    } catch (...) {  // none made: nothing to drop
    }
}
}  // namespace sync_impl

// ---------------------------------------------------------------- Lock and RLock

namespace sync_impl {
const char* lock_name(const LockRef& l) { return l.recursive ? "mpservice::RLock" : "mpservice::Lock"; }

LockStatus took(LockState* s, os::LockResult r, std::uint64_t me) {
    switch (r) {
        case os::LockResult::acquired:
            s->owner.store(me, std::memory_order_relaxed);
            s->depth.store(1, std::memory_order_relaxed);
            return LockStatus::acquired;
        case os::LockResult::owner_died:
            s->owner.store(me, std::memory_order_relaxed);
            s->depth.store(1, std::memory_order_relaxed);
            // Only the repair: a wake the dead holder still owed was in its own
            // memory; the sleepers recheck by themselves (condition_wait).
            s->release_work.store(release_repair, std::memory_order_relaxed);
            return LockStatus::owner_died;
        default:
            return LockStatus::timed_out;
    }
}

void require_owner(const LockRef& l, const char* operation) {
    if (!lock_is_mine(l))
        throw InvalidStateError(std::string(lock_name(l)) + "::" + operation +
                                ": the calling thread does not hold the lock");
}

/// Releases every level of the lock; returns the depth to restore.
std::uint32_t release_all(const LockRef& l) {
    std::uint32_t depth = l.state->depth.load(std::memory_order_relaxed);
    l.state->depth.store(1, std::memory_order_relaxed);
    lock_release(l);
    return depth;
}

/// Waits for a lock that someone else holds.
///
/// Spinning pays only when it replaces a sleep, and only when it does not slow
/// the holder.  When two threads take the lock in a stream (release, re-take),
/// a spinner that looks at the lock at every pause pulls its line away from the
/// holder at each re-take and grabs it at each release, so every acquisition
/// becomes a cross-CPU hand-off (3-4x slower than letting the holder re-take
/// it, measured).  So:
///   - the spin looks at doubling intervals (Looks::backing_off): between looks
///     the holder runs at its uncontended speed; a look that finds the lock
///     free tries it, and a lost try (the holder re-took it) spins on;
///   - no spin while a thread sleeps in the kernel for the lock (the mutex
///     word's waiters bit): the sleepers are first in line - we join them, as
///     the robust pthread mutex itself does for every waiter.
LockStatus lock_contended(LockState* s, std::uint64_t me, os::Deadline deadline) {
    os::LockResult r = os::LockResult::busy;
    if (!os::robust_mutex_has_sleepers(&s->mutex)) {
        auto free_and_taken = [&] {
            if (s->owner.load(std::memory_order_relaxed) != 0) return false;
            r = os::robust_mutex_trylock(&s->mutex);
            return r != os::LockResult::busy;
        };
        spin_until(free_and_taken, s->spin_ns, lock_spin, deadline);
    }
    if (r == os::LockResult::busy) r = os::robust_mutex_lock_blocking(&s->mutex, deadline);
    return took(s, r, me);
}

/// Takes the lock again after release_all, with no deadline (as Python does).
LockStatus reacquire(const LockRef& l, std::uint32_t depth) {
    LockState* s = l.state.get();
    const std::uint64_t me = this_thread_token();
    os::LockResult first = os::robust_mutex_trylock(&s->mutex);
    LockStatus r = first == os::LockResult::busy ? lock_contended(s, me, os::no_deadline) : took(s, first, me);
    s->depth.store(depth, std::memory_order_relaxed);
    return r;
}
}  // namespace sync_impl

LockStatus lock_acquire_slow(const LockRef& l, os::Deadline deadline) {
    using namespace sync_impl;
    LockState* s = l.state.get();
    const std::uint64_t me = this_thread_token();
    if (s->owner.load(std::memory_order_relaxed) == me) {
        if (!l.recursive) {
            // Only a wait without end is a certain deadlock.  A bounded one gives
            // up at its deadline, as Python's acquire(timeout) does: nobody else
            // can release the lock meanwhile, so sleeping out the timeout is exact.
            if (deadline == os::no_deadline)
                throw InvalidStateError(
                    "mpservice::Lock::acquire: the calling thread already holds this lock; a Lock is not "
                    "re-entrant (use an RLock), and waiting for it would wait forever");
            os::sleep_until(deadline);
            return LockStatus::timed_out;
        }
        s->depth.store(s->depth.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
        return LockStatus::acquired;
    }
    os::LockResult first = os::robust_mutex_trylock(&s->mutex);
    if (first != os::LockResult::busy || expired(deadline)) return took(s, first, me);
    return lock_contended(s, me, deadline);
}

LockStatus lock_acquire_after_try(const LockRef& l, os::Deadline deadline, int status) {
    using namespace sync_impl;
    LockState* s = l.state.get();
    const std::uint64_t me = this_thread_token();
    os::LockResult first = os::robust_mutex_trylock_result(status);
    // A try that gives up asks the full trylock, which judges the holder (the
    // status path may not have): a holder that died is owner_died, not busy.
    if (first == os::LockResult::busy && expired(deadline)) first = os::robust_mutex_trylock(&s->mutex);
    if (first != os::LockResult::busy || expired(deadline)) return took(s, first, me);
    return lock_contended(s, me, deadline);
}

void lock_release_slow(const LockRef& l) {
    using namespace sync_impl;
    LockState* s = l.state.get();
    require_owner(l, "release");
    if (l.recursive) {
        std::uint32_t depth = s->depth.load(std::memory_order_relaxed);
        if (depth > 1) {
            s->depth.store(depth - 1, std::memory_order_relaxed);
            return;
        }
    }
    const std::uint16_t work = s->release_work.load(std::memory_order_relaxed);
    s->depth.store(0, std::memory_order_relaxed);
    s->owner.store(0, std::memory_order_relaxed);
    if (work) s->release_work.store(0, std::memory_order_relaxed);
    // Released without make_consistent(): the holder has seen the owner-died
    // report and chose to go on.  Marking the mutex consistent keeps it usable;
    // unlocking an inconsistent robust mutex would make it unusable for good.
    if (work & release_repair) os::robust_mutex_consistent(&s->mutex);
    os::robust_mutex_unlock(&s->mutex);
    // After the unlock: the woken waiters' first move is to take the lock.
    if (work & release_wake) pending_wakes().flush(s);
}

void lock_make_consistent(const LockRef& l) {
    using namespace sync_impl;
    LockState* s = l.state.get();
    require_owner(l, "make_consistent");
    const std::uint16_t work = s->release_work.load(std::memory_order_relaxed);
    if (work & release_repair) {
        s->release_work.store(work & ~release_repair, std::memory_order_relaxed);
        os::robust_mutex_consistent(&s->mutex);
    }
}

void throw_owner_died(const LockRef& l) {
    throw OwnerDiedError(std::string(sync_impl::lock_name(l)) +
                         ": the process that held this lock died while holding it. The calling "
                         "thread now holds the lock: repair the state it protects and call "
                         "make_consistent(), or release() it");
}

// ---------------------------------------------------------------- Condition

namespace sync_impl {
/// Sleeps (after a spin) until the notification counter differs from `seen`
/// or the deadline passes; false on the deadline.  Never longer than the
/// recheck period at a time: a notifier that died before releasing the lock
/// bumped the counter but will not wake us.
bool await_notify(ConditionState* cs, std::uint32_t seen, os::Deadline deadline) {
    auto bumped = [&] { return cs->sequence.load(std::memory_order_acquire) != seen; };
    const bool partner_waking = partner_is_waking();
    if (expired(deadline)) return bumped();
    if (spin_for_answer(partner_waking, bumped, cs->spin_ns, cs->after_wake_spin_ns, deadline)) return true;
    for (;;) {
        if (bumped()) return true;
        const auto step = os::sleep_slice_end(
            deadline, std::chrono::milliseconds(condition_recheck_ms.load(std::memory_order_relaxed)));
        if (!os::futex_wait(&cs->sequence, seen, step) && step == deadline) return bumped();
    }
}
}  // namespace sync_impl

bool condition_wait(const SharedRef<ConditionState>& c, const LockRef& l, os::Deadline deadline) {
    using namespace sync_impl;
    if (!lock_is_mine(l))
        throw InvalidStateError("mpservice::Condition::wait: the calling thread must hold the condition's lock");
    ConditionState* cs = c.get();
    // Registered under the lock: a notify, which needs the lock too, either
    // comes before (and is not ours) or sees us among the waiters.
    const std::uint32_t entry = cs->sequence.load(std::memory_order_relaxed);
    cs->sleepers.fetch_add(1, std::memory_order_seq_cst);
    std::uint32_t seen = entry;
    for (;;) {
        const std::uint32_t depth = release_all(l);
        await_notify(cs, seen, deadline);
        const LockStatus taken = reacquire(l, depth);
        // Decided under the lock.  A token is ours if a notify came after we began
        // to wait (the counter moved since `entry`); any such token will do, since
        // every token stands for one waiter of its notify, and all of its waiters
        // that remain are eligible.  A waiter that times out while a token is there
        // takes it: it was notified before it gave up.
        const bool eligible = cs->sequence.load(std::memory_order_relaxed) != entry;
        const std::uint32_t tokens = cs->tokens.load(std::memory_order_relaxed);
        const bool notified = eligible && tokens > 0;
        if (notified || expired(deadline) || taken == LockStatus::owner_died) {
            if (notified) cs->tokens.store(tokens - 1, std::memory_order_relaxed);
            cs->sleepers.fetch_sub(1, std::memory_order_relaxed);
            if (taken == LockStatus::owner_died) condition_lock_owner_died(c, l);
            return notified;
        }
        // Woken (or a periodic recheck) but the tokens went to other waiters: wait
        // for the next notify, still registered.
        seen = cs->sequence.load(std::memory_order_relaxed);
    }
}

void condition_notify(const SharedRef<ConditionState>& c, const LockRef& l, int n) {
    using namespace sync_impl;
    if (!lock_is_mine(l))
        throw InvalidStateError("mpservice::Condition::notify: the calling thread must hold the condition's lock");
    if (n <= 0) return;
    ConditionState* cs = c.get();
    // Waiters not yet notified.  A waiter that died while waiting stays counted
    // and may be handed a token; its token goes to whichever live waiter wakes
    // first, and the count stays exact for the rest, so a dead waiter costs a
    // live one nothing.
    const std::uint32_t waiters = cs->sleepers.load(std::memory_order_relaxed);
    const std::uint32_t tokens = cs->tokens.load(std::memory_order_relaxed);
    if (waiters <= tokens) return;  // nobody left to notify
    const std::uint32_t k = std::min<std::uint32_t>(static_cast<std::uint32_t>(n), waiters - tokens);
    cs->tokens.store(tokens + k, std::memory_order_relaxed);
    cs->sequence.fetch_add(1, std::memory_order_seq_cst);
    // The wake waits for the lock's release: a sleeper woken now would find
    // the lock held and only go to sleep again, on the lock.
    LockState* ls = l.state.get();
    if (pending_wakes().add(ls, c, static_cast<int>(k))) {
        ls->release_work.fetch_or(release_wake, std::memory_order_relaxed);
        return;
    }
    os::futex_wake(&cs->sequence, static_cast<int>(k));
    t_woke_a_sleeper = true;
}

void condition_lock_owner_died(const SharedRef<ConditionState>& c, const LockRef& l) {
    // Sleepers whose notify came before the death find the counter bumped;
    // the others go back to sleep.
    sync_impl::wake_sleepers(c.get(), INT_MAX);
    throw_owner_died(l);
}

// ---------------------------------------------------------------- Semaphore

namespace sync_impl {
bool semaphore_take(SemaphoreState* s) noexcept {
    std::uint32_t v = s->value.load(std::memory_order_seq_cst);
    while (v > 0)
        if (s->value.compare_exchange_weak(v, v - 1, std::memory_order_acquire, std::memory_order_relaxed))
            return true;
    return false;
}

/// A release wakes as many sleepers as it adds tokens.  A woken sleeper that
/// is stopped (SIGSTOP, a debugger) or killed before it takes its token
/// keeps that wake-up from the others, who would sleep on although a token is
/// free.  So nobody sleeps longer than this at a time before looking again.
constexpr auto semaphore_recheck = std::chrono::milliseconds(200);
}  // namespace sync_impl

bool semaphore_acquire(SemaphoreState* s, os::Deadline deadline) {
    using namespace sync_impl;
    const bool partner_waking = partner_is_waking();
    if (semaphore_take(s)) return true;
    if (expired(deadline)) return false;
    auto taken_now = [s] { return semaphore_take(s); };
    if (spin_for_answer(partner_waking, taken_now, s->spin_ns, s->after_wake_spin_ns, deadline)) return true;
    s->sleepers.fetch_add(1, std::memory_order_seq_cst);
    bool taken = false;
    for (;;) {
        if (semaphore_take(s)) {
            taken = true;
            break;
        }
        const os::Deadline step = os::sleep_slice_end(deadline, semaphore_recheck);
        if (!os::futex_wait(&s->value, 0, step) && step == deadline) {
            taken = semaphore_take(s);
            break;
        }
    }
    s->sleepers.fetch_sub(1, std::memory_order_relaxed);
    return taken;
}

void semaphore_release(SemaphoreState* s, unsigned n) {
    if (n == 0) return;
    std::uint32_t v = s->value.load(std::memory_order_relaxed);
    for (;;) {
        std::uint64_t next = std::uint64_t(v) + n;
        if (s->bounded && next > s->limit)
            throw InvalidStateError("mpservice::BoundedSemaphore::release: released too many times (the value " +
                                    std::to_string(v) + " + " + std::to_string(n) +
                                    " would exceed its initial value " + std::to_string(s->limit) + ")");
        if (next > UINT32_MAX)
            throw InvalidStateError("mpservice::Semaphore::release: the value would overflow");
        if (s->value.compare_exchange_weak(v, static_cast<std::uint32_t>(next), std::memory_order_seq_cst,
                                           std::memory_order_relaxed))
            break;
    }
    if (s->sleepers.load(std::memory_order_seq_cst) != 0) {
        os::futex_wake(&s->value, n > unsigned(INT_MAX) ? INT_MAX : static_cast<int>(n));
        t_woke_a_sleeper = true;
    }
}

// ---------------------------------------------------------------- Event

void event_set(EventState* e) {
    std::uint32_t w = e->word.load(std::memory_order_relaxed);
    do {
        if (w & 1u) return;  // already set: whoever set it woke the sleepers
    } while (!e->word.compare_exchange_weak(w, (w + 2u) | 1u, std::memory_order_seq_cst,
                                            std::memory_order_relaxed));
    if (e->sleepers.load(std::memory_order_seq_cst) != 0) {
        os::futex_wake(&e->word, INT_MAX);
        t_woke_a_sleeper = true;
    }
}

bool event_wait(EventState* e, os::Deadline deadline) {
    using namespace sync_impl;
    const bool partner_waking = partner_is_waking();
    const std::uint32_t seen = e->word.load(std::memory_order_acquire);
    if (seen & 1u) return true;
    // From a cleared state the word changes only by a set() (clearing a clear
    // flag leaves it as it is), so any change means the event was set.
    auto changed = [&] { return e->word.load(std::memory_order_acquire) != seen; };
    if (expired(deadline)) return changed();
    if (spin_for_answer(partner_waking, changed, e->spin_ns, e->after_wake_spin_ns, deadline)) return true;
    e->sleepers.fetch_add(1, std::memory_order_seq_cst);
    bool set = false;
    for (;;) {
        if (e->word.load(std::memory_order_seq_cst) != seen) {
            set = true;
            break;
        }
        if (!os::futex_wait(&e->word, seen, deadline)) {
            set = changed();
            break;
        }
    }
    e->sleepers.fetch_sub(1, std::memory_order_relaxed);
    return set;
}

// ---------------------------------------------------------------- Barrier

namespace sync_impl {
/// How often sleepers at a barrier look for parties that died.
constexpr std::chrono::milliseconds barrier_liveness_period{50};
constexpr std::uint32_t barrier_max_parties = 1u << 20;

void end_cycle_locked(BarrierState* b, bool released) {
    std::uint32_t g = b->generation.load(std::memory_order_relaxed);
    std::uint64_t bit = std::uint64_t(1) << (g % 64);
    std::uint64_t bits = b->released_bits.load(std::memory_order_relaxed);
    b->released_bits.store(released ? (bits | bit) : (bits & ~bit), std::memory_order_relaxed);
    b->count.store(0, std::memory_order_relaxed);
    b->generation.store(g + 1, std::memory_order_release);
    os::futex_wake(&b->generation, INT_MAX);
}

void break_locked(BarrierState* b) {
    b->broken.store(1, std::memory_order_release);
    end_cycle_locked(b, false);
}

/// Holds the barrier's own mutex.  Its critical sections are short and ours;
/// if a process died inside one (or inside the action), the state may be half
/// updated, so the barrier is broken - waiters learn of it, reset() repairs it.
class BarrierGuard {
public:
    explicit BarrierGuard(BarrierState* b) : b_(b) {
        if (os::robust_mutex_lock(&b->mutex) == os::LockResult::owner_died) {
            os::robust_mutex_consistent(&b->mutex);
            break_locked(b);
        }
    }
    ~BarrierGuard() { os::robust_mutex_unlock(&b_->mutex); }
    BarrierGuard(const BarrierGuard&) = delete;
    BarrierGuard& operator=(const BarrierGuard&) = delete;

private:
    BarrierState* b_;
};

/// Breaks the barrier if a party that arrived in the current cycle has ended.
void check_parties_locked(BarrierState* b, std::uint32_t generation) {
    if (b->generation.load(std::memory_order_relaxed) != generation) return;
    std::uint32_t n = std::min(b->count.load(std::memory_order_relaxed), b->parties);
    for (std::uint32_t i = 0; i < n; ++i) {
        if (!os::process_running(static_cast<long>(b->pids()[i]))) {
            break_locked(b);
            return;
        }
    }
}

/// Whether one of the first `n` arrivals of the current cycle - another
/// process than ours - has ended.
bool arrived_party_died_locked(BarrierState* b, std::uint32_t n) {
    const std::int64_t me = os::current_pid();
    std::int64_t checked = me;  // parties of one process often arrive in a row
    for (std::uint32_t i = 0; i < n && i < b->parties; ++i) {
        const std::int64_t pid = b->pids()[i];
        if (pid == me || pid == checked) continue;
        if (!os::process_running(static_cast<long>(pid))) return true;
        checked = pid;
    }
    return false;
}

[[noreturn]] void throw_broken() {
    throw BrokenBarrierError(
        "mpservice::Barrier::wait: the barrier is broken (aborted, reset, timed out, its action failed, "
        "or a waiting process died)");
}
}  // namespace sync_impl

}  // namespace mpservice::detail

namespace mpservice {

Lock::Lock() : ref_{detail::SharedRef<detail::LockState>::create_sized(sizeof(detail::LockState)), false} {}

RLock::RLock() : ref_{detail::SharedRef<detail::LockState>::create_sized(sizeof(detail::LockState)), true} {}

namespace detail::sync_impl {
/// A Condition and the RLock it made for itself share one block (one descriptor).
struct ConditionWithLock {
    ConditionState condition;
    LockState lock;
};
}  // namespace detail::sync_impl

Condition::Condition() {
    using Block = detail::sync_impl::ConditionWithLock;
    auto block = detail::SharedRef<Block>::create_sized(sizeof(Block));
    state_ = block.alias(&block->condition);
    lock_ = detail::LockRef{block.alias(&block->lock), true};
}

Condition::Condition(Lock lock)
    : state_(detail::SharedRef<detail::ConditionState>::create_sized(sizeof(detail::ConditionState))),
      lock_(lock.lock_ref()) {}

Condition::Condition(RLock lock)
    : state_(detail::SharedRef<detail::ConditionState>::create_sized(sizeof(detail::ConditionState))),
      lock_(lock.lock_ref()) {}

Semaphore::Semaphore(unsigned value)
    : state_(detail::SharedRef<detail::SemaphoreState>::create_sized(sizeof(detail::SemaphoreState))) {
    state_->value.store(value, std::memory_order_relaxed);
}

Semaphore::Semaphore(unsigned value, unsigned limit) : Semaphore(value) {
    state_->bounded = 1;
    state_->limit = limit;
}

Event::Event() : state_(detail::SharedRef<detail::EventState>::create_sized(sizeof(detail::EventState))) {}

Barrier::Barrier(unsigned parties, Action action, std::int64_t timeout_ns) {
    using namespace detail::sync_impl;
    if (parties == 0) throw std::invalid_argument("mpservice::Barrier: parties must be at least 1");
    if (parties > barrier_max_parties)
        throw std::invalid_argument("mpservice::Barrier: parties must be at most " +
                                    std::to_string(barrier_max_parties));
    detail::os::CodeRef code{};
    // A function's address is the one thing about it that can travel: it is
    // stored as module + offset, valid again after exec.
    if (action) code = detail::os::code_ref_of(reinterpret_cast<const void*>(action));
    state_ = detail::SharedRef<detail::BarrierState>::create_sized(detail::BarrierState::size_for(parties));
    state_->parties = parties;
    state_->default_timeout_ns = timeout_ns;
    state_->action = code;
}

unsigned Barrier::wait() {
    std::int64_t ns = state_->default_timeout_ns;
    return wait_until(ns < 0 ? detail::os::no_deadline : detail::os::deadline_after(std::chrono::nanoseconds(ns)));
}

unsigned Barrier::wait_until(detail::os::Deadline deadline) {
    using namespace detail;
    using namespace detail::sync_impl;
    BarrierState* b = state_.get();
    std::uint32_t generation = 0;
    std::uint32_t index = 0;
    {
        BarrierGuard guard(b);
        if (b->broken.load(std::memory_order_relaxed)) throw_broken();
        generation = b->generation.load(std::memory_order_relaxed);
        index = b->count.load(std::memory_order_relaxed);
        b->pids()[index] = os::current_pid();
        b->count.store(index + 1, std::memory_order_relaxed);
        if (index + 1 == b->parties) {
            // The last arrival completes the cycle only with every party alive: one
            // that died waiting must break it even if nobody slept long enough to
            // notice (Python's barrier breaks when a waiter leaves abnormally).
            if (arrived_party_died_locked(b, index)) {
                break_locked(b);
                throw_broken();
            }
            if (!b->action.empty()) {
                auto fn = reinterpret_cast<Action>(const_cast<void*>(os::code_ref_resolve(b->action)));
                if (!fn) {
                    break_locked(b);
                    throw Error("mpservice::Barrier::wait: the barrier's action is not loaded in this process "
                                "(its module is missing); the barrier is broken");
                }
                try {
                    fn();
                } catch (...) {
                    break_locked(b);
                    throw;
                }
            }
            end_cycle_locked(b, true);
            return index;
        }
    }

    auto ended = [&] { return b->generation.load(std::memory_order_acquire) != generation; };
    if (!spin_until(ended, b->spin_ns)) {
        for (;;) {
            if (ended()) break;
            auto now = os::Clock::now();
            if (now >= deadline) {
                BarrierGuard guard(b);  // a timeout breaks the barrier, as in Python
                if (b->generation.load(std::memory_order_relaxed) == generation) break_locked(b);
                break;
            }
            const auto step = os::sleep_slice_end(deadline, barrier_liveness_period);
            if (!os::futex_wait(&b->generation, generation, step) && step != deadline && !ended()) {
                BarrierGuard guard(b);
                check_parties_locked(b, generation);
            }
        }
    }
    // Cycle `generation` is over: released or broken?  Its bit is only reused
    // 64 cycles later, which cannot complete without this party... unless
    // others keep resetting or breaking it 64 times before we look.
    std::uint64_t bits = b->released_bits.load(std::memory_order_acquire);
    if (bits & (std::uint64_t(1) << (generation % 64))) return index;
    throw_broken();
}

void Barrier::reset() {
    using namespace detail::sync_impl;
    BarrierGuard guard(state_.get());
    end_cycle_locked(state_.get(), false);  // current waiters: BrokenBarrierError
    state_->broken.store(0, std::memory_order_release);
}

void Barrier::abort() {
    using namespace detail::sync_impl;
    BarrierGuard guard(state_.get());
    break_locked(state_.get());
}

// ---------------------------------------------------------------- codecs of the primitives

void Codec<Lock>::encode(Encoder& e, const Lock& l) { detail::encode_ref(e, l.lock_ref().state); }
Lock Codec<Lock>::decode(Decoder& d) { return Lock(detail::decode_ref<detail::LockState>(d)); }

void Codec<RLock>::encode(Encoder& e, const RLock& l) { detail::encode_ref(e, l.lock_ref().state); }
RLock Codec<RLock>::decode(Decoder& d) { return RLock(detail::decode_ref<detail::LockState>(d)); }

void Codec<Condition>::encode(Encoder& e, const Condition& c) {
    detail::encode_ref(e, c.state_ref());
    detail::encode_lock_beside(e, c.state_ref().memory(), c.lock_ref());
}
Condition Codec<Condition>::decode(Decoder& d) {
    auto state = detail::decode_ref<detail::ConditionState>(d);
    auto lock = detail::decode_lock_beside(d, state.memory());
    return Condition(std::move(state), std::move(lock));
}

void Codec<Semaphore>::encode(Encoder& e, const Semaphore& s) { detail::encode_ref(e, s.state_ref()); }
Semaphore Codec<Semaphore>::decode(Decoder& d) { return Semaphore(detail::decode_ref<detail::SemaphoreState>(d)); }

void Codec<BoundedSemaphore>::encode(Encoder& e, const BoundedSemaphore& s) { detail::encode_ref(e, s.state_ref()); }
BoundedSemaphore Codec<BoundedSemaphore>::decode(Decoder& d) {
    return BoundedSemaphore(detail::decode_ref<detail::SemaphoreState>(d));
}

void Codec<Event>::encode(Encoder& e, const Event& ev) { detail::encode_ref(e, ev.state_ref()); }
Event Codec<Event>::decode(Decoder& d) { return Event(detail::decode_ref<detail::EventState>(d)); }

void Codec<Barrier>::encode(Encoder& e, const Barrier& b) { detail::encode_ref(e, b.state_ref()); }
Barrier Codec<Barrier>::decode(Decoder& d) {
    auto ref = detail::decode_ref<detail::BarrierState>(d);
    std::uint32_t parties = ref->parties;
    if (parties == 0 || ref.bytes_available() < detail::BarrierState::size_for(parties))
        throw DecodeError("decode: barrier state does not fit its shared memory block");
    return Barrier(std::move(ref));
}

}  // namespace mpservice
