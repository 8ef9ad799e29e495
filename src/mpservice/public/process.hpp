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
// Arguments are converted to the target's parameter types when the Process is
// made, as std::thread converts them (a literal for a std::string parameter,
// an int for a double); the child receives that copy.  A target that cannot
// work is one static_assert saying why and what to do: a T& parameter or a
// reference result (the child cannot write into the parent's objects), and -
// under SpawnContext, ForkServerContext or no context - a lambda with
// captures, a generic lambda or a member function (use ForkContext).  Where
// the type cannot tell (a std::function; a Context chosen at run time),
// start() checks.
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
#include <functional>
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

/// The context for "spawn", "fork" or "forkserver"; for "" (no argument) the
/// default context, as Python's get_context(None) (see set_start_method);
/// std::invalid_argument for any other name.
MPSERVICE_API const Context& get_context(const std::string& method = "");

/// Chooses the process-wide default start method ("spawn", "fork" or
/// "forkserver"), as Python's multiprocessing.set_start_method: a Process made
/// without a context - and the Pool and server process - use it.  The default
/// is fixed once: by the first call, or by its first use (a Process without a
/// context, default_context(), get_start_method()).  Setting it again without
/// `force` is an InvalidStateError, as Python's RuntimeError; `force = true`
/// replaces it, and ("", true) makes it unchosen again (Python: None, force=True).  Children inherit it.  std::invalid_argument for an unknown name.
/// A target only the fork context can run (a lambda with captures, ...) is
/// still refused at compile time by a Process without a context - name
/// mp::ForkContext{}, or pass default_context() to check at start() instead.
MPSERVICE_API void set_start_method(const std::string& method, bool force = false);
/// The default start method's name, fixing it to "spawn" if none was chosen;
/// with `allow_none`, "" when none was chosen yet (and nothing is fixed).
MPSERVICE_API std::string get_start_method(bool allow_none = false);
/// Every start method this platform has: {"spawn", "fork", "forkserver"}.
MPSERVICE_API std::vector<std::string> get_all_start_methods();
/// The context of the default start method (fixing it, see set_start_method).
MPSERVICE_API const Context& default_context();

/// CPUs this process may use: the affinity mask, lowered by a cgroup CPU
/// quota (rounded up); at least 1.
MPSERVICE_API int cpu_count();

/// The default of Process::set_forward_output for Process objects made from
/// now on (initially false: a child writes to the parent's own standard output
/// and error directly, as a plain fork/exec does).
MPSERVICE_API void set_output_forwarding(bool forward) noexcept;
MPSERVICE_API bool output_forwarding() noexcept;

/// Warm spawn (off by default): the default of Process::set_warm_start for
/// Process objects made from now on.  A spawn start that is warm takes a
/// child exec'd ahead of demand - bootstrapped and waiting for a task - and
/// has the next one made at once, so the exec is paid before the start rather
/// than in it.  The child is used only if the working directory and the
/// environment are still those it was made with (else the start spawns
/// afresh); it dies with this process, even by SIGKILL.  false also discards
/// the waiting child.  Costs nothing until a warm start happens; from then on
/// one idle child process (and a thread that makes them) exist.
MPSERVICE_API void set_warm_spawn(bool keep_warm);
MPSERVICE_API bool warm_spawn() noexcept;

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

/// What the child stores and receives: the parameter type without cv-ref
/// qualifiers (a `const std::string&` parameter travels as a std::string).
template <class P>
using stored_t = std::remove_cv_t<std::remove_reference_t<P>>;

template <class R, class Fn, class... S>
void trampoline(const void* target, Decoder& in, Encoder& out, std::shared_ptr<void>& keep) {
    Fn fn = reinterpret_cast<Fn>(reinterpret_cast<std::uintptr_t>(target));
    std::tuple<S...> args{in.read<S>()...};  // braced: decoded left to right
    in.expect_end("process arguments");
    if constexpr (std::is_void_v<R>) {
        std::apply(fn, std::move(args));
        (void)out;
        (void)keep;
    } else {
        write_kept(out, keep, [&]() -> R { return static_cast<R>(std::apply(fn, std::move(args))); });
    }
}

// ---- what the type of a callable tells about it

template <class... T>
struct type_list {};

/// The signature of a callable whose type shows it: a function pointer, or a
/// class with exactly one, non-template operator() (a lambda with concrete
/// parameter types, a std::function, a function object).
template <class F, class = void>
struct signature_of {
    static constexpr bool known = false;
};
template <class R, class... P>
struct signature_is {
    static constexpr bool known = true;
    static constexpr std::size_t arity = sizeof...(P);
    using result = R;
    using params = type_list<P...>;
    using pointer = R (*)(P...);
};
template <class R, class... P>
struct signature_of<R (*)(P...)> : signature_is<R, P...> {};
template <class R, class... P>
struct signature_of<R (*)(P...) noexcept> : signature_is<R, P...> {};

template <class M>
struct call_operator_signature {
    static constexpr bool known = false;
};
#define MPSERVICE_CALL_OPERATOR_SIGNATURE(QUALIFIERS)                              \
    template <class C, class R, class... P>                                        \
    struct call_operator_signature<R (C::*)(P...) QUALIFIERS> : signature_is<R, P...> {}; \
    template <class C, class R, class... P>                                        \
    struct call_operator_signature<R (C::*)(P...) QUALIFIERS noexcept> : signature_is<R, P...> {};
MPSERVICE_CALL_OPERATOR_SIGNATURE()
MPSERVICE_CALL_OPERATOR_SIGNATURE(const)
MPSERVICE_CALL_OPERATOR_SIGNATURE(&)
MPSERVICE_CALL_OPERATOR_SIGNATURE(const&)
MPSERVICE_CALL_OPERATOR_SIGNATURE(&&)
MPSERVICE_CALL_OPERATOR_SIGNATURE(const&&)
#undef MPSERVICE_CALL_OPERATOR_SIGNATURE
template <class F>
struct signature_of<F, std::enable_if_t<std::is_class_v<F>, std::void_t<decltype(&F::operator())>>>
    : call_operator_signature<decltype(&F::operator())> {};

template <class F>
struct is_std_function : std::false_type {};
template <class Sig>
struct is_std_function<std::function<Sig>> : std::true_type {};

/// The plain function pointer behind a callable, when its type guarantees one:
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

/// How a callable can reach a spawned or fork-server child.
enum class TargetKind {
    plain,          ///< a function's address: runs under every context
    maybe_plain,    ///< a std::function: only its content, at run time, tells
    stateful,       ///< a lambda with captures or a function object: fork only
    generic,        ///< a generic lambda or overloaded function object: fork only
    member,         ///< a pointer to member (needs its object): fork only
};
template <class F>
constexpr TargetKind target_kind() {
    if constexpr (function_pointer_of<F>::value) return TargetKind::plain;
    else if constexpr (is_std_function<F>::value) return TargetKind::maybe_plain;
    else if constexpr (std::is_member_pointer_v<F>) return TargetKind::member;
    else if constexpr (signature_of<F>::known) return TargetKind::stateful;
    else return TargetKind::generic;
}

/// Which contexts a Process constructor may use, as far as its type shows.
enum class ContextCheck {
    spawn,     ///< SpawnContext, ForkServerContext, or none (the default is chosen at run time)
    fork,      ///< ForkContext: any callable
    run_time,  ///< a Context& of unknown kind: start() checks
};

/// The one problem (if any) of running F with arguments A under `check`;
/// Process reports it with one static_assert.
enum class TargetProblem {
    none,
    needs_fork_stateful,
    needs_fork_generic,
    needs_fork_member,
    wrong_arity,
    mutable_reference_parameter,
    not_convertible,
    not_invocable,
    returns_reference,
    result_not_convertible,
};

template <class P>
constexpr bool is_mutable_lvalue_ref_v =
    std::is_lvalue_reference_v<P> && !std::is_const_v<std::remove_reference_t<P>>;

template <class Params, class... A>
struct params_check;
template <class... P, class... A>
struct params_check<type_list<P...>, A...> {
    static constexpr bool any_mutable_ref = (is_mutable_lvalue_ref_v<P> || ...);
    static constexpr bool all_convert() {
        if constexpr (sizeof...(P) != sizeof...(A)) return false;
        else return (std::is_convertible_v<A&&, stored_t<P>> && ...);
    }
};

/// Whether the target has a parameter list of its own (not a pointer to member).
template <class F>
constexpr bool has_own_signature_v = signature_of<F>::known && !std::is_member_pointer_v<F>;

template <class R, class F, ContextCheck check, class... A>
constexpr TargetProblem target_problem() {
    constexpr TargetKind kind = target_kind<F>();
    if constexpr (check == ContextCheck::spawn && kind == TargetKind::stateful) return TargetProblem::needs_fork_stateful;
    else if constexpr (check == ContextCheck::spawn && kind == TargetKind::generic) return TargetProblem::needs_fork_generic;
    else if constexpr (check == ContextCheck::spawn && kind == TargetKind::member) return TargetProblem::needs_fork_member;
    else if constexpr (has_own_signature_v<F>) {
        using sig = signature_of<F>;
        using pc = params_check<typename sig::params, A...>;
        if constexpr (sig::arity != sizeof...(A)) return TargetProblem::wrong_arity;
        else if constexpr (pc::any_mutable_ref) return TargetProblem::mutable_reference_parameter;
        else if constexpr (!pc::all_convert()) return TargetProblem::not_convertible;
        else if constexpr (std::is_reference_v<typename sig::result>) return TargetProblem::returns_reference;
        else if constexpr (!std::is_void_v<R> && !std::is_convertible_v<typename sig::result, R>)
            return TargetProblem::result_not_convertible;
        else return TargetProblem::none;
    } else if constexpr (!std::is_invocable_v<F&, std::decay_t<A>...>) {
        return TargetProblem::not_invocable;
    } else {
        using result = std::invoke_result_t<F&, std::decay_t<A>...>;
        if constexpr (std::is_reference_v<result>) return TargetProblem::returns_reference;
        else if constexpr (!std::is_void_v<R> && !std::is_convertible_v<result, R>)
            return TargetProblem::result_not_convertible;
        else return TargetProblem::none;
    }
}

/// Stands for the result of a call that cannot be made, so that class template
/// argument deduction succeeds and the constructor's static_assert explains.
struct uncallable_target {};

template <class F, class... A>
auto deduced_result() {
    if constexpr (has_own_signature_v<F>) return type_list<stored_t<typename signature_of<F>::result>>{};
    else if constexpr (std::is_invocable_v<F&, std::decay_t<A>...>)
        return type_list<stored_t<std::invoke_result_t<F&, std::decay_t<A>...>>>{};
    else return type_list<uncallable_target>{};
}
template <class L>
struct first_of;
template <class T>
struct first_of<type_list<T>> {
    using type = T;
};

template <class F, class... A>
struct process_result_impl {
    using type = typename first_of<decltype(deduced_result<F, A...>())>::type;
};
// No `type` for a Context or a worker in first place: those are other constructors.
template <class F, class... A>
using process_result_t = typename std::enable_if_t<
    !std::is_base_of_v<mpservice::Context, std::decay_t<F>> && !std::is_base_of_v<Worker, std::decay_t<F>>,
    process_result_impl<std::decay_t<F>, A...>>::type;

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

template <class Fp>
const void* address_of_function(Fp fp) {
    return reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(fp));
}

/// F called with stored arguments S (the target's parameter types, or the
/// decayed arguments when the target's type does not show its parameters).
template <class R, class F, class... S>
class ChildTaskOf final : public ChildTask {
public:
    template <class FF, class... AA>
    explicit ChildTaskOf(FF&& f, AA&&... args) : f_(std::forward<FF>(f)), args_(std::forward<AA>(args)...) {
        if constexpr (function_pointer_of<F>::value) {
            auto fp = function_pointer_of<F>::get(f_);
            target = address_of_function(fp);
            trampoline = &detail::trampoline<R, decltype(fp), S...>;
        } else if constexpr (is_std_function<F>::value) {
            // Only its content tells: a plain function inside runs anywhere.
            using Fp = typename signature_of<F>::pointer;
            if (const Fp* fp = f_.template target<Fp>()) {
                target = address_of_function(*fp);
                trampoline = &detail::trampoline<R, Fp, S...>;
            }
        }
    }
    void encode_args(Encoder& out) const override {
        if (target) std::apply([&](const auto&... a) { (out.write(a), ...); }, args_);
    }
    void run_here(Encoder& result, std::shared_ptr<void>& keep) override {
        if constexpr (std::is_void_v<R>) {
            std::apply(f_, std::move(args_));
            (void)result;
            (void)keep;
        } else {
            write_kept(result, keep, [&]() -> R { return static_cast<R>(std::apply(f_, std::move(args_))); });
        }
    }

private:
    F f_;
    std::tuple<S...> args_;
};

template <class R, class F, class Params, class... A>
struct child_task_for;
template <class R, class F, class... P, class... A>
struct child_task_for<R, F, type_list<P...>, A...> {
    using type = ChildTaskOf<R, F, stored_t<P>...>;
};

/// The task of a Process<R> over f(args...), or - after one static_assert
/// that says what is wrong and what to do - nothing.
template <class R, ContextCheck check, class FF, class... A>
Owned<ChildTask> make_child_task(FF&& f, A&&... args) {
    using F = std::decay_t<FF>;
    constexpr TargetProblem problem = target_problem<R, F, check, A...>();
    static_assert(problem != TargetProblem::needs_fork_stateful,
                  "mpservice::Process: this target carries state (a lambda with captures, or a function object). "
                  "A spawned or fork-server child is a fresh program that is sent only a function's address and "
                  "the arguments, so it cannot have that state. Use a free function, a static member function or "
                  "a capture-less lambda and pass the state as arguments - or run it in a forked copy of this "
                  "process: mp::Process p(mp::ForkContext{}, f, args...). (A Process without a context is checked "
                  "as spawn, because the default start method is chosen at run time.)");
    static_assert(problem != TargetProblem::needs_fork_generic,
                  "mpservice::Process: this target is a generic lambda or an overloaded function object, so it is "
                  "not one function the child could be told to run. Give its parameters concrete types (a "
                  "capture-less lambda, a free or static member function) - or run it in a forked copy of this "
                  "process: mp::Process p(mp::ForkContext{}, f, args...). (A Process without a context is checked "
                  "as spawn, because the default start method is chosen at run time.)");
    static_assert(problem != TargetProblem::needs_fork_member,
                  "mpservice::Process: a member function needs its object, which lives in this process; a spawned "
                  "or fork-server child cannot call it. Use a free or static member function that takes the "
                  "object's data as arguments - or run it in a forked copy of this process: "
                  "mp::Process p(mp::ForkContext{}, &T::method, object, args...). (A Process without a context is "
                  "checked as spawn, because the default start method is chosen at run time.)");
    static_assert(problem != TargetProblem::wrong_arity,
                  "mpservice::Process: the number of arguments does not match the target's parameters (default "
                  "arguments do not count: a function pointer has none).");
    static_assert(problem != TargetProblem::mutable_reference_parameter,
                  "mpservice::Process: the target has a non-const lvalue reference parameter (T&). The child "
                  "works on its own copy of the argument, in another process: it cannot write into the parent's "
                  "object. Return the value instead (the parent reads it with result()), or pass a shared "
                  "mp::Value<T> / mp::Array<T> (by value: both processes then see the same memory).");
    static_assert(problem != TargetProblem::not_convertible,
                  "mpservice::Process: an argument does not convert to the target's parameter type. Arguments "
                  "are converted to the parameter types when the Process is made (as std::thread converts them "
                  "at the call), and that copy is what the child receives.");
    static_assert(problem != TargetProblem::not_invocable,
                  "mpservice::Process: the target cannot be called with copies of these arguments, passed as "
                  "rvalues (as std::thread passes them).");
    static_assert(problem != TargetProblem::returns_reference,
                  "mpservice::Process: the target returns a reference. A reference into the child's memory means "
                  "nothing in the parent: return the value (it is sent back; result() gives it), or write into a "
                  "shared mp::Value<T> / mp::Array<T>.");
    static_assert(problem != TargetProblem::result_not_convertible,
                  "mpservice::Process<R>: the target's return type does not convert to R.");
    if constexpr (problem != TargetProblem::none) {
        return Owned<ChildTask>();
    } else if constexpr (has_own_signature_v<F>) {
        using Task = typename child_task_for<R, F, typename signature_of<F>::params, A...>::type;
        return Owned<ChildTask>(new Task(std::forward<FF>(f), std::forward<A>(args)...));
    } else {
        return Owned<ChildTask>(
            new ChildTaskOf<R, F, std::decay_t<A>...>(std::forward<FF>(f), std::forward<A>(args)...));
    }
}

/// The non-template part of a Process: the child, its channel and its outcome.
class ProcessCore : public FutureCore, public std::enable_shared_from_this<ProcessCore> {
public:
    MPSERVICE_API explicit ProcessCore(const Context& ctx);
    MPSERVICE_API ~ProcessCore() override;

    /// Starts the child; takes `task` only if it succeeds (a failed start can be retried).
    MPSERVICE_API void start(Owned<ChildTask>& task);
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
    bool value_taken = false;  ///< take_result() moved the value out

    /// The lock of this core's state (the implementation's reactor uses it).
    std::mutex& io_mutex() const { return mutex_; }

    // ---- the rest is the implementation's (parent-side bookkeeping, reactor state)
    struct Io;
    StartMethod method_;
    bool daemon_ = false;
    long pid_ = 0;
    int exitcode_ = 0;
    bool exited_ = false;  // exitcode_ is known (a std::optional<int> here would cost every includer its instantiation)
    bool has_value_ = false;
    std::string value_bytes_;
    std::vector<os::handle_t> value_handles_;
    std::string identity_;  // "3", or "1:3" in a child: numbers the default name
    bool forward_output_ = output_forwarding();  // Process::set_forward_output
    bool warm_start_ = warm_spawn();              // Process::set_warm_start
    Owned<Io> io_;
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
/// Test hook: returns once the reactor thread has finished handling every
/// event it was handling when called.  A joined child's core (its pidfd) is
/// released by the reactor just after it resolves the child; descriptor
/// counts taken after this call are exact.
MPSERVICE_API void test_reactor_barrier();
/// Test hook: the address-space holders of ended warm children that the
/// reactor has not reaped yet (each ends just after its child, when it gets
/// a CPU: it runs at idle priority).
MPSERVICE_API int test_unreaped_holders() noexcept;
/// Test hook: the pid of the warm spawn child once it is ready (bootstrapped,
/// waiting for a task), waiting at most `timeout`; 0 if there is none by then.
MPSERVICE_API long test_warm_child(std::chrono::milliseconds timeout);
/// Discards the waiting warm spawn child, unless set_warm_spawn(true) keeps
/// one for the whole program: a Pool whose replacement workers took warm
/// starts calls it when it ends, so that no idle child outlives the pool.
MPSERVICE_API void discard_unwanted_warm_child() noexcept;

/// The phases of a start that bench/bench_process.cpp times (see
/// bench/PERFORMANCE-process.md).  Child phases are recorded by forked
/// children only (they share the parent's slots); an exec'd child cannot.
enum class StartPhase : int {
    start_entered,    ///< parent: ProcessCore::start begins
    child_made,       ///< parent: fork()/spawn returned the child
    start_returned,   ///< parent: start() returns
    child_running,    ///< child: first instruction after fork()
    task_begins,      ///< child: bootstrap done, the target is called
    outcome_sent,     ///< child: VALUE/EXCEPTION and END written
    child_exiting,    ///< child: about to _exit
    reactor_outcome,  ///< parent's reactor: END read
    reactor_exit,     ///< parent's reactor: the child's exit seen (pidfd)
    resolved,         ///< parent's reactor: the Process resolved
    waiter_woke,      ///< the thread in result()/join(): its wait on the pidfd returned
    count
};
/// Bench hook: every start from now on writes the steady-clock time (ns) of
/// each StartPhase into slots[phase] (StartPhase::count slots, in memory a
/// forked child shares, e.g. MAP_SHARED); nullptr stops.  One relaxed load per
/// phase when off.
MPSERVICE_API void test_trace_start_phases(std::int64_t* slots) noexcept;

/// What every Process<R> has that does not depend on R and is defined in the
/// implementation: a function of the template returning std::optional<int>
/// would instantiate it in every includer.
class ProcessBase : public Worker {
public:
    /// Empty while running; 0 after success, n after exit(n), 1 after an
    /// exception, -N after signal N.
    MPSERVICE_API std::optional<int> exitcode() const;

protected:
    using Worker::Worker;
};

}  // namespace detail

/// A child process running target(args...) and delivering its result like a
/// future.  See the top of this file for targets, contexts and lifetime.
template <class R>
class Process : public detail::ProcessBase {
    using Core = detail::ProcessCore;

public:
    /// Prepares (does not start) a child in the default context
    /// (default_context(): spawn unless set_start_method chose another).
    /// Arguments are converted to the target's parameter types here, and the
    /// child receives that copy.  Targets that only the fork context can run
    /// are refused at compile time (the default is chosen at run time).
    template <class F, class... A,
              std::enable_if_t<!std::is_base_of_v<Context, std::decay_t<F>> &&
                                   !std::is_base_of_v<Worker, std::decay_t<F>>,
                               int> = 0>
    explicit Process(F&& f, A&&... args)
        : ProcessBase(std::make_shared<Core>(default_context())),
          task_(detail::make_child_task<R, detail::ContextCheck::spawn>(std::forward<F>(f),
                                                                          std::forward<A>(args)...)) {}

    /// Prepares a child made by `ctx`.  With SpawnContext or ForkServerContext
    /// a target that needs the fork context is a compile-time error; with
    /// ForkContext any callable runs; with a Context of run-time kind
    /// (get_context(...), default_context()) start() checks.
    template <class Ctx, class F, class... A, std::enable_if_t<std::is_base_of_v<Context, Ctx>, int> = 0>
    Process(const Ctx& ctx, F&& f, A&&... args)
        : ProcessBase(std::make_shared<Core>(ctx)),
          task_(detail::make_child_task<R, check_for<Ctx>()>(std::forward<F>(f), std::forward<A>(args)...)) {}

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
    /// The value is decoded once and kept: every call returns the same object.
    detail::result_ref_t<R> result() & { return result_at(detail::os::no_deadline); }
    /// As result(), but TimeoutError if the child is still running after `timeout`.
    template <class Rep, class Period>
    detail::result_ref_t<R> result(std::chrono::duration<Rep, Period> timeout) & {
        return result_at(detail::os::deadline_after(timeout));
    }
    /// std::move(p).result(): the value moved out (see take_result).
    R result() && { return take_result(); }
    template <class Rep, class Period>
    R result(std::chrono::duration<Rep, Period> timeout) && {
        return take_result(timeout);
    }
    /// The target's return value, moved out of this Process rather than
    /// copied (waits; re-throws as result()).  Afterwards result() and
    /// take_result() are an InvalidStateError; join() and exception() still work.
    R take_result() { return take_at(detail::os::no_deadline); }
    template <class Rep, class Period>
    R take_result(std::chrono::duration<Rep, Period> timeout) {
        return take_at(detail::os::deadline_after(timeout));
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
    /// Under the spawn context (before start): take the child exec'd ahead of
    /// demand if there is a current one, and have the next one made (see
    /// set_warm_spawn, whose value is the default).  Other contexts ignore it.
    void set_warm_start(bool warm) {
        if (state().started()) throw InvalidStateError("mpservice: set_warm_start() after start()");
        state().warm_start_ = warm;
    }
    bool warm_start() const { return state().warm_start_; }

private:
    template <class Ctx>
    static constexpr detail::ContextCheck check_for() {
        if constexpr (std::is_same_v<Ctx, ForkContext>) return detail::ContextCheck::fork;
        else if constexpr (std::is_same_v<Ctx, SpawnContext> || std::is_same_v<Ctx, ForkServerContext>)
            return detail::ContextCheck::spawn;
        else return detail::ContextCheck::run_time;
    }
    Core& state() const { return static_cast<Core&>(*core_); }

    bool wait_at(detail::os::Deadline deadline, const char* what) {
        if (!core_->started()) detail::throw_not_started(what, name());
        return core_->wait_until(deadline);
    }
    void join_at(detail::os::Deadline deadline) {
        if (!wait_at(deadline, "join")) return;
        if (auto e = core_->error()) detail::rethrow_exception(e);
    }
    /// Waits, then throws what result() throws instead of a value.
    void check_value_at(detail::os::Deadline deadline) {
        if (!wait_at(deadline, "result")) detail::throw_timeout(name());
        if (auto e = core_->error()) detail::rethrow_exception(e);
        if constexpr (std::is_void_v<R>) {
            // exit(0) from a void target is a success; a SIGTERM is not.
            if (!state().has_value() && this->exitcode() != 0)  // `this->`: checked where used
                if (auto e = core_->result_error()) detail::rethrow_exception(e);
        } else {
            if (!state().has_value()) detail::rethrow_exception(core_->result_error());
        }
    }
    R decode_value(Core& c) {
        Decoder d(c.value_bytes().data(), c.value_bytes().size(), &c.value_handles());
        R v = d.template read<R>();
        d.expect_end("process result");
        return v;
    }
    detail::result_ref_t<R> result_at(detail::os::Deadline deadline) {
        check_value_at(deadline);
        if constexpr (!std::is_void_v<R>) {
            Core& c = state();
            std::lock_guard<std::mutex> lk(c.value_mutex);
            if (c.value_taken) detail::throw_result_taken(name());
            if (!c.decoded) c.decoded = std::make_shared<R>(decode_value(c));
            return *static_cast<const R*>(c.decoded.get());
        }
    }
    R take_at(detail::os::Deadline deadline) {
        check_value_at(deadline);
        if constexpr (!std::is_void_v<R>) {
            Core& c = state();
            std::lock_guard<std::mutex> lk(c.value_mutex);
            if (c.value_taken) detail::throw_result_taken(name());
            c.value_taken = true;
            if (!c.decoded) return decode_value(c);  // straight out: never kept, never copied
            std::shared_ptr<void> kept = std::move(c.decoded);
            return std::move(*static_cast<R*>(kept.get()));
        }
    }
    std::exception_ptr exception_at(detail::os::Deadline deadline) {
        if (!wait_at(deadline, "exception")) detail::throw_timeout(name());
        return core_->error();
    }

    detail::Owned<detail::ChildTask> task_;
};

template <class F, class... A>
Process(F, A...) -> Process<detail::process_result_t<F, A...>>;
template <class Ctx, class F, class... A, std::enable_if_t<std::is_base_of_v<Context, Ctx>, int> = 0>
Process(const Ctx&, F, A...) -> Process<detail::process_result_t<F, A...>>;

}  // namespace mpservice
