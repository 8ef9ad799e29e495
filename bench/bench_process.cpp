// bench_process: starting a child and getting its result, per context, against
// the physical limit measured in the same process (a raw re-exec of this very
// binary, a raw fork) - the Python anchors come from bench/python/process.py
// under the same case names.
//
//   process: spawn start->result        mp::Process (spawn) vs posix_spawn of /proc/self/exe
//                                       returning at the top of main, + waitpid
//   process: forkserver start->result   mp::Process (fork server) vs fork + _exit + waitpid
//   process: fork start->result         mp::Process (fork) vs fork + _exit + waitpid
//   process: exception round trip       child throws, parent catches it and reads the
//                                       remote traceback vs the plain-result round trip
//   process: 10 throwing children, line lookup (fork)
//                                       10 fork children that throw at once, start -> every
//                                       exception caught with its traceback, file:line looked
//                                       up (bench/run builds with -g) vs 10 returning a value
//   process: 10k log records (fork)     records/s from start to join, every record
//                                       handled (formatted) by the parent
//   process: warm spawn start->result   mp::Process (spawn, set_warm_start) taking the child
//                                       exec'd ahead of demand vs the raw re-exec; before
//                                       each timed run the bench waits (untimed) until the
//                                       replacement warm child is ready
//   process: fork phases                where a fork start->result goes: the time of each
//                                       StartPhase (detail::test_trace_start_phases) after
//                                       start() was called, median over the runs (no anchor)
//   process: warm spawn phases          the same for a start that takes a warm child (the
//                                       parent's phases only: an exec'd child cannot write
//                                       the traced page)
//   process: child exit after its outcome
//                                       from the child's sending its outcome (a fork child's
//                                       traced phase) to the parent's reactor seeing it exit,
//                                       vs a raw fork child that writes a reply and _exits:
//                                       its stamp after the write -> the parent's pidfd
//                                       readable.  Nearly all of it is the kernel's exit.
#include <poll.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "harness.hpp"
#include "mpservice.hpp"

extern char** environ;
namespace mp = mpservice;

namespace {

constexpr const char raw_child_flag[] = "--bench-raw-child";

int plus_one(int x) { return x + 1; }
int thrower(int x) { throw std::invalid_argument("bench " + std::to_string(x)); }
void log_records(int n) {
    auto log = mp::get_logger("child");
    for (int i = 0; i < n; ++i) log.info(std::to_string(i));
}

std::vector<double> to_us(std::vector<double> ms) {
    for (double& v : ms) v *= 1000;
    return ms;
}

template <class Ctx>
double round_trip_once() {
    mp::Process p(Ctx{}, plus_one, 41);
    p.start();
    int r = p.result();
    if (r != 42) std::abort();
    return r;
}

void raw_reexec(const char* self) {
    char* argv[] = {const_cast<char*>(self), const_cast<char*>(raw_child_flag), nullptr};
    pid_t pid;
    if (posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv, environ) != 0) std::abort();
    int st;
    waitpid(pid, &st, 0);
}

/// A raw fork child blocked on a socket: the parent writes a byte, the child
/// answers, stamps the time in a shared page and _exits; returns the
/// microseconds from that stamp to the parent's pidfd becoming readable.
double raw_exit_after_reply(std::int64_t* stamp) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::abort();
    pid_t pid = fork();
    if (pid == 0) {
        char c;
        if (read(sv[1], &c, 1) != 1) _exit(2);
        if (write(sv[1], &c, 1) != 1) _exit(2);
        *stamp = bench::now_ns();
        _exit(0);
    }
    close(sv[1]);
    int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
    if (pidfd < 0) std::abort();
    char c = 'x';
    if (write(sv[0], &c, 1) != 1 || read(sv[0], &c, 1) != 1) std::abort();
    pollfd p{pidfd, POLLIN, 0};
    poll(&p, 1, -1);
    const std::int64_t seen = bench::now_ns();
    int st;
    waitpid(pid, &st, 0);
    close(pidfd);
    close(sv[0]);
    return (seen - *stamp) / 1e3;
}

void raw_fork() {
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    int st;
    waitpid(pid, &st, 0);
}

/// Start->result->join of a spawned Process that takes a warm child; the wait
/// for the warm child to be ready is outside the timed part.
std::vector<double> warm_spawn_runs(int reps, int warmup) {
    std::vector<double> out;
    for (int i = 0; i < reps + warmup; ++i) {
        if (i > 0 && !mp::detail::test_warm_child(std::chrono::seconds(10))) std::abort();
        const auto t0 = std::chrono::steady_clock::now();
        {
            mp::Process p(mp::SpawnContext{}, plus_one, 41);
            p.set_warm_start(true);
            p.start();
            if (p.result() != 42) std::abort();
        }
        const auto t1 = std::chrono::steady_clock::now();
        if (i >= warmup) out.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    mp::set_warm_spawn(false);  // the waiting child is discarded
    return out;
}

/// Times `reps` start->result->join runs phase by phase; prints one figure
/// per phase (microseconds after start() was called) if `print`.  `warm`:
/// spawn starts that take a warm child (an exec'd child cannot write the
/// shared page, so only the parent's phases are known then), else fork
/// starts.  Returns each run's time from outcome sent to exit seen (fork only).
std::vector<double> start_phases(int reps, bool warm, bool print) {
    using Phase = mp::detail::StartPhase;
    constexpr int count = static_cast<int>(Phase::count);
    constexpr int result_returned = count, joined = count + 1;  // measured here, not in the library
    static const char* const names[] = {"start entered", "fork returned (parent)", "start returned",
                                        "child running", "child: task begins", "child: outcome sent",
                                        "child: about to _exit", "reactor: END read", "reactor: exit seen",
                                        "reactor: resolved", "waiter woke", "result() returned",
                                        "joined (Process destroyed)"};
    void* mem = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) std::abort();
    auto* slots = static_cast<std::int64_t*>(mem);
    std::vector<std::vector<double>> at(count + 2);
    std::vector<double> exit_after_outcome;
    for (int i = 0; i < reps + 3; ++i) {
        if (warm && i > 0 && !mp::detail::test_warm_child(std::chrono::seconds(10))) std::abort();
        std::fill(slots, slots + count, 0);
        mp::detail::test_trace_start_phases(slots);
        std::int64_t t0 = bench::now_ns(), t_result = 0;
        {
            mp::Process p = warm ? mp::Process(mp::SpawnContext{}, plus_one, 41)
                                 : mp::Process(mp::ForkContext{}, plus_one, 41);
            if (warm) p.set_warm_start(true);
            p.start();
            if (p.result() != 42) std::abort();
            t_result = bench::now_ns();
        }
        std::int64_t t_joined = bench::now_ns();
        mp::detail::test_trace_start_phases(nullptr);
        if (i < 3) continue;  // warm-up
        for (int k = 0; k < count; ++k)
            if (slots[k]) at[k].push_back((slots[k] - t0) / 1e3);
        at[result_returned].push_back((t_result - t0) / 1e3);
        const std::int64_t sent = slots[static_cast<int>(Phase::outcome_sent)];
        const std::int64_t exit_seen = slots[static_cast<int>(Phase::reactor_exit)];
        if (sent && exit_seen) exit_after_outcome.push_back((exit_seen - sent) / 1e3);
        at[joined].push_back((t_joined - t0) / 1e3);
    }
    munmap(mem, 4096);
    if (warm) mp::set_warm_spawn(false);
    const std::string prefix = warm ? "process: warm spawn phases: " : "process: fork phases: ";
    for (int k = 0; print && k < count + 2; ++k)
        if (!at[k].empty())
            bench::report(prefix + (k < 10 ? "0" : "") + std::to_string(k) + " " + names[k], "ours",
                          "us after start()", "us", at[k]);
    return exit_after_outcome;
}

/// Our fork child's outcome sent -> exit seen against a raw fork child's.
void child_exit_after_outcome(int reps, const std::vector<double>& ours) {
    void* mem = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) std::abort();
    std::vector<double> raw;
    for (int i = 0; i < reps + 3; ++i) {
        double us = raw_exit_after_reply(static_cast<std::int64_t*>(mem));
        if (i >= 3) raw.push_back(us);
    }
    munmap(mem, 4096);
    bench::report("process: child exit after its outcome", "ours", "fork child: outcome sent -> reactor sees exit", "us",
                  ours);
    bench::report("process: child exit after its outcome", "anchor", "raw fork child: reply -> pidfd readable", "us",
                  raw);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 1 && std::strcmp(argv[1], raw_child_flag) == 0) return 0;  // the raw re-exec: return at once
    mp::init(argc, argv);
    const int n = bench::reps(40);

    if (bench::wanted("process: spawn start->result")) {
        auto ours = bench::time_ms(n, [] { bench::keep(round_trip_once<mp::SpawnContext>()); }, 3);
        auto raw = bench::time_ms(n, [&] { raw_reexec(argv[0]); }, 3);
        bench::report("process: spawn start->result", "ours", "mp::Process spawn", "us", to_us(ours));
        bench::report("process: spawn start->result", "anchor", "raw posix_spawn self + waitpid", "us", to_us(raw));
    }
    if (bench::wanted("process: warm spawn start->result")) {
        auto ours = warm_spawn_runs(n, 3);
        auto raw = bench::time_ms(n, [&] { raw_reexec(argv[0]); }, 3);
        auto cold = bench::time_ms(n, [] { bench::keep(round_trip_once<mp::SpawnContext>()); }, 3);
        bench::report("process: warm spawn start->result", "ours", "mp::Process spawn, warm child", "us", ours);
        bench::report("process: warm spawn start->result", "anchor", "raw posix_spawn self + waitpid", "us",
                      to_us(raw));
        bench::report("process: warm spawn start->result", "anchor", "mp::Process spawn, cold", "us", to_us(cold));
    }
    if (bench::wanted("process: forkserver start->result")) {
        auto ours = bench::time_ms(n, [] { bench::keep(round_trip_once<mp::ForkServerContext>()); }, 3);
        auto raw = bench::time_ms(n, raw_fork, 3);
        bench::report("process: forkserver start->result", "ours", "mp::Process forkserver", "us", to_us(ours));
        bench::report("process: forkserver start->result", "anchor", "raw fork+_exit+waitpid", "us", to_us(raw));
    }
    if (bench::wanted("process: fork start->result")) {
        auto ours = bench::time_ms(n, [] { bench::keep(round_trip_once<mp::ForkContext>()); }, 3);
        auto raw = bench::time_ms(n, raw_fork, 3);
        bench::report("process: fork start->result", "ours", "mp::Process fork", "us", to_us(ours));
        bench::report("process: fork start->result", "anchor", "raw fork+_exit+waitpid", "us", to_us(raw));
    }
    const bool fork_phases = bench::wanted("process: fork phases");
    const bool child_exit = bench::wanted("process: child exit after its outcome");
    if (fork_phases || child_exit) {
        auto exits = start_phases(n, false, fork_phases);
        if (child_exit) child_exit_after_outcome(n, exits);
    }
    if (bench::wanted("process: warm spawn phases")) start_phases(n, true, true);
    if (bench::wanted("process: exception round trip")) {
        mp::set_traceback_source_lines(false);  // the cost of the round trip itself (see the next case)
        std::size_t tb_len = 0;
        auto thrown = bench::time_ms(n, [&] {
            mp::Process p(thrower, 7);
            p.start();
            try {
                p.join();
                std::abort();
            } catch (const std::invalid_argument& e) {
                tb_len += mp::remote_traceback(e).size();
            }
        }, 3);
        auto plain = bench::time_ms(n, [] { bench::keep(round_trip_once<mp::SpawnContext>()); }, 3);
        bench::keep(tb_len);
        bench::report("process: exception round trip (spawn)", "ours", "child throws, parent catches", "us",
                      to_us(thrown));
        bench::report("process: exception round trip (spawn)", "anchor", "mp::Process plain result", "us",
                      to_us(plain));
        mp::set_traceback_source_lines(true);
    }
    if (bench::wanted("process: 10 throwing children, line lookup")) {
        // What a -g build pays when children fail together: each child
        // symbolizes its own stack (addr2line, for the frames it shows).
        constexpr int kids = 10;
        std::size_t tb_len = 0;
        auto thrown = bench::time_ms(std::max(5, n / 4), [&] {
            std::vector<std::unique_ptr<mp::Process<int>>> ps;
            for (int i = 0; i < kids; ++i) {
                ps.push_back(std::make_unique<mp::Process<int>>(mp::ForkContext{}, thrower, i));
                ps.back()->start();
            }
            for (auto& p : ps) {
                try {
                    p->join();
                    std::abort();
                } catch (const std::invalid_argument& e) {
                    tb_len += mp::remote_traceback(e).size();
                }
            }
        }, 2);
        auto plain = bench::time_ms(std::max(5, n / 4), [&] {
            std::vector<std::unique_ptr<mp::Process<int>>> ps;
            for (int i = 0; i < kids; ++i) {
                ps.push_back(std::make_unique<mp::Process<int>>(mp::ForkContext{}, plus_one, 41));
                ps.back()->start();
            }
            for (auto& p : ps)
                if (p->result() != 42) std::abort();
        }, 2);
        bench::keep(tb_len);
        bench::report("process: 10 throwing children, line lookup (fork)", "ours", "10 children throw, parent catches",
                      "ms", thrown);
        bench::report("process: 10 throwing children, line lookup (fork)", "anchor", "10 children return a value",
                      "ms", plain);
    }
    if (bench::wanted("process: 10k log records")) {
        constexpr int records = 10000;
        long handled = 0;
        mp::set_log_handler([&](const mp::LogRecord&, const std::string& formatted) { handled += formatted.empty() ? 0 : 1; });
        auto ms = bench::time_ms(std::max(5, n / 8), [&] {
            mp::Process p(mp::ForkContext{}, log_records, records);
            p.start();
            p.join();
        }, 1);
        mp::set_log_handler(nullptr);
        if (handled != records * static_cast<long>(ms.size() + 1)) std::abort();
        bench::report("process: 10k log records from a child (fork)", "ours", "mp logging to parent", "records/s",
                      bench::per_second(ms, records));
    }
}
