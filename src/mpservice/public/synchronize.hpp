// synchronize: Lock, RLock, Condition, Semaphore, BoundedSemaphore, Event and
// Barrier in shared memory, usable alike by the threads of one process and by
// many processes.
//
// Every object is a *handle*: copying it, or passing it as an argument to a
// Process, gives another handle to the same lock/event/...  The state lives in
// anonymous shared memory (see detail/shm.hpp); each handle keeps a mapping of
// it, and the kernel frees the memory when the last mapping and descriptor in
// any process are gone.  Nothing has a name, so nothing can be left behind:
// not by exceptions, not by exit(), not by SIGKILL (the kernel closes a killed
// process's descriptors and mappings like everyone else's).
//
// Waits spin for a few microseconds and then sleep on a futex: a wake-up that
// crosses CPUs costs ~30 us, while the other side often answers much sooner.
//
// Dead processes.  Lock and RLock are robust mutexes: if the holder dies, the
// next acquirer gets the lock *and* an OwnerDiedError (or the status
// LockStatus::owner_died from acquire_checked()).  It then owns the lock:
// repair what the lock protects and call make_consistent(), or simply
// release() - a release marks the lock consistent too, so the lock is never
// poisoned.  Only the acquirer that took the lock from the dead process is
// told.  A process that dies *waiting* (Condition::wait, Event::wait,
// Semaphore::acquire) leaves nothing behind that others wait for; one that dies
// inside Barrier::wait breaks the barrier (the other waiters check the
// liveness of the parties that arrived while they sleep).
//
// Differences from Python worth knowing:
// - A Lock is owned by the thread that acquired it; releasing it from another
//   thread or process throws InvalidStateError (use a Semaphore for hand-offs).
//   Acquiring a Lock the calling thread already holds, without a timeout,
//   throws InvalidStateError rather than deadlocking; try_lock() and a timed
//   acquire return false (after the timeout), as in Python.
// - Barrier's action is a plain function pointer; it runs in the process that
//   arrives last (see Barrier).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <utility>

#include "../detail/os.hpp"
#include "../detail/shm.hpp"
#include "codec.hpp"
#include "errors.hpp"

namespace mpservice {

/// How acquire_checked() ended.
enum class LockStatus {
    acquired,    ///< the caller holds the lock
    owner_died,  ///< the caller holds the lock; its previous holder died holding it
    timed_out,   ///< the caller does not hold the lock
};

namespace detail {

// ---------------------------------------------------------------- identity and spinning

/// The calling thread's token, once made (0 before); reset in a forked child.
inline thread_local std::uint64_t t_thread_token = 0;
/// Makes a new token (and registers the reset after fork).
MPSERVICE_API std::uint64_t new_thread_token() noexcept;
/// A 64-bit identity of the calling thread that no other thread, in any
/// process, has now or had before (so a dead owner's identity is never
/// mistaken for a live thread's).  Cached per thread; renewed in a forked child.
inline std::uint64_t this_thread_token() noexcept {
    std::uint64_t t = t_thread_token;
    return t ? t : (t_thread_token = new_thread_token());
}

/// How long a waiter may spin before it sleeps: about a third of the cost of
/// a cross-CPU futex wake-up on the machines this was tuned on (RESULTS.md)...
inline constexpr std::uint32_t spin_max_ns = 10000;
/// ...and at least, so that a partner that answers at once is still caught.
inline constexpr std::uint32_t spin_min_ns = 500;

/// A failed spin of the least budget turns spinning off for the next
/// spin_probe_every - 1 waits; the one after probes again with the least budget.
inline constexpr std::uint32_t spin_probe_every = 8;
static_assert(spin_probe_every < spin_min_ns, "the budget's 'off' values must not look like budgets");

/// What a fixed spin does between batches of looks.
enum class BetweenLooks {
    relax,  // stay on the CPU (the partner runs on another one)
    yield,  // give the CPU away: the partner may be waiting for this very CPU
};

/// Spins until ready() or `budget` has passed, without adapting (the spin of
/// a partner known to answer soon); returns ready().  The one spin loop of
/// the library: spin_until adapts its budget around it.
template <class Ready>
bool spin_for(Ready&& ready, std::chrono::nanoseconds budget, BetweenLooks between = BetweenLooks::relax) {
    const auto until = os::Clock::now() + budget;
    for (;;) {
        for (int i = 0; i < 32; ++i) {  // reading the clock costs about as much as a pause
            os::cpu_relax();
            if (ready()) return true;
        }
        if (os::Clock::now() >= until) return ready();
        if (between == BetweenLooks::yield) std::this_thread::yield();
    }
}

/// Spins until ready() or `budget` has passed, looking at doubling intervals:
/// the first after about one cache-line transfer, the longest a quarter of the
/// budget.  For state that the other side keeps writing, as the holder of a
/// lock does when it releases and re-takes it in a stream: every look takes the
/// line from the holder's cache, so a waiter that looks at every pause turns
/// each of the holder's re-takes into a cross-CPU transfer (measured: 2x slower
/// than not spinning at all), while one that backs off lets the holder run at
/// its uncontended speed between looks and still sees a longer hold end within
/// one interval.
template <class Ready>
bool spin_backing_off_for(Ready&& ready, std::chrono::nanoseconds budget) {
    constexpr std::chrono::nanoseconds first_gap(64);
    const auto longest_gap = budget / 4;
    auto t = os::Clock::now();
    const auto until = t + budget;
    for (auto gap = first_gap;; gap = gap < longest_gap ? gap * 2 : gap) {
        const auto look_at = t + gap;
        while ((t = os::Clock::now()) < look_at) os::cpu_relax();
        if (ready()) return true;
        if (t >= until) return false;
    }
}

/// `budget`, or what is left until `deadline` if that is less (never negative).
inline std::chrono::nanoseconds spin_budget_within(std::chrono::nanoseconds budget, os::Deadline deadline) {
    if (deadline == os::no_deadline) return budget;
    const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - os::Clock::now());
    return std::max(std::chrono::nanoseconds(0), std::min(budget, left));
}

/// How a spin paces its looks at the state it waits for.
enum class Looks {
    every_pause,  // state that changes once (a notify, a put): see it at once
    backing_off,  // state the other side keeps writing: spin_backing_off_for
};

/// The bounds and pace of an adaptive spin (spin_until).
struct SpinStyle {
    std::uint32_t least_ns;  // a probe's budget, and the least before spinning turns off
    std::uint32_t most_ns;   // where a budget that keeps succeeding stops growing
    Looks looks;
    BetweenLooks between;
};

/// A wait for a partner that runs on another CPU and answers soon.
inline constexpr SpinStyle answer_spin{spin_min_ns, spin_max_ns, Looks::every_pause, BetweenLooks::relax};
/// A wait for a lock that someone holds (see lock_contended).
inline constexpr SpinStyle lock_spin{spin_min_ns, spin_max_ns, Looks::backing_off, BetweenLooks::relax};
/// A wait right after waking the partner that will answer it (see
/// partner_is_waking).  The partner must first wake up: a cross-CPU futex
/// wake-up took 8-30 us on the guests measured, longer than answer_spin lasts,
/// so that spin cannot succeed and both sides would sleep on every exchange.
/// One that outlasts the wake-up catches the answer, and the waiter, still
/// awake, needs no wake-up for the next one: the pair leaves the sleep-and-wake
/// cycle for exchanges answered from a spin (20-40x faster, measured).  It
/// yields between looks, because the woken partner may have been placed on
/// this very CPU; it then runs at once, as if the waiter had gone to sleep.
inline constexpr SpinStyle after_wake_spin{25000, 100000, Looks::every_pause, BetweenLooks::yield};

/// Spins until ready() or the spin budget is spent; returns ready().
///
/// The budget adapts, per object, in `budget_ns` (shared by every process
/// that waits on the object): it doubles after a spin that succeeded and
/// halves after one that failed, within the style's bounds.  Spinning pays
/// only while the other side answers within the budget; when it does not
/// (it is busy, or both share one CPU), a spin only burns the CPU.  So once
/// even a spin of the least budget fails, spinning stops: the budget then
/// holds a count of skipped waits (1..spin_probe_every), and every
/// spin_probe_every-th wait probes with the least budget to notice when
/// spinning pays again.
///
/// A spin never outlasts `deadline` (a wait with a timeout shorter than the
/// budget spins only until then, and such a cut-short spin that fails leaves
/// the budget as it was: it says nothing about the partner).
template <class Ready, class Budget>
bool spin_until(Ready&& ready, std::atomic<Budget>& budget_ns, const SpinStyle& style = answer_spin,
                os::Deadline deadline = os::no_deadline) {
    if (ready()) return true;
    const std::uint32_t stored = budget_ns.load(std::memory_order_relaxed);
    std::uint32_t budget = stored;
    if (budget == 0) budget = style.most_ns;  // a new object: optimistic
    if (budget < spin_probe_every) {          // spinning is off: skip it, count the skips
        budget_ns.store(Budget(budget + 1), std::memory_order_relaxed);
        return false;
    }
    if (budget < style.least_ns) budget = style.least_ns;  // a probe
    // The budget lives on the object's (shared) line: it is stored only when
    // it changes, so a steady budget costs the other side no transfer.
    auto keep = [&](std::uint32_t b) {
        if (b != stored) budget_ns.store(Budget(b), std::memory_order_relaxed);
    };
    const auto span = spin_budget_within(std::chrono::nanoseconds(budget), deadline);
    const bool cut_short = span < std::chrono::nanoseconds(budget);
    const bool ok = style.looks == Looks::backing_off ? spin_backing_off_for(ready, span)
                                                       : spin_for(ready, span, style.between);
    if (ok) {
        keep(budget >= style.most_ns / 2 ? style.most_ns : budget * 2);
        return true;
    }
    if (cut_short) return ready();
    std::uint32_t shrunk = budget / 2;
    if (budget <= 2 * style.least_ns) shrunk = budget <= style.least_ns ? 1 : style.least_ns;  // 1: off, see above
    keep(shrunk);
    return ready();
}

/// Whether the calling thread's last wake-up call woke a thread that slept in
/// the kernel (see partner_is_waking).
inline thread_local bool t_woke_a_sleeper = false;

/// Called by a wait before it spins: true if this thread has just woken a
/// sleeper (and forgets it).  The thread it woke is most likely the one that
/// will answer, and it is not running yet: the scheduler is placing it, on
/// another CPU or on this very one (a 2-CPU machine has no other to spare).
/// The wait then spins in after_wake_spin's style, with its own budget.  A
/// partner that was not asleep (both spinning on their own CPUs) is not
/// woken, so the ordinary spin goes on where it pays.
inline bool partner_is_waking() noexcept {
    const bool woke = t_woke_a_sleeper;
    t_woke_a_sleeper = false;
    return woke;
}

/// A wait's spin, bounded by `deadline`: after_wake_spin (budget
/// `after_wake_ns`) if `partner_waking` (partner_is_waking(), asked when the
/// wait began), answer_spin (budget `answer_ns`) otherwise.
template <class Ready, class Budget>
bool spin_for_answer(bool partner_waking, Ready&& ready, std::atomic<Budget>& answer_ns,
                     std::atomic<Budget>& after_wake_ns, os::Deadline deadline) {
    static_assert(after_wake_spin.most_ns <= Budget(~Budget(0)), "the spin budget's type is too small");
    return partner_waking ? spin_until(ready, after_wake_ns, after_wake_spin, deadline)
                          : spin_until(ready, answer_ns, answer_spin, deadline);
}

// ---------------------------------------------------------------- handles to shared state

/// Whether T holds a robust mutex named `mutex` (LockState, BarrierState).
template <class T, class = void>
struct has_robust_mutex : std::false_type {};
template <class T>
struct has_robust_mutex<T, std::enable_if_t<std::is_same_v<decltype(T::mutex), os::RobustMutex>>>
    : std::true_type {};

/// A T that lives at some offset inside a SharedMemory block.  Copies, and
/// decoded copies in other processes, refer to the same T.  The block stays
/// mapped as long as a SharedRef (or anything else) holds it.
template <class T>
class SharedRef {
public:
    SharedRef() = default;
    SharedRef(SharedMemory mem, T* p) : mem_(std::move(mem)), p_(p) {
        // A lock held when the last handle goes must stay mapped (see there).
        if constexpr (has_robust_mutex<T>::value)
            if (p_) mem_.keep_mapped_while_held(&p_->mutex);
    }

    /// A new zero-filled block of `size` bytes (at least sizeof(T)) with a T
    /// constructed at its start.
    template <class... Args>
    static SharedRef create_sized(std::size_t size, Args&&... args) {
        SharedMemory mem = SharedMemory::create(size < sizeof(T) ? sizeof(T) : size);
        T* p = ::new (mem.data()) T(std::forward<Args>(args)...);
        return SharedRef(std::move(mem), p);
    }
    /// A handle to a U that lives inside the same block.
    template <class U>
    SharedRef<U> alias(U* p) const {
        return SharedRef<U>(mem_, p);
    }

    T* get() const noexcept { return p_; }
    T* operator->() const noexcept { return p_; }
    T& operator*() const noexcept { return *p_; }
    explicit operator bool() const noexcept { return p_ != nullptr; }
    const SharedMemory& memory() const noexcept { return mem_; }
    std::size_t offset() const noexcept {
        return static_cast<std::size_t>(reinterpret_cast<const char*>(p_) -
                                        static_cast<const char*>(mem_.data()));
    }
    /// Bytes of the block from this T to the block's end.
    std::size_t bytes_available() const noexcept { return mem_.size() - offset(); }

private:
    SharedMemory mem_;
    T* p_ = nullptr;
};

// ---------------------------------------------------------------- shared states

/// Lock and RLock: a robust process-shared mutex plus the identity of the
/// owning thread (so ownership can be checked without a system call).
///
/// All of it fits one cache line, the mutex proper first: an acquire+release
/// touches the mutex and the owner fields together, and when the lock is handed
/// between CPUs, every extra line is one more transfer per hand-off.
struct alignas(64) LockState {
    os::RobustMutex mutex;
    std::atomic<std::uint64_t> owner{0};  // this_thread_token() of the holder, 0 if free
    std::atomic<std::uint32_t> depth{0};  // recursion depth of the holder (1 for a Lock)
    std::atomic<std::uint16_t> release_work{0};  // lock_release_work bits: what the release must do
    std::atomic<std::uint16_t> spin_ns{0};       // spin_until's budget for a busy lock
    LockState() { os::robust_mutex_init(&mutex); }
};
static_assert(sizeof(LockState) == 64, "LockState should fill exactly one cache line");
static_assert(lock_spin.most_ns <= UINT16_MAX, "LockState::spin_ns is too small for lock_spin's budget");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                  std::atomic<std::uint32_t>::is_always_lock_free &&
                  std::atomic<std::uint16_t>::is_always_lock_free,
              "shared-memory atomics must be lock-free");

/// Bits of LockState::release_work, written by the holder only.  Any bit set
/// sends the release down its slow path; none costs the fast path anything.
enum lock_release_work : std::uint16_t {
    /// Taken from a dead owner, not yet made consistent.
    release_repair = 1,
    /// A Condition over this lock was notified while it was held: the waiters
    /// are woken when the lock is released (see condition_notify).
    release_wake = 2,
};

/// The lock under a Condition (or a Value): a Lock or an RLock.
struct LockRef {
    SharedRef<LockState> state;
    bool recursive = false;
};

// The uncontended paths of Lock and RLock are inline: a trylock and a few
// relaxed stores on the mutex's own cache line.  Everything else is out of line.
MPSERVICE_API LockStatus lock_acquire_slow(const LockRef& l, os::Deadline deadline);
/// The rest of an acquire whose first trylock returned the nonzero `status`.
MPSERVICE_API LockStatus lock_acquire_after_try(const LockRef& l, os::Deadline deadline, int status);
MPSERVICE_API void lock_release_slow(const LockRef& l);
MPSERVICE_API void lock_make_consistent(const LockRef& l);
[[noreturn]] MPSERVICE_API void throw_owner_died(const LockRef& l);

inline bool lock_is_mine(const LockRef& l) noexcept {
    return l.state->owner.load(std::memory_order_relaxed) == this_thread_token();
}

/// Takes the lock (or, for the owner of an RLock, one more level).
inline LockStatus lock_acquire(const LockRef& l, os::Deadline deadline) {
    LockState* s = l.state.get();
    const std::uint64_t me = this_thread_token();
    if (s->owner.load(std::memory_order_relaxed) != me) {
        int status = os::robust_mutex_trylock_status(&s->mutex);
        if (status == 0) {
            s->owner.store(me, std::memory_order_relaxed);
            s->depth.store(1, std::memory_order_relaxed);
            return LockStatus::acquired;
        }
        return lock_acquire_after_try(l, deadline, status);
    }
    return lock_acquire_slow(l, deadline);
}
inline LockStatus lock_try_acquire(const LockRef& l) { return lock_acquire(l, os::Deadline{}); }

/// Releases (one level of an RLock); InvalidStateError if not the owner's.
inline void lock_release(const LockRef& l) {
    LockState* s = l.state.get();
    if (s->owner.load(std::memory_order_relaxed) == this_thread_token() &&
        s->depth.load(std::memory_order_relaxed) == 1 && !s->release_work.load(std::memory_order_relaxed)) {
        s->depth.store(0, std::memory_order_relaxed);
        s->owner.store(0, std::memory_order_relaxed);
        if (int status = os::robust_mutex_unlock_status(&s->mutex)) os::robust_mutex_unlock_failed(status);
        return;
    }
    lock_release_slow(l);
}

/// Throws OwnerDiedError for owner_died (the lock stays held), returns
/// whether it was acquired otherwise.
inline bool lock_status_to_bool(const LockRef& l, LockStatus s) {
    if (s == LockStatus::owner_died) throw_owner_died(l);
    return s == LockStatus::acquired;
}

/// How often (ms) a sleeping Condition waiter looks at the counter by itself,
/// so that the notify of a holder who died before releasing the lock is not
/// lost.  Per process; the tests raise it to tell real wake-ups from rechecks.
inline std::atomic<std::int64_t> condition_recheck_ms{100};

/// A Condition's waiters and notifications.  Every change but the spin
/// budget's is made under the condition's lock, which wait(), notify() and a
/// waiter's decision after waking all hold: so a notify(n) hands out exactly
/// min(n, un-notified waiters) wake-up tokens, and a waiter returns true only
/// with a token, taken from a notify that came after it began to wait.
struct ConditionState {
    std::atomic<std::uint32_t> sequence{0};  // futex word: bumped by every notify that hands out tokens
    std::atomic<std::uint32_t> sleepers{0};  // waiters registered (a dead one stays counted, see condition_notify)
    std::atomic<std::uint32_t> spin_ns{0};   // spin_until's budget (answer_spin)
    std::atomic<std::uint32_t> tokens{0};    // notified waiters that have not yet taken their wake-up
    std::atomic<std::uint32_t> after_wake_spin_ns{0};  // spin_until's budget (after_wake_spin)
};

struct SemaphoreState {
    std::atomic<std::uint32_t> value{0};     // futex word
    std::atomic<std::uint32_t> sleepers{0};  // as in ConditionState
    std::atomic<std::uint32_t> spin_ns{0};
    std::atomic<std::uint32_t> after_wake_spin_ns{0};
    std::uint32_t bounded = 0;               // BoundedSemaphore: value may not exceed limit
    std::uint32_t limit = 0;
};

struct EventState {
    std::atomic<std::uint32_t> word{0};      // futex word: bit 0 = flag, bits 1.. = number of set()s
    std::atomic<std::uint32_t> sleepers{0};  // as in ConditionState
    std::atomic<std::uint32_t> spin_ns{0};
    std::atomic<std::uint32_t> after_wake_spin_ns{0};
};

struct BarrierState {
    os::RobustMutex mutex;                      // guards everything but the atomics' lone reads
    std::atomic<std::uint32_t> generation{0};   // futex word: bumped when a cycle ends
    std::atomic<std::uint32_t> count{0};        // arrivals in the current cycle
    std::atomic<std::uint32_t> broken{0};
    std::atomic<std::uint32_t> spin_ns{0};
    std::uint32_t parties = 0;
    std::atomic<std::uint64_t> released_bits{0};  // bit g%64: cycle g ended by release, not break
    std::int64_t default_timeout_ns = -1;       // -1: none
    os::CodeRef action{};                        // empty: no action
    // followed by `parties` process ids (std::int64_t) of the current cycle's arrivals
    BarrierState() { os::robust_mutex_init(&mutex); }
    std::int64_t* pids() noexcept { return reinterpret_cast<std::int64_t*>(this + 1); }
    static std::size_t size_for(std::uint32_t parties) {
        return sizeof(BarrierState) + parties * sizeof(std::int64_t);
    }
};

MPSERVICE_API bool condition_wait(const SharedRef<ConditionState>& c, const LockRef& l, os::Deadline deadline);
MPSERVICE_API void condition_notify(const SharedRef<ConditionState>& c, const LockRef& l, int n);
/// The condition's lock was taken from a dead holder, who may have notified
/// without living to release: wakes the sleepers, then throws OwnerDiedError.
[[noreturn]] MPSERVICE_API void condition_lock_owner_died(const SharedRef<ConditionState>& c, const LockRef& l);
MPSERVICE_API bool semaphore_acquire(SemaphoreState* s, os::Deadline deadline);
MPSERVICE_API void semaphore_release(SemaphoreState* s, unsigned n);
MPSERVICE_API bool event_wait(EventState* e, os::Deadline deadline);
MPSERVICE_API void event_set(EventState* e);

template <class Rep, class Period>
os::Deadline deadline_of(std::chrono::duration<Rep, Period> timeout) {
    return os::deadline_after(timeout);
}

/// A T at `offset` in `mem`; throws DecodeError unless it (plus `extra`
/// bytes) fits inside the block at a properly aligned offset.
template <class T>
SharedRef<T> ref_at(const SharedMemory& mem, std::uint64_t offset, std::size_t extra = 0) {
    if (offset % alignof(T) != 0 || offset > mem.size() || mem.size() - offset < sizeof(T) + extra)
        throw DecodeError("decode: shared object does not fit its shared memory block");
    return SharedRef<T>(mem, reinterpret_cast<T*>(static_cast<char*>(mem.data()) + offset));
}
/// Reads a SharedRef<T> written by encode_ref.
template <class T>
SharedRef<T> decode_ref(Decoder& d, std::size_t extra = 0) {
    SharedMemory mem = d.read<SharedMemory>();
    auto offset = d.read<std::uint64_t>();
    return ref_at<T>(mem, offset, extra);
}
template <class T>
void encode_ref(Encoder& e, const SharedRef<T>& r) {
    e.write(r.memory());
    e.write(static_cast<std::uint64_t>(r.offset()));
}
/// A lock that often lives in the same block as the object it guards
/// (Condition, Value, Array): then only its offset travels, so the receiver
/// maps the block once.
inline void encode_lock_beside(Encoder& e, const SharedMemory& owner, const LockRef& l) {
    bool same_block = l.state.memory().handle() == owner.handle();
    e.write(static_cast<std::uint8_t>(same_block));
    e.write(static_cast<std::uint8_t>(l.recursive));
    if (same_block)
        e.write(static_cast<std::uint64_t>(l.state.offset()));
    else
        encode_ref(e, l.state);
}
inline LockRef decode_lock_beside(Decoder& d, const SharedMemory& owner) {
    auto same_block = d.read<std::uint8_t>();
    auto recursive = d.read<std::uint8_t>();
    if (same_block > 1 || recursive > 1) throw DecodeError("decode: bad lock description");
    if (same_block) return LockRef{ref_at<LockState>(owner, d.read<std::uint64_t>()), recursive == 1};
    return LockRef{decode_ref<LockState>(d), recursive == 1};
}

}  // namespace detail

// ============================================================================ Lock, RLock

/// A mutual-exclusion lock shared between threads and processes (Python's
/// multiprocessing.Lock).  Meets the standard Lockable and TimedLockable
/// requirements: std::lock_guard, std::unique_lock and std::scoped_lock work.
///
/// If the holder dies, the next acquirer takes the lock and acquire()/lock()/
/// try_lock() throw OwnerDiedError *with the lock held*; acquire_checked()
/// returns LockStatus::owner_died instead of throwing.  Repair the protected
/// state, then make_consistent() or release().
class Lock {
public:
    /// A new, unlocked lock.
    MPSERVICE_API Lock();

    /// Blocks until the lock is taken.
    void acquire() { to_bool(detail::lock_acquire(ref_, detail::os::no_deadline)); }
    /// Waits at most `timeout`; false if the lock could not be taken.
    template <class Rep, class Period>
    bool acquire(std::chrono::duration<Rep, Period> timeout) {
        return to_bool(detail::lock_acquire(ref_, detail::deadline_of(timeout)));
    }
    /// Like acquire, but reports a dead previous owner as a status, not an exception.
    LockStatus acquire_checked() { return detail::lock_acquire(ref_, detail::os::no_deadline); }
    template <class Rep, class Period>
    LockStatus acquire_checked(std::chrono::duration<Rep, Period> timeout) {
        return detail::lock_acquire(ref_, detail::deadline_of(timeout));
    }
    /// Releases; throws InvalidStateError if the calling thread does not hold the lock.
    void release() { detail::lock_release(ref_); }
    /// After a dead owner: declares the protected state repaired.
    void make_consistent() { detail::lock_make_consistent(ref_); }
    /// Whether the calling thread holds the lock.
    bool is_mine() const noexcept { return detail::lock_is_mine(ref_); }

    // The standard Lockable / TimedLockable interface.
    void lock() { acquire(); }
    void unlock() { release(); }
    bool try_lock() { return to_bool(detail::lock_try_acquire(ref_)); }
    template <class Rep, class Period>
    bool try_lock_for(std::chrono::duration<Rep, Period> timeout) {
        return acquire(timeout);
    }
    template <class Clock, class Duration>
    bool try_lock_until(std::chrono::time_point<Clock, Duration> t) {
        return acquire(t - Clock::now());
    }

    /// Internal: the shared state and its kind.
    const detail::LockRef& lock_ref() const noexcept { return ref_; }
    /// Internal: a handle to an existing lock (decoding, Value's own lock).
    explicit Lock(detail::SharedRef<detail::LockState> state) : ref_{std::move(state), false} {}

private:
    bool to_bool(LockStatus s) { return detail::lock_status_to_bool(ref_, s); }
    detail::LockRef ref_;
};

/// A re-entrant lock (Python's multiprocessing.RLock): the owning thread -
/// identified across processes - may acquire it again; it is free once released
/// as many times as acquired.  Same dead-owner protocol as Lock.
class RLock {
public:
    /// A new, unlocked recursive lock.
    MPSERVICE_API RLock();

    void acquire() { to_bool(detail::lock_acquire(ref_, detail::os::no_deadline)); }
    template <class Rep, class Period>
    bool acquire(std::chrono::duration<Rep, Period> timeout) {
        return to_bool(detail::lock_acquire(ref_, detail::deadline_of(timeout)));
    }
    LockStatus acquire_checked() { return detail::lock_acquire(ref_, detail::os::no_deadline); }
    template <class Rep, class Period>
    LockStatus acquire_checked(std::chrono::duration<Rep, Period> timeout) {
        return detail::lock_acquire(ref_, detail::deadline_of(timeout));
    }
    /// Releases one level; throws InvalidStateError if the calling thread is not the owner.
    void release() { detail::lock_release(ref_); }
    void make_consistent() { detail::lock_make_consistent(ref_); }
    bool is_mine() const noexcept { return detail::lock_is_mine(ref_); }
    /// How many times the owner holds it (0 if free); a snapshot.
    unsigned depth() const noexcept { return ref_.state->depth.load(std::memory_order_relaxed); }

    void lock() { acquire(); }
    void unlock() { release(); }
    bool try_lock() { return to_bool(detail::lock_try_acquire(ref_)); }
    template <class Rep, class Period>
    bool try_lock_for(std::chrono::duration<Rep, Period> timeout) {
        return acquire(timeout);
    }
    template <class Clock, class Duration>
    bool try_lock_until(std::chrono::time_point<Clock, Duration> t) {
        return acquire(t - Clock::now());
    }

    const detail::LockRef& lock_ref() const noexcept { return ref_; }
    explicit RLock(detail::SharedRef<detail::LockState> state) : ref_{std::move(state), true} {}

private:
    bool to_bool(LockStatus s) { return detail::lock_status_to_bool(ref_, s); }
    detail::LockRef ref_;
};

// ============================================================================ Condition

/// A condition variable over a Lock or an RLock (Python's
/// multiprocessing.Condition); by default over a new RLock of its own.  The
/// Condition is itself lockable: lock()/unlock()/acquire()/release() act on
/// its lock, so `std::unique_lock g(cond)` works.
///
/// Waiting: a futex on a notification counter, plus wake-up tokens.  notify(n)
/// hands out min(n, waiters not yet notified) tokens; a waiter returns true only
/// with a token from a notify that came after it began to wait, so exactly that
/// many waits return true.  A waiter that dies stays counted, but its token is
/// taken by whichever live waiter wakes first, so it costs the others nothing;
/// the lock under the condition follows the dead-owner protocol of Lock.
///
/// notify() bumps the counter at once but wakes the sleepers only when the
/// lock is released: woken earlier, they would find the lock still held and
/// go back to sleep on it (two more system calls and context switches per
/// wake-up).  A notifier that dies before releasing does not strand them:
/// sleepers look at the counter every 100 ms by themselves, and whoever takes
/// the lock from the dead holder through a Condition wakes them at once.
class Condition {
public:
    /// Over a new RLock.
    MPSERVICE_API Condition();
    MPSERVICE_API explicit Condition(Lock lock);
    MPSERVICE_API explicit Condition(RLock lock);

    /// Releases the lock (all levels of an RLock), waits for a notify, takes
    /// the lock back.  The caller must hold the lock (else InvalidStateError).
    /// If the lock's holder died meanwhile, throws OwnerDiedError holding it.
    void wait() { detail::condition_wait(state_, lock_, detail::os::no_deadline); }
    /// As wait(); false if `timeout` passed without a notify.
    template <class Rep, class Period>
    bool wait(std::chrono::duration<Rep, Period> timeout) {
        return detail::condition_wait(state_, lock_, detail::deadline_of(timeout));
    }
    /// Waits until pred() is true; returns pred()'s last value.
    template <class Predicate>
    bool wait_for(Predicate pred) {
        while (!pred()) wait();
        return true;
    }
    /// Waits until pred() is true or `timeout` passed; returns pred()'s last value.
    template <class Predicate, class Rep, class Period>
    bool wait_for(Predicate pred, std::chrono::duration<Rep, Period> timeout) {
        auto deadline = detail::deadline_of(timeout);
        bool result = pred();
        while (!result) {
            if (detail::os::Clock::now() >= deadline) break;
            detail::condition_wait(state_, lock_, deadline);
            result = pred();
        }
        return result;
    }
    /// Wakes up to n of the threads waiting now (as soon as the lock is
    /// released): exactly min(n, waiters not yet notified) waits return true.
    /// The caller must hold the lock.
    void notify(int n = 1) { detail::condition_notify(state_, lock_, n); }
    void notify_all() { detail::condition_notify(state_, lock_, INT_MAX); }

    // The lock's interface.
    void acquire() { lock_status(detail::lock_acquire(lock_, detail::os::no_deadline)); }
    template <class Rep, class Period>
    bool acquire(std::chrono::duration<Rep, Period> timeout) {
        return lock_status(detail::lock_acquire(lock_, detail::deadline_of(timeout)));
    }
    void release() { detail::lock_release(lock_); }
    void lock() { acquire(); }
    void unlock() { release(); }
    bool try_lock() { return lock_status(detail::lock_try_acquire(lock_)); }
    void make_consistent() { detail::lock_make_consistent(lock_); }

    /// Internal.
    Condition(detail::SharedRef<detail::ConditionState> state, detail::LockRef lock)
        : state_(std::move(state)), lock_(std::move(lock)) {}
    const detail::SharedRef<detail::ConditionState>& state_ref() const noexcept { return state_; }
    const detail::LockRef& lock_ref() const noexcept { return lock_; }

private:
    bool lock_status(LockStatus s) {
        if (s == LockStatus::owner_died) detail::condition_lock_owner_died(state_, lock_);
        return s == LockStatus::acquired;
    }
    detail::SharedRef<detail::ConditionState> state_;
    detail::LockRef lock_;
};

// ============================================================================ Semaphore

/// A counting semaphore (Python's multiprocessing.Semaphore).  It has no owner:
/// any thread or process may release.  lock()/unlock() make it usable with
/// std::lock_guard as well.
class Semaphore {
public:
    /// A semaphore whose counter starts at `value`.
    MPSERVICE_API explicit Semaphore(unsigned value = 1);

    /// Decrements the counter, waiting while it is zero.
    void acquire() { detail::semaphore_acquire(state_.get(), detail::os::no_deadline); }
    /// As acquire(); false if `timeout` passed while the counter stayed zero.
    template <class Rep, class Period>
    bool acquire(std::chrono::duration<Rep, Period> timeout) {
        return detail::semaphore_acquire(state_.get(), detail::deadline_of(timeout));
    }
    /// Decrements the counter if it is not zero.
    bool try_acquire() { return detail::semaphore_acquire(state_.get(), detail::os::Deadline{}); }
    /// Adds n to the counter, waking up to n waiters.  A BoundedSemaphore
    /// throws InvalidStateError rather than exceed its initial value.
    void release(unsigned n = 1) { detail::semaphore_release(state_.get(), n); }
    /// The counter now (a snapshot).
    unsigned get_value() const noexcept { return state_->value.load(std::memory_order_relaxed); }

    void lock() { acquire(); }
    void unlock() { release(); }
    bool try_lock() { return try_acquire(); }

    /// Internal.
    explicit Semaphore(detail::SharedRef<detail::SemaphoreState> state) : state_(std::move(state)) {}
    const detail::SharedRef<detail::SemaphoreState>& state_ref() const noexcept { return state_; }

protected:
    MPSERVICE_API Semaphore(unsigned value, unsigned limit);

private:
    detail::SharedRef<detail::SemaphoreState> state_;
};

/// A semaphore whose counter may never exceed its initial value: a release
/// beyond it throws InvalidStateError and changes nothing.
class BoundedSemaphore : public Semaphore {
public:
    explicit BoundedSemaphore(unsigned value = 1) : Semaphore(value, value) {}
    explicit BoundedSemaphore(detail::SharedRef<detail::SemaphoreState> state) : Semaphore(std::move(state)) {}
};

// ============================================================================ Event

/// A flag that processes can wait for (Python's multiprocessing.Event).
class Event {
public:
    /// A new event, not set.
    MPSERVICE_API Event();

    /// Sets the flag and wakes every waiter.
    void set() { detail::event_set(state_.get()); }
    /// Resets the flag.
    void clear() noexcept { state_->word.fetch_and(~1u, std::memory_order_acq_rel); }
    bool is_set() const noexcept { return state_->word.load(std::memory_order_acquire) & 1u; }
    /// Waits until the flag is set.  A set() while waiting wakes the waiter
    /// even if a clear() follows at once.
    void wait() { detail::event_wait(state_.get(), detail::os::no_deadline); }
    /// As wait(); returns false if `timeout` passed without a set().
    template <class Rep, class Period>
    bool wait(std::chrono::duration<Rep, Period> timeout) {
        return detail::event_wait(state_.get(), detail::deadline_of(timeout));
    }

    /// Internal.
    explicit Event(detail::SharedRef<detail::EventState> state) : state_(std::move(state)) {}
    const detail::SharedRef<detail::EventState>& state_ref() const noexcept { return state_; }

private:
    detail::SharedRef<detail::EventState> state_;
};

// ============================================================================ Barrier

/// A barrier for a fixed number of parties (Python's multiprocessing.Barrier).
///
/// wait() returns the arrival index, 0 for the first to arrive and parties-1
/// for the last.  The barrier breaks - every waiter and every later wait()
/// throws BrokenBarrierError until reset() - when a wait times out, when
/// abort() is called, when the action throws, or when a process dies while it
/// waits at the barrier (the sleepers check the arrived parties every
/// ~50 ms).
///
/// The action is a plain function (a capture-less lambda will do): it runs
/// once per cycle, in the process - and thread - that arrives last, before the
/// others are released.  It travels as an offset inside its module (executable
/// or shared library), so it is found again in a spawned child as well as
/// under fork and fork server.  It must not use the barrier itself.
class Barrier {
public:
    using Action = void (*)();

    /// `parties` >= 1 (else std::invalid_argument); no default timeout.
    explicit Barrier(unsigned parties, Action action = nullptr) : Barrier(parties, action, -1) {}
    /// `timeout` is the default for wait() without a timeout.
    template <class Rep, class Period>
    Barrier(unsigned parties, Action action, std::chrono::duration<Rep, Period> timeout)
        : Barrier(parties, action, timeout_ns(timeout)) {}

    /// Waits for all parties (or the default timeout, if one was given).
    MPSERVICE_API unsigned wait();
    template <class Rep, class Period>
    unsigned wait(std::chrono::duration<Rep, Period> timeout) {
        return wait_until(detail::deadline_of(timeout));
    }
    /// Returns the barrier to its initial state; current waiters get BrokenBarrierError.
    MPSERVICE_API void reset();
    /// Breaks the barrier: current and future waiters get BrokenBarrierError until reset().
    MPSERVICE_API void abort();
    bool broken() const noexcept { return state_->broken.load(std::memory_order_acquire) != 0; }
    /// Parties waiting in the current cycle (a snapshot).
    unsigned n_waiting() const noexcept { return state_->count.load(std::memory_order_relaxed); }
    unsigned parties() const noexcept { return state_->parties; }

    /// Internal.
    explicit Barrier(detail::SharedRef<detail::BarrierState> state) : state_(std::move(state)) {}
    const detail::SharedRef<detail::BarrierState>& state_ref() const noexcept { return state_; }

private:
    MPSERVICE_API Barrier(unsigned parties, Action action, std::int64_t timeout_ns);
    MPSERVICE_API unsigned wait_until(detail::os::Deadline deadline);
    template <class Rep, class Period>
    static std::int64_t timeout_ns(std::chrono::duration<Rep, Period> t) {
        if (t < t.zero()) return 0;
        constexpr double limit_s = 100.0 * 365 * 24 * 3600;  // practically forever
        if (detail::os::seconds_of(t) > limit_s) return -1;
        return std::chrono::duration_cast<std::chrono::nanoseconds>(t).count();
    }
    detail::SharedRef<detail::BarrierState> state_;
};

// ============================================================================ codecs

// (Defined in the implementation: the shared-state references they read and
// write are instantiated there once, not in every includer.)
template <>
struct Codec<Lock> {
    MPSERVICE_API static void encode(Encoder& e, const Lock& l);
    MPSERVICE_API static Lock decode(Decoder& d);
};
template <>
struct Codec<RLock> {
    MPSERVICE_API static void encode(Encoder& e, const RLock& l);
    MPSERVICE_API static RLock decode(Decoder& d);
};
template <>
struct Codec<Condition> {
    MPSERVICE_API static void encode(Encoder& e, const Condition& c);
    MPSERVICE_API static Condition decode(Decoder& d);
};
template <>
struct Codec<Semaphore> {
    MPSERVICE_API static void encode(Encoder& e, const Semaphore& s);
    MPSERVICE_API static Semaphore decode(Decoder& d);
};
template <>
struct Codec<BoundedSemaphore> {
    MPSERVICE_API static void encode(Encoder& e, const BoundedSemaphore& s);
    MPSERVICE_API static BoundedSemaphore decode(Decoder& d);
};
template <>
struct Codec<Event> {
    MPSERVICE_API static void encode(Encoder& e, const Event& ev);
    MPSERVICE_API static Event decode(Decoder& d);
};
template <>
struct Codec<Barrier> {
    MPSERVICE_API static void encode(Encoder& e, const Barrier& b);
    MPSERVICE_API static Barrier decode(Decoder& d);
};

}  // namespace mpservice
