// harness: what every row of the stress matrix shares - the verdict of one
// round, the ways a child can end, leak counters read from /proc, and the
// registry the rows add themselves to.
//
// A row is one object (or environment, or boundary) and one way of ending.
// It runs in a worker process of its own (the driver exec()s the program
// with --worker), so that a leak, a hang or a crash of one round can be
// measured and cleaned up without touching the next.  A row is a function
// `void run(Round&)` that sets up the object, starts its children, ends them
// the row's way and records what it saw with round.wrong(...),
// round.hang(...), round.lost(...) and friends.  Adding a row is one such
// function and one ROW(...) line; see rows_*.cpp.
//
// New objects get rows the same way, in a new rows_*.cpp listed in
// CMakeLists.txt - rows_pool.cpp (Pool tasks), rows_runner.cpp (ProcessRunner
// calls), rows_pipe.cpp (Pipe ends) and rows_server.cpp (server proxies and
// MemoryBlocks) are the examples: the child ends its way inside the
// operation, the parent checks the outcome and that the object still works;
// the driver checks leaks and descendants.
// A row whose failure is a known, not yet fixed defect goes into
// known_defects() in harness.cpp with the defect's number.
#pragma once

#include "mpservice.hpp"

#include <chrono>
#include <csignal>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace stress {

namespace mp = mpservice;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

/// The ways of ending of the matrix (issue 13 item 2).
enum class Ending : int {
    ret,            // the child returns (holding whatever it holds)
    thrw,           // the child throws
    exit_n,         // exit(42)
    abrt,           // abort()
    segv,           // a write through a null pointer
    sigkill,        // SIGKILL at a random instant inside a loop of operations
    sigstop,        // SIGSTOP for longer than a waiter's timeout, then SIGCONT
    parent_killed,  // the worker ("parent") is SIGKILLed while children are blocked
    none,           // rows that are not about an ending (environments, bad input, security)
};
const char* ending_name(Ending e);

/// How a segfaulting child ends: by SIGSEGV - or, under a sanitizer, which
/// catches the fault, reports it and exits (ASan with 1, TSan with 66).
#if defined(__SANITIZE_ADDRESS__)
#define STRESS_ASAN 1
#elif defined(__SANITIZE_THREAD__)
#define STRESS_TSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define STRESS_ASAN 1
#elif __has_feature(thread_sanitizer)
#define STRESS_TSAN 1
#endif
#endif
#ifdef STRESS_ASAN
constexpr int segv_exitcode = 1;
#elif defined(STRESS_TSAN)
constexpr int segv_exitcode = 66;
#else
constexpr int segv_exitcode = -SIGSEGV;
#endif

/// Exit code a child uses for Ending::exit_n.
constexpr int exit_code = 42;
/// What a child throws for Ending::thrw.
constexpr const char* thrown_message = "stress: thrown by the child";

/// The exit code a child that ended in way `e` reports (9999: none - the
/// ending is not a death).
inline int exitcode_of(Ending e) {
    return e == Ending::exit_n ? exit_code
           : e == Ending::abrt ? -SIGABRT
           : e == Ending::segv ? segv_exitcode
           : e == Ending::sigkill ? -SIGKILL
                                  : 9999;
}

/// In a child: ends the way `e` says.  For ret it returns; for the others it
/// does not (sigkill/sigstop/parent_killed are done *to* the child, so the
/// child's loop never calls this for them).
void end_child(Ending e);

/// Verdict of one round.
enum class Verdict { right, wrong, hang, skipped };

class Round {
public:
    Round(int index, std::uint64_t seed, Ending ending) : index_(index), ending_(ending), rng_(seed) {}

    int index() const { return index_; }
    Ending ending() const { return ending_; }
    /// The context of this round: spawn, fork and forkserver in turn.
    const mp::Context& context() const;
    std::mt19937_64& rng() { return rng_; }
    /// A uniformly random integer in [lo, hi].
    long uniform(long lo, long hi) { return std::uniform_int_distribution<long>(lo, hi)(rng_); }
    /// Sleeps a random time in [0, max_us] microseconds: picks the "random
    /// instant" of a kill - never used to wait for another process.
    void random_pause(long max_us);

    /// The first failure decides the verdict (later ones are kept as notes).
    void wrong(const std::string& why);
    void hang(const std::string& why);
    void skip(const std::string& why);
    /// Queue accounting: items lost beyond / within what the README allows.
    void lost(long n) { lost_ += n; }
    void allow_lost(long n) { lost_bound_ += n; }
    void duplicated(long n) { dup_ += n; }
    void reordered(long n) { reordered_ += n; }

    /// parent_killed rows: the children are blocked in their operation; the
    /// driver may now SIGKILL this process.  Does not return.
    [[noreturn]] void ready_to_be_killed();
    /// A hang the row cannot clean up after (a thread stuck in a call that has
    /// no timeout and that nothing wakes): reports the round as it stands -
    /// record the hang first - and exits at once, leaving the rest to the
    /// driver (which counts what outlives us).  Does not return.
    [[noreturn]] void abandon();

    Verdict verdict() const { return verdict_; }
    const std::string& note() const { return note_; }
    long lost_count() const { return lost_; }
    long lost_bound() const { return lost_bound_; }
    long dup_count() const { return dup_; }
    long reordered_count() const { return reordered_; }

private:
    int index_;
    Ending ending_;
    std::mt19937_64 rng_;
    Verdict verdict_ = Verdict::right;
    std::string note_;
    long lost_ = 0, lost_bound_ = 0, dup_ = 0, reordered_ = 0;
};

/// Environment a row's worker runs in, set up by the driver before exec()
/// (ulimit64) or by the worker's warm-up (warm_spawn: under spawn, the warm
/// spawner's thread and wake descriptor - program-lifetime, made by the first
/// warm start, e.g. a Pool's replacement worker - exist before the leaks are
/// counted, with no warm child waiting).
enum class Setup { none, ulimit64, warm_spawn };

struct Row {
    std::string object;  // first table column
    Ending ending;
    std::function<void(Round&)> run;
    Setup setup = Setup::none;
    int watchdog_s = 20;  // the driver kills a worker that runs longer
    bool needs_root = false;
    std::string name() const;  // "object / ending"
};

/// All rows, in table order.
std::vector<Row>& rows();
struct AddRow {
    AddRow(std::string object, Ending ending, std::function<void(Round&)> run, Setup setup = Setup::none,
           int watchdog_s = 20, bool needs_root = false);
};
#define STRESS_CONCAT2(a, b) a##b
#define STRESS_CONCAT(a, b) STRESS_CONCAT2(a, b)
/// ROW("Lock holder", Ending::sigkill, fn [, setup, watchdog_s, needs_root]);
#define ROW(...) static const ::stress::AddRow STRESS_CONCAT(stress_row_, __COUNTER__)(__VA_ARGS__)

// ---------------------------------------------------------------- helpers for rows

/// Guard for a wait that must end: a row that hits it reports a hang.
constexpr milliseconds guard{4000};
/// How late a timed wait may return and still count as "on time" (the
/// machine is shared and loaded; this only catches waits that ignore their
/// timeout, which overshoot by far more).
constexpr milliseconds late_slack{1500};

/// Spins (yielding) until pred() or `limit` has passed; returns pred().
template <class Pred>
bool await(Pred pred, milliseconds limit = guard) {
    auto until = Clock::now() + limit;
    while (!pred()) {
        if (Clock::now() > until) return false;
        std::this_thread::yield();
    }
    return true;
}

/// Runs `f` when the scope ends: rows declare one after their Processes to
/// kill them on an early return (a Process's destructor waits for its child,
/// and a stopped or blocked child would keep the round from ending).
template <class F>
class OnExit {
public:
    explicit OnExit(F f) : f_(std::move(f)) {}
    ~OnExit() { f_(); }
    OnExit(const OnExit&) = delete;
    OnExit& operator=(const OnExit&) = delete;

private:
    F f_;
};
/// Kills the processes (SIGCONT first, for stopped ones) - a no-op for ended ones.
void signal_process(long pid, int sig);
template <class P>
void kill_one(P& p) {
    if (p.is_alive()) {
        signal_process(p.pid(), SIGCONT);
        p.kill();
    }
}
template <class... P>
void kill_all(P&... ps) {
    (kill_one(ps), ...);
}
#define STRESS_KILL_ON_EXIT(...) \
    ::stress::OnExit STRESS_CONCAT(stress_on_exit_, __LINE__)([&] { ::stress::kill_all(__VA_ARGS__); })

/// Checks how a Process's future resolved against the way it was made to end
/// (return: `expected`; throw: Remote<runtime_error>; exit(42); -6; -11; -9).
/// Returns false (after recording why) if it did not resolve within the guard.
template <class R>
bool check_ending(Round& r, mp::Process<R>& p, Ending e, const R& expected, const std::string& what);

/// Leak counters of this process (fds, memfd mappings, zombie children) and
/// of the system (/dev/shm entries, Shmem kB, SysV segments).
struct Leaks {
    long fds = 0, maps = 0, zombies = 0, dev_shm = 0, shmem_kb = 0, sysv = 0;
};
Leaks measure_leaks();
long zombie_children(long pid);

/// Sends a signal to a started Process (by pid; the library's own send_signal
/// only knows kill/terminate).
void signal_process(long pid, int sig);

/// Known defects: rows whose failures are expected until a fix lands on main.
struct Known {
    const char* row_prefix;  // a row is known if its name starts with this
    int defect;              // the issue-8 defect number
    const char* what;
};
const std::vector<Known>& known_defects();

/// Counts what arrived against the items 0..expected-1: lost, duplicated,
/// torn (a negative sequence number) and reordered within each stream
/// (`streams`: what each consumer took, in the order it took it).
/// `one_more_ok`: item `expected` may arrive too (it was inside the send or
/// put that was killed).  `verb`: what the producer did ("sent", "put").
void account_sequences(Round& r, const std::vector<std::vector<long>>& streams, long expected, bool one_more_ok,
                       const char* verb);

}  // namespace stress

// ---------------------------------------------------------------- template definitions

namespace stress {
template <class R>
bool check_ending(Round& r, mp::Process<R>& p, Ending e, const R& expected, const std::string& what) {
    try {
        R got = p.result(guard);
        if (e != Ending::ret) {
            r.wrong(what + ": got a value, expected the " + std::string(ending_name(e)) + " ending");
        } else if (!(got == expected)) {
            r.wrong(what + ": got a different value");
        }
        return true;
    } catch (const mp::TimeoutError&) {
        r.hang(what + ": result() did not resolve within " + std::to_string(guard.count()) + " ms");
        p.kill();
        return false;
    } catch (const mp::ProcessError& err) {
        const int want = exitcode_of(e);
        if (err.exitcode() != want)
            r.wrong(what + ": ProcessError with exit code " + std::to_string(err.exitcode()) + " (" + err.what() +
                    "), expected " + std::to_string(want));
        else if (p.exitcode() != std::optional<int>(want))
            r.wrong(what + ": exitcode() disagrees with the error");
    } catch (const std::runtime_error& err) {
        if (e != Ending::thrw || !mp::is_remote(err) || std::string(err.what()) != thrown_message)
            r.wrong(what + ": unexpected exception '" + err.what() + "'");
        else if (p.exitcode() != std::optional<int>(1))
            r.wrong(what + ": a child that threw has exitcode != 1");
    } catch (const std::exception& err) {
        r.wrong(what + ": unexpected exception type, '" + err.what() + "'");
    }
    return true;
}
}  // namespace stress
