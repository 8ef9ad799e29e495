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
#include <new>
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

/// The end of one bounded sleep of a wait that ends at `deadline`: `slice`
/// from now, or the deadline if that comes first.  The library's blocking
/// waits sleep in slices and look again after each, because a wake-up can be
/// lost to a process that dies or stops at the wrong instant (each caller
/// says how); the slice bounds what such a loss costs.
inline Deadline sleep_slice_end(Deadline deadline, Clock::duration slice) noexcept {
    const Deadline now = Clock::now();
    return deadline - now > slice ? now + slice : deadline;
}

/// Deadline `timeout` from now; a negative timeout means "already expired",
/// and a huge one saturates to no_deadline instead of overflowing.
/// `d` in seconds, in plain arithmetic on its count: a conversion to
/// std::chrono::duration<double> in a header template would be instantiated
/// in every includer.
template <class Rep, class Period>
double seconds_of(std::chrono::duration<Rep, Period> d) {
    return static_cast<double>(d.count()) * Period::num / Period::den;
}

template <class Rep, class Period>
Deadline deadline_after(std::chrono::duration<Rep, Period> timeout) {
    auto now = Clock::now();
    if (timeout <= timeout.zero()) return now;
    if (seconds_of(timeout) > seconds_of(no_deadline - now)) return no_deadline;
    return now + std::chrono::duration_cast<Clock::duration>(timeout);
}

// ---------------------------------------------------------------- handles
inline constexpr handle_t invalid_handle = handle_t(-1);
/// Closes a handle; invalid_handle is ignored.  Never throws.
MPSERVICE_API void close_handle(handle_t h) noexcept;
/// Duplicates a handle (close-on-exec); throws std::system_error.
MPSERVICE_API handle_t duplicate_handle(handle_t h);
/// Whether `h` is an open handle of this process.
MPSERVICE_API bool handle_valid(handle_t h) noexcept;

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
struct alignas(8) RobustMutex {
    // 48 bytes hold glibc's pthread_mutex_t (40 on x86-64, 48 on AArch64) and
    // leave a user of a 64-byte cache line room for its own fields beside it.
    unsigned char storage[48];
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
/// -rdynamic are named), and file:line when line information is available:
/// for every frame, or, given `last_line_frame`, for the frames up to the
/// first whose function it accepts (the caller shows none beyond it).
MPSERVICE_API std::vector<StackFrame> symbolize(void* const* pcs, int n,
                                                bool (*last_line_frame)(const std::string& function) = nullptr);
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

// ---------------------------------------------------------------- process/channel section (process.hpp)
// Channels are Unix stream sockets: ordered bytes plus handles riding beside
// them (SCM_RIGHTS), so a Lock or Queue passed as a Process argument reaches
// the child as the very same kernel object.

/// A connected pair of channel ends (stream, close-on-exec): {a, b}.
MPSERVICE_API void channel_pair(handle_t& a, handle_t& b);
/// A connected pair of datagram-like ends (message boundaries kept).
MPSERVICE_API void packet_pair(handle_t& a, handle_t& b);
/// Writes all of `a` then `b` (either may be empty) with `handles` attached;
/// blocks until done.  Any number of handles: the system takes a limited
/// number per message (253 on Linux), so they ride on successive bytes in
/// batches, in order (the bytes must be at least as many as the batches;
/// std::invalid_argument otherwise).  Returns false if the peer is gone (no
/// SIGPIPE is raised); throws std::system_error on other errors.
MPSERVICE_API bool channel_write(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                                 const handle_t* handles = nullptr, std::size_t nhandles = 0);
/// Reads what is there, up to `cap` bytes; handles that arrive are appended to
/// `*handles` (close-on-exec).  Returns the byte count, 0 at end of stream, or
/// -1 when `nonblocking` and nothing is ready.  Throws std::system_error
/// (EMFILE) if handles were lost because this process has no room for them.
MPSERVICE_API long channel_read(handle_t ch, void* buf, std::size_t cap, std::vector<handle_t>* handles,
                                bool nonblocking);
/// Blocks until one of `hs` is readable or `timeout_ms` passes (-1 = forever);
/// returns a bit mask of the readable ones (bit i = hs[i]).
MPSERVICE_API unsigned wait_readable(const handle_t* hs, int n, int timeout_ms);

/// A poller watches many handles for readability (epoll on Linux); each
/// registration carries a caller token.  Thread-safe registration.
MPSERVICE_API handle_t poller_create();
MPSERVICE_API void poller_add(handle_t poller, handle_t h, std::uint64_t token);
MPSERVICE_API void poller_remove(handle_t poller, handle_t h) noexcept;
/// Waits for events; stores up to `max` tokens; returns how many.
MPSERVICE_API int poller_wait(handle_t poller, std::uint64_t* tokens, int max, int timeout_ms);
/// A wake-up event (eventfd) that a poller can watch.
MPSERVICE_API handle_t wake_event_create();
MPSERVICE_API void wake_event_signal(handle_t ev) noexcept;
MPSERVICE_API void wake_event_drain(handle_t ev) noexcept;

/// Starts a fresh instance of this program (/proc/self/exe) with argv
/// {argv0, marker}; `inherit` is the one handle it inherits (same number);
/// `environment` ("NAME=value" entries) replaces this process's environment
/// when given.  Returns the child's pid.
MPSERVICE_API long spawn_self(const std::string& argv0, const std::string& marker, handle_t inherit,
                              const std::vector<std::string>* environment = nullptr);
/// fork(): 0 in the child, the child's pid in the parent; throws on failure.
/// The child starts with default signal handlers and no blocked signals.
MPSERVICE_API long fork_process();
/// A handle that becomes readable when process `pid` exits (pidfd); invalid
/// where the system has none.
MPSERVICE_API handle_t process_handle(long pid) noexcept;
/// What reap_child found.
enum class ReapResult {
    running,           ///< not ended yet (only without `block`)
    reaped,            ///< ended; *exitcode holds its status
    reaped_elsewhere,  ///< ended, but its status went to someone else: SIGCHLD
                       ///< ignored (the kernel discards it) or another waiter
                       ///< (e.g. a SIGCHLD handler calling waitpid(-1))
};
/// Reaps child `pid` (waiting if `block`) through `process_handle` when it is
/// valid (waitid(P_PIDFD): never another process that reused the pid), and
/// stores the Python-style exit code (n after exit(n), -N after signal N).
/// Throws std::system_error on unexpected errors.
MPSERVICE_API ReapResult reap_child(long pid, handle_t process_handle, bool block, int* exitcode);
/// Reaps any ended child without waiting: true with its pid and exit code.
MPSERVICE_API bool reap_any_child(long* pid, int* exitcode);
/// Sends `sig` (through the process handle when valid, so a reused pid is never hit).
MPSERVICE_API bool send_signal(long pid, handle_t process_handle, int sig) noexcept;
MPSERVICE_API int signal_terminate() noexcept;  // SIGTERM
MPSERVICE_API int signal_kill() noexcept;       // SIGKILL
/// "SIGSEGV", "SIGKILL", ... ("signal N" when unknown).
MPSERVICE_API std::string signal_name(int sig);
MPSERVICE_API long parent_pid() noexcept;
/// Whether this process runs in secure-execution mode (set-user-ID,
/// set-group-ID or file capabilities: AT_SECURE), where it must not trust
/// what its caller set up.
MPSERVICE_API bool secure_execution() noexcept;
/// The process and user at the other end of a local channel, as the system
/// recorded them when the channel was made; false if `h` is not such a channel.
MPSERVICE_API bool channel_peer(handle_t h, long* pid, long* uid) noexcept;
/// The handle of the channel whose value `marked` the spawn marker carries, in
/// this (child) process: `marked` itself where the system inherits it (POSIX);
/// on Windows, where spawn_self lets the child take it from `parent` instead
/// (Wine cannot use an inherited socket), a copy taken from the parent.
/// invalid_handle if it cannot be had.
MPSERVICE_API handle_t adopt_channel(handle_t marked, long parent) noexcept;
/// Whether `uid` is this process's real and effective user.
MPSERVICE_API bool is_own_user(long uid) noexcept;
/// Arranges for this process to be killed when its parent dies, then checks
/// that the parent is still `expected_parent` (closing the race); false if not.
MPSERVICE_API bool die_with_parent(long expected_parent) noexcept;
/// Starts a process that shares this process's address space and holds it
/// until this process has ended: this process's exit then skips the address
/// space's teardown (hundreds of microseconds for an exec'd program, all of
/// it before its parent can see the exit), which the holder does afterwards,
/// off the parent's path.  The holder is a child of this process's *parent*
/// (which must reap it), runs no library code and only waits.  Its pid, or 0
/// where there is none (not Linux, no pidfd).  Called once per process.
MPSERVICE_API long hold_address_space_past_exit() noexcept;
/// Puts every caught signal back to its default action and unblocks all
/// signals (a forked child starts like an exec'd one; ignored signals stay ignored).
MPSERVICE_API void reset_signal_handlers() noexcept;
/// The calling thread's stack (lowest address and size); false if unknown.
MPSERVICE_API bool current_thread_stack(void** low, std::size_t* size) noexcept;
/// Tells a leak checker, if one is linked in, that `p..p+size` holds live
/// pointers (a forked child still has the memory of threads it does not have).
MPSERVICE_API void leak_checker_root(const void* p, std::size_t size) noexcept;
/// Closes every handle above the standard ones except `keep`.
MPSERVICE_API void close_handles_except(handle_t keep) noexcept;
/// Ends the process at once with `code`: no atexit handlers, no destructors.
[[noreturn]] MPSERVICE_API void exit_now(int code) noexcept;
/// Makes exit(n) in this process call hook(n) (after the handlers registered
/// later, as atexit); false where the platform cannot tell the status.
MPSERVICE_API bool on_exit_status(void (*hook)(int status) noexcept) noexcept;
/// Whether the caller runs on the process's initial thread.
MPSERVICE_API bool is_main_thread() noexcept;
/// Blocks child-exit notifications for the calling (single-threaded) process
/// and returns a handle that becomes readable when a child ends (signalfd).
MPSERVICE_API handle_t child_exit_events();
/// Consumes the pending notifications of a child_exit_events handle.
MPSERVICE_API void child_exit_events_drain(handle_t h) noexcept;
/// Undoes child_exit_events in a freshly forked child: closes `h`, unblocks.
MPSERVICE_API void child_exit_events_release(handle_t h) noexcept;

/// Where a code address lives: the module (path as the loader knows it, ""
/// for the main executable) and the offset from the module's load base, which
/// stays valid across an exec of the same build.
struct ModuleAddress {
    std::string module;
    std::uintptr_t offset = 0;
};
MPSERVICE_API bool module_address(const void* addr, ModuleAddress& out);
/// The address of `offset` in `module` in this process (loading the module if
/// needed); nullptr if it cannot be found.
MPSERVICE_API const void* module_resolve(const ModuleAddress& where);
/// An identity of the module's build: its GNU build-id, or - when it has
/// none - the file's device, inode, size and modification time.
MPSERVICE_API std::string module_fingerprint(const std::string& module);

/// CPUs this process may run on (affinity mask).
MPSERVICE_API int affinity_cpu_count() noexcept;
/// The CPU bandwidth quota of this process's cgroup in CPUs (v2 cpu.max or
/// v1 cfs quota), or 0 if there is none.
MPSERVICE_API double cgroup_cpu_quota() noexcept;


// ---------------------------------------------------------------- (synchronization section)
/// robust_mutex_lock without its spinning: straight to the blocking wait (for
/// callers that spin in their own, adaptive way first).
MPSERVICE_API LockResult robust_mutex_lock_blocking(RobustMutex* m, Deadline deadline = no_deadline);
/// The uncontended paths of robust_mutex_trylock and robust_mutex_unlock, for
/// callers that inline their own fast path: 0 means taken (released), anything
/// else is a status for robust_mutex_trylock_result (robust_mutex_unlock_failed).
/// They only forward to the system, so they compile to a tail jump: the
/// result mapping of the full functions is an extra call frame per operation,
/// ~20% of an uncontended acquire+release.
MPSERVICE_API int robust_mutex_trylock_status(RobustMutex* m) noexcept;
MPSERVICE_API int robust_mutex_unlock_status(RobustMutex* m) noexcept;
/// busy (EBUSY, or held by the caller) or owner_died; throws std::system_error otherwise.
/// A busy status need not have looked at the holder (Win32 only compares the
/// word): a caller that gives up on busy asks robust_mutex_trylock, which
/// reports a holder that ended as owner_died.
MPSERVICE_API LockResult robust_mutex_trylock_result(int status);
/// Throws the std::system_error of a failed unlock.
[[noreturn]] MPSERVICE_API void robust_mutex_unlock_failed(int status);
/// The calling thread's kernel id: unique among the live threads of every process.
MPSERVICE_API long current_tid() noexcept;
/// Registers fn to run in the child after every fork() (not after exec).
MPSERVICE_API void at_fork_child(void (*fn)());
/// Runs fn(arg) when the calling thread ends, after its thread_local objects
/// are gone (fn must not use any).  The process's initial thread runs them at
/// exit on POSIX, never on Windows (the process's end frees what they hold).
MPSERVICE_API void at_thread_exit(void (*fn)(void*), void* arg);

/// The calling thread's T, made on first use and destroyed by at_thread_exit:
/// for per-thread state with a destructor that matters (one per type: give
/// each use a struct of its own).  Not a thread_local T,
/// because with MinGW-w64 (GCC's emulated TLS over winpthreads) a thread's
/// thread_local objects are destroyed after their storage was freed: emutls
/// frees it in a pthread key destructor that runs before the key destructor
/// that runs the thread_local destructors (issue 14).  Not to be used from
/// code that runs at thread exit itself.
template <class T>
T& thread_object() {
    thread_local T* p = nullptr;  // trivially destructible: nothing runs on its freed storage
    if (!p) {
        T* fresh = new T();
        try {
            at_thread_exit([](void* q) { delete static_cast<T*>(q); }, fresh);
        } catch (...) {
            delete fresh;
            throw;
        }
        p = fresh;
    }
    return *p;
}

/// A library lock that fork() must not copy while another thread holds it (the
/// child would have the lock held by a thread it does not have: a deadlock).
/// Before every fork() of this process the registered locks are taken, lowest
/// rank first (outer locks first), so that the state they guard is consistent
/// in the copy; after it they are released in the parent and made afresh,
/// unlocked, in the child.  A lock still busy after a bounded wait (its holder
/// waits for the forking thread, say) is left alone in the parent.
struct ForkLock {
    bool (*try_lock)(void* lock);
    void (*unlock)(void* lock);
    void (*reinit)(void* lock);
    void* lock;
    int rank;
};
MPSERVICE_API void at_fork_protect(const ForkLock& lock) noexcept;
/// Whether the C++ allocator can be used in a fork child whose parent had other
/// threads allocating: false only under an AddressSanitizer runtime that keeps
/// its allocator's locks across fork() unguarded and whose locks this library
/// cannot reach (os_posix.cpp: before LLVM 18, linked as a shared library).
MPSERVICE_API bool allocator_fork_safe() noexcept;
/// at_fork_protect for a std::mutex or std::recursive_mutex that lives for
/// the rest of the process.  Register a lock before any thread can take it
/// (at static initialization): a registration racing a fork cannot protect.
template <class Mutex>
void at_fork_protect(Mutex* m, int rank) noexcept {
    at_fork_protect(ForkLock{[](void* p) { return static_cast<Mutex*>(p)->try_lock(); },
                             [](void* p) { static_cast<Mutex*>(p)->unlock(); },
                             [](void* p) { ::new (p) Mutex(); },  // over the copy held by a thread that is gone
                             m, rank});
}
/// Whether a process with this id exists and has not ended: unlike pid_alive,
/// a zombie (killed or exited, not yet reaped) counts as ended.
MPSERVICE_API bool process_running(long pid) noexcept;

/// A code address in a form that stays valid in another process running the
/// same program, however its modules were placed (ASLR, exec): the module,
/// named by a hash of its path as the dynamic loader lists it, and the offset
/// from the module's load base.
struct CodeRef {
    std::uint64_t module = 0;  // 0: no code
    std::uint64_t offset = 0;
    bool empty() const noexcept { return module == 0; }
};
/// The CodeRef of an address inside a loaded module; throws std::invalid_argument if there is none.
MPSERVICE_API CodeRef code_ref_of(const void* address);
/// The address in this process, or nullptr if the module is not loaded here or
/// the offset is not inside its executable code.
MPSERVICE_API const void* code_ref_resolve(const CodeRef& ref) noexcept;


// ---------------------------------------------------------------- (synchronization fixes: fix-sync)
/// Sleeps until `deadline` (steady clock); returns at once if it has passed.
MPSERVICE_API void sleep_until(Deadline deadline) noexcept;
/// Whether a thread of *this* process holds the robust mutex now: its owner,
/// as the kernel's robust-futex protocol records it, is one of our threads.
/// (A block of shared memory holding such a mutex must stay mapped until that
/// thread ends, or the kernel cannot mark the mutex as its owner's death.)
MPSERVICE_API bool robust_mutex_held_in_this_process(const RobustMutex* m) noexcept;
/// Whether some thread sleeps in the kernel waiting for the robust mutex (the
/// waiters bit of its futex word; false where the word cannot be read).  A hint:
/// it may change at once.
MPSERVICE_API bool robust_mutex_has_sleepers(const RobustMutex* m) noexcept;

/// Gives the pages of bytes [offset, offset + size) of shared memory `h` back
/// to the system (they read as zeros afterwards, in every process that maps
/// them); offset and size are multiples of page_size().  Best effort.
MPSERVICE_API void shm_release(handle_t h, std::size_t offset, std::size_t size) noexcept;
/// The size of a memory page.
MPSERVICE_API std::size_t page_size() noexcept;

// ---------------------------------------------------------------- (queue section)
/// Populates the page tables of a shared mapping now (writable, or readable
/// only), so the first pass of data through it does not pay a page fault per
/// 4 KiB.  Best effort; never changes the bytes.
MPSERVICE_API void shm_prefault(void* addr, std::size_t size, bool for_write = true) noexcept;

// ---------------------------------------------------------------- (connection section)
// Pipe/Connection (connection.hpp) use channel_pair's stream sockets with
// non-blocking writes, so that a sender can also take in what its peer sends
// while it waits for room, and a waiter can notice close() from another thread.

/// Readiness bits of wait_io.
inline constexpr unsigned io_readable = 1;  ///< data, end of stream or an error: a read will not block
inline constexpr unsigned io_writable = 2;  ///< room, or the peer is gone: a write will not block
/// Writes what the socket takes now of `a` then `b`, without waiting; `handles`
/// ride on the first byte written (pass them only with a message's first
/// bytes).  Returns the bytes written, 0 when there is no room (nothing was
/// written, handles not sent), -1 when the peer is gone (no SIGPIPE is raised);
/// throws std::system_error on other errors.
MPSERVICE_API long channel_write_some(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                                      const handle_t* handles = nullptr, std::size_t nhandles = 0);
/// Waits until `h` is ready for one of `want` (io_readable | io_writable) or
/// `timeout_ms` passes (-1 = forever); returns the ready bits (0 on timeout).
MPSERVICE_API unsigned wait_io(handle_t h, unsigned want, int timeout_ms);
/// Waits until one of the `n` handles (any number) is readable or `timeout_ms`
/// passes; sets ready[i] to 1 for the readable ones and returns their number.
MPSERVICE_API std::size_t wait_readable_any(const handle_t* hs, std::size_t n, int timeout_ms, unsigned char* ready);

// ---------------------------------------------------------------- (output forwarding section)
// A child's standard output and error can go through pipes that the parent's
// reactor reads (Process::set_forward_output).

/// A pipe: {read end (non-blocking), write end (blocking)}, both close-on-exec.
MPSERVICE_API void output_pipe(handle_t& read_end, handle_t& write_end);
/// Reads what is in a pipe without waiting: the byte count, 0 at end of
/// stream (every write end closed), -1 if nothing is there now.
MPSERVICE_API long pipe_read(handle_t h, void* buf, std::size_t cap) noexcept;
/// Makes `out` this process's standard output and `err` its standard error
/// (descriptors 1 and 2, inherited by programs it starts; the two handles stay
/// open for the caller to close), and makes stdout line-buffered as it would
/// be on a terminal.
MPSERVICE_API void redirect_standard_output(handle_t out, handle_t err);

// ---------------------------------------------------------------- (server process section)
/// A listening Unix stream socket at a fresh, unguessable address (Linux: the
/// abstract namespace, so nothing appears in the file system and nothing is
/// left behind); `address` receives the name to connect to.  Close-on-exec.
MPSERVICE_API handle_t listener_create(std::string& address);
/// Waits for the next connection; invalid_handle once the listener was shut
/// down (listener_shutdown) or on an unrecoverable error.
MPSERVICE_API handle_t listener_accept(handle_t listener);
/// Makes a blocked listener_accept return invalid_handle.
MPSERVICE_API void listener_shutdown(handle_t listener) noexcept;
/// Connects to a listener_create address; throws std::system_error.
MPSERVICE_API handle_t unix_connect(const std::string& address);
/// The user id of the process at the other end of a connected socket, or -1.
MPSERVICE_API long peer_user(handle_t socket) noexcept;
/// This process's (real) user id.
MPSERVICE_API long current_user() noexcept;
/// Ends both directions of a socket: reads at either end return end-of-stream.
MPSERVICE_API void socket_shutdown(handle_t socket) noexcept;
/// Fills `out` with `n` random bytes from the system's generator.
MPSERVICE_API void random_bytes(void* out, std::size_t n);
/// Number of open descriptors and of memory mappings of this process (diagnostics; -1 if unknown).
MPSERVICE_API long open_handle_count() noexcept;
MPSERVICE_API long mapping_count() noexcept;
// ---- the working directory and environment (fork-server workers adopt the parent's)

/// This process's working directory ("" if it cannot be named, e.g. deleted).
MPSERVICE_API std::string current_directory();
/// chdir; false if it failed.
MPSERVICE_API bool change_directory(const std::string& path) noexcept;
/// Every "NAME=value" entry of this process's environment.
MPSERVICE_API std::vector<std::string> environment_entries();
/// Replaces the whole environment by `entries` ("NAME=value").  Single-threaded
/// processes only (the environment is not thread-safe).
MPSERVICE_API void replace_environment(const std::vector<std::string>& entries);

}  // namespace mpservice::detail::os
