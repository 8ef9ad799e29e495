// bench/harness.hpp - the benchmarks' tiny timing kit (standard library only).
//
// A bench program times each case over several repetitions and prints one
// line per figure on stdout; bench/run pairs our figure with the anchor's and
// prints the table.  The line protocol is described at the top of bench/run:
//
//   FIG <case> <side: ours|anchor> <label> <unit> <median> <min> <max> <n>   (tab separated)
//
// Typical use:
//   auto ours = bench::time_ms(7, [&] { bench::keep(mp::encode(v)); });
//   bench::report("codec: encode vector<int> 1M", "ours", "mpservice", "ms", ours);
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace bench {

struct Stats {
    double median = 0, min = 0, max = 0;
    std::size_t n = 0;
};

inline Stats summarize(std::vector<double> v) {
    Stats s;
    if (v.empty()) return s;
    std::sort(v.begin(), v.end());
    s.n = v.size();
    s.median = s.n % 2 ? v[s.n / 2] : 0.5 * (v[s.n / 2 - 1] + v[s.n / 2]);
    s.min = v.front();
    s.max = v.back();
    return s;
}

/// Keeps the optimizer from discarding a result that is otherwise unused.
template <class T>
inline void keep(const T& value) {
    asm volatile("" : : "g"(&value) : "memory");
}

/// Runs `fn` `warmup` times untimed, then `reps` timed times; returns the
/// duration of each timed run in milliseconds.
template <class Fn>
std::vector<double> time_ms(int reps, Fn&& fn, int warmup = 1) {
    using clock = std::chrono::steady_clock;
    for (int i = 0; i < warmup; ++i) fn();
    std::vector<double> out;
    out.reserve(static_cast<std::size_t>(reps));
    for (int i = 0; i < reps; ++i) {
        const auto t0 = clock::now();
        fn();
        out.push_back(std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    }
    return out;
}

/// The steady clock in nanoseconds: one clock for every process of the machine
/// (CLOCK_MONOTONIC, QueryPerformanceCounter), so stamps taken in a child compare
/// with the parent's.
inline std::int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// Converts per-run durations (ms) to a rate: `amount` units per second.
inline std::vector<double> per_second(const std::vector<double>& ms, double amount) {
    std::vector<double> out;
    for (double t : ms) out.push_back(t > 0 ? amount * 1e3 / t : 0);
    return out;
}

/// Repetitions: BENCH_REPS in the environment overrides the default.
inline int reps(int fallback) {
    const char* s = std::getenv("BENCH_REPS");
    const int n = s ? std::atoi(s) : 0;
    return n > 0 ? n : fallback;
}

/// True if the case should run: BENCH_FILTER, if set, must be a substring of its name.
inline bool wanted(const std::string& case_name) {
    const char* f = std::getenv("BENCH_FILTER");
    return !f || case_name.find(f) != std::string::npos;
}

/// Prints one figure line.  `side` is "ours" or "anchor".
inline void report(const std::string& case_name, const char* side, const std::string& label, const char* unit,
                   const std::vector<double>& values) {
    const Stats s = summarize(values);
    std::printf("FIG\t%s\t%s\t%s\t%s\t%.6g\t%.6g\t%.6g\t%zu\n", case_name.c_str(), side, label.c_str(), unit,
                s.median, s.min, s.max, s.n);
    std::fflush(stdout);
}

}  // namespace bench
