// runner: ProcessRunner<T>, one persistent process holding a T that is built
// once and then called any number of times.
//
//     struct Scaler {
//         Scaler(mp::Queue<int> out, int factor);          // runs once, in the child
//         int operator()(int x);                           // each call runs in the child
//     };
//     mp::ProcessRunner<Scaler> r(out_queue, 3);           // starts the process
//     int y = r(14);                                       // blocks for the result
//     mp::AsyncResult<int> f = r.submit(15);               // or later: f.get()
//     r.join();                                            // or let the destructor do it
//
// The constructor's arguments travel when the process starts, as Process
// arguments do, so they may be library handles (Queue, Lock, Value, ...).
// Calls run one at a time, in the order they were made.  An exception thrown
// by a call comes back typed (as from a Process) and the runner keeps serving.
// If the process dies (a signal, exit(n)), the call it was running fails with
// ProcessError naming the signal or code, every queued call fails the same
// way, and later calls fail at once: a runner is not restarted behind your
// back, since its T's state is gone.
//
// It is a one-process Pool whose tasks are calls of T::operator(), so a call
// takes the pool's fast path (shared-memory rings, no system call when both
// sides are awake).
#pragma once

#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "pool.hpp"
#include "process.hpp"

namespace mpservice {

template <class T>
class ProcessRunner {
public:
    /// Starts the process (spawn context) and constructs T(args...) there.
    template <class... A, std::enable_if_t<(sizeof...(A) == 0) ||
                                               !std::is_base_of_v<Context, std::decay_t<std::tuple_element_t<
                                                                                0, std::tuple<A..., int>>>>,
                                           int> = 0>
    explicit ProcessRunner(A&&... args) : ProcessRunner(default_context(), std::forward<A>(args)...) {}

    /// Starts the process in `ctx` and constructs T(args...) there.
    template <class... A>
    explicit ProcessRunner(const Context& ctx, A&&... args) {
        detail::PoolSettings s;
        s.processes = 1;
        s.replace_dead_workers = false;
        s.kind = detail::runner_kind;
        Context c = ctx;
        auto entry = &detail::runner_entry<T, std::decay_t<A>...>;
        detail::WorkerFactory factory = [c, entry, tup = std::make_tuple(std::decay_t<A>(std::forward<A>(args))...)](
                                            const detail::PoolWorkerBoot& boot) {
            return std::apply(
                [&](const auto&... a) { return std::make_unique<Process<void>>(c, entry, boot, a...); }, tup);
        };
        core_ = detail::PoolCore::create(std::move(s), std::move(factory));
    }

    ProcessRunner(const ProcessRunner&) = delete;
    ProcessRunner& operator=(const ProcessRunner&) = delete;

    /// Waits for the calls already made, then stops the process (join()).
    ~ProcessRunner() {
        try {
            join();
        } catch (...) {
        }
    }

    /// Calls T::operator()(args...) in the process and waits for its result;
    /// re-throws its exception, or ProcessError if the process died.
    template <class... A>
    auto operator()(A&&... args) {
        return submit(std::forward<A>(args)...).take();
    }

    /// Sends the call and returns at once; the future is ready when it has run.
    template <class... A>
    auto submit(A&&... args) {
        using R = std::invoke_result_t<T&, std::decay_t<A>...>;
        auto st = std::make_shared<detail::AsyncState<R>>(typename detail::AsyncState<R>::Success(),
                                                          typename detail::AsyncState<R>::Failure());
        st->read_from(core_);
        auto job = std::make_shared<detail::SingleJob<R>>(st);
        detail::ChunkBuilder b(job, 1);
        b.add(std::decay_t<A>(args)...);
        detail::PoolTarget t{detail::os::CodeRef{},
                             detail::pool_code_ref(detail::fn_address(&detail::run_method_chunk<T, std::decay_t<A>...>))};
        core_->submit(t, b.chunks());
        return AsyncResult<R>(st);
    }

    /// Lets the calls already made finish, then stops the process; further
    /// calls are an InvalidStateError.  Returns quietly if the process died.
    void join() {
        if (joined_) return;
        core_->close();
        core_->join();
        joined_ = true;
    }
    /// Stops the process now (SIGTERM); pending calls fail with InvalidStateError.
    void terminate() {
        core_->terminate();
        core_->join();
        joined_ = true;
    }

    /// The process's pid (0 once it has ended).
    long pid() const {
        auto p = core_->worker_pids();
        return p.empty() ? 0 : p.front();
    }

private:
    detail::Shared<detail::PoolCore> core_;
    bool joined_ = false;
};

}  // namespace mpservice
