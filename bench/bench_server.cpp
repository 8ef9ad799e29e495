// bench_server: the server process - proxy calls, memory blocks - against
// Python's managers (bench/python/server.py, same case names) and the
// physical limits measured here.
//
//   server: proxy call round trip       a trivial method (x + x) called back to back from one
//                                       client thread, per call; anchors: the same calls over the
//                                       socket alone (no shared-memory slot), Python SyncManager
//   server: proxy call round trip, client and server pinned to two CPUs
//                                       the same, with the server and a client thread each pinned
//                                       to its own CPU: the placement where both sides sleeping
//                                       costs two cross-CPU wake-ups per call (bench-anchors
//                                       RESULTS.md: futex ping-pong on 2 CPUs ~60 us)
//   server: calls/s, 2 clients          two client processes calling at once, total calls/s
//   server: MemoryBlock create + first use in another process
//                                       the parent creates a 1 MiB block and queues its proxy; a
//                                       waiting child maps it, writes a byte and answers; anchor:
//                                       Python SharedMemory create + attach by name in the child
//   server: MemoryBlock write bandwidth from a child
//                                       a child copies 64 MiB into a mapped block, GB/s; anchor:
//                                       memcpy between two private buffers in one process
#include <cstdio>
#include <cstring>
#include <string>

#include <sched.h>
#include <vector>

#include "harness.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;

namespace {

struct Echo {
    int twice(int x) { return x + x; }
};

std::vector<double> to_us(std::vector<double> ms, double per) {
    for (double& v : ms) v = v * 1000 / per;
    return ms;
}

double call_loop(mp::Proxy<Echo> e, mp::Event go, int calls) {
    go.wait();
    auto t0 = std::chrono::steady_clock::now();
    int sum = 0;
    for (int i = 0; i < calls; ++i) sum += e.call<&Echo::twice>(i & 1023);
    bench::keep(sum);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// A child that maps each block it is sent, writes its first byte and answers.
void block_user(mp::Queue<mp::Proxy<mp::MemoryBlock>> blocks, mp::Queue<int> answers) {
    for (;;) {
        auto b = blocks.get();
        if (!b) return;
        b[0] = 1;
        answers.put(static_cast<int>(b.size()));
    }
}

/// Copies `src_size` bytes into the block `reps` times; returns GB/s of the best pass.
double block_writer(mp::Proxy<mp::MemoryBlock> b, int reps) {
    std::vector<unsigned char> src(b.size(), 7);
    std::memcpy(b.data(), src.data(), b.size());  // first touch, not timed
    double best = 0;
    for (int r = 0; r < reps; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        std::memcpy(b.data(), src.data(), b.size());
        bench::keep(b.data()[b.size() - 1]);
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::max(best, b.size() / s / 1e9);
    }
    return best;
}

/// Pins the calling thread (pid 0) or process `pid`'s main thread to one CPU.
bool pin(long pid, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(static_cast<pid_t>(pid), sizeof set, &set) == 0;
}

/// What the slot calls of this process did (printed, not a figure: bench/run ignores it).
void print_counters(const char* what) {
    auto k = mp::detail::server::slot_counters();
    std::printf("# %s: slot calls %llu, answered while spinning %llu, slept %llu (slow %llu), server woken %llu, "
                "resyncs %llu (met %llu)\n",
                what, (unsigned long long)k.calls, (unsigned long long)k.spun, (unsigned long long)k.slept,
                (unsigned long long)k.slow, (unsigned long long)k.woke_server, (unsigned long long)k.resyncs,
                (unsigned long long)k.resynced);
}

}  // namespace

int main(int argc, char** argv) {
    mp::init(argc, argv);
    const int n = bench::reps(15);
    mp::ServerProcess server;

    if (bench::wanted("server: proxy call round trip")) {
        constexpr int calls = 20000;
        auto e = server.create<Echo>();
        auto run = [&] {
            int sum = 0;
            for (int i = 0; i < calls; ++i) sum += e.call<&Echo::twice>(i & 1023);
            bench::keep(sum);
        };
        auto fast = bench::time_ms(n, run, 1);
        // The same from a thread whose connection has no slot: socket messages only.
        std::vector<double> socket_only;
        mp::detail::server::set_fast_path(false);
        mp::Thread t([&] { socket_only = bench::time_ms(std::max(5, n / 2), [&] {
            int sum = 0;
            for (int i = 0; i < calls / 4; ++i) sum += e.call<&Echo::twice>(i & 1023);
            bench::keep(sum);
        }, 1); });
        t.start();
        t.join();
        mp::detail::server::set_fast_path(true);
        bench::report("server: proxy call round trip", "ours", "mp::Proxy call (slot)", "us", to_us(fast, calls));
        bench::report("server: proxy call round trip", "anchor", "mp::Proxy call, socket only", "us",
                      to_us(socket_only, calls / 4));
        print_counters("proxy call round trip");
    }
    if (bench::wanted("server: proxy call round trip, pinned to two CPUs")) {
        constexpr int calls = 20000;
        // The server's accepting thread is pinned first: the thread it starts for
        // the new client thread's connection inherits the CPU.
        if (pin(server.pid(), 1)) {
            auto e = server.create<Echo>();
            std::vector<double> pinned;
            mp::Thread t([&] {
                pin(0, 0);
                pinned = bench::time_ms(n, [&] {
                    int sum = 0;
                    for (int i = 0; i < calls; ++i) sum += e.call<&Echo::twice>(i & 1023);
                    bench::keep(sum);
                }, 1);
            });
            t.start();
            t.join();
            cpu_set_t all;
            CPU_ZERO(&all);
            for (int c = 0; c < CPU_SETSIZE; ++c) CPU_SET(c, &all);
            sched_setaffinity(static_cast<pid_t>(server.pid()), sizeof all, &all);
            bench::report("server: proxy call round trip, pinned to two CPUs", "ours", "mp::Proxy call (slot), pinned",
                          "us", to_us(pinned, calls));
            print_counters("after the pinned calls");
        }
    }
    if (bench::wanted("server: calls/s, 2 clients")) {
        constexpr int calls = 20000;
        auto e = server.create<Echo>();
        std::vector<double> rates;
        for (int r = 0; r < std::max(5, n / 2); ++r) {
            mp::Event go;
            mp::Process a(call_loop, e, go, calls), b(call_loop, e, go, calls);
            a.start();
            b.start();
            go.set();
            double slowest = std::max(a.result(), b.result());
            rates.push_back(2 * calls / slowest);
        }
        bench::report("server: calls/s, 2 clients", "ours", "2 processes, mp::Proxy calls", "calls/s", rates);
    }
    if (bench::wanted("server: MemoryBlock create + first use")) {
        mp::Queue<mp::Proxy<mp::MemoryBlock>> blocks;
        mp::Queue<int> answers;
        mp::Process user(block_user, blocks, answers);
        user.start();
        auto once = [&] {
            blocks.put(server.MemoryBlock(1 << 20));
            if (answers.get() != (1 << 20)) std::abort();
        };
        auto ms = bench::time_ms(std::max(20, n * 4), once, 3);
        blocks.put(mp::Proxy<mp::MemoryBlock>());
        user.join();
        bench::report("server: MemoryBlock 1 MiB create + first use in another process", "ours",
                      "server.MemoryBlock + proxy via Queue", "us", to_us(ms, 1));
    }
    if (bench::wanted("server: MemoryBlock write bandwidth")) {
        constexpr std::size_t size = 64 << 20;
        auto b = server.MemoryBlock(size);
        std::vector<double> child;
        for (int r = 0; r < 5; ++r) {
            mp::Process p(block_writer, b, 5);
            p.start();
            child.push_back(p.result());
        }
        std::vector<unsigned char> src(size, 7), dst(size, 0);
        std::vector<double> local;
        for (int r = 0; r < 5; ++r) {
            double best = 0;
            for (int k = 0; k < 5; ++k) {
                auto t0 = std::chrono::steady_clock::now();
                std::memcpy(dst.data(), src.data(), size);
                bench::keep(dst[size - 1]);
                double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                best = std::max(best, size / s / 1e9);
            }
            local.push_back(best);
        }
        bench::report("server: MemoryBlock write bandwidth from a child (64 MiB)", "ours", "child memcpy into block",
                      "GB/s", child);
        bench::report("server: MemoryBlock write bandwidth from a child (64 MiB)", "anchor",
                      "memcpy in one process", "GB/s", local);
    }
}
