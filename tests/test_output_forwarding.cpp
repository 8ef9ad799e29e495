// Output forwarding: a child's stdout/stderr lines come through the parent's
// log path, whole, tagged, none lost - under every context, with grandchildren,
// after a SIGKILL.  Timeouts here are hang guards only.
#include <doctest/doctest.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(_WIN32)
#include "win32_api.hpp"
#else
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

#include "fork_helpers.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;
using namespace std::chrono_literals;


extern "C" const char* __tsan_default_options() { return "die_after_fork=0"; }

namespace {

/// The line number `i` of child `k` on stream `stream`, `len` bytes long (no '\n').
std::string expected_line(int k, const char* stream, int i, int len) {
    std::string head = "child " + std::to_string(k) + " " + stream + " line " + std::to_string(i) + " ";
    std::string line = head;
    while (static_cast<int>(line.size()) < len) line += static_cast<char>('a' + (line.size() + k + i) % 26);
    return line;
}

// ---------------------------------------------------------------- targets (run in children)

/// Writes n lines of len bytes to stdout (through std::cout) and to stderr
/// (through stdio), alternating.
int write_lines(int k, int n, int len) {
    for (int i = 0; i < n; ++i) {
        std::cout << expected_line(k, "out", i, len) << '\n';
        std::fprintf(stderr, "%s\n", expected_line(k, "err", i, len).c_str());
    }
    std::cout.flush();
    return k;
}

void print_hello() { std::printf("hello from %s\n", mp::current_process().name.c_str()); }

/// Lines ended as Windows programs end them, and a '\r' that ends nothing.
void print_crlf() { std::printf("ended by CRLF\r\ncarriage\rreturn inside\n"); }

/// A last line without a newline.
void print_unterminated() { std::printf("no newline at the end"); }

/// Output of programs the child runs, on both streams (through the system's
/// shell: sh, or cmd.exe on Windows, whose echo ends its lines with "\r\n").
int run_grandchild() {
#if defined(_WIN32)
    return std::system("echo from the grandchild& echo grandchild error>&2");
#else
    return std::system("echo from the grandchild; echo grandchild error >&2");
#endif
}

/// Leaves a grandchild that writes after this child has ended: it prints what
/// it reads from `path` (a FIFO; on Windows a named pipe the parent serves).
int leave_late_writer(std::string path) {
#if defined(_WIN32)
    std::string cmd = "start /b cmd /c type " + path;
#else
    std::string cmd = "cat '" + path + "' &";
#endif
    return std::system(cmd.c_str());
}

/// Prints two lines, says so, then waits to be killed.
void print_then_hang(mp::Connection<int> c) {
    std::printf("before the kill 1\n");
    std::fprintf(stderr, "before the kill 2\n");
    c.send(1);
    std::this_thread::sleep_for(120s);
}

/// Collects forwarded records (logger stdout/stderr) in the parent.
class Collector {
public:
    Collector() {
        mp::set_log_level(mp::Level::info);
        mp::set_log_handler([this](const mp::LogRecord& r, const std::string& formatted) {
            std::lock_guard<std::mutex> lk(m_);
            records_.push_back(r);
            formatted_.push_back(formatted);
            cv_.notify_all();
        });
    }
    ~Collector() { mp::set_log_handler(nullptr); }
    std::vector<mp::LogRecord> records() {
        std::lock_guard<std::mutex> lk(m_);
        return records_;
    }
    std::vector<std::string> formatted() {
        std::lock_guard<std::mutex> lk(m_);
        return formatted_;
    }
    /// Waits (hang guard 30 s) for a record with this message.
    bool await_message(const std::string& message) {
        std::unique_lock<std::mutex> lk(m_);
        return cv_.wait_for(lk, 30s, [&] {
            for (auto& r : records_)
                if (r.message == message) return true;
            return false;
        });
    }

private:
    std::mutex m_;
    std::condition_variable cv_;
    std::vector<mp::LogRecord> records_;
    std::vector<std::string> formatted_;
};

/// The open descriptors (Windows: handles) of this process.
long count_fds() {
    mp::detail::test_reactor_barrier();  // the reactor releases a joined child's handle just after resolving it
    return mp::detail::os::open_handle_count();
}

/// The one writer of a FIFO the late grandchild reads (Windows: the server end
/// of a named pipe).  open_for_writing waits for the reader, as open(2) of a
/// FIFO for writing does.
class LateWriterPath {
public:
#if defined(_WIN32)
    LateWriterPath() : path_("\\\\.\\pipe\\mpservice-test-" + std::to_string(GetCurrentProcessId())) {
        pipe_ = CreateNamedPipeA(path_.c_str(), PIPE_ACCESS_OUTBOUND | FILE_FLAG_OVERLAPPED, PIPE_TYPE_BYTE | PIPE_WAIT,
                                 1, 4096, 4096, 0, nullptr);
        REQUIRE(pipe_ != INVALID_HANDLE_VALUE);
    }
    ~LateWriterPath() { CloseHandle(pipe_); }
    bool open_for_writing() {
        OVERLAPPED o{};
        o.hEvent = CreateEventW(nullptr, TRUE, FALSE, nullptr);
        bool met = ConnectNamedPipe(pipe_, &o) || GetLastError() == ERROR_PIPE_CONNECTED;
        if (!met && GetLastError() == ERROR_IO_PENDING) {
            DWORD unused = 0;
            met = WaitForSingleObject(o.hEvent, 60000) == WAIT_OBJECT_0 && GetOverlappedResult(pipe_, &o, &unused, FALSE);
            if (!met) CancelIo(pipe_);
        }
        CloseHandle(o.hEvent);
        return met;
    }
    bool write_and_close(const std::string& text) {
        OVERLAPPED o{};
        o.hEvent = CreateEventW(nullptr, TRUE, FALSE, nullptr);
        DWORD n = 0;
        bool ok = WriteFile(pipe_, text.data(), static_cast<DWORD>(text.size()), nullptr, &o) ||
                  GetLastError() == ERROR_IO_PENDING;
        ok = ok && GetOverlappedResult(pipe_, &o, &n, TRUE) && n == text.size();
        CloseHandle(o.hEvent);
        FlushFileBuffers(pipe_);
        DisconnectNamedPipe(pipe_);  // the reader sees the end
        return ok;
    }
#else
    LateWriterPath() : path_("/tmp/mpservice-test-fifo-" + std::to_string(getpid())) {
        ::unlink(path_.c_str());
        REQUIRE(::mkfifo(path_.c_str(), 0600) == 0);
    }
    ~LateWriterPath() {
        if (fd_ >= 0) ::close(fd_);
        ::unlink(path_.c_str());
    }
    bool open_for_writing() { return (fd_ = ::open(path_.c_str(), O_WRONLY)) >= 0; }  // meets the reader's open
    bool write_and_close(const std::string& text) {
        bool ok = ::write(fd_, text.data(), text.size()) == static_cast<ssize_t>(text.size());
        ::close(fd_);  // the reader prints, sees EOF, exits: the pipe ends
        fd_ = -1;
        return ok;
    }
#endif
    const std::string& path() const { return path_; }

private:
    std::string path_;
#if defined(_WIN32)
    HANDLE pipe_ = INVALID_HANDLE_VALUE;
#else
    int fd_ = -1;
#endif
};

template <class Ctx>
std::string ctx_name() {
    return Ctx{}.name();
}

}  // namespace

#define CONTEXTS mp::SpawnContext, mp::ForkServerContext, mp::ForkContext

TEST_CASE("forwarding is off by default, per process and program-wide") {
    Collector got;
    CHECK_FALSE(mp::output_forwarding());
    mp::Process p(print_hello);
    CHECK_FALSE(p.forward_output());
    p.set_forward_output(true);
    CHECK(p.forward_output());
    mp::set_output_forwarding(true);
    mp::Process q(print_hello);
    CHECK(q.forward_output());
    q.set_forward_output(false);  // the per-process choice wins
    CHECK_FALSE(q.forward_output());
    mp::set_output_forwarding(false);
    p.start();
    CHECK_THROWS_AS(p.set_forward_output(false), mp::InvalidStateError);
    p.join();
    REQUIRE(got.records().size() == 1);
    CHECK(got.records()[0].message == "hello from " + p.name());
}

TEST_CASE_TEMPLATE("4 children writing 10 KB lines at once: every line arrives whole, tagged, in order, none lost",
                   Ctx, CONTEXTS) {
    INFO(ctx_name<Ctx>());
    // The parent's forwarding threads allocate while the 4 children are forked.
    if (forktest::skip_fork_of_threaded_parent(Ctx{}.start_method() == mp::StartMethod::fork)) return;
    constexpr int children = 4, lines = 150, len = 10 * 1024;
    Collector got;
    std::vector<std::unique_ptr<mp::Process<int>>> ps;
    for (int k = 0; k < children; ++k) {
        ps.push_back(std::make_unique<mp::Process<int>>(Ctx{}, write_lines, k, lines, len));
        ps.back()->set_forward_output(true);
    }
    for (auto& p : ps) p->start();
    std::map<std::string, int> child_of_name;
    std::map<int, long> pid_of_child;
    for (int k = 0; k < children; ++k) {
        CHECK(ps[k]->result(120s) == k);  // join: every line of the child was handled by now
        child_of_name[ps[k]->name()] = k;
        pid_of_child[k] = ps[k]->pid();
    }
    auto records = got.records();
    CHECK(records.size() == static_cast<std::size_t>(children * lines * 2));
    // next[k][stream]: the line number expected next from child k on that stream.
    std::vector<std::map<std::string, int>> next(children);
    int whole = 0, wrong = 0;
    for (const auto& r : records) {
        auto it = child_of_name.find(r.process_name);
        if (it == child_of_name.end() || (r.logger != "stdout" && r.logger != "stderr")) {
            ++wrong;
            continue;
        }
        int k = it->second;
        const char* stream = r.logger == "stdout" ? "out" : "err";
        int i = next[k][stream]++;
        bool ok = r.message == expected_line(k, stream, i, len) && r.pid == pid_of_child[k] &&
                  r.level == (r.logger == "stdout" ? mp::Level::info : mp::Level::warning);
        (ok ? whole : wrong)++;
    }
    CHECK(whole == children * lines * 2);
    CHECK(wrong == 0);
    for (int k = 0; k < children; ++k) {
        CHECK(next[k]["out"] == lines);
        CHECK(next[k]["err"] == lines);
    }
}

TEST_CASE_TEMPLATE("a forwarded line goes through the parent's format, tagged with the child's name", Ctx, CONTEXTS) {
    Collector got;
    mp::set_output_forwarding(true);
    mp::Process p(Ctx{}, print_hello);
    mp::set_output_forwarding(false);
    p.set_name("greeter");
    p.start();
    p.join();
    auto formatted = got.formatted();
    REQUIRE(formatted.size() == 1);
    CHECK(formatted[0].find("[INFO] [greeter:" + std::to_string(p.pid()) + "] stdout: hello from greeter") !=
          std::string::npos);
}

TEST_CASE_TEMPLATE("a last line without a newline arrives before join returns", Ctx, CONTEXTS) {
    Collector got;
    mp::Process p(Ctx{}, print_unterminated);
    p.set_forward_output(true);
    p.start();
    p.join();
    auto records = got.records();
    REQUIRE(records.size() == 1);
    CHECK(records[0].message == "no newline at the end");
}

TEST_CASE_TEMPLATE("a \"\\r\\n\" ends a line as \"\\n\" does; a '\\r' elsewhere stays in the text", Ctx, CONTEXTS) {
    Collector got;
    mp::Process p(Ctx{}, print_crlf);
    p.set_forward_output(true);
    p.start();
    p.join();
    auto records = got.records();
    REQUIRE(records.size() == 2);
    CHECK(records[0].message == "ended by CRLF");
    CHECK(records[1].message == "carriage\rreturn inside");
}

TEST_CASE_TEMPLATE("programs the child runs write through the same pipes", Ctx, CONTEXTS) {
    Collector got;
    mp::Process p(Ctx{}, run_grandchild);
    p.set_forward_output(true);
    p.start();
    CHECK(p.result(60s) == 0);
    auto records = got.records();
    REQUIRE(records.size() == 2);
    for (auto& r : records) CHECK(r.process_name == p.name());
    bool out = false, err = false;
    for (auto& r : records) {
        out = out || (r.logger == "stdout" && r.message == "from the grandchild");
        err = err || (r.logger == "stderr" && r.message == "grandchild error");
    }
    CHECK(out);
    CHECK(err);
}

TEST_CASE("a grandchild writing after the child has ended is still forwarded, tagged with the child's name") {
    LateWriterPath fifo;
    Collector got;
    mp::Process p(leave_late_writer, fifo.path());
    p.set_forward_output(true);
    p.start();
    CHECK(p.result(60s) == 0);  // the child has ended; its grandchild (cat, type) waits on the FIFO
    REQUIRE(fifo.open_for_writing());
    CHECK(fifo.write_and_close("written after the child ended\n"));
    CHECK(got.await_message("written after the child ended"));
    for (auto& r : got.records())
        if (r.message == "written after the child ended") CHECK(r.process_name == p.name());
}

TEST_CASE_TEMPLATE("a SIGKILLed child: what it printed before arrives before join returns", Ctx, CONTEXTS) {
    Collector got;
    auto [mine, theirs] = mp::Pipe<int>();
    mp::Process p(Ctx{}, print_then_hang, theirs);
    p.set_forward_output(true);
    p.start();
    theirs.close();
    CHECK(mine.recv(60s) == 1);  // both lines were written before this was sent
    p.kill();
    CHECK_THROWS_AS(p.join(), mp::ProcessError);
    auto records = got.records();
    bool one = false, two = false;
    for (auto& r : records) {
        INFO(r.logger << ": " << r.message);
        one = one || (r.message == "before the kill 1" && r.logger == "stdout");
        two = two || (r.message == "before the kill 2" && r.logger == "stderr");
    }
    CHECK(one);
    CHECK(two);
}

TEST_CASE_TEMPLATE("no descriptor leak: 40 forwarding children one after another", Ctx, CONTEXTS) {
    Collector got;
    {  // the first start makes the reactor and the fork server: not counted
        mp::Process warm(Ctx{}, print_hello);
        warm.set_forward_output(true);
        warm.start();
        warm.join();
    }
    const long before = count_fds();
    for (int i = 0; i < 40; ++i) {
        mp::Process p(Ctx{}, print_hello);
        p.set_forward_output(true);
        p.start();
        p.join();
    }
    CHECK(std::labs(count_fds() - before) <= forktest::handle_slack);
    CHECK(got.records().size() == 41);
}
