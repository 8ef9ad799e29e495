// Queue<T>, SimpleQueue<T>, JoinableQueue<T>: real processes (fork), threads,
// real shared memory.  Children report by exit code; the parent asserts.
#include <doctest/doctest.h>

#include "mpservice.hpp"
#include "sanitizers.hpp"

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>
#if !defined(_WIN32)
#include <dirent.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#include "fork_helpers.hpp"  // forktest::fork_only, kill_hard, killed (and stubs for Windows)

namespace mp = mpservice;
using namespace std::chrono_literals;

// ThreadSanitizer follows threads of one process only: when threads and forked
// processes work on the same shared memory, it misses the hand-offs made in the
// other processes and reports races that are not there.
// (kThreadSanitizer, from sanitizers.hpp.)

namespace {

// ---------------------------------------------------------------- helpers

#if !defined(_WIN32)
/// Runs f() in a forked child; its int result is the exit code (exceptions: 100).
template <class F>
pid_t fork_child(F f) {
    std::fflush(nullptr);
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // no child outlives a crashed or timed-out test
        int code = 100;
        try {
            code = f();
        } catch (...) {
        }
        ::_exit(code);
    }
    return pid;
}

/// Waits for a child; exit code, or -signal.  The timeout is a hang guard only.
int reap(pid_t pid, std::chrono::seconds guard = std::chrono::seconds(120)) {
    auto end = std::chrono::steady_clock::now() + guard;
    int status = 0;
    for (;;) {
        pid_t r = ::waitpid(pid, &status, WNOHANG);
        if (r == pid) break;
        if (std::chrono::steady_clock::now() > end) {
            forktest::kill_hard(pid);
            ::waitpid(pid, &status, 0);
            FAIL("child " << pid << " hung");
        }
        std::this_thread::sleep_for(1ms);  // polling a child's exit, not synchronizing
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

int count_fds() {
    int n = 0;
    DIR* d = ::opendir("/proc/self/fd");
    while (::readdir(d)) ++n;
    ::closedir(d);
    return n;
}
#else  // Windows has no fork(): only the fork_only test cases call these (never, there).
template <class F>
pid_t fork_child(F f) {
    return forktest::spawn(f);
}
int reap(pid_t pid, std::chrono::seconds = std::chrono::seconds(120)) { return forktest::join(pid); }
#endif

/// Shared counters, visible to forked children: one atomic per slot.
struct SharedCounters {
    explicit SharedCounters(std::size_t n)
        : mem(mp::detail::SharedMemory::create(n * sizeof(std::atomic<std::uint32_t>))), size(n) {}
    std::atomic<std::uint32_t>& operator[](std::size_t i) const {
        return static_cast<std::atomic<std::uint32_t>*>(mem.data())[i];
    }
    mp::detail::SharedMemory mem;
    std::size_t size;
};

/// A payload whose bytes say who made it and check themselves.
std::string make_payload(std::uint32_t producer, std::uint32_t seq, std::size_t size) {
    std::string s(size, '\0');
    std::uint32_t x = producer * 2654435761u ^ seq;
    for (std::size_t i = 0; i < size; ++i) {
        x = x * 1664525u + 1013904223u;
        s[i] = static_cast<char>(x >> 24);
    }
    if (size >= 8) {
        std::memcpy(&s[0], &producer, 4);
        std::memcpy(&s[4], &seq, 4);
    }
    return s;
}
bool check_payload(const std::string& s, std::uint32_t& producer, std::uint32_t& seq) {
    if (s.size() < 8) return false;
    std::memcpy(&producer, &s[0], 4);
    std::memcpy(&seq, &s[4], 4);
    return s == make_payload(producer, seq, s.size());
}

/// An item whose encoding is 0 bytes.
struct Nothing {};
/// A user struct with its own codec.
struct Point {
    int x = 0;
    double y = 0;
    std::string label;
    bool operator==(const Point& o) const { return x == o.x && y == o.y && label == o.label; }
};
/// A type whose decoding always fails (to test the error path of get).
struct Poison {};

}  // namespace

namespace mpservice {
template <>
struct Codec<Nothing> {
    static void encode(Encoder&, const Nothing&) {}
    static Nothing decode(Decoder&) { return {}; }
};
template <>
struct Codec<Point> {
    static void encode(Encoder& e, const Point& p) { e(p.x, p.y, p.label); }
    static Point decode(Decoder& d) {
        Point p;
        d(p.x, p.y, p.label);
        return p;
    }
};
template <>
struct Codec<Poison> {
    static void encode(Encoder& e, const Poison&) { e.write(std::uint8_t(1)); }
    static Poison decode(Decoder&) { throw DecodeError("poison"); }
};
}  // namespace mpservice

// ---------------------------------------------------------------- basics

TEST_CASE("put and get keep order in one thread, for several item types") {
    mp::Queue<int> q;
    CHECK(q.empty());
    CHECK(q.maxsize() == 0);
    CHECK(q.capacity() == 0);  // no byte bound
    for (int i = 0; i < 1000; ++i) q.put(i);
    CHECK(q.qsize() == 1000);
    CHECK_FALSE(q.empty());
    for (int i = 0; i < 1000; ++i) CHECK(q.get() == i);
    CHECK(q.empty());

    mp::Queue<double> d;
    d.put(2.5);
    CHECK(d.get() == 2.5);

    mp::Queue<std::string> s;
    s.put("");
    s.put("hello");
    s.put(std::string(3000, 'z'));
    CHECK(s.get() == "");
    CHECK(s.get() == "hello");
    CHECK(s.get() == std::string(3000, 'z'));

    mp::Queue<Point> p;
    p.put(Point{1, 2.5, "one"});
    CHECK(p.get() == Point{1, 2.5, "one"});

    mp::Queue<std::vector<int>> v(0, 4096);
    const std::vector<int> big(5000, 7);  // streamed: more than the ring
    v.put({});
    v.put({1, 2, 3});
    std::thread t([&] { v.put(big); });
    CHECK(v.get().empty());
    CHECK(v.get() == std::vector<int>{1, 2, 3});
    CHECK(v.get() == big);
    t.join();
}

TEST_CASE("items of 0 B, 1 B, capacity-1, capacity and 10x capacity go through, across processes" * forktest::fork_only) {
    constexpr std::size_t cap = 4096;
    mp::Queue<Nothing> nothing(0, cap);
    nothing.put(Nothing{});
    CHECK(nothing.qsize() == 1);
    nothing.get();
    CHECK(nothing.empty());

    mp::Queue<std::uint8_t> one(0, cap);
    one.put(std::uint8_t(7));
    CHECK(one.get() == 7);

    // A string travels as its bytes (the record holds the length).  Around cap/2 - 8
    // an item stops fitting one record and is streamed in chunks.
    const std::vector<std::size_t> sizes = {8, 9, cap / 2 - 16, cap / 2 - 8, cap / 2 - 7, cap / 2, cap - 1, cap,
                                            cap + 1, 10 * cap, 10 * cap + 3};
    mp::Queue<std::string> q(0, cap);
    CHECK(q.capacity() == cap);
    pid_t child = fork_child([&] {
        for (std::size_t round = 0; round < 3; ++round)
            for (std::size_t i = 0; i < sizes.size(); ++i)
                q.put(make_payload(7, static_cast<std::uint32_t>(round * 100 + i), sizes[i]));
        return 0;
    });
    for (std::size_t round = 0; round < 3; ++round)
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            std::string got = q.get(30s);
            REQUIRE(got.size() == sizes[i]);
            if (got.size() >= 8) {
                std::uint32_t p, seq;
                CHECK(check_payload(got, p, seq));
                CHECK(seq == round * 100 + i);
            } else {
                CHECK(got == make_payload(7, static_cast<std::uint32_t>(round * 100 + i), got.size()));
            }
        }
    CHECK(reap(child) == 0);
    CHECK(q.empty());
}

TEST_CASE("order within one producer process, and the other way round" * forktest::fork_only) {
    mp::Queue<long> to_parent(0, 8192);  // small ring: the producer blocks often
    mp::Queue<long> to_child(16);
    constexpr long n = 200000;
    pid_t child = fork_child([&] {
        for (long i = 0; i < n; ++i) to_parent.put(i);
        for (long i = 0; i < 1000; ++i)
            if (to_child.get() != i) return 1;
        return 0;
    });
    long bad = 0;
    for (long i = 0; i < n; ++i) bad += to_parent.get() != i;
    CHECK(bad == 0);
    for (long i = 0; i < 1000; ++i) to_child.put(i);
    CHECK(reap(child) == 0);
}

// ---------------------------------------------------------------- exactly once

TEST_CASE("exactly once: 4 producer processes x 4 consumer processes x 100k items" * forktest::fork_only) {
    constexpr std::uint32_t producers = 4, consumers = 4, per_producer = 100000;
    mp::Queue<std::uint64_t> q(0, 64 * 1024);
    SharedCounters seen(producers * per_producer);
    SharedCounters sums(consumers * 2);  // low and high 32 bits of each consumer's sum

    std::vector<pid_t> cons;
    for (std::uint32_t c = 0; c < consumers; ++c)
        cons.push_back(fork_child([&, c] {
            std::uint64_t sum = 0;
            std::vector<std::uint32_t> last(producers, 0);
            std::vector<bool> any(producers, false);
            try {
                for (;;) {
                    std::uint64_t v = q.get();
                    auto p = static_cast<std::uint32_t>(v >> 32), i = static_cast<std::uint32_t>(v);
                    if (p >= producers || i >= per_producer) return 2;
                    if (any[p] && i <= last[p]) return 3;  // one producer's items stay in order
                    any[p] = true;
                    last[p] = i;
                    seen[p * per_producer + i].fetch_add(1);
                    sum += v;
                }
            } catch (const mp::QueueClosed&) {
            }
            sums[2 * c].store(static_cast<std::uint32_t>(sum));
            sums[2 * c + 1].store(static_cast<std::uint32_t>(sum >> 32));
            return 0;
        }));
    std::vector<pid_t> prods;
    for (std::uint32_t p = 0; p < producers; ++p)
        prods.push_back(fork_child([&, p] {
            for (std::uint32_t i = 0; i < per_producer; ++i) q.put((std::uint64_t(p) << 32) | i);
            return 0;
        }));
    for (pid_t pid : prods) CHECK(reap(pid) == 0);
    q.close();
    for (pid_t pid : cons) CHECK(reap(pid) == 0);

    std::size_t missing = 0, dup = 0;
    std::uint64_t expected = 0, total = 0;
    for (std::uint32_t p = 0; p < producers; ++p)
        for (std::uint32_t i = 0; i < per_producer; ++i) {
            auto k = seen[p * per_producer + i].load();
            missing += k == 0;
            dup += k > 1;
            expected += (std::uint64_t(p) << 32) | i;
        }
    for (std::uint32_t c = 0; c < consumers; ++c)
        total += sums[2 * c].load() | (std::uint64_t(sums[2 * c + 1].load()) << 32);
    CHECK(missing == 0);
    CHECK(dup == 0);
    CHECK(total == expected);
    CHECK(q.empty());
}

TEST_CASE("exactly once with threads and processes mixed, large and small items" * forktest::fork_only *
          doctest::skip(kThreadSanitizer)) {
    mp::Queue<std::string> q(0, 16 * 1024);
    constexpr std::uint32_t per_producer = 300;
    SharedCounters seen(4 * per_producer);
    auto produce = [&](std::uint32_t p) {
        std::mt19937 rng(p);
        for (std::uint32_t i = 0; i < per_producer; ++i) {
            std::size_t size = (i % 7 == 0) ? 8 + rng() % (100 * 1024) : 8 + rng() % 200;
            q.put(make_payload(p, i, size));
        }
    };
    auto consume = [&] {
        int bad = 0;
        for (;;) {
            std::optional<std::string> s;
            try {
                s = q.get();
            } catch (const mp::QueueClosed&) {
                return bad;
            }
            std::uint32_t p, i;
            if (!check_payload(*s, p, i) || p >= 4 || i >= per_producer) ++bad;
            else seen[p * per_producer + i].fetch_add(1);
        }
    };
    pid_t pc = fork_child([&] { return consume(); });
    pid_t pp = fork_child([&] {
        produce(3);
        return 0;
    });
    std::atomic<int> thread_bad{0};
    std::vector<std::thread> threads;
    for (std::uint32_t p = 0; p < 3; ++p) threads.emplace_back([&, p] { produce(p); });
    std::thread tc([&] { thread_bad += consume(); });
    for (auto& t : threads) t.join();
    CHECK(reap(pp) == 0);
    q.close();
    tc.join();
    CHECK(reap(pc) == 0);
    CHECK(thread_bad.load() == 0);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < seen.size; ++i) wrong += seen[i].load() != 1;
    CHECK(wrong == 0);
}

TEST_CASE("exactly once with threads only (what ThreadSanitizer can follow), large and small items") {
    mp::Queue<std::string> q(0, 16 * 1024);
    constexpr std::uint32_t producers = 3, per_producer = 300;
    std::vector<std::atomic<int>> seen(producers * per_producer);
    std::atomic<int> bad{0};
    std::vector<std::thread> threads;
    for (std::uint32_t p = 0; p < producers; ++p)
        threads.emplace_back([&, p] {
            std::mt19937 rng(p);
            for (std::uint32_t i = 0; i < per_producer; ++i)
                q.put(make_payload(p, i, (i % 7 == 0) ? 8 + rng() % (100 * 1024) : 8 + rng() % 200));
        });
    std::vector<std::thread> consumers;
    for (int c = 0; c < 2; ++c)
        consumers.emplace_back([&] {
            try {
                for (;;) {
                    std::string s = q.get();
                    std::uint32_t p, i;
                    if (!check_payload(s, p, i) || p >= producers || i >= per_producer) ++bad;
                    else seen[p * per_producer + i].fetch_add(1);
                }
            } catch (const mp::QueueClosed&) {
            }
        });
    for (auto& t : threads) t.join();
    q.close();
    for (auto& t : consumers) t.join();
    CHECK(bad.load() == 0);
    int wrong = 0;
    for (auto& k : seen) wrong += k.load() != 1;
    CHECK(wrong == 0);
}

// ---------------------------------------------------------------- bounds, blocking, timeouts

TEST_CASE("maxsize: Full, Empty, timeouts, try_ variants") {
    mp::Queue<int> q(2);
    CHECK(q.maxsize() == 2);
    q.put(1);
    CHECK(q.try_put(2));
    CHECK(q.full());
    CHECK_THROWS_AS(q.put_nowait(3), mp::Full);
    CHECK_FALSE(q.try_put(3));
    auto t0 = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(q.put(3, 30ms), mp::Full);
    CHECK(std::chrono::steady_clock::now() - t0 >= 30ms);
    CHECK_FALSE(q.try_put(3, 5ms));
    CHECK(q.qsize() == 2);
    CHECK(q.get_nowait() == 1);
    CHECK_FALSE(q.full());
    CHECK(q.get(1s) == 2);
    CHECK_THROWS_AS(q.get_nowait(), mp::Empty);
    CHECK_FALSE(q.try_get().has_value());
    t0 = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(q.get(30ms), mp::Empty);
    CHECK(std::chrono::steady_clock::now() - t0 >= 30ms);
    CHECK_FALSE(q.try_get(5ms).has_value());
    q.put(4);
    CHECK(q.try_get(1s) == std::optional<int>(4));
}

TEST_CASE("byte capacity bounds the bytes waiting; an item bigger than the free room waits for it" * forktest::fork_only) {
    mp::Queue<std::string> q(0, 1024);
    const std::string item(100, 'a');  // record: 8 header + 100 -> 112 bytes with alignment
    int n = 0;
    while (q.try_put(item)) ++n;
    CHECK(n == 1024 / 112);
    CHECK(q.full());
    CHECK(q.qsize() == static_cast<std::size_t>(n));
    CHECK_THROWS_AS(q.put(item, 10ms), mp::Full);
    CHECK(q.get() == item);
    CHECK(q.try_put(item));
    // A streamed item (more than half the ring) that cannot start in time is not put.
    CHECK_FALSE(q.try_put(std::string(5000, 'b'), 10ms));
    for (int i = 0; i < n; ++i) CHECK(q.get() == item);
    CHECK(q.empty());
    // One that starts but cannot finish in time is withdrawn: its first chunks fill
    // the ring, and the consumer that later reads them discards them.
    CHECK_FALSE(q.try_put(std::string(5000, 'c'), 10ms));
    CHECK(q.empty());
    pid_t child = fork_child([&] { return q.get(30s) == "after" ? 0 : 1; });
    q.put("after");
    CHECK(reap(child) == 0);
    CHECK(q.empty());
}

TEST_CASE("a blocked put in one process is released by a get in another" * forktest::fork_only) {
    mp::Queue<int> q(1);
    q.put(1);
    pid_t child = fork_child([&] {
        q.put(2);  // blocks until the parent takes 1
        return 0;
    });
    CHECK(q.get(30s) == 1);
    CHECK(q.get(30s) == 2);
    CHECK(reap(child) == 0);
}

TEST_CASE("a put on a full queue whose consumer died times out" * forktest::fork_only) {
    mp::Queue<std::string> q(0, 1024);
    SharedCounters progress(1);
    pid_t child = fork_child([&] {
        q.get();
        progress[0].store(1);
        for (;;) q.get();  // then blocks, waiting for more
        return 0;
    });
    q.put(std::string(100, 'x'));
    while (progress[0].load() == 0) std::this_thread::yield();
    forktest::kill_hard(child);
    CHECK(reap(child) == forktest::killed);
    while (q.try_put(std::string(100, 'y'))) {
    }
    CHECK_THROWS_AS(q.put(std::string(100, 'z'), 30ms), mp::Full);
    // The queue still works for a new consumer.
    CHECK(q.get(1s) == std::string(100, 'y'));
}

// ---------------------------------------------------------------- close

TEST_CASE("close: puts throw, gets drain then throw, blocked getters and putters wake up" * forktest::fork_only) {
    mp::Queue<int> q(1);
    q.put(1);
    q.close();
    CHECK(q.closed());
    CHECK_THROWS_AS(q.put(2), mp::QueueClosed);
    CHECK_THROWS_AS(q.try_put(2), mp::QueueClosed);
    CHECK(q.get() == 1);
    CHECK_THROWS_AS(q.get(), mp::QueueClosed);
    CHECK_THROWS_AS(q.get(10ms), mp::QueueClosed);
    CHECK_FALSE(q.try_get().has_value());

    mp::Queue<int> r(1);
    r.put(0);
    SharedCounters started(2);
    mp::Queue<int> e;
    pid_t getter = fork_child([&] {
        started[0].store(1);
        try {
            e.get();
        } catch (const mp::QueueClosed&) {
            return 0;
        }
        return 1;
    });
    pid_t putter = fork_child([&] {
        started[1].store(1);
        try {
            r.put(5);  // full: blocks
        } catch (const mp::QueueClosed&) {
            return 0;
        }
        return 1;
    });
    while (!started[0].load() || !started[1].load()) std::this_thread::yield();
    std::this_thread::sleep_for(20ms);  // let them block (the result does not depend on it)
    e.close();
    r.close();
    CHECK(reap(getter) == 0);
    CHECK(reap(putter) == 0);
}

TEST_CASE("SimpleQueue: put, get, empty, close, across processes" * forktest::fork_only) {
    mp::SimpleQueue<std::string> q;
    CHECK(q.empty());
    pid_t child = fork_child([&] {
        for (int i = 0; i < 1000; ++i) q.put(std::to_string(i));
        q.close();
        return 0;
    });
    for (int i = 0; i < 1000; ++i) CHECK(q.get() == std::to_string(i));
    CHECK_THROWS_AS(q.get(), mp::QueueClosed);
    CHECK(reap(child) == 0);
}

// ---------------------------------------------------------------- JoinableQueue

TEST_CASE("JoinableQueue: join waits for task_done from other processes" * forktest::fork_only) {
    mp::JoinableQueue<int> q;
    CHECK(q.join(0ms));  // nothing put yet
    CHECK_THROWS_AS(q.task_done(), std::invalid_argument);
    SharedCounters done(1);
    for (int i = 0; i < 100; ++i) q.put(i);
    CHECK_FALSE(q.join(5ms));
    std::vector<pid_t> workers;
    for (int w = 0; w < 2; ++w)
        workers.push_back(fork_child([&] {
            while (auto v = q.try_get(200ms)) {
                done[0].fetch_add(1);
                q.task_done();
            }
            return 0;
        }));
    q.join();
    CHECK(done[0].load() == 100);
    for (pid_t pid : workers) CHECK(reap(pid) == 0);
    CHECK_THROWS_AS(q.task_done(), std::invalid_argument);
    CHECK(q.join(0ms));
}

// ---------------------------------------------------------------- handles

TEST_CASE("a queue travels through the codec as its shared memory") {
    mp::Queue<int> q;
    mp::Encoder e;
    e.write(q);
    REQUIRE(e.handles().size() == 1);
    mp::Decoder d(e.bytes(), &e.handles());
    auto q2 = d.read<mp::Queue<int>>();
    q.put(42);
    CHECK(q2.get() == 42);

    mp::Decoder wrong_type(e.bytes(), &e.handles());
    CHECK_THROWS_AS(wrong_type.read<mp::Queue<long>>(), mp::DecodeError);
    mp::Decoder wrong_kind(e.bytes(), &e.handles());
    CHECK_THROWS_AS(wrong_kind.read<mp::JoinableQueue<int>>(), mp::DecodeError);

    mp::JoinableQueue<int> j;
    mp::Encoder ej;
    ej.write(j);
    mp::Decoder as_queue(ej.bytes(), &ej.handles());
    auto plain = as_queue.read<mp::Queue<int>>();  // a JoinableQueue is a Queue
    plain.put(1);
    CHECK(j.get() == 1);
    j.task_done();
    CHECK(j.join(0ms));

    mp::SimpleQueue<std::string> s;
    mp::Encoder es;
    es.write(s);
    mp::Decoder ds(es.bytes(), &es.handles());
    auto s2 = ds.read<mp::SimpleQueue<std::string>>();
    s2.put("x");
    CHECK(s.get() == "x");
}

TEST_CASE("items holding OS handles are refused; bad items do not wedge the queue") {
    mp::Queue<mp::Queue<int>> qq;
    mp::Queue<int> inner;
    CHECK_THROWS_AS(qq.put(inner), std::invalid_argument);
    CHECK(qq.empty());

    mp::Queue<Poison> p;
    p.put(Poison{});
    p.put(Poison{});
    CHECK_THROWS_AS(p.get(), mp::DecodeError);  // consumed all the same
    CHECK(p.qsize() == 1);
    CHECK_THROWS_AS(p.get(), mp::DecodeError);
    CHECK(p.empty());

    CHECK_THROWS_AS(mp::Queue<int>(0, std::size_t(1) << 41), std::invalid_argument);  // over the 1 TiB supported
}

TEST_CASE("no fd or mapping leaks after 1000 create/use/destroy cycles") {
#if !defined(_WIN32)
    auto maps = [] {  // mappings of shared memory (memfd) in this process
        int n = 0;
        FILE* f = std::fopen("/proc/self/maps", "r");
        char line[4096];
        while (std::fgets(line, sizeof line, f)) n += std::strstr(line, "/memfd:") != nullptr;
        std::fclose(f);
        return n;
    };
#else  // Windows: the process's handle count; the library's own count of mapped views
    auto count_fds = [] { return mp::detail::os::open_handle_count(); };
    auto maps = [] { return mp::detail::os::mapping_count(); };
#endif
    { mp::Queue<int> warm; }
    auto fds = count_fds(), mappings = maps();
    for (int i = 0; i < 1000; ++i) {
        mp::Queue<std::string> q(0, 4096);
        q.put("x");
        mp::Encoder e;
        e.write(q);
        mp::Decoder d(e.bytes(), &e.handles());
        auto q2 = d.read<mp::Queue<std::string>>();
        CHECK(q2.get() == "x");
        mp::JoinableQueue<int> j;
        mp::SimpleQueue<int> s;
        if (i == 0) CHECK(maps() == mappings + 4);  // the check sees queues' mappings
    }
    CHECK(count_fds() == fds);
    CHECK(maps() == mappings);
}

// ---------------------------------------------------------------- SIGKILL in mid-stream

namespace {

/// Producer A is killed while putting; producer B keeps going; the parent
/// consumes.  A's items must arrive as a gap-free prefix, each item whole.
void kill_producer_round(std::size_t capacity, std::size_t max_item, unsigned seed) {
    mp::Queue<std::string> q(0, capacity);
    std::mt19937 rng(seed);
    auto size_of = [max_item](std::uint32_t i) { return 8 + (i * 2654435761u) % max_item; };
    pid_t a = fork_child([&] {
        for (std::uint32_t i = 0;; ++i) q.put(make_payload(0, i, size_of(i)));
        return 0;
    });
    constexpr std::uint32_t b_items = 300;
    pid_t b = fork_child([&] {
        for (std::uint32_t i = 0; i < b_items; ++i) q.put(make_payload(1, i, size_of(i)));
        return 0;
    });
    std::uint32_t next[2] = {0, 0};
    const std::uint32_t kill_after = 5 + rng() % 40;
    bool killed = false;
    int bad = 0;
    while (next[1] < b_items || !killed) {
        auto s = q.try_get(killed ? 10s : 30s);
        REQUIRE(s.has_value());
        std::uint32_t p, i;
        if (!check_payload(*s, p, i) || p > 1 || i != next[p]) {
            MESSAGE("bad item: size " << s->size() << " valid " << check_payload(*s, p, i) << " producer " << p
                                      << " seq " << i << " expected " << (p <= 1 ? next[p] : 0) << " killed "
                                      << killed);
            ++bad;
            forktest::kill_hard(b);
            break;
        }
        ++next[p];
        if (!killed && next[0] >= kill_after) {
            for (unsigned spin = rng() % 20000; spin; --spin) mp::detail::os::cpu_relax();
            forktest::kill_hard(a);
            killed = true;
        }
    }
    CHECK(bad == 0);
    CHECK(killed);
    CHECK(reap(a) == forktest::killed);
    if (bad) {
        reap(b);
        return;
    }
    CHECK(reap(b) == 0);
    // What A left: a gap-free continuation, at most ending in the item it was moving.
    while (auto s = q.try_get(20ms)) {
        std::uint32_t p, i;
        CHECK(check_payload(*s, p, i));
        CHECK(p == 0);
        CHECK(i == next[0]);
        ++next[0];
    }
    // The queue still works.
    pid_t c = fork_child([&] {
        q.put(make_payload(2, 0, 5000));
        q.put("end-of-test");
        return 0;
    });
    std::uint32_t p, i;
    CHECK(check_payload(q.get(10s), p, i));
    CHECK(q.get(10s) == "end-of-test");
    CHECK(reap(c) == 0);
}

}  // namespace

TEST_CASE("SIGKILL of a producer in mid-stream: no corruption, no hang, only its current item lost" * forktest::fork_only) {
    for (unsigned round = 0; round < 12; ++round) kill_producer_round(4096, 200, round);           // small items
    for (unsigned round = 0; round < 12; ++round) kill_producer_round(4096, 30000, 100 + round);   // streamed
}

TEST_CASE("SIGKILL of a consumer in mid-stream: the others carry on, at most one item lost" * forktest::fork_only) {
    for (unsigned round = 0; round < 16; ++round) {
        const bool large = round % 2;
        const std::uint32_t items = large ? 200 : 20000;
        mp::Queue<std::string> q(0, 4096);
        SharedCounters seen(items);
        SharedCounters progress(1);
        auto consume = [&] {
            for (;;) {
                std::string s;
                try {
                    s = q.get();
                } catch (const mp::QueueClosed&) {
                    return 0;
                }
                std::uint32_t p, i;
                if (!check_payload(s, p, i) || i >= items) return 1;
                seen[i].fetch_add(1);
                progress[0].fetch_add(1);
            }
        };
        pid_t victim = fork_child(consume);
        pid_t survivor = fork_child(consume);
        pid_t producer = fork_child([&] {
            for (std::uint32_t i = 0; i < items; ++i) q.put(make_payload(0, i, large ? 8 + (i * 7919) % 20000 : 16));
            return 0;
        });
        const std::uint32_t kill_at = items / 4 + (round * 13) % (items / 2);
        const auto guard = std::chrono::steady_clock::now() + 60s;
        while (progress[0].load() < kill_at) {
            REQUIRE(std::chrono::steady_clock::now() < guard);
            std::this_thread::yield();
        }
        forktest::kill_hard(victim);
        CHECK(reap(victim) == forktest::killed);
        CHECK(reap(producer) == 0);
        q.close();
        CHECK(reap(survivor) == 0);
        std::size_t missing = 0, dup = 0;
        for (std::uint32_t i = 0; i < items; ++i) {
            missing += seen[i].load() == 0;
            dup += seen[i].load() > 1;
        }
        CHECK(dup == 0);
        CHECK(missing <= 1);
    }
}

// ---------------------------------------------------------------- codec types, Process arguments

namespace {

struct Order {
    std::string customer;
    std::vector<int> items;
    std::map<std::string, double> prices;
    std::optional<long> note;
    template <class Ar>
    void serialize(Ar& ar) {
        ar(customer, items, prices, note);
    }
    bool operator==(const Order& o) const {
        return customer == o.customer && items == o.items && prices == o.prices && note == o.note;
    }
};

Order make_order(int i) {
    Order o;
    o.customer = "customer-" + std::to_string(i);
    for (int k = 0; k < i % 50; ++k) o.items.push_back(k * i);
    o.prices["a"] = i * 0.5;
    if (i % 3) o.prices["b" + std::to_string(i)] = -i;
    if (i % 2) o.note = i;
    return o;
}

constexpr int orders_per_producer = 2000;

int produce_orders(mp::Queue<Order> q, int producer) {
    for (int i = 0; i < orders_per_producer; ++i) q.put(make_order(producer * orders_per_producer + i));
    return 0;
}

/// Takes orders until the queue is closed; returns how many were well-formed.
long consume_orders(mp::Queue<Order> q) {
    long good = 0;
    try {
        for (;;) {
            Order o = q.get();
            int i = std::stoi(o.customer.substr(9));
            good += o == make_order(i);
        }
    } catch (const mp::QueueClosed&) {
    }
    return good;
}

int joinable_worker(mp::JoinableQueue<std::vector<std::string>> q, mp::Queue<std::size_t> results) {
    for (;;) {
        auto batch = q.get();
        if (batch.empty()) {
            q.task_done();
            return 0;
        }
        std::size_t chars = 0;
        for (auto& s : batch) chars += s.size();
        results.put(chars);
        q.task_done();
    }
}

std::string big_from_child(mp::SimpleQueue<std::string> q, std::size_t size) {
    q.put(make_payload(5, 1, size));
    return "sent";
}

}  // namespace

TEST_CASE("strings, vectors, maps, optional and user structs through a queue") {
    mp::Queue<Order> q;  // 100 orders fit the default ring
    for (int i = 0; i < 100; ++i) q.put(make_order(i));
    for (int i = 0; i < 100; ++i) CHECK(q.get() == make_order(i));

    mp::Queue<std::map<std::string, std::vector<std::string>>> m;
    std::map<std::string, std::vector<std::string>> value{{"x", {"1", "22"}}, {"", {}}};
    m.put(value);
    CHECK(m.get() == value);

    mp::Queue<std::vector<std::string>> big(0, 1024);  // streamed in chunks
    std::vector<std::string> lots(300, std::string(40, 'q'));
    std::thread t([&] { big.put(lots); });
    CHECK(big.get() == lots);
    t.join();
}

TEST_CASE_TEMPLATE("Process arguments: 2 producer and 2 consumer processes share a Queue of structs", Ctx,
                   mp::SpawnContext, mp::ForkServerContext) {
    mp::Queue<Order> q(100, 64 * 1024);
    std::vector<mp::Process<int>> producers;
    std::vector<mp::Process<long>> consumers;
    for (int c = 0; c < 2; ++c) consumers.emplace_back(Ctx{}, consume_orders, q);
    for (int p = 0; p < 2; ++p) producers.emplace_back(Ctx{}, produce_orders, q, p);
    for (auto& c : consumers) c.start();
    for (auto& p : producers) p.start();
    for (auto& p : producers) CHECK(p.result(60s) == 0);
    q.close();
    long good = 0;
    for (auto& c : consumers) good += c.result(60s);
    CHECK(good == 2 * orders_per_producer);
    CHECK(q.empty());
}

TEST_CASE_TEMPLATE("Process arguments: JoinableQueue workers and a result queue; SimpleQueue with a large item", Ctx,
                   mp::SpawnContext, mp::ForkServerContext) {
    mp::JoinableQueue<std::vector<std::string>> jobs;
    mp::Queue<std::size_t> results;
    std::vector<mp::Process<int>> workers;
    for (int w = 0; w < 2; ++w) workers.emplace_back(Ctx{}, joinable_worker, jobs, results);
    for (auto& w : workers) w.start();
    std::size_t expected = 0;
    for (int i = 0; i < 200; ++i) {
        std::vector<std::string> batch(1 + i % 5, std::string(i, 'x'));
        expected += batch.size() * i;
        jobs.put(batch);
    }
    jobs.join();  // every batch was processed
    std::size_t total = 0;
    for (int i = 0; i < 200; ++i) total += results.get(30s);
    CHECK(total == expected);
    for (int w = 0; w < 2; ++w) jobs.put({});  // stop
    for (auto& w : workers) CHECK(w.result(60s) == 0);
    CHECK(jobs.join(1s));

    mp::SimpleQueue<std::string> s(8192);
    mp::Process sender(Ctx{}, big_from_child, s, std::size_t(100000));
    sender.start();
    std::string got = s.get();
    std::uint32_t p, i;
    CHECK(check_payload(got, p, i));
    CHECK(got.size() == 100000);
    CHECK(sender.result(60s) == "sent");
}

// ---------------------------------------------------------------- batches: put_many / get_many

namespace {
/// Decodes unless its value is 13 (to test a batch that meets a bad item).
struct Picky {
    int v = 0;
    std::string note;  // not trivially copyable: the codec below is used
};
}  // namespace

namespace mpservice {
template <>
struct Codec<Picky> {
    static void encode(Encoder& e, const Picky& p) { e.write(p.v); }
    static Picky decode(Decoder& d) {
        Picky p{d.read<int>(), {}};
        if (p.v == 13) throw DecodeError("thirteen");
        return p;
    }
};
}  // namespace mpservice

TEST_CASE("put_many / get_many: order, batch sizes, ranges, mixed with put and get" * forktest::fork_only) {
    mp::Queue<int> q;
    std::vector<int> a(1000);
    for (int i = 0; i < 1000; ++i) a[static_cast<std::size_t>(i)] = i;
    q.put_many(a);
    q.put(1000);
    q.put_many({1001, 1002});
    const int arr[] = {1003, 1004, 1005};
    q.put_many(arr);
    CHECK(q.qsize() == 1006);
    std::vector<int> out;
    CHECK(q.get_many(out, 0) == 0);
    CHECK(q.get_many(out, 7) == 7);
    CHECK(q.get() == 7);
    while (out.size() < 1005) {
        const std::size_t before = out.size();
        const std::size_t n = q.get_many(out, 100);
        CHECK(n >= 1);
        CHECK(n <= 100);
        CHECK(out.size() == before + n);
    }
    CHECK(q.empty());
    // out holds 0..6, then 8..1005 (7 went to get())
    for (std::size_t i = 0; i < out.size(); ++i) CHECK(out[i] == static_cast<int>(i < 7 ? i : i + 1));
    CHECK(q.try_get_many(out, 10) == 0);
    std::vector<int> none;
    q.put_many(none);  // an empty batch is nothing
    CHECK(q.empty());

    // Strings of every size in one batch, streamed ones (over half a 4 KiB ring) among them.
    mp::Queue<std::string> s(0, 4096);
    std::vector<std::string> items;
    for (std::uint32_t i = 0; i < 40; ++i) items.push_back(make_payload(3, i, i % 10 == 9 ? 9000 : 8 + i * 5));
    pid_t c = fork_child([&] {
        s.put_many(items);
        return 0;
    });
    std::vector<std::string> got;
    while (got.size() < items.size()) {
        const std::size_t before = got.size();
        const std::size_t n = s.get_many(got, 16, 30s);
        CHECK(n >= 1);
        for (std::size_t k = before; k < got.size(); ++k)
            if (got[k].size() > 2048) CHECK(n == 1);  // a streamed item comes alone
    }
    CHECK(got == items);
    CHECK(reap(c) == 0);
    s.put_many(std::vector<std::string>{"x", "y"});
    CHECK(s.get_many(5) == std::vector<std::string>{"x", "y"});
}

TEST_CASE("put_many / get_many across processes: exactly once, each batch's items together" * forktest::fork_only) {
    // 2 producer processes put batches of 1..50 items, 2 consumer processes take
    // batches of up to 64; every item arrives exactly once, and in each producer's order.
    mp::Queue<std::uint64_t> q(0, 64 << 10);
    constexpr std::uint32_t per_producer = 50000;
    SharedCounters seen(2 * per_producer);
    SharedCounters order_bad(1);
    auto consumer = [&] {
        std::vector<std::uint64_t> out;
        std::uint64_t last[2] = {0, 0};
        bool first[2] = {true, true};
        try {
            for (;;) {
                out.clear();
                q.get_many(out, 64);
                for (std::uint64_t x : out) {
                    const unsigned p = static_cast<unsigned>(x >> 32);
                    const std::uint64_t i = x & 0xffffffffu;
                    if (p > 1 || i >= per_producer) return 1;
                    if (!first[p] && i <= last[p]) order_bad[0].fetch_add(1);
                    first[p] = false;
                    last[p] = i;
                    seen[p * per_producer + i].fetch_add(1);
                }
            }
        } catch (const mp::QueueClosed&) {
        }
        return 0;
    };
    pid_t c1 = fork_child(consumer), c2 = fork_child(consumer);
    std::vector<pid_t> producers;
    for (std::uint64_t p = 0; p < 2; ++p)
        producers.push_back(fork_child([&, p] {
            std::vector<std::uint64_t> batch;
            for (std::uint32_t i = 0; i < per_producer;) {
                batch.clear();
                const std::uint32_t k = std::min<std::uint32_t>(1 + (i * 7) % 50, per_producer - i);
                for (std::uint32_t j = 0; j < k; ++j) batch.push_back((p << 32) | (i + j));
                q.put_many(batch);
                i += k;
            }
            return 0;
        }));
    for (pid_t p : producers) CHECK(reap(p) == 0);
    q.close();
    CHECK(reap(c1) == 0);
    CHECK(reap(c2) == 0);
    std::size_t wrong = 0;
    for (std::uint32_t i = 0; i < 2 * per_producer; ++i) wrong += seen[i].load() != 1;
    CHECK(wrong == 0);
    CHECK(order_bad[0].load() == 0);
}

TEST_CASE("put_many with bounds: waits for room, times out with a prefix put; maxsize counts the batch" * forktest::fork_only) {
    mp::Queue<int> q(10);
    std::vector<int> items(25);
    for (int i = 0; i < 25; ++i) items[static_cast<std::size_t>(i)] = i;
    CHECK(q.put_many(items, 50ms) == 10);  // no consumer: the first 10, then the timeout
    CHECK(q.qsize() == 10);
    CHECK(q.full());
    std::vector<int> out;
    CHECK(q.get_many(out, 100) == 10);
    for (int i = 0; i < 10; ++i) CHECK(out[static_cast<std::size_t>(i)] == i);

    // With a consumer in another process, the whole batch goes through the bound.
    pid_t c = fork_child([&] {
        std::vector<int> got;
        while (got.size() < 25) q.get_many(got, 4, 30s);
        for (int i = 0; i < 25; ++i)
            if (got[static_cast<std::size_t>(i)] != i) return 1;
        return 0;
    });
    q.put_many(items);
    CHECK(reap(c) == 0);

    // A byte bound: a batch larger than the ring waits for room as it goes.
    mp::Queue<std::string> b(0, 1024);
    std::vector<std::string> big(40, std::string(100, 'b'));
    CHECK(b.put_many(big, 50ms) < 40);
    CHECK(b.qsize() >= 1);
}

TEST_CASE("put_many / get_many errors: closed, Empty, unencodable and undecodable items") {
    mp::Queue<int> q;
    std::vector<int> out;
    CHECK_THROWS_AS(q.get_many(out, 5, 20ms), mp::Empty);
    CHECK(q.try_get_many(out, 5) == 0);
    q.put_many({1, 2, 3});
    q.close();
    CHECK_THROWS_AS(q.put_many({4, 5}), mp::QueueClosed);
    CHECK_THROWS_AS(q.put_many(std::vector<int>{4}, 10ms), mp::QueueClosed);
    CHECK(q.get_many(out, 10) == 3);  // drains
    CHECK_THROWS_AS(q.get_many(out, 10), mp::QueueClosed);
    CHECK(q.try_get_many(out, 10) == 0);
    CHECK(out == std::vector<int>{1, 2, 3});

    // An item that cannot be encoded stops the batch: the ones before it are put.
    mp::Queue<std::vector<mp::Queue<int>>> qq;
    std::vector<std::vector<mp::Queue<int>>> handles{{}, {}, {mp::Queue<int>()}, {}};
    CHECK_THROWS_AS(qq.put_many(handles), std::invalid_argument);
    CHECK(qq.qsize() == 2);

    // An item that cannot be decoded: dropped, the ones before it delivered, the rest stay.
    mp::Queue<Picky> p;
    p.put_many({Picky{1, ""}, Picky{2, ""}, Picky{13, ""}, Picky{4, ""}});
    std::vector<Picky> got;
    CHECK_THROWS_AS(p.get_many(got, 10), mp::DecodeError);
    REQUIRE(got.size() == 2);
    CHECK(got[1].v == 2);
    CHECK(p.qsize() == 1);
    CHECK(p.get().v == 4);
}

namespace {
int put_strings(mp::Queue<std::string> q, int n, int size) {
    std::vector<std::string> batch;
    for (int i = 0; i < n; ++i) {
        std::string item(static_cast<std::size_t>(size), static_cast<char>('a' + i % 26));
        std::memcpy(&item[0], &i, sizeof i);
        batch.push_back(std::move(item));
        if (batch.size() == 32 || i == n - 1) {
            q.put_many(batch);
            batch.clear();
        }
    }
    return n;
}
}  // namespace

TEST_CASE("get_many_reusing replaces the vector's contents and keeps its elements' storage") {
    mp::Queue<std::string> q;
    std::vector<std::string> out(3, std::string(2000, 'z'));
    const char* first = out[0].data();
    const char* second = out[1].data();
    q.put_many({std::string("one"), std::string(1500, 'x')});
    CHECK(q.get_many_reusing(out, 10) == 2);
    REQUIRE(out.size() == 2);  // replaced, not appended: the third element went
    CHECK(out[0] == "one");
    CHECK(out[1] == std::string(1500, 'x'));
    CHECK(out[0].data() == first);  // assigned in place: no new allocation
    CHECK(out[1].data() == second);
    // More items than elements: the rest are appended.
    q.put_many({std::string("a"), std::string("b"), std::string("c"), std::string("d")});
    CHECK(q.get_many_reusing(out, 3) == 3);
    CHECK(out == std::vector<std::string>{"a", "b", "c"});
    CHECK(q.get_many_reusing(out, 3) == 1);
    CHECK(out == std::vector<std::string>{"d"});
    // Numbers and vectors of numbers are reused as well.
    mp::Queue<std::vector<double>> v;
    std::vector<std::vector<double>> vs(1, std::vector<double>(64, 0.0));
    const double* vdata = vs[0].data();
    v.put_many({std::vector<double>{1.5, 2.5}, std::vector<double>{}});
    CHECK(v.get_many_reusing(vs, 8) == 2);
    CHECK(vs[0] == std::vector<double>{1.5, 2.5});
    CHECK(vs[0].data() == vdata);
    CHECK(vs[1].empty());
    mp::Queue<int> n;
    std::vector<int> ns{9, 9, 9, 9};
    n.put_many({1, 2});
    CHECK(n.get_many_reusing(ns, 4) == 2);
    CHECK(ns == std::vector<int>{1, 2});

    // Empty and closed: the exceptions get_many throws, and `out` is left empty.
    CHECK_THROWS_AS(n.get_many_reusing(ns, 4, 20ms), mp::Empty);
    CHECK(ns.empty());
    ns = {7, 7};
    n.put(5);
    n.close();
    CHECK(n.get_many_reusing(ns, 4) == 1);
    CHECK(ns == std::vector<int>{5});
    CHECK_THROWS_AS(n.get_many_reusing(ns, 4), mp::QueueClosed);
    CHECK(ns.empty());

    // An item that cannot be decoded: dropped; the vector holds the items before it.
    mp::Queue<Picky> p;
    p.put_many({Picky{1, ""}, Picky{13, ""}, Picky{4, ""}});
    std::vector<Picky> got(5);
    CHECK_THROWS_AS(p.get_many_reusing(got, 10), mp::DecodeError);
    REQUIRE(got.size() == 1);
    CHECK(got[0].v == 1);
    CHECK(p.get().v == 4);
}

TEST_CASE_TEMPLATE("get_many_reusing takes every item of a producer process exactly once, in order", Ctx,
                   mp::SpawnContext, mp::ForkContext) {
    mp::Queue<std::string> q;
    mp::Process producer(Ctx{}, put_strings, q, 3000, 1024);
    producer.start();
    std::vector<std::string> out;
    int next = 0;
    bool in_order = true;
    while (next < 3000) {
        q.get_many_reusing(out, 256, 60s);
        for (const std::string& item : out) {
            int i = -1;
            std::memcpy(&i, item.data(), sizeof i);
            in_order = in_order && i == next && item.size() == 1024 && item[1023] == static_cast<char>('a' + i % 26);
            ++next;
        }
    }
    CHECK(in_order);
    CHECK(next == 3000);
    CHECK(producer.result(60s) == 3000);
    CHECK(q.empty());
}

TEST_CASE("SIGKILL inside put_many / get_many: no duplicates, a producer's items a prefix, a consumer loses "
          "at most one batch" * forktest::fork_only) {
    constexpr std::size_t batch = 32;
    for (unsigned round = 0; round < 12; ++round) {
        const std::uint32_t items = 40000;
        mp::Queue<std::uint64_t> q(0, 8192);
        SharedCounters seen(items);
        SharedCounters progress(1);
        auto consume = [&] {
            std::vector<std::uint64_t> out;
            try {
                for (;;) {
                    out.clear();
                    q.get_many(out, batch);
                    for (std::uint64_t x : out) {
                        if (x >= items) return 1;
                        seen[static_cast<std::size_t>(x)].fetch_add(1);
                    }
                    progress[0].fetch_add(static_cast<std::uint32_t>(out.size()));
                }
            } catch (const mp::QueueClosed&) {
            }
            return 0;
        };
        pid_t victim = fork_child(consume);
        pid_t survivor = fork_child(consume);
        pid_t producer = fork_child([&] {
            std::vector<std::uint64_t> b;
            for (std::uint64_t i = 0; i < items;) {
                b.clear();
                for (std::size_t j = 0; j < batch && i < items; ++j) b.push_back(i++);
                q.put_many(b);
            }
            return 0;
        });
        const std::uint32_t kill_at = items / 4 + (round * 997) % (items / 2);
        const auto guard = std::chrono::steady_clock::now() + 60s;
        while (progress[0].load() < kill_at) {
            REQUIRE(std::chrono::steady_clock::now() < guard);
            std::this_thread::yield();
        }
        forktest::kill_hard(victim);
        CHECK(reap(victim) == forktest::killed);
        CHECK(reap(producer) == 0);
        q.close();
        CHECK(reap(survivor) == 0);
        std::size_t missing = 0, dup = 0;
        for (std::uint32_t i = 0; i < items; ++i) {
            missing += seen[i].load() == 0;
            dup += seen[i].load() > 1;
        }
        CHECK(dup == 0);
        CHECK(missing <= batch);
    }
    // A producer killed inside put_many: what arrives of it is a gap-free prefix.
    for (unsigned round = 0; round < 12; ++round) {
        mp::Queue<std::uint64_t> q(0, 4096);
        SharedCounters started(1);
        pid_t producer = fork_child([&] {
            std::vector<std::uint64_t> b;
            for (std::uint64_t i = 0;;) {
                b.clear();
                for (std::size_t j = 0; j < batch; ++j) b.push_back(i++);
                q.put_many(b);
                started[0].store(1);
            }
            return 0;
        });
        std::uint64_t next = 0;
        std::vector<std::uint64_t> out;
        const std::uint64_t kill_after = 1000 + round * 321;
        while (next < kill_after) {
            out.clear();
            REQUIRE(q.get_many(out, batch, 30s) >= 1);
            for (std::uint64_t x : out) CHECK(x == next++);
        }
        forktest::kill_hard(producer);
        CHECK(reap(producer) == forktest::killed);
        for (;;) {
            out.clear();
            if (q.try_get_many(out, batch) == 0) break;
            for (std::uint64_t x : out) CHECK(x == next++);
        }
        q.put_many({7, 8});  // the queue still works
        out.clear();
        CHECK(q.get_many(out, 5, 10s) == 2);
        CHECK(out == std::vector<std::uint64_t>{7, 8});
    }
}
