// Process defects of issue 8, each as the issue describes it, under every
// context where one applies: shared objects returned by a child, SIGCHLD
// ignored or reaped by someone else, many handles in the arguments, forged
// child markers, grandchildren's log records, library locks across fork, and
// how a child ends after reporting.
//
// On Windows (tools/windows_ci.sh) the cases about SIGCHLD and SIGSTOP are
// marked forktest::posix_only and the fork-only one forktest::fork_only
// (excluded and counted there); the forged markers are tried with
// CreateProcessW, the children counted with a Toolhelp snapshot.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(_WIN32)
#include "win32_api.hpp"
#include <tlhelp32.h>
#else
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
extern char** environ;
#endif

#include "fork_helpers.hpp"  // forktest::posix_only, fork_only, self_pid, killed
#include "mpservice.hpp"

namespace mp = mpservice;

using namespace std::chrono_literals;

// Fork-context children of this threaded program start threads of their own.
extern "C" const char* __tsan_default_options() { return "die_after_fork=0"; }

namespace {

// A value whose codec attaches a descriptor that is not open: its message
// cannot be sent (EBADF), whoever sends it.
struct ClosedHandle {
    int tag = 0;
};
constexpr int kNeverOpen = 999999;  // above any descriptor limit used here (Windows: no handle of ours)

}  // namespace

template <>
struct mpservice::Codec<ClosedHandle> {
    static void encode(Encoder& e, const ClosedHandle& c) {
        e.write(e.attach(kNeverOpen));
        e.write(c.tag);
    }
    static ClosedHandle decode(Decoder& d) {
        (void)d.read<std::uint32_t>();
        return ClosedHandle{d.read<int>()};
    }
};

namespace {

#define CONTEXTS mp::SpawnContext, mp::ForkServerContext, mp::ForkContext

template <class E, class F>
std::string what_of(F&& f) {
    try {
        f();
    } catch (const E& e) {
        return e.what();
    }
    return "<no exception>";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// ---------------------------------------------------------------- 1: a child returns a shared object

mp::Lock make_lock() { return mp::Lock(); }
mp::Value<long> make_value() { return mp::Value<long>(41); }
mp::Event make_set_event() {
    mp::Event e;
    e.set();
    return e;
}
mp::Queue<int> make_queue_with_7() {
    mp::Queue<int> q;
    q.put(7);
    return q;
}
struct Holder {
    mp::Lock lock;
    mp::Value<long> value{0};
    int n = 0;
    template <class Archive>
    void serialize(Archive& ar) {
        ar(lock, value, n);
    }
};
Holder make_holder() {
    Holder h;
    h.value.set(5);
    h.n = 3;
    return h;
}
bool try_lock_in_child(mp::Lock l) {
    bool got = l.try_lock();
    if (got) l.release();
    return got;
}
long increment(mp::Value<long> v) {
    std::lock_guard<mp::RLock> g(v.get_lock());
    return ++v.get_obj();
}
ClosedHandle return_unsendable() { return ClosedHandle{1}; }

template <class Ctx, class F>
auto child_result(F f) {
    mp::Process p(Ctx{}, f);
    p.start();
    auto v = p.result(60s);
    CHECK(p.exitcode() == 0);
    return v;
}

TEST_CASE_TEMPLATE("issue 8.1: a child returns a Lock, Value, Event, Queue or a struct holding them; both sides use it",
                   Ctx, CONTEXTS) {
    SUBCASE("Lock: the parent holds it, another child finds it taken") {
        mp::Lock lock = child_result<Ctx>(make_lock);
        lock.acquire();
        mp::Process q(Ctx{}, try_lock_in_child, lock);
        q.start();
        CHECK_FALSE(q.result(60s));
        lock.release();
        mp::Process r(Ctx{}, try_lock_in_child, lock);
        r.start();
        CHECK(r.result(60s));
    }
    SUBCASE("Value: the child's 41, then another child's increment") {
        mp::Value<long> v = child_result<Ctx>(make_value);
        CHECK(v.get() == 41);
        mp::Process q(Ctx{}, increment, v);
        q.start();
        CHECK(q.result(60s) == 42);
        CHECK(v.get() == 42);
    }
    SUBCASE("Event: set in the child") {
        mp::Event e = child_result<Ctx>(make_set_event);
        CHECK(e.is_set());
        CHECK(e.wait(0ms));
    }
    SUBCASE("Queue: the item the child put") {
        mp::Queue<int> q = child_result<Ctx>(make_queue_with_7);
        CHECK(q.get(10s) == 7);
    }
    SUBCASE("a struct holding a Lock and a Value") {
        Holder h = child_result<Ctx>(make_holder);
        CHECK(h.n == 3);
        CHECK(h.value.get() == 5);
        mp::Process q(Ctx{}, increment, h.value);
        q.start();
        CHECK(q.result(60s) == 6);
        h.lock.acquire();
        mp::Process r(Ctx{}, try_lock_in_child, h.lock);
        r.start();
        CHECK_FALSE(r.result(60s));
        h.lock.release();
    }
}

TEST_CASE_TEMPLATE("issue 8.1: a result that cannot be sent is reported, not swallowed", Ctx, CONTEXTS) {
    mp::Process p(Ctx{}, return_unsendable);
    p.start();
    std::string what = what_of<mp::Error>([&] { p.result(60s); });
    INFO(what);
    CHECK(contains(what, "could not deliver its result"));
    CHECK(contains(what, std::to_string(kNeverOpen)));
    CHECK(p.exitcode() == 1);
}


// ---------------------------------------------------------------- 2: SIGCHLD ignored, or reaped by someone else

int add(int a, int b) { return a + b; }
int exit_with(int n) { std::exit(n); }
int sleep_then(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
}

#if !defined(_WIN32)
void reap_everything(int) {
    int saved = errno;
    while (::waitpid(-1, nullptr, WNOHANG) > 0) {
    }
    errno = saved;
}

/// Sets SIGCHLD's disposition for the scope.
class SigchldAs {
public:
    explicit SigchldAs(void (*handler)(int)) {
        struct sigaction sa {};
        sa.sa_handler = handler;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESTART;
        ::sigaction(SIGCHLD, &sa, &old_);
    }
    ~SigchldAs() { ::sigaction(SIGCHLD, &old_, nullptr); }

private:
    struct sigaction old_ {};
};

/// CPU time (user + system) this process used so far.
std::chrono::microseconds cpu_time() {
    rusage u{};
    ::getrusage(RUSAGE_SELF, &u);
    return std::chrono::seconds(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
           std::chrono::microseconds(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}
#else
// Windows has no SIGCHLD: the cases below are posix_only (excluded there);
// these let them compile unchanged.
void reap_everything(int) {}
struct SigchldAs {
    explicit SigchldAs(void (*)(int)) {}
};
#ifndef SIGCHLD
#define SIGCHLD 0
#endif
#ifndef SIGKILL
#define SIGKILL 9
#endif
std::chrono::microseconds cpu_time() { return {}; }
#endif

/// Whether `p` resolves within the hang guard (its outcome stays to be looked at).
template <class P>
bool ends(P& p) {
    try {
        (void)p.exception(30s);
    } catch (const mp::TimeoutError&) {
        return false;
    }
    return true;
}

/// Every kind of ending resolves; `stolen` says whether the exit status of a
/// direct child (spawn, fork) may have gone elsewhere.
template <class Ctx>
void every_ending_resolves(bool always_stolen) {
    const bool direct = Ctx{}.start_method() != mp::StartMethod::forkserver;
    {
        mp::Process p(Ctx{}, add, 2, 3);
        p.start();
        REQUIRE(ends(p));
        CHECK(p.result() == 5);
        CHECK(p.exitcode() == 0);  // announced in END, the code it then exits with
    }
    {
        mp::Process p(Ctx{}, exit_with, 3);
        p.start();
        REQUIRE(ends(p));
        std::string what = what_of<mp::ProcessError>([&] { p.join(); });
        INFO(what);
        // exit(n) in the target announces n on the way out (END), so the code
        // is known even when the kernel's exit status went elsewhere.
        CHECK(contains(what, "exited with code 3"));
        CHECK(p.exitcode() == 3);
        (void)direct;
        (void)always_stolen;
    }
    {
        mp::Process p(Ctx{}, sleep_then, 60000);
        p.start();
        p.kill();
        REQUIRE(ends(p));
        CHECK(p.exitcode() == -SIGKILL);
        CHECK(contains(what_of<mp::ProcessError>([&] { p.join(); }), "SIGKILL"));
    }
    {
        mp::Process p(Ctx{}, sleep_then, 60000);
        p.start();
        p.terminate();
        REQUIRE(ends(p));
        p.join();  // quiet after terminate()
        CHECK(p.exitcode() == -SIGTERM);
    }
    // Nothing is left spinning: the reactor sleeps once every child resolved.
    auto cpu0 = cpu_time();
    auto wall0 = std::chrono::steady_clock::now();
    std::this_thread::sleep_for(500ms);
    auto cpu = cpu_time() - cpu0;
    auto wall = std::chrono::steady_clock::now() - wall0;
    CHECK(cpu < wall / 4);
}

TEST_CASE_TEMPLATE("issue 8.2: with SIGCHLD ignored every ending resolves and the reactor does not spin" *
                       forktest::posix_only,
                   Ctx, CONTEXTS) {
    SigchldAs ignored(SIG_IGN);
    every_ending_resolves<Ctx>(true);
}

TEST_CASE_TEMPLATE("issue 8.2: with a SIGCHLD handler reaping waitpid(-1) every ending resolves" *
                       forktest::posix_only,
                   Ctx, CONTEXTS) {
    SigchldAs reaper(reap_everything);
    every_ending_resolves<Ctx>(false);
}

/// A child that itself ignores SIGCHLD and starts children of every context.
int nested_with_sigchld_ignored() {
#if !defined(_WIN32)
    ::signal(SIGCHLD, SIG_IGN);
#endif
    int sum = 0;
    mp::Process a(mp::SpawnContext{}, add, 1, 2);
    mp::Process b(mp::ForkContext{}, add, 3, 4);
    mp::Process c(mp::ForkServerContext{}, add, 5, 6);
    a.start();
    b.start();
    c.start();
    sum += a.result(30s) + b.result(30s) + c.result(30s);
    mp::Process d(mp::SpawnContext{}, exit_with, 4);
    d.start();
    if (!ends(d) || d.exitcode() != 4) return -1;  // its status went nowhere, but exit(4) announced 4
    return sum;
}

TEST_CASE_TEMPLATE("issue 8.2: a child that ignores SIGCHLD still sees its own children end" * forktest::posix_only, Ctx,
                   CONTEXTS) {
    mp::Process p(Ctx{}, nested_with_sigchld_ignored);
    p.start();
    CHECK(p.result(120s) == 21);
}

// ---------------------------------------------------------------- 9: many handles in the arguments

int count_free_locks(std::vector<mp::Lock> locks) {
    int n = 0;
    for (auto& l : locks) {
        if (l.try_lock()) {
            ++n;
            l.release();
        }
    }
    return n;
}
long number_values(std::vector<mp::Value<long>> values) {
    long sum = 0;
    for (std::size_t i = 0; i < values.size(); ++i) {
        values[i].set(static_cast<long>(i));
        sum += static_cast<long>(i);
    }
    return sum;
}
int take_unsendable(ClosedHandle c) { return c.tag; }

/// This process's direct children (running or zombie).
#if defined(_WIN32)
int count_children() {
    int n = 0;
    const DWORD self = GetCurrentProcessId();
    HANDLE snap = CreateToolhelp32Snapshot(TH32CS_SNAPPROCESS, 0);
    REQUIRE(snap != INVALID_HANDLE_VALUE);
    PROCESSENTRY32W e{};
    e.dwSize = sizeof e;
    for (BOOL more = Process32FirstW(snap, &e); more; more = Process32NextW(snap, &e))
        if (e.th32ParentProcessID == self && e.th32ProcessID != self) ++n;
    CloseHandle(snap);
    return n;
}
#else
int count_children() {
    int n = 0;
    long self = ::getpid();
    DIR* d = ::opendir("/proc");
    while (dirent* e = ::readdir(d)) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        std::ifstream f(std::string("/proc/") + e->d_name + "/stat");
        std::string line;
        std::getline(f, line);
        auto close = line.rfind(')');
        if (close == std::string::npos) continue;
        char state = 0;
        long ppid = 0;
        if (std::sscanf(line.c_str() + close + 2, "%c %ld", &state, &ppid) == 2 && ppid == self) ++n;
    }
    ::closedir(d);
    return n;
}
#endif

/// What the system says of a handle that is not open.
#if defined(_WIN32)
constexpr const char* kNotOpenText = "handle";  // "The handle is invalid."
#else
constexpr const char* kNotOpenText = "Bad file descriptor";
#endif

TEST_CASE_TEMPLATE("issue 8.9: 1000 Locks and 1000 Values as arguments arrive, the same objects", Ctx, CONTEXTS) {
    std::vector<mp::Lock> locks(1000);
    locks[10].acquire();
    locks[999].acquire();
    mp::Process p(Ctx{}, count_free_locks, locks);
    p.start();
    CHECK(p.result(120s) == 998);
    locks[10].release();
    locks[999].release();

    std::vector<mp::Value<long>> values;
    for (int i = 0; i < 1000; ++i) values.emplace_back(-1);
    mp::Process q(Ctx{}, number_values, values);
    q.start();
    CHECK(q.result(120s) == 999L * 1000 / 2);
    for (std::size_t i = 0; i < values.size(); ++i) CHECK(values[i].get() == static_cast<long>(i));
}

TEST_CASE_TEMPLATE("issue 8.9: a start() that fails leaves no child behind and can be destroyed", Ctx,
                   mp::SpawnContext, mp::ForkServerContext) {
    int before = count_children();
    {
        mp::Process p(Ctx{}, take_unsendable, ClosedHandle{2});
        std::string what = what_of<std::system_error>([&] { p.start(); });
        INFO(what);
        CHECK(contains(what, kNotOpenText));
        CHECK(p.pid() == 0);
        CHECK_FALSE(p.is_alive());
    }  // ~Process must not wait for anything
    // A killed child is reaped by start() itself (spawn); a fork-server worker,
    // if one was made, by the server.
    CHECK(count_children() == before);
}


// ---------------------------------------------------------------- 10: forged child markers

struct Ran {
    int code = -1000;  // exit code, -N after signal N
    std::string err;   // what it wrote on stderr
};

/// Runs this test binary with `args` (argv[1]...) and `inherit` kept open in it,
/// from a process whose pid is in `*parent_pid` (this one, or a forked
/// intermediate when `via_intermediate`).  Collects its exit code and stderr.
/// On Windows the marker names a handle in the parent's table (the child
/// duplicates it from there): nothing is inherited, and there is no forked
/// intermediate.
#if defined(_WIN32)
Ran run_self(std::vector<std::string> args, std::intptr_t, bool via_intermediate,
             const std::function<void(std::vector<std::string>&, long parent)>& fill = {}) {
    REQUIRE_FALSE(via_intermediate);
    if (fill) fill(args, static_cast<long>(GetCurrentProcessId()));
    wchar_t exe[MAX_PATH];
    REQUIRE(GetModuleFileNameW(nullptr, exe, MAX_PATH) > 0);
    std::wstring line = L"\"" + std::wstring(exe) + L"\"";
    for (auto& a : args) line += L" \"" + std::wstring(a.begin(), a.end()) + L"\"";  // (ASCII arguments)
    SECURITY_ATTRIBUTES inheritable{sizeof(SECURITY_ATTRIBUTES), nullptr, TRUE};
    HANDLE err_read = nullptr, err_write = nullptr;
    REQUIRE(CreatePipe(&err_read, &err_write, &inheritable, 1 << 16));
    SetHandleInformation(err_read, HANDLE_FLAG_INHERIT, 0);
    STARTUPINFOW si{};
    si.cb = sizeof si;
    si.dwFlags = STARTF_USESTDHANDLES;
    si.hStdInput = GetStdHandle(STD_INPUT_HANDLE);
    si.hStdOutput = err_write;
    si.hStdError = err_write;
    PROCESS_INFORMATION pi{};
    const BOOL started = CreateProcessW(exe, &line[0], nullptr, nullptr, TRUE, 0, nullptr, nullptr, &si, &pi);
    CloseHandle(err_write);
    Ran ran;
    if (started) {
        std::string text;  // read while it runs: it could fill the pipe
        char buf[4096];
        DWORD n = 0;
        while (ReadFile(err_read, buf, sizeof buf, &n, nullptr) && n > 0) text.append(buf, n);
        WaitForSingleObject(pi.hProcess, 60000);
        DWORD code = 0;
        GetExitCodeProcess(pi.hProcess, &code);
        ran.code = static_cast<int>(code);
        for (char c : text)
            if (c != '\r') ran.err += c;
        CloseHandle(pi.hThread);
        CloseHandle(pi.hProcess);
    } else {
        ran.code = -2000;
    }
    CloseHandle(err_read);
    return ran;
}

/// A handle of this process that names no channel (Windows: an event object).
struct NotAChannel {
    HANDLE h = CreateEventW(nullptr, TRUE, FALSE, nullptr);
    ~NotAChannel() { CloseHandle(h); }
    std::intptr_t value() const { return reinterpret_cast<std::intptr_t>(h); }
};
/// The two ends of a channel the parent made, as the marker names them.
struct ParentsChannel {
    mp::Connection<int> mine, theirs;
    ParentsChannel() { std::tie(mine, theirs) = mp::Pipe<int>(); }
    std::intptr_t value() const { return 1; }  // never read: the marker is refused before
};
#else
Ran run_self(std::vector<std::string> args, int inherit, bool via_intermediate,
             const std::function<void(std::vector<std::string>&, long parent)>& fill = {}) {
    int errpipe[2];
    REQUIRE(::pipe2(errpipe, O_CLOEXEC) == 0);
    auto launch = [&](long parent) -> pid_t {
        if (fill) fill(args, parent);
        std::vector<char*> argv;
        std::string exe = "/proc/self/exe";
        argv.push_back(exe.data());
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, errpipe[1], 2);
        if (inherit >= 0) posix_spawn_file_actions_adddup2(&fa, inherit, inherit);  // clears close-on-exec
        pid_t pid = -1;
        int rc = ::posix_spawn(&pid, "/proc/self/exe", &fa, nullptr, argv.data(), environ);
        posix_spawn_file_actions_destroy(&fa);
        return rc == 0 ? pid : -1;
    };
    auto wait_code = [](pid_t pid) {
        int status = 0;
        if (pid < 0 || ::waitpid(pid, &status, 0) != pid) return -2000;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    };
    Ran ran;
    if (!via_intermediate) {
        ran.code = wait_code(launch(::getpid()));
    } else {
        std::fflush(nullptr);
        pid_t mid = ::fork();
        if (mid == 0) {
            int code = wait_code(launch(::getpid()));
            ::_exit(code < 0 ? 200 : code);
        }
        ran.code = wait_code(mid);
    }
    ::close(errpipe[1]);
    char buf[4096];
    ssize_t n;
    while ((n = ::read(errpipe[0], buf, sizeof buf)) > 0) ran.err.append(buf, static_cast<std::size_t>(n));
    ::close(errpipe[0]);
    return ran;
}

/// A descriptor of this process that is no channel.
struct NotAChannel {
    int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    ~NotAChannel() { ::close(fd); }
    int value() const { return fd; }
};
/// A channel (a socket pair) of this process; the marker names the second end.
struct ParentsChannel {
    int sv[2] = {-1, -1};
    ParentsChannel() { REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0); }
    ~ParentsChannel() { ::close(sv[0]), ::close(sv[1]); }
    int value() const { return sv[1]; }
};
#endif

std::string marker(long fd, long parent) {
    return "--mpservice-child=" + std::to_string(fd) + ":" + std::to_string(parent);
}

TEST_CASE("issue 8.10: a forged or misplaced child marker is refused with a message and exit code 77") {
    ParentsChannel channel;
    const std::string no_tests = "--test-case=no such test";  // if main() ran, doctest would exit 0

    SUBCASE("the marker anywhere but argv[1]") {
        Ran r = run_self({no_tests, ""}, channel.value(), false,
                         [&](std::vector<std::string>& a, long parent) { a[1] = marker(channel.value(), parent); });
        INFO(r.err);
        CHECK(r.code == 77);
        CHECK(contains(r.err, "only as the first argument"));
    }
    SUBCASE("a descriptor that is not a channel") {
        NotAChannel other;
        Ran r = run_self({""}, other.value(), false,
                         [&](std::vector<std::string>& a, long parent) { a[0] = marker(other.value(), parent); });
        INFO(r.err);
        CHECK(r.code == 77);
        CHECK(contains(r.err, "not a local stream channel"));
    }
    SUBCASE("a parent that is not the parent") {
        // A live process that is not the program's parent: a sibling.
        mp::Process sibling(sleep_then, 60000);
        sibling.start();
        Ran r = run_self({marker(channel.value(), sibling.pid())}, channel.value(), false);
        sibling.kill();
        INFO(r.err);
        CHECK(r.code == 77);
        CHECK(contains(r.err, "as the parent"));
        CHECK_THROWS_AS(sibling.join(), mp::ProcessError);
    }
    SUBCASE("a malformed marker") {
        Ran r = run_self({"--mpservice-child=3x:1"}, -1, false);
        INFO(r.err);
        CHECK(r.code == 77);
        CHECK(contains(r.err, "malformed"));
    }
}

// Windows has no forked intermediate to make the channel; and there the
// marker's handle is duplicated from the named parent's own table, so a
// channel of another process cannot be named at all.
TEST_CASE("issue 8.10: a channel made by another process than the parent is refused" * forktest::posix_only) {
    ParentsChannel channel;
    // The socket pair is ours; the program's parent is a forked intermediate.
    Ran r = run_self({""}, channel.value(), true,
                     [&](std::vector<std::string>& a, long parent) { a[0] = marker(channel.value(), parent); });
    INFO(r.err);
    CHECK(r.code == 77);
    CHECK(contains(r.err, "not by the parent"));
}


// ---------------------------------------------------------------- 8: descendants' log records

/// Logs at debug level in this process and, `depth` levels further down, in
/// descendants started with the same context; returns the pids, this one first.
template <class Ctx>
std::vector<long> log_down(int depth) {
    mp::get_logger("descendant").debug("debug from depth " + std::to_string(depth));
    std::vector<long> pids{forktest::self_pid()};
    if (depth > 0) {
        mp::Process p(Ctx{}, log_down<Ctx>, depth - 1);
        p.start();
        for (long pid : p.result(60s)) pids.push_back(pid);
    }
    return pids;
}

struct SeenRecord {
    mp::LogRecord record;
    std::string line;
};

TEST_CASE_TEMPLATE("issue 8.8: records of every descendant go through the top parent's level, format and handler", Ctx,
                   CONTEXTS) {
    // Each forked descendant has a reactor thread when it forks the next.
    if (forktest::skip_fork_of_threaded_parent(Ctx{}.start_method() == mp::StartMethod::fork)) return;
    std::mutex m;
    std::vector<SeenRecord> seen;
    mp::set_log_level(mp::Level::debug);
    mp::set_log_format("<{level}|{process}|{pid}> {message}");
    mp::set_log_handler([&](const mp::LogRecord& r, const std::string& line) {
        std::lock_guard<std::mutex> lk(m);
        seen.push_back({r, line});
    });
    std::vector<long> pids;
    {
        mp::Process p(Ctx{}, log_down<Ctx>, 2);  // child, grandchild, great-grandchild
        p.start();
        pids = p.result(120s);
    }
    mp::set_log_handler({});
    mp::set_log_format("[{time}] [{level}] [{process}:{pid}] {logger}: {message}");
    mp::set_log_level(mp::Level::info);

    REQUIRE(pids.size() == 3);
    std::lock_guard<std::mutex> lk(m);
    for (int depth = 2; depth >= 0; --depth) {
        long pid = pids[static_cast<std::size_t>(2 - depth)];
        const SeenRecord* found = nullptr;
        for (const auto& s : seen)
            if (s.record.message == "debug from depth " + std::to_string(depth)) found = &s;
        CAPTURE(depth);
        REQUIRE(found);
        CHECK(found->record.pid == pid);
        CHECK(found->record.level == mp::Level::debug);
        // The originator's name: "Process-N", "Process-N:M", "Process-N:M:K".
        CHECK(std::count(found->record.process_name.begin(), found->record.process_name.end(), ':') == 2 - depth);
        CHECK(found->line == "<DEBUG|" + found->record.process_name + "|" + std::to_string(pid) + "> debug from depth " +
                                 std::to_string(depth));
    }
}


// ---------------------------------------------------------------- 12: library locks across fork

int throw_here(int i) {
    (void)mp::get_log_level("child");  // takes logging's (recursive) lock, copied from a threaded parent
    throw std::runtime_error("thrown in forked child " + std::to_string(i));
}

// An exception another thread of the parent threw: its throw site is not in
// the child's own record, so sending it looks in the sites the library keeps
// across threads - under a lock the churning threads take all the time.
std::exception_ptr g_thrown_by_another_thread;
int rethrow_from_another_thread(int) { std::rethrow_exception(g_thrown_by_another_thread); }

TEST_CASE("issue 8.12: fork children never deadlock on a lock another parent thread held (symbolizer, registry)" *
          forktest::fork_only) {
    if (forktest::skip_fork_of_threaded_parent()) return;  // the churning threads allocate all the time
    // Two threads encode exceptions in a loop - the exception registry's lock
    // and the symbolizer's locks are taken and released all the time - while
    // children are forked that throw, so that they symbolize too.
    std::atomic<bool> stop{false};
    // The exception is thrown once per thread, not in the loop: a thread that
    // unwinds at the instant of fork holds glibc's loader lock (the unwinder's
    // dl_iterate_phdr), which a forked child that throws then waits for - a
    // hazard of fork() in threaded programs that no library can reset (README:
    // the fork context is unsafe with threads).  Encoding the caught exception
    // again and again takes the library's own locks (registry, symbolizer).
    auto churn = [&] {
        std::exception_ptr caught;
        try {
            throw std::logic_error("churn");
        } catch (...) {
            caught = std::current_exception();
        }
        while (!stop.load()) {
            mp::set_log_level("churn", mp::Level::debug);  // logging's lock, all the time too
            mp::Encoder e;
            mp::detail::encode_exception(e, caught);
            // Looks in the kept sites, under their lock (read only: keeping
            // more sites here would push the other thread's out of the 16 kept).
            mp::Encoder kept;
            mp::detail::encode_exception(kept, g_thrown_by_another_thread);
        }
    };
    std::thread([] {
        try {
            throw std::runtime_error("thrown in forked child's parent, by another thread");
        } catch (...) {
            g_thrown_by_another_thread = std::current_exception();
            mp::detail::keep_throw_site(g_thrown_by_another_thread);
        }
    }).join();
    std::thread t1(churn), t2(churn);
    constexpr int kChildren = 80;
    std::vector<std::unique_ptr<mp::Process<int>>> children;
    for (int i = 0; i < kChildren; ++i) {
        children.push_back(
            std::make_unique<mp::Process<int>>(mp::ForkContext{}, i % 2 ? rethrow_from_another_thread : throw_here, i));
        children.back()->start();
    }
    // A child is stuck when it has not answered 60 s after the one before it
    // did: a machine-wide overload (80 children symbolizing at once beside
    // another suite) slows every child but keeps them answering; a child that
    // waits on a lock copied held never answers.
    const auto started = std::chrono::steady_clock::now();
    auto last_progress = started;
    int stuck = 0, threw = 0, kept_site_shown = 0;
    for (auto& c : children) {
        auto left = last_progress + 60s - std::chrono::steady_clock::now();
        try {
            c->result(left > 0s ? std::chrono::duration_cast<std::chrono::milliseconds>(left) : 0ms);
        } catch (const mp::TimeoutError&) {
            // Stuck (a lock copied held) or starved (a machine-wide overload):
            // the log says which, for the first few.
            if (++stuck <= 3) MESSAGE("not done 60 s after the child before it: " << forktest::describe_stuck_process(c->pid()));
            c->kill();
            continue;
        } catch (const std::runtime_error& e) {
            threw += contains(e.what(), "thrown in forked child") ? 1 : 0;
            // The other thread's throw site, found among the kept ones.
            if (contains(e.what(), "by another thread") && contains(mp::remote_traceback(e), "thrown at"))
                ++kept_site_shown;
        }
        last_progress = std::chrono::steady_clock::now();
    }
    if (stuck > 0)
        MESSAGE("the children that answered did so within "
                << std::chrono::duration_cast<std::chrono::milliseconds>(last_progress - started).count() << " ms");
    stop = true;
    t1.join();
    t2.join();
    mp::set_log_level("churn", mp::Level::notset);
    g_thrown_by_another_thread = nullptr;
    CHECK(stuck == 0);
    CHECK(threw == kChildren);
    if (mp::detail::os::throw_hook_active()) CHECK(kept_site_shown == kChildren / 2);
}


/// A child's work that allocates in many size classes (the parent's other
/// thread allocates in the same ones).
int fill_strings(int n) {
    std::vector<std::string> v;
    for (int i = 0; i < n; ++i) v.push_back(std::string(static_cast<std::size_t>(40 + i % 200), 'x'));
    return static_cast<int>(v.size());
}

TEST_CASE("issue 8.12: fork children of a parent whose other thread allocates without pause all finish" *
          forktest::fork_only) {
    // A fork copies the allocator's locks as they are: glibc's malloc takes
    // them around fork(), and so does the library for AddressSanitizer's
    // allocator before LLVM 18 (os_posix.cpp), which does not.  Without that,
    // under clang 14's ASan, one of the first few children hung in operator new.
    if (forktest::skip_fork_of_threaded_parent()) return;
    std::atomic<bool> stop{false};
    std::thread churn([&] {
        std::vector<std::string> keep(64);
        for (unsigned i = 0; !stop.load(std::memory_order_relaxed); ++i)
            keep[i % 64] = std::string(16 + (i * 37) % 3000, 'y');  // small and large size classes
    });
    constexpr int kRounds = 10, kPerRound = 6;
    int finished = 0, stuck = 0;
    for (int round = 0; round < kRounds; ++round) {
        std::vector<std::unique_ptr<mp::Process<int>>> children;
        for (int k = 0; k < kPerRound; ++k) {
            children.push_back(std::make_unique<mp::Process<int>>(mp::ForkContext{}, fill_strings, 500));
            children.back()->start();
        }
        for (auto& c : children) {
            try {
                finished += c->result(60s) == 500 ? 1 : 0;
            } catch (const mp::TimeoutError&) {
                if (++stuck <= 3) MESSAGE("not done after 60 s: " << forktest::describe_stuck_process(c->pid()));
                c->kill();
            }
        }
    }
    stop = true;
    churn.join();
    CHECK(stuck == 0);
    CHECK(finished == kRounds * kPerRound);
}


// ---------------------------------------------------------------- 13b: how a child ends after reporting

bool g_crash_in_static_destructor = false;
struct CrashesAtExitIfAsked {
    ~CrashesAtExitIfAsked() {
        if (!g_crash_in_static_destructor) return;
        std::signal(SIGSEGV, SIG_DFL);
        std::raise(SIGSEGV);
    }
} g_crashes_at_exit_if_asked;

int value_then_crash_in_teardown() {
    g_crash_in_static_destructor = true;  // only in this child
    return 42;
}

long set_later(mp::Value<long> v, long x) {
    std::this_thread::sleep_for(300ms);  // still running when its parent's target returns
    v.set(x);
    return x;
}
/// Starts a grandchild and returns without waiting for it (the Process is never destroyed).
int leave_a_child_running(mp::Value<long> v) {
    auto* p = new mp::Process(mp::SpawnContext{}, set_later, v, 7L);
    p->start();
    return 1;
}

TEST_CASE_TEMPLATE("issue 8.13b: every context ends a child the same way once it has reported", Ctx, CONTEXTS) {
    SUBCASE("a value, then a crash in a static destructor: the value and exit code 0") {
        mp::Process p(Ctx{}, value_then_crash_in_teardown);
        p.start();
        CHECK(p.result(60s) == 42);
        CHECK(p.exitcode() == 0);  // static destructors do not run after the report
    }
    SUBCASE("children it left running are waited for before it reports, as at a normal exit") {
        mp::Value<long> v(0);
        mp::Process p(Ctx{}, leave_a_child_running, v);
        p.start();
        CHECK(p.result(60s) == 1);
        CHECK(v.get() == 7);
        CHECK(p.exitcode() == 0);
    }
}


// ---------------------------------------------------------------- 13a, process side: start() ends whatever the fork server does

TEST_CASE("issue 8.13: a stopped fork server makes start() fail in bounded time; the next start gets a new server" *
          forktest::posix_only) {
    long server = mp::detail::test_fork_server_pid();
    REQUIRE(server > 0);
    REQUIRE(forktest::stop_process(server));
    mp::detail::test_set_fork_server_timeout(500ms);
    {
        mp::Process p(mp::ForkServerContext{}, add, 1, 2);
        std::string what = what_of<mp::Error>([&] { p.start(); });
        INFO(what);
        CHECK(contains(what, "did not start a worker in time"));
        CHECK_FALSE(p.is_alive());
    }
    mp::detail::test_set_fork_server_timeout(30000ms);
    CHECK_FALSE(mp::detail::os::pid_alive(server));  // killed and reaped
    long replacement = 0;
    {
        mp::Process p(mp::ForkServerContext{}, add, 1, 2);
        p.start();
        CHECK(p.result(60s) == 3);
        replacement = mp::detail::test_fork_server_pid();
    }
    CHECK(replacement > 0);
    CHECK(replacement != server);
}

}  // namespace
