// bench_pool: the process pool and the runner, against Python's Pool (bench/python/pool.py,
// same case names), the ideal parallel time and a raw pipe round trip.
//
//   pool: map 1M ints, Pool(2)               Pool(2).map(inc, 1M ints), default chunksize
//   pool: apply_async().get() round trip     one small task on an idle Pool(2), per call
//   pool: CPU-bound map 2k x ~1 ms, Pool(2)  vs the serial time of the same calls / 2 (the ideal)
//   pool: imap 10M lazy ints (chunksize 1000)  items/s, and the parent's peak RSS (KiB,
//                                              VmHWM), each measured in a fresh process
//   runner: call round trip                  ProcessRunner<T>::operator() vs an 8-byte
//                                            write/read round trip over two pipes to a child
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "harness.hpp"
#include "mpservice.hpp"

extern char** environ;
namespace mp = mpservice;

namespace {

constexpr const char imap_child_flag[] = "--bench-imap-child";

int inc(int x) { return x + 1; }

/// About 1 ms of arithmetic (calibrated on this kind of machine; the serial
/// figure is measured in the same run, so the ratio does not depend on it).
double burn(int seed) {
    double x = seed * 1e-9;
    for (int i = 0; i < 400000; ++i) x = x * 1.0000001 + 1e-9;
    return x;
}

struct Echo {
    long operator()(long x) { return x; }
};

/// 0, 1, ..., n-1, generated as they are read.
struct Counting {
    int n;
    struct iterator {
        int i;
        using value_type = int;
        using difference_type = std::ptrdiff_t;
        using reference = int;
        using pointer = void;
        using iterator_category = std::input_iterator_tag;
        int operator*() const { return i; }
        iterator& operator++() {
            ++i;
            return *this;
        }
        bool operator!=(const iterator& o) const { return i != o.i; }
        bool operator==(const iterator& o) const { return i == o.i; }
    };
    iterator begin() const { return {0}; }
    iterator end() const { return {n}; }
};

/// This process's peak RSS since its exec: VmHWM belongs to the program's own
/// memory map (ru_maxrss would also count the spawning bench process's peak,
/// since posix_spawn runs the child in the parent's memory until the exec).
long peak_rss_kib() {
    std::FILE* f = std::fopen("/proc/self/status", "r");
    long kib = -1;
    if (f) {
        char line[256];
        while (std::fgets(line, sizeof line, f))
            if (std::sscanf(line, "VmHWM: %ld kB", &kib) == 1) break;
        std::fclose(f);
    }
    if (kib >= 0) return kib;
    rusage u{};
    ::getrusage(RUSAGE_SELF, &u);
    return u.ru_maxrss;
}

/// In a fresh process: imap over 10M lazily generated items; prints seconds and peak RSS.
int imap_child() {
    const int n = 10000000;
    mp::Pool pool(2);
    auto t0 = std::chrono::steady_clock::now();
    long long sum = 0;
    for (int r : pool.imap(inc, Counting{n}, 1000)) sum += r;
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sum != static_cast<long long>(n) * (n + 1) / 2) return 3;
    std::printf("%.6f %ld\n", s, peak_rss_kib());
    return 0;
}

/// Runs this binary with the imap flag; returns {seconds, peak KiB}.
std::pair<double, double> run_imap_child() {
    int out[2];
    if (::pipe(out) != 0) throw std::runtime_error("pipe");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    char self[] = "/proc/self/exe";
    char flag[sizeof imap_child_flag];
    std::memcpy(flag, imap_child_flag, sizeof flag);
    char* argv[] = {self, flag, nullptr};
    pid_t pid;
    if (posix_spawn(&pid, self, &fa, nullptr, argv, environ) != 0) throw std::runtime_error("posix_spawn");
    posix_spawn_file_actions_destroy(&fa);
    ::close(out[1]);
    std::string text;
    char buf[256];
    for (long got; (got = ::read(out[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(got));
    ::close(out[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    double s = 0, kib = 0;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || std::sscanf(text.c_str(), "%lf %lf", &s, &kib) != 2)
        throw std::runtime_error("imap child failed");
    return {s, kib};
}

/// Round trips of 8 bytes to a forked echo child over two pipes, in microseconds each.
std::vector<double> raw_pipe_round_trip_us(int reps, int calls) {
    int to[2], from[2];
    if (::pipe(to) != 0 || ::pipe(from) != 0) throw std::runtime_error("pipe");
    pid_t pid = ::fork();
    if (pid == 0) {
        ::close(to[1]);
        ::close(from[0]);
        long v;
        while (::read(to[0], &v, sizeof v) == sizeof v)
            if (::write(from[1], &v, sizeof v) != sizeof v) break;
        ::_exit(0);
    }
    ::close(to[0]);
    ::close(from[1]);
    auto ms = bench::time_ms(reps, [&] {
        for (long i = 0; i < calls; ++i) {
            long v = i;
            if (::write(to[1], &v, sizeof v) != sizeof v || ::read(from[0], &v, sizeof v) != sizeof v)
                throw std::runtime_error("pipe round trip");
        }
    });
    ::close(to[1]);
    ::close(from[0]);
    ::waitpid(pid, nullptr, 0);
    for (double& v : ms) v = v * 1000 / calls;
    return ms;
}

}  // namespace

int main(int argc, char** argv) {
    mp::init(argc, argv);
    if (argc > 1 && std::strcmp(argv[1], imap_child_flag) == 0) return imap_child();
    const int reps = bench::reps(5);

    const std::string map_case = "pool: map 1M ints, Pool(2)";
    const std::string apply_case = "pool: apply_async().get() round trip";
    const std::string cpu_case = "pool: CPU-bound map 2k x ~1 ms, Pool(2)";
    const std::string imap_case = "pool: imap 10M lazy ints (chunksize 1000)";
    const std::string imap_rss_case = "pool: imap 10M lazy ints, parent peak RSS";
    const std::string runner_case = "runner: call round trip";
    {
        mp::Pool pool(2);
        if (bench::wanted(map_case)) {
            std::vector<int> in(1000000);
            for (int i = 0; i < 1000000; ++i) in[static_cast<std::size_t>(i)] = i;
            auto ms = bench::time_ms(reps, [&] {
                auto out = pool.map(inc, in);
                if (out.size() != in.size() || out.back() != 1000000) throw std::runtime_error("map");
                bench::keep(out);
            });
            bench::report(map_case, "ours", "mp::Pool(2).map", "ms", ms);
        }
        if (bench::wanted(apply_case)) {
            const int calls = 2000;
            auto ms = bench::time_ms(reps, [&] {
                for (int i = 0; i < calls; ++i)
                    if (pool.apply_async(inc, i).get() != i + 1) throw std::runtime_error("apply");
            });
            for (double& v : ms) v = v * 1000 / calls;
            bench::report(apply_case, "ours", "mp::Pool::apply_async().get()", "us", ms);
        }
        if (bench::wanted(cpu_case)) {
            const int n = 2000;
            std::vector<int> in(n);
            for (int i = 0; i < n; ++i) in[static_cast<std::size_t>(i)] = i;
            int r = std::max(2, reps / 2);
            auto pooled = bench::time_ms(r, [&] { bench::keep(pool.map(burn, in)); }, 0);
            auto serial = bench::time_ms(r, [&] {
                double s = 0;
                for (int x : in) s += burn(x);
                bench::keep(s);
            }, 0);
            for (double& v : serial) v /= 2;
            bench::report(cpu_case, "ours", "mp::Pool(2).map", "ms", pooled);
            bench::report(cpu_case, "anchor", "ideal: serial time / 2 (same run)", "ms", serial);
        }
    }
    if (bench::wanted(imap_case) || bench::wanted(imap_rss_case)) {
        std::vector<double> rate, kib;
        int r = std::max(1, reps / 3);
        for (int i = 0; i < r; ++i) {
            auto [s, k] = run_imap_child();
            rate.push_back(1e7 / s);
            kib.push_back(k);
        }
        bench::report(imap_case, "ours", "mp::Pool(2).imap", "items/s", rate);
        bench::report(imap_rss_case, "ours", "mp::Pool(2).imap", "KiB", kib);
    }
    if (bench::wanted(runner_case)) {
        const int calls = 5000;
        mp::ProcessRunner<Echo> runner;
        auto ms = bench::time_ms(reps, [&] {
            for (long i = 0; i < calls; ++i)
                if (runner(i) != i) throw std::runtime_error("runner");
        });
        for (double& v : ms) v = v * 1000 / calls;
        bench::report(runner_case, "ours", "mp::ProcessRunner call", "us", ms);
        bench::report(runner_case, "anchor", "raw pipe round trip (fork, 8 B)", "us", raw_pipe_round_trip_us(reps, calls));
    }
    return 0;
}
