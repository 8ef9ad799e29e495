// Pipe<T> / Connection<T> / connection_wait: real sockets, real child processes
// under every context, threads.  Timeouts here are hang guards only.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <dirent.h>
#include <poll.h>
#include <unistd.h>
#endif

#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;

extern "C" const char* __tsan_default_options() { return "die_after_fork=0"; }

namespace {

struct Order {
    std::string customer;
    std::map<std::string, int> items;
    std::vector<double> prices;
    template <class Archive>
    void serialize(Archive& ar) {
        ar(customer, items, prices);
    }
    bool operator==(const Order& o) const { return customer == o.customer && items == o.items && prices == o.prices; }
};

constexpr std::size_t four_mib = std::size_t(4) << 20;

std::vector<std::uint32_t> pattern(std::size_t bytes, std::uint32_t seed) {
    std::vector<std::uint32_t> v(bytes / sizeof(std::uint32_t));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::uint32_t>(i * 2654435761u) ^ seed;
    return v;
}

#if !defined(_WIN32)
int count_fds() {
    int n = 0;
    DIR* d = opendir("/proc/self/fd");
    while (dirent* e = readdir(d))
        if (e->d_name[0] != '.') ++n;
    closedir(d);
    return n;
}

/// Writes raw bytes into an end, past the framing.
bool write_raw(mp::detail::os::handle_t h, const void* data, std::size_t n) {
    return ::write(h, data, n) == static_cast<ssize_t>(n);
}
#else
long count_fds() { return mp::detail::os::open_handle_count(); }  // the process's handles

/// Windows: an end's byte stream is the seam's channel (its own frames carry
/// the handles), so bytes "by hand" go in through it, past the Connection's framing.
bool write_raw(mp::detail::os::handle_t h, const void* data, std::size_t n) {
    return mp::detail::os::channel_write(h, data, n, nullptr, 0);
}
#endif

// ---------------------------------------------------------------- targets (run in children)

/// Echoes vectors back, each element + 1, until an empty vector arrives.
int echo_plus_one(mp::Connection<std::vector<std::uint32_t>> c) {
    int n = 0;
    for (;;) {
        auto v = c.recv();
        if (v.empty()) return n;
        for (auto& x : v) x += 1;
        c.send(v);
        ++n;
    }
}

/// The client of echo_plus_one (both ends in children): sends `rounds`
/// vectors, checks the replies, then the empty vector.  Returns the number of
/// correct replies.
int echo_client(mp::Connection<std::vector<std::uint32_t>> c, int rounds, std::uint64_t bytes) {
    int good = 0;
    for (int r = 0; r < rounds; ++r) {
        auto v = pattern(static_cast<std::size_t>(bytes), static_cast<std::uint32_t>(r));
        c.send(v);
        auto back = c.recv(60s);
        bool ok = back.size() == v.size();
        for (std::size_t i = 0; ok && i < v.size(); ++i) ok = back[i] == v[i] + 1;
        good += ok;
    }
    c.send({});
    return good;
}

/// Sends `n` messages and returns (closing its end).
void send_n_and_return(mp::Connection<int> c, int n) {
    for (int i = 0; i < n; ++i) c.send(i);
}

/// Sends one message, then sleeps until killed.
void send_then_hang(mp::Connection<int> c) {
    c.send(7);
    std::this_thread::sleep_for(120s);
}

/// Starts a 64 MiB send that the parent never receives, so it blocks inside it.
void big_send_forever(mp::Connection<std::vector<char>> c) { c.send(std::vector<char>(std::size_t(64) << 20, 'x')); }

/// Waits for its go (a number), answers 10 * k + go, then returns when told
/// (or at EOF).
int answer_when_told(mp::Connection<int> c, int k) {
    int go = c.recv(60s);
    c.send(10 * k + go);
    try {
        c.recv(60s);
    } catch (const mp::EOFError&) {
    }
    return k;
}

/// Sends 8 MiB and only then receives 8 MiB (deadlocks in Python).
std::uint64_t send_then_receive(mp::Connection<std::vector<std::uint32_t>> c) {
    c.send(pattern(std::size_t(8) << 20, 5));
    auto v = c.recv(120s);
    std::uint64_t sum = 0;
    for (auto x : v) sum += x;
    return sum;
}

/// Receives a Queue through the connection, puts `n` into it.
void put_into_received_queue(mp::Connection<mp::Queue<int>> c, int n) {
    mp::Queue<int> q = c.recv(60s);
    q.put(n);
}

/// Receives a Connection through a Connection and answers on it.
void answer_on_received_end(mp::Connection<mp::Connection<std::string>> c) {
    mp::Connection<std::string> inner = c.recv(60s);
    inner.send("via " + inner.recv(60s));
}

template <class Ctx>
const char* ctx_name() {
    return Ctx{}.name();
}

}  // namespace

#define CONTEXTS mp::SpawnContext, mp::ForkServerContext, mp::ForkContext

// ---------------------------------------------------------------- in one process

TEST_CASE("round trips: numbers, strings, structs, vectors, 4 MiB, both directions") {
    auto [a, b] = mp::Pipe<int>();
    CHECK(a.readable());
    CHECK(a.writable());
    a.send(42);
    b.send(-1);
    CHECK(b.recv() == 42);
    CHECK(a.recv() == -1);

    auto [s1, s2] = mp::Pipe<std::string>();
    s1.send("");
    s1.send("hello");
    s1.send(std::string(100000, 'z'));
    CHECK(s2.recv() == "");
    CHECK(s2.recv() == "hello");
    CHECK(s2.recv() == std::string(100000, 'z'));

    auto [o1, o2] = mp::Pipe<Order>();
    Order order{"ada", {{"tea", 2}, {"cake", 1}}, {1.5, 2.25}};
    o2.send(order);
    CHECK(o1.recv() == order);

    // 4 MiB one way and back (a thread receives: the socket holds far less).
    auto [v1, v2] = mp::Pipe<std::vector<std::uint32_t>>();
    auto big = pattern(four_mib, 1);
    std::thread echo([&, &v2 = v2] {
        auto v = v2.recv(60s);
        v2.send(v);
    });
    v1.send(big);
    CHECK(v1.recv(60s) == big);
    echo.join();
}

TEST_CASE("a 96 MiB message is one message too") {
    auto [a, b] = mp::Pipe<std::vector<std::uint32_t>>();
    auto big = pattern(std::size_t(96) << 20, 3);
    std::thread sender([&, &a = a] { a.send(big); });
    auto got = b.recv(120s);
    sender.join();
    CHECK(got == big);
}

TEST_CASE("a one-way pipe: the first end receives, the second sends") {
    auto [r, w] = mp::Pipe<int>(false);
    CHECK(r.readable());
    CHECK_FALSE(r.writable());
    CHECK(w.writable());
    CHECK_FALSE(w.readable());
    w.send(5);
    CHECK(r.recv() == 5);
    CHECK_THROWS_AS(r.send(1), mp::InvalidStateError);
    CHECK_THROWS_AS(w.recv(), mp::InvalidStateError);
    CHECK_THROWS_AS(w.poll(), mp::InvalidStateError);
    CHECK_THROWS_AS(mp::connection_wait({&w}, 10ms), mp::InvalidStateError);
}

TEST_CASE("EOF: what was sent arrives first, then EOFError, every time; send to a closed peer is BrokenPipeError") {
    auto [a, b] = mp::Pipe<int>();
    b.send(1);
    b.send(2);
    b.close();
    CHECK(b.closed());
    CHECK(a.poll());
    CHECK(a.recv() == 1);
    CHECK(a.recv() == 2);
    CHECK(a.poll());  // recv would not block: it throws
    CHECK_THROWS_AS(a.recv(), mp::EOFError);
    CHECK_THROWS_AS(a.recv(), mp::EOFError);
    CHECK_THROWS_AS(a.try_recv(), mp::EOFError);
    CHECK_THROWS_AS(a.recv_bytes(), mp::EOFError);
    CHECK_THROWS_AS(a.send(3), mp::BrokenPipeError);
    // Operations on the closed end itself are a state error, not EOF.
    CHECK_THROWS_AS(b.send(1), mp::InvalidStateError);
    CHECK_THROWS_AS(b.recv(), mp::InvalidStateError);
    b.close();  // twice is harmless
    // EOFError and BrokenPipeError are library errors.
    CHECK_THROWS_AS(a.recv(), mp::Error);
}

TEST_CASE("copies are the same end; close() on one closes them all in this process") {
    auto [a, b] = mp::Pipe<int>();
    mp::Connection<int> a2 = a;
    CHECK(a2 == a);
    CHECK(a2 != b);
    b.send(9);
    CHECK(a2.recv() == 9);
    a.close();
    CHECK(a2.closed());
    CHECK_THROWS_AS(b.recv(1s), mp::EOFError);
    mp::Connection<int> none;
    CHECK(none.closed());
    CHECK_THROWS_AS(none.send(1), mp::InvalidStateError);
    CHECK_THROWS_AS(none.recv(), mp::InvalidStateError);
}

TEST_CASE("timeouts: recv(timeout) throws TimeoutError, try_recv gives nullopt, poll gives false") {
    auto [a, b] = mp::Pipe<int>();
    auto t0 = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(a.recv(50ms), mp::TimeoutError);
    CHECK(std::chrono::steady_clock::now() - t0 >= 50ms);
    CHECK_FALSE(a.try_recv().has_value());
    CHECK_FALSE(a.try_recv(20ms).has_value());
    CHECK_FALSE(a.poll());
    t0 = std::chrono::steady_clock::now();
    CHECK_FALSE(a.poll(50ms));
    CHECK(std::chrono::steady_clock::now() - t0 >= 50ms);
    CHECK_THROWS_AS(a.recv_bytes(10ms), mp::TimeoutError);
    b.send(3);
    CHECK(a.poll(30s));
    CHECK(a.try_recv(30s) == 3);
    // A message that has only partly arrived is not "ready": poll waits for all of it.
    auto [v1, v2] = mp::Pipe<std::vector<std::uint32_t>>();
    std::thread sender([&, &v2 = v2] { v2.send(pattern(four_mib, 2)); });
    CHECK(v1.poll(60s));
    CHECK(v1.recv(0ms).size() == four_mib / 4);  // recv(0) after a true poll never times out
    sender.join();
}

TEST_CASE("send_bytes / recv_bytes carry raw bytes, any size, also empty") {
    auto [a, b] = mp::Pipe<std::string>();
    std::string bin("\0\1\2\xff", 4);
    a.send_bytes(bin);
    a.send_bytes("");
    a.send("typed");
    CHECK(b.recv_bytes() == bin);
    CHECK(b.recv_bytes().empty());
    CHECK(b.recv_bytes() == mp::encode(std::string("typed")));
}

TEST_CASE("bad input: a message that does not decode is DecodeError, consumed; the connection goes on") {
    auto [a, b] = mp::Pipe<Order>();
    a.send_bytes("garbage that is not an Order");
    a.send(Order{"bob", {}, {}});
    CHECK_THROWS_AS(b.recv(), mp::DecodeError);
    CHECK(b.recv().customer == "bob");  // the torn message was dropped; the next one is intact

    // Trailing bytes after a valid value are an error too.
    auto [i1, i2] = mp::Pipe<int>();
    i1.send_bytes(mp::encode(5) + "x");
    CHECK_THROWS_AS(i2.recv(), mp::DecodeError);
    i1.send(6);
    CHECK(i2.recv() == 6);
}

TEST_CASE("bad input: bytes that are not frames break the framing: DecodeError from then on, never a hang") {
    auto [a, b] = mp::Pipe<int>();
    const char junk[] = "this is not a frame header at all";
    REQUIRE(write_raw(a.fileno(), junk, sizeof junk));
    a.send(1);
    CHECK(b.poll(10s));
    CHECK_THROWS_AS(b.recv(10s), mp::DecodeError);
    CHECK_THROWS_AS(b.recv(10s), mp::DecodeError);  // the stream cannot find its frames again
    // A frame header claiming an absurd size is the same (not an allocation, not a wait).
    auto [c, d] = mp::Pipe<int>();
    std::uint32_t header[4] = {0x4d50434eu, 0, 0xffffffffu, 0xffffffffu};
    REQUIRE(write_raw(c.fileno(), header, sizeof header));
    CHECK_THROWS_AS(d.recv(10s), mp::DecodeError);
}

TEST_CASE("both sides send 8 MiB at once: no deadlock (Python deadlocks here)") {
    auto [a, b] = mp::Pipe<std::vector<std::uint32_t>>();
    auto va = pattern(std::size_t(8) << 20, 11), vb = pattern(std::size_t(8) << 20, 12);
    std::vector<std::uint32_t> got_a, got_b;
    std::thread ta([&, &a = a] {
        a.send(va);
        got_a = a.recv(120s);
    });
    std::thread tb([&, &b = b] {
        b.send(vb);
        got_b = b.recv(120s);
    });
    ta.join();
    tb.join();
    CHECK(got_a == vb);
    CHECK(got_b == va);
}

TEST_CASE("threads: concurrent senders never interleave messages; concurrent receivers get whole ones") {
    auto [a, b] = mp::Pipe<std::vector<std::uint32_t>>();
    constexpr int senders = 4, per_sender = 40;
    std::vector<std::thread> ts;
    for (int t = 0; t < senders; ++t)
        ts.emplace_back([&, t, &a = a] {
            for (int i = 0; i < per_sender; ++i)
                a.send(std::vector<std::uint32_t>(50000 + 1000 * i, static_cast<std::uint32_t>(t * 1000 + i)));
        });
    std::atomic<int> whole{0}, torn{0};
    std::vector<std::thread> rs;
    for (int r = 0; r < 2; ++r)
        rs.emplace_back([&, &b = b] {
            for (int k = 0; k < senders * per_sender / 2; ++k) {
                auto v = b.recv(60s);
                std::uint32_t tag = v.empty() ? 0 : v[0];
                bool ok = v.size() == 50000 + 1000 * (tag % 1000);
                for (auto x : v) ok = ok && x == tag;
                (ok ? whole : torn)++;
            }
        });
    for (auto& t : ts) t.join();
    for (auto& r : rs) r.join();
    CHECK(whole == senders * per_sender);
    CHECK(torn == 0);
}

TEST_CASE("close() from another thread wakes a blocked recv, which throws InvalidStateError") {
    auto [a, b] = mp::Pipe<int>();
    std::atomic<bool> threw_state{false};
    std::atomic<bool> entered{false};
    std::thread receiver([&, &a = a] {
        entered = true;
        try {
            a.recv();
        } catch (const mp::InvalidStateError&) {
            threw_state = true;
        } catch (...) {
        }
    });
    while (!entered) std::this_thread::yield();
    a.close();  // returns once the receiver has left (within 100 ms)
    receiver.join();
    CHECK(threw_state);
    CHECK(a.fileno() == mp::detail::os::invalid_handle);
}

TEST_CASE("no descriptor leak: 200 pipes made, used and dropped") {
    auto before = count_fds();
    for (int i = 0; i < 200; ++i) {
        auto [a, b] = mp::Pipe<int>();
        a.send(i);
        CHECK(b.recv() == i);
    }
    CHECK(count_fds() == before);
}

TEST_CASE("an end holding received bytes cannot be passed on (they would be lost)") {
    auto [a, b] = mp::Pipe<int>();
    a.send(1);
    REQUIRE(b.poll(10s));  // poll has read the message into b's buffer
    mp::Encoder e;
    CHECK_THROWS_AS(e.write(b), std::invalid_argument);
    CHECK(b.recv() == 1);
    mp::Encoder ok;
    ok.write(b);
    CHECK(ok.handles().size() == 1);
    a.close();
    mp::Encoder closed;
    CHECK_THROWS_AS(closed.write(a), std::invalid_argument);
}

// ---------------------------------------------------------------- with child processes

TEST_CASE_TEMPLATE("parent <-> child: 4 MiB round trips, and EOF when the child returns", Ctx, CONTEXTS) {
    auto [mine, theirs] = mp::Pipe<std::vector<std::uint32_t>>();
    mp::Process p(Ctx{}, echo_plus_one, theirs);
    p.start();
    theirs.close();  // the child's copy is now the only one
    for (std::uint32_t r = 0; r < 3; ++r) {
        auto v = pattern(four_mib, r);
        mine.send(v);
        auto back = mine.recv(60s);
        REQUIRE(back.size() == v.size());
        bool ok = true;
        for (std::size_t i = 0; i < v.size(); ++i) ok = ok && back[i] == v[i] + 1;
        CHECK(ok);
    }
    mine.send({});
    CHECK(p.result(60s) == 3);
    CHECK_THROWS_AS(mine.recv(60s), mp::EOFError);
}

TEST_CASE_TEMPLATE("both ends in children: one echoes, the other talks", Ctx, CONTEXTS) {
    INFO(std::string(ctx_name<Ctx>()));
    auto [a, b] = mp::Pipe<std::vector<std::uint32_t>>();
    mp::Process server(Ctx{}, echo_plus_one, b);
    mp::Process client(Ctx{}, echo_client, a, 4, std::uint64_t(four_mib));
    server.start();
    client.start();
    a.close();
    b.close();
    CHECK(client.result(120s) == 4);
    CHECK(server.result(120s) == 4);
}

TEST_CASE_TEMPLATE("EOFError when the peer process returns, exits or is SIGKILLed - never a hang", Ctx, CONTEXTS) {
    INFO(std::string(ctx_name<Ctx>()));
    {
        auto [mine, theirs] = mp::Pipe<int>();
        mp::Process p(Ctx{}, send_n_and_return, theirs, 3);
        p.start();
        theirs.close();
        CHECK(mine.recv(60s) == 0);
        CHECK(mine.recv(60s) == 1);
        CHECK(mine.recv(60s) == 2);
        CHECK_THROWS_AS(mine.recv(60s), mp::EOFError);
        p.join();
    }
    {
        auto [mine, theirs] = mp::Pipe<int>();
        mp::Process p(Ctx{}, send_then_hang, theirs);
        p.start();
        theirs.close();
        CHECK(mine.recv(60s) == 7);
        p.kill();
        CHECK_THROWS_AS(p.join(), mp::ProcessError);
        CHECK_THROWS_AS(mine.recv(60s), mp::EOFError);
        CHECK_THROWS_AS(mine.send(1), mp::BrokenPipeError);
    }
}

TEST_CASE("a peer killed in the middle of a message: EOFError says so") {
    auto [mine, theirs] = mp::Pipe<std::vector<char>>();
    mp::Process p(big_send_forever, theirs);
    p.start();
    theirs.close();
    // Wait until the first bytes are there (the child is inside its send), without receiving.
#if !defined(_WIN32)
    pollfd pfd{mine.fileno(), POLLIN, 0};
    REQUIRE(::poll(&pfd, 1, 60000) == 1);
#else
    const mp::detail::os::handle_t end = mine.fileno();
    REQUIRE(mp::detail::os::wait_readable(&end, 1, 60000) == 1u);
#endif
    p.kill();
    CHECK_THROWS_AS(p.join(), mp::ProcessError);
    std::string what;
    try {
        mine.recv(60s);
    } catch (const mp::EOFError& e) {
        what = e.what();
    }
    CHECK(what.find("middle of a message") != std::string::npos);
}

TEST_CASE_TEMPLATE("parent and child both send 8 MiB first, then receive: no deadlock", Ctx, CONTEXTS) {
    auto [mine, theirs] = mp::Pipe<std::vector<std::uint32_t>>();
    mp::Process p(Ctx{}, send_then_receive, theirs);
    p.start();
    theirs.close();
    auto mine_v = pattern(std::size_t(8) << 20, 6);
    mine.send(mine_v);
    CHECK(mine.recv(120s) == pattern(std::size_t(8) << 20, 5));
    std::uint64_t sum = 0;
    for (auto x : mine_v) sum += x;
    CHECK(p.result(120s) == sum);
}

TEST_CASE_TEMPLATE("handles inside messages: a Queue and a Connection sent over a Connection", Ctx, CONTEXTS) {
    {
        auto [mine, theirs] = mp::Pipe<mp::Queue<int>>();
        mp::Process p(Ctx{}, put_into_received_queue, theirs, 77);
        p.start();
        mp::Queue<int> q;
        mine.send(q);
        CHECK(q.get(60s) == 77);
        p.join();
    }
    {
        auto [mine, theirs] = mp::Pipe<mp::Connection<std::string>>();
        mp::Process p(Ctx{}, answer_on_received_end, theirs);
        p.start();
        auto [x, y] = mp::Pipe<std::string>();
        mine.send(y);
        y.close();
        x.send("inner");
        CHECK(x.recv(60s) == "via inner");
        p.join();
    }
}

TEST_CASE_TEMPLATE("connection_wait: children answer in the order they are told; processes as sentinels", Ctx,
                   CONTEXTS) {
    INFO(std::string(ctx_name<Ctx>()));
    constexpr int n = 3;
    std::vector<mp::Connection<int>> mine, theirs;
    for (int k = 0; k < n; ++k) {
        auto [m, t] = mp::Pipe<int>();
        mine.push_back(m);
        theirs.push_back(t);
    }
    std::vector<std::unique_ptr<mp::Process<int>>> procs;
    for (int k = 0; k < n; ++k) {
        procs.push_back(std::make_unique<mp::Process<int>>(Ctx{}, answer_when_told, theirs[k], k));
        procs.back()->start();
    }
    for (auto& t : theirs) t.close();
    std::vector<mp::Connection<int>*> readers;
    for (auto& m : mine) readers.push_back(&m);

    CHECK(mp::connection_wait(readers, 50ms).empty());  // nobody has been told: nothing is ready
    for (int k : {2, 0, 1}) {
        mine[k].send(k + 100);
        auto ready = mp::connection_wait(readers, 60s);
        REQUIRE(ready.size() == 1);
        CHECK(ready[0] == &mine[k]);
        CHECK(ready[0]->recv() == 10 * k + k + 100);
    }
    // Told to return, each process is ready as a sentinel.
    for (int k = 0; k < n; ++k) {
        CHECK(mp::connection_wait({procs[k].get()}, 20ms).empty());
        mine[k].send(0);
        auto ready = mp::connection_wait({procs[k].get()}, 60s);
        REQUIRE(ready.size() == 1);
        CHECK(ready[0].is(procs[k].get()));
        CHECK(ready[0].index() == 0);
        CHECK(procs[k]->result() == k);
    }
    // Every child has ended, so every end is at EOF: ready too.
    auto all = mp::connection_wait({&mine[0], procs[1].get()}, 60s);
    CHECK(all.size() == 2);
    CHECK(all.back().is(procs[1].get()));
}

TEST_CASE("connection_wait: a running process is not ready until it ends; mixed lists; errors") {
    auto [mine, theirs] = mp::Pipe<int>();
    mp::Process p(answer_when_told, theirs, 4);
    p.start();
    theirs.close();
    auto none = mp::connection_wait({&p, &mine}, 50ms);
    CHECK(none.empty());
    mine.send(1);
    auto first = mp::connection_wait({&p, &mine}, 60s);
    REQUIRE(!first.empty());
    CHECK(first[0].is(&mine));  // the answer comes before the exit
    CHECK(mine.recv() == 41);
    mine.send(0);
    auto ended = mp::connection_wait({&p}, 60s);
    REQUIRE(ended.size() == 1);
    CHECK(p.done());

    mp::Process never(answer_when_told, theirs, 0);
    CHECK_THROWS_AS(mp::connection_wait({&never}, 10ms), mp::InvalidStateError);
    auto [c, d] = mp::Pipe<int>();
    c.close();
    CHECK_THROWS_AS(mp::connection_wait({&c}, 10ms), mp::InvalidStateError);
    mp::Connection<int> unconnected;
    CHECK_THROWS_AS(mp::connection_wait({&unconnected}, 10ms), mp::InvalidStateError);
}
