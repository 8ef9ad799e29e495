// ServerProcess: hosted objects, proxies and their reference counts, memory
// blocks, concurrency, crashes of clients and of the server, bad input.
// Real processes throughout: the server is a spawned child of the test.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <csignal>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#else  // the raw-connection case talks Winsock to the server's loopback TCP listener
#ifndef NOMINMAX
#define NOMINMAX
#endif
#define WIN32_LEAN_AND_MEAN
#include <winsock2.h>
#endif

#include "fork_helpers.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;

namespace {

// ---------------------------------------------------------------- hosted classes (no registration)

class Counter {
public:
    explicit Counter(int start) : n_(start) {}
    int add(int k) {
        std::lock_guard<std::mutex> g(m_);
        return n_ += k;
    }
    int get() const {
        std::lock_guard<std::mutex> g(m_);
        return n_;
    }
    void fail(std::string why) { throw std::invalid_argument("counter says: " + why); }
    /// Proxies made inside the server, nested in plain data.
    std::pair<std::vector<mp::Proxy<Counter>>, std::map<std::string, mp::Proxy<mp::MemoryBlock>>> spawn(int n) {
        std::vector<mp::Proxy<Counter>> cs;
        for (int i = 0; i < n; ++i) cs.push_back(mp::managed<Counter>(get() + i));
        auto block = mp::managed<mp::MemoryBlock>(64);
        block.data()[3] = 26;  // written by the server itself
        return {cs, {{"block", block}}};
    }
    void log_something() { mp::get_logger("hosted").info("hello from the server"); }
    /// Calls another hosted object from inside the server (no socket: the in-server path).
    int absorb(mp::Proxy<Counter> other) { return add(other.call<&Counter::get>()); }

private:
    mutable std::mutex m_;
    int n_;
};

struct Greeter {
    std::string prefix;
    explicit Greeter(std::string p) : prefix(std::move(p)) {}
    std::string greet(const std::string& who) const { return prefix + ", " + who; }
    std::size_t length(std::vector<int> v) { return v.size(); }
};

/// Meets a partner at a barrier inside a method: both calls must run at once.
struct Meeter {
    mp::Barrier barrier;
    explicit Meeter(mp::Barrier b) : barrier(std::move(b)) {}
    int meet() { return static_cast<int>(barrier.wait(20s)); }
};

/// Blocks in a method until released: a call in flight when the server dies.
struct Blocker {
    mp::Event entered, go;
    Blocker(mp::Event in, mp::Event e) : entered(std::move(in)), go(std::move(e)) {}
    bool block() {
        entered.set();
        return go.wait(60s);
    }
};

/// A call too big for the shared-memory slot travels on the socket; it blocks
/// until released, like Blocker::block.
struct BigBlocker {
    mp::Event entered, go;
    BigBlocker(mp::Event in, mp::Event e) : entered(std::move(in)), go(std::move(e)) {}
    bool block(const std::string& pad) {
        entered.set();
        return go.wait(60s) && !pad.empty();
    }
    bool block_not() { return true; }
#if !defined(_WIN32)
    /// Forks a process that holds every descriptor of the server (its client
    /// sockets too) until killed: the server's death then closes no socket.
    long fork_holder() {
        pid_t pid = ::fork();
        if (pid == 0) {
            for (;;) ::pause();
        }
        return static_cast<long>(pid);
    }
#endif
};

// ---------------------------------------------------------------- child targets

int child_adds(mp::Proxy<Counter> c, int times) {
    for (int i = 0; i < times; ++i) c.call<&Counter::add>(1);
    return c.call<&Counter::get>();
}

int child_forked_uses(mp::Proxy<Counter> c) {
    // A forked child inherited the parent's proxy; its first call opens a session of its own.
    int v = c.call<&Counter::add>(10);
    mp::Proxy<Counter> extra = c;
    return v + (extra.call<&Counter::get>() == v ? 0 : 1000);
}

int child_meets(mp::Proxy<Meeter> m) { return m.call<&Meeter::meet>() >= 0 ? 1 : 0; }

int child_writes_block(mp::Proxy<mp::MemoryBlock> b) {
    int seen = b[0];
    for (std::size_t i = 1; i < b.size(); ++i) b[i] = static_cast<unsigned char>(i % 251);
    return seen;
}

int child_from_queue(mp::Queue<mp::Proxy<Counter>> q) {
    mp::Proxy<Counter> c = q.get(30s);
    return c.call<&Counter::add>(100);
}

void child_holds_many(mp::ServerClient server, mp::Event ready, int n) {
    std::vector<mp::Proxy<Counter>> keep;
    for (int i = 0; i < n; ++i) keep.push_back(server.create<Counter>(i));
    ready.set();
    std::this_thread::sleep_for(600s);  // until killed
}

int child_edits_nested(mp::Proxy<mp::List<int>> l, mp::Proxy<mp::MemoryBlock> b) {
    l.append(30);
    b[3] = 62;
    return static_cast<int>(l.len());
}

std::size_t count_of(const mp::ServerProcess& s) { return s.object_count(); }

/// Decodes an encoded proxy (taking over its ticket), says so, and waits to be killed.
void child_decodes_and_waits(std::string bytes, mp::Event decoded) {
    mp::Decoder d(bytes);
    auto c = d.read<mp::Proxy<Counter>>();
    decoded.set();
    std::this_thread::sleep_for(600s);  // until killed, the proxy unused
}

int child_uses_namespace(mp::Proxy<mp::Namespace> ns) {
    ns.set("count", ns.get<int>("count") + 1);
    auto c = ns.get<mp::Proxy<Counter>>("counter");
    c.call<&Counter::add>(5);
    ns.get<mp::Proxy<mp::MemoryBlock>>("block")[1] = 77;
    ns.set("from_child", "hello");
    return ns.get<int>("count");
}

/// Stores a Counter of its own in the shared namespace and a namespace of its
/// own full of objects, then waits to be killed.
void child_fills_namespaces(mp::ServerClient server, mp::Proxy<mp::Namespace> shared, mp::Event ready) {
    shared.set("orphan", server.create<Counter>(7));
    auto mine = server.Namespace();
    for (int i = 0; i < 10; ++i) mine.set("c" + std::to_string(i), server.create<Counter>(i));
    ready.set();
    std::this_thread::sleep_for(600s);  // until killed
}

/// Sets a value until a call fails; returns the error's text.
std::string child_sets_until_error(mp::Proxy<mp::Namespace> ns, mp::Event started) {
    for (long i = 0;; ++i) {
        try {
            ns.set("i", i);
        } catch (const mp::ServerError& e) {
            return e.what();
        }
        if (i == 10) started.set();
    }
}
/// The bytes of a proxy to a new Counter: its ticket keeps the Counter alive
/// until a process decodes them.
std::string encoded_counter(mp::ServerProcess& server) {
    mp::Encoder e;
    e.write(server.create<Counter>(1));
    return e.bytes();
}
/// Waits for `go`, then decodes an encoded proxy (which connects to the
/// server) and calls: the text of what happened.
std::string child_decodes_and_calls_after(std::string bytes, mp::Event go) {
    if (!go.wait(60s)) return "no go";
    try {
        mp::Decoder d(bytes);
        d.read<mp::Proxy<Counter>>().call<&Counter::get>();
        return "no error";
    } catch (const mp::ServerError&) {
        return "ServerError";
    }
}

}  // namespace

TEST_CASE("server: create, call and results with several hosted classes") {
    mp::ServerProcess server;
    CHECK(server.is_alive());
    CHECK(server.name().rfind("ServerProcess-", 0) == 0);
    std::size_t base = count_of(server);
    mp::Proxy<Counter> c = server.create<Counter>(10);
    CHECK(c.call<&Counter::add>(5) == 15);
    CHECK(c.call<&Counter::get>() == 15);
    auto g = server.create<Greeter>("hello");  // a C string travels as std::string
    CHECK(g.call<&Greeter::greet>("world") == "hello, world");
    CHECK(g.call<&Greeter::length>(std::vector<int>{1, 2, 3}) == 3u);
    CHECK(count_of(server) == base + 2);
    {
        mp::Proxy<Counter> copy = c;  // a copy shares the reference: no new object, no message
        CHECK(copy.id() == c.id());
        CHECK(count_of(server) == base + 2);
    }
    CHECK(count_of(server) == base + 2);
    c.reset();
    g = {};
    CHECK(count_of(server) == base);
    CHECK_THROWS_AS(c.call<&Counter::get>(), mp::ServerError);  // a call after release
}

TEST_CASE("server: a method's exception arrives typed, with the server's traceback") {
    mp::ServerProcess server(mp::ServerOptions{"the-server", nullptr, true, 1000ms});
    auto c = server.create<Counter>(0);
    try {
        c.call<&Counter::fail>("no");
        FAIL("no exception");
    } catch (const std::invalid_argument& e) {
        CHECK(std::string(e.what()) == "counter says: no");
        CHECK(mp::is_remote(e));
        std::string tb = mp::remote_traceback(e);
        CHECK(tb.find("the-server") != std::string::npos);
#if !defined(_WIN32)  // Windows (MinGW) tracebacks name no functions: module+offset (as for test_traceback, skip.txt)
        // Counter::fail is inlined into the server's call dispatch: only the
        // line lookup (addr2line, bounded at 5 s) names it.  Under a load that
        // makes the lookup give up, the traceback has no file:line at all.
        if (tb.find(" at ") != std::string::npos) CHECK(tb.find("fail") != std::string::npos);
#endif
    }
    CHECK(c.call<&Counter::get>() == 0);  // the connection and the object are fine
}

TEST_CASE("server: methods return proxies nested in data; children use them") {
    mp::ServerProcess server;
    std::size_t base = count_of(server);
    auto c = server.create<Counter>(7);
    auto made = c.call<&Counter::spawn>(3);
    REQUIRE(made.first.size() == 3);
    CHECK(made.first[2].call<&Counter::get>() == 9);
    CHECK(count_of(server) == base + 1 + 3 + 1);
    auto block = made.second.at("block");
    CHECK(block.size() == 64);
    CHECK(block[3] == 26);
    auto list = server.list<int>({10, 20});
    mp::Process p(child_edits_nested, list, block);
    p.start();
    CHECK(p.result() == 3);
    CHECK(block[3] == 62);
    CHECK(list.get(2) == 30);
    CHECK(list.copy() == std::vector<int>{10, 20, 30});
    mp::Process q(child_adds, made.first[0], 5);
    q.start();
    CHECK(q.result() == 12);
    made = {};
    block.reset();
    list.reset();
    // The children's references went when the server saw them end.
    CHECK(forktest::await([&] { return count_of(server) == base + 1; }, 30s));
}

TEST_CASE("server: calls from two clients run concurrently (they meet at a barrier inside a method)") {
    mp::ServerProcess server;
    mp::Barrier barrier(2);
    auto m = server.create<Meeter>(barrier);
    SUBCASE("two processes") {
        mp::Process a(child_meets, m), b(child_meets, m);
        a.start();
        b.start();
        CHECK(a.result() == 1);
        CHECK(b.result() == 1);
    }
    SUBCASE("two threads of one process") {
        mp::Thread t([](mp::Proxy<Meeter> x) { return x.call<&Meeter::meet>(); }, m);
        t.start();
        CHECK(m.call<&Meeter::meet>() >= 0);
        CHECK(t.result() >= 0);
    }
}

TEST_CASE("server: one client thread's calls run in order") {
    mp::ServerProcess server;
    auto l = server.list<int>();
    auto fill = [](mp::Proxy<mp::List<int>> x, int base) {
        for (int i = 0; i < 300; ++i) x.append(base + i);
    };
    mp::Thread t(fill, l, 1000);
    t.start();
    fill(l, 0);
    t.join();
    auto all = l.copy();
    REQUIRE(all.size() == 600);
    int last_a = -1, last_b = 999;
    for (int v : all) {
        if (v < 1000) {
            CHECK(v == last_a + 1);
            last_a = v;
        } else {
            CHECK(v == last_b + 1);
            last_b = v;
        }
    }
}

TEST_CASE("server: a MemoryBlock is shared memory in every process") {
    auto shm_before = forktest::dev_shm_entries();
    mp::ServerProcess server;
    CHECK_THROWS_AS(server.MemoryBlock(0), std::invalid_argument);
    auto b = server.MemoryBlock(1 << 16);
    CHECK(b.size() == (1u << 16));
    CHECK(b.bytes().size() == b.size());
    b[0] = 77;  // the parent writes, the child reads
    mp::Process p(child_writes_block, b);
    p.start();
    CHECK(p.result() == 77);
    bool all = true;  // the child wrote, the parent reads
    for (std::size_t i = 1; i < b.size(); ++i) all = all && b[i] == static_cast<unsigned char>(i % 251);
    CHECK(all);
    CHECK(b.data() == b.bytes().data());  // mapped once in this process
    CHECK(forktest::dev_shm_entries() == shm_before);
}

TEST_CASE("server: a proxy in a Queue keeps its object alive after the parent drops its copy") {
    mp::ServerProcess server;
    std::size_t base = count_of(server);
    mp::Queue<mp::Proxy<Counter>> q;
    {
        auto c = server.create<Counter>(1);
        q.put(c);
    }  // the parent's proxy is gone; the encoded one in the queue holds the object
    CHECK(count_of(server) == base + 1);
    mp::Process p(child_from_queue, q);
    p.start();
    CHECK(p.result() == 101);
    CHECK(forktest::await([&] { return count_of(server) == base; }, 30s));  // went with the child
}

TEST_CASE("server: a hosted method uses proxies inside the server; a forked child uses inherited ones" *
          forktest::fork_only) {
    mp::ServerProcess server;
    std::size_t base = count_of(server);
    auto a = server.create<Counter>(1);
    auto b = server.create<Counter>(41);
    CHECK(a.call<&Counter::absorb>(b) == 42);
    CHECK(count_of(server) == base + 2);  // the server's own proxy of b went after the call
    mp::Process p(mp::ForkContext{}, child_forked_uses, a);
    p.start();
    CHECK(p.result() == 52);
    CHECK(a.call<&Counter::get>() == 52);
    a.reset();
    b.reset();
    CHECK(forktest::await([&] { return count_of(server) == base; }, 30s));
}

TEST_CASE("server: a process killed after decoding a proxy, before using it, gives its ticket back") {
    // As when a consumer dies inside a Queue's get after it decoded the item:
    // the queue delivers the item again, and its proxy must still work.
    mp::ServerProcess server;
    std::size_t base = count_of(server);
    std::string bytes;
    {
        auto c = server.create<Counter>(33);
        mp::Encoder e;
        e.write(c);
        bytes = e.bytes();
    }  // only the encoding's ticket keeps the Counter now
    CHECK(count_of(server) == base + 1);
    mp::Event decoded;
    mp::Process p(child_decodes_and_waits, bytes, decoded);
    p.start();
    REQUIRE(decoded.wait(60s));
    p.kill();
    CHECK_THROWS_AS(p.join(), mp::ProcessError);
    {
        mp::Decoder d(bytes);  // the same bytes, decoded again here
        auto again = d.read<mp::Proxy<Counter>>();
        CHECK(again.call<&Counter::get>() == 33);
    }
    CHECK(forktest::await([&] { return count_of(server) == base; }, 30s));
}

TEST_CASE("server: a Process argument does not keep the object alive after the child took it") {
    mp::ServerProcess server;
    std::size_t base = count_of(server);
    mp::Process p(child_adds, server.create<Counter>(0), 3);
    p.start();
    CHECK(p.result() == 3);
    // p still exists; its argument copy does not keep the object.
    CHECK(forktest::await([&] { return count_of(server) == base; }, 30s));
}

TEST_CASE("server: a client SIGKILLed holding 100 proxies releases them") {
    mp::ServerProcess server;
    std::size_t base = count_of(server);
    mp::Event ready;
    mp::Process p(child_holds_many, server.client(), ready, 100);
    p.start();
    REQUIRE(ready.wait(60s));
    CHECK(count_of(server) == base + 100);
    p.kill();
    CHECK_THROWS_AS(p.join(), mp::ProcessError);
    CHECK(forktest::await([&] { return count_of(server) == base; }, 30s));
}

TEST_CASE("server: the server SIGKILLed makes every call fail at once, naming it") {
    auto shm_before = forktest::dev_shm_entries();
    std::size_t fds_before = forktest::fd_count();
    {
        mp::ServerProcess server(mp::ServerOptions{"doomed", nullptr, true, 1000ms});
        auto c = server.create<Counter>(1);
        auto b = server.MemoryBlock(4096);
        b[0] = 1;
        mp::Event entered, never;
        auto blocker = server.create<Blocker>(entered, never);
        mp::Thread t([](mp::Proxy<Blocker> x) { return x.call<&Blocker::block>(); }, blocker);
        t.start();
        REQUIRE(entered.wait(30s));  // the call is running in the server
        server.process().kill();
        auto t0 = std::chrono::steady_clock::now();
        CHECK_THROWS_AS(t.result(30s), mp::ServerError);  // the call in flight
        try {
            c.call<&Counter::get>();
            FAIL("no error");
        } catch (const mp::ServerError& e) {
            CHECK(std::string(e.what()).find("doomed") != std::string::npos);
        }
        CHECK(std::chrono::steady_clock::now() - t0 < 10s);  // a hang guard: it takes milliseconds
        CHECK(b[0] == 1);  // the mapping stays valid here
        c.reset();
        b.reset();
        blocker.reset();
        server.shutdown();
    }
    CHECK(forktest::dev_shm_entries() == shm_before);
    // Connections, slots and mappings all closed (exact on POSIX; Windows: the
    // system's own thread-pool handles come and go, forktest::handle_slack).
    CHECK(std::labs(static_cast<long>(forktest::fd_count()) - static_cast<long>(fds_before)) <= forktest::handle_slack);
}

TEST_CASE("server: a proxy decoded after the server was SIGKILLed: its first call fails, naming the server") {
    mp::ServerProcess server(mp::ServerOptions{"doomed-before", nullptr, true, 1000ms});
    mp::Event go;
    mp::Process late(child_decodes_and_calls_after, encoded_counter(server), go);
    late.start();
    server.process().kill();
    CHECK(server.process().exception(30s) != nullptr);  // it has ended, killed
    REQUIRE_FALSE(server.process().is_alive());
    go.set();  // the child's connection is refused: opening the link fails
    CHECK(late.result(30s) == "ServerError");
    server.shutdown();
}

#if !defined(_WIN32)
TEST_CASE("server: the server SIGKILLed while a process it forked keeps its sockets open: a call on the socket "
          "fails, it does not wait for that process") {
    mp::ServerProcess server(mp::ServerOptions{"doomed-socket", nullptr, true, 1000ms});
    mp::Event entered, never, connected, forked;
    auto blocker = server.create<BigBlocker>(entered, never);
    // The thread's connection exists before the fork, so the holder has its server end.
    mp::Thread t(
        [](mp::Proxy<BigBlocker> x, mp::Event connected, mp::Event forked) {
            x.call<&BigBlocker::block_not>();
            connected.set();
            if (!forked.wait(30s)) return false;
            return x.call<&BigBlocker::block>(std::string(256 * 1024, 'x'));
        },
        blocker, connected, forked);
    t.start();
    REQUIRE(connected.wait(30s));
    const long holder = blocker.call<&BigBlocker::fork_holder>();
    REQUIRE(holder > 0);
    struct KillHolder {  // whatever happens below, the holder goes
        long pid;
        ~KillHolder() { ::kill(static_cast<pid_t>(pid), SIGKILL); }
    } kill_holder{holder};
    // A child that connects after the server's death: its connection lands in
    // the listener's queue, which the holder keeps open.
    mp::Event go;
    mp::Process late(child_decodes_and_calls_after, encoded_counter(server), go);
    late.start();
    forked.set();
    REQUIRE(entered.wait(30s));  // the call is running in the server; its socket is also the holder's
    server.process().kill();
    auto t0 = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(t.result(30s), mp::ServerError);
    go.set();
    CHECK(late.result(30s) == "ServerError");
    CHECK(std::chrono::steady_clock::now() - t0 < 10s);  // a hang guard: it takes milliseconds
    blocker.reset();
    server.shutdown();
}
#endif

TEST_CASE("server: 1000 create/release cycles leave no objects, descriptors or mappings behind") {
    mp::ServerProcess server;
    for (int i = 0; i < 20; ++i) server.MemoryBlock(4096).data();  // warm up: every path taken once
    std::size_t objects = count_of(server);
    auto before = server.resource_counts();
    long fds_here = static_cast<long>(forktest::fd_count());
    for (int i = 0; i < 1000; ++i) {
        auto c = server.create<Counter>(i);
        if (c.call<&Counter::get>() != i) FAIL("wrong value");
        auto b = server.MemoryBlock(4096);
        b[0] = 1;
    }
    CHECK(count_of(server) == objects);
    auto after = server.resource_counts();
    // Descriptors: a leak per cycle would be 1000 more.  Not equality: the
    // warm-up's last block may still have been open in the server when
    // `before` was read (its release travels apart from the calls), seen in CI.
#if defined(_WIN32)
    // (Windows: the system's thread pool may keep a few handles of its own
    // from the calls - 2 seen under Wine.)
    CHECK(after.first <= before.first + 4);
#else
    CHECK(after.first <= before.first);
#endif
    // Mappings: a block leaked per cycle would be 1000 more; the allocator (or a
    // sanitizer's runtime) may map a few regions of its own meanwhile.
    CHECK(after.second <= before.second + 16);
    CHECK(std::labs(static_cast<long>(forktest::fd_count()) - fds_here) <= forktest::handle_slack);
}

TEST_CASE("server: hosted list, dict and value") {
    mp::ServerProcess server;
    auto l = server.list<std::string>();
    l.append("a");
    l.extend({"b", "c"});
    CHECK(l.len() == 3);
    CHECK(l[-1] == "c");
    l.set(0, "z");
    CHECK(l.pop(0) == "z");
    CHECK(l.copy() == std::vector<std::string>{"b", "c"});
    CHECK_THROWS_AS(l.get(10), std::out_of_range);
    auto d = server.dict<std::string, int>();
    d.set("x", 1);
    d.update({{"y", 2}, {"z", 3}});
    CHECK(d.get("y") == 2);
    CHECK(d.contains("z"));
    CHECK_FALSE(d.find("w").has_value());
    CHECK(d.get_or("w", 9) == 9);
    CHECK_THROWS_AS(d.get("w"), std::out_of_range);
    CHECK(d.keys() == std::vector<std::string>{"x", "y", "z"});
    CHECK(d.pop("x") == 1);
    CHECK(d.len() == 2);
    CHECK(d.items() == std::vector<std::pair<std::string, int>>{{"y", 2}, {"z", 3}});
    auto v = server.value<double>(1.5);
    CHECK(v.get() == 1.5);
    v.set(2.5);
    CHECK(v.exchange(3.5) == 2.5);
    CHECK(v.get() == 3.5);
    // A list of proxies: the stored proxies keep their objects alive.
    std::size_t base = count_of(server);
    auto holders = server.list<mp::Proxy<Counter>>();
    holders.append(server.create<Counter>(42));
    CHECK(count_of(server) == base + 2);
    CHECK(holders.get(0).call<&Counter::get>() == 42);
    holders.clear();
    CHECK(count_of(server) == base + 1);
}

TEST_CASE("server: a hosted Namespace holds named values of any codec type") {
    mp::ServerProcess server;
    std::size_t base = count_of(server);
    auto ns = server.Namespace();
    ns.set("count", 1);
    ns.set("name", "abc");  // a C string is stored as std::string
    ns.set("list", std::vector<double>{1.5, 2.5});
    ns.set("counter", server.create<Counter>(10));
    auto block = server.MemoryBlock(16);
    ns.set("block", block);
    CHECK(ns.get<int>("count") == 1);
    CHECK(ns.get<std::string>("name") == "abc");
    CHECK(ns.get<std::vector<double>>("list") == std::vector<double>{1.5, 2.5});
    CHECK(ns.names() == std::vector<std::string>{"block", "count", "counter", "list", "name"});
    CHECK(ns.len() == 5);
    CHECK(ns.contains("count"));
    CHECK_FALSE(ns.contains("nothing"));
    CHECK(ns.type_of("count") == "int");
    CHECK(ns.get_or<int>("nothing", 9) == 9);

    SUBCASE("a child sees and changes the same values") {
        mp::Process<int> p(child_uses_namespace, ns);
        p.start();
        CHECK(p.result(60s) == 2);
        CHECK(ns.get<int>("count") == 2);
        CHECK(ns.get<std::string>("from_child") == "hello");
        CHECK(ns.get<mp::Proxy<Counter>>("counter").call<&Counter::get>() == 15);
        CHECK(block[1] == 77);
    }
    SUBCASE("errors: a missing name, another type, a reserved name; the namespace still serves") {
        CHECK_THROWS_AS(ns.get<int>("nothing"), std::out_of_range);
        CHECK_THROWS_AS(ns.erase("nothing"), std::out_of_range);
        try {
            ns.get<double>("count");
            FAIL("no error");
        } catch (const std::invalid_argument& e) {
            CHECK(std::string(e.what()).find("'count' holds a int, not a double") != std::string::npos);
        }
        CHECK_THROWS_AS(ns.set("_private", 1), std::invalid_argument);
        CHECK_THROWS_AS(ns.get<int>(""), std::invalid_argument);
        CHECK(ns.get<int>("count") == 1);
    }
    SUBCASE("stored proxies keep their objects alive until replaced or erased") {
        CHECK(count_of(server) == base + 3);  // the namespace, the counter, the block
        block.reset();
        CHECK(count_of(server) == base + 3);  // the namespace still holds the block
        ns.erase("block");
        CHECK(count_of(server) == base + 2);
        ns.set("counter", 0);  // replaced by a plain value: the Counter goes
        CHECK(count_of(server) == base + 1);
        ns.reset();
        CHECK(count_of(server) == base);
    }
}

TEST_CASE("server: Namespace crash paths - a client SIGKILLed, the server SIGKILLed mid-call") {
    SUBCASE("a SIGKILLed client's references go; what it stored in a shared namespace stays") {
        mp::ServerProcess server;
        auto shared = server.Namespace();
        std::size_t base = count_of(server);
        mp::Event ready;
        mp::Process p(child_fills_namespaces, server.client(), shared, ready);
        p.start();
        REQUIRE(ready.wait(60s));
        CHECK(count_of(server) == base + 12);  // orphan, the child's namespace and its 10 counters
        p.kill();
        CHECK_THROWS_AS(p.join(), mp::ProcessError);
        CHECK(forktest::await([&] { return count_of(server) == base + 1; }, 30s));
        CHECK(shared.get<mp::Proxy<Counter>>("orphan").call<&Counter::get>() == 7);
        shared.erase("orphan");
        CHECK(count_of(server) == base);
    }
    SUBCASE("the server SIGKILLed while a child calls in a loop: every side gets ServerError naming it") {
        mp::ServerProcess server(mp::ServerOptions{"ns-server", nullptr, true, 1000ms});
        auto ns = server.Namespace();
        mp::Event started;
        mp::Process<std::string> p(child_sets_until_error, ns, started);
        p.start();
        REQUIRE(started.wait(60s));
        server.process().kill();
        std::string why = p.result(30s);  // a hang would time out here
        CHECK(why.find("ns-server") != std::string::npos);
        try {
            ns.get<long>("i");
            FAIL("no error");
        } catch (const mp::ServerError& e) {
            CHECK(std::string(e.what()).find("ns-server") != std::string::npos);
        }
    }
}

TEST_CASE("server: its log records reach the parent's handler; shutdown ends it cleanly") {
    std::vector<std::string> seen;
    std::mutex m;
    mp::set_log_handler([&](const mp::LogRecord& r, const std::string&) {
        std::lock_guard<std::mutex> g(m);
        seen.push_back(r.message);
    });
    {
        // A clean end is asked for, not a quick one: the default 1 s per step is
        // short for a spawned process's exit on a loaded machine under Wine.
        mp::ServerOptions options;
        options.shutdown_timeout = std::chrono::seconds(60);
        mp::ServerProcess server(options);
        server.create<Counter>(0).call<&Counter::log_something>();
        server.shutdown();
        CAPTURE(server.exitcode().value_or(-1000));  // (-1000: none)
        CHECK(server.exitcode() == 0);
        CHECK_FALSE(server.is_alive());
        server.shutdown();  // idempotent
    }
    mp::set_log_handler(nullptr);
    std::lock_guard<std::mutex> g(m);
    CHECK(std::find(seen.begin(), seen.end(), "hello from the server") != seen.end());
}

TEST_CASE("server: bad input is an error to that client alone") {
    mp::ServerProcess server;
    auto c = server.create<Counter>(5);
    mp::Encoder e;
    e.write(c);
    std::string bytes = e.bytes();
    SUBCASE("an unknown object id") {
        // The id is the third field from the end (id, ticket, type: 8 bytes each).
        std::string bad = bytes;
        std::uint64_t id = 999999;
        std::memcpy(&bad[bad.size() - 24], &id, 8);
        CHECK_THROWS_AS(mp::decode<mp::Proxy<Counter>>(bad), mp::ServerError);
    }
    SUBCASE("a proxy decoded as another class") {
        CHECK_THROWS_AS(mp::decode<mp::Proxy<Greeter>>(bytes), mp::DecodeError);
    }
    SUBCASE("a proxy from a different build") {
        // Walk the fields up to the build fingerprint and change its last byte.
        mp::Decoder d(bytes);
        d.read<std::uint8_t>();
        d.read<std::uint32_t>();
        d.read<std::uint32_t>();
        for (int i = 0; i < 3; ++i) d.read<std::string>();
        d.read<std::int64_t>();
        auto fp = d.read<std::string>();
        REQUIRE(!fp.empty());
        std::size_t at = bytes.size() - d.remaining() - 1;
        std::string bad = bytes;
        bad[at] = static_cast<char>(bad[at] ^ 1);
        CHECK_THROWS_AS(mp::decode<mp::Proxy<Counter>>(bad), mp::ServerError);
    }
    SUBCASE("truncated proxy bytes") {
        CHECK_THROWS_AS(mp::decode<mp::Proxy<Counter>>(bytes.substr(0, bytes.size() / 2)), mp::DecodeError);
    }
#if !defined(_WIN32)
    auto raw_connect = [&] {
        int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
        sockaddr_un a{};
        a.sun_family = AF_UNIX;
        std::memcpy(a.sun_path + 1, server.address().data(), server.address().size());
        socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + server.address().size());
        REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), len) == 0);
        return fd;
    };
    auto drain = [](int fd) {
        std::string got;
        char buf[4096];
        ssize_t n;
        while ((n = ::read(fd, buf, sizeof buf)) > 0) got.append(buf, static_cast<std::size_t>(n));
        ::close(fd);
        return got;
    };
    auto send_raw = [](int fd, const std::string& out) {
        (void)!::write(fd, out.data(), out.size());
        ::shutdown(fd, SHUT_WR);
    };
#else  // Windows: the listener is loopback TCP ("127.0.0.1:port") and the byte stream of a
       // connection is the seam's channel (its own frames carry the handles): the bytes go
       // through channel_write/channel_read, unframed as the server protocol sees them.
    namespace os = mp::detail::os;
    auto raw_connect = [&] { return os::unix_connect(server.address()); };
    auto drain = [](os::handle_t fd) {
        std::string got;
        char buf[4096];
        long n;
        while ((n = os::channel_read(fd, buf, sizeof buf, nullptr, false)) > 0) got.append(buf, static_cast<std::size_t>(n));
        os::close_handle(fd);
        return got;
    };
    auto send_raw = [](os::handle_t fd, const std::string& out) {
        os::channel_write(fd, out.data(), out.size(), nullptr, 0);  // false if the server closed already
        ::shutdown(static_cast<SOCKET>(fd), SD_SEND);  // half-close: the server reads the end, then answers
    };
#endif
    auto frame = [](std::uint32_t kind, const std::string& payload) {
        std::uint32_t h[4] = {kind, 0, static_cast<std::uint32_t>(payload.size()), 0};
        return std::string(reinterpret_cast<const char*>(h), sizeof h) + payload;
    };
    SUBCASE("garbage and truncated frames before HELLO") {
        auto raw = [&](const std::string& junk) {
            auto fd = raw_connect();
            send_raw(fd, junk);
            return drain(fd);
        };
        CHECK(raw("this is not a frame at all, just some bytes of garbage").find("HELLO") != std::string::npos);
        std::uint32_t header[4] = {101, 0, 1000, 0};  // a frame that promises 1000 bytes and stops
        CHECK(raw(std::string(reinterpret_cast<const char*>(header), sizeof header) + "abc").find("HELLO") !=
              std::string::npos);
        std::uint32_t huge[4] = {100, 0, 0xffffffffu, 0xffffffffu};
        CHECK(raw(std::string(reinterpret_cast<const char*>(huge), sizeof huge)).find("HELLO") != std::string::npos);
        CHECK(raw(frame(100, "short hello")).find("malformed HELLO") != std::string::npos);
    }
    SUBCASE("garbage from an authenticated client") {
        // The key and the build fingerprint are in any encoded proxy.
        mp::Decoder d(bytes);
        d.read<std::uint8_t>();
        d.read<std::uint32_t>();
        d.read<std::uint32_t>();
        d.read<std::string>();
        std::string key = d.read<std::string>();
        d.read<std::string>();
        d.read<std::int64_t>();
        std::string fp = d.read<std::string>();
        mp::Encoder hello;
        hello(std::uint32_t(1), key, std::string(16, 'x'), std::int64_t(forktest::self_pid()), fp, true);
        mp::Encoder bogus_call;  // object c, an invoker reference that is not one
        bogus_call(c.id(), std::uint64_t(12345), std::uint64_t(678), std::uint64_t(9));
        // A real invoker's place, with its identity and with a wrong one.
        using GetInvoker = mp::detail::server::Method<Counter, &Counter::get>;
        auto code = mp::detail::os::code_ref_of(GetInvoker::address());
        std::uint64_t identity = mp::detail::server::type_hash(typeid(GetInvoker*).name());
        mp::Encoder good_call, wrong_identity;
        good_call(c.id(), code.module, code.offset, identity);
        wrong_identity(c.id(), code.module, code.offset, identity ^ 1);
        mp::Encoder bad_id;  // INCREF (105) of an object that does not exist
        bad_id(std::uint64_t(999999));
        auto fd = raw_connect();
        std::string out = frame(100, hello.bytes()) + frame(102, good_call.bytes()) + frame(102, bogus_call.bytes()) +
                          frame(102, wrong_identity.bytes()) + frame(105, bad_id.bytes()) + frame(102, "xy") +
                          frame(777, "");
        send_raw(fd, out);
        std::string got = drain(fd);
        // Replies: ok (HELLO), ok with the value 5 (the good call), then errors.
        std::uint32_t kinds[2];
        std::uint64_t sizes[2];
        std::size_t at = 0;
        for (int i = 0; i < 2; ++i) {
            REQUIRE(got.size() >= at + 16);
            std::memcpy(&kinds[i], got.data() + at, 4);
            std::memcpy(&sizes[i], got.data() + at + 8, 8);
            at += 16 + sizes[i];
        }
        CHECK(kinds[0] == 200);
        CHECK(kinds[1] == 200);
        REQUIRE(sizes[1] == sizeof(int));
        int value = 0;
        std::memcpy(&value, got.data() + 16 + sizes[0] + 16, sizeof value);
        CHECK(value == 5);
        std::size_t first = got.find("does not know this constructor or method");
        CHECK(first != std::string::npos);
        CHECK(got.find("does not know this constructor or method", first + 1) != std::string::npos);
        CHECK(got.find("has no object 999999") != std::string::npos);
        CHECK(got.find("truncated") != std::string::npos);
        CHECK(got.find("garbage") != std::string::npos);
        mp::Encoder wrong_key;
        wrong_key(std::uint32_t(1), std::string(16, 'k'), std::string(16, 'x'), std::int64_t(forktest::self_pid()), fp, true);
        auto fd2 = raw_connect();
        std::string out2 = frame(100, wrong_key.bytes());
        send_raw(fd2, out2);
        CHECK(drain(fd2).find("authentication") != std::string::npos);
    }
    // Whatever happened above, the server still serves this client.
    CHECK(c.call<&Counter::add>(1) == 6);
}

TEST_CASE("server: managed() outside a server, and an unstarted server") {
    CHECK_THROWS_AS(mp::managed<Counter>(1), mp::InvalidStateError);
    mp::ServerProcess idle(mp::ServerOptions{"idle", nullptr, false, 1000ms});
    CHECK_FALSE(idle.is_alive());
    CHECK_THROWS_AS(idle.create<Counter>(1), mp::InvalidStateError);
    idle.start();
    CHECK(idle.create<Counter>(1).call<&Counter::get>() == 1);
    CHECK_THROWS_AS(idle.start(), mp::InvalidStateError);
}
