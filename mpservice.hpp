// mpservice.hpp - Python-style multiprocessing for C++17, in one header.
//
// GENERATED FILE - DO NOT EDIT.  Made by tools/amalgamate.py from src/mpservice.hpp
// and the parts under src/mpservice/; edit those and run the tool again.
//
// Use: #include "mpservice.hpp" anywhere; in exactly one .cpp file write
//   #define MPSERVICE_IMPLEMENTATION
// before the include to compile the implementation there.
// SPDX-License-Identifier: MIT

// mpservice - Python-style multiprocessing for C++17.
//
// This umbrella file is the table of contents of the library and the input of
// tools/amalgamate.py, which inlines every part below into the single header
// mpservice.hpp at the repository root.  It can also be included directly
// (with -I src) while working on the parts.
//
// Order: configuration, then the public parts, then - once per program, in the
// translation unit that defines MPSERVICE_IMPLEMENTATION - the implementation.

#ifndef MPSERVICE_HPP_INCLUDED
#define MPSERVICE_HPP_INCLUDED

// ---- begin part: mpservice/public/config.hpp --------------------------------
// config: version and the few switches a user may set before including.

#define MPSERVICE_VERSION_MAJOR 0
#define MPSERVICE_VERSION_MINOR 1
#define MPSERVICE_VERSION_PATCH 0
#define MPSERVICE_VERSION "0.1.0"

#if __cplusplus < 201703L && !(defined(_MSVC_LANG) && _MSVC_LANG >= 201703L)
#error "mpservice.hpp needs C++17 or later"
#endif

#if defined(_WIN32)
#define MPSERVICE_WIN32 1
#else
#define MPSERVICE_POSIX 1
#endif

// Linkage of the non-template functions defined in the implementation part.
#ifndef MPSERVICE_API
#define MPSERVICE_API
#endif
// ---- end part: mpservice/public/config.hpp
// ---- begin part: mpservice/public/errors.hpp --------------------------------
// errors: the exception types every part throws.
//
// All library errors derive from mpservice::Error (a std::runtime_error), so one
// catch clause takes them all.  Exceptions re-thrown from another process are a
// separate family: see remote_exception.hpp.

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

}  // namespace mpservice
// ---- end part: mpservice/public/errors.hpp
// ---- begin part: mpservice/public/codec.hpp ---------------------------------
// codec: how values cross process boundaries.
//
// A value is written into an Encoder (bytes plus, for library handles such as
// Lock or Queue, OS handles that travel beside the bytes) and read back from a
// Decoder, which checks every length against the bytes that are really there:
// truncated, oversized or random input throws DecodeError and never reads out
// of bounds or allocates more than the input could describe.
//
// Both ends run the same build of the same program, so scalars are written in
// native byte order and layout.
//
// Customization (the one way to make your own type travel): give it a member
//
//     template <class Archive> void serialize(Archive& ar) { ar(field1, field2); }
//
// and a default constructor.  The same member both writes and reads.  Library
// types whose encode and decode differ specialize mpservice::Codec<T>.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace mpservice {

namespace detail::os {
#if defined(_WIN32)
using handle_t = void*;  // HANDLE
#else
using handle_t = int;  // file descriptor
#endif
}  // namespace detail::os

/// Specialize to make a type travel when a member serialize() is not enough.
/// Needs: static void encode(Encoder&, const T&); static T decode(Decoder&);
template <class T, class Enable = void>
struct Codec;

class Encoder {
public:
    /// Appends raw bytes.
    void write_bytes(const void* data, std::size_t n) {
        if (n) buf_.append(static_cast<const char*>(data), n);
    }
    /// Appends one value through its Codec.
    template <class T>
    void write(const T& value);
    /// Writes each argument in order; this is what serialize() members call.
    template <class... T>
    void operator()(const T&... values) {
        (write(values), ...);
    }
    /// Attaches an OS handle (kept open by the caller until the message is
    /// sent) to travel with the bytes; returns its index for Decoder::take_handle.
    std::uint32_t attach(detail::os::handle_t h) {
        handles_.push_back(h);
        return static_cast<std::uint32_t>(handles_.size() - 1);
    }

    const std::string& bytes() const noexcept { return buf_; }
    std::string& bytes() noexcept { return buf_; }
    const std::vector<detail::os::handle_t>& handles() const noexcept { return handles_; }

private:
    std::string buf_;
    std::vector<detail::os::handle_t> handles_;
};

class Decoder {
public:
    /// `handles` are the OS handles that arrived with the bytes, if any.
    Decoder(const void* data, std::size_t n, const std::vector<detail::os::handle_t>* handles = nullptr)
        : p_(static_cast<const unsigned char*>(data)), end_(p_ + n), handles_(handles) {}
    explicit Decoder(std::string_view s, const std::vector<detail::os::handle_t>* handles = nullptr)
        : Decoder(s.data(), s.size(), handles) {}

    /// Copies n bytes out; throws DecodeError if fewer remain.
    void read_bytes(void* out, std::size_t n) {
        require(n, "bytes");
        if (n) std::memcpy(out, p_, n);
        p_ += n;
    }
    /// Returns a pointer to the next n bytes and skips them (no copy).
    const unsigned char* take(std::size_t n, const char* what = "bytes") {
        require(n, what);
        const unsigned char* at = p_;
        p_ += n;
        return at;
    }
    template <class T>
    T read();
    /// Reads each argument in order; this is what serialize() members call.
    template <class... T>
    void operator()(T&... values) {
        ((values = read<T>()), ...);
    }
    /// Reads a container length and checks that at least `min_bytes_each`
    /// bytes per element remain, so a corrupt length cannot make us allocate.
    std::size_t read_length(std::size_t min_bytes_each, const char* what) {
        std::uint64_t n = read<std::uint64_t>();
        std::size_t each = min_bytes_each ? min_bytes_each : 1;
        if (n > remaining() / each)
            throw DecodeError(std::string("decode: ") + what + " length " + std::to_string(n) +
                              " exceeds the " + std::to_string(remaining()) + " bytes left");
        return static_cast<std::size_t>(n);
    }
    /// The OS handle attached at `index` by Encoder::attach.
    detail::os::handle_t handle(std::uint32_t index) const {
        if (!handles_)
            throw DecodeError("decode: this value holds an OS handle (a Lock, Queue, Value, ...) but "
                              "it arrived over a channel that carries no handles; pass such objects "
                              "as Process arguments");
        if (index >= handles_->size())
            throw DecodeError("decode: handle index " + std::to_string(index) + " out of range (" +
                              std::to_string(handles_->size()) + " handles arrived)");
        return (*handles_)[index];
    }

    std::size_t remaining() const noexcept { return static_cast<std::size_t>(end_ - p_); }
    bool at_end() const noexcept { return p_ == end_; }
    /// Throws unless every byte was consumed (trailing garbage is an error).
    void expect_end(const char* what = "value") const {
        if (!at_end())
            throw DecodeError(std::string("decode: ") + std::to_string(remaining()) +
                              " unexpected trailing bytes after " + what);
    }

private:
    void require(std::size_t n, const char* what) const {
        if (n > remaining())
            throw DecodeError(std::string("decode: truncated input: needed ") + std::to_string(n) + " " +
                              what + ", " + std::to_string(remaining()) + " left");
    }
    const unsigned char* p_;
    const unsigned char* end_;
    const std::vector<detail::os::handle_t>* handles_;
};

template <class T>
void Encoder::write(const T& value) {
    Codec<std::decay_t<T>>::encode(*this, value);
}

template <class T>
T Decoder::read() {
    return Codec<std::decay_t<T>>::decode(*this);
}

/// Encodes one value into bytes (values holding OS handles need an Encoder
/// and a channel that carries handles, such as Process arguments).
template <class T>
std::string encode(const T& value) {
    Encoder e;
    e.write(value);
    return std::move(e.bytes());
}

/// Decodes bytes made by encode<T>; throws DecodeError on malformed input.
template <class T>
T decode(std::string_view bytes) {
    Decoder d(bytes);
    T v = d.read<T>();
    d.expect_end();
    return v;
}

// ---------------------------------------------------------------------------
// Codecs of the standard types.  (Type coverage is filled in below.)

template <class T>
struct Codec<T, std::enable_if_t<std::is_arithmetic_v<T> || std::is_enum_v<T>>> {
    static void encode(Encoder& e, const T& v) { e.write_bytes(&v, sizeof v); }
    static T decode(Decoder& d) {
        T v;
        d.read_bytes(&v, sizeof v);
        return v;
    }
};

template <>
struct Codec<std::string> {
    static void encode(Encoder& e, const std::string& s) {
        e.write(static_cast<std::uint64_t>(s.size()));
        e.write_bytes(s.data(), s.size());
    }
    static std::string decode(Decoder& d) {
        std::size_t n = d.read_length(1, "string");
        const unsigned char* p = d.take(n, "string bytes");
        return std::string(reinterpret_cast<const char*>(p), n);
    }
};

}  // namespace mpservice
// ---- end part: mpservice/public/codec.hpp
// ---- begin part: mpservice/detail/os.hpp ------------------------------------
// os: the platform layer.  Every system call the library makes goes through a
// function declared here and defined in impl/os_posix.cpp (impl/os_win32.cpp is
// where a Windows back-end goes).  Nothing here includes a platform header, so
// the public parts stay free of <unistd.h> and <windows.h>.
//
// The declarations are grouped by the concern that needs them; each group has
// a matching section in the implementation file.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

namespace mpservice::detail::os {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;
/// A deadline that never comes (wait without a timeout).
inline constexpr Deadline no_deadline = Deadline::max();

/// Deadline `timeout` from now; a negative timeout means "already expired",
/// and a huge one saturates to no_deadline instead of overflowing.
template <class Rep, class Period>
Deadline deadline_after(std::chrono::duration<Rep, Period> timeout) {
    auto now = Clock::now();
    if (timeout <= timeout.zero()) return now;
    if (std::chrono::duration<double>(timeout).count() >
        std::chrono::duration<double>(no_deadline - now).count())
        return no_deadline;
    return now + std::chrono::duration_cast<Clock::duration>(timeout);
}

// ---------------------------------------------------------------- handles
inline constexpr handle_t invalid_handle = handle_t(-1);
/// Closes a handle; invalid_handle is ignored.  Never throws.
MPSERVICE_API void close_handle(handle_t h) noexcept;
/// Duplicates a handle (close-on-exec); throws std::system_error.
MPSERVICE_API handle_t duplicate_handle(handle_t h);

// ---------------------------------------------------------------- shared memory
/// Creates anonymous shared memory of `size` bytes (zero-filled), private to
/// this user, with no name in any namespace: it lives while a handle or a
/// mapping of it exists.  Returns its handle (close-on-exec).
MPSERVICE_API handle_t shm_create(std::size_t size);
/// The size of the shared memory behind `h`.
MPSERVICE_API std::size_t shm_size(handle_t h);
/// Maps `size` bytes of `h` read-write and shared; throws std::system_error.
MPSERVICE_API void* shm_map(handle_t h, std::size_t size);
MPSERVICE_API void shm_unmap(void* addr, std::size_t size) noexcept;

// ---------------------------------------------------------------- waiting on a word
/// Blocks while `*word == expected` until futex_wake on the same word (from any
/// process that maps it) or until `deadline`.  Returns false on timeout; may
/// return true spuriously, so callers re-check their condition.
MPSERVICE_API bool futex_wait(const std::atomic<std::uint32_t>* word, std::uint32_t expected,
                              Deadline deadline = no_deadline);
/// Wakes up to `count` waiters blocked on `word` (INT32_MAX for all).
MPSERVICE_API void futex_wake(const std::atomic<std::uint32_t>* word, int count);
/// A pause instruction for spin loops.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// ---------------------------------------------------------------- robust mutex
/// Storage for a mutex that lives in shared memory and survives the death of
/// its owner: the next locker takes it and is told (LockResult::owner_died).
/// Placed inside shared structures; initialized once by robust_mutex_init.
struct alignas(16) RobustMutex {
    unsigned char storage[64];
};
enum class LockResult { acquired, owner_died, timed_out, busy };
/// Initializes a process-shared, robust, error-checking mutex in place.
MPSERVICE_API void robust_mutex_init(RobustMutex* m);
/// Locks, spinning briefly before blocking; `deadline` bounds the wait.
/// owner_died: the lock is now held by the caller but the previous owner
/// died holding it; call robust_mutex_consistent to keep using the mutex.
MPSERVICE_API LockResult robust_mutex_lock(RobustMutex* m, Deadline deadline = no_deadline);
/// Takes the lock if it is free: acquired, owner_died or busy.
MPSERVICE_API LockResult robust_mutex_trylock(RobustMutex* m);
/// Releases; throws std::system_error if the caller does not hold it.
MPSERVICE_API void robust_mutex_unlock(RobustMutex* m);
/// Marks the state protected by a mutex taken with owner_died as repaired.
MPSERVICE_API void robust_mutex_consistent(RobustMutex* m);

// ---------------------------------------------------------------- processes
/// This process's id.
MPSERVICE_API long current_pid() noexcept;
/// Whether a process with this id exists (it may be a zombie).
MPSERVICE_API bool pid_alive(long pid) noexcept;

// ---------------------------------------------------------------- (process/channel section: process.hpp)

// ---------------------------------------------------------------- (synchronization section)

// ---------------------------------------------------------------- (queue section)
/// Populates the page tables of a shared mapping now (writable), so the first
/// pass of data through it does not pay a page fault per 4 KiB.  Best effort.
MPSERVICE_API void shm_prefault(void* addr, std::size_t size) noexcept;

}  // namespace mpservice::detail::os
// ---- end part: mpservice/detail/os.hpp
// ---- begin part: mpservice/detail/shm.hpp -----------------------------------
// shm: a block of anonymous shared memory, the home of every shared object
// (locks, events, values, queues).
//
// A SharedMemory is a cheap, copyable, reference-counted view of one mapping.
// Encoding it attaches its handle to the message; decoding maps the handle that
// arrived, so a child that receives it sees the very same bytes.  The kernel
// frees the memory when the last handle and mapping in any process are gone,
// which includes processes killed by SIGKILL: there is no name to leak.

#include <cstddef>
#include <memory>
#include <new>
#include <type_traits>

namespace mpservice::detail {

class SharedMemory {
public:
    SharedMemory() = default;

    /// New zero-filled shared memory of `size` bytes (> 0).
    static SharedMemory create(std::size_t size);
    /// Maps the memory behind `h`, taking ownership of `h`.
    static SharedMemory adopt(os::handle_t h);

    void* data() const noexcept { return m_ ? m_->addr : nullptr; }
    std::size_t size() const noexcept { return m_ ? m_->size : 0; }
    os::handle_t handle() const noexcept { return m_ ? m_->handle : os::invalid_handle; }
    explicit operator bool() const noexcept { return static_cast<bool>(m_); }
    /// Number of SharedMemory objects in *this process* sharing the mapping.
    long use_count() const noexcept { return m_.use_count(); }

private:
    struct Mapping {
        os::handle_t handle = os::invalid_handle;
        void* addr = nullptr;
        std::size_t size = 0;
        Mapping() = default;
        Mapping(const Mapping&) = delete;
        Mapping& operator=(const Mapping&) = delete;
        ~Mapping();
    };
    std::shared_ptr<Mapping> m_;
};

/// A T constructed in its own block of shared memory, reached through a
/// SharedMemory; copies (and decoded copies in other processes) refer to the
/// same object.  The creator constructs it; nobody runs its destructor, since
/// no process knows it is the last one (T must be trivially destructible).
template <class T>
class SharedObject {
    static_assert(std::is_trivially_destructible_v<T>, "a shared object is never destroyed");

public:
    SharedObject() = default;
    template <class... Args>
    static SharedObject create(Args&&... args) {
        SharedObject o;
        o.mem_ = SharedMemory::create(sizeof(T));
        ::new (o.mem_.data()) T(std::forward<Args>(args)...);
        return o;
    }
    T* get() const noexcept { return static_cast<T*>(mem_.data()); }
    T* operator->() const noexcept { return get(); }
    T& operator*() const noexcept { return *get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(mem_); }
    const SharedMemory& memory() const noexcept { return mem_; }

    static void encode(Encoder& e, const SharedObject& o) { e.write(o.mem_); }
    static SharedObject decode(Decoder& d) {
        SharedObject o;
        o.mem_ = d.read<SharedMemory>();
        if (o.mem_.size() < sizeof(T)) throw DecodeError("decode: shared object is smaller than its type");
        return o;
    }

private:
    SharedMemory mem_;
};

}  // namespace mpservice::detail

namespace mpservice {

template <>
struct Codec<detail::SharedMemory> {
    static void encode(Encoder& e, const detail::SharedMemory& m);
    static detail::SharedMemory decode(Decoder& d);
};

template <class T>
struct Codec<detail::SharedObject<T>> {
    static void encode(Encoder& e, const detail::SharedObject<T>& o) { detail::SharedObject<T>::encode(e, o); }
    static detail::SharedObject<T> decode(Decoder& d) { return detail::SharedObject<T>::decode(d); }
};

}  // namespace mpservice
// ---- end part: mpservice/detail/shm.hpp
// ---- begin part: mpservice/public/remote_exception.hpp ----------------------
// remote_exception: exceptions that cross process boundaries with their type
// and the story of where they were thrown.

#include <exception>
#include <string>

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
// ---- end part: mpservice/public/remote_exception.hpp
// ---- begin part: mpservice/public/logging.hpp -------------------------------
// logging: a small logging API usable in every process.  In a child, records
// travel to the parent, where the parent's level, format and handler apply.

#include <functional>
#include <string>

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
// ---- end part: mpservice/public/logging.hpp
// ---- begin part: mpservice/public/process.hpp -------------------------------
// process: (to be written)
// ---- end part: mpservice/public/process.hpp
// ---- begin part: mpservice/public/threading.hpp -----------------------------
// threading: (to be written)
// ---- end part: mpservice/public/threading.hpp
// ---- begin part: mpservice/public/futures.hpp -------------------------------
// futures: (to be written)
// ---- end part: mpservice/public/futures.hpp
// ---- begin part: mpservice/public/synchronize.hpp ---------------------------
// synchronize: (to be written)
// ---- end part: mpservice/public/synchronize.hpp
// ---- begin part: mpservice/public/sharedctypes.hpp --------------------------
// sharedctypes: (to be written)
// ---- end part: mpservice/public/sharedctypes.hpp
// ---- begin part: mpservice/public/queues.hpp --------------------------------
// queues: Queue<T>, SimpleQueue<T> and JoinableQueue<T>, typed MPMC queues in
// shared memory, usable from any number of threads and processes.
//
//     mp::Queue<std::string> q;              // unbounded in items, 1 MiB ring
//     mp::Queue<Job> jobs(100, 8 << 20);     // at most 100 items, 8 MiB ring
//     q.put("hello");  std::string s = q.get();
//     if (auto v = q.try_get()) use(*v);     // nothing there: std::nullopt
//     q.get(std::chrono::milliseconds(50));  // nothing within 50 ms: throws mp::Empty
//
// A queue is a handle: copies refer to the same queue, and so does the queue a
// child receives when a Queue is passed as a Process argument (its shared memory
// travels as a file descriptor; there is no name to leak).  The memory goes away
// with the last handle in any process, whether it exits or is killed.  Items are
// any type the codec handles; items holding OS handles (a Queue, a Lock, ...)
// cannot be put into a queue - pass those as Process arguments.
//
// Bounds.  `maxsize` bounds the number of items (0: no bound, as in Python).  The
// ring's byte capacity (default 1 MiB) bounds the bytes waiting: a put waits for
// room when the ring is full even if maxsize is 0.  An item larger than half the
// ring is streamed through it in chunks while a consumer copies them out, so items
// of any size pass; producers stream one at a time, never interleaved.
//
// Order.  Items from one producer (thread) arrive in the order it put them; items
// from several producers interleave.
//
// close().  Further puts throw QueueClosed (in every process); gets return what is
// left, then throw QueueClosed (try_get returns std::nullopt).  A put already
// running when close() is called may still land.
//
// Timeouts.  A put or get gives up at its timeout while it waits for room, for an
// item or for the queue's lock.  Once a get has started to receive a chunked item,
// it finishes receiving it (its producer is writing it at that moment).  A put that
// times out in the middle of a chunked item withdraws it: no consumer receives it.
//
// Crash safety (SIGKILL at any instant).  Producers are serialized by one robust
// mutex and consumers by another; each side publishes its ring position with a
// single store after the bytes are in place, through a journal that the next
// holder of the lock finishes if the writer died in between.  So:
//  - A producer killed inside put(): its item is either delivered whole or not at
//    all.  A half-written small item is overwritten by the next put; a large item
//    it was streaming is discarded by the consumer receiving it (a consumer waiting
//    for the next chunk checks every 20 ms whether the producer's lock owner died).
//  - A consumer killed inside get() before the item was taken off the ring leaves
//    it there for the next consumer.  Killed after that (a small item between
//    taking and returning, or a large item once its first chunk was received), the
//    item is lost and the next consumer drops the rest of it.
//  - Nothing else is lost, duplicated or reordered, and the other processes carry
//    on: a waiter never depends on a dead process (a put waiting for room whose
//    consumers all died can still time out).
// For JoinableQueue, an item lost by a dead consumer is counted as done only when
// the consumers dropped part of it; one it had taken whole is waiting for its
// task_done() like any other (as in Python).
//
// Speed.  A small item costs one encode and one copy into the ring, one copy out
// (decoded in place); no system call unless the other side sleeps.  Waits spin
// ~20 us before sleeping on a futex.

#include <chrono>
#include <cstddef>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

// ---- begin part: mpservice/detail/queue_ring.hpp ----------------------------
// queue_ring: the untyped engine under Queue<T>, SimpleQueue<T> and JoinableQueue<T>.
//
// One block of shared memory holds a header and a byte ring.  Items travel as
// encoded bytes in *records* (8-byte aligned, never straddling the ring's end):
//
//     whole  [len u32 | kind u32 | payload ...]            an item that fits in half the ring
//     first  [len u32 | kind u32 | total u64 | payload]    first chunk of a larger item
//     cont   [len u32 | kind u32 | payload ...]            a middle chunk ("last" for the final one)
//     pad    [len u32 | kind u32 | skipped ...]            fills the ring's end so records stay contiguous
//
// Producers are serialized by one robust mutex (the put lock), consumers by another
// (the get lock): between them the ring behaves as a single-producer single-consumer
// ring whose positions (tail, head) are published with release stores.  Each side
// commits its positions and counters through a small journal (see commit_put /
// commit_get), so a process killed between two stores leaves a commit the next
// holder of the lock finishes ("rolls forward").
//
// Waiting: futex words with a "sleepers" flag.  A waiter spins briefly, then sets
// the flag and sleeps; a notifier pays a system call only if the flag is set and
// clears it when it wakes everyone, so a waiter killed while asleep does not leave
// the notifiers paying for a wake-up forever.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace mpservice::detail {

/// A futex word plus the flag that says someone may sleep on it.
struct alignas(64) QueueWaitWord {
    std::atomic<std::uint32_t> seq{0};
    std::atomic<std::uint32_t> sleepers{0};
};

/// Everything that lives at the start of a queue's shared block.  Trivially
/// destructible: nobody knows which process is the last one to leave.
struct QueueHeader {
    // ---- set once by the creator, read-only afterwards
    std::uint32_t magic = 0;
    std::uint32_t kind = 0;       // QueueKind
    std::uint64_t type_tag = 0;   // which T the queue carries (a hash of its type name)
    std::uint64_t capacity = 0;   // ring bytes, a multiple of 64
    std::uint64_t maxsize = 0;    // item bound, 0 = none
    std::uint64_t ring_offset = 0;

    alignas(64) std::atomic<std::uint32_t> closed{0};

    // ---- producers' private state, guarded by put_lock
    alignas(64) os::RobustMutex put_lock;
    std::uint64_t head_cache = 0;  // a lower bound of `head`, saves reading the consumers' line
    std::uint64_t j_tail = 0, j_completed = 0;
    std::atomic<std::uint32_t> j_put_active{0};

    // ---- published by producers, read by consumers
    alignas(64) std::atomic<std::uint64_t> tail{0};       // bytes ever published
    std::atomic<std::uint64_t> completed{0};              // items ever published completely
    std::atomic<std::uint64_t> streaming{0};              // id of the chunked item in progress, 0 = none

    // ---- consumers' private state, guarded by get_lock
    alignas(64) os::RobustMutex get_lock;
    std::uint64_t tail_cache = 0;  // a lower bound of `tail`
    std::uint64_t j_head = 0, j_taken = 0;
    std::atomic<std::uint32_t> j_get_active{0};

    // ---- published by consumers, read by producers
    alignas(64) std::atomic<std::uint64_t> head{0};       // bytes ever consumed
    std::atomic<std::uint64_t> taken{0};                  // items ever taken completely

    // ---- JoinableQueue
    alignas(64) std::atomic<std::uint64_t> tasks_done{0};

    QueueWaitWord data;    // "a record was published" and "the queue was closed"
    QueueWaitWord space;   // "a record was consumed" and "the queue was closed"
    QueueWaitWord joined;  // "task_done was called"
};

enum class QueueKind : std::uint32_t { queue = 1, simple = 2, joinable = 3 };

/// A per-process handle to one shared queue of bytes.  Copies share the queue.
class QueueCore {
public:
    enum class Status { ok, timeout, closed };
    /// Called with the bytes of one item (valid only during the call).
    using Consume = void (*)(void* context, const unsigned char* data, std::size_t size);

    QueueCore() = default;
    MPSERVICE_API static QueueCore create(QueueKind kind, std::uint64_t type_tag, std::size_t maxsize,
                                          std::size_t capacity_bytes);
    /// Attaches to a queue that arrived from another process; checks that it is a
    /// queue of this kind and item type.
    MPSERVICE_API static QueueCore attach(SharedMemory memory, QueueKind kind, std::uint64_t type_tag);

    /// Puts one item's bytes: ok, timeout (no room before `deadline`) or closed.
    MPSERVICE_API Status put(const void* data, std::size_t size, os::Deadline deadline);
    /// Takes one item and hands its bytes to `consume`: ok, timeout (nothing
    /// before `deadline`) or closed (closed and drained).  An exception from
    /// `consume` propagates; the item is consumed all the same.
    MPSERVICE_API Status get(Consume consume, void* context, os::Deadline deadline);

    MPSERVICE_API std::size_t qsize() const noexcept;
    MPSERVICE_API bool full() const noexcept;
    std::size_t maxsize() const noexcept { return static_cast<std::size_t>(h_->maxsize); }
    std::size_t capacity() const noexcept { return static_cast<std::size_t>(h_->capacity); }
    MPSERVICE_API void close() noexcept;
    bool closed() const noexcept { return h_->closed.load(std::memory_order_acquire) != 0; }

    /// JoinableQueue: marks one taken item done; throws std::invalid_argument
    /// when called more often than items were put.
    MPSERVICE_API void task_done();
    /// JoinableQueue: true once every item put has been marked done.
    MPSERVICE_API bool join(os::Deadline deadline);

    const SharedMemory& memory() const noexcept { return mem_; }
    explicit operator bool() const noexcept { return h_ != nullptr; }

    /// A per-thread buffer reused for encoding items (no allocation per put).
    MPSERVICE_API static std::string& encode_buffer();
    /// A stable tag for a type name (FNV-1a).
    static std::uint64_t tag_of(const char* name) noexcept {
        std::uint64_t h = 1469598103934665603ull;
        for (; *name; ++name) h = (h ^ static_cast<unsigned char>(*name)) * 1099511628211ull;
        return h;
    }

private:
    enum class Taken { delivered, discarded };

    Status put_whole(const void* data, std::size_t size, os::Deadline deadline);
    Status put_chunked(const void* data, std::size_t size, os::Deadline deadline);
    bool wait_for_room(std::uint64_t tail, std::uint64_t bytes, os::Deadline deadline, bool give_up_on_close);
    void write_pad(std::uint64_t tail, std::uint64_t bytes);
    void commit_put(std::uint64_t tail, std::uint64_t completed) noexcept;
    void commit_get(std::uint64_t head, std::uint64_t taken) noexcept;
    void recover_put() noexcept;
    void recover_get() noexcept;
    void probe_producers() noexcept;
    void probe_consumers() noexcept;
    Taken read_chunked(std::uint64_t head, std::string& out);
    unsigned char* at(std::uint64_t position) const noexcept {
        return ring_ + position % h_->capacity;
    }

    SharedMemory mem_;
    QueueHeader* h_ = nullptr;
    unsigned char* ring_ = nullptr;
};

}  // namespace mpservice::detail
// ---- end part: mpservice/detail/queue_ring.hpp

namespace mpservice {

template <class T>
class Queue;
template <class T>
class SimpleQueue;
template <class T>
class JoinableQueue;

namespace detail {

template <class T>
struct IsByteVector : std::false_type {};
template <class E, class A>
struct IsByteVector<std::vector<E, A>> : std::bool_constant<std::is_arithmetic_v<E>> {};

/// Items as bytes.  Arithmetic and enum items are copied as they are (what their
/// codec writes); a std::string or a vector of numbers is copied straight into the
/// ring without the codec's length prefix (the record knows its length), which
/// saves a copy; everything else goes through the codec into a reused buffer.
template <class T>
struct QueueItems {
    static constexpr bool raw = std::is_arithmetic_v<T> || std::is_enum_v<T>;
    static constexpr bool contiguous = std::is_same_v<T, std::string> || IsByteVector<T>::value;

    static std::uint64_t type_tag() { return QueueCore::tag_of(typeid(T).name()); }

    template <class F>
    static decltype(auto) with_bytes(const T& item, F&& f) {
        if constexpr (raw) {
            return f(static_cast<const void*>(&item), sizeof(T));
        } else if constexpr (contiguous) {
            return f(static_cast<const void*>(item.data()), item.size() * sizeof(item[0]));
        } else {
            std::string& buffer = QueueCore::encode_buffer();
            Encoder e;
            e.bytes().swap(buffer);
            e.bytes().clear();
            struct GiveBack {
                std::string& buffer;
                Encoder& e;
                ~GiveBack() { buffer.swap(e.bytes()); }
            } give_back{buffer, e};
            e.write(item);
            if (!e.handles().empty())
                throw std::invalid_argument(
                    "mpservice: a queue item cannot hold OS handles (a Queue, Lock, Value, ...); "
                    "pass such objects as Process arguments");
            return f(static_cast<const void*>(e.bytes().data()), e.bytes().size());
        }
    }

    static void consume(void* context, const unsigned char* data, std::size_t size) {
        auto& out = *static_cast<std::optional<T>*>(context);
        if constexpr (raw) {
            if (size != sizeof(T)) throw DecodeError("decode: queue item has the wrong size for its type");
            T value;
            std::memcpy(&value, data, sizeof(T));
            out.emplace(value);
        } else if constexpr (contiguous) {
            using E = typename T::value_type;
            if constexpr (std::is_same_v<T, std::string>) {
                out.emplace(reinterpret_cast<const char*>(data), size);
            } else {
                if (size % sizeof(E)) throw DecodeError("decode: queue item has the wrong size for its type");
                out.emplace(size / sizeof(E), E());
                if (size) std::memcpy(static_cast<void*>(out->data()), data, size);
            }
        } else {
            Decoder d(data, size);
            out.emplace(d.read<T>());
            d.expect_end("queue item");
        }
    }

    static QueueCore::Status put(QueueCore& core, const T& item, os::Deadline deadline) {
        return with_bytes(item, [&](const void* data, std::size_t size) { return core.put(data, size, deadline); });
    }
    static QueueCore::Status get(QueueCore& core, std::optional<T>& out, os::Deadline deadline) {
        return core.get(&consume, &out, deadline);
    }
};

}  // namespace detail

/// A multi-producer multi-consumer queue of T in shared memory (see the top of
/// this part for bounds, timeouts and what survives a crash).
template <class T>
class Queue {
    using Items = detail::QueueItems<T>;
    using Status = detail::QueueCore::Status;

public:
    /// The ring's byte capacity when none is given.
    static constexpr std::size_t default_capacity = std::size_t(1) << 20;

    /// A new queue holding at most `maxsize` items (0: no item bound) and at most
    /// `capacity_bytes` bytes of encoded items at a time (larger items stream).
    explicit Queue(std::size_t maxsize = 0, std::size_t capacity_bytes = default_capacity)
        : core_(detail::QueueCore::create(detail::QueueKind::queue, Items::type_tag(), maxsize, capacity_bytes)) {}

    /// Puts `item`, waiting for room as long as it takes.  Throws QueueClosed.
    void put(const T& item) { check_put(Items::put(core_, item, detail::os::no_deadline)); }
    /// Puts `item`, waiting at most `timeout`; throws Full when there was no room.
    template <class Rep, class Period>
    void put(const T& item, std::chrono::duration<Rep, Period> timeout) {
        if (!check_put(Items::put(core_, item, detail::os::deadline_after(timeout)))) throw Full();
    }
    /// Puts `item` if there is room now; throws Full otherwise.
    void put_nowait(const T& item) {
        if (!check_put(Items::put(core_, item, detail::os::Clock::now()))) throw Full();
    }
    /// Puts `item` if there is room now; false otherwise.  Throws QueueClosed.
    bool try_put(const T& item) { return check_put(Items::put(core_, item, detail::os::Clock::now())); }
    /// Puts `item` if there is room within `timeout`; false otherwise.
    template <class Rep, class Period>
    bool try_put(const T& item, std::chrono::duration<Rep, Period> timeout) {
        return check_put(Items::put(core_, item, detail::os::deadline_after(timeout)));
    }

    /// Takes the next item, waiting as long as it takes.  Throws QueueClosed when
    /// the queue is closed and empty.
    T get() { return take(detail::os::no_deadline); }
    /// Takes the next item, waiting at most `timeout`; throws Empty when none came.
    template <class Rep, class Period>
    T get(std::chrono::duration<Rep, Period> timeout) {
        return take(detail::os::deadline_after(timeout));
    }
    /// Takes the next item if there is one now; throws Empty otherwise.
    T get_nowait() { return take(detail::os::Clock::now()); }
    /// The next item if there is one now (std::nullopt if not, or if closed and empty).
    std::optional<T> try_get() { return try_take(detail::os::Clock::now()); }
    /// The next item if one comes within `timeout`.
    template <class Rep, class Period>
    std::optional<T> try_get(std::chrono::duration<Rep, Period> timeout) {
        return try_take(detail::os::deadline_after(timeout));
    }

    /// Number of complete items in the queue (a snapshot; others may change it).
    std::size_t qsize() const noexcept { return core_.qsize(); }
    bool empty() const noexcept { return core_.qsize() == 0; }
    /// True when maxsize items are queued or the ring has no room left.
    bool full() const noexcept { return core_.full(); }
    /// The item bound given at creation (0: none).
    std::size_t maxsize() const noexcept { return core_.maxsize(); }
    /// The ring's byte capacity (the requested one rounded up to a multiple of 64).
    std::size_t capacity() const noexcept { return core_.capacity(); }
    /// Closes the queue for every process: puts throw QueueClosed, gets drain.
    void close() noexcept { core_.close(); }
    bool closed() const noexcept { return core_.closed(); }

protected:
    Queue(detail::QueueKind kind, std::size_t maxsize, std::size_t capacity_bytes)
        : core_(detail::QueueCore::create(kind, Items::type_tag(), maxsize, capacity_bytes)) {}
    explicit Queue(detail::QueueCore core) : core_(std::move(core)) {}

    static bool check_put(Status s) {
        if (s == Status::closed) throw QueueClosed();
        return s == Status::ok;
    }
    T take(detail::os::Deadline deadline) {
        std::optional<T> out;
        Status s = Items::get(core_, out, deadline);
        if (s == Status::closed) throw QueueClosed();
        if (s == Status::timeout) throw Empty();
        return std::move(*out);
    }
    std::optional<T> try_take(detail::os::Deadline deadline) {
        std::optional<T> out;
        Items::get(core_, out, deadline);
        return out;
    }

    detail::QueueCore core_;
    friend struct Codec<Queue<T>>;
    friend struct Codec<JoinableQueue<T>>;
};

/// A Queue that counts unfinished items: every put adds one, task_done()
/// removes one, join() waits until none is left (as Python's JoinableQueue).
template <class T>
class JoinableQueue : public Queue<T> {
public:
    explicit JoinableQueue(std::size_t maxsize = 0, std::size_t capacity_bytes = Queue<T>::default_capacity)
        : Queue<T>(detail::QueueKind::joinable, maxsize, capacity_bytes) {}

    /// Marks one item taken from the queue as processed.  Throws
    /// std::invalid_argument when called more times than items were put.
    void task_done() { this->core_.task_done(); }
    /// Waits until every item put has been marked done.
    void join() { this->core_.join(detail::os::no_deadline); }
    /// Waits at most `timeout`; false if items are still unfinished then.
    template <class Rep, class Period>
    bool join(std::chrono::duration<Rep, Period> timeout) {
        return this->core_.join(detail::os::deadline_after(timeout));
    }

private:
    explicit JoinableQueue(detail::QueueCore core) : Queue<T>(std::move(core)) {}
    friend struct Codec<JoinableQueue<T>>;
};

/// The plain queue of Python's SimpleQueue: put, get, empty, close.  No item
/// bound; the ring's byte capacity still applies (larger items stream).
template <class T>
class SimpleQueue {
    using Items = detail::QueueItems<T>;
    using Status = detail::QueueCore::Status;

public:
    explicit SimpleQueue(std::size_t capacity_bytes = Queue<T>::default_capacity)
        : core_(detail::QueueCore::create(detail::QueueKind::simple, Items::type_tag(), 0, capacity_bytes)) {}

    /// Puts `item`, waiting for room.  Throws QueueClosed after close().
    void put(const T& item) {
        if (Items::put(core_, item, detail::os::no_deadline) == Status::closed) throw QueueClosed();
    }
    /// Takes the next item, waiting for one.  Throws QueueClosed when closed and empty.
    T get() {
        std::optional<T> out;
        if (Items::get(core_, out, detail::os::no_deadline) == Status::closed) throw QueueClosed();
        return std::move(*out);
    }
    bool empty() const noexcept { return core_.qsize() == 0; }
    void close() noexcept { core_.close(); }

private:
    explicit SimpleQueue(detail::QueueCore core) : core_(std::move(core)) {}
    detail::QueueCore core_;
    friend struct Codec<SimpleQueue<T>>;
};

// Queues travel as their shared memory (a file descriptor beside the bytes).

template <class T>
struct Codec<Queue<T>> {
    static void encode(Encoder& e, const Queue<T>& q) { e.write(q.core_.memory()); }
    static Queue<T> decode(Decoder& d) {
        return Queue<T>(detail::QueueCore::attach(d.read<detail::SharedMemory>(), detail::QueueKind::queue,
                                                  detail::QueueItems<T>::type_tag()));
    }
};

template <class T>
struct Codec<JoinableQueue<T>> {
    static void encode(Encoder& e, const JoinableQueue<T>& q) { e.write(q.core_.memory()); }
    static JoinableQueue<T> decode(Decoder& d) {
        return JoinableQueue<T>(detail::QueueCore::attach(
            d.read<detail::SharedMemory>(), detail::QueueKind::joinable, detail::QueueItems<T>::type_tag()));
    }
};

template <class T>
struct Codec<SimpleQueue<T>> {
    static void encode(Encoder& e, const SimpleQueue<T>& q) { e.write(q.core_.memory()); }
    static SimpleQueue<T> decode(Decoder& d) {
        return SimpleQueue<T>(detail::QueueCore::attach(d.read<detail::SharedMemory>(), detail::QueueKind::simple,
                                                        detail::QueueItems<T>::type_tag()));
    }
};

}  // namespace mpservice
// ---- end part: mpservice/public/queues.hpp

#endif  // MPSERVICE_HPP_INCLUDED

// The implementation is outside the include guard so that a second inclusion
// with MPSERVICE_IMPLEMENTATION defined still emits it, and its own guard makes
// sure it is emitted only once per translation unit.
#if defined(MPSERVICE_IMPLEMENTATION) && !defined(MPSERVICE_IMPLEMENTATION_INCLUDED)
#define MPSERVICE_IMPLEMENTATION_INCLUDED

// ---- begin part: mpservice/impl/os_posix.cpp --------------------------------
// os_posix: the POSIX (Linux first) back-end of detail/os.hpp.  This file is
// the only place that includes POSIX headers or makes system calls.
#if !defined(_WIN32)

#include <cerrno>
#include <climits>
#include <ctime>
#include <system_error>

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>
#if defined(__linux__)
#include <linux/futex.h>
#endif

namespace mpservice::detail::os {

namespace {
[[noreturn]] void throw_errno(const char* what) {
    throw std::system_error(errno, std::generic_category(), what);
}

timespec to_timespec(Deadline d) {
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(d.time_since_epoch()).count();
    timespec ts;
    ts.tv_sec = static_cast<time_t>(ns / 1000000000);
    ts.tv_nsec = static_cast<long>(ns % 1000000000);
    return ts;
}
}  // namespace

// ---------------------------------------------------------------- handles

void close_handle(handle_t h) noexcept {
    if (h >= 0) ::close(h);  // close() is never retried on Linux: the fd is gone even on EINTR
}

handle_t duplicate_handle(handle_t h) {
    int fd = ::fcntl(h, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) throw_errno("mpservice: dup");
    return fd;
}

// ---------------------------------------------------------------- shared memory

handle_t shm_create(std::size_t size) {
#if defined(__linux__)
    // memfd: no name in /dev/shm, so nothing can leak, whatever kills us.
    int fd = static_cast<int>(::syscall(SYS_memfd_create, "mpservice", MFD_CLOEXEC));
    if (fd < 0) throw_errno("mpservice: memfd_create");
#else
#error "shared memory back-end not written for this platform yet"
#endif
    if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
        int err = errno;
        ::close(fd);
        errno = err;
        throw_errno("mpservice: ftruncate of shared memory");
    }
    return fd;
}

std::size_t shm_size(handle_t h) {
    struct stat st;
    if (::fstat(h, &st) != 0) throw_errno("mpservice: fstat of shared memory");
    return static_cast<std::size_t>(st.st_size);
}

void* shm_map(handle_t h, std::size_t size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, h, 0);
    if (p == MAP_FAILED) throw_errno("mpservice: mmap of shared memory");
    return p;
}

void shm_unmap(void* addr, std::size_t size) noexcept {
    if (addr) ::munmap(addr, size);
}

// ---------------------------------------------------------------- waiting on a word

bool futex_wait(const std::atomic<std::uint32_t>* word, std::uint32_t expected, Deadline deadline) {
    static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t),
                  "futex needs a plain 32-bit atomic word");
    timespec ts;
    const timespec* tsp = nullptr;
    if (deadline != no_deadline) {
        if (Clock::now() >= deadline) return false;
        ts = to_timespec(deadline);
        tsp = &ts;
    }
    // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline (steady_clock
    // on Linux), so a retry after EINTR does not stretch the timeout.  Not
    // FUTEX_PRIVATE: the word may live in memory shared with other processes.
    long rc = ::syscall(SYS_futex, const_cast<std::atomic<std::uint32_t>*>(word), FUTEX_WAIT_BITSET, expected,
                        tsp, nullptr, FUTEX_BITSET_MATCH_ANY);
    if (rc == 0) return true;
    if (errno == ETIMEDOUT) return false;
    return true;  // EAGAIN (value changed) or EINTR: the caller re-checks
}

void futex_wake(const std::atomic<std::uint32_t>* word, int count) {
    ::syscall(SYS_futex, const_cast<std::atomic<std::uint32_t>*>(word), FUTEX_WAKE, count, nullptr, nullptr, 0);
}

// ---------------------------------------------------------------- robust mutex

namespace {
pthread_mutex_t* native(RobustMutex* m) noexcept { return reinterpret_cast<pthread_mutex_t*>(m->storage); }

LockResult lock_result(int rc, const char* what) {
    switch (rc) {
        case 0: return LockResult::acquired;
        case EOWNERDEAD: return LockResult::owner_died;
        case ETIMEDOUT: return LockResult::timed_out;
        case EBUSY: return LockResult::busy;
        default: throw std::system_error(rc, std::generic_category(), what);
    }
}
}  // namespace

void robust_mutex_init(RobustMutex* m) {
    static_assert(sizeof(pthread_mutex_t) <= sizeof(RobustMutex::storage), "RobustMutex storage too small");
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    // Error-checking: unlocking a mutex one does not hold is reported, not undefined.
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
    int rc = pthread_mutex_init(native(m), &a);
    pthread_mutexattr_destroy(&a);
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "mpservice: pthread_mutex_init");
}

LockResult robust_mutex_trylock(RobustMutex* m) {
    int rc = pthread_mutex_trylock(native(m));
    if (rc == EDEADLK) return LockResult::busy;  // held by the caller itself
    return lock_result(rc, "mpservice: mutex trylock");
}

LockResult robust_mutex_lock(RobustMutex* m, Deadline deadline) {
    // A blocking hand-off to another CPU costs ~30 us here while a critical
    // section is typically far shorter: spin a little before sleeping.
    for (int i = 0; i < 100; ++i) {
        LockResult r = robust_mutex_trylock(m);
        if (r != LockResult::busy) return r;
        cpu_relax();
    }
    if (deadline == no_deadline) return lock_result(pthread_mutex_lock(native(m)), "mpservice: mutex lock");
    timespec ts = to_timespec(deadline);
    return lock_result(pthread_mutex_clocklock(native(m), CLOCK_MONOTONIC, &ts), "mpservice: mutex lock");
}

void robust_mutex_unlock(RobustMutex* m) {
    int rc = pthread_mutex_unlock(native(m));
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "mpservice: mutex unlock");
}

void robust_mutex_consistent(RobustMutex* m) { pthread_mutex_consistent(native(m)); }

// ---------------------------------------------------------------- processes

long current_pid() noexcept { return static_cast<long>(::getpid()); }

bool pid_alive(long pid) noexcept {
    return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
}

// ---------------------------------------------------------------- (process/channel section)

// ---------------------------------------------------------------- (synchronization section)

// ---------------------------------------------------------------- (queue section)

void shm_prefault(void* addr, std::size_t size) noexcept {
#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and we skip it
#endif
    // Never touch the bytes ourselves: another process may be writing them.
    ::madvise(addr, size, MADV_POPULATE_WRITE);
#else
    (void)addr;
    (void)size;
#endif
}

}  // namespace mpservice::detail::os

#endif  // !_WIN32
// ---- end part: mpservice/impl/os_posix.cpp
// ---- begin part: mpservice/impl/shm.cpp -------------------------------------
// shm: SharedMemory and its codec.

namespace mpservice::detail {

SharedMemory::Mapping::~Mapping() {
    os::shm_unmap(addr, size);
    os::close_handle(handle);
}

SharedMemory SharedMemory::create(std::size_t size) {
    if (size == 0) throw std::invalid_argument("mpservice: shared memory of size 0");
    auto m = std::make_shared<Mapping>();
    m->handle = os::shm_create(size);
    m->size = size;
    m->addr = os::shm_map(m->handle, size);  // on throw, ~Mapping closes the handle
    SharedMemory s;
    s.m_ = std::move(m);
    return s;
}

SharedMemory SharedMemory::adopt(os::handle_t h) {
    auto m = std::make_shared<Mapping>();
    m->handle = h;
    m->size = os::shm_size(h);
    if (m->size == 0) throw DecodeError("decode: shared memory handle refers to an empty block");
    m->addr = os::shm_map(h, m->size);
    SharedMemory s;
    s.m_ = std::move(m);
    return s;
}

}  // namespace mpservice::detail

namespace mpservice {

void Codec<detail::SharedMemory>::encode(Encoder& e, const detail::SharedMemory& m) {
    if (!m) throw std::invalid_argument("mpservice: cannot send an empty shared-memory handle");
    e.write(e.attach(m.handle()));
}

detail::SharedMemory Codec<detail::SharedMemory>::decode(Decoder& d) {
    auto index = d.read<std::uint32_t>();
    // The channel owns the handles that arrived; this object keeps its own copy.
    return detail::SharedMemory::adopt(detail::os::duplicate_handle(d.handle(index)));
}

}  // namespace mpservice
// ---- end part: mpservice/impl/shm.cpp
// ---- begin part: mpservice/impl/remote_exception.cpp ------------------------
// remote_exception: implementation (to be written)
// ---- end part: mpservice/impl/remote_exception.cpp
// ---- begin part: mpservice/impl/logging.cpp ---------------------------------
// logging: implementation (to be written)
// ---- end part: mpservice/impl/logging.cpp
// ---- begin part: mpservice/impl/process.cpp ---------------------------------
// process: implementation (to be written)
// ---- end part: mpservice/impl/process.cpp
// ---- begin part: mpservice/impl/threading.cpp -------------------------------
// threading: implementation (to be written)
// ---- end part: mpservice/impl/threading.cpp
// ---- begin part: mpservice/impl/synchronize.cpp -----------------------------
// synchronize: implementation (to be written)
// ---- end part: mpservice/impl/synchronize.cpp
// ---- begin part: mpservice/impl/queues.cpp ----------------------------------
// queues: the shared byte ring under Queue<T> (layout and protocol in detail/queue_ring.hpp).
#include <algorithm>
#include <climits>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace mpservice::detail {

namespace {

constexpr std::uint32_t queue_magic = 0x5155455Au;  // "QUEZ"
constexpr std::uint32_t rec_whole = 1, rec_first = 2, rec_cont = 3, rec_last = 4, rec_pad = 5;
constexpr std::uint64_t small_header = 8;   // len u32 + kind u32
constexpr std::uint64_t first_header = 16;  // + total u64
constexpr std::uint64_t min_capacity = 256;
constexpr std::uint64_t max_capacity = std::uint64_t(1) << 40;
constexpr std::uint64_t ring_offset = 4096;  // the ring starts on its own page
// A reassembly or encoding buffer larger than this is given back after use.
constexpr std::size_t keep_buffer_bytes = std::size_t(64) << 20;

// A cross-CPU futex wake-up costs ~30 us on the machines we measured, a spin
// hand-off ~0.1 us: spin for a while before sleeping.
constexpr auto spin_budget = std::chrono::microseconds(20);
// How often a sleeper looks whether the other side's lock holder died.
constexpr auto probe_interval = std::chrono::milliseconds(20);

std::uint64_t align8(std::uint64_t n) noexcept { return (n + 7) & ~std::uint64_t(7); }

struct RecordHeader {
    std::uint32_t len;
    std::uint32_t kind;
};

[[noreturn]] void corrupt(const char* what) {
    throw Error(std::string("mpservice: queue memory is corrupt (") + what +
                "); was it written by something other than this library?");
}

/// Wakes sleepers on `w` if there may be any, right after a commit: the commit's
/// position store is seq_cst, and so is our load of the flag, which pairs with the
/// fence a waiter issues between raising the flag and re-checking its condition
/// (Dekker): either the waiter sees the new position or we see its flag.
void notify_after_commit(QueueWaitWord& w) noexcept {
    if (w.sleepers.load(std::memory_order_seq_cst) == 0) return;
    w.sleepers.store(0, std::memory_order_relaxed);  // sleepers that stay asleep raise it again
    w.seq.fetch_add(1, std::memory_order_release);
    os::futex_wake(&w.seq, INT_MAX);
}

/// The same after any other change of state.
void notify(QueueWaitWord& w) noexcept {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    notify_after_commit(w);
}

void notify_always(QueueWaitWord& w) noexcept {
    w.sleepers.store(0, std::memory_order_relaxed);
    w.seq.fetch_add(1, std::memory_order_seq_cst);
    os::futex_wake(&w.seq, INT_MAX);
}

/// Waits until pred() or the deadline: spins first, then sleeps on `w` in
/// slices, calling probe() between slices (to notice a dead lock holder).
/// Returns pred() as last seen.
template <class Pred, class Probe>
bool wait_until(QueueWaitWord& w, os::Deadline deadline, Pred&& pred, Probe&& probe) {
    if (pred()) return true;
    const auto spin_start = os::Clock::now();
    for (unsigned i = 1;; ++i) {
        os::cpu_relax();
        if (pred()) return true;
        if ((i & 31) == 0) {
            auto now = os::Clock::now();
            if (now >= deadline) return false;
            if (now - spin_start >= spin_budget) break;
        }
    }
    for (;;) {
        auto now = os::Clock::now();
        if (now >= deadline) return pred();
        // Read the sequence before raising the flag and re-checking: a notify
        // after this read changes it, so futex_wait then returns at once.
        std::uint32_t seq = w.seq.load(std::memory_order_acquire);
        w.sleepers.store(1, std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        if (pred()) return true;
        os::Deadline slice = (deadline - now > probe_interval) ? now + probe_interval : deadline;
        os::futex_wait(&w.seq, seq, slice);
        if (pred()) return true;
        probe();
    }
}

/// Unlocks a robust mutex at scope exit.
class Held {
public:
    explicit Held(os::RobustMutex* m) noexcept : m_(m) {}
    Held(const Held&) = delete;
    Held& operator=(const Held&) = delete;
    ~Held() { release(); }
    void release() noexcept {
        if (!m_) return;
        try {
            os::robust_mutex_unlock(m_);
        } catch (...) {
        }
        m_ = nullptr;
    }

private:
    os::RobustMutex* m_;
};

std::string& reassembly_buffer() {
    thread_local std::string buffer;
    return buffer;
}

bool kind_accepts(QueueKind wanted, std::uint32_t actual) noexcept {
    // A JoinableQueue is a Queue: a function taking Queue<T> may receive one.
    return actual == static_cast<std::uint32_t>(wanted) ||
           (wanted == QueueKind::queue && actual == static_cast<std::uint32_t>(QueueKind::joinable));
}

}  // namespace

// ---------------------------------------------------------------- creation

QueueCore QueueCore::create(QueueKind kind, std::uint64_t type_tag, std::size_t maxsize,
                            std::size_t capacity_bytes) {
    if (capacity_bytes == 0) throw std::invalid_argument("mpservice: a queue needs a capacity of at least 1 byte");
    if (capacity_bytes > max_capacity)
        throw std::invalid_argument("mpservice: queue capacity " + std::to_string(capacity_bytes) +
                                    " bytes is more than the 1 TiB supported");
    std::uint64_t capacity = std::max<std::uint64_t>(capacity_bytes, min_capacity);
    capacity = (capacity + 63) & ~std::uint64_t(63);
    static_assert(sizeof(QueueHeader) <= ring_offset, "queue header outgrew its page");
    static_assert(std::atomic<std::uint64_t>::is_always_lock_free, "queues need lock-free 64-bit atomics");

    QueueCore q;
    q.mem_ = SharedMemory::create(static_cast<std::size_t>(ring_offset + capacity));
    auto* h = ::new (q.mem_.data()) QueueHeader();
    h->kind = static_cast<std::uint32_t>(kind);
    h->type_tag = type_tag;
    h->capacity = capacity;
    h->maxsize = maxsize;
    h->ring_offset = ring_offset;
    os::robust_mutex_init(&h->put_lock);
    os::robust_mutex_init(&h->get_lock);
    std::atomic_thread_fence(std::memory_order_release);
    h->magic = queue_magic;
    q.h_ = h;
    q.ring_ = static_cast<unsigned char*>(q.mem_.data()) + ring_offset;
    os::shm_prefault(q.ring_, static_cast<std::size_t>(capacity));
    return q;
}

QueueCore QueueCore::attach(SharedMemory memory, QueueKind kind, std::uint64_t type_tag) {
    if (!memory || memory.size() < ring_offset) throw DecodeError("decode: shared block is too small to be a queue");
    auto* h = static_cast<QueueHeader*>(memory.data());
    if (h->magic != queue_magic) throw DecodeError("decode: shared block is not a queue");
    if (!kind_accepts(kind, h->kind))
        throw DecodeError("decode: the queue is of another kind (Queue, SimpleQueue or JoinableQueue) than expected");
    if (h->type_tag != type_tag) throw DecodeError("decode: the queue carries items of another type than expected");
    if (h->ring_offset != ring_offset || h->capacity < min_capacity || h->capacity % 64 != 0 ||
        h->capacity > memory.size() - ring_offset)
        throw DecodeError("decode: queue header does not match its shared block");
    QueueCore q;
    q.mem_ = std::move(memory);
    q.h_ = h;
    q.ring_ = static_cast<unsigned char*>(q.mem_.data()) + ring_offset;
    os::shm_prefault(q.ring_, static_cast<std::size_t>(h->capacity));
    return q;
}

std::string& QueueCore::encode_buffer() {
    thread_local std::string buffer;
    if (buffer.capacity() > keep_buffer_bytes) std::string().swap(buffer);
    return buffer;
}

// ---------------------------------------------------------------- commits and recovery
//
// Each side publishes a position and a counter.  A process can die between the
// two stores, so the new values go to a journal first; whoever takes the lock
// next and is told the owner died finishes the commit (both stores are
// idempotent).  A record's bytes are always complete before its commit starts.

void QueueCore::commit_put(std::uint64_t tail, std::uint64_t completed) noexcept {
    h_->j_tail = tail;
    h_->j_completed = completed;
    h_->j_put_active.store(1, std::memory_order_release);
    h_->completed.store(completed, std::memory_order_relaxed);
    h_->tail.store(tail, std::memory_order_seq_cst);  // publishes the record (and `completed`)
    h_->j_put_active.store(0, std::memory_order_release);
}

void QueueCore::commit_get(std::uint64_t head, std::uint64_t taken) noexcept {
    h_->j_head = head;
    h_->j_taken = taken;
    h_->j_get_active.store(1, std::memory_order_release);
    h_->taken.store(taken, std::memory_order_relaxed);
    h_->head.store(head, std::memory_order_seq_cst);  // hands the bytes back to producers
    h_->j_get_active.store(0, std::memory_order_release);
}

void QueueCore::recover_put() noexcept {
    if (h_->j_put_active.load(std::memory_order_acquire)) {
        h_->completed.store(h_->j_completed, std::memory_order_relaxed);
        h_->tail.store(h_->j_tail, std::memory_order_release);
        h_->j_put_active.store(0, std::memory_order_release);
    }
    // A chunked item its producer did not finish is abandoned: the consumer
    // reading it sees `streaming` change and discards what it has.
    h_->streaming.store(0, std::memory_order_release);
    os::robust_mutex_consistent(&h_->put_lock);
    notify(h_->data);
}

void QueueCore::recover_get() noexcept {
    if (h_->j_get_active.load(std::memory_order_acquire)) {
        h_->taken.store(h_->j_taken, std::memory_order_relaxed);
        h_->head.store(h_->j_head, std::memory_order_release);
        h_->j_get_active.store(0, std::memory_order_release);
    }
    // A chunked item the dead consumer was reading: its remaining chunks are
    // discarded by the next consumer (they arrive as orphan `cont` records).
    os::robust_mutex_consistent(&h_->get_lock);
    notify(h_->space);
}

void QueueCore::probe_producers() noexcept {
    try {
        auto r = os::robust_mutex_trylock(&h_->put_lock);
        if (r == os::LockResult::busy) return;
        Held held(&h_->put_lock);
        if (r == os::LockResult::owner_died) recover_put();
    } catch (...) {
    }
}

void QueueCore::probe_consumers() noexcept {
    try {
        auto r = os::robust_mutex_trylock(&h_->get_lock);
        if (r == os::LockResult::busy) return;
        Held held(&h_->get_lock);
        if (r == os::LockResult::owner_died) recover_get();
    } catch (...) {
    }
}

// ---------------------------------------------------------------- put

QueueCore::Status QueueCore::put(const void* data, std::size_t size, os::Deadline deadline) {
    if (closed()) return Status::closed;
    auto r = os::robust_mutex_lock(&h_->put_lock, deadline);
    if (r == os::LockResult::timed_out) return Status::timeout;
    Held held(&h_->put_lock);
    if (r == os::LockResult::owner_died) recover_put();
    if (closed()) return Status::closed;

    if (h_->maxsize) {
        auto below_maxsize = [&] {
            return h_->completed.load(std::memory_order_relaxed) - h_->taken.load(std::memory_order_acquire) <
                       h_->maxsize ||
                   closed();
        };
        if (!wait_until(h_->space, deadline, below_maxsize, [&] { probe_consumers(); })) return Status::timeout;
        if (closed()) return Status::closed;
    }
    if (small_header + align8(size) <= h_->capacity / 2) return put_whole(data, size, deadline);
    return put_chunked(data, size, deadline);
}

bool QueueCore::wait_for_room(std::uint64_t tail, std::uint64_t bytes, os::Deadline deadline,
                              bool give_up_on_close) {
    const std::uint64_t cap = h_->capacity;
    if (tail + bytes <= h_->head_cache + cap) return true;
    h_->head_cache = h_->head.load(std::memory_order_acquire);
    if (tail + bytes <= h_->head_cache + cap) return true;
    auto room = [&] {
        return tail + bytes <= h_->head.load(std::memory_order_acquire) + cap || (give_up_on_close && closed());
    };
    wait_until(h_->space, deadline, room, [&] { probe_consumers(); });
    h_->head_cache = h_->head.load(std::memory_order_acquire);
    return tail + bytes <= h_->head_cache + cap;
}

void QueueCore::write_pad(std::uint64_t tail, std::uint64_t bytes) {
    RecordHeader hdr{static_cast<std::uint32_t>(bytes - small_header), rec_pad};
    std::memcpy(at(tail), &hdr, sizeof hdr);
    commit_put(tail + bytes, h_->completed.load(std::memory_order_relaxed));
    notify_after_commit(h_->data);
}

QueueCore::Status QueueCore::put_whole(const void* data, std::size_t size, os::Deadline deadline) {
    const std::uint64_t cap = h_->capacity;
    std::uint64_t tail = h_->tail.load(std::memory_order_relaxed);
    const std::uint64_t bytes = small_header + align8(size);
    const std::uint64_t to_end = cap - tail % cap;
    if (to_end < bytes) {  // records never wrap: skip the ring's end
        if (!wait_for_room(tail, to_end, deadline, true)) return closed() ? Status::closed : Status::timeout;
        write_pad(tail, to_end);
        tail += to_end;
    }
    if (!wait_for_room(tail, bytes, deadline, true)) return closed() ? Status::closed : Status::timeout;
    unsigned char* rec = at(tail);
    RecordHeader hdr{static_cast<std::uint32_t>(size), rec_whole};
    std::memcpy(rec, &hdr, sizeof hdr);
    if (size) std::memcpy(rec + small_header, data, size);
    commit_put(tail + bytes, h_->completed.load(std::memory_order_relaxed) + 1);
    notify_after_commit(h_->data);
    return Status::ok;
}

QueueCore::Status QueueCore::put_chunked(const void* data, std::size_t size, os::Deadline deadline) {
    const std::uint64_t cap = h_->capacity;
    // Chunks of a quarter ring: the consumer copies one out while we write the next.
    const std::uint64_t chunk_bytes = cap / 4;
    const auto* src = static_cast<const unsigned char*>(data);
    std::uint64_t remaining = size;
    std::uint64_t tail = h_->tail.load(std::memory_order_relaxed);
    bool first = true;

    auto give_up = [&] {
        if (first) return closed() ? Status::closed : Status::timeout;
        // Mid-item: tell the consumer reading it to discard what it has.
        h_->streaming.store(0, std::memory_order_release);
        notify(h_->data);
        return Status::timeout;
    };

    while (remaining) {
        const std::uint64_t header = first ? first_header : small_header;
        std::uint64_t piece = std::min<std::uint64_t>(remaining, chunk_bytes - header);
        const std::uint64_t to_end = cap - tail % cap;
        if (to_end < header + std::min<std::uint64_t>(align8(piece), 64)) {
            if (!wait_for_room(tail, to_end, deadline, first)) return give_up();
            write_pad(tail, to_end);
            tail += to_end;
            continue;
        }
        piece = std::min(piece, to_end - header);
        const std::uint64_t bytes = header + align8(piece);
        if (!wait_for_room(tail, bytes, deadline, first)) return give_up();

        unsigned char* rec = at(tail);
        const bool done = piece == remaining;
        RecordHeader hdr{static_cast<std::uint32_t>(piece), first ? rec_first : done ? rec_last : rec_cont};
        std::memcpy(rec, &hdr, sizeof hdr);
        if (first) {
            std::uint64_t total = size;
            std::memcpy(rec + small_header, &total, sizeof total);
            // The item's id is its position; the consumer reading it watches this.
            h_->streaming.store(tail + 1, std::memory_order_relaxed);
        }
        std::memcpy(rec + header, src, piece);
        src += piece;
        remaining -= piece;
        commit_put(tail + bytes, h_->completed.load(std::memory_order_relaxed) + (done ? 1 : 0));
        tail += bytes;
        first = false;
        notify_after_commit(h_->data);
    }
    h_->streaming.store(0, std::memory_order_release);
    return Status::ok;
}

// ---------------------------------------------------------------- get

QueueCore::Status QueueCore::get(Consume consume, void* context, os::Deadline deadline) {
    auto something = [&] {
        return h_->tail.load(std::memory_order_acquire) != h_->head.load(std::memory_order_acquire) || closed();
    };
    // Look under the lock first: while items stream, a get then reads no line the
    // producers write, except the ring and (when its cached copy runs out) `tail`.
    for (bool first = true;; first = false) {
        if (!first && !wait_until(h_->data, deadline, something, [&] { probe_producers(); })) return Status::timeout;
        auto r = os::robust_mutex_lock(&h_->get_lock, deadline);
        if (r == os::LockResult::timed_out) return Status::timeout;
        Held held(&h_->get_lock);
        if (r == os::LockResult::owner_died) recover_get();

        for (;;) {
            const std::uint64_t head = h_->head.load(std::memory_order_relaxed);
            if (head == h_->tail_cache) h_->tail_cache = h_->tail.load(std::memory_order_acquire);
            if (head == h_->tail_cache) {
                // Empty.  Reading `closed` first makes every put that finished
                // before close() visible to the second look at the tail.
                bool was_closed = closed();
                h_->tail_cache = h_->tail.load(std::memory_order_acquire);
                if (head != h_->tail_cache) continue;
                if (was_closed) return Status::closed;
                break;  // unlock and wait again
            }
            const std::uint64_t cap = h_->capacity;
            unsigned char* rec = at(head);
            RecordHeader hdr;
            std::memcpy(&hdr, rec, sizeof hdr);
            if (hdr.kind < rec_whole || hdr.kind > rec_pad) corrupt("record kind");
            const std::uint64_t bytes = (hdr.kind == rec_first ? first_header : small_header) + align8(hdr.len);
            if (head % cap + bytes > cap || head + bytes > h_->tail_cache) corrupt("record length");
            const std::uint64_t taken = h_->taken.load(std::memory_order_relaxed);

            switch (hdr.kind) {
                case rec_pad:
                    commit_get(head + bytes, taken);
                    notify(h_->space);
                    continue;
                case rec_cont:
                case rec_last: {
                    // The rest of an item whose consumer died after taking its
                    // first chunk: that item is lost; drop the rest.  A complete
                    // item counts as taken and (for join) as done.
                    const bool last = hdr.kind == rec_last;
                    commit_get(head + bytes, taken + (last ? 1 : 0));
                    if (last) {
                        h_->tasks_done.fetch_add(1, std::memory_order_acq_rel);
                        notify(h_->joined);
                    }
                    notify(h_->space);
                    continue;
                }
                case rec_whole: {
                    // Decoded in place, under the lock: one copy, and a consumer
                    // killed while decoding leaves the item for the next one.
                    try {
                        consume(context, rec + small_header, hdr.len);
                    } catch (...) {
                        commit_get(head + bytes, taken + 1);
                        notify(h_->space);
                        throw;
                    }
                    commit_get(head + bytes, taken + 1);
                    notify_after_commit(h_->space);
                    return Status::ok;
                }
                default: {  // rec_first
                    std::string& buffer = reassembly_buffer();
                    std::uint64_t total = 0;
                    std::memcpy(&total, rec + small_header, sizeof total);
                    if (read_chunked(head, buffer) == Taken::discarded) continue;
                    held.release();
                    struct Shrink {
                        std::string& b;
                        ~Shrink() {
                            if (b.size() > keep_buffer_bytes) std::string().swap(b);
                        }
                    } shrink{buffer};
                    consume(context, reinterpret_cast<const unsigned char*>(buffer.data()),
                            static_cast<std::size_t>(total));
                    return Status::ok;
                }
            }
        }
    }
}

QueueCore::Taken QueueCore::read_chunked(std::uint64_t head, std::string& out) {
    const std::uint64_t cap = h_->capacity;
    RecordHeader hdr;
    std::memcpy(&hdr, at(head), sizeof hdr);
    std::uint64_t total = 0;
    std::memcpy(&total, at(head) + small_header, sizeof total);
    if (hdr.len > total) corrupt("first chunk longer than its item");
    if (out.size() < total) out.resize(static_cast<std::size_t>(total));
    std::memcpy(&out[0], at(head) + first_header, hdr.len);
    std::uint64_t received = hdr.len;
    const std::uint64_t id = head + 1;
    head += first_header + align8(hdr.len);
    std::uint64_t taken = h_->taken.load(std::memory_order_relaxed);
    if (received == total) ++taken;
    commit_get(head, taken);
    notify(h_->space);

    // The producer holds the put lock until the item is complete, so its chunks
    // follow one another.  It gives up (timeout) or dies: `streaming` changes.
    auto next_or_abandoned = [&] {
        return h_->streaming.load(std::memory_order_acquire) != id ||
               h_->tail.load(std::memory_order_acquire) != head;
    };
    while (received < total) {
        wait_until(h_->data, os::no_deadline, next_or_abandoned, [&] { probe_producers(); });
        const std::uint64_t streaming = h_->streaming.load(std::memory_order_acquire);
        const std::uint64_t tail = h_->tail.load(std::memory_order_acquire);
        if (tail == head) {
            if (streaming != id) return Taken::discarded;
            continue;
        }
        h_->tail_cache = tail;
        unsigned char* rec = at(head);
        std::memcpy(&hdr, rec, sizeof hdr);
        if (hdr.kind < rec_whole || hdr.kind > rec_pad) corrupt("record kind");
        const std::uint64_t bytes = (hdr.kind == rec_first ? first_header : small_header) + align8(hdr.len);
        if (head % cap + bytes > cap || head + bytes > tail) corrupt("record length");
        if (hdr.kind == rec_pad) {
            head += bytes;
            commit_get(head, taken);
            notify(h_->space);
            continue;
        }
        // A new item where our next chunk should be: ours was given up.
        if (hdr.kind != rec_cont && hdr.kind != rec_last) return Taken::discarded;
        if (received + hdr.len > total) corrupt("chunks longer than their item");
        std::memcpy(&out[static_cast<std::size_t>(received)], rec + small_header, hdr.len);
        received += hdr.len;
        if (received == total) ++taken;
        head += bytes;
        commit_get(head, taken);
        notify(h_->space);
    }
    return Taken::delivered;
}

// ---------------------------------------------------------------- state, close, join

std::size_t QueueCore::qsize() const noexcept {
    const std::uint64_t taken = h_->taken.load(std::memory_order_acquire);
    const std::uint64_t completed = h_->completed.load(std::memory_order_acquire);
    return completed > taken ? static_cast<std::size_t>(completed - taken) : 0;
}

bool QueueCore::full() const noexcept {
    if (h_->maxsize && qsize() >= h_->maxsize) return true;
    const std::uint64_t head = h_->head.load(std::memory_order_acquire);
    const std::uint64_t tail = h_->tail.load(std::memory_order_acquire);
    return tail - head + small_header > h_->capacity;
}

void QueueCore::close() noexcept {
    h_->closed.store(1, std::memory_order_seq_cst);
    notify_always(h_->data);
    notify_always(h_->space);
}

void QueueCore::task_done() {
    std::uint64_t done = h_->tasks_done.load(std::memory_order_acquire);
    for (;;) {
        if (done >= h_->completed.load(std::memory_order_acquire))
            throw std::invalid_argument("mpservice: JoinableQueue::task_done() called more times than items were put");
        if (h_->tasks_done.compare_exchange_weak(done, done + 1, std::memory_order_acq_rel)) break;
    }
    notify(h_->joined);
}

bool QueueCore::join(os::Deadline deadline) {
    auto all_done = [&] {
        return h_->tasks_done.load(std::memory_order_acquire) >= h_->completed.load(std::memory_order_acquire);
    };
    return wait_until(h_->joined, deadline, all_done, [&] { probe_producers(); });
}

}  // namespace mpservice::detail
// ---- end part: mpservice/impl/queues.cpp

#endif  // MPSERVICE_IMPLEMENTATION
