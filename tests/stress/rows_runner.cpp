// Rows: ProcessRunner calls - a call whose runner process returns, throws,
// exit(42)s, aborts or segfaults inside it, is SIGKILLed at a random instant
// or SIGSTOPped inside a stream of pipelined calls, and the parent SIGKILLed
// while a runner is blocked in a call (another idle).
//
// What is right (runner.hpp):
//   * a call that throws comes back as its exception (remote, typed) and the
//     runner keeps serving, its state intact;
//   * a process that dies in a call fails that call with ProcessError naming
//     the signal or code, every queued call the same way, later calls at once
//     (a runner is not restarted: its state is gone);
//   * calls run one at a time in order: the values of the calls before the
//     death are the running totals, none ran twice, none is missing;
//   * a stopped runner makes a timed wait time out on time and finishes every
//     call after SIGCONT;
//   * the parent SIGKILLed: every runner process is gone within 1 s.
#include "harness.hpp"

#include <signal.h>

#include <atomic>
#include <string>
#include <vector>

namespace stress {
namespace {

constexpr long calls_before = 100;
constexpr long stream = 400;
constexpr int no_ending = -1;

/// The runner's object: a running total, the count of calls begun (shared),
/// and an Event nobody sets (a call blocked when the parent dies).
struct Callee {
    mp::RawValue<long> begun;
    mp::Event never;
    long total = 0;
    Callee(mp::RawValue<long> b, mp::Event n) : begun(std::move(b)), never(std::move(n)) {}
    long operator()(long x, int ending) {
        __atomic_fetch_add(&begun.get_obj(), 1, __ATOMIC_SEQ_CST);
        if (ending == static_cast<int>(Ending::parent_killed)) never.wait();
        if (ending != no_ending) end_child(static_cast<Ending>(ending));
        auto until = Clock::now() + std::chrono::microseconds(20);  // a little work: a kill may land inside
        while (Clock::now() < until) {
        }
        total += x;
        return total;
    }
};

/// 0: a value v, 1: ProcessError with exit code `code`, 2: the thrown exception,
/// 3: another error (`what`), 4: not resolved within the guard.
struct Outcome {
    int kind = 4;
    long value = 0;
    int code = 0;
    std::string what;
};

Outcome take(mp::AsyncResult<long>& f) {
    Outcome o;
    try {
        o.value = f.get(guard);
        o.kind = 0;
    } catch (const mp::TimeoutError&) {
        o.kind = 4;
    } catch (const mp::ProcessError& e) {
        o.kind = 1;
        o.code = e.exitcode();
        o.what = e.what();
    } catch (const std::runtime_error& e) {
        o.kind = mp::is_remote(e) && std::string(e.what()) == thrown_message ? 2 : 3;
        o.what = e.what();
    } catch (const std::exception& e) {
        o.kind = 3;
        o.what = std::string("unexpected type: ") + e.what();
    }
    return o;
}

void runner_row(Round& r) {
    const Ending e = r.ending();
    mp::RawValue<long> begun(0);
    mp::Event never;
    mp::ProcessRunner<Callee> runner(r.context(), begun, never);
    const long pid = runner.pid();
    if (pid <= 0) return r.wrong("the runner has no process after its constructor");
    if (e == Ending::parent_killed) {
        mp::ProcessRunner<Callee> idle(r.context(), begun, never);  // waits for calls
        auto f = runner.submit(1L, static_cast<int>(e));
        if (!await([&] { return begun.get() >= 1; })) return r.hang("the runner never began its call");
        r.random_pause(2000);
        r.ready_to_be_killed();
    }
    if (e == Ending::sigkill || e == Ending::sigstop) {
        std::vector<mp::AsyncResult<long>> fs;
        fs.reserve(static_cast<std::size_t>(stream));
        for (long i = 0; i < stream; ++i) fs.push_back(runner.submit(1L, no_ending));  // pipelined
        const long target = r.uniform(1, stream / 2);
        if (!await([&] { return begun.get() >= target; })) {
            signal_process(pid, SIGKILL);
            return r.hang("the runner never ran its calls");
        }
        if (e == Ending::sigstop) {
            signal_process(pid, SIGSTOP);
            std::atomic<bool> returned{false};
            std::thread rescue([&] {  // a wait that ignores its timeout must not hang the round
                auto until = Clock::now() + milliseconds(100) + late_slack + milliseconds(1500);
                while (!returned.load() && Clock::now() < until) std::this_thread::sleep_for(milliseconds(5));
                if (!returned.load()) signal_process(pid, SIGCONT);
            });
            auto t0 = Clock::now();
            fs.back().wait(milliseconds(100));
            returned = true;
            rescue.join();
            auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - t0);
            if (took > milliseconds(100) + late_slack)
                r.wrong("wait(100ms) took " + std::to_string(took.count()) + " ms while the runner was stopped");
            signal_process(pid, SIGCONT);
        } else {
            r.random_pause(2000);
            signal_process(pid, SIGKILL);
        }
        // Values 1, 2, 3, ... (the running total) up to the death, then ProcessError for every call.
        long values = 0, failed = 0;
        for (long i = 0; i < stream; ++i) {
            Outcome o = take(fs[static_cast<std::size_t>(i)]);
            if (o.kind == 4) {
                r.lost(stream - i);
                return r.hang("call " + std::to_string(i) + " did not resolve within the guard");
            }
            if (o.kind == 0) {
                if (failed) r.wrong("call " + std::to_string(i) + " has a value after an earlier call failed");
                if (o.value > values + 1) r.lost(o.value - values - 1);
                if (o.value <= values) r.duplicated(1);
                values = o.value;
            } else if (o.kind == 1 && e == Ending::sigkill) {
                if (o.code != -SIGKILL) r.wrong("call " + std::to_string(i) + ": ProcessError " + std::to_string(o.code));
                ++failed;
            } else {
                r.wrong("call " + std::to_string(i) + " failed: " + o.what);
                ++failed;
            }
        }
        const long b = begun.get();
        if (e == Ending::sigstop && values != stream) r.wrong("a stopped and continued runner finished " + std::to_string(values) + " calls");
        if (e == Ending::sigkill && (b < values || b > values + 1))
            r.wrong(std::to_string(b) + " calls began, " + std::to_string(values) + " returned before the SIGKILL");
        if (e == Ending::sigstop) {
            try {
                if (runner.submit(1L, no_ending).get(guard) != stream + 1) r.wrong("the state after SIGCONT differs");
            } catch (const std::exception& ex) {
                r.wrong(std::string("a call after SIGCONT: ") + ex.what());
            }
        }
    } else {
        long total = 0;
        for (long i = 0; i < calls_before; ++i) {
            auto f = runner.submit(i, no_ending);
            Outcome o = take(f);
            if (o.kind == 4) return r.hang("call " + std::to_string(i) + " did not resolve");
            total += i;
            if (o.kind != 0) return r.wrong("call " + std::to_string(i) + " failed: " + o.what);
            if (o.value != total) return r.wrong("call " + std::to_string(i) + " gave a wrong running total");
        }
        auto fatal = runner.submit(1000L, static_cast<int>(e));
        auto queued1 = runner.submit(1L, no_ending);
        auto queued2 = runner.submit(1L, no_ending);
        Outcome o = take(fatal);
        if (o.kind == 4) return r.hang("the call that ends the runner did not resolve");
        const bool dies = e != Ending::ret && e != Ending::thrw;
        if (e == Ending::ret) {
            if (o.kind != 0 || o.value != total + 1000) r.wrong("the call gave '" + o.what + "' / a wrong value");
            total += 1000;
        } else if (e == Ending::thrw) {
            if (o.kind != 2) r.wrong("a call that threw failed with '" + o.what + "'");
        } else if (o.kind != 1 || o.code != exitcode_of(e)) {
            r.wrong("the call failed with '" + o.what + "' (exit code " + std::to_string(o.code) + "), expected " +
                    std::to_string(exitcode_of(e)));
        }
        for (auto* q : {&queued1, &queued2}) {
            Outcome qo = take(*q);
            if (qo.kind == 4) return r.hang("a call queued behind the ending did not resolve");
            if (!dies) {
                if (qo.kind != 0 || qo.value != total + 1) r.wrong("a queued call after the ending: '" + qo.what + "'");
                total += 1;
            } else if (qo.kind != 1 || qo.code != exitcode_of(e)) {
                r.wrong("a queued call failed with '" + qo.what + "', expected ProcessError " +
                        std::to_string(exitcode_of(e)));
            }
        }
        // Later calls: served (the state intact), or failing at once with ProcessError.
        auto t0 = Clock::now();
        try {
            auto f = runner.submit(1L, no_ending);
            Outcome lo = take(f);
            if (lo.kind == 4) return r.hang("a later call did not resolve");
            if (!dies && (lo.kind != 0 || lo.value != total + 1)) r.wrong("a later call: '" + lo.what + "'");
            if (dies && lo.kind != 1) r.wrong("a later call on a dead runner: '" + lo.what + "'");
        } catch (const mp::ProcessError&) {
            if (!dies) r.wrong("submit() on a live runner threw ProcessError");
        }
        if (dies && Clock::now() - t0 > late_slack) r.wrong("a later call on a dead runner did not fail at once");
        if (dies && !await([&] { return runner.pid() == 0; })) r.wrong("pid() is not 0 after the runner died");
    }
    runner.join();
}

ROW("ProcessRunner call", Ending::ret, runner_row);
ROW("ProcessRunner call", Ending::thrw, runner_row);
ROW("ProcessRunner call", Ending::exit_n, runner_row);
ROW("ProcessRunner call", Ending::abrt, runner_row);
ROW("ProcessRunner call", Ending::segv, runner_row);
ROW("ProcessRunner call", Ending::sigkill, runner_row);
ROW("ProcessRunner call", Ending::sigstop, runner_row);
ROW("ProcessRunner call", Ending::parent_killed, runner_row);

}  // namespace
}  // namespace stress
