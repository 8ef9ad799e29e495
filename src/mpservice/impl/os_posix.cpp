// os_posix: the POSIX (Linux first) back-end of detail/os.hpp.  This file is
// the only place that includes POSIX headers or makes system calls.
#if !defined(_WIN32)

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <mutex>
#include <system_error>

#include <dirent.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__linux__)
#include <linux/falloc.h>
#include <linux/futex.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/auxv.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#endif
// synchronization section
#include <cstdio>
#include <cstring>
#include <link.h>
#include <stdexcept>

extern char** environ;
// LeakSanitizer's interface, when it is linked in (weak: absent otherwise).
extern "C" void __lsan_register_root_region(const void* p, std::size_t size) __attribute__((weak));

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

bool handle_valid(handle_t h) noexcept { return h >= 0 && ::fcntl(h, F_GETFD) != -1; }

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

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MPSERVICE_TSAN 1
#endif
#if __has_feature(address_sanitizer)
#define MPSERVICE_DETAIL_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define MPSERVICE_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#define MPSERVICE_DETAIL_ASAN 1
#endif
// Both compilers ship the annotation interface with their TSan runtime.
#if defined(MPSERVICE_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

namespace {
/// One bounded sleep for the mutex, until `until` (steady clock).
int lock_until_once(RobustMutex* m, Deadline until) {
#if defined(MPSERVICE_TSAN)
    // ThreadSanitizer (LLVM 14) does not intercept pthread_mutex_clocklock and
    // then loses track of the mutex; under it, use timedlock, whose deadline is
    // on the wall clock (a clock step shifts the timeout - acceptable in tests).
    auto left = until - Clock::now();
    auto wall = std::chrono::system_clock::now() + std::chrono::duration_cast<std::chrono::system_clock::duration>(left);
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(wall.time_since_epoch()).count();
    timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    const int rc = pthread_mutex_timedlock(native(m), &ts);
    // Its timedlock interceptor records only a plain success as taking the
    // lock; a dead owner's lock is ours too (its pthread_mutex_lock knows).
    if (rc == EOWNERDEAD) {
        __tsan_mutex_pre_lock(native(m), __tsan_mutex_try_lock);
        __tsan_mutex_post_lock(native(m), __tsan_mutex_try_lock, 1);
    }
    return rc;
#else
    // An absolute deadline on the monotonic clock: immune to wall-clock steps.
    timespec ts = to_timespec(until);
    return pthread_mutex_clocklock(native(m), CLOCK_MONOTONIC, &ts);
#endif
}

/// How long one kernel sleep for a robust mutex lasts at most.  The robust
/// futex protocol can lose a wake-up: the unlocker clears the word (and its
/// waiters bit) and wakes one sleeper; if that sleeper is killed before it
/// takes the lock and a third thread takes it first (a trylock, which does
/// not set the waiters bit), the kernel's death handling sees an owner and
/// wakes nobody, and the new owner's unlock sees no waiters.  The remaining
/// sleepers would sleep forever (seen under ThreadSanitizer's timing).  A
/// sleeper that wakes at the end of its slice re-marks the word as contended,
/// so the next unlock wakes it: the cost of the race is one slice of latency,
/// the cost of a long wait is a few wake-ups a second.
constexpr auto kLockSleepSlice = std::chrono::milliseconds(200);

/// Blocks for the mutex until `deadline` (steady clock), in bounded slices.
LockResult lock_until(RobustMutex* m, Deadline deadline) {
    for (;;) {
        const Deadline until = sleep_slice_end(deadline, kLockSleepSlice);
        const int rc = lock_until_once(m, until);
        if (rc == ETIMEDOUT && until != deadline) continue;  // a slice ended, not the wait
        return lock_result(rc, "mpservice: mutex lock");
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
    return lock_until(m, deadline);
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

// ---------------------------------------------------------------- logging

void write_stderr(const char* data, std::size_t n) noexcept {
    while (n > 0) {
        ssize_t k = ::write(STDERR_FILENO, data, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            return;  // nowhere to report a failure to write to stderr
        }
        data += k;
        n -= static_cast<std::size_t>(k);
    }
}

void local_time(long long seconds, int fields[6]) noexcept {
    time_t t = static_cast<time_t>(seconds);
    struct tm tm {};
    if (!::localtime_r(&t, &tm)) ::gmtime_r(&t, &tm);
    fields[0] = tm.tm_year + 1900;
    fields[1] = tm.tm_mon + 1;
    fields[2] = tm.tm_mday;
    fields[3] = tm.tm_hour;
    fields[4] = tm.tm_min;
    fields[5] = tm.tm_sec;
}

// ---------------------------------------------------------------- process/channel section

namespace {
void socket_pair(int type, handle_t& a, handle_t& b) {
    int sv[2];
    if (::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) != 0) throw_errno("mpservice: socketpair");
    a = sv[0];
    b = sv[1];
}
// Linux passes at most this many descriptors in one message (SCM_MAX_FD).
constexpr std::size_t max_handles_per_message = 253;
}  // namespace

void channel_pair(handle_t& a, handle_t& b) { socket_pair(SOCK_STREAM, a, b); }
void packet_pair(handle_t& a, handle_t& b) { socket_pair(SOCK_SEQPACKET, a, b); }

namespace {
/// Writes all of the bytes in `iov` (advancing it), with `handles` (at most
/// max_handles_per_message) attached to the first byte sent.
bool send_all(handle_t ch, iovec*& cur, int& niov, const handle_t* handles, std::size_t nhandles, std::size_t limit) {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_handles_per_message)];
    bool handles_pending = nhandles > 0;
    for (;;) {
        while (niov > 0 && cur->iov_len == 0) ++cur, --niov;
        if (niov == 0 || limit == 0) return true;
        // Send at most `limit` bytes: the next batch of handles rides on the byte after them.
        iovec part[2];
        int nparts = 0;
        std::size_t room = limit;
        for (int i = 0; i < niov && i < 2 && room > 0; ++i) {
            std::size_t take = std::min(room, cur[i].iov_len);
            part[nparts++] = iovec{cur[i].iov_base, take};
            room -= take;
        }
        msghdr msg{};
        msg.msg_iov = part;
        msg.msg_iovlen = static_cast<std::size_t>(nparts);
        if (handles_pending) {
            std::memset(control, 0, sizeof control);
            msg.msg_control = control;
            msg.msg_controllen = CMSG_SPACE(sizeof(int) * nhandles);
            cmsghdr* c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * nhandles);
            std::memcpy(CMSG_DATA(c), handles, sizeof(int) * nhandles);
        }
        ssize_t n = ::sendmsg(ch, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {  // a non-blocking end: wait until there is room
                pollfd p{ch, POLLOUT, 0};
                ::poll(&p, 1, -1);
                continue;
            }
            if (errno == EPIPE || errno == ECONNRESET) return false;
            throw_errno("mpservice: sendmsg");
        }
        handles_pending = false;
        auto left = static_cast<std::size_t>(n);
        limit -= left;
        while (niov > 0 && left >= cur->iov_len) left -= cur->iov_len, ++cur, --niov;
        if (niov > 0) {
            cur->iov_base = static_cast<char*>(cur->iov_base) + left;
            cur->iov_len -= left;
        }
    }
}
}  // namespace

bool channel_write(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                   const handle_t* handles, std::size_t nhandles) {
    std::size_t batches = (nhandles + max_handles_per_message - 1) / max_handles_per_message;
    if (batches > na + nb)
        throw std::invalid_argument("mpservice: " + std::to_string(nhandles) + " OS handles need at least " +
                                    std::to_string(batches) + " bytes to ride on");
    iovec iov[2] = {{const_cast<void*>(a), na}, {const_cast<void*>(b), nb}};
    int niov = 2;
    iovec* cur = iov;
    // Every batch but the last rides alone on one byte (the receiver gets the
    // batches one per read, in order); the last one carries the rest.
    for (std::size_t i = 0; i + 1 < batches; ++i)
        if (!send_all(ch, cur, niov, handles + i * max_handles_per_message, max_handles_per_message, 1)) return false;
    std::size_t done = batches ? (batches - 1) * max_handles_per_message : 0;
    return send_all(ch, cur, niov, handles + done, nhandles - done, static_cast<std::size_t>(-1));
}

long channel_read(handle_t ch, void* buf, std::size_t cap, std::vector<handle_t>* handles, bool nonblocking) {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_handles_per_message)];
    for (;;) {
        iovec iov{buf, cap};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        ssize_t n = ::recvmsg(ch, &msg, MSG_CMSG_CLOEXEC | (nonblocking ? MSG_DONTWAIT : 0));
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return -1;
            if (errno == ECONNRESET) return 0;
            throw_errno("mpservice: recvmsg");
        }
        bool lost_handles = (msg.msg_flags & MSG_CTRUNC) != 0;
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < count; ++i) {
                int fd;
                std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (handles) handles->push_back(fd);
                else ::close(fd);
            }
        }
        if (lost_handles) {
            // The kernel dropped handles it had no room for (descriptor limit):
            // the message cannot be used; say so rather than decode it wrongly.
            errno = EMFILE;
            throw_errno("mpservice: handles sent with a message were lost (too many open files: raise ulimit -n)");
        }
        return static_cast<long>(n);
    }
}

unsigned wait_readable(const handle_t* hs, int n, int timeout_ms) {
    pollfd p[8];
    if (n > 8) n = 8;
    for (int i = 0; i < n; ++i) p[i] = pollfd{hs[i], POLLIN, 0};
    int rc;
    do rc = ::poll(p, static_cast<nfds_t>(n), timeout_ms);
    while (rc < 0 && errno == EINTR);
    unsigned mask = 0;
    for (int i = 0; i < n; ++i)
        if (p[i].revents) mask |= 1u << i;
    return mask;
}

handle_t poller_create() {
    int fd = ::epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) throw_errno("mpservice: epoll_create1");
    return fd;
}

void poller_add(handle_t poller, handle_t h, std::uint64_t token) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = token;
    if (::epoll_ctl(poller, EPOLL_CTL_ADD, h, &ev) != 0) throw_errno("mpservice: epoll_ctl");
}

void poller_remove(handle_t poller, handle_t h) noexcept { ::epoll_ctl(poller, EPOLL_CTL_DEL, h, nullptr); }

int poller_wait(handle_t poller, std::uint64_t* tokens, int max, int timeout_ms) {
    epoll_event evs[64];
    if (max > 64) max = 64;
    int n;
    do n = ::epoll_wait(poller, evs, max, timeout_ms);
    while (n < 0 && errno == EINTR);
    if (n < 0) throw_errno("mpservice: epoll_wait");
    for (int i = 0; i < n; ++i) tokens[i] = evs[i].data.u64;
    return n;
}

handle_t wake_event_create() {
    int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0) throw_errno("mpservice: eventfd");
    return fd;
}

void wake_event_signal(handle_t ev) noexcept {
    std::uint64_t one = 1;
    ssize_t rc = ::write(ev, &one, sizeof one);
    (void)rc;
}

void wake_event_drain(handle_t ev) noexcept {
    std::uint64_t v;
    ssize_t rc = ::read(ev, &v, sizeof v);
    (void)rc;
}

long spawn_self(const std::string& argv0, const std::string& marker, handle_t inherit,
                const std::vector<std::string>* environment) {
    std::vector<char*> envp;
    if (environment) {
        envp.reserve(environment->size() + 1);
        for (const std::string& e : *environment) envp.push_back(const_cast<char*>(e.c_str()));
        envp.push_back(nullptr);
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    // dup2 onto itself clears close-on-exec for this one descriptor in the
    // child only (glibc >= 2.29), so no other thread's spawn can inherit it.
    posix_spawn_file_actions_adddup2(&fa, inherit, inherit);
    posix_spawnattr_t at;
    posix_spawnattr_init(&at);
    sigset_t none;
    sigemptyset(&none);
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK);
    char* argv[] = {const_cast<char*>(argv0.c_str()), const_cast<char*>(marker.c_str()), nullptr};
    pid_t pid = 0;
    int rc = ::posix_spawn(&pid, "/proc/self/exe", &fa, &at, argv, environment ? envp.data() : environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "mpservice: posix_spawn of /proc/self/exe");
    return static_cast<long>(pid);
}

namespace {
/// Calls, once, with harmless arguments, the C library functions that only a
/// forked child calls.  With lazy binding (the default without -z now) the
/// first call of each resolves its PLT slot; made in the parent, that happens
/// once, instead of in every child, where each resolution touches a dozen
/// pages of symbol tables and writes the GOT: copy-on-write faults of ~3 us
/// each in a VM (bench/PERFORMANCE-process.md).
void bind_child_calls() noexcept {
    struct sigaction old;
    ::sigaction(SIGKILL, nullptr, &old);
    sigset_t empty;
    sigemptyset(&empty);
#if defined(__linux__)
    int sig = 0;
    ::prctl(PR_GET_PDEATHSIG, &sig);
#endif
    (void)::getppid();
    msghdr none{};
    (void)::sendmsg(-1, &none, MSG_NOSIGNAL);
    (void)::dup2(-1, -1);
    (void)::fcntl(-1, F_GETFD);
    (void)::close(-1);
    (void)::syscall(SYS_getppid);
}
}  // namespace

long fork_process() {
    static const bool bound = (bind_child_calls(), true);
    (void)bound;
    // Signals are blocked across the fork, so none can reach the child while it
    // still has the parent's handlers (a parent's crash handler running in a
    // half-made child deadlocks it); the child resets them, then unblocks.
    sigset_t all, old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = ::fork();
    if (pid == 0) {
        reset_signal_handlers();  // also unblocks everything
        return 0;
    }
    int err = errno;
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    errno = err;
    if (pid < 0) throw_errno("mpservice: fork");
    return static_cast<long>(pid);
}

handle_t process_handle(long pid) noexcept {
#if defined(SYS_pidfd_open)
    long fd = ::syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0);
    if (fd >= 0) {
        ::fcntl(static_cast<int>(fd), F_SETFD, FD_CLOEXEC);  // pidfds are close-on-exec already; be sure
        return static_cast<handle_t>(fd);
    }
#endif
    (void)pid;
    return invalid_handle;
}

namespace {
int python_exitcode(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return -WTERMSIG(status);
    return 255;
}
}  // namespace

#ifndef P_PIDFD
#define P_PIDFD 3  // Linux 5.4; older headers lack the constant
#endif

ReapResult reap_child(long pid, handle_t process_handle, bool block, int* exitcode) {
    for (;;) {
        siginfo_t info{};
        int flags = WEXITED | (block ? 0 : WNOHANG);
        int rc = process_handle >= 0 ? ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(process_handle), &info, flags)
                                     : ::waitid(P_PID, static_cast<id_t>(pid), &info, flags);
        if (rc < 0 && errno == EINTR) continue;
        if (rc < 0 && errno == EINVAL && process_handle >= 0) {
            process_handle = -1;  // a kernel without P_PIDFD: by pid
            continue;
        }
        if (rc < 0 && errno == ECHILD) return ReapResult::reaped_elsewhere;
        if (rc < 0) throw_errno("mpservice: waitid");
        if (info.si_pid == 0) return ReapResult::running;  // WNOHANG, still running
        switch (info.si_code) {
            case CLD_EXITED: *exitcode = info.si_status; break;
            case CLD_KILLED:
            case CLD_DUMPED: *exitcode = -info.si_status; break;
            default: *exitcode = 255; break;
        }
        return ReapResult::reaped;
    }
}

bool reap_any_child(long* pid, int* exitcode) {
    int status = 0;
    pid_t r;
    do r = ::waitpid(-1, &status, WNOHANG);
    while (r < 0 && errno == EINTR);
    if (r <= 0) return false;
    *pid = r;
    *exitcode = python_exitcode(status);
    return true;
}

bool send_signal(long pid, handle_t process_handle, int sig) noexcept {
#if defined(SYS_pidfd_send_signal)
    if (process_handle >= 0) return ::syscall(SYS_pidfd_send_signal, process_handle, sig, nullptr, 0) == 0;
#endif
    (void)process_handle;
    return ::kill(static_cast<pid_t>(pid), sig) == 0;
}

int signal_terminate() noexcept { return SIGTERM; }
int signal_kill() noexcept { return SIGKILL; }

std::string signal_name(int sig) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
    if (const char* abbrev = ::sigabbrev_np(sig)) return std::string("SIG") + abbrev;
#endif
    return "signal " + std::to_string(sig);
}

long parent_pid() noexcept { return static_cast<long>(::getppid()); }

bool secure_execution() noexcept {
#if defined(__linux__)
    return ::getauxval(AT_SECURE) != 0;
#else
    return ::issetugid() != 0;
#endif
}

bool channel_peer(handle_t h, long* pid, long* uid) noexcept {
#if defined(SO_PEERCRED)
    int domain = 0, type = 0;
    socklen_t len = sizeof domain;
    if (::getsockopt(h, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || domain != AF_UNIX) return false;
    len = sizeof type;
    if (::getsockopt(h, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) return false;
    ucred cred{};
    len = sizeof cred;
    if (::getsockopt(h, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return false;
    *pid = static_cast<long>(cred.pid);
    *uid = static_cast<long>(cred.uid);
    return true;
#else
    (void)h, (void)pid, (void)uid;
    return false;
#endif
}

handle_t adopt_channel(handle_t marked, long) noexcept { return marked; }

bool is_own_user(long uid) noexcept {
    return uid == static_cast<long>(::getuid()) && uid == static_cast<long>(::geteuid());
}

bool die_with_parent(long expected_parent) noexcept {
#if defined(__linux__)
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
    // The parent may have died before prctl took effect: then we were re-parented.
    return static_cast<long>(::getppid()) == expected_parent;
}

// Not under a sanitizer: their runtimes intercept clone(), and ThreadSanitizer's
// makes the new process wait, spinning, for a handshake that a process
// sharing the address space without being a thread never gives (seen with
// clang 14).  Warm children then exit the ordinary way.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define MPSERVICE_HOLDER_UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer) || __has_feature(memory_sanitizer)
#define MPSERVICE_HOLDER_UNDER_SANITIZER 1
#endif
#endif

#if defined(__linux__) && defined(SYS_pidfd_open) && (defined(__x86_64__) || defined(__aarch64__)) && \
    !defined(MPSERVICE_HOLDER_UNDER_SANITIZER)
namespace {
// The holder shares the address space and - no CLONE_SETTLS - the thread
// pointer of the thread that made it, so it must not touch the C library's
// per-thread state (errno: even syscall() writes it on failure) nor any
// sanitizer's: system calls made directly, on a stack of its own.
alignas(64) unsigned char g_holder_stack[16 * 1024];
int g_holder_watch = -1;  // a pidfd of the process whose address space it holds
long g_holder_owner = 0;  // that process's pid

#if defined(__clang__) || defined(__GNUC__)
#define MPSERVICE_HOLDER_CODE __attribute__((no_sanitize("undefined"), noinline))
#else
#define MPSERVICE_HOLDER_CODE
#endif

MPSERVICE_HOLDER_CODE long direct_syscall(long n, long a, long b, long c, long d) {
#if defined(__x86_64__)
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return ret;
#else
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory");
    return x0;
#endif
}

MPSERVICE_HOLDER_CODE int hold_until_exit(void*) {
    const int watch = g_holder_watch;
    // Its parent is the maker's (CLONE_PARENT): it dies with that one too.
    direct_syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0);
    // Its copy of the maker's descriptors goes (the channel to the parent
    // among them: the parent must see it close when the maker ends).
#if defined(SYS_close_range)
    long a = watch > 0 ? direct_syscall(SYS_close_range, 0, watch - 1, 0, 0) : 0;
    long b = direct_syscall(SYS_close_range, watch + 1, ~0u, 0, 0);
#else
    long a = -1, b = -1;
#endif
    if (a < 0 || b < 0)  // before Linux 5.9: the maker has closed all but a few
        for (int fd = 0; fd < watch + 64; ++fd)
            if (fd != watch) direct_syscall(SYS_close, fd, 0, 0, 0);
    // The teardown it is there for waits for an idle CPU: the parent, which
    // is busy with the child's result just then, comes first (SCHED_IDLE).
    struct sched_param idle{};
    direct_syscall(SYS_sched_setscheduler, 0, SCHED_IDLE, reinterpret_cast<long>(&idle), 0);
    // Every signal is blocked (the maker blocked them around clone): only
    // SIGKILL ends it early, which is harmless (the teardown happens then).
    // It also goes if the maker exec()s (its old address space, the one held,
    // is then no one's): looked at every few seconds (kcmp; where that is
    // not allowed, it stays until the maker ends).
    struct pollfd ready{watch, POLLIN, 0};
    const long self = direct_syscall(SYS_getpid, 0, 0, 0, 0);
    for (;;) {
        struct timespec look_again{2, 0};  // (the system call counts it down)
        long n = direct_syscall(SYS_ppoll, reinterpret_cast<long>(&ready), 1, reinterpret_cast<long>(&look_again), 0);
        if (n == 1) break;
#if defined(SYS_kcmp)
        constexpr long kcmp_vm = 1;  // <linux/kcmp.h> KCMP_VM
        if (n == 0 && direct_syscall(SYS_kcmp, self, g_holder_owner, kcmp_vm, 0) > 0) break;
#endif
    }
    direct_syscall(SYS_exit, 0, 0, 0, 0);
    return 0;
}
}  // namespace

long hold_address_space_past_exit() noexcept {
    long self = ::syscall(SYS_pidfd_open, static_cast<pid_t>(::getpid()), 0);
    if (self < 0) return 0;
    g_holder_watch = static_cast<int>(self);
    g_holder_owner = static_cast<long>(::getpid());
    sigset_t all, old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);
    // CLONE_PARENT: the parent reaps the holder, as it reaps this process (an
    // orphan would be left to init, which a container may not have).  No
    // CLONE_FILES: the holder has its own copy of the pidfd.
    int pid = ::clone(&hold_until_exit, g_holder_stack + sizeof g_holder_stack, CLONE_VM | CLONE_PARENT | SIGCHLD,
                      nullptr);
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    ::close(g_holder_watch);
    return pid > 0 ? pid : 0;
}
#else
long hold_address_space_past_exit() noexcept { return 0; }
#endif

void reset_signal_handlers() noexcept {
    for (int sig = 1; sig < NSIG; ++sig) {
        if (sig == SIGKILL || sig == SIGSTOP) continue;
        struct sigaction old;
        if (::sigaction(sig, nullptr, &old) != 0) continue;
        bool caught = (old.sa_flags & SA_SIGINFO) ? true : (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN);
        if (!caught) continue;
        struct sigaction dfl{};
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        ::sigaction(sig, &dfl, nullptr);
    }
    sigset_t none;
    sigemptyset(&none);
    ::pthread_sigmask(SIG_SETMASK, &none, nullptr);
}

bool current_thread_stack(void** low, std::size_t* size) noexcept {
    pthread_attr_t attr;
    if (::pthread_getattr_np(::pthread_self(), &attr) != 0) return false;
    bool ok = ::pthread_attr_getstack(&attr, low, size) == 0;
    ::pthread_attr_destroy(&attr);
    return ok;
}

void leak_checker_root(const void* p, std::size_t size) noexcept {
    if (__lsan_register_root_region && p && size) __lsan_register_root_region(p, size);
}

void close_handles_except(handle_t keep) noexcept {
#if defined(SYS_close_range)
    bool ok = true;
    if (keep > 3) ok = ::syscall(SYS_close_range, 3u, static_cast<unsigned>(keep - 1), 0u) == 0;
    if (ok && ::syscall(SYS_close_range, static_cast<unsigned>(keep < 3 ? 3 : keep + 1), ~0u, 0u) == 0) return;
#endif
    // Fallback: walk the descriptor table.
    long max = ::sysconf(_SC_OPEN_MAX);
    for (long fd = 3; fd < max && fd < 65536; ++fd)
        if (fd != keep) ::close(static_cast<int>(fd));
}

namespace {
// Called through a pointer the loader filled in at start-up (a GOT slot), not
// through a lazily bound PLT slot: a forked child's first _exit() would
// otherwise resolve the symbol, in every child (see bind_child_calls).
void (*volatile g_exit_now)(int) = &::_exit;
}  // namespace

void exit_now(int code) noexcept {
    g_exit_now(code);
    __builtin_unreachable();
}

namespace {
void (*g_exit_status_hook)(int) noexcept = nullptr;
#if defined(__GLIBC__)
void run_exit_status_hook(int status, void*) {
    if (g_exit_status_hook) g_exit_status_hook(status);
}
#endif
}  // namespace

bool on_exit_status(void (*hook)(int status) noexcept) noexcept {
#if defined(__GLIBC__)
    // on_exit (glibc) is atexit with the status exit() was given: the one way
    // to learn it inside the process.  Registered once; the hook can change.
    static bool registered = ::on_exit(run_exit_status_hook, nullptr) == 0;
    g_exit_status_hook = hook;
    return registered;
#else
    (void)hook;
    return false;
#endif
}

bool is_main_thread() noexcept { return static_cast<long>(::syscall(SYS_gettid)) == static_cast<long>(::getpid()); }

handle_t child_exit_events() {
    // An ignored SIGCHLD (inherited from a program that ignores it) would make
    // the kernel discard the exit statuses this process has to collect.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGCHLD, &dfl, nullptr);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    ::sigprocmask(SIG_BLOCK, &set, nullptr);
    int fd = ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (fd < 0) throw_errno("mpservice: signalfd");
    return fd;
}

void child_exit_events_drain(handle_t h) noexcept {
    signalfd_siginfo info[8];
    while (::read(h, info, sizeof info) > 0) {
    }
}

void child_exit_events_release(handle_t h) noexcept {
    ::close(h);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    ::sigprocmask(SIG_UNBLOCK, &set, nullptr);
}

// glibc's loader locks (taken by dl_iterate_phdr, dladdr and dlopen) are not
// made afresh in a fork child: a child forked while another thread of the
// parent is inside one of these calls waits for that lock forever.  So the
// library makes its own loader calls under one fork lock: fork() waits for a
// call in progress to finish, and none starts until the child has its copy
// (issue 8, defect 12 - a symbolizing thread beside a ForkContext start; seen
// in CI under ThreadSanitizer, whose interceptors widen the window).  The
// lock is recursive because dlopen runs constructors, which may symbolize.
// Highest rank: nothing is taken while it is held.  A user's own thread that
// unwinds an exception at the instant of a fork still holds glibc's lock -
// the README's caveat for the fork context in threaded programs.
std::recursive_mutex& loader_calls_mutex() {
    static auto* m = new std::recursive_mutex;  // never destroyed: used in static destruction too
    return *m;
}
[[maybe_unused]] const bool g_loader_calls_fork_safe = (at_fork_protect(&loader_calls_mutex(), 40), true);

int walk_loaded_modules(int (*visit)(dl_phdr_info*, std::size_t, void*), void* data) {
    std::lock_guard<std::recursive_mutex> lock(loader_calls_mutex());
    return ::dl_iterate_phdr(visit, data);
}

namespace {
struct ModuleSearch {
    // in
    std::uintptr_t addr = 0;          // find the module containing addr, or
    const std::string* name = nullptr;  // the module with this name
    // out
    bool found = false;
    bool first = true;
    std::string module;
    std::uintptr_t base = 0;
    std::string build_id;
};

std::string note_build_id(const dl_phdr_info* info) {
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const auto& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_NOTE) continue;
        auto p = reinterpret_cast<const unsigned char*>(info->dlpi_addr + ph.p_vaddr);
        auto end = p + ph.p_memsz;
        while (p + sizeof(ElfW(Nhdr)) <= end) {
            ElfW(Nhdr) nh;
            std::memcpy(&nh, p, sizeof nh);
            const unsigned char* name = p + sizeof nh;
            const unsigned char* desc = name + ((nh.n_namesz + 3u) & ~3u);
            const unsigned char* next = desc + ((nh.n_descsz + 3u) & ~3u);
            if (next > end) break;
            if (nh.n_type == NT_GNU_BUILD_ID && nh.n_namesz == 4 && std::memcmp(name, "GNU", 4) == 0)
                return std::string(reinterpret_cast<const char*>(desc), nh.n_descsz);
            p = next;
        }
    }
    return {};
}

int module_search_cb(dl_phdr_info* info, std::size_t, void* data) {
    auto* s = static_cast<ModuleSearch*>(data);
    // The first object is the main program; its name is "" (or argv[0] on some loaders).
    std::string name = s->first ? std::string() : std::string(info->dlpi_name ? info->dlpi_name : "");
    s->first = false;
    bool match = false;
    if (s->name) {
        match = name == *s->name;
    } else {
        for (int i = 0; i < info->dlpi_phnum && !match; ++i) {
            const auto& ph = info->dlpi_phdr[i];
            if (ph.p_type != PT_LOAD) continue;
            std::uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
            match = s->addr >= lo && s->addr < lo + ph.p_memsz;
        }
    }
    if (!match) return 0;
    s->found = true;
    s->module = name;
    s->base = info->dlpi_addr;
    s->build_id = note_build_id(info);
    return 1;
}
}  // namespace

bool module_address(const void* addr, ModuleAddress& out) {
    ModuleSearch s;
    s.addr = reinterpret_cast<std::uintptr_t>(addr);
    walk_loaded_modules(module_search_cb, &s);
    if (!s.found) return false;
    out.module = s.module;
    out.offset = s.addr - s.base;
    return true;
}

const void* module_resolve(const ModuleAddress& where) {
    ModuleSearch s;
    s.name = &where.module;
    walk_loaded_modules(module_search_cb, &s);
    if (!s.found && !where.module.empty()) {
        // Not loaded yet in this process: load it (and keep it loaded).
        {
            std::lock_guard<std::recursive_mutex> lock(loader_calls_mutex());
            if (!::dlopen(where.module.c_str(), RTLD_NOW | RTLD_GLOBAL)) return nullptr;
        }
        s = ModuleSearch{};
        s.name = &where.module;
        walk_loaded_modules(module_search_cb, &s);
    }
    if (!s.found) return nullptr;
    return reinterpret_cast<const void*>(s.base + where.offset);
}

std::string module_fingerprint(const std::string& module) {
    ModuleSearch s;
    s.name = &module;
    walk_loaded_modules(module_search_cb, &s);
    if (s.found && !s.build_id.empty()) return "build-id:" + s.build_id;
    // No build-id: the file's identity stands in for it (cheap, unlike hashing).
    struct stat st;
    const char* path = module.empty() ? "/proc/self/exe" : module.c_str();
    if (::stat(path, &st) != 0) return "unknown";
    return "file:" + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + ":" +
           std::to_string(st.st_size) + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
           std::to_string(st.st_mtim.tv_nsec);
}

int affinity_cpu_count() noexcept {
    cpu_set_t set;
    if (::sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    long n = ::sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? static_cast<int>(n) : 1;
}

namespace {
std::string first_line(const std::string& path) {
    std::ifstream f(path);
    std::string line;
    std::getline(f, line);
    return line;
}
}  // namespace

double cgroup_cpu_quota() noexcept {
    try {
        // cgroup v2: "0::/path" in /proc/self/cgroup, limit in <path>/cpu.max as "quota period" or "max period".
        std::ifstream cg("/proc/self/cgroup");
        std::string line, v2path, v1path;
        while (std::getline(cg, line)) {
            if (line.rfind("0::", 0) == 0) v2path = line.substr(3);
            auto c1 = line.find(':'), c2 = line.find(':', c1 + 1);
            if (c1 != std::string::npos && c2 != std::string::npos) {
                std::string ctrls = line.substr(c1 + 1, c2 - c1 - 1);
                if (ctrls.find("cpu") != std::string::npos && ctrls.find("cpuset") != 0) v1path = line.substr(c2 + 1);
            }
        }
        double best = 0;
        auto consider = [&](double q) {
            if (q > 0 && (best == 0 || q < best)) best = q;
        };
        if (!v2path.empty()) {
            // The limit of any ancestor applies too: walk up to the root.
            std::string p = v2path;
            for (;;) {
                std::string l = first_line("/sys/fs/cgroup" + (p == "/" ? std::string() : p) + "/cpu.max");
                long long quota = 0, period = 0;
                if (std::sscanf(l.c_str(), "%lld %lld", &quota, &period) == 2 && period > 0)
                    consider(static_cast<double>(quota) / static_cast<double>(period));
                if (p.empty() || p == "/") break;
                auto slash = p.rfind('/');
                p = slash == 0 ? "/" : p.substr(0, slash);
            }
        }
        if (!v1path.empty() || best == 0) {
            for (const char* dir : {"/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"}) {
                std::string q = first_line(std::string(dir) + "/cpu.cfs_quota_us");
                std::string per = first_line(std::string(dir) + "/cpu.cfs_period_us");
                long long quota = std::atoll(q.c_str()), period = std::atoll(per.c_str());
                if (quota > 0 && period > 0) consider(static_cast<double>(quota) / static_cast<double>(period));
            }
        }
        return best;
    } catch (...) {
        return 0;
    }
}

// ---------------------------------------------------------------- (synchronization section)

LockResult robust_mutex_lock_blocking(RobustMutex* m, Deadline deadline) {
    return lock_until(m, deadline);
}

int robust_mutex_trylock_status(RobustMutex* m) noexcept { return pthread_mutex_trylock(native(m)); }

int robust_mutex_unlock_status(RobustMutex* m) noexcept { return pthread_mutex_unlock(native(m)); }

LockResult robust_mutex_trylock_result(int status) {
    if (status == EDEADLK) return LockResult::busy;  // held by the caller itself
    return lock_result(status, "mpservice: mutex trylock");
}

void robust_mutex_unlock_failed(int status) {
    throw std::system_error(status, std::generic_category(), "mpservice: mutex unlock");
}

long current_tid() noexcept { return static_cast<long>(::syscall(SYS_gettid)); }

void at_fork_child(void (*fn)()) {
    int rc = ::pthread_atfork(nullptr, nullptr, fn);
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "mpservice: pthread_atfork");
}

namespace {
/// A thread's at_thread_exit functions, run newest first when its
/// thread_local objects are destroyed (native TLS: the storage is still there).
struct ThreadExitList {
    std::vector<std::pair<void (*)(void*), void*>> fns;
    ~ThreadExitList() {
        while (!fns.empty()) {
            auto f = fns.back();
            fns.pop_back();
            f.first(f.second);
        }
    }
};
}  // namespace

void at_thread_exit(void (*fn)(void*), void* arg) {
    thread_local ThreadExitList list;
    list.fns.emplace_back(fn, arg);
}

namespace {
// The registered fork locks.  Plain data, constant-initialized: usable from
// any static initializer.  `g_fork_locks_busy` guards the table (and is held
// across a fork, so a registration cannot slip in between).
constexpr int kMaxForkLocks = 32;
ForkLock g_fork_locks[kMaxForkLocks];
bool g_fork_lock_taken[kMaxForkLocks];
int g_fork_lock_count = 0;
std::atomic_flag g_fork_locks_busy = ATOMIC_FLAG_INIT;

void fork_locks_acquire_table() noexcept {
    while (g_fork_locks_busy.test_and_set(std::memory_order_acquire)) ::sched_yield();
}
void fork_locks_release_table() noexcept { g_fork_locks_busy.clear(std::memory_order_release); }

void fork_prepare() noexcept {
    fork_locks_acquire_table();
    // A holder normally lets go within microseconds; one that does not within
    // the bound waits for something the fork blocks (or runs a slow log
    // handler): the child then gets that lock afresh.
    const auto give_up = Clock::now() + std::chrono::milliseconds(200);
    for (int i = 0; i < g_fork_lock_count; ++i) {
        const ForkLock& l = g_fork_locks[i];
        bool taken = l.try_lock(l.lock);
        while (!taken && Clock::now() < give_up) {
            ::sched_yield();
            taken = l.try_lock(l.lock);
        }
        g_fork_lock_taken[i] = taken;
    }
}
void fork_parent() noexcept {
    for (int i = g_fork_lock_count - 1; i >= 0; --i)
        if (g_fork_lock_taken[i]) g_fork_locks[i].unlock(g_fork_locks[i].lock);
    fork_locks_release_table();
}
void fork_child() noexcept {
    // Made afresh rather than unlocked: the child's thread has a new id, and a
    // recursive or error-checking mutex refuses an unlock by another id (the
    // lock would stay held for good).  What they guard is consistent: held
    // (taken in fork_prepare) by the thread that forked.
    // The unlock first keeps a thread checker's view right (and releases a
    // plain mutex); the re-initialization makes any kind free for certain.
    for (int i = g_fork_lock_count - 1; i >= 0; --i) {
        const ForkLock& l = g_fork_locks[i];
        if (g_fork_lock_taken[i]) l.unlock(l.lock);
        l.reinit(l.lock);
    }
    fork_locks_release_table();
}
}  // namespace

// ---- AddressSanitizer's allocator across fork()
// AddressSanitizer before LLVM 18 takes none of its own locks around fork(): a
// child forked while another thread of the parent was inside malloc (refilling
// its cache of one size class) finds that size class's lock copied held, and
// its own first malloc of that size waits for ever (llvm-project issue 63224,
// fixed by the runtime's own fork handlers in LLVM 18).  A parent with a
// reactor thread hits it.  Where clang linked the runtime into the program
// (its default), the runtime's lock functions are reachable, and a fork is
// bracketed with them as LLVM 18's handlers do: the thread registry (a child
// makes threads) and the allocator.  (Not the stack depot's million bucket
// locks, which LLVM 18 takes too: 5 ms a fork, for a lock a child meets only if
// its first new stack lands in the one bucket a parent thread was filling.)
// With a shared runtime the weak references stay null and nothing changes.
// Registered before the fork locks' handlers, so its prepare runs last
// (nothing allocates after it) and its parent and child handlers first.
#if defined(MPSERVICE_DETAIL_ASAN) && defined(__clang__) && defined(__linux__) && __clang_major__ < 18
}  // namespace mpservice::detail::os
namespace __lsan {  // the runtime's own names (hidden: reachable only from a static link)
[[gnu::weak]] void LockThreadRegistry();
[[gnu::weak]] void UnlockThreadRegistry();
[[gnu::weak]] void LockAllocator();
[[gnu::weak]] void UnlockAllocator();
}  // namespace __lsan
namespace mpservice::detail::os {
namespace {
bool sanitizer_fork_locks_reachable() noexcept {
    return &__lsan::LockThreadRegistry && &__lsan::UnlockThreadRegistry && &__lsan::LockAllocator &&
           &__lsan::UnlockAllocator;
}
void sanitizer_before_fork() noexcept {
    __lsan::LockThreadRegistry();
    __lsan::LockAllocator();
}
void sanitizer_after_fork() noexcept {
    __lsan::UnlockAllocator();
    __lsan::UnlockThreadRegistry();
}
void register_sanitizer_fork_handlers() noexcept {
    if (sanitizer_fork_locks_reachable())
        ::pthread_atfork(&sanitizer_before_fork, &sanitizer_after_fork, &sanitizer_after_fork);
}
}  // namespace
bool allocator_fork_safe() noexcept { return sanitizer_fork_locks_reachable(); }
#else
namespace {
void register_sanitizer_fork_handlers() noexcept {}
}  // namespace
#if defined(MPSERVICE_DETAIL_ASAN) && (!defined(__clang__) || __clang_major__ < 18)
// Another runtime without the fix, whose locks are out of reach: g++'s libasan
// (a shared library, the locks hidden in it), clang's before 18 off Linux.
bool allocator_fork_safe() noexcept { return false; }
#else
bool allocator_fork_safe() noexcept { return true; }
#endif
#endif

void at_fork_protect(const ForkLock& lock) noexcept {
    fork_locks_acquire_table();
    if (g_fork_lock_count == 0) {
        register_sanitizer_fork_handlers();
        ::pthread_atfork(&fork_prepare, &fork_parent, &fork_child);
    }
    if (g_fork_lock_count < kMaxForkLocks) {
        // Kept sorted by rank: the outer locks are taken first.
        int i = g_fork_lock_count++;
        while (i > 0 && g_fork_locks[i - 1].rank > lock.rank) {
            g_fork_locks[i] = g_fork_locks[i - 1];
            --i;
        }
        g_fork_locks[i] = lock;
    }
    fork_locks_release_table();
}

bool process_running(long pid) noexcept {
    if (!pid_alive(pid)) return false;
    // /proc/<pid>/stat: "pid (comm) S ..." - comm may hold ')' so look for the last one.
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno != ENOENT && errno != ESRCH;  // no /proc: trust pid_alive
    char buf[512];
    ssize_t n = ::read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n <= 0) return false;  // the process went away between open and read
    buf[n] = '\0';
    const char* close_paren = std::strrchr(buf, ')');
    if (!close_paren || close_paren[1] != ' ') return true;
    char state = close_paren[2];
    return state != 'Z' && state != 'X' && state != 'x';
}

namespace {
std::uint64_t code_ref_module_hash(const char* name) noexcept {
    std::uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (const char* p = name ? name : ""; *p; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 1099511628211ull;
    return h ? h : 1;
}

struct CodeRefSearch {
    std::uintptr_t address = 0;  // code_ref_of: the address to find
    CodeRef ref{};               // code_ref_resolve: the module to find
    bool found = false;
    CodeRef result{};
    const void* resolved = nullptr;
};

int code_ref_find_address(dl_phdr_info* info, std::size_t, void* data) {
    auto* s = static_cast<CodeRefSearch*>(data);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD) continue;
        std::uintptr_t start = info->dlpi_addr + ph.p_vaddr;
        if (s->address >= start && s->address < start + ph.p_memsz) {
            s->found = true;
            s->result.module = code_ref_module_hash(info->dlpi_name);
            s->result.offset = s->address - info->dlpi_addr;
            return 1;
        }
    }
    return 0;
}

int code_ref_find_module(dl_phdr_info* info, std::size_t, void* data) {
    auto* s = static_cast<CodeRefSearch*>(data);
    if (code_ref_module_hash(info->dlpi_name) != s->ref.module) return 0;
    std::uintptr_t address = info->dlpi_addr + s->ref.offset;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        std::uintptr_t start = info->dlpi_addr + ph.p_vaddr;
        if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X) && address >= start && address < start + ph.p_memsz) {
            s->resolved = reinterpret_cast<const void*>(address);
            break;
        }
    }
    return 1;  // the module was found; stop either way
}
}  // namespace

CodeRef code_ref_of(const void* address) {
    CodeRefSearch s;
    s.address = reinterpret_cast<std::uintptr_t>(address);
    walk_loaded_modules(&code_ref_find_address, &s);
    if (!s.found) throw std::invalid_argument("mpservice: the address is not inside any loaded module");
    return s.result;
}

const void* code_ref_resolve(const CodeRef& ref) noexcept {
    if (ref.empty()) return nullptr;
    CodeRefSearch s;
    s.ref = ref;
    walk_loaded_modules(&code_ref_find_module, &s);
    return s.resolved;
}

// ---------------------------------------------------------------- (synchronization fixes: fix-sync)

void sleep_until(Deadline deadline) noexcept {
    if (deadline == no_deadline) deadline = Clock::now() + std::chrono::hours(24 * 365);
    timespec ts = to_timespec(deadline);
    // steady_clock is CLOCK_MONOTONIC on Linux; an absolute deadline survives EINTR.
    while (::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
    }
}

bool robust_mutex_held_in_this_process(const RobustMutex* m) noexcept {
#if defined(__linux__) && defined(__GLIBC__)
    // A robust mutex's futex word holds its owner's thread id (FUTEX_TID_MASK
    // bits): the kernel's robust-list protocol depends on it.
    auto* mutex = reinterpret_cast<const pthread_mutex_t*>(m->storage);
    const int word = __atomic_load_n(&mutex->__data.__lock, __ATOMIC_ACQUIRE);
    const long tid = static_cast<long>(static_cast<unsigned>(word) & FUTEX_TID_MASK);
    if (tid == 0) return false;
    // tgkill with signal 0 only checks that `tid` is a thread of this process.
    return ::syscall(SYS_tgkill, static_cast<long>(::getpid()), tid, 0) == 0;
#else
    (void)m;
    return false;
#endif
}

bool robust_mutex_has_sleepers(const RobustMutex* m) noexcept {
#if defined(__linux__) && defined(__GLIBC__)
    // glibc's robust mutex sets FUTEX_WAITERS in its word before a waiter sleeps
    // and an unlock that finds it set makes a FUTEX_WAKE (the kernel's protocol).
    auto* mutex = reinterpret_cast<const pthread_mutex_t*>(m->storage);
    return (static_cast<unsigned>(__atomic_load_n(&mutex->__data.__lock, __ATOMIC_RELAXED)) & FUTEX_WAITERS) != 0;
#else
    (void)m;
    return false;
#endif
}

void shm_release(handle_t h, std::size_t offset, std::size_t size) noexcept {
    if (size == 0) return;
#if defined(__linux__)
    // A memfd is a tmpfs file: punching a hole frees its pages for every mapping.
    ::fallocate(h, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(size));
#else
    (void)h;
    (void)offset;
#endif
}

std::size_t page_size() noexcept {
    static const std::size_t size = [] {
        long n = ::sysconf(_SC_PAGESIZE);
        return n > 0 ? static_cast<std::size_t>(n) : std::size_t(4096);
    }();
    return size;
}

// ---------------------------------------------------------------- (queue section)

void shm_prefault(void* addr, std::size_t size, bool for_write) noexcept {
#if defined(__linux__)
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older kernels answer EINVAL and we skip it
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
    // Never touch the bytes ourselves: another process may be writing them.
    ::madvise(addr, size, for_write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
#else
    (void)addr;
    (void)size;
    (void)for_write;
#endif
}

// ---------------------------------------------------------------- (connection section)

long channel_write_some(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                        const handle_t* handles, std::size_t nhandles) {
    if (nhandles > max_handles_per_message)
        throw std::invalid_argument("mpservice: more than 253 OS handles in one message");
    if (na + nb == 0) return 0;
    iovec iov[2] = {{const_cast<void*>(a), na}, {const_cast<void*>(b), nb}};
    msghdr msg{};
    msg.msg_iov = na ? iov : iov + 1;
    msg.msg_iovlen = na ? 2 : 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_handles_per_message)];
    if (nhandles > 0) {
        std::memset(control, 0, sizeof control);
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nhandles);
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nhandles);
        std::memcpy(CMSG_DATA(c), handles, sizeof(int) * nhandles);
    }
    for (;;) {
        ssize_t n = ::sendmsg(ch, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0) return static_cast<long>(n);
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        if (errno == EPIPE || errno == ECONNRESET) return -1;
        throw_errno("mpservice: sendmsg");
    }
}

unsigned wait_io(handle_t h, unsigned want, int timeout_ms) {
    pollfd p{h, 0, 0};
    if (want & io_readable) p.events |= POLLIN;
    if (want & io_writable) p.events |= POLLOUT;
    int rc;
    do rc = ::poll(&p, 1, timeout_ms);
    while (rc < 0 && errno == EINTR);
    if (rc <= 0) return 0;
    unsigned got = 0;
    // An error or hang-up makes both a read and a write return at once.
    bool failed = (p.revents & (POLLERR | POLLHUP | POLLNVAL)) != 0;
    if ((want & io_readable) && ((p.revents & POLLIN) || failed)) got |= io_readable;
    if ((want & io_writable) && ((p.revents & POLLOUT) || failed)) got |= io_writable;
    return got;
}

std::size_t wait_readable_any(const handle_t* hs, std::size_t n, int timeout_ms, unsigned char* ready) {
    std::vector<pollfd> p(n);
    for (std::size_t i = 0; i < n; ++i) p[i] = pollfd{hs[i], POLLIN, 0};
    int rc;
    do rc = ::poll(p.data(), static_cast<nfds_t>(n), timeout_ms);
    while (rc < 0 && errno == EINTR);
    std::size_t count = 0;
    for (std::size_t i = 0; i < n; ++i) {
        ready[i] = rc > 0 && p[i].revents != 0;
        count += ready[i];
    }
    return count;
}

// ---------------------------------------------------------------- (output forwarding section)

void output_pipe(handle_t& read_end, handle_t& write_end) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw_errno("mpservice: pipe2");
    ::fcntl(fds[0], F_SETFL, ::fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    read_end = fds[0];
    write_end = fds[1];
}

long pipe_read(handle_t h, void* buf, std::size_t cap) noexcept {
    for (;;) {
        ssize_t n = ::read(h, buf, cap);
        if (n >= 0) return static_cast<long>(n);
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return -1;
        return 0;  // a broken pipe reads as its end
    }
}

void redirect_standard_output(handle_t out, handle_t err) {
    std::fflush(stdout);
    std::fflush(stderr);
    // dup2 clears close-on-exec on the new descriptors: programs this process
    // execs write into the same pipes.
    if (::dup2(out, STDOUT_FILENO) < 0 || ::dup2(err, STDERR_FILENO) < 0) throw_errno("mpservice: dup2");
    // A pipe would make stdout fully buffered: lines would reach the parent
    // late, and be lost if the process is killed.  The buffer is given
    // explicitly: glibc ignores a mode change without one on a stream that was
    // used already (a forked child's stdout).
    static char line_buffer[BUFSIZ];
    std::setvbuf(stdout, line_buffer, _IOLBF, sizeof line_buffer);
}

// ---------------------------------------------------------------- (server process section)

namespace {
sockaddr_un abstract_address(const std::string& name, socklen_t& len) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    if (name.size() + 1 > sizeof a.sun_path) throw std::invalid_argument("mpservice: server address too long");
    a.sun_path[0] = '\0';  // the abstract namespace: no file, gone with the last socket
    std::memcpy(a.sun_path + 1, name.data(), name.size());
    len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    return a;
}
long count_dir_entries(const char* path) noexcept {
    DIR* d = ::opendir(path);
    if (!d) return -1;
    long n = 0;
    while (dirent* e = ::readdir(d))
        if (e->d_name[0] != '.') ++n;
    ::closedir(d);
    return n - 1;  // the descriptor opendir itself holds
}
}  // namespace

handle_t listener_create(std::string& address) {
    unsigned char token[12];
    random_bytes(token, sizeof token);
    char name[64];
    int k = std::snprintf(name, sizeof name, "mpservice-%ld-", static_cast<long>(::getpid()));
    for (unsigned char b : token) k += std::snprintf(name + k, sizeof name - static_cast<std::size_t>(k), "%02x", b);
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw_errno("mpservice: socket");
    socklen_t len;
    sockaddr_un a = abstract_address(name, len);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), len) != 0 || ::listen(fd, 128) != 0) {
        int e = errno;
        ::close(fd);
        throw std::system_error(e, std::generic_category(), "mpservice: bind/listen of the server socket");
    }
    address = name;
    return fd;
}

handle_t listener_accept(handle_t listener) {
    for (;;) {
        int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) return fd;
        if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            ::poll(nullptr, 0, 10);  // out of descriptors: let others close some, keep serving
            continue;
        }
        return invalid_handle;  // EINVAL after shutdown(), EBADF
    }
}

void listener_shutdown(handle_t listener) noexcept { ::shutdown(listener, SHUT_RDWR); }

handle_t unix_connect(const std::string& address) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw_errno("mpservice: socket");
    socklen_t len;
    sockaddr_un a = abstract_address(address, len);
    int rc;
    do rc = ::connect(fd, reinterpret_cast<sockaddr*>(&a), len);
    while (rc != 0 && errno == EINTR);
    if (rc != 0) {
        int e = errno;
        ::close(fd);
        throw std::system_error(e, std::generic_category(), "mpservice: connect to the server process");
    }
    return fd;
}

long peer_user(handle_t socket) noexcept {
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(socket, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
    return static_cast<long>(cred.uid);
}

long current_user() noexcept { return static_cast<long>(::getuid()); }

void socket_shutdown(handle_t socket) noexcept {
    if (socket >= 0) ::shutdown(socket, SHUT_RDWR);
}

void random_bytes(void* out, std::size_t n) {
    auto* p = static_cast<unsigned char*>(out);
    while (n > 0) {
        long k = ::syscall(SYS_getrandom, p, n, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            throw_errno("mpservice: getrandom");
        }
        p += k;
        n -= static_cast<std::size_t>(k);
    }
}

long open_handle_count() noexcept { return count_dir_entries("/proc/self/fd"); }

long mapping_count() noexcept {
    int fd = ::open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    long lines = 0;
    char buf[4096];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; ++i) lines += buf[i] == '\n';
    ::close(fd);
    return lines;
}

// ---------------------------------------------------------------- working directory and environment

std::string current_directory() {
    std::vector<char> buf(256);
    for (;;) {
        if (::getcwd(buf.data(), buf.size())) return std::string(buf.data());
        if (errno != ERANGE || buf.size() > (1u << 20)) return std::string();
        buf.resize(buf.size() * 2);
    }
}

bool change_directory(const std::string& path) noexcept { return !path.empty() && ::chdir(path.c_str()) == 0; }

std::vector<std::string> environment_entries() {
    std::vector<std::string> out;
    for (char** e = environ; e && *e; ++e) out.emplace_back(*e);
    return out;
}

void replace_environment(const std::vector<std::string>& entries) {
    ::clearenv();
    for (const std::string& entry : entries) {
        auto eq = entry.find('=');
        if (eq == std::string::npos || eq == 0) continue;
        ::setenv(entry.substr(0, eq).c_str(), entry.c_str() + eq + 1, 1);
    }
}

}  // namespace mpservice::detail::os

#endif  // !_WIN32
