// remote_exception: exceptions that cross process boundaries with their type
// and the story of where they were thrown.
#pragma once

#include <exception>
#include <string>

#include "codec.hpp"

namespace mpservice {

// (Public API - RemoteError, remote_traceback, is_remote, register_exception -
//  is written by the remote-exception work.)

namespace detail {

/// The name of this process as shown in tracebacks and log records
/// ("MainProcess" in the parent; the Process's name in a child).  The process
/// part sets it when a child starts.
MPSERVICE_API const std::string& process_name();
MPSERVICE_API void set_process_name(std::string name);

/// Writes `e` - type, what(), the throw-site stack, process name and pid, and
/// any remote story it already carries - so that decode_exception can rebuild it
/// in another process.
MPSERVICE_API void encode_exception(Encoder& out, const std::exception_ptr& e);
/// Rebuilds an exception written by encode_exception.  The result, when
/// re-thrown, is caught by the original type's catch clauses (for standard and
/// registered types) and always by `catch (const mpservice::RemoteError&)`.
MPSERVICE_API std::exception_ptr decode_exception(Decoder& in);

}  // namespace detail
}  // namespace mpservice
