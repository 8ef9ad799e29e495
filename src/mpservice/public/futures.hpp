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
// different R mix freely in one braced list; the results are the same pointers.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <atomic>
#include <deque>
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
std::unique_ptr<Task> make_task(L&& l) {
    return std::make_unique<TaskOf<std::decay_t<L>>>(std::forward<L>(l));
}

/// The shared completion state of one worker: started, then resolved exactly
/// once with an outcome.  Waiters block on it; wait()/as_completed() subscribe.
class FutureCore {
public:
    FutureCore() = default;
    FutureCore(const FutureCore&) = delete;
    FutureCore& operator=(const FutureCore&) = delete;
    virtual ~FutureCore() = default;

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
    std::vector<std::weak_ptr<CompletionQueue>> subscribers_;
};

/// Cores that have resolved, in the order they did.
class CompletionQueue {
public:
    MPSERVICE_API void push(const FutureCore* core);
    /// The next resolved core, or nullptr if `deadline` passes first.
    MPSERVICE_API const FutureCore* pop_until(os::Deadline deadline);

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    std::deque<const FutureCore*> ready_;
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
    explicit Worker(std::shared_ptr<detail::FutureCore> core) : core_(std::move(core)) {}
    Worker(Worker&&) noexcept = default;
    Worker& operator=(Worker&&) noexcept = default;
    std::shared_ptr<detail::FutureCore> core_;
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
}

/// Waits for started workers (any mix of Process and Thread) and returns the
/// pair (done, not_done), each in the order given.  A worker that was never
/// started is an InvalidStateError.  Without a timeout, waits as `return_when`
/// says; with one, returns the split at the deadline (no error).
inline std::pair<WorkerList, WorkerList> wait(const WorkerList& workers, ReturnWhen return_when = ALL_COMPLETED) {
    return detail::wait_until(workers, detail::os::no_deadline, return_when);
}
template <class Rep, class Period>
std::pair<WorkerList, WorkerList> wait(const WorkerList& workers, std::chrono::duration<Rep, Period> timeout,
                                       ReturnWhen return_when = ALL_COMPLETED) {
    return detail::wait_until(workers, detail::os::deadline_after(timeout), return_when);
}

/// Yields started workers in the order they finish:
///     for (mp::Worker* w : mp::as_completed({&p1, &t1}, 5s)) ...
/// Advancing past the deadline throws TimeoutError.  Single pass.
class AsCompleted {
public:
    class iterator {
    public:
        using value_type = Worker*;
        using reference = Worker*;
        using difference_type = std::ptrdiff_t;
        using iterator_category = std::input_iterator_tag;
        Worker* operator*() const noexcept { return current_; }
        iterator& operator++() {
            current_ = owner_->next();
            return *this;
        }
        bool operator==(const iterator& o) const noexcept { return current_ == o.current_; }
        bool operator!=(const iterator& o) const noexcept { return current_ != o.current_; }

    private:
        friend class AsCompleted;
        iterator(AsCompleted* owner, Worker* current) : owner_(owner), current_(current) {}
        AsCompleted* owner_;
        Worker* current_;
    };

    /// Waits for the next worker to finish; nullptr once all have been yielded.
    MPSERVICE_API Worker* next();
    iterator begin() { return iterator(this, next()); }
    iterator end() { return iterator(this, nullptr); }

    /// Starts watching `workers` (every one must be started) until `deadline`.
    MPSERVICE_API AsCompleted(const WorkerList& workers, detail::os::Deadline deadline);

private:
    std::shared_ptr<detail::CompletionQueue> queue_;
    std::vector<Worker*> pending_;
    detail::os::Deadline deadline_;
};

/// Workers in the order they finish (see AsCompleted); no time limit.
inline AsCompleted as_completed(const WorkerList& workers) {
    return AsCompleted(workers, detail::os::no_deadline);
}
/// Workers in the order they finish; TimeoutError if they have not all
/// finished `timeout` after this call.
template <class Rep, class Period>
AsCompleted as_completed(const WorkerList& workers, std::chrono::duration<Rep, Period> timeout) {
    return AsCompleted(workers, detail::os::deadline_after(timeout));
}

}  // namespace mpservice
