// futures: what Process and Thread have in common - a result that arrives
// once - and wait() / as_completed() over any mix of them.
//
//     mp::Process p1(work, 2), p2(work, 3);
//     mp::Thread t1(work, 4);
//     p1.start(); p2.start(); t1.start();
//     auto [done, not_done] = mp::wait({&p1, &p2, &t1}, 2.5s, mp::FIRST_COMPLETED);
//     for (mp::Worker* w : mp::as_completed({&p1, &p2, &t1})) std::cout << w->name() << " finished\n";
//
// Workers are passed by address (as Worker*), so Process<R> and Thread<R> of
// different R mix freely in one braced list; the results are the same pointers
// (as_completed also gives each one's position in the list).  Over a range of
// one type - std::vector<mp::Process<int>>, say - wait() gives Process<int>*
// and as_completed() yields Process<int>&, so result() needs no cast:
//     for (mp::Process<int>& p : mp::as_completed(procs)) sum += p.result();
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <atomic>
#include <exception>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/os.hpp"
#include "errors.hpp"

namespace mpservice {

/// When wait() returns (as concurrent.futures).
enum class ReturnWhen {
    all_completed,    ///< every worker has finished (or the timeout expired)
    first_completed,  ///< any worker has finished, with a value or an exception
    first_exception,  ///< any worker has failed; like all_completed if none does
};
inline constexpr ReturnWhen ALL_COMPLETED = ReturnWhen::all_completed;
inline constexpr ReturnWhen FIRST_COMPLETED = ReturnWhen::first_completed;
inline constexpr ReturnWhen FIRST_EXCEPTION = ReturnWhen::first_exception;

namespace detail {

class CompletionQueue;

/// A move-only type-erased `void()` callable (std::function needs copyable ones).
class Task {
public:
    virtual ~Task() = default;
    virtual void run() = 0;
};
template <class L>
class TaskOf final : public Task {
public:
    explicit TaskOf(L&& l) : l_(std::move(l)) {}
    void run() override { l_(); }

private:
    L l_;
};
template <class L>
Owned<Task> make_task(L&& l) {
    return Owned<Task>(new TaskOf<std::decay_t<L>>(std::forward<L>(l)));
}

/// The shared completion state of one worker: started, then resolved exactly
/// once with an outcome.  Waiters block on it; wait()/as_completed() subscribe.
class FutureCore {
public:
    MPSERVICE_API FutureCore();  // out of line, as the destructor: Listeners is the implementation's
    FutureCore(const FutureCore&) = delete;
    FutureCore& operator=(const FutureCore&) = delete;
    MPSERVICE_API virtual ~FutureCore();

    MPSERVICE_API void mark_started();
    MPSERVICE_API bool started() const;
    MPSERVICE_API bool done() const;
    /// Resolves the future (only the first call counts).  `error` is what
    /// join() and result() throw and exception() returns; `result_error` is
    /// thrown by result() alone, when the worker ended cleanly but left no value
    /// (terminated by SIGTERM, exit(0) before returning).
    MPSERVICE_API void resolve(std::exception_ptr error, std::exception_ptr result_error = nullptr);
    /// Blocks until resolved or `deadline`; true if resolved.
    MPSERVICE_API virtual bool wait_until(os::Deadline deadline) const;
    /// done() without taking the lock (for brief spins).
    bool done_relaxed() const noexcept { return done_flag_.load(std::memory_order_acquire); }
    /// Outcome, valid once done().
    MPSERVICE_API std::exception_ptr error() const;
    MPSERVICE_API std::exception_ptr result_error() const;
    /// Pushes this core onto `q` when it resolves (at once if it already has).
    MPSERVICE_API void subscribe(const std::shared_ptr<CompletionQueue>& q);
    /// Runs `hook` once when this core resolves, in the resolving thread and
    /// outside the core's lock (at once, here, if it already has).  The pool
    /// uses it to hear of a worker's death without a thread per worker.
    MPSERVICE_API void on_resolve(Owned<Task> hook);

    std::string name;

protected:
    mutable std::mutex mutex_;
    mutable std::condition_variable cv_;

private:
    bool started_ = false;
    bool done_ = false;
    std::atomic<bool> done_flag_{false};
    std::exception_ptr error_;
    std::exception_ptr result_error_;
    /// Who hears of the resolution (wait/as_completed queues, on_resolve
    /// hooks): made on the first subscription, so a worker that no one waits
    /// on this way allocates nothing for it.  Defined in the implementation.
    struct Listeners;
    Owned<Listeners> listeners_;
};

}  // namespace detail

/// The common base of Process<R> and Thread<R>: what wait() and as_completed()
/// need.  Not copyable; the derived classes are movable.
class Worker {
public:
    Worker(const Worker&) = delete;
    Worker& operator=(const Worker&) = delete;
    virtual ~Worker() = default;

    /// True once the worker has finished - with a value, an exception or an exit.
    bool done() const { return core_->done(); }
    /// The worker's name ("Process-1", "Thread-2", or the one given).
    const std::string& name() const { return core_->name; }
    /// The completion state (for wait/as_completed).
    const detail::FutureCore& core() const noexcept { return *core_; }

protected:
    explicit Worker(detail::Shared<detail::FutureCore> core) : core_(std::move(core)) {}
    Worker(Worker&&) noexcept = default;
    Worker& operator=(Worker&&) noexcept = default;
    detail::Shared<detail::FutureCore> core_;
};

using WorkerList = std::vector<Worker*>;

namespace detail {
/// What result() returns: a reference to the kept value, or nothing.
template <class R>
struct result_ref {
    using type = const R&;
};
template <class R>
struct result_ref<R&> {  // a Thread whose target returns a reference (as std::async)
    using type = R&;
};
template <>
struct result_ref<void> {
    using type = void;
};
template <class R>
using result_ref_t = typename result_ref<R>::type;

/// InvalidStateError: `what` (join, result, ...) on a worker that was never started.
[[noreturn]] MPSERVICE_API void throw_not_started(const std::string& what, const std::string& name);
/// TimeoutError for result()/exception() of a worker still running.
[[noreturn]] MPSERVICE_API void throw_timeout(const std::string& name);
/// InvalidStateError: result() after take_result() moved the value out.
[[noreturn]] MPSERVICE_API void throw_result_taken(const std::string& name);
MPSERVICE_API std::pair<WorkerList, WorkerList> wait_until(const WorkerList& workers, os::Deadline deadline,
                                                           ReturnWhen return_when);
/// wait_until's answer in one list, the done workers first (`done_count` of
/// them), each part in the order given: the typed waits' form (a pair of
/// WorkerLists in a template would be instantiated in every includer).
MPSERVICE_API WorkerList wait_until_split(const WorkerList& workers, os::Deadline deadline, ReturnWhen return_when,
                                          std::size_t& done_count);
}

/// Waits for started workers (any mix of Process and Thread) and returns the
/// pair (done, not_done), each in the order given.  A worker that was never
/// started is an InvalidStateError.  Without a timeout, waits as `return_when`
/// says; with one, returns the split at the deadline (no error).
/// Over a range of one worker type (see the typed overloads below) the lists
/// hold that type, so result() needs no cast.
MPSERVICE_API std::pair<WorkerList, WorkerList> wait(const WorkerList& workers, ReturnWhen return_when = ALL_COMPLETED);
/// (The same std::pair<WorkerList, WorkerList>, spelled through the call so
/// that only a caller instantiates it.)
template <class Rep, class Period>
auto wait(const WorkerList& workers, std::chrono::duration<Rep, Period> timeout, ReturnWhen return_when = ALL_COMPLETED)
    -> decltype(detail::wait_until(workers, detail::os::deadline_after(timeout), return_when)) {
    return detail::wait_until(workers, detail::os::deadline_after(timeout), return_when);
}

/// One finished worker from as_completed over a list: the worker and its
/// position in the list, so the caller can reach its own typed object
/// (`results[c.index] = std::get<...>(...)`) without a cast.  Converts to Worker*.
struct Completed {
    Worker* worker = nullptr;
    std::size_t index = 0;
    operator Worker*() const noexcept { return worker; }
    Worker* operator->() const noexcept { return worker; }
};

/// Yields started workers in the order they finish:
///     for (mp::Worker* w : mp::as_completed({&p1, &t1}, 5s)) ...
///     for (mp::Completed c : mp::as_completed({&p1, &t1})) ... c.index ...
/// Advancing past the deadline throws TimeoutError.  Single pass.  A worker
/// listed twice is yielded once, with its first position.
class AsCompleted {
public:
    class iterator {
    public:
        using value_type = Completed;
        using reference = Completed;
        using difference_type = std::ptrdiff_t;
        using iterator_category = std::input_iterator_tag;
        Completed operator*() const noexcept { return current_; }
        iterator& operator++() {
            current_ = owner_->next_completed();
            return *this;
        }
        bool operator==(const iterator& o) const noexcept { return current_.worker == o.current_.worker; }
        bool operator!=(const iterator& o) const noexcept { return current_.worker != o.current_.worker; }

    private:
        friend class AsCompleted;
        iterator(AsCompleted* owner, Completed current) : owner_(owner), current_(current) {}
        AsCompleted* owner_;
        Completed current_;
    };

    /// Waits for the next worker to finish; nullptr once all have been yielded.
    Worker* next() { return next_completed().worker; }
    /// As next(), with the worker's position in the list (worker null at the end).
    MPSERVICE_API Completed next_completed();
    iterator begin() { return iterator(this, next_completed()); }
    iterator end() { return iterator(this, Completed{}); }

    /// Starts watching `workers` (every one must be started) until `deadline`.
    MPSERVICE_API AsCompleted(const WorkerList& workers, detail::os::Deadline deadline);
    MPSERVICE_API ~AsCompleted();
    AsCompleted(AsCompleted&&) noexcept = default;
    MPSERVICE_API AsCompleted& operator=(AsCompleted&&) noexcept;

private:
    struct State;  // the queue the workers report to, the list, the ones pending (the implementation's)
    detail::Owned<State> state_;
};

/// Workers in the order they finish (see AsCompleted); no time limit.
MPSERVICE_API AsCompleted as_completed(const WorkerList& workers);
/// Workers in the order they finish; TimeoutError if they have not all
/// finished `timeout` after this call.
template <class Rep, class Period>
AsCompleted as_completed(const WorkerList& workers, std::chrono::duration<Rep, Period> timeout) {
    return AsCompleted(workers, detail::os::deadline_after(timeout));
}

// ---- typed waits: over a range of one worker type (a std::vector<Process<int>>,
// an array of Thread<std::string>*, ...) the answers keep that type.

namespace detail {
template <class E>
struct worker_of_element {
    using type = void;
};
template <class E>
struct worker_of_element<E*> {
    using type = E;
};
template <class E>
using element_worker_t = std::conditional_t<std::is_base_of_v<Worker, E>, E, typename worker_of_element<E>::type>;
/// The worker type of a range whose elements are workers (or pointers to
/// them) of one type other than plain Worker (a WorkerList keeps the old form).
template <class Range>
using range_worker_t = element_worker_t<std::remove_reference_t<decltype(*std::begin(std::declval<Range&>()))>>;
template <class Range, class = void>
struct is_typed_worker_range : std::false_type {};
template <class Range>
struct is_typed_worker_range<Range, std::void_t<range_worker_t<Range>>>
    : std::bool_constant<std::is_base_of_v<Worker, range_worker_t<Range>> &&
                         !std::is_same_v<range_worker_t<Range>, Worker> &&
                         !std::is_const_v<range_worker_t<Range>>> {};

template <class W, class E>
W* worker_address(E& e) {
    if constexpr (std::is_pointer_v<E>) return e;
    else return &e;
}

template <class Range>
std::vector<range_worker_t<Range>*> typed_workers(Range& range) {
    std::vector<range_worker_t<Range>*> out;
    for (auto& e : range) out.push_back(worker_address<range_worker_t<Range>>(e));
    return out;
}

template <class W>
std::pair<std::vector<W*>, std::vector<W*>> typed_wait(const std::vector<W*>& typed, os::Deadline deadline,
                                                       ReturnWhen return_when) {
    WorkerList all(typed.begin(), typed.end());
    std::size_t done_count = 0;
    WorkerList split = wait_until_split(all, deadline, return_when, done_count);
    std::pair<std::vector<W*>, std::vector<W*>> out;
    // Every Worker* here was a W* a moment ago: the downcast is exact.
    for (std::size_t i = 0; i < split.size(); ++i)
        (i < done_count ? out.first : out.second).push_back(static_cast<W*>(split[i]));
    return out;
}
}  // namespace detail

/// as_completed over a range of one worker type: yields W& (a reference to
/// the worker in the range), on which result() works directly:
///     std::vector<mp::Process<int>> ps = ...;
///     for (mp::Process<int>& p : mp::as_completed(ps)) total += p.result();
template <class W>
class TypedAsCompleted {
public:
    class iterator {
    public:
        using value_type = W;
        using reference = W&;
        using difference_type = std::ptrdiff_t;
        using iterator_category = std::input_iterator_tag;
        W& operator*() const noexcept { return *owner_->workers_[current_.index]; }
        W* operator->() const noexcept { return owner_->workers_[current_.index]; }
        iterator& operator++() {
            current_ = owner_->inner_.next_completed();
            return *this;
        }
        bool operator==(const iterator& o) const noexcept { return current_.worker == o.current_.worker; }
        bool operator!=(const iterator& o) const noexcept { return current_.worker != o.current_.worker; }
        /// The position of the current worker in the range.
        std::size_t index() const noexcept { return current_.index; }

    private:
        friend class TypedAsCompleted;
        iterator(TypedAsCompleted* owner, Completed current) : owner_(owner), current_(current) {}
        TypedAsCompleted* owner_;
        Completed current_;
    };

    TypedAsCompleted(std::vector<W*> workers, detail::os::Deadline deadline)
        : workers_(std::move(workers)), inner_(WorkerList(workers_.begin(), workers_.end()), deadline) {}
    /// The next worker to finish, or nullptr once all have been yielded.
    W* next() {
        Completed c = inner_.next_completed();
        return c.worker ? workers_[c.index] : nullptr;
    }
    iterator begin() { return iterator(this, inner_.next_completed()); }
    iterator end() { return iterator(this, Completed{}); }

private:
    std::vector<W*> workers_;
    AsCompleted inner_;
};

template <class Range, std::enable_if_t<detail::is_typed_worker_range<Range>::value, int> = 0>
TypedAsCompleted<detail::range_worker_t<Range>> as_completed(Range& workers) {
    return {detail::typed_workers(workers), detail::os::no_deadline};
}
template <class Range, class Rep, class Period,
          std::enable_if_t<detail::is_typed_worker_range<Range>::value, int> = 0>
TypedAsCompleted<detail::range_worker_t<Range>> as_completed(Range& workers,
                                                             std::chrono::duration<Rep, Period> timeout) {
    return {detail::typed_workers(workers), detail::os::deadline_after(timeout)};
}

/// wait over a range of one worker type: (done, not_done) as W*, in range order.
template <class Range, std::enable_if_t<detail::is_typed_worker_range<Range>::value, int> = 0>
std::pair<std::vector<detail::range_worker_t<Range>*>, std::vector<detail::range_worker_t<Range>*>> wait(
    Range& workers, ReturnWhen return_when = ALL_COMPLETED) {
    return detail::typed_wait(detail::typed_workers(workers), detail::os::no_deadline, return_when);
}
template <class Range, class Rep, class Period,
          std::enable_if_t<detail::is_typed_worker_range<Range>::value, int> = 0>
std::pair<std::vector<detail::range_worker_t<Range>*>, std::vector<detail::range_worker_t<Range>*>> wait(
    Range& workers, std::chrono::duration<Rep, Period> timeout, ReturnWhen return_when = ALL_COMPLETED) {
    return detail::typed_wait(detail::typed_workers(workers), detail::os::deadline_after(timeout), return_when);
}

}  // namespace mpservice
