// errors: the exception types every part throws.
//
// All library errors derive from mpservice::Error (a std::runtime_error), so one
// catch clause takes them all.  Exceptions re-thrown from another process are a
// separate family: see remote_exception.hpp.
#pragma once

#include <stdexcept>
#include <string>

namespace mpservice {

/// Base of every error the library throws itself.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Bytes that do not decode to the expected type: truncated, oversized, corrupt.
class DecodeError : public Error {
public:
    using Error::Error;
};

/// A wait with a timeout expired (result(), exception(), get(), acquire(), ...).
class TimeoutError : public Error {
public:
    using Error::Error;
};

/// An operation that the object's state does not allow, e.g. waiting on a
/// worker that was never started, or starting one twice.
class InvalidStateError : public Error {
public:
    using Error::Error;
};

/// A child process ended without delivering a result: exit(n) or a signal.
/// exitcode() follows Python: n after exit(n), -N after signal N.
class ProcessError : public Error {
public:
    ProcessError(const std::string& what, int exitcode) : Error(what), exitcode_(exitcode) {}
    int exitcode() const noexcept { return exitcode_; }
    /// The signal that ended the process, or 0 if it exited.
    int signal() const noexcept { return exitcode_ < 0 ? -exitcode_ : 0; }

private:
    int exitcode_;
};

/// A Barrier was aborted, reset, timed out or lost a party while threads waited.
class BrokenBarrierError : public Error {
public:
    using Error::Error;
};

/// The process that held a lock died while holding it.  Thrown by the next
/// acquirer *after* it has taken the lock: the caller owns the lock and must
/// either repair the protected state and call make_consistent(), or release.
class OwnerDiedError : public Error {
public:
    using Error::Error;
};

/// get_nowait() / get(timeout) found the queue empty.
class Empty : public Error {
public:
    Empty() : Error("queue is empty") {}
    using Error::Error;
};

/// put_nowait() / put(timeout) found the queue full.
class Full : public Error {
public:
    Full() : Error("queue is full") {}
    using Error::Error;
};

/// put() on a closed queue, or get() on a closed queue with nothing left.
class QueueClosed : public Error {
public:
    QueueClosed() : Error("queue is closed") {}
    using Error::Error;
};

/// recv() on a Connection whose other end is closed (every copy of it, in
/// every process) with nothing left to receive - as Python's EOFError.
class EOFError : public Error {
public:
    EOFError() : Error("connection: the other end is closed and nothing is left to receive") {}
    using Error::Error;
};

/// send() on a Connection whose other end is closed (every copy of it, in
/// every process): nobody can receive the item - as Python's BrokenPipeError.
class BrokenPipeError : public Error {
public:
    BrokenPipeError() : Error("connection: the other end is closed; nothing can be sent") {}
    using Error::Error;
};

}  // namespace mpservice
