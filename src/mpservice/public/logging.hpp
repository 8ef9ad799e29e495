// logging: a small logging API usable in every process.  In a child, records
// travel to the parent, where the parent's level, format and handler apply.
//
//     auto log = mpservice::get_logger("worker");
//     log.info("working on " + std::to_string(n));   // file, line, function captured here
//
// Configuration lives in the parent only (a child's records are filtered,
// formatted and written by the parent): set_log_level, set_log_format,
// set_log_handler.  The parent's level travels to its children so that they do
// not send records nobody will see.
//
// Levels are lower-case enumerators (Level::debug, not Level::DEBUG) because
// DEBUG and ERROR are macros in many builds (-DDEBUG, <windows.h>).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>

#include "codec.hpp"

// The caller's source location as default arguments (g++, clang and MSVC
// 19.26+ evaluate these at the call site).
#if defined(__GNUC__) || defined(__clang__) || (defined(_MSC_VER) && _MSC_VER >= 1926)
#define MPSERVICE_CALLER_FILE __builtin_FILE()
#define MPSERVICE_CALLER_LINE __builtin_LINE()
#define MPSERVICE_CALLER_FUNCTION __builtin_FUNCTION()
#else
#define MPSERVICE_CALLER_FILE ""
#define MPSERVICE_CALLER_LINE 0
#define MPSERVICE_CALLER_FUNCTION ""
#endif

namespace mpservice {

/// Severity of a record; the numbers are Python's.
enum class Level : int { notset = 0, debug = 10, info = 20, warning = 30, error = 40, critical = 50 };

/// "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "NOTSET" (or "LEVEL <n>").
MPSERVICE_API std::string level_name(Level level);

/// One log record, as created in any process and handled in the parent.
struct LogRecord {
    Level level = Level::notset;
    std::string logger;   // "root" for get_logger("")
    std::string message;
    std::string file;
    int line = 0;
    std::string function;
    std::chrono::system_clock::time_point time;
    long pid = 0;
    std::string process_name;

    template <class Archive>
    void serialize(Archive& ar) {
        std::int64_t ns = 0;
        if constexpr (std::is_same_v<Archive, Encoder>) {
            ns = std::chrono::duration_cast<std::chrono::nanoseconds>(time.time_since_epoch()).count();
        }
        std::int32_t lvl = static_cast<std::int32_t>(level);
        std::int32_t ln = line;
        std::int64_t id = pid;
        ar(lvl, logger, message, file, ln, function, ns, id, process_name);
        if constexpr (!std::is_same_v<Archive, Encoder>) {
            level = static_cast<Level>(lvl);
            line = ln;
            pid = static_cast<long>(id);
            time = std::chrono::system_clock::time_point(
                std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::nanoseconds(ns)));
        }
    }
};

template <>
struct Codec<LogRecord> {
    MPSERVICE_API static void encode(Encoder& e, const LogRecord& r);
    MPSERVICE_API static LogRecord decode(Decoder& d);
};

/// A named source of records.  Cheap to copy; get_logger("a") twice gives
/// equivalent loggers.  Every method is thread-safe.
class Logger {
public:
    explicit Logger(std::string name = "") : name_(name.empty() ? "root" : std::move(name)) {}
    const std::string& name() const noexcept { return name_; }

    /// Whether a record of `level` would be passed on (by this process).
    MPSERVICE_API bool is_enabled_for(Level level) const noexcept;

    /// Creates a record at `level`; file, line and function are the caller's.
    MPSERVICE_API void log(Level level, const std::string& message, const char* file = MPSERVICE_CALLER_FILE,
                           int line = MPSERVICE_CALLER_LINE, const char* function = MPSERVICE_CALLER_FUNCTION) const;

    void debug(const std::string& message, const char* file = MPSERVICE_CALLER_FILE, int line = MPSERVICE_CALLER_LINE,
               const char* function = MPSERVICE_CALLER_FUNCTION) const {
        log(Level::debug, message, file, line, function);
    }
    void info(const std::string& message, const char* file = MPSERVICE_CALLER_FILE, int line = MPSERVICE_CALLER_LINE,
              const char* function = MPSERVICE_CALLER_FUNCTION) const {
        log(Level::info, message, file, line, function);
    }
    void warning(const std::string& message, const char* file = MPSERVICE_CALLER_FILE,
                 int line = MPSERVICE_CALLER_LINE, const char* function = MPSERVICE_CALLER_FUNCTION) const {
        log(Level::warning, message, file, line, function);
    }
    void error(const std::string& message, const char* file = MPSERVICE_CALLER_FILE, int line = MPSERVICE_CALLER_LINE,
               const char* function = MPSERVICE_CALLER_FUNCTION) const {
        log(Level::error, message, file, line, function);
    }
    void critical(const std::string& message, const char* file = MPSERVICE_CALLER_FILE,
                  int line = MPSERVICE_CALLER_LINE, const char* function = MPSERVICE_CALLER_FUNCTION) const {
        log(Level::critical, message, file, line, function);
    }

private:
    std::string name_;
};

/// The logger called `name` ("" or "root" = the root logger).  Names are
/// dotted paths: per-logger levels set on "a" apply to "a.b" too.
inline Logger get_logger(std::string name = "") { return Logger(std::move(name)); }

/// Parent-side threshold: records below it are dropped (default Level::info).
MPSERVICE_API void set_log_level(Level level);
/// Threshold for the logger `name` and its descendants ("a" covers "a.b"),
/// overriding the global one; Level::notset removes the override.
MPSERVICE_API void set_log_level(const std::string& name, Level level);
/// The threshold that applies to records of logger `name`.
MPSERVICE_API Level get_log_level(const std::string& name = "");

/// Format of a handled record.  Placeholders: {time} {level} {process} {pid}
/// {logger} {message} {file} {line} {function}; "{{" and "}}" are literal
/// braces.  Default: "[{time}] [{level}] [{process}:{pid}] {logger}: {message}",
/// e.g. "[2026-11-25 18:00:00.123] [INFO] [MainProcess:1234] worker: message".
/// Throws std::invalid_argument for an unknown placeholder or a stray brace.
MPSERVICE_API void set_log_format(const std::string& format);
/// A record formatted with the current format (no trailing newline).
MPSERVICE_API std::string format_log_record(const LogRecord& record);

/// Where handled records go.  The default writes the formatted line plus
/// "\n" to stderr in one write(), so lines of several processes do not
/// interleave.  Handlers are called one at a time, in the order records are
/// handled; an empty function restores the default.
using LogHandler = std::function<void(const LogRecord& record, const std::string& formatted)>;
MPSERVICE_API void set_log_handler(LogHandler handler);

namespace detail {

/// In a child: where records go instead of the local handler (the process
/// part installs a function that sends them to the parent).  Empty = handle
/// locally.
MPSERVICE_API void set_log_forwarder(std::function<void(const LogRecord&)> forward);
/// In the parent: hands a record that arrived from a child to the parent's
/// level filter, format and handler.
MPSERVICE_API void handle_log_record(const LogRecord& record);

/// The lowest threshold of the parent's configuration (global and per
/// logger): a child need not send records below it.  The process part sends
/// it to each child, which calls set_log_level_from_parent.
MPSERVICE_API Level log_level();
/// In a child: records below `level` are dropped before they are sent.
MPSERVICE_API void set_log_level_from_parent(Level level);

}  // namespace detail
}  // namespace mpservice
