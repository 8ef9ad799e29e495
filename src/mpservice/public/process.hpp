// process: child processes used as futures, the start-up hook and the contexts.
//
//     int main(int argc, char** argv) {
//         mp::init(argc, argv);               // first line: a spawned child runs its task here
//         mp::Process p(work, 21);            // spawn context by default; CTAD: Process<double>
//         p.start();
//         double r = p.result();              // waits; re-throws the child's exception
//     }
//
// Targets: any free function, static member function or capture-less lambda,
// with arguments and a return value the codec handles (or void).  Nothing is
// registered: the child is told the target's offset inside its module, and
// checks that it runs the same build.  Under the fork context a callable with
// captures works too (it simply runs in the forked copy).
//
// The context is the optional first constructor argument,
//     mp::Process p(mp::ForkServerContext{}, work, 21);
//     mp::Process q(mp::get_context("fork"), work, 21);
// rather than a factory member such as ctx.Process(...): a constructor keeps
// class template argument deduction, and one Process type serves every context.
//
// Lifetime: destroying a started Process that has not finished waits for the
// child, as std::jthread waits for its thread; a daemon child is terminated
// (SIGTERM) first.  Children never outlive their parent: each one is killed
// when its parent dies, even by SIGKILL; at normal exit the parent terminates
// its daemon children and waits for the others (as Python does).
//
// Linux is the implemented platform; the system calls live in detail/os.hpp.
#pragma once

#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/os.hpp"
#include "codec.hpp"
#include "errors.hpp"
#include "futures.hpp"
#include "remote_exception.hpp"

namespace mpservice {

/// Call as the first line of main().  In a child process started by this
/// library it runs the child's task and never returns (the process exits with
/// the task's exit code).  In any other process it returns at once, after
/// starting the fork server (a clean copy of the program, made before any
/// thread exists, that the fork-server context forks workers from).
MPSERVICE_API void init(int argc, char** argv);

/// How a child process is made.
enum class StartMethod {
    spawn,       ///< a fresh exec of this program: no inherited threads, locks or heap state (default)
    fork,        ///< fork(): fastest, runs any callable, but unsafe once the parent has threads;
                 ///< the child starts with default signal handlers, like the other contexts' children
    forkserver,  ///< fork() of a server forked at init(), before any thread existed
};

/// A start method; pass one as the first argument of Process.
class Context {
public:
    constexpr explicit Context(StartMethod method) noexcept : method_(method) {}
    constexpr StartMethod start_method() const noexcept { return method_; }
    /// "spawn", "fork" or "forkserver".
    MPSERVICE_API const char* name() const noexcept;

private:
    StartMethod method_;
};
class SpawnContext : public Context {
public:
    constexpr SpawnContext() noexcept : Context(StartMethod::spawn) {}
};
class ForkContext : public Context {
public:
    constexpr ForkContext() noexcept : Context(StartMethod::fork) {}
};
class ForkServerContext : public Context {
public:
    constexpr ForkServerContext() noexcept : Context(StartMethod::forkserver) {}
};

/// The default context (as the seed's MP_SPAWN_CTX).
inline constexpr SpawnContext MP_SPAWN_CTX{};

/// The context for "spawn", "fork" or "forkserver"; std::invalid_argument otherwise.
MPSERVICE_API const Context& get_context(const std::string& method = "spawn");

/// CPUs this process may use: the affinity mask, lowered by a cgroup CPU
/// quota (rounded up); at least 1.
MPSERVICE_API int cpu_count();

/// The default of Process::set_forward_output for Process objects made from
/// now on (initially false: a child writes to the parent's own standard output
/// and error directly, as a plain fork/exec does).
MPSERVICE_API void set_output_forwarding(bool forward) noexcept;
MPSERVICE_API bool output_forwarding() noexcept;

/// A process as current_process() and friends describe it.
struct ProcessInfo {
    std::string name;  ///< "MainProcess", or the Process's name in a child
    long pid = 0;
};
/// This process (name and pid).
MPSERVICE_API ProcessInfo current_process();
/// The process that started this one; empty in the main process.
MPSERVICE_API std::optional<ProcessInfo> parent_process();
/// Children started by this process that have not finished yet.
MPSERVICE_API std::vector<ProcessInfo> active_children();

namespace detail {

/// Runs in the child: decodes the arguments, calls the target, encodes the
/// result; `keep` holds the result until it has been sent.
using Trampoline = void (*)(const void* target, Decoder& args, Encoder& result, std::shared_ptr<void>& keep);

/// Writes the value `call()` returns into `out` and keeps it alive in `keep`:
/// a shared object (Lock, Queue, ...) attaches its OS handle, which stays open
/// only as long as the object does, and the message leaves after the target
/// has returned - a temporary would close the handle before it is sent.
template <class Call>
void write_kept(Encoder& out, std::shared_ptr<void>& keep, Call&& call) {
    using V = decltype(call());
    if constexpr (std::is_lvalue_reference_v<V>) {
        out.write(call());  // the referent outlives the call
    } else {
        auto held = std::make_shared<std::decay_t<V>>(call());
        out.write(*held);
        keep = std::move(held);
    }
}

template <class Fn, class... A>
void trampoline(const void* target, Decoder& in, Encoder& out, std::shared_ptr<void>& keep) {
    Fn fn = reinterpret_cast<Fn>(reinterpret_cast<std::uintptr_t>(target));
    std::tuple<A...> args{in.read<A>()...};  // braced: decoded left to right
    in.expect_end("process arguments");
    if constexpr (std::is_void_v<std::invoke_result_t<Fn, A...>>) {
        std::apply(fn, std::move(args));
        (void)out;
        (void)keep;
    } else {
        write_kept(out, keep, [&]() -> decltype(auto) { return std::apply(fn, std::move(args)); });
    }
}

/// The plain function pointer behind a callable, when it has one: a function,
/// a function pointer, a static member function or a capture-less lambda.
template <class F, class = void>
struct function_pointer_of {
    static constexpr bool value = false;
};
template <class F>
struct function_pointer_of<F, std::enable_if_t<std::is_pointer_v<F> && std::is_function_v<std::remove_pointer_t<F>>>> {
    static constexpr bool value = true;
    static F get(F f) { return f; }
};
template <class F>
struct function_pointer_of<
    F, std::enable_if_t<std::is_class_v<F> && std::is_pointer_v<decltype(+std::declval<F&>())> &&
                        std::is_function_v<std::remove_pointer_t<decltype(+std::declval<F&>())>>>> {
    static constexpr bool value = true;
    static auto get(F& f) { return +f; }
};

template <class F, class... A>
using process_result_t = std::invoke_result_t<std::decay_t<F>, std::decay_t<A>...>;

/// What a child runs: the target as an address plus trampoline (spawn,
/// fork-server) and, for fork, the callable itself.
class ChildTask {
public:
    virtual ~ChildTask() = default;
    const void* target = nullptr;  ///< null: the callable has no plain-function form
    Trampoline trampoline = nullptr;
    /// Writes the arguments (only when target is set).
    virtual void encode_args(Encoder& out) const = 0;
    /// Calls the target here (in a forked child) and writes its result, which
    /// `keep` holds until it has been sent.
    virtual void run_here(Encoder& result, std::shared_ptr<void>& keep) = 0;
};

template <class R, class F, class... A>
class ChildTaskOf final : public ChildTask {
public:
    template <class FF, class... AA>
    explicit ChildTaskOf(FF&& f, AA&&... args) : f_(std::forward<FF>(f)), args_(std::forward<AA>(args)...) {
        if constexpr (function_pointer_of<F>::value) {
            auto fp = function_pointer_of<F>::get(f_);
            target = reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(fp));
            trampoline = &detail::trampoline<decltype(fp), A...>;
        }
    }
    void encode_args(Encoder& out) const override {
        if constexpr (function_pointer_of<F>::value) {
            std::apply([&](const auto&... a) { (out.write(a), ...); }, args_);
        } else {
            (void)out;
        }
    }
    void run_here(Encoder& result, std::shared_ptr<void>& keep) override {
        if constexpr (std::is_void_v<R>) {
            std::apply(f_, std::move(args_));
            (void)result;
            (void)keep;
        } else {
            write_kept(result, keep, [&]() -> decltype(auto) { return std::apply(f_, std::move(args_)); });
        }
    }

private:
    F f_;
    std::tuple<A...> args_;
};

/// The non-template part of a Process: the child, its channel and its outcome.
class ProcessCore : public FutureCore, public std::enable_shared_from_this<ProcessCore> {
public:
    MPSERVICE_API explicit ProcessCore(const Context& ctx);
    MPSERVICE_API ~ProcessCore() override;

    /// Starts the child; takes `task` only if it succeeds (a failed start can be retried).
    MPSERVICE_API void start(std::unique_ptr<ChildTask>& task);
    /// Also watches the child's exit itself, so the waiting thread wakes with
    /// the reactor rather than after it (one cross-CPU wake-up less).
    MPSERVICE_API bool wait_until(os::Deadline deadline) const override;
    MPSERVICE_API long pid() const;
    MPSERVICE_API std::optional<int> exitcode() const;
    MPSERVICE_API bool is_alive() const;
    MPSERVICE_API void send_signal(int sig);
    /// What ~Process does: wait, after terminating a daemon.
    MPSERVICE_API void release() noexcept;
    MPSERVICE_API void set_daemon(bool daemon);
    bool daemon() const { return daemon_; }

    /// The encoded value and the handles that came with it (after done()).
    MPSERVICE_API bool has_value() const;
    const std::string& value_bytes() const { return value_bytes_; }
    const std::vector<os::handle_t>& value_handles() const { return value_handles_; }
    /// The decoded value, cached by Process<R>::result.
    std::mutex value_mutex;
    std::shared_ptr<void> decoded;

    /// The lock of this core's state (the implementation's reactor uses it).
    std::mutex& io_mutex() const { return mutex_; }

    // ---- the rest is the implementation's (parent-side bookkeeping, reactor state)
    struct Io;
    StartMethod method_;
    bool daemon_ = false;
    long pid_ = 0;
    std::optional<int> exitcode_;
    bool has_value_ = false;
    std::string value_bytes_;
    std::vector<os::handle_t> value_handles_;
    std::string identity_;  // "3", or "1:3" in a child: numbers the default name
    bool forward_output_ = output_forwarding();  // Process::set_forward_output
    std::unique_ptr<Io> io_;
};

/// Test hook: the next spawn/fork-server child is told a wrong build
/// fingerprint, as if the parent ran a different build.
MPSERVICE_API void test_corrupt_next_fingerprint() noexcept;
/// Test hook: pretend init() was (not) called.
MPSERVICE_API void test_set_initialized(bool initialized) noexcept;
/// Test hooks: the fork server's pid (0 if there is none), and how long
/// start() waits for it to make a worker before giving up on it (default 30 s).
MPSERVICE_API long test_fork_server_pid() noexcept;
MPSERVICE_API void test_set_fork_server_timeout(std::chrono::milliseconds timeout) noexcept;


}  // namespace detail

/// A child process running target(args...) and delivering its result like a
/// future.  See the top of this file for targets, contexts and lifetime.
template <class R>
class Process : public Worker {
    using Core = detail::ProcessCore;

public:
    /// Prepares (does not start) a child in the default spawn context.
    template <class F, class... A,
              std::enable_if_t<!std::is_base_of_v<Context, std::decay_t<F>> &&
                                   !std::is_same_v<std::decay_t<F>, Process>,
                               int> = 0>
    explicit Process(F&& f, A&&... args) : Process(MP_SPAWN_CTX, std::forward<F>(f), std::forward<A>(args)...) {}

    /// Prepares a child made by `ctx` (SpawnContext, ForkContext, ForkServerContext).
    template <class F, class... A>
    Process(const Context& ctx, F&& f, A&&... args)
        : Worker(std::make_shared<Core>(ctx)),
          task_(std::make_unique<detail::ChildTaskOf<R, std::decay_t<F>, std::decay_t<A>...>>(
              std::forward<F>(f), std::forward<A>(args)...)) {}

    Process(Process&&) noexcept = default;
    Process& operator=(Process&&) = delete;
    /// Waits for a started child (terminating it first if it is a daemon).
    ~Process() override {
        if (core_) state().release();
    }

    /// Starts the child.  InvalidStateError if already started, or if init()
    /// was not called (spawn, fork-server); std::invalid_argument for a
    /// callable with captures outside the fork context.
    void start() { state().start(task_); }

    /// Waits for the child to end and for every log record it sent to be
    /// handled; re-throws the child's exception, or ProcessError if it exited
    /// with a non-zero code or died of a signal - except SIGTERM, which join()
    /// accepts quietly (after terminate(), join() does not throw).
    void join() { join_at(detail::os::no_deadline); }
    /// As join(), but returns quietly if the child is still running after `timeout`.
    template <class Rep, class Period>
    void join(std::chrono::duration<Rep, Period> timeout) {
        join_at(detail::os::deadline_after(timeout));
    }

    /// The target's return value (waits).  Re-throws as join() does; a child
    /// that ended without a value (terminated, exit(0)) is a ProcessError.
    detail::result_ref_t<R> result() { return result_at(detail::os::no_deadline); }
    /// As result(), but TimeoutError if the child is still running after `timeout`.
    template <class Rep, class Period>
    detail::result_ref_t<R> result(std::chrono::duration<Rep, Period> timeout) {
        return result_at(detail::os::deadline_after(timeout));
    }

    /// The exception join() would throw, or nullptr (waits).
    std::exception_ptr exception() { return exception_at(detail::os::no_deadline); }
    /// As exception(), but TimeoutError if the child is still running after `timeout`.
    template <class Rep, class Period>
    std::exception_ptr exception(std::chrono::duration<Rep, Period> timeout) {
        return exception_at(detail::os::deadline_after(timeout));
    }

    /// Started and not yet finished.
    bool is_alive() const { return state().is_alive(); }
    /// Sends SIGTERM (no-op once the child has ended).
    void terminate() { state().send_signal(detail::os::signal_terminate()); }
    /// Sends SIGKILL (no-op once the child has ended).
    void kill() { state().send_signal(detail::os::signal_kill()); }
    /// The child's pid; 0 before start().
    long pid() const { return state().pid(); }
    /// Empty while running; 0 after success, n after exit(n), 1 after an
    /// exception, -N after signal N.
    std::optional<int> exitcode() const { return state().exitcode(); }
    /// Renames the process (before start); the child sees it as current_process().name.
    void set_name(std::string name) {
        if (state().started()) throw InvalidStateError("mpservice: cannot rename a started process");
        core_->name = std::move(name);
    }
    bool daemon() const { return state().daemon(); }
    /// Marks the child as a daemon (before start): it is terminated, not
    /// waited for, when its Process is destroyed or the parent exits.
    void set_daemon(bool daemon) { state().set_daemon(daemon); }
    /// Sends the child's standard output and error through the parent's log
    /// path (before start): each line becomes a record of logger "stdout"
    /// (Level::info) or "stderr" (Level::warning) tagged with the child's name
    /// and pid, so lines of many children never mix.  Default: output_forwarding()
    /// at the time this Process was made.
    void set_forward_output(bool forward) {
        if (state().started()) throw InvalidStateError("mpservice: set_forward_output() after start()");
        state().forward_output_ = forward;
    }
    bool forward_output() const { return state().forward_output_; }

private:
    Core& state() const { return static_cast<Core&>(*core_); }

    bool wait_at(detail::os::Deadline deadline, const char* what) {
        if (!core_->started()) detail::throw_not_started(what, name());
        return core_->wait_until(deadline);
    }
    void join_at(detail::os::Deadline deadline) {
        if (!wait_at(deadline, "join")) return;
        if (auto e = core_->error()) detail::rethrow_exception(e);
    }
    detail::result_ref_t<R> result_at(detail::os::Deadline deadline) {
        if (!wait_at(deadline, "result")) detail::throw_timeout(name());
        if (auto e = core_->error()) detail::rethrow_exception(e);
        if constexpr (std::is_void_v<R>) {
            // exit(0) from a void target is a success; a SIGTERM is not.
            if (!state().has_value() && state().exitcode() != 0)
                if (auto e = core_->result_error()) detail::rethrow_exception(e);
        } else {
            if (!state().has_value()) detail::rethrow_exception(core_->result_error());
            Core& c = state();
            std::lock_guard<std::mutex> lk(c.value_mutex);
            if (!c.decoded) {
                Decoder d(c.value_bytes().data(), c.value_bytes().size(), &c.value_handles());
                auto v = std::make_shared<R>(d.template read<R>());
                d.expect_end("process result");
                c.decoded = std::move(v);
            }
            return *static_cast<const R*>(c.decoded.get());
        }
    }
    std::exception_ptr exception_at(detail::os::Deadline deadline) {
        if (!wait_at(deadline, "exception")) detail::throw_timeout(name());
        return core_->error();
    }

    std::unique_ptr<detail::ChildTask> task_;
};

template <class F, class... A>
Process(F, A...) -> Process<detail::process_result_t<F, A...>>;
template <class F, class... A>
Process(const Context&, F, A...) -> Process<detail::process_result_t<F, A...>>;

}  // namespace mpservice
