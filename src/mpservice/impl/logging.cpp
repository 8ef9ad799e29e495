// logging: implementation.
//
// One process-wide state.  The level thresholds are atomics so that a record
// below the threshold costs a load and a compare; everything else (per-logger
// levels, format, handler) is behind one recursive mutex, held while a record
// is formatted and handed to the handler: handlers run one at a time and in
// order, and a handler may itself log (re-entrant) without deadlocking.
#include <atomic>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

namespace mpservice {

namespace {

enum class Field { literal, time, level, process, pid, logger, message, file, line, function };
struct Token {
    Field field;
    std::string text;  // for literals
};

const char* const kDefaultFormat = "[{time}] [{level}] [{process}:{pid}] {logger}: {message}";

std::vector<Token> parse_format(const std::string& f) {
    static const std::pair<const char*, Field> names[] = {
        {"time", Field::time},     {"level", Field::level},     {"process", Field::process},
        {"pid", Field::pid},       {"logger", Field::logger},   {"message", Field::message},
        {"file", Field::file},     {"line", Field::line},       {"function", Field::function},
    };
    std::vector<Token> out;
    std::string lit;
    for (std::size_t i = 0; i < f.size(); ++i) {
        char c = f[i];
        if (c == '}') {
            if (i + 1 < f.size() && f[i + 1] == '}') {
                lit += '}';
                ++i;
                continue;
            }
            throw std::invalid_argument("mpservice: log format has a stray '}' at offset " + std::to_string(i) +
                                        " (write '}}' for a literal brace): " + f);
        }
        if (c != '{') {
            lit += c;
            continue;
        }
        if (i + 1 < f.size() && f[i + 1] == '{') {
            lit += '{';
            ++i;
            continue;
        }
        std::size_t close = f.find('}', i);
        if (close == std::string::npos)
            throw std::invalid_argument("mpservice: log format has an unclosed '{' at offset " + std::to_string(i) +
                                        ": " + f);
        std::string name = f.substr(i + 1, close - i - 1);
        bool known = false;
        for (const auto& [n, field] : names) {
            if (name == n) {
                if (!lit.empty()) out.push_back({Field::literal, std::move(lit)});
                lit.clear();
                out.push_back({field, std::string()});
                known = true;
            }
        }
        if (!known)
            throw std::invalid_argument("mpservice: unknown log format placeholder {" + name +
                                        "}; known: {time} {level} {process} {pid} {logger} {message} {file} "
                                        "{line} {function}");
        i = close;
    }
    if (!lit.empty()) out.push_back({Field::literal, std::move(lit)});
    return out;
}

// The logging locks exist, and are fork locks, from before main() (before any
// thread can hold them); the state they guard is built at its first use, so a
// program that never logs (linked with --gc-sections) does not carry the
// formatter.  The outermost locks of the library (a handler may call
// anything), so they are taken first at a fork.
std::recursive_mutex& log_mutex() {
    static auto* m = new std::recursive_mutex;  // never destroyed: used by exiting threads
    return *m;
}
std::mutex& log_forward_mutex() {
    static auto* m = new std::mutex;
    return *m;
}
[[maybe_unused]] const bool g_logging_fork_safe =
    (detail::os::at_fork_protect(&log_mutex(), 10), detail::os::at_fork_protect(&log_forward_mutex(), 11), true);

struct LogState {
    // Parent side (and a process without a parent).
    std::atomic<int> global_level{static_cast<int>(Level::info)};
    std::atomic<bool> has_overrides{false};
    std::recursive_mutex& mu = log_mutex();  // guards everything below, and serializes handlers
    std::map<std::string, Level> levels;  // per-logger overrides
    std::vector<Token> format = parse_format(kDefaultFormat);
    LogHandler handler;

    // Child side.
    std::mutex& forward_mu = log_forward_mutex();
    std::shared_ptr<const std::function<void(const LogRecord&)>> forward;
    std::atomic<bool> forwarding{false};
    std::atomic<int> parent_level{static_cast<int>(Level::notset)};
};

LogState& state() {
    static LogState* s = new LogState;  // usable from static destructors and exiting threads
    return *s;
}

/// The threshold for logger `name`: the override of the longest dotted prefix,
/// else the global one.  Caller holds the mutex when overrides exist.
Level effective_level_locked(const LogState& s, const std::string& name) {
    std::string n = name;
    for (;;) {
        auto it = s.levels.find(n);
        if (it != s.levels.end()) return it->second;
        auto dot = n.rfind('.');
        if (dot == std::string::npos) break;
        n.resize(dot);
    }
    return static_cast<Level>(s.global_level.load(std::memory_order_relaxed));
}

bool passes_parent_filter(LogState& s, const LogRecord& r) {
    if (!s.has_overrides.load(std::memory_order_acquire))
        return static_cast<int>(r.level) >= s.global_level.load(std::memory_order_relaxed);
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    return r.level >= effective_level_locked(s, r.logger);
}

void append_time(std::string& out, std::chrono::system_clock::time_point t) {
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
    long long secs = ms / 1000;
    int millis = static_cast<int>(ms % 1000);
    if (millis < 0) {
        millis += 1000;
        secs -= 1;
    }
    int f[6];
    detail::os::local_time(secs, f);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02d %02d:%02d:%02d.%03d", f[0], f[1], f[2], f[3], f[4], f[5], millis);
    out += buf;
}

std::string format_locked(const LogState& s, const LogRecord& r) {
    std::string out;
    out.reserve(64 + r.message.size());
    for (const Token& t : s.format) {
        switch (t.field) {
            case Field::literal: out += t.text; break;
            case Field::time: append_time(out, r.time); break;
            case Field::level: out += level_name(r.level); break;
            case Field::process: out += r.process_name; break;
            case Field::pid: out += std::to_string(r.pid); break;
            case Field::logger: out += r.logger; break;
            case Field::message: out += r.message; break;
            case Field::file: out += r.file; break;
            case Field::line: out += std::to_string(r.line); break;
            case Field::function: out += r.function; break;
        }
    }
    return out;
}

}  // namespace

std::string level_name(Level level) {
    switch (level) {
        case Level::notset: return "NOTSET";
        case Level::debug: return "DEBUG";
        case Level::info: return "INFO";
        case Level::warning: return "WARNING";
        case Level::error: return "ERROR";
        case Level::critical: return "CRITICAL";
    }
    return "LEVEL " + std::to_string(static_cast<int>(level));
}

bool Logger::is_enabled_for(Level level) const noexcept {
    LogState& s = state();
    if (s.forwarding.load(std::memory_order_acquire))
        return static_cast<int>(level) >= s.parent_level.load(std::memory_order_relaxed);
    if (!s.has_overrides.load(std::memory_order_acquire))
        return static_cast<int>(level) >= s.global_level.load(std::memory_order_relaxed);
    try {
        std::lock_guard<std::recursive_mutex> lock(s.mu);
        return level >= effective_level_locked(s, name_);
    } catch (...) {
        return true;  // let the handler side decide
    }
}

void Logger::log(Level level, const std::string& message, const char* file, int line, const char* function) const {
    if (!is_enabled_for(level)) return;
    LogRecord r;
    r.level = level;
    r.logger = name_;
    r.message = message;
    r.file = file ? file : "";
    r.line = line;
    r.function = function ? function : "";
    r.time = std::chrono::system_clock::now();
    r.pid = detail::os::current_pid();
    r.process_name = detail::process_name();

    LogState& s = state();
    if (s.forwarding.load(std::memory_order_acquire)) {
        std::shared_ptr<const std::function<void(const LogRecord&)>> forward;
        {
            std::lock_guard<std::mutex> lock(s.forward_mu);
            forward = s.forward;
        }
        if (forward) {
            (*forward)(r);
            return;
        }
    }
    detail::handle_log_record(r);
}

void set_log_level(Level level) { state().global_level.store(static_cast<int>(level), std::memory_order_relaxed); }

void set_log_level(const std::string& name, Level level) {
    if (name.empty() || name == "root") return set_log_level(level);
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    if (level == Level::notset)
        s.levels.erase(name);
    else
        s.levels[name] = level;
    s.has_overrides.store(!s.levels.empty(), std::memory_order_release);
}

Level get_log_level(const std::string& name) {
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    return effective_level_locked(s, name.empty() ? std::string("root") : name);
}

void set_log_format(const std::string& format) {
    std::vector<Token> tokens = parse_format(format);  // throws before anything changes
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    s.format = std::move(tokens);
}

std::string format_log_record(const LogRecord& record) {
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    return format_locked(s, record);
}

void set_log_handler(LogHandler handler) {
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    s.handler = std::move(handler);
}

namespace detail {

void set_log_forwarder(std::function<void(const LogRecord&)> forward) {
    LogState& s = state();
    std::lock_guard<std::mutex> lock(s.forward_mu);
    if (forward)
        s.forward = std::make_shared<const std::function<void(const LogRecord&)>>(std::move(forward));
    else
        s.forward.reset();
    s.forwarding.store(static_cast<bool>(s.forward), std::memory_order_release);
}

void handle_log_record(const LogRecord& record) {
    LogState& s = state();
    if (s.forwarding.load(std::memory_order_acquire)) {
        // A record of one of our own children, and we are a child too: it goes
        // up, as it is (its process name and pid stay the originator's), to be
        // filtered, formatted and handled by the top parent alone.
        std::shared_ptr<const std::function<void(const LogRecord&)>> forward;
        {
            std::lock_guard<std::mutex> lock(s.forward_mu);
            forward = s.forward;
        }
        if (forward) {
            (*forward)(record);
            return;
        }
    }
    if (!passes_parent_filter(s, record)) return;
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    std::string line = format_locked(s, record);
    if (!s.handler) {
        line += '\n';
        os::write_stderr(line.data(), line.size());
        return;
    }
    try {
        s.handler(record, line);
    } catch (const std::exception& e) {
        // The handler may run on the reactor thread: report, do not propagate.
        std::string msg = "mpservice: the log handler threw: " + std::string(e.what()) + "\n";
        os::write_stderr(msg.data(), msg.size());
    } catch (...) {
        static const char msg[] = "mpservice: the log handler threw a non-exception\n";
        os::write_stderr(msg, sizeof msg - 1);
    }
}

Level log_level() {
    LogState& s = state();
    // In a child, the threshold that counts is the top parent's (handed down
    // to us), so that our children send what the top parent wants.
    if (s.forwarding.load(std::memory_order_acquire))
        return static_cast<Level>(s.parent_level.load(std::memory_order_relaxed));
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    int lowest = s.global_level.load(std::memory_order_relaxed);
    for (const auto& [name, level] : s.levels) lowest = std::min(lowest, static_cast<int>(level));
    return static_cast<Level>(lowest);
}

void set_log_level_from_parent(Level level) {
    state().parent_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

}  // namespace detail
// Out of line: LogRecord::serialize is instantiated here, not in every includer.
void Codec<LogRecord>::encode(Encoder& e, const LogRecord& r) { const_cast<LogRecord&>(r).serialize(e); }

LogRecord Codec<LogRecord>::decode(Decoder& d) {
    LogRecord r;
    r.serialize(d);
    return r;
}

}  // namespace mpservice
