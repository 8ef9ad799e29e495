// Logging: levels, format, handler, call-site capture, thread safety and the
// child-side forwarder (in-process; real children come with the process part).
#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <fcntl.h>
#include <unistd.h>
#else  // the library writes to the Win32 standard error handle: the tests swap that one
#include "win32_api.hpp"
#endif

#include "mpservice.hpp"

namespace mp = mpservice;

namespace {

/// Captures handled records; restores the default configuration afterwards.
struct Capture {
    std::mutex mu;
    std::vector<mp::LogRecord> records;
    std::vector<std::string> lines;

    Capture() {
        mp::set_log_handler([this](const mp::LogRecord& r, const std::string& formatted) {
            std::lock_guard<std::mutex> lock(mu);
            records.push_back(r);
            lines.push_back(formatted);
        });
    }
    ~Capture() {
        mp::set_log_handler({});
        mp::set_log_level(mp::Level::info);
        mp::set_log_level("a", mp::Level::notset);
        mp::set_log_format("[{time}] [{level}] [{process}:{pid}] {logger}: {message}");
        mp::detail::set_log_forwarder({});
        mp::detail::set_log_level_from_parent(mp::Level::notset);
    }
    std::size_t size() {
        std::lock_guard<std::mutex> lock(mu);
        return records.size();
    }
};

mp::LogRecord sample_record() {
    mp::LogRecord r;
    r.level = mp::Level::warning;
    r.logger = "net.http";
    r.message = "slow reply";
    r.file = "server.cpp";
    r.line = 321;
    r.function = "handle";
    r.time = std::chrono::system_clock::now();
    r.pid = 4242;
    r.process_name = "Process-3";
    return r;
}

}  // namespace

TEST_CASE("levels filter records; the default threshold is INFO") {
    Capture cap;
    auto log = mp::get_logger("worker");
    log.debug("hidden");
    log.info("shown");
    CHECK(cap.size() == 1);
    mp::set_log_level(mp::Level::error);
    log.info("hidden");
    log.warning("hidden");
    log.error("shown");
    log.critical("shown");
    log.log(mp::Level::critical, "shown");
    REQUIRE(cap.size() == 4);
    CHECK(cap.records[1].level == mp::Level::error);
    CHECK(cap.records[2].level == mp::Level::critical);
    CHECK_FALSE(log.is_enabled_for(mp::Level::warning));
    CHECK(log.is_enabled_for(mp::Level::error));
    CHECK(mp::level_name(mp::Level::warning) == "WARNING");
    CHECK(mp::level_name(mp::Level::notset) == "NOTSET");
}

TEST_CASE("per-logger levels apply to dotted descendants") {
    Capture cap;
    mp::set_log_level(mp::Level::warning);
    mp::set_log_level("a", mp::Level::debug);
    CHECK(mp::get_log_level("a.b.c") == mp::Level::debug);
    CHECK(mp::get_log_level("ab") == mp::Level::warning);
    CHECK(mp::get_log_level() == mp::Level::warning);
    // The lowest threshold anywhere is what children are told.
    CHECK(mp::detail::log_level() == mp::Level::debug);
    mp::get_logger("a.b").debug("shown");
    mp::get_logger("ab").info("hidden");
    mp::get_logger().info("hidden");
    REQUIRE(cap.size() == 1);
    CHECK(cap.records[0].logger == "a.b");
    mp::set_log_level("a", mp::Level::notset);
    CHECK(mp::detail::log_level() == mp::Level::warning);
}

TEST_CASE("the root logger is called root") {
    Capture cap;
    mp::get_logger().warning("w");
    mp::get_logger("root").warning("w");
    REQUIRE(cap.size() == 2);
    CHECK(cap.records[0].logger == "root");
    CHECK(cap.records[1].logger == "root");
}

TEST_CASE("a record carries the caller's source location, time, pid and process name") {
    Capture cap;
    auto before = std::chrono::system_clock::now();
    const char* function = __func__;
    int line = __LINE__ + 1;
    mp::get_logger("loc").warning("here");
    auto after = std::chrono::system_clock::now();
    REQUIRE(cap.size() == 1);
    const mp::LogRecord& r = cap.records[0];
    CHECK(r.line == line);
    CHECK(std::string(r.file).find("test_logging.cpp") != std::string::npos);
    CHECK(r.function == function);
    CHECK(r.message == "here");
    CHECK(r.pid == mp::detail::os::current_pid());
    CHECK(r.process_name == "MainProcess");
    CHECK(r.time >= before);
    CHECK(r.time <= after);
}

TEST_CASE("format placeholders, escapes and the default format") {
    Capture cap;
    mp::LogRecord r = sample_record();
    std::string def = mp::format_log_record(r);
    CAPTURE(def);
    // "[YYYY-MM-DD HH:MM:SS.mmm] [WARNING] [Process-3:4242] net.http: slow reply"
    REQUIRE(def.size() > 26);
    CHECK(def[0] == '[');
    CHECK(def[5] == '-');
    CHECK(def[11] == ' ');
    CHECK(def[20] == '.');
    CHECK(def.substr(24) == "] [WARNING] [Process-3:4242] net.http: slow reply");

    mp::set_log_format("{level}|{process}|{pid}|{logger}|{message}|{file}|{line}|{function}|{{x}}");
    CHECK(mp::format_log_record(r) == "WARNING|Process-3|4242|net.http|slow reply|server.cpp|321|handle|{x}");

    // Bad formats are refused and leave the format unchanged.
    CHECK_THROWS_AS(mp::set_log_format("{nope}"), std::invalid_argument);
    CHECK_THROWS_AS(mp::set_log_format("{level"), std::invalid_argument);
    CHECK_THROWS_AS(mp::set_log_format("level}"), std::invalid_argument);
    CHECK(mp::format_log_record(r) == "WARNING|Process-3|4242|net.http|slow reply|server.cpp|321|handle|{x}");

    // The handler gets the formatted line.
    mp::set_log_format("{logger}: {message}");
    mp::get_logger("fmt").error("formatted");
    REQUIRE(cap.size() == 1);
    CHECK(cap.lines[0] == "fmt: formatted");
}

TEST_CASE("the default handler writes one line to stderr") {
    Capture cap;
    mp::set_log_handler({});
    mp::set_log_format("{level} {logger}: {message}");
#if !defined(_WIN32)
    int pipefd[2];
    REQUIRE(::pipe(pipefd) == 0);
    int saved = ::dup(STDERR_FILENO);
    REQUIRE(saved >= 0);
    ::dup2(pipefd[1], STDERR_FILENO);
    mp::get_logger("err").warning("to stderr");
    ::dup2(saved, STDERR_FILENO);
    ::close(saved);
    ::close(pipefd[1]);
    char buf[256];
    ssize_t n = ::read(pipefd[0], buf, sizeof buf);
    ::close(pipefd[0]);
#else
    HANDLE read_end = nullptr, write_end = nullptr;
    REQUIRE(CreatePipe(&read_end, &write_end, nullptr, 0));
    HANDLE saved = GetStdHandle(STD_ERROR_HANDLE);
    SetStdHandle(STD_ERROR_HANDLE, write_end);
    mp::get_logger("err").warning("to stderr");
    SetStdHandle(STD_ERROR_HANDLE, saved);
    CloseHandle(write_end);
    char buf[256];
    DWORD n = 0;
    if (!ReadFile(read_end, buf, sizeof buf, &n, nullptr)) n = 0;
    CloseHandle(read_end);
#endif
    REQUIRE(n > 0);
    CHECK(std::string(buf, static_cast<std::size_t>(n)) == "WARNING err: to stderr\n");
}

TEST_CASE("a handler that throws does not take the caller down") {
    Capture cap;
    mp::set_log_handler([](const mp::LogRecord&, const std::string&) { throw std::runtime_error("sink broke"); });
#if !defined(_WIN32)
    int saved = ::dup(STDERR_FILENO);
    int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, STDERR_FILENO);
    CHECK_NOTHROW(mp::get_logger().error("x"));
    ::dup2(saved, STDERR_FILENO);
    ::close(saved);
    ::close(devnull);
#else
    HANDLE saved = GetStdHandle(STD_ERROR_HANDLE);
    HANDLE nul = CreateFileA("NUL", GENERIC_WRITE, FILE_SHARE_READ | FILE_SHARE_WRITE, nullptr, OPEN_EXISTING, 0, nullptr);
    SetStdHandle(STD_ERROR_HANDLE, nul);
    CHECK_NOTHROW(mp::get_logger().error("x"));
    SetStdHandle(STD_ERROR_HANDLE, saved);
    if (nul != INVALID_HANDLE_VALUE) CloseHandle(nul);
#endif
}

TEST_CASE("logging from several threads: nothing lost, each thread's records in order") {
    Capture cap;
    constexpr int kThreads = 4, kEach = 1000;
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
        threads.emplace_back([t] {
            auto log = mp::get_logger("thread" + std::to_string(t));
            for (int i = 0; i < kEach; ++i) log.info(std::to_string(i));
        });
    // Configuration may change concurrently.
    for (int i = 0; i < 50; ++i) mp::set_log_format(i % 2 ? "{message}" : "{logger} {message}");
    for (auto& th : threads) th.join();
    REQUIRE(cap.size() == kThreads * kEach);
    std::vector<int> next(kThreads, 0);
    bool in_order = true;
    for (const auto& r : cap.records) {
        int t = std::stoi(r.logger.substr(6));
        if (std::stoi(r.message) != next[t]++) in_order = false;
    }
    CHECK(in_order);
}

TEST_CASE("LogRecord travels through the codec") {
    mp::LogRecord r = sample_record();
    mp::LogRecord back = mp::decode<mp::LogRecord>(mp::encode(r));
    CHECK(back.level == r.level);
    CHECK(back.logger == r.logger);
    CHECK(back.message == r.message);
    CHECK(back.file == r.file);
    CHECK(back.line == r.line);
    CHECK(back.function == r.function);
    CHECK(back.time == r.time);
    CHECK(back.pid == r.pid);
    CHECK(back.process_name == r.process_name);
    std::string bytes = mp::encode(r);
    for (std::size_t n = 0; n < bytes.size(); ++n)
        CHECK_THROWS_AS(mp::decode<mp::LogRecord>(bytes.substr(0, n)), mp::DecodeError);
}

TEST_CASE("in a child, the forwarder takes records; the parent's handler gets them intact") {
    Capture cap;
    std::vector<std::string> channel;  // stands for the child -> parent channel
    mp::detail::set_log_forwarder([&](const mp::LogRecord& r) { channel.push_back(mp::encode(r)); });
    mp::detail::set_log_level_from_parent(mp::Level::info);
    auto log = mp::get_logger("child");
    log.debug("below the parent's level: not sent");
    int line = __LINE__ + 1;
    log.info("sent 1");
    log.error("sent 2");
    CHECK(cap.size() == 0);  // nothing handled in the child
    REQUIRE(channel.size() == 2);
    mp::detail::set_log_forwarder({});

    // The parent: its level filter still applies.
    mp::set_log_level(mp::Level::warning);
    for (const auto& bytes : channel) mp::detail::handle_log_record(mp::decode<mp::LogRecord>(bytes));
    REQUIRE(cap.size() == 1);
    CHECK(cap.records[0].message == "sent 2");
    mp::set_log_level(mp::Level::debug);
    mp::LogRecord first = mp::decode<mp::LogRecord>(channel[0]);
    mp::detail::handle_log_record(first);
    REQUIRE(cap.size() == 2);
    CHECK(cap.records[1].message == "sent 1");
    CHECK(cap.records[1].line == line);
    CHECK(cap.records[1].logger == "child");
}
