// Rows: the server process - proxy calls and MemoryBlocks whose client ends
// every way (SIGKILLed at a random instant inside a loop of calls, i.e. mid-
// call), a server that dies inside a method or is SIGKILLed mid-call, and
// proxies in flight in a Queue when their producer or consumer dies.
//
// What is right (README, "Server process"):
//   * a client that ends, however, releases its references: the server's
//     object count returns to what it was, and the server serves the others;
//   * a call in flight when the client is killed ran once or not at all;
//   * a server that dies makes every call - in flight or later, in any
//     process - fail with ServerError naming it, within the guard (no hang);
//     a client's mapping of a MemoryBlock stays valid;
//   * an encoded proxy keeps its object alive until it is decoded: a
//     producer that dies after putting proxies on a Queue loses none of them;
//     a consumer killed inside get loses at most the one item it had taken
//     (the Queue's bound), whose undecoded ticket keeps one object until the
//     server shuts down (the documented leak of an encoding never decoded).
#include "harness.hpp"

#include <signal.h>

#include <string>
#include <vector>

namespace stress {
namespace {

constexpr const char* server_name = "stress-server";
constexpr long calls_before_end = 200;
constexpr int own_objects = 5;  // what a client creates and holds when it ends

mp::ServerOptions server_options() {
    mp::ServerOptions o;
    o.name = server_name;
    o.shutdown_timeout = milliseconds(1000);
    return o;
}

struct Tally {
    explicit Tally(long v = 0) : n(v) {}
    long add(long k) {
        std::lock_guard<std::mutex> g(m);
        return n += k;
    }
    long get() const {
        std::lock_guard<std::mutex> g(m);
        return n;
    }
    /// Ends the server process, inside a call, the way `ending` says.
    long crash(int ending) {
        end_child(static_cast<Ending>(ending));
        return -1;
    }
    mutable std::mutex m;
    long n;
};

/// Blocks in a method until released (a call in flight).
struct Gate {
    mp::Event entered, open;
    Gate(mp::Event in, mp::Event o) : entered(std::move(in)), open(std::move(o)) {}
    bool pass() {
        entered.set();
        return open.wait(std::chrono::seconds(60));
    }
};

bool is_server_error_naming_it(const std::exception& e) {
    return dynamic_cast<const mp::ServerError*>(&e) && std::string(e.what()).find(server_name) != std::string::npos;
}

/// Waits (bounded) for the server's object count to come back to `base`.
void expect_count(Round& r, mp::ServerProcess& server, std::size_t base, const std::string& what) {
    std::size_t now = 0;
    bool back = await([&] { return (now = server.object_count()) == base; });
    if (!back) r.wrong(what + ": the server holds " + std::to_string(now) + " objects, expected " + std::to_string(base));
}

// ---------------------------------------------------------------- a client that ends every way

/// The client: holds objects of its own, makes calls in a loop (its progress in
/// shared memory, written after each call returned), then ends.
long client_child(int ending, mp::ServerClient server, mp::Proxy<Tally> t, mp::Proxy<Gate> gate,
                  mp::RawValue<long> progress, mp::Event release) {
    const auto e = static_cast<Ending>(ending);
    std::vector<mp::Proxy<Tally>> mine;
    for (int i = 0; i < own_objects; ++i) mine.push_back(server.create<Tally>(i));
    if (e == Ending::parent_killed) {
        progress.set(1);
        gate.call<&Gate::pass>();  // blocked in a call when the parent dies
        return -1;
    }
    long done = 0;
    for (long i = 0;; ++i) {
        if (e != Ending::sigkill && e != Ending::sigstop && i == calls_before_end) break;
        if (e == Ending::sigstop && release.is_set()) return -2;
        t.call<&Tally::add>(1);
        mine[static_cast<std::size_t>(i % own_objects)].call<&Tally::add>(1);
        progress.set(++done);
    }
    end_child(e);
    return t.call<&Tally::get>();
}

void client_row(Round& r) {
    const Ending e = r.ending();
    mp::ServerProcess server(server_options());
    mp::Event entered, open;
    auto gate = server.create<Gate>(entered, open);
    auto t = server.create<Tally>(0);
    const std::size_t base = server.object_count();
    mp::RawValue<long> progress(0);
    mp::Event release;
    mp::Process p(r.context(), client_child, static_cast<int>(e), server.client(), t, gate, progress, release);
    p.start();
    STRESS_KILL_ON_EXIT(p);
    auto started = [&] { return progress.get() > 0; };
    if (e == Ending::parent_killed) {
        if (!await(started) || !entered.wait(guard)) return r.hang("the client never blocked in its call");
        r.ready_to_be_killed();  // the driver checks the server and the client die with us
    }
    if (e == Ending::sigkill) {
        if (!await(started)) return r.hang("the client never started its calls");
        r.random_pause(5000);
        p.kill();
    }
    if (e == Ending::sigstop) {
        if (!await(started)) return r.hang("the client never started its calls");
        signal_process(p.pid(), SIGSTOP);
        // The stopped client must not hold anything up: the server serves us.
        auto t0 = Clock::now();
        try {
            t.call<&Tally::add>(0);
            server.create<Tally>(1).call<&Tally::get>();
        } catch (const std::exception& err) {
            r.wrong(std::string("a call while another client is stopped: ") + err.what());
        }
        if (Clock::now() - t0 > late_slack) r.wrong("calls while another client is stopped were slow");
        signal_process(p.pid(), SIGCONT);
        release.set();
        try {
            if (p.result(guard) != -2) r.wrong("the continued client returned a different value");
        } catch (const mp::TimeoutError&) {
            return r.hang("the continued client did not finish");
        } catch (const std::exception& err) {
            r.wrong(std::string("the continued client: ") + err.what());
        }
    } else {
        check_ending(r, p, e, calls_before_end, "the client");
    }
    if (!p.is_alive()) {
        try {
            p.join(guard);
        } catch (...) {
        }
    }
    // The call in flight ran once or not at all: the tally is the progress or one more.
    long value = t.call<&Tally::get>(), seen = progress.get();
    if (e != Ending::sigstop && (value < seen || value > seen + 1))
        r.wrong("the tally is " + std::to_string(value) + " after " + std::to_string(seen) + " completed calls");
    expect_count(r, server, base, "after the client ended");
}

ROW("server proxy call (client)", Ending::ret, client_row);
ROW("server proxy call (client)", Ending::thrw, client_row);
ROW("server proxy call (client)", Ending::exit_n, client_row);
ROW("server proxy call (client)", Ending::abrt, client_row);
ROW("server proxy call (client)", Ending::segv, client_row);
ROW("server proxy call (client)", Ending::sigkill, client_row);
ROW("server proxy call (client)", Ending::sigstop, client_row);
ROW("server proxy call (client)", Ending::parent_killed, client_row);

// ---------------------------------------------------------------- the server ends mid-call

/// Calls in a loop until one fails; returns 1 for ServerError naming the server,
/// 2 for any other error.  Its progress shows it is calling.
int caller_until_error(mp::Proxy<Tally> t, mp::RawValue<long> progress) {
    for (long i = 0;; ++i) {
        try {
            t.call<&Tally::add>(1);
        } catch (const std::exception& e) {
            return is_server_error_naming_it(e) ? 1 : 2;
        }
        progress.set(i + 1);
    }
}

/// The server dies inside a method (exit, abort, segfault) or is SIGKILLed at
/// a random instant while a child calls in a loop and the parent waits in a
/// call; for `thrw` the method throws and the server lives on.
void server_dies_row(Round& r) {
    const Ending e = r.ending();
    mp::ServerProcess server(server_options());
    auto t = server.create<Tally>(0);
    auto block = server.MemoryBlock(4096);
    block[7] = 7;
    mp::Event entered, open;
    auto gate = server.create<Gate>(entered, open);
    mp::RawValue<long> progress(0);
    mp::Process<int> caller(r.context(), caller_until_error, t, progress);
    caller.start();
    STRESS_KILL_ON_EXIT(caller);
    mp::Thread<bool> waiter([](mp::Proxy<Gate> g) { return g.call<&Gate::pass>(); }, gate);
    waiter.start();
    if (!await([&] { return progress.get() > 0; }) || !entered.wait(guard))
        return r.hang("the callers never started");
    auto t0 = Clock::now();
    if (e == Ending::sigkill) {
        r.random_pause(5000);
        server.process().kill();
    } else {
        try {
            t.call<&Tally::crash>(static_cast<int>(e));
            r.wrong("a method that ends the server returned");
        } catch (const std::runtime_error& err) {
            if (e == Ending::thrw) {
                if (!mp::is_remote(err) || std::string(err.what()) != thrown_message)
                    r.wrong(std::string("the method's exception arrived as '") + err.what() + "'");
            } else if (!is_server_error_naming_it(err)) {
                r.wrong(std::string("the call that ended the server failed with '") + err.what() + "'");
            }
        }
    }
    if (e == Ending::thrw) {  // the server lives on and serves everyone
        try {
            if (t.call<&Tally::add>(0) < 0) r.wrong("a bad tally");
        } catch (const std::exception& err) {
            r.wrong(std::string("after a method threw: ") + err.what());
        }
        open.set();
        try {
            if (!waiter.result(guard)) r.wrong("the waiting call failed");
        } catch (const std::exception& err) {
            r.wrong(std::string("the waiting call: ") + err.what());
        }
        caller.kill();
        return;
    }
    // Every call fails, naming the server: the one waiting in the server, the
    // child's loop, and a new one.
    try {
        waiter.result(guard);
        r.wrong("the call in flight returned although its server died");
    } catch (const mp::TimeoutError&) {
        return r.hang("the call in flight did not end when its server died");
    } catch (const std::exception& err) {
        if (!is_server_error_naming_it(err)) r.wrong(std::string("the call in flight failed with '") + err.what() + "'");
    }
    try {
        int how = caller.result(guard);
        if (how != 1) r.wrong("the child's call failed with another error than ServerError naming the server");
    } catch (const mp::TimeoutError&) {
        return r.hang("the child's calls did not end when their server died");
    } catch (const std::exception& err) {
        r.wrong(std::string("the calling child: ") + err.what());
    }
    try {
        t.call<&Tally::get>();
        r.wrong("a call on a dead server returned");
    } catch (const std::exception& err) {
        if (!is_server_error_naming_it(err)) r.wrong(std::string("a call on a dead server: '") + err.what() + "'");
    }
    if (Clock::now() - t0 > guard) r.hang("the callers took longer than the guard to see the server die");
    if (block[7] != 7) r.wrong("the MemoryBlock's mapping changed when its server died");
}

ROW("server dies mid-call", Ending::thrw, server_dies_row);
ROW("server dies mid-call", Ending::exit_n, server_dies_row);
ROW("server dies mid-call", Ending::abrt, server_dies_row);
ROW("server dies mid-call", Ending::segv, server_dies_row);
ROW("server dies mid-call", Ending::sigkill, server_dies_row);

// ---------------------------------------------------------------- MemoryBlocks

/// Maps the block (given as a Process argument), writes its marks in a loop
/// (each round: every byte = round), holds blocks of its own, then ends.
long block_child(int ending, mp::ServerClient server, mp::Proxy<mp::MemoryBlock> b, mp::RawValue<long> progress) {
    const auto e = static_cast<Ending>(ending);
    std::vector<mp::Proxy<mp::MemoryBlock>> mine;
    for (int i = 0; i < own_objects; ++i) mine.push_back(server.MemoryBlock(1 << 16));
    for (long i = 0;; ++i) {
        if (e != Ending::sigkill && i == calls_before_end) break;
        for (std::size_t k = 0; k < b.size(); ++k) b[k] = static_cast<unsigned char>(i + 1);
        mine[static_cast<std::size_t>(i % own_objects)][0] = 1;
        progress.set(i + 1);
    }
    end_child(e);
    return static_cast<long>(b[0]);
}

void block_row(Round& r) {
    const Ending e = r.ending();
    mp::ServerProcess server(server_options());
    auto b = server.MemoryBlock(8192);
    const std::size_t base = server.object_count();
    mp::RawValue<long> progress(0);
    mp::Process p(r.context(), block_child, static_cast<int>(e), server.client(), b, progress);
    p.start();
    STRESS_KILL_ON_EXIT(p);
    if (e == Ending::sigkill) {
        if (!await([&] { return progress.get() > 0; })) return r.hang("the child never wrote");
        r.random_pause(5000);
        p.kill();
    }
    check_ending(r, p, e, static_cast<long>(static_cast<unsigned char>(calls_before_end)), "the block's user");
    // The child's writes are here (zero-copy): whole rounds, one torn at most.
    const long seen = progress.get();
    long first = b[0], torn = 0;
    for (std::size_t k = 1; k < b.size(); ++k)
        if (b[k] != b[k - 1]) ++torn;
    if (first != static_cast<unsigned char>(seen) && first != static_cast<unsigned char>(seen + 1))
        r.wrong("the block shows round " + std::to_string(first) + " after " + std::to_string(seen) + " rounds");
    if (torn > 1) r.wrong("the block holds more than one partly written round");
    expect_count(r, server, base, "after the block's user ended");
}

ROW("server MemoryBlock (user)", Ending::ret, block_row);
ROW("server MemoryBlock (user)", Ending::segv, block_row);
ROW("server MemoryBlock (user)", Ending::sigkill, block_row);

// ---------------------------------------------------------------- proxies in flight in a Queue

constexpr int queued = 20;
constexpr int queued_for_consumer = 300;

/// Creates `queued` objects, puts their proxies on the queue, drops its own
/// copies and ends: the tickets in the queue keep the objects alive.
long producer_child(int ending, mp::ServerClient server, mp::Queue<mp::Proxy<Tally>> q) {
    for (int i = 0; i < queued; ++i) q.put(server.create<Tally>(i));
    end_child(static_cast<Ending>(ending));
    return queued;
}

void producer_row(Round& r) {
    const Ending e = r.ending();
    mp::ServerProcess server(server_options());
    const std::size_t base = server.object_count();
    mp::Queue<mp::Proxy<Tally>> q;
    mp::Process p(r.context(), producer_child, static_cast<int>(e), server.client(), q);
    p.start();
    STRESS_KILL_ON_EXIT(p);
    long got = 0;
    std::vector<bool> seen(queued, false);
    for (int i = 0; i < queued; ++i) {
        try {
            auto t = q.get(guard);
            long v = t.call<&Tally::get>();
            if (v < 0 || v >= queued || seen[static_cast<std::size_t>(v)]) {
                r.duplicated(1);
                continue;
            }
            if (v != i) r.reordered(1);
            seen[static_cast<std::size_t>(v)] = true;
            ++got;
        } catch (const mp::Empty&) {
            break;
        } catch (const std::exception& err) {
            r.wrong(std::string("a proxy whose producer ended: ") + err.what());
        }
    }
    r.lost(queued - got);
    check_ending(r, p, e, static_cast<long>(queued), "the producer");
    expect_count(r, server, base, "after every queued proxy was used and dropped");
}

ROW("server proxy in a Queue (producer)", Ending::ret, producer_row);
ROW("server proxy in a Queue (producer)", Ending::exit_n, producer_row);
ROW("server proxy in a Queue (producer)", Ending::segv, producer_row);

/// Takes proxies and calls each until killed.
long consumer_child(mp::Queue<mp::Proxy<Tally>> q, mp::RawValue<long> progress) {
    for (long i = 0;; ++i) {
        auto t = q.get();
        t.call<&Tally::add>(1000);
        progress.set(i + 1);
    }
}

void consumer_row(Round& r) {
    mp::ServerProcess server(server_options());
    const std::size_t base = server.object_count();
    mp::Queue<mp::Proxy<Tally>> q;
    for (int i = 0; i < queued_for_consumer; ++i) q.put(server.create<Tally>(i));  // our copies go at once
    mp::RawValue<long> progress(0);
    mp::Process p(r.context(), consumer_child, q, progress);
    p.start();
    STRESS_KILL_ON_EXIT(p);
    if (!await([&] { return progress.get() > 0; })) return r.hang("the consumer never took a proxy");
    r.random_pause(3000);
    p.kill();
    check_ending(r, p, Ending::sigkill, 0L, "the consumer");
    const long consumed = progress.get();
    long drained = 0;
    for (;;) {
        std::optional<mp::Proxy<Tally>> t;
        try {
            t = q.try_get(milliseconds(0));
        } catch (const std::exception& err) {  // decoding adopts the proxy: its object must be there
            r.wrong("decoding a queued proxy after its consumer (" + std::to_string(consumed) +
                    " used) was killed: " + err.what());
            ++drained;
            continue;
        }
        if (!t) break;
        try {
            long v = t->call<&Tally::get>();
            if (v >= 1000) r.duplicated(1);  // the consumer used it already
            ++drained;
        } catch (const std::exception& err) {
            r.wrong(std::string("a queued proxy after its consumer was killed: ") + err.what());
        }
    }
    const long missing = queued_for_consumer - consumed - drained;
    r.allow_lost(1);  // the one the consumer had taken (or used) when killed
    r.lost(missing);
    // An item taken and not decoded keeps its object (its ticket is never
    // used): at most `missing` objects stay until the server shuts down.
    // The server sees the consumer's connection end a moment after the kill.
    const std::size_t bound = base + static_cast<std::size_t>(missing < 0 ? 0 : missing);
    std::size_t now = 0;
    if (!await([&] { return (now = server.object_count()) <= bound; }))
        r.wrong("the server holds " + std::to_string(now - base) + " objects after the queue was drained (" +
                std::to_string(consumed) + " used by the consumer, " + std::to_string(drained) + " drained, context " +
                r.context().name() + ")");
}

ROW("server proxy in a Queue (consumer)", Ending::sigkill, consumer_row);

}  // namespace
}  // namespace stress
