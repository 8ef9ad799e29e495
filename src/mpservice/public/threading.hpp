// threading: Thread<R>, a thread with the future API of Process<R>.
//
//     mp::Thread t(work, 21);              // CTAD: Thread<double>
//     t.start();
//     double r = t.result();               // waits; re-throws the target's exception
//
// Arguments follow std::thread: each is copied (decayed) into the thread and
// passed as an rvalue, so a T& parameter needs std::ref(x) (one static_assert
// says so otherwise).  A target returning a reference gives Thread<T&>, whose
// result() is that very object, as std::async's future<T&>.  take_result() (or
// std::move(t).result()) moves the value out instead of copying it.
//
// Cancellation is cooperative, as with std::jthread (C++ cannot inject an
// exception into a running thread the way Python's Thread.throw does): a
// target whose first parameter is mp::StopToken receives one, and polls
// stop_requested(); request_stop() sets it.  The destructor of a running
// Thread requests a stop and then joins.
#pragma once

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>

#include "errors.hpp"
#include "futures.hpp"
#include "remote_exception.hpp"

namespace mpservice {

/// Tells a Thread's target that a stop was requested (see Thread::request_stop).
class StopToken {
public:
    StopToken() = default;
    bool stop_requested() const noexcept { return flag_ && flag_->load(std::memory_order_acquire); }

private:
    template <class>
    friend class Thread;
    explicit StopToken(detail::Shared<std::atomic<bool>> flag) : flag_(std::move(flag)) {}
    detail::Shared<std::atomic<bool>> flag_;
};

template <class R>
class Thread;

namespace detail {

/// "Thread-N", numbered from 1 in each process.
MPSERVICE_API std::string next_thread_name();
/// A Thread's stop flag, not set.
MPSERVICE_API Shared<std::atomic<bool>> make_stop_flag();

template <class F, class... A>
constexpr bool takes_stop_token_v = std::is_invocable_v<std::decay_t<F>, StopToken, std::decay_t<A>...>;

/// Stands for the result of a call that cannot be made, so that class template
/// argument deduction succeeds and the constructor's static_assert explains.
struct uncallable_thread_target {};

template <class F, class... A>
auto thread_result_of() {
    if constexpr (takes_stop_token_v<F, A...>)
        return std::invoke_result<std::decay_t<F>&, StopToken, std::decay_t<A>...>{};
    else if constexpr (std::is_invocable_v<std::decay_t<F>&, std::decay_t<A>...>)
        return std::invoke_result<std::decay_t<F>&, std::decay_t<A>...>{};
    else
        return std::enable_if<true, uncallable_thread_target>{};
}
template <class F, class... A>
struct thread_result_impl {
    using type = typename decltype(thread_result_of<F, A...>())::type;
};
// No `type` for a Thread in first place: Thread b(std::move(a)) is the move
// constructor, and the deduction guide must step aside for it.
template <class F, class... A>
using thread_result_t =
    typename std::enable_if_t<!std::is_base_of_v<Worker, std::decay_t<F>>, thread_result_impl<F, A...>>::type;

/// Whether f(args...) - or f(stop_token, args...) - can be made from the
/// copies a Thread keeps (passed as rvalues, as std::thread passes them).
template <class F, class... A>
constexpr bool thread_callable_v =
    takes_stop_token_v<F, A...> || std::is_invocable_v<std::decay_t<F>&, std::decay_t<A>...>;

/// What a Thread keeps of R: a value, a pointer for a reference, a flag for void.
template <class R>
struct thread_value {
    using type = R;
};
template <class R>
struct thread_value<R&> {
    using type = R*;
};
template <>
struct thread_value<void> {
    using type = bool;
};

template <class R>
class ThreadCore : public FutureCore {
public:
    std::optional<typename thread_value<R>::type> value;
    bool value_taken = false;  ///< take_result() moved the value out
    std::mutex join_mutex;
    std::mutex value_mutex;
};

}  // namespace detail

/// A thread whose target's return value or exception is kept, like a future.
template <class R>
class Thread : public Worker {
    using Core = detail::ThreadCore<R>;

public:
    /// Prepares a thread running f(args...) - or f(stop_token, args...) if f
    /// takes a StopToken first.  Arguments are copied (decayed) into the thread
    /// and passed as rvalues, as std::thread does.  Nothing runs until start().
    template <class F, class... A,
              std::enable_if_t<!std::is_same_v<std::decay_t<F>, Thread>, int> = 0>
    explicit Thread(F&& f, A&&... args)
        : Worker(std::make_shared<Core>()), stop_(detail::make_stop_flag()) {
        static_assert(detail::thread_callable_v<F, A...>,
                      "mpservice::Thread: the target cannot be called with these arguments. As std::thread does, "
                      "Thread keeps a copy of each argument and passes the copies as rvalues, so a non-const "
                      "lvalue reference parameter (T&) cannot bind to one: pass std::ref(x) to let the thread use "
                      "your object x itself, or take the parameter by value or by const reference.");
        core_->name = detail::next_thread_name();
        if constexpr (detail::thread_callable_v<F, A...>)
            body_ = make_body(std::forward<F>(f), std::forward<A>(args)...);
    }
    Thread(Thread&&) noexcept = default;
    Thread& operator=(Thread&&) = delete;
    /// A running thread is asked to stop (request_stop) and joined; never throws.
    ~Thread() override {
        if (thread_.joinable()) {
            request_stop();
            thread_.join();
        }
    }

    /// Starts the thread; a second start() is an InvalidStateError.
    void start() {
        if (core_->started()) throw InvalidStateError("mpservice: thread '" + name() + "' was already started");
        core_->mark_started();
        thread_ = std::thread([body = std::move(body_)] { body->run(); });
    }

    /// Waits for the end; re-throws the target's exception (every time).
    void join() {
        wait_for_end(detail::os::no_deadline, "join");
        if (auto e = core_->error()) std::rethrow_exception(e);
    }
    /// Waits at most `timeout`; returns quietly if the thread is still running.
    template <class Rep, class Period>
    void join(std::chrono::duration<Rep, Period> timeout) {
        if (!wait_for_end(detail::os::deadline_after(timeout), "join")) return;
        if (auto e = core_->error()) std::rethrow_exception(e);
    }

    /// The target's value (waits); re-throws its exception.
    detail::result_ref_t<R> result() & { return result_at(detail::os::no_deadline); }
    /// As result(), but TimeoutError if not finished within `timeout`.
    template <class Rep, class Period>
    detail::result_ref_t<R> result(std::chrono::duration<Rep, Period> timeout) & {
        return result_at(detail::os::deadline_after(timeout));
    }
    /// std::move(t).result(): the value moved out (see take_result).
    R result() && { return take_result(); }
    template <class Rep, class Period>
    R result(std::chrono::duration<Rep, Period> timeout) && {
        return take_result(timeout);
    }
    /// The target's value moved out of this Thread rather than copied (waits;
    /// re-throws as result()).  Afterwards result() and take_result() are an
    /// InvalidStateError; join() and exception() still work.
    R take_result() { return take_at(detail::os::no_deadline); }
    template <class Rep, class Period>
    R take_result(std::chrono::duration<Rep, Period> timeout) {
        return take_at(detail::os::deadline_after(timeout));
    }
    /// The target's exception, or nullptr after a value (waits).
    std::exception_ptr exception() { return exception_at(detail::os::no_deadline); }
    template <class Rep, class Period>
    std::exception_ptr exception(std::chrono::duration<Rep, Period> timeout) {
        return exception_at(detail::os::deadline_after(timeout));
    }

    bool is_alive() const { return core_->started() && !core_->done(); }
    /// Asks the target to stop (it sees StopToken::stop_requested()).
    void request_stop() noexcept { stop_->store(true, std::memory_order_release); }
    bool stop_requested() const noexcept { return stop_->load(std::memory_order_acquire); }
    StopToken get_stop_token() const { return StopToken(stop_); }
    /// Renames the thread (before start).
    void set_name(std::string name) { core_->name = std::move(name); }

private:
    template <class F, class... A>
    detail::Owned<detail::Task> make_body(F&& f, A&&... args) {
        auto token = StopToken(stop_);
        auto core = std::static_pointer_cast<Core>(core_.shared());  // the thread's own reference
        return detail::make_task([core, token, fn = std::decay_t<F>(std::forward<F>(f)),
                                  tup = std::make_tuple(std::decay_t<A>(std::forward<A>(args))...)]() mutable {
            std::exception_ptr error;
            try {
                if constexpr (detail::takes_stop_token_v<F, A...>) {
                    call_and_store(*core, [&]() -> decltype(auto) {
                        return std::apply([&](auto&&... a) -> decltype(auto) { return std::invoke(fn, token, std::move(a)...); },
                                          std::move(tup));
                    });
                } else {
                    call_and_store(*core, [&]() -> decltype(auto) { return std::apply(fn, std::move(tup)); });
                }
            } catch (...) {
                error = std::current_exception();
                detail::keep_throw_site(error);  // the throw site is known in this thread only
            }
            core->resolve(error);
        });
    }
    template <class Call>
    static void call_and_store(Core& core, Call&& call) {
        if constexpr (std::is_void_v<R>) {
            call();
            core.value.emplace(true);
        } else if constexpr (std::is_reference_v<R>) {
            R r = call();
            core.value.emplace(&r);
        } else {
            core.value.emplace(call());
        }
    }
    Core& state() const { return static_cast<Core&>(*core_); }

    bool wait_for_end(detail::os::Deadline deadline, const char* what) {
        if (!core_->started()) detail::throw_not_started(what, name());
        if (!core_->wait_until(deadline)) return false;
        if (thread_.joinable()) {
            std::lock_guard<std::mutex> lk(state().join_mutex);
            if (thread_.joinable()) thread_.join();
        }
        return true;
    }
    detail::result_ref_t<R> result_at(detail::os::Deadline deadline) {
        if (!wait_for_end(deadline, "result")) detail::throw_timeout(name());
        if (auto e = core_->error()) std::rethrow_exception(e);
        if constexpr (!std::is_void_v<R>) {
            Core& c = state();
            std::lock_guard<std::mutex> lk(c.value_mutex);
            if (c.value_taken) detail::throw_result_taken(name());
            if constexpr (std::is_reference_v<R>) return **c.value;
            else return *c.value;
        }
    }
    R take_at(detail::os::Deadline deadline) {
        if (!wait_for_end(deadline, "result")) detail::throw_timeout(name());
        if (auto e = core_->error()) std::rethrow_exception(e);
        if constexpr (!std::is_void_v<R>) {
            Core& c = state();
            std::lock_guard<std::mutex> lk(c.value_mutex);
            if (c.value_taken) detail::throw_result_taken(name());
            c.value_taken = true;
            if constexpr (std::is_reference_v<R>) {
                return **c.value;
            } else {
                R v = std::move(*c.value);
                c.value.reset();
                return v;
            }
        }
    }
    std::exception_ptr exception_at(detail::os::Deadline deadline) {
        if (!wait_for_end(deadline, "exception")) detail::throw_timeout(name());
        return core_->error();
    }

    detail::Shared<std::atomic<bool>> stop_;
    detail::Owned<detail::Task> body_;
    std::thread thread_;
};

template <class F, class... A>
Thread(F, A...) -> Thread<detail::thread_result_t<F, A...>>;

}  // namespace mpservice
