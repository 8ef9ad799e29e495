// What a newcomer reaches for first (issue 9): arguments that convert to the
// target's parameter types, results moved out, typed waits, the default start
// method, remote exceptions caught as RemoteError or nested, and fork-server
// children that see the parent's present working directory and environment.
#include <doctest/doctest.h>

#include <cstdlib>
#include <functional>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(_WIN32)
#include <unistd.h>
#endif

#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;

// Fork-context children of this threaded test program start threads of their own.
extern "C" const char* __tsan_default_options() { return "die_after_fork=0"; }

namespace newcomer {

// ---------------------------------------------------------------- targets

std::string greet(std::string who) { return "hello " + who; }
double half(double x) { return x / 2; }
std::size_t length_of(const std::string& s) { return s.size(); }
std::string joined(const std::vector<std::string>& parts, std::string sep) {
    std::string out;
    for (std::size_t i = 0; i < parts.size(); ++i) out += (i ? sep : "") + parts[i];
    return out;
}
long widen(long long a, short b) { return static_cast<long>(a + b); }
struct Shapes {
    static double area(double w, double h) { return w * h; }
};
int plus_one(int x) { return x + 1; }

/// 50 MB, every byte set from its position.
std::vector<unsigned char> big_block(std::size_t n) {
    std::vector<unsigned char> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<unsigned char>(i * 7 + 3);
    return v;
}
constexpr std::size_t k50MB = 50u << 20;

/// Counts the copies made of it in this process.
struct Counted {
    static int copies;
    std::vector<int> data;
    Counted() = default;
    explicit Counted(std::vector<int> d) : data(std::move(d)) {}
    Counted(const Counted& o) : data(o.data) { ++copies; }
    Counted(Counted&&) noexcept = default;
    Counted& operator=(const Counted& o) {
        data = o.data;
        ++copies;
        return *this;
    }
    Counted& operator=(Counted&&) noexcept = default;
    template <class Archive>
    void serialize(Archive& ar) {
        ar(data);
    }
};
int Counted::copies = 0;
Counted make_counted(int n) { return Counted(std::vector<int>(static_cast<std::size_t>(n), 5)); }

/// Returns `x` after `gate` is set.
int after_gate(mp::Event gate, int x) {
    if (!gate.wait(std::chrono::seconds(60))) throw std::runtime_error("the gate never opened");
    return x;
}

int g_marker = 0;  // set by the parent after init(): only a fork child sees the new value
int marker() { return g_marker; }
std::string child_start_method() { return mp::get_start_method(true); }

struct NewcomerError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

int throw_nested_standard() {
    try {
        throw std::invalid_argument("inner problem");
    } catch (...) {
        std::throw_with_nested(std::runtime_error("outer problem"));
    }
}
int throw_nested_user() {
    try {
        throw std::out_of_range("index 9");
    } catch (...) {
        std::throw_with_nested(NewcomerError("lookup failed"));
    }
}
int throw_plain(int x) { throw std::domain_error("plain " + std::to_string(x)); }

/// C of A -> B -> C throws; B re-raises through result(); A receives both parts.
int chain_c(int x) { throw std::invalid_argument("C failed with " + std::to_string(x)); }
int chain_b(int x) {
    mp::Process c(mp::SpawnContext{}, chain_c, x);
    c.start();
    return c.result();
}
/// B passes C's nested exception on by re-raising it; A still unwraps it.
int nested_b() {
    mp::Process c(mp::SpawnContext{}, throw_nested_standard);
    c.start();
    return c.result();
}

/// A child whose target runs a Thread that throws, then re-raises it through result().
int thread_thrower(int x) { throw std::length_error("thread failed with " + std::to_string(x)); }
int via_thread(int x) {
    mp::Thread t(thread_thrower, x);
    t.start();
    return t.result();
}

// The working directory and the environment, on each platform; two directories to go to.
#if !defined(_WIN32)
std::string cwd_now() {
    char buf[4096];
    return ::getcwd(buf, sizeof buf) ? buf : "?";
}
bool change_dir(const std::string& path) { return ::chdir(path.c_str()) == 0; }
void set_env(const char* name, const char* value) { ::setenv(name, value, 1); }
void unset_env(const char* name) { ::unsetenv(name); }
const std::string root_dir = "/", other_dir = "/tmp";
#else  // _putenv_s changes the C runtime's copy and the process's environment block
std::string cwd_now() { return mp::detail::os::current_directory(); }
bool change_dir(const std::string& path) { return mp::detail::os::change_directory(path); }
void set_env(const char* name, const char* value) { ::_putenv_s(name, value); }
void unset_env(const char* name) { ::_putenv_s(name, ""); }
const std::string root_dir = "C:\\", other_dir = "C:\\windows";
#endif

std::string where_am_i() {
    const char* v = std::getenv("MPSERVICE_NEWCOMER_VAR");
    const char* gone = std::getenv("MPSERVICE_NEWCOMER_GONE");
    return cwd_now() + "|" + (v ? v : "(unset)") + "|" + (gone ? gone : "(unset)");
}

}  // namespace newcomer

MPSERVICE_REGISTER_EXCEPTION(newcomer::NewcomerError);

using namespace newcomer;

#define CONTEXTS mp::SpawnContext, mp::ForkServerContext, mp::ForkContext

// ---------------------------------------------------------------- 1. arguments convert

TEST_CASE_TEMPLATE("arguments convert to the parameter types, as std::thread converts them", Ctx, CONTEXTS) {
    mp::Process literal(Ctx{}, greet, "world");  // const char* -> std::string
    mp::Process widened(Ctx{}, half, 3);         // int -> double
    std::string s = "abcd";
    mp::Process by_cref(Ctx{}, length_of, s);                 // std::string for const std::string&
    mp::Process literal_cref(Ctx{}, length_of, "xyz");        // a literal for const std::string&
    mp::Process several(Ctx{}, joined, std::vector<std::string>{"a", "b"}, "+");
    mp::Process narrow(Ctx{}, widen, 40, 2);                  // int -> long long, int -> short
    mp::Process member(Ctx{}, &Shapes::area, 2, 2.5f);
    mp::Process lambda(Ctx{}, [](std::string x, double y) { return x + std::to_string(static_cast<int>(y)); },
                       "n", 7);
    static_assert(std::is_same_v<decltype(literal), mp::Process<std::string>>);
    static_assert(std::is_same_v<decltype(by_cref), mp::Process<std::size_t>>);
    literal.start();
    widened.start();
    by_cref.start();
    literal_cref.start();
    several.start();
    narrow.start();
    member.start();
    lambda.start();
    CHECK(literal.result() == "hello world");
    CHECK(widened.result() == 1.5);
    CHECK(by_cref.result() == 4);
    CHECK(literal_cref.result() == 3);
    CHECK(several.result() == "a+b");
    CHECK(narrow.result() == 42);
    CHECK(member.result() == 5.0);
    CHECK(lambda.result() == "n7");
}

TEST_CASE("an argument is converted when the Process is made: later changes do not reach the child") {
    std::string s = "before";
    mp::Process p(greet, s);
    s = "after";
    p.start();
    CHECK(p.result() == "hello before");
}

TEST_CASE("a std::function runs under spawn when it holds a plain function; otherwise start() says why") {
    std::function<int(int)> plain = plus_one;
    mp::Process p(plain, 41);
    p.start();
    CHECK(p.result() == 42);

    int base = 100;
    std::function<int(int)> stateful = [base](int x) { return base + x; };
    mp::Process refused(mp::SpawnContext{}, stateful, 1);
    CHECK_THROWS_AS(refused.start(), std::invalid_argument);
    CHECK_THROWS_AS(refused.join(), mp::InvalidStateError);  // never started
#if !defined(_WIN32)  // (no fork on Windows)
    mp::Process forked(mp::ForkContext{}, stateful, 1);
    forked.start();
    CHECK(forked.result() == 101);
#endif
}

TEST_CASE("a context chosen at run time checks at start(): captures refused under spawn and forkserver") {
    int base = 7;
    auto add_base = [base](int x) { return base + x; };
#if !defined(_WIN32)
    for (const char* method : {"spawn", "forkserver"}) {
#else
    for (const char* method : {"spawn"}) {  // (no fork server and no fork on Windows)
#endif
        CAPTURE(method);
        mp::Process p(mp::get_context(method), add_base, 1);
        CHECK_THROWS_AS(p.start(), std::invalid_argument);
    }
#if !defined(_WIN32)
    mp::Process f(mp::get_context("fork"), add_base, 1);
    f.start();
    CHECK(f.result() == 8);
#endif
}

TEST_CASE("Thread: arguments are decayed copies, std::ref shares an object, a reference result is the object") {
    mp::Thread t(greet, "thread");
    t.start();
    CHECK(t.result() == "hello thread");

    int counter = 0;
    mp::Thread bump([](int& c, int by) { c += by; }, std::ref(counter), 5);
    bump.start();
    bump.join();
    CHECK(counter == 5);

    std::vector<int> owned{1, 2, 3};
    mp::Thread pick([](std::vector<int>& v) -> std::vector<int>& { return v; }, std::ref(owned));
    static_assert(std::is_same_v<decltype(pick), mp::Thread<std::vector<int>&>>);
    pick.start();
    CHECK(&pick.result() == &owned);  // as std::async: the very object
}

// ---------------------------------------------------------------- 3. results out without copies

TEST_CASE_TEMPLATE("a 50 MB result is moved out of a finished Process, not copied", Ctx, CONTEXTS) {
    mp::Process p(Ctx{}, big_block, k50MB);
    p.start();
    const unsigned char* kept = p.result().data();  // decoded once and kept
    std::vector<unsigned char> v = std::move(p).result();
    CHECK(v.data() == kept);  // the same buffer: moved
    REQUIRE(v.size() == k50MB);
    CHECK(v[12345] == static_cast<unsigned char>(12345 * 7 + 3));
    CHECK_THROWS_AS(p.result(), mp::InvalidStateError);  // gone, and it says so
    CHECK_THROWS_AS(p.take_result(), mp::InvalidStateError);
    CHECK_NOTHROW(p.join());
    CHECK_FALSE(p.exception());

    mp::Process q(Ctx{}, big_block, k50MB);
    q.start();
    std::vector<unsigned char> w = q.take_result(60s);  // straight out, never kept
    CHECK(w == v);
}

TEST_CASE("take_result makes no copy of the value: Process and Thread") {
    Counted::copies = 0;
    mp::Process p(make_counted, 1000);
    p.start();
    Counted a = p.take_result();
    CHECK(a.data.size() == 1000);
    mp::Thread t(make_counted, 2000);
    t.start();
    const Counted& kept = t.result();
    CHECK(kept.data.size() == 2000);
    Counted b = std::move(t).result();
    CHECK(b.data.size() == 2000);
    CHECK(Counted::copies == 0);
    Counted c = b;  // the counter does count
    CHECK(Counted::copies == 1);
    CHECK_THROWS_AS(t.result(), mp::InvalidStateError);
}

TEST_CASE("a failed worker's take_result re-throws, as result() does") {
    mp::Process p(throw_plain, 3);
    p.start();
    CHECK_THROWS_AS(p.take_result(), std::domain_error);
    CHECK_THROWS_AS(p.take_result(), std::domain_error);  // the error stays
    mp::Thread t(throw_plain, 4);
    t.start();
    CHECK_THROWS_AS(std::move(t).result(), std::domain_error);
}

// ---------------------------------------------------------------- 3. typed waits

TEST_CASE_TEMPLATE("as_completed over a vector of Process<int> yields Process<int>&, in finishing order", Ctx,
                   CONTEXTS) {
    mp::Event gate, open;
    open.set();
    std::vector<mp::Process<int>> ps;
    ps.emplace_back(Ctx{}, after_gate, gate, 10);  // cannot finish before the gate opens
    ps.emplace_back(Ctx{}, after_gate, open, 20);  // finishes at once
    for (auto& p : ps) p.start();
    std::vector<int> order;
    auto completed = mp::as_completed(ps, 120s);
    for (auto it = completed.begin(); it != completed.end(); ++it) {
        mp::Process<int>& p = *it;
        CHECK(&p == &ps[it.index()]);
        CHECK(p.done());
        order.push_back(p.result());  // no cast
        gate.set();                   // only now can the first one finish
    }
    CHECK(order == std::vector<int>{20, 10});
}

TEST_CASE("typed wait over threads gives Thread<std::string>*; mixed lists give positions") {
    std::vector<mp::Thread<std::string>> ts;
    ts.emplace_back(greet, "a");
    ts.emplace_back(greet, "b");
    for (auto& t : ts) t.start();
    auto [done, not_done] = mp::wait(ts, 60s);
    static_assert(std::is_same_v<decltype(done), std::vector<mp::Thread<std::string>*>>);
    REQUIRE(done.size() == 2);
    CHECK(not_done.empty());
    CHECK(done[0] == &ts[0]);
    CHECK(done[1]->result() == "hello b");

    // Pointers of one type in a vector work too.
    std::vector<mp::Thread<std::string>*> ptrs{&ts[1], &ts[0]};
    std::set<std::string> seen;
    for (mp::Thread<std::string>& t : mp::as_completed(ptrs)) seen.insert(t.result());
    CHECK(seen == std::set<std::string>{"hello a", "hello b"});

    mp::Process p(half, 9);
    mp::Thread t(greet, "x");
    p.start();
    t.start();
    mp::WorkerList mixed{&t, &p};
    int yielded = 0;
    for (mp::Completed c : mp::as_completed(mixed, 60s)) {
        CHECK(c.worker == mixed[c.index]);  // its position in the list
        if (c.index == 0) CHECK(t.result() == "hello x");
        if (c.index == 1) CHECK(p.result() == 4.5);
        ++yielded;
    }
    CHECK(yielded == 2);
}

// ---------------------------------------------------------------- 5. the default start method

/// Puts the default start method back to spawn at the end of a test, whatever happens.
struct SpawnAgain {
    ~SpawnAgain() {
        mp::set_start_method("spawn", true);
        g_marker = 0;
    }
};

TEST_CASE("set_start_method chooses the context of a Process without one; children inherit it") {
    SpawnAgain restore;
    CHECK(mp::get_all_start_methods() == std::vector<std::string>{"spawn", "fork", "forkserver"});
    std::string before = mp::get_start_method();  // fixes it (to spawn, unless set)
    CHECK(before == "spawn");
    CHECK_THROWS_AS(mp::set_start_method("fork"), mp::InvalidStateError);  // already fixed: force needed
    CHECK_THROWS_AS(mp::set_start_method("threads", true), std::invalid_argument);
    CHECK(mp::get_start_method() == "spawn");  // unchanged by the failures
    g_marker = 42;
    {
        mp::Process spawned(marker);
        spawned.start();
        CHECK(spawned.result() == 0);  // a fresh program
    }
    mp::set_start_method("fork", true);
    CHECK(mp::get_start_method() == "fork");
    CHECK(mp::default_context().start_method() == mp::StartMethod::fork);
    CHECK(mp::get_context().start_method() == mp::StartMethod::fork);  // as Python's get_context(None)
    CHECK(mp::get_context("spawn").start_method() == mp::StartMethod::spawn);
    {
        mp::Process forked(marker);
        forked.start();
        CHECK(forked.result() == 42);  // a copy of this process
        int base = 1;
        mp::Process captures(mp::default_context(), [base] { return base; });  // checked at start()
        captures.start();
        CHECK(captures.result() == 1);
        mp::Process inherits(mp::SpawnContext{}, child_start_method);
        inherits.start();
        CHECK(inherits.result() == "fork");
    }
    mp::set_start_method("", true);  // unchosen again, as Python's set_start_method(None, force=True)
    CHECK(mp::get_start_method(true).empty());
    mp::set_start_method("forkserver");  // no force needed now
    CHECK(mp::get_start_method(true) == "forkserver");
    {
        mp::Process served(marker);
        served.start();
        CHECK(served.result() == 0);  // forked from the server made at init()
        mp::Process inherits(mp::ForkServerContext{}, child_start_method);
        inherits.start();
        CHECK(inherits.result() == "forkserver");
    }
}

// ---------------------------------------------------------------- 7. remote exceptions

TEST_CASE("catch (const mp::RemoteError&) gives what(), remote_traceback and is_remote") {
    mp::Process p(throw_plain, 5);
    p.start();
    try {
        p.join();
        FAIL("no throw");
    } catch (const mp::RemoteError& e) {
        CHECK(std::string(e.what()) == "plain 5");
        CHECK(e.remote_type() == "std::domain_error");
        CHECK(mp::is_remote(e));
        std::string tb = mp::remote_traceback(e);
        CHECK(tb.find("std::domain_error: plain 5") != std::string::npos);
#if !defined(_WIN32)  // Windows (MinGW) tracebacks name no functions: module+offset (as for test_traceback, skip.txt)
        CHECK(tb.find("throw_plain") != std::string::npos);
#endif
    }
    std::exception_ptr ep = p.exception();
    CHECK(mp::is_remote(ep));
    CHECK(mp::remote_traceback(ep).find("plain 5") != std::string::npos);
    std::runtime_error local("here");
    CHECK_FALSE(mp::is_remote(local));
    CHECK(mp::remote_traceback(local).empty());
    CHECK_FALSE(mp::is_remote(std::make_exception_ptr(local)));
    CHECK_FALSE(mp::is_remote(std::exception_ptr()));
}

TEST_CASE_TEMPLATE("a nested exception from a child: rethrow_if_nested works, remote_type names the user's type", Ctx,
                   CONTEXTS) {
    mp::Process p(Ctx{}, throw_nested_standard);
    p.start();
    try {
        p.join();
        FAIL("no throw");
    } catch (const std::runtime_error& e) {
        CHECK(std::string(e.what()) == "outer problem");
        const auto* r = dynamic_cast<const mp::RemoteError*>(&e);
        REQUIRE(r);
        CHECK(r->remote_type() == "std::runtime_error");
        CHECK(mp::remote_traceback(e).find("_Nested_exception") == std::string::npos);
        try {
            std::rethrow_if_nested(e);
            FAIL("not nested");
        } catch (const std::invalid_argument& inner) {
            CHECK(std::string(inner.what()) == "inner problem");
            CHECK(mp::is_remote(inner));
        }
    }

    mp::Process q(Ctx{}, throw_nested_user);
    q.start();
    try {
        q.join();
        FAIL("no throw");
    } catch (const NewcomerError& e) {
        CHECK(std::string(e.what()) == "lookup failed");
        const auto* r = dynamic_cast<const mp::RemoteError*>(&e);
        REQUIRE(r);
        CHECK(r->remote_type() == "newcomer::NewcomerError");
        CHECK_THROWS_AS(std::rethrow_if_nested(e), std::out_of_range);
    }
}

TEST_CASE("a nested exception re-raised by a middle process can still be unwrapped") {
    mp::Process b(nested_b);
    b.start();
    try {
        b.join();
        FAIL("no throw");
    } catch (const std::runtime_error& e) {
        CHECK(dynamic_cast<const mp::RemoteError&>(e).remote_type() == "std::runtime_error");
        CHECK_THROWS_AS(std::rethrow_if_nested(e), std::invalid_argument);
    }
}

/// The frame lines ("    #3 function ...") of a traceback.
std::vector<std::string> frame_lines(const std::string& tb) {
    std::vector<std::string> out;
    std::size_t at = 0;
    while (at < tb.size()) {
        std::size_t end = tb.find('\n', at);
        if (end == std::string::npos) end = tb.size();
        std::string line = tb.substr(at, end - at);
        if (line.rfind("    #", 0) == 0) out.push_back(line);
        at = end + 1;
    }
    return out;
}

TEST_CASE_TEMPLATE("no part of a multi-process traceback shows the library's own frames", Ctx, CONTEXTS) {
    mp::Process b(Ctx{}, chain_b, 7);
    b.start();
    try {
        b.join();
        FAIL("no throw");
    } catch (const std::invalid_argument& e) {
        std::string tb = mp::remote_traceback(e);
        CAPTURE(tb);
#if !defined(_WIN32)  // Windows (MinGW) tracebacks name no functions: module+offset (as for test_traceback, skip.txt)
        CHECK(tb.find("chain_c") != std::string::npos);  // C's part
        CHECK(tb.find("chain_b") != std::string::npos);  // B's part
#endif
        CHECK(tb.find("The above exception was the direct cause") != std::string::npos);
        std::vector<std::string> frames = frame_lines(tb);
        CHECK(frames.size() >= 2);
        for (const std::string& f : frames) {
            CAPTURE(f);
            CHECK(f.find("mpservice::") == std::string::npos);
            CHECK(f.find("result_at") == std::string::npos);
            CHECK(f.find("std::rethrow_exception") == std::string::npos);
        }
    }
}

TEST_CASE("a traceback through a Thread in a child shows the user's frames only") {
    mp::Process p(via_thread, 3);
    p.start();
    try {
        p.join();
        FAIL("no throw");
    } catch (const std::length_error& e) {
        std::string tb = mp::remote_traceback(e);
        CAPTURE(tb);
#if !defined(_WIN32)  // Windows (MinGW) tracebacks name no functions: module+offset (as for test_traceback, skip.txt)
        CHECK(tb.find("thread_thrower") != std::string::npos);
#endif
        std::vector<std::string> frames = frame_lines(tb);
        CHECK_FALSE(frames.empty());
        for (const std::string& f : frames) {
            CAPTURE(f);
            CHECK(f.find("mpservice::") == std::string::npos);
        }
    }
}

// ---------------------------------------------------------------- 8. fork-server children see the present

/// Restores the working directory and two variables at the end of a test.
struct PresentGuard {
    std::string cwd = cwd_now();
    ~PresentGuard() {
        if (!change_dir(cwd)) std::abort();
        unset_env("MPSERVICE_NEWCOMER_VAR");
        unset_env("MPSERVICE_NEWCOMER_GONE");
    }
};

TEST_CASE_TEMPLATE("a child starts in the parent's working directory and environment of start() time", Ctx,
                   CONTEXTS) {
    PresentGuard guard;
    // Made (and the fork server made, at init) before these changes.
    REQUIRE(change_dir(other_dir));
    set_env("MPSERVICE_NEWCOMER_VAR", "first");
    mp::Process early(Ctx{}, where_am_i);  // made now, started later: start() time counts
    REQUIRE(change_dir(root_dir));
    const std::string root = cwd_now();
    set_env("MPSERVICE_NEWCOMER_VAR", "set after init");
    unset_env("MPSERVICE_NEWCOMER_GONE");
    early.start();
    CHECK(early.result() == root + "|set after init|(unset)");
    set_env("MPSERVICE_NEWCOMER_GONE", "back");
    REQUIRE(change_dir(other_dir));
    mp::Process late(Ctx{}, where_am_i);
    late.start();
    CHECK(late.result() == cwd_now() + "|set after init|back");
}
