// Shared-memory synchronization: our Lock, Value and Event/Condition against a
// process-shared robust pthread mutex, Boost.Interprocess and a raw futex, all
// measured here in the same run (bench/python/sync.py measures Python's
// multiprocessing under the same case names).
//
//   sync: Lock acquire+release, uncontended          ns per pair
//   sync: 2 procs x 1M increments under the lock     ns per increment
//   sync: 4 procs x 500k increments under the lock   ns per increment (more procs than CPUs)
//   sync: Event ping-pong round trip, 2 procs        us per round trip
//   sync: Condition ping-pong round trip, 2 procs    us per round trip
//
// Children are plain fork()s sharing anonymous shared memory (ours: the
// objects' own memfd blocks; anchors: MAP_SHARED|MAP_ANONYMOUS).  Nothing is
// pinned: the processes land wherever the scheduler puts them, as in real use.
#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <boost/interprocess/sync/interprocess_condition.hpp>
#include <boost/interprocess/sync/interprocess_mutex.hpp>
#include <boost/interprocess/sync/scoped_lock.hpp>
#include <boost/version.hpp>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "harness.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;
namespace bip = boost::interprocess;

namespace {

const std::string boost_label = "Boost.IPC " + std::to_string(BOOST_VERSION / 100000) + "." +
                                std::to_string(BOOST_VERSION / 100 % 1000);

void* shared_anonymous(std::size_t n) {
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("mmap");
        std::exit(1);
    }
    return p;
}

/// Runs body(i) in n forked children and waits for them.
void run_children(int n, const std::function<void(int)>& body) {
    std::fflush(stdout);
    std::vector<pid_t> pids;
    for (int i = 0; i < n; ++i) {
        pid_t pid = ::fork();
        if (pid == 0) {
            body(i);
            ::_exit(0);
        }
        pids.push_back(pid);
    }
    for (pid_t pid : pids) {
        int status = 0;
        ::waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) std::fprintf(stderr, "child %d failed\n", int(pid));
    }
}

/// A pthread mutex as the anchors use it: process-shared, robust.
struct RobustPthread {
    pthread_mutex_t m;
    alignas(64) long counter = 0;
    RobustPthread() {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&m, &a);
        pthread_mutexattr_destroy(&a);
    }
    void lock() {
        if (pthread_mutex_lock(&m) == EOWNERDEAD) pthread_mutex_consistent(&m);
    }
    void unlock() { pthread_mutex_unlock(&m); }
};

struct BoostMutex {
    bip::interprocess_mutex m;
    alignas(64) long counter = 0;
};

template <class T>
T* make_shared_anonymous() {
    return ::new (shared_anonymous(sizeof(T))) T();
}

std::vector<double> per_op_ns(const std::vector<double>& ms, double ops) {
    std::vector<double> out;
    for (double t : ms) out.push_back(t * 1e6 / ops);
    return out;
}

// ---------------------------------------------------------------- uncontended lock

void uncontended_lock(int reps) {
    const std::string name = "sync: Lock acquire+release, uncontended";
    if (!bench::wanted(name)) return;
    constexpr int n = 5'000'000;
    mp::Lock lock;
    bench::report(name, "ours", "mp::Lock acquire()+release()", "ns",
                  per_op_ns(bench::time_ms(reps, [&] {
                                for (int i = 0; i < n; ++i) {
                                    lock.acquire();
                                    lock.release();
                                }
                            }),
                            n));
    auto* robust = make_shared_anonymous<RobustPthread>();
    bench::report(name, "anchor", "pthread mutex pshared+robust", "ns", per_op_ns(bench::time_ms(reps, [&] {
                                                                                    for (int i = 0; i < n; ++i) {
                                                                                        robust->lock();
                                                                                        robust->unlock();
                                                                                    }
                                                                                }),
                                                                                n));
    auto* boost = make_shared_anonymous<BoostMutex>();
    bench::report(name, "anchor", boost_label + " interprocess_mutex", "ns", per_op_ns(bench::time_ms(reps, [&] {
                                                                                       for (int i = 0; i < n; ++i) {
                                                                                           boost->m.lock();
                                                                                           boost->m.unlock();
                                                                                       }
                                                                                   }),
                                                                                   n));
    const std::string rname = "sync: RLock acquire+release, uncontended";
    mp::RLock rlock;
    bench::report(rname, "ours", "mp::RLock acquire()+release()", "ns",
                  per_op_ns(bench::time_ms(reps, [&] {
                                for (int i = 0; i < n; ++i) {
                                    rlock.acquire();
                                    rlock.release();
                                }
                            }),
                            n));
    bench::report(rname, "anchor", "pthread mutex pshared+robust", "ns", per_op_ns(bench::time_ms(reps, [&] {
                                                                                     for (int i = 0; i < n; ++i) {
                                                                                         robust->lock();
                                                                                         robust->unlock();
                                                                                     }
                                                                                 }),
                                                                                 n));
}

// ---------------------------------------------------------------- contended increments

/// An increment loop under a lock: what it is, and how to run and check it.
struct Increments {
    std::string label;
    std::function<void(int per_child)> body;  // one child's increments
    std::function<long()> total;              // the counter afterwards
    std::function<void()> reset;
};

/// One of our loops and the case it reports under.
struct OurIncrements {
    std::string case_name;
    Increments run;
};

/// Runs `procs` children x `per_child` increments of each of ours and of the
/// anchors (the robust pthread mutex, Boost's interprocess_mutex), and reports
/// ns per increment.  Each repetition runs them all one after the other, so
/// that a change in the machine's load (it is shared) hits all of them alike.
void increments_under_lock(int reps, int procs, int per_child, const std::vector<OurIncrements>& ours) {
    const double total = double(procs) * per_child;
    auto* robust = make_shared_anonymous<RobustPthread>();
    auto* boost = make_shared_anonymous<BoostMutex>();
    const Increments robust_run{"pthread mutex pshared+robust",
                                [&](int n) {
                                    for (int i = 0; i < n; ++i) {
                                        robust->lock();
                                        ++robust->counter;
                                        robust->unlock();
                                    }
                                },
                                [&] { return robust->counter; }, [&] { robust->counter = 0; }};
    const Increments boost_run{boost_label + " interprocess_mutex",
                               [&](int n) {
                                   for (int i = 0; i < n; ++i) {
                                       bip::scoped_lock<bip::interprocess_mutex> g(boost->m);
                                       ++boost->counter;
                                   }
                               },
                               [&] { return boost->counter; }, [&] { boost->counter = 0; }};
    std::vector<const Increments*> runs{&robust_run};  // ours between the anchors
    for (const auto& o : ours) runs.push_back(&o.run);
    runs.push_back(&boost_run);

    std::vector<std::vector<double>> ms(runs.size());
    for (int r = 0; r < reps + 1; ++r) {  // the first round warms up
        for (std::size_t k = 0; k < runs.size(); ++k) {
            const Increments& run = *runs[k];
            run.reset();
            auto t = bench::time_ms(1, [&] { run_children(procs, [&](int) { run.body(per_child); }); }, 0);
            if (run.total() != long(total)) std::fprintf(stderr, "%s: total %ld\n", run.label.c_str(), run.total());
            if (r) ms[k].push_back(t[0]);
        }
    }
    for (std::size_t k = 0; k < ours.size(); ++k) {
        const std::string& name = ours[k].case_name;
        bench::report(name, "ours", ours[k].run.label, "ns", per_op_ns(ms[k + 1], total));
        bench::report(name, "anchor", robust_run.label, "ns", per_op_ns(ms.front(), total));
        bench::report(name, "anchor", boost_run.label, "ns", per_op_ns(ms.back(), total));
    }
}

/// `Value<long, Lock>` incremented under `std::lock_guard`.
OurIncrements lock_guard_increments(const std::string& case_name, mp::Value<long, mp::Lock>& v) {
    return {case_name,
            {"mp::Value<long, mp::Lock>, std::lock_guard",
             [&v](int n) {
                 for (int i = 0; i < n; ++i) {
                     std::lock_guard<mp::Lock> g(v.get_lock());
                     ++v.get_obj();
                 }
             },
             [&v] { return v.get(); }, [&v] { v.set(0); }}};
}

void contended_increments(int reps) {
    const std::string name = "sync: 2 procs x 1M increments under the lock";
    const std::string name_lock = "sync: 2 procs x 1M increments, Value<long, Lock> + lock_guard";
    if (!bench::wanted(name) && !bench::wanted(name_lock)) return;
    mp::Value<long> value(0);
    mp::Value<long, mp::Lock> plain(0);
    increments_under_lock(reps, 2, 1'000'000,
                          {{name,
                            {"mp::Value<long>::with_lock (RLock)",
                             [&](int n) {
                                 for (int i = 0; i < n; ++i) value.with_lock([](long& x) { ++x; });
                             },
                             [&] { return value.get(); }, [&] { value.set(0); }}},
                           lock_guard_increments(name_lock, plain)});
}

/// More processes than this guest's 2 CPUs: holders are preempted inside the
/// critical section and waiters share CPUs with holders, the case where a
/// spinning waiter can only delay the holder.
void oversubscribed_increments(int reps) {
    const std::string name = "sync: 4 procs x 500k increments under the lock";
    if (!bench::wanted(name)) return;
    mp::Value<long, mp::Lock> value(0);
    increments_under_lock(reps, 4, 500'000, {lock_guard_increments(name, value)});
}

// ---------------------------------------------------------------- ping-pong

constexpr int pingpong_warmup = 500;

/// Times `rounds` round trips of parent_round() against child_round() in a child.
std::vector<double> time_pingpong(int reps, int rounds, const std::function<void()>& parent_round,
                                  const std::function<void()>& child_round) {
    std::vector<double> out;
    for (int r = 0; r < reps; ++r) {
        std::fflush(stdout);
        pid_t pid = ::fork();
        if (pid == 0) {
            for (int i = 0; i < pingpong_warmup + rounds; ++i) child_round();
            ::_exit(0);
        }
        for (int i = 0; i < pingpong_warmup; ++i) parent_round();
        auto t = bench::time_ms(1, [&] {
            for (int i = 0; i < rounds; ++i) parent_round();
        }, 0);
        ::waitpid(pid, nullptr, 0);
        out.push_back(t[0] * 1e3 / rounds);  // us per round trip
    }
    return out;
}

long futex(std::atomic<std::uint32_t>* w, int op, std::uint32_t v) {
    return ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(w), op, v, nullptr, nullptr, 0);
}

struct BoostPingPong {
    bip::interprocess_mutex m;
    bip::interprocess_condition c;
    int turn = 0;
};

void pingpong(int reps) {
    const std::string event_case = "sync: Event ping-pong round trip, 2 procs";
    const std::string cond_case = "sync: Condition ping-pong round trip, 2 procs";
    if (!bench::wanted(event_case) && !bench::wanted(cond_case)) return;
    constexpr int rounds = 10'000;

    // The physical anchor: one shared word, FUTEX_WAIT / FUTEX_WAKE, no spinning.
    auto* word = ::new (shared_anonymous(64)) std::atomic<std::uint32_t>(0);
    auto futex_rep = [&] { return time_pingpong(
        1, rounds,
        [&] {
            word->store(1);
            futex(word, FUTEX_WAKE, 1);
            while (word->load() != 0) futex(word, FUTEX_WAIT, 1);
        },
        [&] {
            while (word->load() != 1) futex(word, FUTEX_WAIT, 0);
            word->store(0);
            futex(word, FUTEX_WAKE, 1);
        })[0]; };

    auto* bp = make_shared_anonymous<BoostPingPong>();
    auto boost_rep = [&] { return time_pingpong(
        1, rounds,
        [&] {
            bip::scoped_lock<bip::interprocess_mutex> g(bp->m);
            bp->turn = 1;
            bp->c.notify_one();
            while (bp->turn != 0) bp->c.wait(g);
        },
        [&] {
            bip::scoped_lock<bip::interprocess_mutex> g(bp->m);
            while (bp->turn != 1) bp->c.wait(g);
            bp->turn = 0;
            bp->c.notify_one();
        })[0]; };

    mp::Event ping, pong;
    auto event_rep = [&] { return time_pingpong(
            1, rounds,
            [&] {
                ping.set();
                pong.wait();
                pong.clear();
            },
            [&] {
                ping.wait();
                ping.clear();
                pong.set();
            })[0]; };
    mp::Condition cond;
    mp::RawValue<int> turn(0);
    auto cond_rep = [&] { return time_pingpong(
            1, rounds,
            [&] {
                std::unique_lock<mp::Condition> g(cond);
                turn = 1;
                cond.notify();
                cond.wait_for([&] { return turn.get() == 0; });
            },
            [&] {
                std::unique_lock<mp::Condition> g(cond);
                cond.wait_for([&] { return turn.get() == 1; });
                turn = 0;
                cond.notify();
            })[0]; };

    // One repetition of each in turn, so that a change in the machine's load (it
    // is shared) hits ours and the anchors alike.
    std::vector<double> futex_us, boost_us, event_us, cond_us;
    for (int r = 0; r < reps; ++r) {
        futex_us.push_back(futex_rep());
        if (bench::wanted(event_case)) event_us.push_back(event_rep());
        boost_us.push_back(boost_rep());
        if (bench::wanted(cond_case)) cond_us.push_back(cond_rep());
    }
    if (bench::wanted(event_case)) {
        bench::report(event_case, "ours", "mp::Event x2 set/wait/clear", "us", event_us);
        bench::report(event_case, "anchor", "raw futex WAIT/WAKE on a shared word", "us", futex_us);
        bench::report(event_case, "anchor", boost_label + " interprocess_condition", "us", boost_us);
    }
    if (bench::wanted(cond_case)) {
        bench::report(cond_case, "ours", "mp::Condition notify/wait_for + turn", "us", cond_us);
        bench::report(cond_case, "anchor", "raw futex WAIT/WAKE on a shared word", "us", futex_us);
        bench::report(cond_case, "anchor", boost_label + " interprocess_condition", "us", boost_us);
    }
}

}  // namespace

int main() {
    uncontended_lock(bench::reps(7));
    contended_increments(bench::reps(5));
    oversubscribed_increments(bench::reps(5));
    pingpong(bench::reps(7));
}
