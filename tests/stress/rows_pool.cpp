// Rows: Pool tasks - a task whose worker returns, throws, exit(42)s, aborts,
// segfaults, is SIGKILLed at a random instant or SIGSTOPped while the pool is
// mapping, and the parent SIGKILLed while pool workers are blocked in tasks.
//
// What is right (README, "Pool"; pool.hpp):
//   * a worker that dies in a task fails exactly that task with ProcessError
//     naming the signal or code (exitcode 42, -6, -11, -9); a task that throws
//     comes back as its exception (remote, typed) and the worker lives on;
//   * every other item has its value, each ran exactly once (the items of
//     the dead worker's chunk that had not started go to another worker,
//     nothing runs twice), nothing lost;
//   * the dead worker is replaced: the pool has its number of workers again
//     and serves the next task;
//   * a SIGKILL at a random instant (inside a task, between two, while the
//     worker sends its results) fails at most the one task it was running;
//   * a stopped worker is not dead: a timed wait on the map returns on time,
//     and after SIGCONT the map completes with every value;
//   * the parent SIGKILLed while workers are blocked in tasks (and one is idle):
//     every worker is gone within 1 s.
#include "harness.hpp"

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>
#include <vector>

namespace stress {
namespace {

constexpr long items = 600;

/// What a worker is handed by the initializer: the per-item run counts, the
/// count of tasks begun, an Event nobody sets, the fatal item and its ending.
struct Kit {
    std::optional<mp::RawArray<long>> runs;
    std::optional<mp::RawValue<long>> begun;
    std::optional<mp::Event> never;
    long fatal = -1;
    int ending = 0;
    long spin_us = 0;
};
Kit g_kit;

void init_kit(mp::RawArray<long> runs, mp::RawValue<long> begun, mp::Event never, long fatal, int ending,
              long spin_us) {
    g_kit.runs.emplace(std::move(runs));
    g_kit.begun.emplace(std::move(begun));
    g_kit.never.emplace(std::move(never));
    g_kit.fatal = fatal;
    g_kit.ending = ending;
    g_kit.spin_us = spin_us;
}

long value_of(long i) { return 3 * i + 1; }

/// A task: counts its run, does a little work, and - for the fatal item - ends
/// its worker the row's way.
long pool_task(long i) {
    __atomic_fetch_add(&(*g_kit.runs)[static_cast<std::size_t>(i)], 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&g_kit.begun->get_obj(), 1, __ATOMIC_SEQ_CST);
    if (i == g_kit.fatal) end_child(static_cast<Ending>(g_kit.ending));
    if (g_kit.spin_us > 0) {
        auto until = Clock::now() + std::chrono::microseconds(g_kit.spin_us);
        while (Clock::now() < until) {
        }
    }
    return value_of(i);
}

/// A task that blocks (parent_killed rows).
long blocking_task(long i) {
    __atomic_fetch_add(&g_kit.begun->get_obj(), 1, __ATOMIC_SEQ_CST);
    g_kit.never->wait();
    return i;
}

long square(long x) { return x * x; }

std::vector<long> iota(long n) {
    std::vector<long> v(static_cast<std::size_t>(n));
    for (long i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = i;
    return v;
}

/// What the consumer of imap saw, item by item.
struct Seen {
    std::vector<int> outcome;  // 0 none yet, 1 value, 2 failed
    std::vector<std::string> error;
    long values = 0, failures = 0, bad_values = 0;
    bool hung = false;
    std::string note;
};

/// Consumes the imap: every item in input order, each within the guard.
template <class It>
void consume(It& it, Seen& s) {
    s.outcome.assign(static_cast<std::size_t>(items), 0);
    s.error.assign(static_cast<std::size_t>(items), std::string());
    for (long k = 0; k < items; ++k) {
        const auto ku = static_cast<std::size_t>(k);
        try {
            auto v = it.next(guard);
            if (!v) {
                s.note = "imap ended after " + std::to_string(k) + " of " + std::to_string(items) + " items";
                return;
            }
            s.outcome[ku] = 1;
            ++s.values;
            if (*v != value_of(k)) ++s.bad_values;
        } catch (const mp::TimeoutError&) {
            s.hung = true;
            s.note = "imap: item " + std::to_string(k) + " did not come within " + std::to_string(guard.count()) + " ms";
            return;
        } catch (const mp::ProcessError& e) {
            s.outcome[ku] = 2;
            ++s.failures;
            s.error[ku] = std::string("ProcessError ") + std::to_string(e.exitcode()) + ": " + e.what();
        } catch (const std::runtime_error& e) {
            s.outcome[ku] = 2;
            ++s.failures;
            s.error[ku] = (mp::is_remote(e) && std::string(e.what()) == thrown_message) ? "thrown" : e.what();
        } catch (const std::exception& e) {
            s.outcome[ku] = 2;
            ++s.failures;
            s.error[ku] = std::string("unexpected type: ") + e.what();
        }
    }
    try {
        if (it.next(guard)) s.note = "imap yielded more items than its input";
    } catch (const std::exception& e) {
        s.note = std::string("imap's end threw: ") + e.what();
    }
}

/// Counts runs against outcomes: duplicated (ran twice), lost (no outcome, or
/// a value for an item that never ran), wrong failures.  `may_fail`: the items
/// allowed to fail (with `want`), at most `max_failures` of them.
void account(Round& r, const Seen& s, const mp::RawArray<long>& runs, long fatal, bool any_may_fail,
             const std::string& want) {
    long dups = 0, lost = 0;
    for (long i = 0; i < items; ++i) {
        const auto iu = static_cast<std::size_t>(i);
        const long n = runs[iu];
        if (n > 1) dups += n - 1;
        if (s.outcome[iu] == 0 || (s.outcome[iu] == 1 && n == 0)) ++lost;
        if (s.outcome[iu] == 2) {
            const bool allowed = any_may_fail || i == fatal;
            if (!allowed) r.wrong("item " + std::to_string(i) + " failed: " + s.error[iu]);
            else if (s.error[iu].rfind(want, 0) != 0)
                r.wrong("item " + std::to_string(i) + " failed with '" + s.error[iu] + "', expected " + want);
            if (n != 1) r.wrong("the failed item " + std::to_string(i) + " ran " + std::to_string(n) + " times");
        }
    }
    if (fatal >= 0 && s.outcome[static_cast<std::size_t>(fatal)] != 2 && !want.empty())
        r.wrong("the fatal item " + std::to_string(fatal) + " did not fail");
    if (any_may_fail && s.failures > 1) r.wrong(std::to_string(s.failures) + " items failed for one SIGKILL");
    if (s.bad_values) r.reordered(s.bad_values);  // a value at another item's place
    r.duplicated(dups);
    r.lost(lost);
}

/// The pool has its workers again (the dead one replaced) and serves a task.
void expect_pool_serves(Round& r, mp::Pool& pool, long dead_pid) {
    std::vector<long> pids;
    bool back = await([&] {
        pids = pool.worker_pids();
        return pids.size() == 2 && std::find(pids.begin(), pids.end(), dead_pid) == pids.end();
    });
    if (!back) r.wrong("the pool has " + std::to_string(pids.size()) + " workers after the ending (dead one replaced?)");
    try {
        if (pool.apply_async(square, 7L).get(guard) != 49) r.wrong("the pool's next task gave a different value");
    } catch (const mp::TimeoutError&) {
        r.hang("the pool's next task did not finish");
    } catch (const std::exception& e) {
        r.wrong(std::string("the pool's next task: ") + e.what());
    }
}

void pool_row(Round& r) {
    const Ending e = r.ending();
    mp::RawArray<long> runs(static_cast<std::size_t>(items), 0L);
    mp::RawValue<long> begun(0);
    mp::Event never;
    const bool from_outside = e == Ending::sigkill || e == Ending::sigstop;
    const long fatal = from_outside || e == Ending::parent_killed ? -1 : r.uniform(0, items - 1);
    const long spin = from_outside ? 100 : 0;  // µs: a kill lands inside a task more often than not
    const int nproc = e == Ending::parent_killed ? 3 : 2;
    mp::Pool pool(r.context(), nproc, mp::PoolOptions{}, init_kit, runs, begun, never, fatal, static_cast<int>(e),
                  spin);
    if (e == Ending::parent_killed) {
        // Two workers blocked in tasks, the third idle, waiting for one.
        auto a = pool.apply_async(blocking_task, 0L);
        auto b = pool.apply_async(blocking_task, 1L);
        if (!await([&] { return begun.get() >= 2; })) return r.hang("the workers never blocked in their tasks");
        r.ready_to_be_killed();
    }
    const std::size_t chunksize = static_cast<std::size_t>(std::vector<long>{1, 7, 50}[r.index() % 3]);
    const auto before = pool.worker_pids();
    if (e == Ending::sigstop) {
        auto res = pool.map_async(pool_task, iota(items), chunksize);
        const long target = r.uniform(1, items / 2);
        if (!await([&] { return begun.get() >= target; })) return r.hang("the pool never ran its tasks");
        const long victim = before[static_cast<std::size_t>(r.uniform(0, 1))];
        signal_process(victim, SIGSTOP);
        std::atomic<bool> returned{false};
        std::thread rescue([&] {  // a wait that ignores its timeout must not hang the round
            auto until = Clock::now() + milliseconds(100) + late_slack + milliseconds(1500);
            while (!returned.load() && Clock::now() < until) std::this_thread::sleep_for(milliseconds(5));
            if (!returned.load()) signal_process(victim, SIGCONT);
        });
        auto t0 = Clock::now();
        res.wait(milliseconds(100));
        returned = true;
        rescue.join();
        const auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - t0);
        if (took > milliseconds(100) + late_slack)
            r.wrong("wait(100ms) on the map took " + std::to_string(took.count()) + " ms while a worker was stopped");
        signal_process(victim, SIGCONT);
        Seen s;
        s.outcome.assign(static_cast<std::size_t>(items), 0);
        s.error.assign(static_cast<std::size_t>(items), std::string());
        try {
            auto v = res.get(guard);
            for (long k = 0; k < items && k < static_cast<long>(v.size()); ++k) {
                s.outcome[static_cast<std::size_t>(k)] = 1;
                if (v[static_cast<std::size_t>(k)] != value_of(k)) ++s.bad_values;
            }
        } catch (const mp::TimeoutError&) {
            return r.hang("the map did not finish after SIGCONT");
        } catch (const std::exception& ex) {
            return r.wrong(std::string("the map with a stopped worker failed: ") + ex.what());
        }
        account(r, s, runs, -1, false, "");
        if (pool.worker_pids() != before) r.wrong("a stopped worker was replaced as if it had died");
        expect_pool_serves(r, pool, -1);
        return;
    }
    auto it = pool.imap(pool_task, iota(items), chunksize);
    Seen s;
    long victim = -1;
    if (e == Ending::sigkill) {
        std::thread consumer([&] { consume(it, s); });
        const long target = r.uniform(1, items / 2);
        if (await([&] { return begun.get() >= target; })) {
            r.random_pause(2000);
            victim = before[static_cast<std::size_t>(r.uniform(0, 1))];
            signal_process(victim, SIGKILL);
        }
        consumer.join();
        if (victim < 0) return r.hang("the pool never ran its tasks");
    } else {
        consume(it, s);
        if (fatal >= 0 && e != Ending::ret && e != Ending::thrw) {
            // The worker that ran the fatal item is gone: which one is not known here.
            std::vector<long> now;
            await([&] {
                now = pool.worker_pids();
                return now.size() == 2 && now != before;
            });
            for (long p : before)
                if (std::find(now.begin(), now.end(), p) == now.end()) victim = p;
        }
    }
    if (s.hung) return r.hang(s.note);
    if (!s.note.empty()) r.wrong(s.note);
    const std::string want = e == Ending::ret    ? ""
                             : e == Ending::thrw ? "thrown"
                                                 : "ProcessError " + std::to_string(exitcode_of(e)) + ":";
    if (e == Ending::ret && s.failures) r.wrong(std::to_string(s.failures) + " items failed, none should");
    account(r, s, runs, fatal, e == Ending::sigkill, want);
    if ((e == Ending::ret || e == Ending::thrw) && pool.worker_pids() != before)
        r.wrong("a worker was replaced although none died");
    if (e != Ending::ret && e != Ending::thrw && e != Ending::sigkill && victim < 0)
        r.wrong("no worker was replaced after the fatal item");
    expect_pool_serves(r, pool, victim);
    pool.close();
    pool.join();
}

ROW("Pool task", Ending::ret, pool_row, Setup::warm_spawn);
ROW("Pool task", Ending::thrw, pool_row, Setup::warm_spawn);
ROW("Pool task", Ending::exit_n, pool_row, Setup::warm_spawn);
ROW("Pool task", Ending::abrt, pool_row, Setup::warm_spawn);
ROW("Pool task", Ending::segv, pool_row, Setup::warm_spawn);
ROW("Pool task", Ending::sigkill, pool_row, Setup::warm_spawn);
ROW("Pool task", Ending::sigstop, pool_row, Setup::warm_spawn);
ROW("Pool task", Ending::parent_killed, pool_row, Setup::warm_spawn);

}  // namespace
}  // namespace stress
