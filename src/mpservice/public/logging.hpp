// logging: a small logging API usable in every process.  In a child, records
// travel to the parent, where the parent's level, format and handler apply.
#pragma once

#include <functional>
#include <string>

#include "codec.hpp"

namespace mpservice {

// (Public API - Level, LogRecord, Logger, get_logger, set_log_level,
//  set_log_format, set_log_handler - is written by the logging work.  LogRecord
//  has a serialize() member so it travels through the codec.)
// TEMPORARY STUB (branch process): a minimal LogRecord so that the process part
// can be built and tested before branch `remote` delivers the real one.
struct LogRecord {
    int level = 0;
    std::string logger;
    std::string message;
    std::string process_name;
    long pid = 0;
};
template <>
struct Codec<LogRecord> {
    static void encode(Encoder& e, const LogRecord& r) { e(r.level, r.logger, r.message, r.process_name, r.pid); }
    static LogRecord decode(Decoder& d) {
        LogRecord r;
        d(r.level, r.logger, r.message, r.process_name, r.pid);
        return r;
    }
};

namespace detail {

/// In a child: where records go instead of the local handler (the process
/// part installs a function that sends them to the parent).  Empty = handle
/// locally.
MPSERVICE_API void set_log_forwarder(std::function<void(const LogRecord&)> forward);
/// In the parent: hands a record that arrived from a child to the parent's
/// level filter, format and handler.
MPSERVICE_API void handle_log_record(const LogRecord& record);
/// TEMPORARY STUB: emit a record (forwarded in a child, handled locally otherwise).
MPSERVICE_API void stub_emit(const LogRecord& record);
/// TEMPORARY STUB: the parent's handler.
MPSERVICE_API void stub_set_handler(std::function<void(const LogRecord&)> handler);

}  // namespace detail
}  // namespace mpservice
