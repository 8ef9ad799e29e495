// Warm spawn: a spawn start that takes the child exec'd ahead of demand -
// used and replaced, stale environment or directory refused, the build check
// kept, gone with its parent, nothing leaked, SIGCHLD ignored or reaped.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <string>
#include <vector>
#include <thread>

#if !defined(_WIN32)
#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#include "fork_helpers.hpp"  // forktest::fork_only, posix_only, self_pid, kill_process (POSIX and Windows)

#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// The fork-context helper below spawns from a forked child of this threaded
// program (documented as the caller's concern).
extern "C" const char* __tsan_default_options() { return "die_after_fork=0"; }

namespace {

// ---------------------------------------------------------------- targets

int add(int a, int b) { return a + b; }
long parent_pid_seen() {
    auto p = mp::parent_process();
    return p ? p->pid : -1;
}
std::string name_seen() { return mp::current_process().name; }
std::string env_seen(std::string name) {
    const char* v = std::getenv(name.c_str());
    return v ? v : "<unset>";
}
std::string cwd_seen() {
#if !defined(_WIN32)
    char buf[4096];
    return ::getcwd(buf, sizeof buf) ? buf : "<unknown>";
#else
    return mp::detail::os::current_directory();
#endif
}

// setenv/unsetenv/chdir, and the root directory to go to.
#if !defined(_WIN32)
void set_env(const char* name, const char* value) { ::setenv(name, value, 1); }
void unset_env(const char* name) { ::unsetenv(name); }
bool change_dir(const std::string& path) { return ::chdir(path.c_str()) == 0; }
const std::string root_dir = "/";
#else  // _putenv_s changes the C runtime's copy and the process's environment block
void set_env(const char* name, const char* value) { ::_putenv_s(name, value); }
void unset_env(const char* name) { ::_putenv_s(name, ""); }
bool change_dir(const std::string& path) { return mp::detail::os::change_directory(path); }
const std::string root_dir = "C:\\";
#endif
void say_line() {
    std::printf("warm line\n");
    std::fflush(stdout);
}
int throws_range(int x) { throw std::out_of_range("warm " + std::to_string(x)); }
void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

/// Lines of /proc/self/fdinfo naming process `pid` (a pidfd of it).
#if !defined(_WIN32)
int pidfds_of(long pid) {
    int n = 0;
    DIR* d = opendir("/proc/self/fdinfo");
    while (dirent* e = readdir(d)) {
        if (e->d_name[0] == '.') continue;
        std::ifstream f(std::string("/proc/self/fdinfo/") + e->d_name);
        std::string line;
        while (std::getline(f, line))
            if (line == "Pid:\t" + std::to_string(pid)) ++n;
    }
    closedir(d);
    return n;
}
#else
int pidfds_of(long) { return 0; }  // (a fork_only case)
#endif

/// In a helper process: makes a warm child, reports its pid, then waits to be killed.
int warm_helper(mp::detail::SharedMemory mem) {
    {
        mp::Process first(mp::SpawnContext{}, add, 1, 2);
        first.set_warm_start(true);  // cold (none is waiting yet); asks for a warm child
        first.start();
        if (first.result() != 3) return 1;
    }
    long warm = mp::detail::test_warm_child(20s);
    static_cast<std::atomic<long>*>(mem.data())->store(warm);
    sleep_ms(30000);
    return 0;
}

// ---------------------------------------------------------------- helpers (parent side)

// Where a warm child has an address-space holder (os_posix.cpp,
// hold_address_space_past_exit: Linux on x86-64 or AArch64, not under a sanitizer).
#if defined(__linux__) && (defined(__x86_64__) || defined(__aarch64__))
#define MPSERVICE_TEST_HOLDERS 1
#endif
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#undef MPSERVICE_TEST_HOLDERS
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer) || __has_feature(memory_sanitizer)
#undef MPSERVICE_TEST_HOLDERS
#endif
#endif
#ifndef MPSERVICE_TEST_HOLDERS
#define MPSERVICE_TEST_HOLDERS 0
#endif

#if defined(_WIN32)
// Windows: a process is gone once it stopped running (no zombies); descriptors
// are the process's handles.
bool process_gone(long pid) { return !mp::detail::os::process_running(pid); }
int count_fds() { return static_cast<int>(mp::detail::os::open_handle_count()); }
int count_zombie_children() { return 0; }
int count_children() { return 0; }  // (not counted here)
int holders_of(long) { return 0; }
// What the parent holds for a waiting warm child: its channel, the read and
// write ends of its exit notice, its process handle and the section that
// carried its channel.
constexpr int warm_child_handles = 5;
// Handles the system's thread pool may keep from the starts (its wait and
// worker threads' objects, under Wine): a leak per start would show 60.
constexpr int pool_slack = 3;
#else
bool process_gone(long pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    if (!f) return true;
    std::string line;
    std::getline(f, line);
    auto close = line.rfind(')');
    if (close == std::string::npos || close + 2 >= line.size()) return true;
    char state = line[close + 2];
    return state == 'Z' || state == 'X';
}

// What the parent holds for a waiting warm child: its channel and its pidfd.
constexpr int warm_child_handles = 2;
constexpr int pool_slack = 0;

int count_fds() {
    int n = 0;
    DIR* d = opendir("/proc/self/fd");
    while (dirent* e = readdir(d))
        if (e->d_name[0] != '.') ++n;
    closedir(d);
    return n;
}

/// This process's children whose state is in `states` ("" = any).
int count_children_in(const char* states) {
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
        if (std::sscanf(line.c_str() + close + 2, "%c %ld", &state, &ppid) == 2 && ppid == self &&
            (!*states || std::strchr(states, state)))
            ++n;
    }
    closedir(d);
    return n;
}
int count_zombie_children() { return count_children_in("Z"); }
int count_children() { return count_children_in(""); }

std::string maps_of(long pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/maps");
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}
/// Children of ours other than `pid` that share its address space (its
/// address-space holder, os::hold_address_space_past_exit).
std::vector<long> holder_pids_of(long pid) {
    const std::string maps = maps_of(pid);
    std::vector<long> out;
    long self = getpid();
    DIR* d = opendir("/proc");
    while (dirent* e = readdir(d)) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        long other = std::atol(e->d_name);
        if (other == pid) continue;
        std::ifstream f(std::string("/proc/") + e->d_name + "/stat");
        std::string line;
        std::getline(f, line);
        auto close = line.rfind(')');
        long ppid = 0;
        char state = 0;
        if (close == std::string::npos || std::sscanf(line.c_str() + close + 2, "%c %ld", &state, &ppid) != 2) continue;
        if (ppid == self && !maps.empty() && maps_of(other) == maps) out.push_back(other);
    }
    closedir(d);
    return out;
}
int holders_of(long pid) { return static_cast<int>(holder_pids_of(pid).size()); }
#endif

/// A spawned Process that takes the warm child if there is a current one.
template <class... A>
auto warm_process(A&&... a) {
    mp::Process p(mp::SpawnContext{}, std::forward<A>(a)...);
    p.set_warm_start(true);
    return p;
}

/// The pid of a ready warm child made with the present environment and
/// directory: the next warm start takes it.  (One made while an earlier test
/// had changed either would be refused.)  A warm start that used the waiting
/// child has its replacement made afterwards, from what holds now.
long ready_warm_child() {
    for (int i = 0; i < 5; ++i) {
        long waiting = mp::detail::test_warm_child(20s);
        auto p = warm_process(add, 0, 0);
        p.start();
        p.join();
        if (waiting && p.pid() == waiting) break;
    }
    return mp::detail::test_warm_child(20s);
}

/// Waits (bounded) until `pred` holds.
template <class Pred>
bool eventually(Pred pred, std::chrono::seconds guard = 20s) {
    auto until = Clock::now() + guard;
    while (!pred()) {
        if (Clock::now() > until) return false;
        sleep_ms(2);
    }
    return true;
}

#if !defined(_WIN32)
void reap_everything(int) {
    int saved = errno;
    while (::waitpid(-1, nullptr, WNOHANG) > 0) {
    }
    errno = saved;
}

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
#else  // (the SIGCHLD case is posix_only)
void reap_everything(int) {}
struct SigchldAs {
    explicit SigchldAs(void (*)(int)) {}
};
#endif

}  // namespace

// ---------------------------------------------------------------- tests

TEST_CASE("warm spawn: a start takes the waiting child, and a new one is made") {
    long w1 = ready_warm_child();
    REQUIRE(w1 > 0);
    CHECK_FALSE(process_gone(w1));
    {
        auto p = warm_process(parent_pid_seen);
        p.set_name("warm-one");
        p.start();
        CHECK(p.pid() == w1);
        CHECK(p.result() == forktest::self_pid());
        CHECK(p.exitcode() == 0);
    }
    long w2 = mp::detail::test_warm_child(20s);
    REQUIRE(w2 > 0);
    CHECK(w2 != w1);
    {  // it runs the task it is given, under the name it is given
        auto p = warm_process(name_seen);
        p.set_name("warm-two");
        p.start();
        CHECK(p.pid() == w2);
        CHECK(p.result() == "warm-two");
    }
    {  // an exception comes back typed, as from a cold child
        long w3 = mp::detail::test_warm_child(20s);
        auto p = warm_process(throws_range, 7);
        p.start();
        CHECK(p.pid() == w3);
        CHECK_THROWS_AS(p.join(), std::out_of_range);
        CHECK(p.exitcode() == 1);
    }
    {  // a start that did not ask for it leaves it waiting
        long w4 = mp::detail::test_warm_child(20s);
        mp::Process p(mp::SpawnContext{}, add, 2, 3);
        p.set_warm_start(false);
        p.start();
        CHECK(p.pid() != w4);
        CHECK(p.result() == 5);
        CHECK(mp::detail::test_warm_child(0ms) == w4);
    }
    {
        auto p = warm_process(add, 1, 1);
        p.start();
        CHECK_THROWS_AS(p.set_warm_start(false), mp::InvalidStateError);
        p.join();
    }
}

TEST_CASE("warm spawn: a child made before a setenv or chdir is not used") {
    long w1 = ready_warm_child();
    REQUIRE(w1 > 0);
    set_env("MPSERVICE_WARM_PROBE", "after");
    {
        auto p = warm_process(env_seen, std::string("MPSERVICE_WARM_PROBE"));
        p.start();
        CHECK(p.pid() != w1);  // its environment is stale: a fresh spawn instead
        CHECK(p.result() == "after");
    }
    CHECK(eventually([&] { return process_gone(w1); }));  // discarded, and reaped
    long w2 = mp::detail::test_warm_child(20s);            // made with the new environment
    REQUIRE(w2 > 0);
    {
        auto p = warm_process(env_seen, std::string("MPSERVICE_WARM_PROBE"));
        p.start();
        CHECK(p.pid() == w2);
        CHECK(p.result() == "after");
    }
    unset_env("MPSERVICE_WARM_PROBE");

    long w3 = mp::detail::test_warm_child(20s);
    REQUIRE(w3 > 0);
    const std::string before = cwd_seen();
    REQUIRE(change_dir(root_dir));
    {
        auto p = warm_process(cwd_seen);
        p.start();
        CHECK(p.pid() != w3);
        CHECK(p.result() == root_dir);
    }
    REQUIRE(change_dir(before));
    {
        auto p = warm_process(env_seen, std::string("MPSERVICE_WARM_PROBE"));
        p.start();
        CHECK(p.result() == "<unset>");
    }
    CHECK(eventually([] { return count_zombie_children() == 0; }));
}

TEST_CASE("warm spawn: a warm child of a different build is refused") {
    long w = ready_warm_child();
    REQUIRE(w > 0);
    mp::detail::test_corrupt_next_fingerprint();
    auto p = warm_process(add, 1, 2);
    p.start();
    CHECK(p.pid() == w);
    try {
        p.result();
        FAIL("no error");
    } catch (const std::runtime_error& e) {
        CHECK(std::string(e.what()).find("different build") != std::string::npos);
    }
    CHECK(p.exitcode() == 1);
}

TEST_CASE_TEMPLATE("warm spawn: the warm child dies with its parent's SIGKILL", Ctx, mp::ForkContext,
                   mp::SpawnContext) {
    auto mem = mp::detail::SharedMemory::create(64);
    auto* reported = static_cast<std::atomic<long>*>(mem.data());
    mp::Process helper(Ctx{}, warm_helper, mem);
    helper.start();
    REQUIRE(eventually([&] { return reported->load() != 0; }));
    long warm = reported->load();
    REQUIRE(warm > 0);
    CHECK_FALSE(process_gone(warm));
    helper.kill();
    CHECK_THROWS_AS(helper.join(), mp::ProcessError);
    auto t0 = Clock::now();
    CHECK(eventually([&] { return process_gone(warm); }));
    CHECK(Clock::now() - t0 < 1s);
}

TEST_CASE("warm spawn: no descriptor or zombie growth after many warm starts") {
    REQUIRE(ready_warm_child() > 0);
    // The counts are taken once the holders of earlier tests' children have
    // gone (on a loaded machine, at idle priority, that can take a while).
    REQUIRE(eventually([] { return mp::detail::test_unreaped_holders() == 0; }));
    const int fds = count_fds();  // the spawner's wake-up event and the waiting child's two
    // The waiting child, and on Linux its address-space holder (a child of
    // ours too, os::hold_address_space_past_exit): each start's holder must
    // be reaped after its child ends, and the waiting one's when it is discarded.
    const int children = count_children();
    CAPTURE(children);
    for (int i = 0; i < 60; ++i) {
        // Every third start waits for a ready child; the others may find one
        // still being made, or none (cold): every path runs.
        if (i % 3 == 0) REQUIRE(mp::detail::test_warm_child(20s) > 0);
        auto p = warm_process(add, i, 1);
        p.start();
        REQUIRE(p.result() == i + 1);
    }
    REQUIRE(mp::detail::test_warm_child(20s) > 0);
    // (The last child's handles go once the reactor has reaped it.)
    CAPTURE(fds);
    CAPTURE(count_fds());  // (evaluated when a failure is reported)
    CHECK(eventually([] { return mp::detail::test_unreaped_holders() == 0; }));
    CHECK(eventually([&] { return count_fds() >= fds && count_fds() <= fds + pool_slack; }));
    CHECK(eventually([] { return count_zombie_children() == 0; }));
    CHECK(eventually([&] { return count_children() == children; }));
    CHECK(mp::active_children().empty());

    long w = mp::detail::test_warm_child(0ms);
    const int before = count_fds();
    CAPTURE(before);
    const int its_holders = holders_of(w);
    CAPTURE(its_holders);
#if MPSERVICE_TEST_HOLDERS
    CHECK(its_holders == 1);  // what makes a warm child's exit quick
#endif
    mp::set_warm_spawn(false);  // discards the waiting child
    CHECK(eventually([&] { return process_gone(w); }));
    // What the parent held for the waiting child is closed once it is gone.
    CHECK(eventually([&] {
        const int n = count_fds();
        return n <= before - warm_child_handles && n >= before - warm_child_handles - pool_slack;
    }));
    CHECK(eventually([] { return count_zombie_children() == 0; }));
    if (children > 0)  // (children are counted where zombies can be: not on Windows)
        CHECK(eventually([&] { return count_children() == children - 1 - its_holders; }));  // its holder too
    CHECK(mp::detail::test_warm_child(0ms) == 0);
}

#if MPSERVICE_TEST_HOLDERS
int exec_sleep() {
    ::execl("/bin/sleep", "sleep", "30", static_cast<char*>(nullptr));
    return -1;  // (no /bin/sleep)
}

TEST_CASE("warm spawn: the address-space holder of a child that exec()s goes") {
    long w = ready_warm_child();
    REQUIRE(w > 0);
    std::vector<long> holders = holder_pids_of(w);
    REQUIRE(holders.size() == 1);
    auto p = warm_process(exec_sleep);
    p.start();
    CHECK(p.pid() == w);
    // The held address space is no one's once the child has exec()d.
    CHECK(eventually([&] { return process_gone(holders[0]); }));
    CHECK(p.is_alive());
    p.terminate();
    p.join();
    CHECK(p.exitcode() == -SIGTERM);
    CHECK(eventually([] { return count_zombie_children() == 0; }));
}
#endif

TEST_CASE("warm spawn: a fork child does not keep the warm child's descriptors" * forktest::fork_only) {
    long w = ready_warm_child();
    REQUIRE(w > 0);
    REQUIRE(pidfds_of(w) == 1);  // ours
    mp::Process p(mp::ForkContext{}, pidfds_of, w);
    p.start();
    CHECK(p.result() == 0);
    CHECK(mp::detail::test_warm_child(0ms) == w);  // still waiting, for us
}

TEST_CASE("warm spawn: with SIGCHLD ignored or reaped by the program" * forktest::posix_only) {
    for (void (*handler)(int) : {SIG_IGN, &reap_everything}) {
        CAPTURE(handler == SIG_IGN);
        long w = ready_warm_child();
        REQUIRE(w > 0);
        SigchldAs as(handler);
        {
            auto p = warm_process(add, 20, 22);
            p.start();
            CHECK(p.pid() == w);
            CHECK(p.result() == 42);
            CHECK(p.exitcode() == 0);  // announced in END when the status went elsewhere
        }
        // A warm child that dies unused is noticed and replaced.
        long w2 = mp::detail::test_warm_child(20s);
        REQUIRE(w2 > 0);
        REQUIRE(forktest::kill_process(w2));
        CHECK(eventually([&] {
            long now = mp::detail::test_warm_child(0ms);
            return now != 0 && now != w2;
        }));
        CHECK(eventually([&] { return process_gone(w2); }));
        {
            auto p = warm_process(add, 1, 1);
            p.start();
            CHECK(p.result() == 2);
        }
    }
    REQUIRE(mp::detail::test_warm_child(20s) > 0);
    CHECK(eventually([] { return count_zombie_children() == 0; }));
}

TEST_CASE("warm spawn: a warm child's output is forwarded when that start asks for it") {
    std::mutex m;
    std::vector<std::string> lines;
    mp::set_log_handler([&](const mp::LogRecord& r, const std::string&) {
        std::lock_guard<std::mutex> g(m);
        if (r.logger == "stdout") lines.push_back(r.message);
    });
    long w = ready_warm_child();
    REQUIRE(w > 0);
    {
        auto p = warm_process(say_line);
        p.set_forward_output(true);  // the pipes travel with BOOT, as for any spawned child
        p.start();
        CHECK(p.pid() == w);
        p.join();
    }
    mp::set_log_handler(nullptr);
    std::lock_guard<std::mutex> g(m);
    CHECK(lines == std::vector<std::string>{"warm line"});
}
