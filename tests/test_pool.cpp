// Pool and AsyncResult: results and order, Python's error semantics, the
// lifecycle, and a pool that survives its workers - with real worker processes.
#include <doctest/doctest.h>

#if defined(_WIN32)
#include "win32_api.hpp"  // OpenProcess: whether a warm child has gone (process_gone)
#endif
#if !defined(_WIN32)
#include <dirent.h>
#include <signal.h>
#include <sys/types.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "fork_helpers.hpp"
#include "mpservice.hpp"
#include "sanitizers.hpp"

namespace mp = mpservice;

// Under ThreadSanitizer: libstdc++ is not instrumented, so the atomic reference
// count of an exception_ptr is invisible to it, and freeing the last reference
// on the pool's result thread looks like a race with the thread that read the
// exception through another reference.  A robust mutex taken over from a
// worker that died holding it (killed inside a put) was locked in another
// process, which it cannot see either.
extern "C" const char* __tsan_default_suppressions() {
    return "race:std::__exception_ptr::exception_ptr::_M_release\n"
           "mutex:mpservice::detail::os::robust_mutex_unlock_status\n";
}
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

int square(int x) { return x * x; }
int add(int a, int b) { return a + b; }
long my_pid(int) { return forktest::self_pid(); }
void nothing(int) {}

int fail_at_3_and_50(int x) {
    if (x == 3) throw std::invalid_argument("three");
    if (x == 50) throw std::runtime_error("fifty");
    return x;
}

// A per-worker global set by the initializer, and what it was handed.
int g_init_runs = 0;
mp::Queue<long> g_pids;
mp::Array<int> g_runs(1);
mp::Event g_never;

void init_counting(mp::Value<int> counter) {
    ++g_init_runs;
    std::lock_guard<mp::RLock> hold(counter.get_lock());
    counter.get_obj() += 1;
}
int init_runs_here(int) { return g_init_runs; }

void init_crash_kit(mp::Array<int> runs, mp::Queue<long> pids, mp::Event never) {
    g_runs = runs;
    g_pids = pids;
    g_never = never;
}

/// Counts its run in the shared array; item `victim` dies the way `how` says.
template <int How>
int run_or_die(int x) {
    {
        std::lock_guard<mp::RLock> hold(g_runs.get_lock());
        g_runs[static_cast<std::size_t>(x)] += 1;
    }
    if (x == 500) {
        if (How == 0) {  // SIGKILL from outside: tell the parent who we are, then wait
            g_pids.put(forktest::self_pid());
            g_never.wait();
        }
#if !defined(_WIN32)
        if (How == 1) ::raise(SIGSEGV);
#else
        if (How == 1) {  // a real access violation (0xC0000005), which Windows reports as SIGSEGV
            volatile int* volatile nowhere = nullptr;  // (both volatile: the store must happen)
            *nowhere = 1;
        }
#endif
        if (How == 2) std::exit(3);
        if (How == 3) ::abort();
    }
    return x * 2;
}

bool wait_for(mp::Event e) {
    e.wait();
    return true;
}
int wait_then(mp::Event e, int x) {
    e.wait();
    return x;
}

int huge_throw(int x) {
    if (x % 10 == 7) throw std::runtime_error(std::string(1 << 20, 'x'));
    return x;
}

int log_and_square(int x) {
    mp::get_logger("pool.test").warning("task " + std::to_string(x));
    return x * x;
}

/// An input range that throws when it reaches `at`.
struct ThrowingInput {
    int at;
    struct iterator {
        int i, at;
        using value_type = int;
        using difference_type = std::ptrdiff_t;
        using reference = int;
        using pointer = void;
        using iterator_category = std::input_iterator_tag;
        int operator*() const {
            if (i == at) throw std::out_of_range("input broke at " + std::to_string(i));
            return i;
        }
        iterator& operator++() {
            ++i;
            return *this;
        }
        bool operator!=(const iterator& o) const { return i != o.i; }
        bool operator==(const iterator& o) const { return i == o.i; }
    };
    iterator begin() const { return {0, at}; }
    iterator end() const { return {1 << 30, at}; }
};

/// A lazy input of `n` items that records how far it has been read.
struct CountingInput {
    int n;
    std::shared_ptr<std::atomic<int>> read;
    struct iterator {
        int i;
        std::atomic<int>* read;
        using value_type = int;
        using difference_type = std::ptrdiff_t;
        using reference = int;
        using pointer = void;
        using iterator_category = std::input_iterator_tag;
        int operator*() const {
            read->store(i + 1);
            return i;
        }
        iterator& operator++() {
            ++i;
            return *this;
        }
        bool operator!=(const iterator& o) const { return i != o.i; }
        bool operator==(const iterator& o) const { return i == o.i; }
    };
    iterator begin() const { return {0, read.get()}; }
    iterator end() const { return {n, read.get()}; }
};

#if defined(_WIN32)
int count_zombie_children() { return 0; }  // Windows has no zombies (the handle count covers what stays)
#else
int count_zombie_children() {
    int n = 0;
    long self = getpid();
    DIR* d = opendir("/proc");
    while (dirent* e = readdir(d)) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        std::ifstream f(std::string("/proc/") + e->d_name + "/stat");
        std::string line;
        std::getline(f, line);
        auto close = line.rfind(')');
        if (close == std::string::npos) continue;
        char state = 0;
        long ppid = 0;
        if (std::sscanf(line.c_str() + close + 2, "%c %ld", &state, &ppid) == 2 && ppid == self && state == 'Z') ++n;
    }
    closedir(d);
    return n;
}
#endif

std::vector<int> iota(int n) {
    std::vector<int> v(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = i;
    return v;
}

// Bitwise arguments and results (a block per chunk, dense result records)
// next to encoded ones, and a result that throws in between.
struct Point {
    double x;
    std::int32_t id;
};
Point shifted(Point p) {
    if (p.id % 97 == 13) throw std::domain_error("point " + std::to_string(p.id));
    return Point{p.x + 0.5, p.id * 2};
}
std::string spelled(int x) { return std::to_string(x); }
int tripled_or_exit_at_15000(int x) {
    if (x == 15000) std::exit(3);
    return 3 * x;
}

}  // namespace

#define CONTEXTS mp::SpawnContext, mp::ForkServerContext, mp::ForkContext

TEST_CASE_TEMPLATE("apply, map, starmap, imap and imap_unordered give the right results in order", Ctx, CONTEXTS) {
    mp::Pool pool(Ctx{}, 3);
    CHECK(pool.processes() == 3);
    CHECK(pool.apply(square, 12) == 144);
    CHECK(pool.apply_async(square, 10).get(30s) == 100);
    auto in = iota(100);
    std::vector<int> want;
    for (int x : in) want.push_back(x * x);
    CHECK(pool.map(square, in) == want);
    for (std::size_t chunk : {1, 3, 7, 100, 1000}) {
        CAPTURE(chunk);
        CHECK(pool.map(square, in, chunk) == want);
        std::vector<int> got;
        for (int r : pool.imap(square, in, chunk)) got.push_back(r);
        CHECK(got == want);
        std::vector<int> unordered;
        for (int r : pool.imap_unordered(square, in, chunk)) unordered.push_back(r);
        std::sort(unordered.begin(), unordered.end());
        CHECK(unordered == want);
    }
    std::vector<std::tuple<int, int>> pairs{{1, 2}, {3, 4}, {5, 6}};
    CHECK(pool.starmap(add, pairs) == std::vector<int>{3, 7, 11});
    CHECK(pool.starmap(add, pairs, 2) == std::vector<int>{3, 7, 11});
    auto m = pool.map_async(square, std::vector<int>{4, 5});
    CHECK(m.get() == std::vector<int>{16, 25});
    CHECK(m.successful());
    pool.map(nothing, in);  // void tasks
}

TEST_CASE_TEMPLATE("numbers and trivially copyable structs travel in blocks, mixed with failures", Ctx, CONTEXTS) {
    mp::Pool pool(Ctx{}, 2);
    std::vector<Point> points;
    for (int i = 0; i < 5000; ++i) points.push_back(Point{i * 0.25, i});
    for (std::size_t chunk : {0, 1, 7, 4999, 100000}) {
        CAPTURE(chunk);
        std::vector<Point> got;
        int failures = 0;
        auto it = pool.imap(shifted, points, chunk ? chunk : 1000);
        for (int k = 0; k < 5000; ++k) {
            try {
                auto v = it.next(60s);
                REQUIRE(v);
                CHECK(v->id == 2 * k);
                CHECK(v->x == k * 0.25 + 0.5);
            } catch (const std::domain_error& e) {
                CHECK(k % 97 == 13);
                CHECK(std::string(e.what()) == "point " + std::to_string(k));
                ++failures;
            }
        }
        CHECK(failures == 52);
        try {
            pool.map(shifted, points, chunk);
            FAIL("map should re-throw the first failure");
        } catch (const std::domain_error& e) {
            CHECK(std::string(e.what()) == "point 13");
        }
    }
    // Without failures: every value in place, from a vector, an array and a C array.
    std::vector<Point> ok(points.begin(), points.begin() + 13);
    auto shifted_ok = pool.map(shifted, ok, 3);
    REQUIRE(shifted_ok.size() == 13);
    for (int i = 0; i < 13; ++i) CHECK(shifted_ok[static_cast<std::size_t>(i)].id == 2 * i);
    std::array<int, 5> arr{1, 2, 3, 4, 5};
    CHECK(pool.map(square, arr, 2) == std::vector<int>{1, 4, 9, 16, 25});
    const int carr[4] = {6, 7, 8, 9};
    CHECK(pool.map(square, carr) == std::vector<int>{36, 49, 64, 81});
    // Encoded results between blocks of numbers.
    CHECK(pool.map(spelled, std::vector<int>{1, 22, 333}) == std::vector<std::string>{"1", "22", "333"});
    auto big = iota(200000);
    auto sq = pool.map(square, big);
    REQUIRE(sq.size() == big.size());
    bool all = true;
    for (std::size_t i = 0; i < big.size(); ++i) all = all && sq[i] == big[i] * big[i];
    CHECK(all);
}

TEST_CASE("a worker that dies after sending part of a chunk's numbers loses none of them") {
    // Chunks of 10,000 int results: a worker sends its slot every 16 KiB
    // (about 4,000 results), so item 15,000 dies with part of its chunk sent
    // and part still in the slot.
    mp::Pool pool(mp::SpawnContext{}, 2);
    auto it = pool.imap(tripled_or_exit_at_15000, iota(20000), 10000);
    int values = 0;
    for (int k = 0; k < 20000; ++k) {
        try {
            auto v = it.next(120s);
            REQUIRE(v);
            if (*v != 3 * k) CHECK(*v == 3 * k);
            ++values;
        } catch (const mp::ProcessError& e) {
            CHECK(k == 15000);
            CHECK(e.exitcode() == 3);
        }
    }
    CHECK(values == 19999);
    CHECK(pool.apply(square, 9) == 81);
}

TEST_CASE_TEMPLATE("empty inputs give empty results", Ctx, CONTEXTS) {
    mp::Pool pool(Ctx{}, 2);
    CHECK(pool.map(square, std::vector<int>{}).empty());
    CHECK(pool.starmap(add, std::vector<std::tuple<int, int>>{}).empty());
    int n = 0;
    for (int r : pool.imap(square, std::vector<int>{})) n += r + 1;
    for (int r : pool.imap_unordered(square, std::vector<int>{})) n += r + 1;
    CHECK(n == 0);
    auto a = pool.map_async(square, std::vector<int>{});
    CHECK(a.ready());
    CHECK(a.get().empty());
}

TEST_CASE_TEMPLATE("get with a timeout, wait, ready, successful", Ctx, CONTEXTS) {
    mp::Pool pool(Ctx{}, 2);
    mp::Event go;
    auto r = pool.apply_async(wait_then, go, 7);  // a library handle as a task argument
    CHECK_FALSE(r.ready());
    CHECK_THROWS_AS(r.get(50ms), mp::TimeoutError);
    CHECK_FALSE(r.wait(10ms));
    CHECK_THROWS_AS((void)r.successful(), mp::InvalidStateError);
    go.set();
    CHECK(r.get(30s) == 7);
    CHECK(r.ready());
    CHECK(r.successful());
    auto bad = pool.apply_async(fail_at_3_and_50, 3);
    bad.wait();
    CHECK_FALSE(bad.successful());
    CHECK_THROWS_AS(bad.get(), std::invalid_argument);
    CHECK_THROWS_AS(bad.get(), std::invalid_argument);  // every time
    // take(): waits, then moves the value out (or re-throws).
    auto big = pool.map_async(square, iota(1000));
    std::vector<int> taken = std::move(big).take();
    REQUIRE(taken.size() == 1000);
    CHECK(taken[999] == 999 * 999);
    CHECK_THROWS_AS(std::move(bad).take(), std::invalid_argument);
}

TEST_CASE_TEMPLATE("callbacks: success once with the whole list; error once and success never", Ctx, CONTEXTS) {
    mp::Pool pool(Ctx{}, 2);
    std::atomic<int> ok{0}, err{0};
    std::vector<int> seen;
    auto a = pool.map_async_with([&](const std::vector<int>& v) { seen = v, ++ok; },
                                 [&](const std::exception_ptr&) { ++err; }, square, iota(20), 3);
    a.wait();  // the callbacks have run by now
    CHECK(ok == 1);
    CHECK(err == 0);
    CHECK(seen.size() == 20);
    CHECK(seen[19] == 361);

    std::atomic<int> ok2{0}, err2{0};
    std::string what;
    auto b = pool.map_async_with([&](const std::vector<int>&) { ++ok2; },
                                 [&](const std::exception_ptr& e) {
                                     ++err2;
                                     try {
                                         std::rethrow_exception(e);
                                     } catch (const std::exception& x) {
                                         what = x.what();
                                     }
                                 },
                                 fail_at_3_and_50, iota(100), 5);
    CHECK_THROWS_AS(b.get(), std::invalid_argument);
    CHECK(ok2 == 0);
    CHECK(err2 == 1);
    CHECK(what.find("three") != std::string::npos);

    std::atomic<int> single{0};
    auto c = pool.apply_async_with([&](const int& v) { single += v; }, [&](const std::exception_ptr&) { single = -1; },
                                   square, 9);
    CHECK(c.get() == 81);
    CHECK(single == 81);
}

TEST_CASE_TEMPLATE("map re-throws the first failure by position, only after every task ran", Ctx, CONTEXTS) {
    mp::Array<int> runs(100);
    mp::Pool pool(Ctx{}, 2, mp::PoolOptions{}, init_crash_kit, runs, mp::Queue<long>(), mp::Event());
    try {
        pool.map(run_or_die<-1>, iota(100), 4);  // all succeed: counts them
    } catch (...) {
        FAIL("no task should fail");
    }
    std::string what;
    try {
        pool.map(fail_at_3_and_50, iota(100), 10);
        FAIL("map should throw");
    } catch (const std::invalid_argument& e) {
        what = e.what();
        CHECK(mp::is_remote(e));
        CHECK_FALSE(mp::remote_traceback(e).empty());
    }
    CHECK(what.find("three") != std::string::npos);
    for (std::size_t i = 0; i < 100; ++i) CHECK(runs[i] == 1);
}

TEST_CASE("a 1 MiB exception payload wedges nothing") {
    mp::Pool pool(2);
    CHECK_THROWS_AS(pool.map(huge_throw, iota(40), 3), std::runtime_error);
    CHECK_THROWS_AS(pool.apply(huge_throw, 7), std::runtime_error);
    int errors = 0, values = 0;
    auto it = pool.imap(huge_throw, iota(40), 2);
    for (;;) {
        try {
            auto v = it.next(60s);
            if (!v) break;
            ++values;
        } catch (const std::runtime_error& e) {
            CHECK(std::string(e.what()).size() >= (1u << 20));
            ++errors;
        }
    }
    CHECK(errors == 4);
    CHECK(values == 36);
    CHECK(pool.apply(square, 3) == 9);
}

TEST_CASE("imap: an input that throws mid-way delivers the results before it, then its error") {
    mp::Pool pool(2);
    std::vector<int> got;
    auto it = pool.imap(square, ThrowingInput{6}, 2);
    try {
        while (auto v = it.next()) got.push_back(*v);
        FAIL("the input's error should come out");
    } catch (const std::out_of_range& e) {
        CHECK(std::string(e.what()) == "input broke at 6");
    }
    CHECK(got == std::vector<int>{0, 1, 4, 9, 16, 25});
    CHECK_THROWS_AS(pool.map(square, ThrowingInput{3}), std::out_of_range);
    CHECK(pool.apply(square, 5) == 25);
}

TEST_CASE("imap reads its input only as far as a bounded window ahead of the consumer") {
    mp::Pool pool(2);
    auto read = std::make_shared<std::atomic<int>>(0);
    auto it = pool.imap(square, CountingInput{1000000, read}, 10);
    long long consumed = 0;
    int max_ahead = 0;
    for (int k = 0; k < 5000; ++k) {
        auto v = it.next();
        REQUIRE(v);
        CHECK(*v == k * k);
        ++consumed;
        max_ahead = std::max<int>(max_ahead, read->load() - static_cast<int>(consumed));
    }
    CHECK(max_ahead <= 2 * 4 * 10 + 10);  // processes x 4 chunks of 10 items, plus the chunk being read
    CHECK(read->load() < 5000 + 100);
}

TEST_CASE("Pool(0), Pool(-1) and a negative maxtasksperchild are refused") {
    CHECK_THROWS_AS(mp::Pool(0), std::invalid_argument);
    CHECK_THROWS_AS(mp::Pool(-1), std::invalid_argument);
    CHECK_THROWS_AS(mp::Pool(2, mp::PoolOptions{-1}), std::invalid_argument);
}

TEST_CASE_TEMPLATE("close, join, terminate and InvalidStateError afterwards", Ctx, CONTEXTS) {
    {
        mp::Pool pool(Ctx{}, 2);
        CHECK_THROWS_AS(pool.join(), mp::InvalidStateError);  // neither closed nor terminated
        auto r = pool.map_async(square, iota(50), 1);
        pool.close();
        CHECK_THROWS_AS(pool.apply(square, 1), mp::InvalidStateError);
        CHECK_THROWS_AS(pool.map(square, iota(3)), mp::InvalidStateError);
        CHECK_THROWS_AS(pool.imap(square, iota(3)), mp::InvalidStateError);
        pool.join();  // waits for the queued work
        CHECK(r.ready());
        CHECK(r.get().size() == 50);
        CHECK(pool.worker_pids().empty());
    }
    {
        mp::Pool pool(Ctx{}, 2);
        mp::Event never;
        std::vector<mp::AsyncResult<bool>> running;
        for (int i = 0; i < 6; ++i) running.push_back(pool.apply_async(wait_for, never));
        auto t0 = Clock::now();
        pool.terminate();
        CHECK(Clock::now() - t0 < 10s);  // hang guard: it is immediate
        for (auto& r : running) CHECK_THROWS_AS(r.get(30s), mp::InvalidStateError);
        CHECK_THROWS_AS(pool.apply(square, 1), mp::InvalidStateError);
        pool.join();
    }
    {
        // Destroying a pool terminates it, even with tasks running.
        mp::Event never;
        auto t0 = Clock::now();
        {
            mp::Pool pool(Ctx{}, 2);
            pool.apply_async(wait_for, never);
        }
        CHECK(Clock::now() - t0 < 10s);
    }
}

TEST_CASE_TEMPLATE("maxtasksperchild replaces workers and loses no task", Ctx, CONTEXTS) {
    mp::Pool pool(Ctx{}, 2, mp::PoolOptions{1});
    auto pids = pool.map(my_pid, iota(10), 1);
    CHECK(std::set<long>(pids.begin(), pids.end()).size() == 10);  // one fresh worker per task
    auto sq = pool.map(square, iota(30), 2);
    for (int i = 0; i < 30; ++i) CHECK(sq[static_cast<std::size_t>(i)] == i * i);
    // close right after submitting does not hang
    std::vector<mp::AsyncResult<int>> rs;
    for (int i = 0; i < 5; ++i) rs.push_back(pool.apply_async(square, i));
    pool.close();
    pool.join();
    for (int i = 0; i < 5; ++i) CHECK(rs[static_cast<std::size_t>(i)].get(1s) == i * i);
}

TEST_CASE_TEMPLATE("the initializer runs exactly once in each worker", Ctx, CONTEXTS) {
    mp::Value<int> counter(0);
    {
        mp::Pool pool(Ctx{}, 3, mp::PoolOptions{}, init_counting, counter);
        auto runs = pool.map(init_runs_here, iota(60), 1);
        for (int r : runs) CHECK(r == 1);
        pool.close();
        pool.join();
    }
    CHECK(counter.get() == 3);
    mp::Value<int> counter2(0);
    {
        mp::Pool pool(Ctx{}, 2, mp::PoolOptions{2}, init_counting, counter2);
        auto runs = pool.map(init_runs_here, iota(8), 1);
        for (int r : runs) CHECK(r == 1);
        auto pids = pool.map(my_pid, iota(8), 1);
        // At most 2 tasks per worker, so at least 4 of them.  (Exactly 4 only
        // if every worker got 2: which worker takes a chunk depends on timing.)
        std::map<long, int> per_pid;
        for (long p : pids) ++per_pid[p];
        CHECK(per_pid.size() >= 4);
        for (auto& kv : per_pid) CHECK(kv.second <= 2);
        pool.close();
        pool.join();
    }
    // At least 8 workers served the 16 tasks (at most 16, had each got one);
    // the pool also replaced the last ones (their initializer ran, though no
    // task was left for them).
    CHECK(counter2.get() >= 8);
    CHECK(counter2.get() <= 18);
}

template <int How>
void crash_scenario(const mp::Context& ctx, std::size_t chunksize, const char* expect) {
    CAPTURE(How);
    CAPTURE(chunksize);
    mp::Array<int> runs(1000);
    mp::Queue<long> pids;
    mp::Event never;
    mp::Pool pool(ctx, 2, mp::PoolOptions{}, init_crash_kit, runs, pids, never);
    std::thread killer;
    if (How == 0) killer = std::thread([pids]() mutable {
            long pid = pids.get(60s);
            forktest::kill_process(pid);
        });
    auto it = pool.imap(run_or_die<How>, iota(1000), chunksize);
    int values = 0, failures = 0;
    for (int k = 0; k < 1000; ++k) {
        try {
            auto v = it.next(120s);
            REQUIRE(v);
            CHECK(*v == k * 2);
            ++values;
        } catch (const mp::ProcessError& e) {
            CHECK(k == 500);
            std::string what = e.what();
            CAPTURE(what);
            CHECK(what.find(expect) != std::string::npos);
            ++failures;
        }
    }
    CHECK_FALSE(it.next());
    if (killer.joinable()) killer.join();
    CHECK(values == 999);
    CHECK(failures == 1);
    for (std::size_t i = 0; i < 1000; ++i) {
        if (runs[i] != 1) {
            CAPTURE(i);
            CHECK(runs[i] == 1);  // none ran twice, none was skipped, the failed one not retried
        }
    }
    CHECK(pool.apply(square, 7) == 49);  // the pool still serves
    CHECK(pool.worker_pids().size() == 2);
}

TEST_CASE_TEMPLATE("a worker that dies in a task fails exactly that task; the pool goes on", Ctx, CONTEXTS) {
    // Sanitizers catch SIGSEGV/SIGABRT themselves and exit with code 1.
    const char* segv = kSanitized ? "" : "SIGSEGV";
#if !defined(_WIN32)
    const char* abrt = kSanitized ? "" : "SIGABRT";
#else
    const char* abrt = "exited with code 3";  // abort() on Windows exits with 3 (as Python reports it there)
#endif
    SUBCASE("SIGKILL from outside, one task per chunk") { crash_scenario<0>(Ctx{}, 1, "SIGKILL"); }
    SUBCASE("SIGKILL from outside, chunks of 50") { crash_scenario<0>(Ctx{}, 50, "SIGKILL"); }
    SUBCASE("segfault, chunks of 7") { crash_scenario<1>(Ctx{}, 7, segv); }
    SUBCASE("exit(3), chunks of 100") { crash_scenario<2>(Ctx{}, 100, "exited with code 3"); }
    SUBCASE("abort, chunks of 3") { crash_scenario<3>(Ctx{}, 3, abrt); }
}

TEST_CASE("map over a crash: the dead worker's task is the first failure, the others all ran once") {
    mp::Array<int> runs(1000);
    mp::Pool pool(mp::SpawnContext{}, 2, mp::PoolOptions{}, init_crash_kit, runs, mp::Queue<long>(), mp::Event());
    try {
        pool.map(run_or_die<2>, iota(1000));
        FAIL("map should throw");
    } catch (const mp::ProcessError& e) {
        CHECK(e.exitcode() == 3);
    }
    for (std::size_t i = 0; i < 1000; ++i)
        if (runs[i] != 1) CHECK(runs[i] == 1);
    CHECK(pool.map(square, iota(5)) == std::vector<int>{0, 1, 4, 9, 16});
}

TEST_CASE("AsyncResult is a worker for wait and as_completed, with Process and Thread") {
    mp::Pool pool(2);
    mp::Event go;
    auto slow = pool.apply_async(wait_then, go, 1);
    auto fast = pool.apply_async(square, 3);
    mp::Process p(square, 4);
    p.start();
    mp::Thread t(square, 5);
    t.start();
    auto [first, rest] = mp::wait({&slow, &fast, &p, &t}, mp::FIRST_COMPLETED);
    CHECK(first.size() >= 1);
    CHECK(std::find(first.begin(), first.end(), &slow) == first.end());  // it waits for `go`
    auto [done, not_done] = mp::wait({&fast, &p, &t}, 60s, mp::ALL_COMPLETED);
    CHECK(done.size() == 3);
    CHECK(not_done.empty());
    CHECK_FALSE(slow.ready());
    go.set();
    std::vector<mp::Worker*> order;
    for (mp::Worker* w : mp::as_completed({&slow, &fast}, 60s)) order.push_back(w);
    CHECK(order.size() == 2);
    CHECK(slow.get() == 1);
}

TEST_CASE("worker log records reach the parent's handler") {
    std::mutex m;
    std::vector<std::string> messages;
    mp::set_log_handler([&](const mp::LogRecord& r, const std::string&) {
        std::lock_guard<std::mutex> lk(m);
        messages.push_back(r.message);
    });
    {
        mp::Pool pool(2);
        CHECK(pool.map(log_and_square, iota(5), 1).size() == 5);
        pool.close();
        pool.join();  // a worker's records are handled before it counts as ended
    }
    mp::set_log_handler({});
    std::set<std::string> got(messages.begin(), messages.end());
    for (int i = 0; i < 5; ++i) CHECK(got.count("task " + std::to_string(i)) == 1);
}

TEST_CASE_TEMPLATE("100 pools created and destroyed leave no fd, zombie or mapping behind", Ctx, CONTEXTS) {
    {
        mp::Pool warm(Ctx{}, 2);
        CHECK(warm.apply(square, 2) == 4);
    }
    auto fds = forktest::fd_count();
    auto maps = forktest::mapping_count();
    for (int i = 0; i < 100; ++i) {
        mp::Pool pool(Ctx{}, 2);
        REQUIRE(pool.apply(square, i) == i * i);
        if (i % 2) {
            pool.close();
            pool.join();
        }
    }
    CHECK(std::labs(static_cast<long>(forktest::fd_count()) - static_cast<long>(fds)) <= forktest::handle_slack);
    CHECK(forktest::mapping_count() == maps);
    CHECK(count_zombie_children() == 0);
    CHECK(mp::active_children().empty());
}

namespace {
long parent_of_worker(int) { return forktest::parent_pid(); }
}  // namespace

TEST_CASE("a Pool made without a context uses the default start method (set_start_method)") {
    struct SpawnAgain {
        ~SpawnAgain() { mp::set_start_method("spawn", true); }
    } again;
    const long self = forktest::self_pid();
    mp::set_start_method("spawn", true);
    {
        mp::Pool pool(1);
        CHECK(pool.apply(parent_of_worker, 0) == self);  // spawned by us
    }
#if !defined(_WIN32)  // (no fork server on Windows)
    mp::set_start_method("forkserver", true);
    {
        mp::Pool pool(1);
        CHECK(pool.apply(parent_of_worker, 0) != self);  // forked by the fork server
    }
#endif
}

namespace {
/// Whether process `pid` is gone (or a zombie nobody has reaped yet: not running).
bool process_gone(long pid) {
#if defined(_WIN32)
    HANDLE h = OpenProcess(SYNCHRONIZE, FALSE, static_cast<DWORD>(pid));
    if (!h) return true;  // no such process (any more)
    const bool ended = WaitForSingleObject(h, 0) != WAIT_TIMEOUT;
    CloseHandle(h);
    return ended;
#else
    std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
    std::string stat;
    if (!std::getline(in, stat)) return true;
    auto close = stat.rfind(')');
    return close != std::string::npos && close + 2 < stat.size() && (stat[close + 2] == 'Z' || stat[close + 2] == 'X');
#endif
}
}  // namespace

// Found by the crash matrix (tools/stress, rows "Pool task"): under spawn a
// replacement worker takes a warm start, which has the spawner keep a child
// exec'd ahead for the next one - and that idle child (a process and two
// descriptors) stayed for the rest of the program after the pool was gone.
TEST_CASE("a pool that replaced a dead worker leaves no idle warm child behind once it ends") {
    mp::set_warm_spawn(false);
    long warm = 0;
    {
        mp::Pool pool(mp::SpawnContext{}, 1);
        const long first = pool.worker_pids().at(0);
        forktest::kill_process(first);
        auto t0 = Clock::now();
        while (!(pool.worker_pids().size() == 1 && pool.worker_pids()[0] != first) && Clock::now() - t0 < 20s)
            std::this_thread::sleep_for(1ms);  // polling the pool's state: nothing to wait on
        CHECK(pool.apply_async(square, 3).get(30s) == 9);
        warm = mp::detail::test_warm_child(20s);  // kept for the pool's next replacement
        REQUIRE(warm != 0);
        pool.close();
        pool.join();
        CHECK(mp::detail::test_warm_child(0ms) == 0);
    }
    auto t0 = Clock::now();
    while (!process_gone(warm) && Clock::now() - t0 < 10s) std::this_thread::sleep_for(1ms);
    CHECK(process_gone(warm));
    // With warm spawn on for the program, the waiting child is the program's: it stays.
    mp::set_warm_spawn(true);
    {
        mp::Pool pool(mp::SpawnContext{}, 1);
        forktest::kill_process(pool.worker_pids().at(0));
        CHECK(pool.apply_async(square, 4).get(30s) == 16);
    }
    CHECK(mp::detail::test_warm_child(20s) != 0);
    mp::set_warm_spawn(false);
    CHECK(mp::detail::test_warm_child(0ms) == 0);
}
