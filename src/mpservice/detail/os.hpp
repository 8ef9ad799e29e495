// os: the platform layer.  Every system call the library makes goes through a
// function declared here and defined in impl/os_posix.cpp (impl/os_win32.cpp is
// where a Windows back-end goes).  Nothing here includes a platform header, so
// the public parts stay free of <unistd.h> and <windows.h>.
//
// The declarations are grouped by the concern that needs them; each group has
// a matching section in the implementation file.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>
#include <typeinfo>
#include <vector>

#include "../public/config.hpp"
#include "../public/codec.hpp"  // detail::os::handle_t

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

// ---------------------------------------------------------------- remote exception / symbolization
/// Whether throw sites are recorded (see impl/os_posix_stacktrace.cpp: the
/// __cxa_throw interposition is off under sanitizers and MPSERVICE_NO_THROW_HOOK).
MPSERVICE_API bool throw_hook_active() noexcept;
/// Turns the recording of throw sites on or off at run time (default on).
MPSERVICE_API void set_throw_site_capture(bool enabled) noexcept;
/// Copies into `pcs` the return addresses recorded when `object` (of type
/// `type`) was last thrown by this thread; returns their number (0 if unknown).
MPSERVICE_API int throw_site_stack(const void* object, const std::type_info* type, void** pcs, int max) noexcept;
/// Records the calling stack, from the frame whose return address is `caller`
/// on, as the place where this thread re-raises `object` (read back by
/// raise_site_stack).
MPSERVICE_API void note_raise_site(const void* object, const void* caller) noexcept;
MPSERVICE_API int raise_site_stack(const void* object, void** pcs, int max) noexcept;
/// The caller's stack: up to `max` return addresses, skipping `skip` innermost
/// frames - or, if `from` is one of the return addresses, starting there.
MPSERVICE_API int capture_stack(void** pcs, int max, int skip, const void* from = nullptr) noexcept;

/// One symbolized stack frame.
struct StackFrame {
    const void* pc = nullptr;
    std::string function;  // demangled; empty if unknown
    std::string module;    // path of the executable or library
    std::uintptr_t offset = 0;  // pc relative to the module's load address
    std::string file;      // source file, if line information was found
    int line = 0;
    bool inlined = false;  // a function inlined into the next frame (same pc)
};
/// Names the functions at `pcs` (return addresses): dynamic symbols, the ELF
/// .symtab of each module (so static functions of an executable built without
/// -rdynamic are named), and file:line when line information is available.
MPSERVICE_API std::vector<StackFrame> symbolize(void* const* pcs, int n);
/// Whether symbolize looks up file:line (by running addr2line); default true.
MPSERVICE_API void set_line_lookup(bool enabled) noexcept;
/// Demangles a C++ type or symbol name; returns it unchanged if it is not mangled.
MPSERVICE_API std::string demangle(const char* mangled);
/// Type of the exception currently being handled (inside a catch clause), or null.
MPSERVICE_API const std::type_info* current_exception_type() noexcept;
/// Address of the thrown object an exception_ptr refers to (the key of the
/// throw-site table), or null.
MPSERVICE_API const void* exception_object(const std::exception_ptr& e) noexcept;

// ---------------------------------------------------------------- logging
/// Writes all of `data` to the standard error stream, in one write() when the
/// system allows it (so lines of several processes do not interleave).
MPSERVICE_API void write_stderr(const char* data, std::size_t n) noexcept;
/// Local calendar time of `seconds` since the epoch (thread-safe localtime).
MPSERVICE_API void local_time(long long seconds, int fields[6]) noexcept;

// ---------------------------------------------------------------- (process/channel section: process.hpp)

// ---------------------------------------------------------------- (synchronization section)

// ---------------------------------------------------------------- (queue section)

}  // namespace mpservice::detail::os
