// Rows: environments that break naive process libraries (issue 13 item 3).
// Each runs the Process endings tour (one child per way of ending, all at
// once) and, where blocking calls are the point, the blocking-calls tour.
#include "harness.hpp"

#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstring>

namespace stress {

void process_endings_tour(Round& r, const mp::Context& ctx, bool status_may_be_lost = false);

namespace {

using Status = mp::RawArray<long>;

// ---------------------------------------------------------------- a signal every millisecond

extern "C" void ignore_signal(int) {}

/// Sends SIGUSR1, installed without SA_RESTART, to one thread every
/// millisecond: every blocking call on that thread sees EINTR again and again.
class SignalStorm {
public:
    explicit SignalStorm(pthread_t target) : target_(target) {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_handler = ignore_signal;
        sa.sa_flags = 0;  // no SA_RESTART
        sigemptyset(&sa.sa_mask);
        ::sigaction(SIGUSR1, &sa, &old_);
        thread_ = std::thread([this] {
            while (!stop_.load()) {
                ::pthread_kill(target_, SIGUSR1);
                ++sent_;
                std::this_thread::sleep_for(milliseconds(1));
            }
        });
    }
    ~SignalStorm() {
        stop_ = true;
        thread_.join();
        ::sigaction(SIGUSR1, &old_, nullptr);
    }
    long sent() const { return sent_.load(); }

private:
    pthread_t target_;
    struct sigaction old_;
    std::atomic<bool> stop_{false};
    std::atomic<long> sent_{0};
    std::thread thread_;
};

// ---------------------------------------------------------------- the blocking-calls tour

struct Tour {
    // Not an aggregate: the codec's `T v{}` would copy-list-initialize the
    // Queue members, whose default constructor is explicit.
    Tour() {}
    mp::Event ping;
    mp::Lock lock;
    mp::Condition cond;
    mp::Semaphore sem = mp::Semaphore(0);
    mp::Barrier barrier = mp::Barrier(2);
    mp::Queue<std::string> small;
    mp::Queue<std::string> big = mp::Queue<std::string>(0, 64 * 1024);
    Status st = Status(4, 0L);
    template <class A>
    void serialize(A& ar) {
        ar(ping, lock, cond, sem, barrier, small, big, st);
    }
};

/// The partner makes each of the parent's blocking calls actually block for
/// a while (the short sleeps below are that "while", not synchronization).
int tour_partner(Tour t, bool storm) {
    std::unique_ptr<SignalStorm> s;
    if (storm) s = std::make_unique<SignalStorm>(::pthread_self());
    t.barrier.wait();
    t.lock.acquire();
    t.ping.set();
    std::this_thread::sleep_for(milliseconds(20));
    t.lock.release();
    std::this_thread::sleep_for(milliseconds(20));
    t.cond.acquire();
    t.st[0] = 1;
    t.cond.notify_all();
    t.cond.release();
    std::this_thread::sleep_for(milliseconds(20));
    t.sem.release();
    std::this_thread::sleep_for(milliseconds(20));
    t.small.put("after a pause");
    t.big.put(std::string(3 << 20, 'x'));  // streams through a 64 KiB ring
    std::string back = t.small.get(std::chrono::seconds(10));
    if (back != "back") return 1;
    t.barrier.wait(std::chrono::seconds(10));
    return 7;
}

/// Every kind of blocking call, made by this thread while a partner child
/// makes it wait; each must end with its value.
void blocking_tour(Round& r, bool storm_child) {
    Tour t;
    mp::Process p(r.context(), tour_partner, t, storm_child);
    p.start();
    auto step = [&](bool ok, const char* what) {
        if (!ok) r.wrong(std::string("blocking call ended early or failed: ") + what);
        return ok;
    };
    try {
        t.barrier.wait(guard);
        step(t.ping.wait(guard), "Event::wait");
        step(t.lock.acquire(guard), "Lock::acquire");
        t.lock.release();
        t.cond.acquire();
        step(t.cond.wait_for([&] { return t.st[0] == 1; }, guard), "Condition::wait_for");
        t.cond.release();
        step(t.sem.acquire(guard), "Semaphore::acquire");
        step(t.small.get(guard) == "after a pause", "Queue::get");
        step(t.big.get(guard).size() == (3u << 20), "Queue::get of a 3 MiB item");
        t.small.put("back");
        t.barrier.wait(guard);
        step(p.result(guard) == 7, "Process::result");
    } catch (const std::exception& e) {
        r.wrong(std::string("a blocking call threw under the environment: ") + e.what());
        p.kill();
    }
}

// ---------------------------------------------------------------- the rows

ROW("env: SIGCHLD ignored", Ending::none, [](Round& r) {
    ::signal(SIGCHLD, SIG_IGN);
    process_endings_tour(r, r.context(), true);
}, Setup::none, 10);

std::atomic<long> g_reaped{0};
extern "C" void reap_everything(int) {
    int saved = errno;
    while (::waitpid(-1, nullptr, WNOHANG) > 0) ++g_reaped;
    errno = saved;
}

ROW("env: SIGCHLD reaper (waitpid(-1))", Ending::none, [](Round& r) {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_handler = reap_everything;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGCHLD, &sa, nullptr);
    process_endings_tour(r, r.context(), true);
}, Setup::none, 10);

ROW("env: a signal every 1 ms, no SA_RESTART", Ending::none, [](Round& r) {
    SignalStorm storm(::pthread_self());
    blocking_tour(r, true);
    process_endings_tour(r, r.context());
    if (storm.sent() < 10) r.wrong("the storm did not run");
});

ROW("env: ulimit -n 64", Ending::none, [](Round& r) {
    process_endings_tour(r, r.context());
    blocking_tour(r, false);
    // Run out of descriptors on purpose: a clear error, then everything works again.
    {
        std::vector<mp::Event> hoard;
        bool threw = false;
        try {
            for (int i = 0; i < 1000; ++i) hoard.emplace_back();
        } catch (const std::exception& e) {
            threw = std::strlen(e.what()) > 0;
        }
        if (!threw) r.wrong("1000 Events under ulimit -n 64 did not fail");
        try {
            mp::Process p(r.context(), +[] { return 1; });
            p.start();
            if (p.result(guard) != 1) r.wrong("a Process started with no descriptors left returned a wrong value");
        } catch (const mp::TimeoutError&) {
            r.hang("a Process started with no descriptors left never resolved");
        } catch (const std::exception&) {
            // A clear error is a right answer.
        }
    }
    process_endings_tour(r, r.context());
}, Setup::ulimit64);

int thread_child(int id) {
    if (id % 5 == 4) throw std::runtime_error(thrown_message);
    return id * 3;
}

ROW("env: 8 threads starting processes at once", Ending::none, [](Round& r) {
    std::mutex m;
    std::vector<std::string> failures;
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t)
        threads.emplace_back([&, t] {
            static const char* ctx[] = {"spawn", "fork", "forkserver"};
            for (int i = 0; i < 4; ++i) {
                const int id = t * 10 + i;
                try {
                    mp::Process p(mp::get_context(ctx[(t + i) % 3]), thread_child, id);
                    p.start();
                    try {
                        int v = p.result(guard);
                        if (id % 5 == 4 || v != id * 3) throw std::logic_error("wrong value");
                    } catch (const std::runtime_error& e) {
                        if (dynamic_cast<const mp::TimeoutError*>(&e)) {
                            p.kill();
                            throw;
                        }
                        if (id % 5 != 4 || std::string(e.what()) != thrown_message) throw;
                    }
                } catch (const std::exception& e) {
                    std::lock_guard<std::mutex> lk(m);
                    failures.push_back(std::string(ctx[(t + i) % 3]) + " child " + std::to_string(id) + ": " +
                                       e.what());
                }
            }
        });
    for (auto& th : threads) th.join();
    if (!failures.empty()) {
        if (failures[0].find("did not") != std::string::npos || failures[0].find("imeout") != std::string::npos)
            r.hang(failures[0]);
        else
            r.wrong(failures[0]);
    }
});

ROW("env: after 5000 shared objects", Ending::none, [](Round& r) {
    std::vector<mp::Lock> kept(200);
    for (int i = 0; i < 5000; ++i) {
        switch (i % 5) {
            case 0: {
                mp::Lock l;
                l.acquire();
                l.release();
                break;
            }
            case 1: mp::Event().set(); break;
            case 2: mp::Value<long>(i).set(i + 1); break;
            case 3: mp::Semaphore(1).release(); break;
            case 4: {
                mp::Queue<int> q(0, 4096);
                q.put(i);
                if (q.get() != i) r.wrong("a short-lived queue lost its item");
                break;
            }
        }
    }
    process_endings_tour(r, r.context());
    blocking_tour(r, false);
    for (auto& l : kept)
        if (!l.try_lock()) return r.wrong("a kept Lock is not free");
        else l.release();
});

}  // namespace
}  // namespace stress
