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
struct LogRecord;

namespace detail {

/// In a child: where records go instead of the local handler (the process
/// part installs a function that sends them to the parent).  Empty = handle
/// locally.
MPSERVICE_API void set_log_forwarder(std::function<void(const LogRecord&)> forward);
/// In the parent: hands a record that arrived from a child to the parent's
/// level filter, format and handler.
MPSERVICE_API void handle_log_record(const LogRecord& record);

}  // namespace detail
}  // namespace mpservice
