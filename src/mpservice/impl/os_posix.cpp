// os_posix: the POSIX (Linux first) back-end of detail/os.hpp.  This file is
// the only place that includes POSIX headers or makes system calls.
#if !defined(_WIN32)

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
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
#include <linux/futex.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
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
#endif
#if defined(__SANITIZE_THREAD__)
#define MPSERVICE_TSAN 1
#endif

namespace {
/// Blocks for the mutex until `deadline` (steady clock).
LockResult lock_until(RobustMutex* m, Deadline deadline) {
    if (deadline == no_deadline) return lock_result(pthread_mutex_lock(native(m)), "mpservice: mutex lock");
#if defined(MPSERVICE_TSAN)
    // ThreadSanitizer (LLVM 14) does not intercept pthread_mutex_clocklock and
    // then loses track of the mutex; under it, use timedlock, whose deadline is
    // on the wall clock (a clock step shifts the timeout - acceptable in tests).
    auto left = deadline - Clock::now();
    auto wall = std::chrono::system_clock::now() + std::chrono::duration_cast<std::chrono::system_clock::duration>(left);
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(wall.time_since_epoch()).count();
    timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    return lock_result(pthread_mutex_timedlock(native(m), &ts), "mpservice: mutex lock");
#else
    // An absolute deadline on the monotonic clock: immune to wall-clock steps.
    timespec ts = to_timespec(deadline);
    return lock_result(pthread_mutex_clocklock(native(m), CLOCK_MONOTONIC, &ts), "mpservice: mutex lock");
#endif
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

bool channel_write(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                   const handle_t* handles, std::size_t nhandles) {
    if (nhandles > max_handles_per_message)
        throw std::invalid_argument("mpservice: more than 253 OS handles in one message");
    iovec iov[2] = {{const_cast<void*>(a), na}, {const_cast<void*>(b), nb}};
    int niov = 2;
    iovec* cur = iov;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_handles_per_message)];
    bool handles_pending = nhandles > 0;
    for (;;) {
        while (niov > 0 && cur->iov_len == 0) ++cur, --niov;
        if (niov == 0 && !handles_pending) return true;
        msghdr msg{};
        msg.msg_iov = cur;
        msg.msg_iovlen = static_cast<std::size_t>(niov);
        char dummy = 0;
        iovec one{&dummy, 1};
        if (niov == 0) {  // handles with no bytes: send one filler byte (never happens for framed data)
            msg.msg_iov = &one;
            msg.msg_iovlen = 1;
        }
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
        if (niov == 0) return true;
        auto left = static_cast<std::size_t>(n);
        while (niov > 0 && left >= cur->iov_len) left -= cur->iov_len, ++cur, --niov;
        if (niov > 0) {
            cur->iov_base = static_cast<char*>(cur->iov_base) + left;
            cur->iov_len -= left;
        }
    }
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

long spawn_self(const std::string& argv0, const std::string& marker, handle_t inherit) {
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
    int rc = ::posix_spawn(&pid, "/proc/self/exe", &fa, &at, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "mpservice: posix_spawn of /proc/self/exe");
    return static_cast<long>(pid);
}

long fork_process() {
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

bool reap_child(long pid, bool block, int* exitcode) {
    int status = 0;
    for (;;) {
        pid_t r = ::waitpid(static_cast<pid_t>(pid), &status, block ? 0 : WNOHANG);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) throw_errno("mpservice: waitpid");
        if (r == 0) return false;
        *exitcode = python_exitcode(status);
        return true;
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

bool die_with_parent(long expected_parent) noexcept {
#if defined(__linux__)
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
    // The parent may have died before prctl took effect: then we were re-parented.
    return static_cast<long>(::getppid()) == expected_parent;
}

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

void exit_now(int code) noexcept { ::_exit(code); }

bool is_main_thread() noexcept { return static_cast<long>(::syscall(SYS_gettid)) == static_cast<long>(::getpid()); }

handle_t child_exit_events() {
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
    ::dl_iterate_phdr(module_search_cb, &s);
    if (!s.found) return false;
    out.module = s.module;
    out.offset = s.addr - s.base;
    return true;
}

const void* module_resolve(const ModuleAddress& where) {
    ModuleSearch s;
    s.name = &where.module;
    ::dl_iterate_phdr(module_search_cb, &s);
    if (!s.found && !where.module.empty()) {
        // Not loaded yet in this process: load it (and keep it loaded).
        if (!::dlopen(where.module.c_str(), RTLD_NOW | RTLD_GLOBAL)) return nullptr;
        s = ModuleSearch{};
        s.name = &where.module;
        ::dl_iterate_phdr(module_search_cb, &s);
    }
    if (!s.found) return nullptr;
    return reinterpret_cast<const void*>(s.base + where.offset);
}

std::string module_fingerprint(const std::string& module) {
    ModuleSearch s;
    s.name = &module;
    ::dl_iterate_phdr(module_search_cb, &s);
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
    ::dl_iterate_phdr(&code_ref_find_address, &s);
    if (!s.found) throw std::invalid_argument("mpservice: the address is not inside any loaded module");
    return s.result;
}

const void* code_ref_resolve(const CodeRef& ref) noexcept {
    if (ref.empty()) return nullptr;
    CodeRefSearch s;
    s.ref = ref;
    ::dl_iterate_phdr(&code_ref_find_module, &s);
    return s.resolved;
}

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
