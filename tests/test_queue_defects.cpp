// Defects of issue 8 in the queues (items 5 and 13a), as the issue describes
// them, under every context a Process can start in.
#include <doctest/doctest.h>

#if !defined(_WIN32)
#include <signal.h>
#include <sys/stat.h>
#endif

#include <chrono>
#include <string>
#include <vector>

#include "fork_helpers.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;

#define ALL_CONTEXTS mp::SpawnContext, mp::ForkContext, mp::ForkServerContext

namespace {
/// Bytes of memory the queue's shared block holds now (its memfd's allocated
/// pages): what the queue commits, whoever maps it.
template <class Q>
long long committed_bytes(const Q& q) {
#if !defined(_WIN32)
    mp::Encoder e;
    e.write(q);
    struct stat st {};
    REQUIRE(::fstat(e.handles().at(0), &st) == 0);
    return static_cast<long long>(st.st_blocks) * 512;
#else  // (only posix_only test cases call it)
    (void)q;
    throw std::logic_error("committed_bytes: a memfd's allocated blocks have no Windows counterpart here");
#endif
}

int put_many(mp::Queue<long> q, long n) {
    for (long i = 0; i < n; ++i) q.put(i);  // no consumer yet: must never wait
    return 0;
}
}  // namespace

// ============================================================================ defect 5

TEST_CASE("defect 5: an unbounded queue takes 100,000 puts in one process without a get") {
    mp::Queue<int> q;
    for (int i = 0; i < 100000; ++i) REQUIRE(q.try_put(i, 10s));  // the guard only matters if the defect is back
    CHECK(q.qsize() == 100000);
    CHECK_FALSE(q.full());
    for (int i = 0; i < 100000; ++i) REQUIRE(q.get() == i);
    CHECK(q.empty());

    mp::Queue<std::string> big;  // items of 300 KiB: whole records
    for (int i = 0; i < 40; ++i) REQUIRE(big.try_put(std::string(300 << 10, char('a' + i % 26)), 10s));
    for (int i = 0; i < 40; ++i) REQUIRE(big.get() == std::string(300 << 10, char('a' + i % 26)));
    mp::Queue<std::string> huge;  // items of 3 MiB: streamed, still without a consumer
    for (int i = 0; i < 5; ++i) REQUIRE(huge.try_put(std::string(3 << 20, char('A' + i)), 10s));
    for (int i = 0; i < 5; ++i) REQUIRE(huge.get() == std::string(3 << 20, char('A' + i)));
}

TEST_CASE_TEMPLATE("defect 5: a producer runs far ahead of a late consumer, in another process", Ctx, ALL_CONTEXTS) {
    constexpr long n = 300000;  // ~4.6 MiB of records, beyond the old 1 MiB ring
    mp::Queue<long> q;
    mp::Process p(Ctx{}, put_many, q, n);
    p.start();
    REQUIRE(p.result(60s) == 0);  // done before anyone consumed
    CHECK(q.qsize() == std::size_t(n));
    for (long i = 0; i < n; ++i) REQUIRE(q.get() == i);
    CHECK(q.empty());
}

TEST_CASE("defect 5: memory follows the backlog - committed as it grows, given back as it is consumed" *
          forktest::posix_only) {
    mp::Queue<long> q;
    const long long at_start = committed_bytes(q);
    CHECK(at_start <= 64 * 1024);
    constexpr long n = 1000000;  // 16 MB of records
    for (long i = 0; i < n; ++i) REQUIRE(q.try_put(i, 10s));
    const long long full = committed_bytes(q);
    CHECK(full >= 15 * 1000 * 1000);
    for (long i = 0; i < n; ++i) REQUIRE(q.get() == i);
    const long long drained = committed_bytes(q);
    MESSAGE("committed: " << at_start << " B new, " << full << " B with 1M items, " << drained << " B drained");
    CHECK(drained <= 2 * 1024 * 1024);  // the warm part of the ring stays (1 MiB + margin)
    // And again: the next cycle starts on the warm pages.
    for (long i = 0; i < 1000; ++i) q.put(i);
    for (long i = 0; i < 1000; ++i) REQUIRE(q.get() == i);
    CHECK(committed_bytes(q) <= 2 * 1024 * 1024);
}

TEST_CASE("defect 5: 200 default queues commit almost nothing at creation" * forktest::posix_only) {
    std::vector<mp::Queue<int>> queues(200);
    long long total = 0;
    for (const auto& q : queues) total += committed_bytes(q);
    MESSAGE("200 default queues commit " << total << " bytes");
    CHECK(total <= 200 * 16 * 1024);
    std::vector<mp::JoinableQueue<int>> joinable(20);
    for (const auto& q : joinable) CHECK(committed_bytes(q) <= 16 * 1024);
}

TEST_CASE("defect 5: bounded queues still bound - by items, and by bytes when a capacity is given") {
    mp::Queue<int> by_items(5);
    for (int i = 0; i < 5; ++i) by_items.put_nowait(i);
    CHECK(by_items.full());
    CHECK_THROWS_AS(by_items.put_nowait(5), mp::Full);
    CHECK_THROWS_AS(by_items.put(5, 20ms), mp::Full);

    mp::Queue<long> by_bytes(0, 4096);
    CHECK(by_bytes.capacity() == 4096);
    int taken = 0;
    while (by_bytes.try_put(taken)) ++taken;
    CHECK(taken > 100);
    CHECK(taken <= 4096 / 16);
    CHECK_THROWS_AS(by_bytes.put(1, 20ms), mp::Full);
    for (int i = 0; i < taken; ++i) REQUIRE(by_bytes.get() == i);

    mp::Queue<int> unbounded;
    CHECK(unbounded.capacity() == 0);
    CHECK(unbounded.maxsize() == 0);
}

// ============================================================================ defect 13a

namespace {
const std::string& big_item() {
    static const std::string s = [] {
        std::string b(1 << 20, '\0');
        for (std::size_t i = 0; i < b.size(); ++i) b[i] = char(i * 131 % 251);
        return b;
    }();
    return s;
}
int put_big_then_small(mp::Queue<std::string> q) {
    q.put(big_item());  // streamed through the 64 KiB ring: waits for room mid-item
    q.put("after");
    return 0;
}

/// The consumer, in a process of its own (so that a hang is a failed join, not
/// a hung test): a get(200ms) while the producer is stopped mid-item must throw
/// Empty on time; after `resumed` the next gets bring what the parent expects.
pid_t consumer(mp::Queue<std::string>& q, mp::Event& timed_out, mp::Event& resumed, bool producer_killed) {
    return forktest::spawn([&]() -> int {
        auto start = std::chrono::steady_clock::now();
        try {
            q.get(200ms);
            return 1;  // the stopped producer cannot have finished the item
        } catch (const mp::Empty&) {
        }
        if (std::chrono::steady_clock::now() - start > 10s) return 2;
        timed_out.set();
        if (!resumed.wait(30s)) return 3;
        if (producer_killed) {
            // The producer died mid-item: its item is withdrawn, nothing else comes.
            try {
                q.get(300ms);
                return 4;
            } catch (const mp::Empty&) {
            }
            q.put("fresh");
            return q.get(30s) == "fresh" ? 0 : 5;
        }
        if (q.get(30s) != big_item()) return 6;  // intact: continued where the timeout left it
        return q.get(30s) == "after" ? 0 : 7;
    });
}
}  // namespace

TEST_CASE_TEMPLATE("defect 13a: get(timeout) returns on time while a streamed item's producer is stopped", Ctx,
                   ALL_CONTEXTS) {  // (SIGSTOP: excluded on Windows by tests/windows/skip.txt)
    for (bool kill_producer : {false, true}) {
        CAPTURE(kill_producer);
        mp::Queue<std::string> q(0, 64 * 1024);
        mp::Event timed_out, resumed;
        mp::Process producer(Ctx{}, put_big_then_small, q);
        producer.start();
        REQUIRE(forktest::await([&] { return q.full(); }));  // mid-item, waiting for room
        REQUIRE(forktest::stop_process(producer.pid()));
        pid_t c = consumer(q, timed_out, resumed, kill_producer);
        CHECK(timed_out.wait(30s));
        if (kill_producer) {
            producer.kill();
            forktest::continue_process(producer.pid());
            CHECK_THROWS_AS(producer.join(30s), mp::ProcessError);
        } else {
            REQUIRE(forktest::continue_process(producer.pid()));
        }
        resumed.set();
        CHECK(forktest::join(c, 30s) == 0);
        if (!kill_producer) CHECK(producer.result(30s) == 0);
    }
}

TEST_CASE("defect 13a: a get in another process waits for a parked item's process, or drops it when it ended" *
          forktest::fork_only) {
    mp::Queue<std::string> q(0, 64 * 1024);
    mp::Event timed_out, go;
    pid_t producer = forktest::spawn([&] {
        q.put(big_item());
        q.put("after");
        return 0;
    });
    REQUIRE(forktest::await([&] { return q.full(); }));
    REQUIRE(forktest::stop_process(producer));
    // A first consumer parks the half-received item and ends.
    pid_t parker = forktest::spawn([&] {
        try {
            q.get(200ms);
            return 1;
        } catch (const mp::Empty&) {
        }
        timed_out.set();
        return go.wait(30s) ? 0 : 2;
    });
    REQUIRE(timed_out.wait(30s));
    forktest::continue_process(producer);
    // While the parker lives, the rest of its item is not ours.
    CHECK_THROWS_AS(q.get(300ms), mp::Empty);
    go.set();
    CHECK(forktest::join(parker, 30s) == 0);
    // It ended with its part: that item is lost, the next one arrives.
    CHECK(q.get(30s) == "after");
    CHECK(forktest::join(producer, 30s) == 0);
}
