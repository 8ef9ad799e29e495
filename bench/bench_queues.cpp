// bench_queues: mpservice Queue<T> between processes, side by side with the
// physical limit (a minimal lock-free SPSC shared-memory ring, memcpy), Boost.
// Interprocess message_queue and Python's multiprocessing.Queue.
//
// Build (until the bench harness is wired in):
//   g++ -std=c++17 -O2 -I. bench/bench_queues.cpp -o build/bench_queues -pthread -lrt
// Run:  build/bench_queues [--no-python] [--reps N]
// Output: bench/run's FIG lines (median, min, max over the repetitions; the
// 8 B, 1 KiB and batch cases) and ready-made rows (1 MiB and 2P2C cases).
// BENCH_FILTER and BENCH_REPS are honoured.
#define MPSERVICE_IMPLEMENTATION
#include "../mpservice.hpp"

#include <boost/interprocess/ipc/message_queue.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

namespace mp = mpservice;
namespace bip = boost::interprocess;

namespace {

int reps = 5;

/// A Python figure: median, min, max over n runs.
struct PyFigure {
    double median = 0, min = 0, max = 0;
    int n = 0;
};


double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void emit(const std::string& name, const std::string& ours, const std::string& anchor, const char* unit,
          double our_median, double anchor_median) {
    std::printf("%s\t%s\t%s\t%s\t%.4g\t%.4g\t%.3f\n", name.c_str(), ours.c_str(), anchor.c_str(), unit, our_median,
                anchor_median, anchor_median > 0 ? our_median / anchor_median : 0.0);
    std::fflush(stdout);
}

void* shared_anon(std::size_t n) {
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    std::memset(p, 0, n);
    return p;
}

/// A start line shared with forked children: they wait for it, so process
/// start-up is not timed.
struct StartLine {
    std::atomic<int> go{0};
    std::atomic<int> ready{0};
};

pid_t fork_worker(StartLine* start, std::function<void()> body) {
    std::fflush(nullptr);
    pid_t pid = ::fork();
    if (pid < 0) std::abort();
    if (pid == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        start->ready.fetch_add(1);
        while (!start->go.load(std::memory_order_acquire)) mp::detail::os::cpu_relax();
        body();
        ::_exit(0);
    }
    return pid;
}

void reap(pid_t pid) {
    int st = 0;
    ::waitpid(pid, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        std::fprintf(stderr, "bench child failed\n");
        std::exit(1);
    }
}

/// Runs `consume` in this process against `produce` in a child; seconds.
double timed_pair(const std::function<void()>& produce, const std::function<void()>& consume) {
    auto* start = static_cast<StartLine*>(shared_anon(sizeof(StartLine)));
    new (start) StartLine();
    pid_t pid = fork_worker(start, produce);
    while (start->ready.load() < 1) mp::detail::os::cpu_relax();
    double t0 = now_s();
    start->go.store(1, std::memory_order_release);
    consume();
    double dt = now_s() - t0;
    reap(pid);
    ::munmap(start, sizeof(StartLine));
    return dt;
}

// ---------------------------------------------------------------- the physical limit: SPSC ring

template <std::size_t Slot, std::size_t Slots>
struct SpscRing {
    alignas(64) std::atomic<std::uint64_t> head{0};
    alignas(64) std::atomic<std::uint64_t> tail{0};
    alignas(64) unsigned char slots[Slots][Slot];
};

template <std::size_t Slot, std::size_t Slots>
double spsc_run(long n) {
    using Ring = SpscRing<Slot, Slots>;
    auto* r = static_cast<Ring*>(shared_anon(sizeof(Ring)));
    new (r) Ring();
    std::uint64_t check = 0;
    double dt = timed_pair(
        [&] {
            unsigned char msg[Slot];
            std::memset(msg, 0xab, Slot);
            std::uint64_t head_seen = 0;
            for (long i = 0; i < n; ++i) {
                std::uint64_t t = r->tail.load(std::memory_order_relaxed);
                while (t - head_seen >= Slots) {
                    head_seen = r->head.load(std::memory_order_acquire);
                    mp::detail::os::cpu_relax();
                }
                std::memcpy(msg, &i, sizeof i);
                std::memcpy(r->slots[t % Slots], msg, Slot);
                r->tail.store(t + 1, std::memory_order_release);
            }
        },
        [&] {
            unsigned char msg[Slot];
            std::uint64_t tail_seen = 0;
            for (long i = 0; i < n; ++i) {
                std::uint64_t h = r->head.load(std::memory_order_relaxed);
                while (h == tail_seen) {
                    tail_seen = r->tail.load(std::memory_order_acquire);
                    if (h == tail_seen) mp::detail::os::cpu_relax();
                }
                std::memcpy(msg, r->slots[h % Slots], Slot);
                r->head.store(h + 1, std::memory_order_release);
                long x;
                std::memcpy(&x, msg, sizeof x);
                check += static_cast<std::uint64_t>(x);
            }
        });
    if (check != static_cast<std::uint64_t>(n) * (n - 1) / 2) std::fprintf(stderr, "spsc: bad checksum\n");
    ::munmap(r, sizeof(Ring));
    return dt;
}

// ---------------------------------------------------------------- Boost.Interprocess message_queue

template <std::size_t Msg>
double boost_run(long n) {
    const std::string name = "bench_queues_" + std::to_string(::getpid());
    bip::message_queue::remove(name.c_str());
    bip::message_queue mq(bip::create_only, name.c_str(), 1024, Msg);
    long bad = 0;
    double dt = timed_pair(
        [&] {
            bip::message_queue cq(bip::open_only, name.c_str());
            unsigned char msg[Msg];
            std::memset(msg, 0xab, Msg);
            for (long i = 0; i < n; ++i) {
                std::memcpy(msg, &i, sizeof i);
                cq.send(msg, Msg, 0);
            }
        },
        [&] {
            unsigned char buf[Msg];
            bip::message_queue::size_type got;
            unsigned prio;
            for (long i = 0; i < n; ++i) {
                mq.receive(buf, Msg, got, prio);
                long x;
                std::memcpy(&x, buf, sizeof x);
                bad += (x != i) || (got != Msg);
            }
        });
    bip::message_queue::remove(name.c_str());
    if (bad) std::fprintf(stderr, "boost: %ld bad messages\n", bad);
    return dt;
}

// ---------------------------------------------------------------- ours

double ours_8b(long n) {
    mp::Queue<std::uint64_t> q;
    std::uint64_t sum = 0;
    double dt = timed_pair(
        [&] {
            for (long i = 0; i < n; ++i) q.put(static_cast<std::uint64_t>(i));
        },
        [&] {
            for (long i = 0; i < n; ++i) sum += q.get();
        });
    if (sum != static_cast<std::uint64_t>(n) * (n - 1) / 2) std::fprintf(stderr, "ours 8B: bad checksum\n");
    return dt;
}

double ours_bytes(long n, std::size_t size, std::size_t capacity = mp::Queue<std::string>::unbounded) {
    mp::Queue<std::string> q(0, capacity);
    long bad = 0;
    double dt = timed_pair(
        [&] {
            std::string msg(size, '\xab');
            for (long i = 0; i < n; ++i) {
                std::memcpy(&msg[0], &i, sizeof i);
                q.put(msg);
            }
        },
        [&] {
            for (long i = 0; i < n; ++i) {
                std::string s = q.get();
                long x;
                std::memcpy(&x, s.data(), sizeof x);
                bad += (x != i) || (s.size() != size);
            }
        });
    if (bad) std::fprintf(stderr, "ours %zu B: %ld bad items\n", size, bad);
    return dt;
}

/// The same streams in batches: put_many of `batch` items, get_many of up to
/// `batch` (a batch moves under one lock hold and one commit on each side).
double ours_8b_batched(long n, std::size_t batch) {
    mp::Queue<std::uint64_t> q;
    std::uint64_t sum = 0;
    long got = 0;
    double dt = timed_pair(
        [&] {
            std::vector<std::uint64_t> items(batch);
            for (long i = 0; i < n;) {
                std::size_t k = std::min<std::size_t>(batch, static_cast<std::size_t>(n - i));
                items.resize(k);
                for (std::size_t j = 0; j < k; ++j) items[j] = static_cast<std::uint64_t>(i + long(j));
                q.put_many(items);
                i += long(k);
            }
        },
        [&] {
            std::vector<std::uint64_t> out;
            out.reserve(batch);
            while (got < n) {
                out.clear();
                got += long(q.get_many(out, batch));
                for (std::uint64_t x : out) sum += x;
            }
        });
    if (sum != static_cast<std::uint64_t>(n) * (n - 1) / 2) std::fprintf(stderr, "ours 8B batched: bad checksum\n");
    return dt;
}

/// `reuse`: the consumer takes each batch with get_many_reusing into one vector
/// (its strings keep their storage); otherwise with get_many after clear(),
/// which allocates every item anew.
double ours_bytes_batched(long n, std::size_t size, std::size_t batch, bool reuse) {
    mp::Queue<std::string> q;
    long bad = 0, got = 0;
    double dt = timed_pair(
        [&] {
            std::vector<std::string> items(batch, std::string(size, '\xab'));
            for (long i = 0; i < n;) {
                std::size_t k = std::min<std::size_t>(batch, static_cast<std::size_t>(n - i));
                items.resize(k, std::string(size, '\xab'));
                for (std::size_t j = 0; j < k; ++j) {
                    long x = i + long(j);
                    std::memcpy(&items[j][0], &x, sizeof x);
                }
                q.put_many(items);
                i += long(k);
            }
        },
        [&] {
            std::vector<std::string> out;
            out.reserve(batch);
            while (got < n) {
                if (reuse) {
                    q.get_many_reusing(out, batch);
                } else {
                    out.clear();
                    q.get_many(out, batch);
                }
                for (const std::string& s : out) {
                    long x;
                    std::memcpy(&x, s.data(), sizeof x);
                    bad += (x != got) || (s.size() != size);
                    ++got;
                }
            }
        });
    if (bad) std::fprintf(stderr, "ours %zu B batched: %ld bad items\n", size, bad);
    return dt;
}

/// producers x consumers processes, 8-byte items; seconds from go to all done.
double ours_mpmc(int producers, int consumers, long per_producer) {
    mp::Queue<std::uint64_t> q;
    auto* start = static_cast<StartLine*>(shared_anon(sizeof(StartLine)));
    new (start) StartLine();
    std::vector<pid_t> prods, cons;
    for (int c = 0; c < consumers; ++c)
        cons.push_back(fork_worker(start, [&] {
            try {
                for (;;) q.get();
            } catch (const mp::QueueClosed&) {
            }
        }));
    for (int p = 0; p < producers; ++p)
        prods.push_back(fork_worker(start, [&] {
            for (long i = 0; i < per_producer; ++i) q.put(static_cast<std::uint64_t>(i));
        }));
    while (start->ready.load() < producers + consumers) mp::detail::os::cpu_relax();
    double t0 = now_s();
    start->go.store(1, std::memory_order_release);
    for (pid_t pid : prods) reap(pid);
    q.close();
    for (pid_t pid : cons) reap(pid);
    double dt = now_s() - t0;
    ::munmap(start, sizeof(StartLine));
    return dt;
}

// ---------------------------------------------------------------- memcpy

double memcpy_rate(std::size_t block, std::size_t total_bytes) {
    std::vector<char> src(block, 1), dst(block, 0);
    std::memcpy(dst.data(), src.data(), block);
    long n = static_cast<long>(total_bytes / block);
    double t0 = now_s();
    for (long i = 0; i < n; ++i) {
        src[static_cast<std::size_t>(i) % block] = static_cast<char>(i);
        std::memcpy(dst.data(), src.data(), block);
        asm volatile("" ::"r"(dst.data()) : "memory");
    }
    return double(n) * double(block) / (now_s() - t0) / 1e6;
}

std::vector<double> repeat(const std::function<double()>& f) {
    f();  // warm-up
    std::vector<double> v;
    for (int i = 0; i < reps; ++i) v.push_back(f());
    return v;
}

/// Runs ours and the anchors alternately (as interleaved) and returns every
/// run's seconds of each.
std::vector<std::vector<double>> interleaved_runs(const std::vector<std::function<double()>>& fs) {
    for (auto& f : fs) f();  // warm-up
    std::vector<std::vector<double>> secs(fs.size());
    for (int i = 0; i < reps; ++i)
        for (std::size_t k = 0; k < fs.size(); ++k) secs[k].push_back(fs[k]());
    return secs;
}

/// One figure line of bench/run's protocol (median, min, max, n of `values`).
void fig(const std::string& name, const char* side, const std::string& label, const char* unit,
         std::vector<double> values) {
    std::sort(values.begin(), values.end());
    std::printf("FIG\t%s\t%s\t%s\t%s\t%.6g\t%.6g\t%.6g\t%zu\n", name.c_str(), side, label.c_str(), unit,
                median(values), values.front(), values.back(), values.size());
    std::fflush(stdout);
}

void fig_python(const std::string& name, const std::string& label, const char* unit, const PyFigure& f) {
    std::printf("FIG\t%s\tanchor\t%s\t%s\t%.6g\t%.6g\t%.6g\t%d\n", name.c_str(), label.c_str(), unit, f.median,
                f.min, f.max, f.n);
    std::fflush(stdout);
}

bool wanted(const std::string& name) {
    const char* f = std::getenv("BENCH_FILTER");
    return !f || name.find(f) != std::string::npos;
}

/// Runs ours and the anchors alternately, so that a change in the machine's load
/// (it is shared) hits all of them alike.  Returns the median seconds of each.
std::vector<double> interleaved(const std::vector<std::function<double()>>& fs) {
    for (auto& f : fs) f();  // warm-up
    std::vector<std::vector<double>> secs(fs.size());
    for (int i = 0; i < reps; ++i)
        for (std::size_t k = 0; k < fs.size(); ++k) secs[k].push_back(fs[k]());
    std::vector<double> out;
    for (auto& v : secs) out.push_back(median(v));
    return out;
}

std::vector<double> rates(const std::vector<double>& secs, double items) {
    std::vector<double> v;
    for (double s : secs) v.push_back(items / s);
    return v;
}

// ---------------------------------------------------------------- Python

std::map<std::string, PyFigure> run_python() {
    std::map<std::string, PyFigure> out;
    std::string script = __FILE__;
    script = script.substr(0, script.rfind('/') + 1) + "python/queues.py";
    std::string cmd = "python3 " + script + " --reps " + std::to_string(reps);
    FILE* f = ::popen(cmd.c_str(), "r");
    if (!f) return out;
    char line[512];
    while (std::fgets(line, sizeof line, f)) {
        char key[128];
        PyFigure f;
        if (std::sscanf(line, "%127s %lf %*s %lf %lf %d", key, &f.median, &f.min, &f.max, &f.n) == 5) out[key] = f;
    }
    ::pclose(f);
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    bool python = true;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--no-python") python = false;
        else if (a == "--reps" && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
    }
    if (const char* r = std::getenv("BENCH_REPS")) reps = std::max(1, std::atoi(r));
    std::map<std::string, PyFigure> py;
    if (python) py = run_python();

    const char* ours = "mp::Queue 1 producer proc -> 1 consumer";
    const std::string c8 = "queue 1P1C 8 B x 1M", c1k = "queue 1P1C 1 KiB x 100k";
    if (wanted(c8)) {  // 1M x 8 B
        const long n = 1000000;
        auto m = interleaved_runs({[&] { return ours_8b(n); }, [&] { return spsc_run<8, 16384>(n); },
                                   [&] { return boost_run<8>(n); }});
        fig(c8, "ours", ours, "msg/s", rates(m[0], n));
        fig(c8, "anchor", "lock-free SPSC shm ring (spin, 16Ki slots)", "msg/s", rates(m[1], n));
        fig(c8, "anchor", "Boost.Interprocess message_queue (cap 1024)", "msg/s", rates(m[2], n));
        if (py.count("queue_8b")) fig_python(c8, "Python mp.Queue (ints, fork)", "msg/s", py["queue_8b"]);
    }
    if (wanted(c1k)) {  // 100k x 1 KiB
        const long n = 100000;
        auto m = interleaved_runs({[&] { return ours_bytes(n, 1024); }, [&] { return spsc_run<1024, 512>(n); },
                                   [&] { return boost_run<1024>(n); }});
        fig(c1k, "ours", ours, "msg/s", rates(m[0], n));
        fig(c1k, "anchor", "lock-free SPSC shm ring (spin, 512 slots)", "msg/s", rates(m[1], n));
        fig(c1k, "anchor", "Boost.Interprocess message_queue (cap 1024)", "msg/s", rates(m[2], n));
        if (py.count("queue_1k")) fig_python(c1k, "Python mp.Queue (bytes, fork)", "msg/s", py["queue_1k"]);
    }
    const std::string b8 = "queue 1P1C 8 B x 1M, put_many/get_many", b1k = "queue 1P1C 1 KiB x 100k, put_many/get_many",
                      b1k_new = "queue 1P1C 1 KiB x 100k, put_many/get_many after clear()";
    if (wanted(b8) || wanted(b1k) || wanted(b1k_new)) {  // batches of 256 items against the SPSC ring
        const long n = 1000000, n1k = 100000;
        const std::size_t batch = 256;
        auto m = interleaved_runs({[&] { return ours_8b_batched(n, batch); }, [&] { return spsc_run<8, 16384>(n); },
                                   [&] { return ours_bytes_batched(n1k, 1024, batch, true); },
                                   [&] { return spsc_run<1024, 512>(n1k); },
                                   [&] { return ours_bytes_batched(n1k, 1024, batch, false); }});
        const char* ours_b = "mp::Queue put_many/get_many, batches of 256, 1P->1C";
        fig(b8, "ours", ours_b, "msg/s", rates(m[0], n));
        fig(b8, "anchor", "lock-free SPSC shm ring (spin, 16Ki slots)", "msg/s", rates(m[1], n));
        fig(b1k, "ours", "mp::Queue put_many/get_many_reusing, batches of 256, 1P->1C", "msg/s", rates(m[2], n1k));
        fig(b1k, "anchor", "lock-free SPSC shm ring (spin, 512 slots)", "msg/s", rates(m[3], n1k));
        // The same stream with a consumer that allocates every item anew: what
        // malloc's handling of a freed 256 KiB batch costs (see PERFORMANCE.md).
        fig(b1k_new, "ours", "mp::Queue put_many/get_many after out.clear(), batches of 256", "msg/s", rates(m[4], n1k));
        fig(b1k_new, "anchor", "lock-free SPSC shm ring (spin, 512 slots)", "msg/s", rates(m[3], n1k));
    }
    if (!wanted("queue 1P1C 1 MiB x 1k") && !wanted("queue 2P2C 8 B x 1M")) return 0;
    {  // 1k x 1 MiB
        const long n = 1000;
        const std::size_t size = 1 << 20;
        const double mb = double(n) * size / 1e6;
        auto m = interleaved({[&] { return ours_bytes(n, size); }, [&] { return ours_bytes(n, size, 4 * size); }});
        std::vector<double> hot, cold;
        for (int i = 0; i < reps; ++i) hot.push_back(memcpy_rate(size, std::size_t(2) << 30));
        for (int i = 0; i < reps; ++i) cold.push_back(memcpy_rate(std::size_t(256) << 20, std::size_t(1) << 30));
        const char* ours4 = "mp::Queue 1P->1C, 4 MiB ring (items whole, not chunked)";
        emit("queue 1P1C 1 MiB x 1k", ours, "memcpy 1 MiB, cache-warm, one process", "MB/s", mb / m[0], median(hot));
        emit("queue 1P1C 1 MiB x 1k", ours, "memcpy 256 MiB, one process", "MB/s", mb / m[0], median(cold));
        emit("queue 1P1C 1 MiB x 1k", ours4, "memcpy 1 MiB, cache-warm, one process", "MB/s", mb / m[1], median(hot));
        emit("queue 1P1C 1 MiB x 1k", ours4, "memcpy 256 MiB, one process", "MB/s", mb / m[1], median(cold));
        if (py.count("queue_1m"))
            emit("queue 1P1C 1 MiB x 1k", ours, "Python mp.Queue (bytes, fork)", "MB/s", mb / m[0], py["queue_1m"].median);
    }
    {  // 2 producers x 2 consumers, 8 B
        const long per = 500000;
        double q = median(rates(repeat([&] { return ours_mpmc(2, 2, per); }), 2.0 * per));
        if (py.count("queue_2x2"))
            emit("queue 2P2C 8 B x 1M", "mp::Queue 2 producer procs -> 2 consumer procs",
                 "Python mp.Queue 2P2C (ints, fork)", "items/s", q, py["queue_2x2"].median);
        else
            emit("queue 2P2C 8 B x 1M", "mp::Queue 2 producer procs -> 2 consumer procs", "-", "items/s", q, 0);
    }
}
