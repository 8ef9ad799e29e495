// os_win32: the Win32 back-end of detail/os.hpp (Windows 10 and later; built
// and tested with MinGW-w64, posix thread model, under Wine).  This file is
// the only place that includes <windows.h> or makes Win32 calls.
//
// How the POSIX ideas of the seam map to Win32:
//   * Channels are connected loopback TCP socket pairs (Winsock): the only
//     Win32 byte stream that a poll (WSAPoll) can watch for readability, the
//     way the reactor watches Unix sockets.  Handles that ride on a channel
//     (SCM_RIGHTS on POSIX) travel in-band: every write is a frame - a header
//     naming the sender's pid and its handle values, then the bytes - and the
//     reader pulls each handle out of the sender with DuplicateHandle
//     (DUPLICATE_CLOSE_SOURCE), as Python's multiprocessing does on Windows.
//   * Shared memory is a pagefile-backed, unnamed section with one extra page
//     at its end holding its random identity and futex waiter counts; waiting
//     on a word of it uses a named semaphore derived from that identity
//     (kernel object names disappear with their last handle: nothing can be
//     left behind).  Words outside shared memory use WaitOnAddress.
//   * A robust mutex is a named Win32 mutex (WAIT_ABANDONED tells that its
//     owner died) plus an owner record in the shared storage, which also
//     catches the case where the dead owner's handle was the last one.
//   * A process handle that "becomes readable when the process exits" is a
//     socket whose peer a thread-pool wait (RegisterWaitForSingleObject: one
//     pool for every child) closes when the process ends.
//   * Children are started suspended by CreateProcessW of this executable,
//     inherit only the handles listed in PROC_THREAD_ATTRIBUTE_HANDLE_LIST,
//     and are put into a kill-on-close job object before they run: they die
//     with their parent, even when it is ended by TerminateProcess.
#if defined(_WIN32)

#ifndef NOMINMAX
#define NOMINMAX
#endif
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <winsock2.h>
#include <ws2tcpip.h>
#include <windows.h>
#include <bcrypt.h>
#include <psapi.h>
#include <winternl.h>

#include <fcntl.h>
#include <io.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <system_error>
#include <unordered_map>
#include <vector>

#if defined(__GNUC__)
#include <cxxabi.h>
#endif

#if defined(_MSC_VER)
#pragma comment(lib, "ws2_32.lib")
#pragma comment(lib, "synchronization.lib")
#pragma comment(lib, "bcrypt.lib")
#pragma comment(lib, "ntdll.lib")
#endif

namespace mpservice::detail::os {

namespace {
[[noreturn]] void throw_win32(const char* what, DWORD err = GetLastError()) {
    throw std::system_error(static_cast<int>(err), std::system_category(), what);
}
[[noreturn]] void throw_wsa(const char* what) { throw_win32(what, static_cast<DWORD>(WSAGetLastError())); }

HANDLE as_handle(handle_t h) noexcept { return reinterpret_cast<HANDLE>(h); }
handle_t from_handle(HANDLE h) noexcept { return reinterpret_cast<handle_t>(h); }
SOCKET as_socket(handle_t h) noexcept { return static_cast<SOCKET>(h); }

/// Milliseconds until `d` for a Win32 wait (INFINITE for no_deadline).
DWORD wait_ms(Deadline d) noexcept {
    if (d == no_deadline) return INFINITE;
    auto now = Clock::now();
    if (d <= now) return 0;
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(d - now).count() + 1;  // round up
    return ms >= static_cast<long long>(INFINITE) ? INFINITE - 1 : static_cast<DWORD>(ms);
}

std::string narrow(const wchar_t* w, int n = -1) {
    if (!w) return {};
    int len = WideCharToMultiByte(CP_UTF8, 0, w, n, nullptr, 0, nullptr, nullptr);
    if (len <= 0) return {};
    std::string s(static_cast<std::size_t>(len), '\0');
    WideCharToMultiByte(CP_UTF8, 0, w, n, &s[0], len, nullptr, nullptr);
    if (n < 0 && !s.empty() && s.back() == '\0') s.pop_back();
    return s;
}

std::wstring widen(const std::string& s) {
    if (s.empty()) return {};
    int len = MultiByteToWideChar(CP_UTF8, 0, s.data(), static_cast<int>(s.size()), nullptr, 0);
    std::wstring w(static_cast<std::size_t>(len), L'\0');
    MultiByteToWideChar(CP_UTF8, 0, s.data(), static_cast<int>(s.size()), &w[0], len);
    return w;
}

/// Winsock must be started in each process before any socket call, even one
/// on an inherited socket.
bool winsock_start() noexcept {
    static const bool started = [] {
        WSADATA data;
        return WSAStartup(MAKEWORD(2, 2), &data) == 0;
    }();
    return started;
}

bool is_socket(handle_t h) noexcept {
    if (h < 0 || !winsock_start()) return false;
    int type = 0;
    int len = sizeof type;
    return getsockopt(as_socket(h), SOL_SOCKET, SO_TYPE, reinterpret_cast<char*>(&type), &len) == 0;
}

// ---- handle-side state: what Win32 does not keep for us

/// A poller: the registered handles and a socket pair whose read end wakes a
/// poller_wait so that it sees registrations made while it waits.
struct Poller {
    std::mutex mu;
    std::vector<std::pair<handle_t, std::uint64_t>> items;
    handle_t wake_read = invalid_handle, wake_write = invalid_handle;
};

/// The reading and writing state of one channel end (frames; see the top).
struct ChannelState {
    std::uint64_t payload_left = 0;  // bytes of the current frame not yet read
    std::string pending;             // bytes of a frame the socket did not take yet
    handle_t partner = invalid_handle;  // the other end, while both are in this process
    DWORD peer_pid = 0;              // the process at the other end, when known (spawn)
    bool peer_is_child = false;      // peer_pid is a child we spawned with this channel (its only reader)
};

/// What a thread-pool wait needs to announce a child's end.
struct ExitNotice {
    HANDLE wait = nullptr;
    handle_t write_end = invalid_handle;
    std::atomic<bool> closed{false};  // write_end closed (by the callback, or by reap_child after unregistering)
    void close_write_end() noexcept {
        if (!closed.exchange(true)) closesocket(as_socket(write_end));
    }
};

/// What the parent holds for a child it started, until the child is reaped:
/// its process handle (from CreateProcess), the section that carried its
/// channel (the keeper), and the thread-pool waits that announce its end
/// (process_handle).  The process handle is used only under the registry's
/// lock or through a duplicate (child_process), so it is never used after
/// reap_child closed it; the waits are unregistered before it is closed.
struct Child {
    HANDLE process = nullptr;
    HANDLE keeper = nullptr;
    std::vector<ExitNotice*> notices;
};

struct Registry {
    std::mutex mu;
    std::map<handle_t, std::shared_ptr<Poller>> pollers;
    std::map<handle_t, handle_t> paired_write_ends;  // wake events, exit notifiers: read end -> write end
    std::map<handle_t, ChannelState> channels;
    std::map<handle_t, handle_t> listener_wakes;      // listener -> its shutdown wake event
    std::map<long, struct Child> children;            // pid -> what we hold for it until it is reaped
};
Registry& reg() {
    static Registry* r = new Registry;  // never destroyed: used by threads until the very end
    return *r;
}

void close_raw(handle_t h) noexcept {
    if (h < 0) return;
    if (is_socket(h)) closesocket(as_socket(h));
    else CloseHandle(as_handle(h));
}

void set_nonblocking(SOCKET s) noexcept {
    u_long on = 1;
    ioctlsocket(s, FIONBIO, &on);
}

SOCKET new_tcp_socket() {
    if (!winsock_start()) throw_wsa("mpservice: WSAStartup");
    SOCKET s = WSASocketW(AF_INET, SOCK_STREAM, IPPROTO_TCP, nullptr, 0, WSA_FLAG_NO_HANDLE_INHERIT);
    if (s == INVALID_SOCKET) throw_wsa("mpservice: WSASocket");
    return s;
}

/// A connected pair of loopback TCP sockets, checked to be each other's peer
/// (another process cannot slip its own connection in between).
void tcp_pair(handle_t& a, handle_t& b) {
    SOCKET lst = new_tcp_socket();
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int len = sizeof addr;
    SOCKET c = INVALID_SOCKET, s = INVALID_SOCKET;
    auto fail = [&](const char* what) {
        int err = WSAGetLastError();
        if (c != INVALID_SOCKET) closesocket(c);
        if (s != INVALID_SOCKET) closesocket(s);
        closesocket(lst);
        throw_win32(what, static_cast<DWORD>(err));
    };
    if (bind(lst, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) fail("mpservice: bind");
    if (getsockname(lst, reinterpret_cast<sockaddr*>(&addr), &len) != 0) fail("mpservice: getsockname");
    if (listen(lst, 4) != 0) fail("mpservice: listen");
    c = new_tcp_socket();
    if (connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) fail("mpservice: connect");
    sockaddr_in mine{};
    int mlen = sizeof mine;
    getsockname(c, reinterpret_cast<sockaddr*>(&mine), &mlen);
    for (int tries = 0; tries < 8; ++tries) {
        sockaddr_in peer{};
        int plen = sizeof peer;
        s = accept(lst, reinterpret_cast<sockaddr*>(&peer), &plen);
        if (s == INVALID_SOCKET) fail("mpservice: accept");
        if (peer.sin_port == mine.sin_port && peer.sin_addr.s_addr == mine.sin_addr.s_addr) break;
        closesocket(s);  // someone else's connection
        s = INVALID_SOCKET;
    }
    if (s == INVALID_SOCKET) fail("mpservice: socket pair");
    closesocket(lst);
    SetHandleInformation(reinterpret_cast<HANDLE>(c), HANDLE_FLAG_INHERIT, 0);
    SetHandleInformation(reinterpret_cast<HANDLE>(s), HANDLE_FLAG_INHERIT, 0);
    BOOL one = TRUE;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one), sizeof one);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one), sizeof one);
    set_nonblocking(c);
    set_nonblocking(s);
    a = static_cast<handle_t>(c);
    b = static_cast<handle_t>(s);
}

/// WSAPoll over sockets; returns the revents per entry (retrying on EINTR-like errors).
int poll_sockets(std::vector<WSAPOLLFD>& p, int timeout_ms) {
    if (p.empty()) {
        if (timeout_ms < 0) timeout_ms = INT_MAX;
        Sleep(static_cast<DWORD>(timeout_ms));  // nothing to watch: only the timeout can end it
        return 0;
    }
    int rc = WSAPoll(p.data(), static_cast<ULONG>(p.size()), timeout_ms);
    return rc < 0 ? 0 : rc;
}

bool readable_revents(short revents) noexcept { return (revents & (POLLRDNORM | POLLHUP | POLLERR | POLLNVAL)) != 0; }

unsigned long g_main_thread = GetCurrentThreadId();  // static initialization runs on the initial thread
}  // namespace

// ---------------------------------------------------------------- handles

void close_handle(handle_t h) noexcept {
    if (h < 0) return;
    handle_t partner = invalid_handle, listener_wake = invalid_handle;
    std::shared_ptr<Poller> poller;
    std::string unsent;
    {
        auto& r = reg();
        std::lock_guard<std::mutex> g(r.mu);
        if (auto it = r.pollers.find(h); it != r.pollers.end()) poller = it->second, r.pollers.erase(it);
        if (auto it = r.paired_write_ends.find(h); it != r.paired_write_ends.end())
            partner = it->second, r.paired_write_ends.erase(it);
        if (auto it = r.channels.find(h); it != r.channels.end()) unsent.swap(it->second.pending), r.channels.erase(it);
        if (auto it = r.listener_wakes.find(h); it != r.listener_wakes.end())
            listener_wake = it->second, r.listener_wakes.erase(it);
    }
    if (!unsent.empty()) {
        // A frame the socket had no room for when it was written: deliver it
        // before the end of stream, as a Unix socket would (bounded wait).
        const char* p = unsent.data();
        std::size_t left = unsent.size();
        auto until = deadline_after(std::chrono::seconds(5));
        while (left > 0 && Clock::now() < until) {
            int n = send(as_socket(h), p, static_cast<int>(std::min<std::size_t>(left, 1 << 20)), 0);
            if (n > 0) p += n, left -= static_cast<std::size_t>(n);
            else if (WSAGetLastError() == WSAEWOULDBLOCK) {
                WSAPOLLFD q{as_socket(h), POLLWRNORM, 0};
                WSAPoll(&q, 1, 100);
            } else break;
        }
    }
    if (poller) {
        close_raw(poller->wake_read);
        close_raw(poller->wake_write);
    }
    close_raw(partner);
    close_handle(listener_wake);
    close_raw(h);
}

handle_t socket_from_info(WSAPROTOCOL_INFOW& info);

handle_t duplicate_handle(handle_t h) {
    if (is_socket(h)) {
        // Winsock's own copy (a DuplicateHandle copy is no socket to Wine's ws2_32).
        WSAPROTOCOL_INFOW info{};
        if (WSADuplicateSocketW(as_socket(h), GetCurrentProcessId(), &info) != 0)
            throw_wsa("mpservice: WSADuplicateSocket");
        handle_t copy = socket_from_info(info);
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[copy];
        return copy;
    }
    HANDLE out = nullptr;
    if (!DuplicateHandle(GetCurrentProcess(), as_handle(h), GetCurrentProcess(), &out, 0, FALSE, DUPLICATE_SAME_ACCESS))
        throw_win32("mpservice: DuplicateHandle");
    if (is_socket(from_handle(out))) {
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[from_handle(out)];  // a socket copy reads frames too
    }
    return from_handle(out);
}

bool handle_valid(handle_t h) noexcept {
    DWORD flags = 0;
    return h >= 0 && GetHandleInformation(as_handle(h), &flags) != 0;
}

// ---------------------------------------------------------------- shared memory

namespace {
// The last page of every section: who it is, and how many threads wait on
// its words (so futex_wake can skip the kernel when nobody waits).
constexpr std::uint32_t kShmMagic = 0x6d707368;  // "mpsh"
constexpr std::size_t kTailPage = 4096;
constexpr std::size_t kWaiterSlots = 960;
struct ShmTail {
    std::uint32_t magic;
    std::uint32_t reserved;
    std::uint64_t size;      // what the caller asked for
    std::uint64_t id[2];     // random: names the section's wait objects
    std::atomic<std::uint32_t> waiters[kWaiterSlots];  // by word offset (hash), any process
};
static_assert(sizeof(ShmTail) <= kTailPage, "the shared memory tail does not fit its page");

std::size_t round_page(std::size_t n) { return (n + kTailPage - 1) / kTailPage * kTailPage; }

struct View {
    std::uintptr_t base;
    std::size_t length;  // the whole view, tail page included
    ShmTail* tail;
};
/// A named kernel object that lives in a section (a word's wait semaphore, a
/// robust mutex), opened on first use and kept while a view of ours holds it:
/// the views (by base) it was used through.  The last of them unmapped closes
/// it (shm_unmap), so a program that makes and drops many Queues or Locks does
/// not keep their objects.  One used from memory that is not a view of ours
/// (base 0) is kept until the process ends.
struct CachedObject {
    HANDLE handle = nullptr;
    std::set<std::uintptr_t> bases;
};
struct Views {
    std::mutex mu;
    std::map<std::uintptr_t, View> by_base;
    std::map<std::string, CachedObject> objects;  // wait semaphores and mutexes, by name
};
Views& views() {
    static Views* v = new Views;
    return *v;
}

/// The view holding `a` (the lock held), or null.
const View* view_at(Views& v, std::uintptr_t a) {
    auto it = v.by_base.upper_bound(a);
    if (it == v.by_base.begin()) return nullptr;
    --it;
    if (a >= it->second.base + it->second.length) return nullptr;
    return &it->second;
}

/// The view holding `addr`, if it is one of ours.
bool find_view(const void* addr, View& out) {
    auto& v = views();
    std::lock_guard<std::mutex> g(v.mu);
    const View* found = view_at(v, reinterpret_cast<std::uintptr_t>(addr));
    if (!found) return false;
    out = *found;
    return true;
}

/// The object named `name`, used from `addr` (see CachedObject); `create` opens it.
template <class Create>
HANDLE cached_object(const std::string& name, const void* addr, Create create) {
    auto& v = views();
    std::lock_guard<std::mutex> g(v.mu);
    const View* view = view_at(v, reinterpret_cast<std::uintptr_t>(addr));
    CachedObject& o = v.objects[name];
    if (!o.handle) {
        o.handle = create(name.c_str());
        if (!o.handle) {
            const DWORD err = GetLastError();
            v.objects.erase(name);
            SetLastError(err);
            return nullptr;
        }
    }
    o.bases.insert(view ? view->base : 0);
    return o.handle;
}

/// Maps the whole section and tells its length (the view's region size).
void* map_whole(HANDLE h, std::size_t& length) {
    void* p = MapViewOfFile(h, FILE_MAP_READ | FILE_MAP_WRITE, 0, 0, 0);
    if (!p) throw_win32("mpservice: MapViewOfFile");
    MEMORY_BASIC_INFORMATION mbi{};
    VirtualQuery(p, &mbi, sizeof mbi);
    length = mbi.RegionSize;
    return p;
}
}  // namespace

handle_t shm_create(std::size_t size) {
    const std::uint64_t total = static_cast<std::uint64_t>(round_page(size)) + kTailPage;
    // No name and no security attributes: only handles (ours, and the copies
    // made for children) reach it; pagefile-backed, zero-filled.
    HANDLE h = CreateFileMappingW(INVALID_HANDLE_VALUE, nullptr, PAGE_READWRITE, static_cast<DWORD>(total >> 32),
                                  static_cast<DWORD>(total), nullptr);
    if (!h) throw_win32("mpservice: CreateFileMapping");
    std::size_t length = 0;
    void* p = nullptr;
    try {
        p = map_whole(h, length);
    } catch (...) {
        CloseHandle(h);
        throw;
    }
    auto* tail = reinterpret_cast<ShmTail*>(static_cast<char*>(p) + length - kTailPage);
    tail->size = size;
    random_bytes(tail->id, sizeof tail->id);
    tail->magic = kShmMagic;
    UnmapViewOfFile(p);
    return from_handle(h);
}

std::size_t shm_size(handle_t h) {
    std::size_t length = 0;
    void* p = map_whole(as_handle(h), length);
    auto* tail = reinterpret_cast<const ShmTail*>(static_cast<char*>(p) + length - kTailPage);
    std::size_t size = tail->magic == kShmMagic ? static_cast<std::size_t>(tail->size) : length;
    UnmapViewOfFile(p);
    return size;
}

void* shm_map(handle_t h, std::size_t size) {
    std::size_t length = 0;
    void* p = map_whole(as_handle(h), length);
    auto* tail = reinterpret_cast<ShmTail*>(static_cast<char*>(p) + length - kTailPage);
    if (tail->magic != kShmMagic || size > tail->size) {
        UnmapViewOfFile(p);
        throw std::system_error(EINVAL, std::generic_category(), "mpservice: not mpservice shared memory of that size");
    }
    auto& v = views();
    std::lock_guard<std::mutex> g(v.mu);
    v.by_base[reinterpret_cast<std::uintptr_t>(p)] = View{reinterpret_cast<std::uintptr_t>(p), length, tail};
    return p;
}

void shm_unmap(void* addr, std::size_t) noexcept {
    if (!addr) return;
    std::vector<HANDLE> unused;  // the objects no other view of ours holds
    {
        auto& v = views();
        const auto base = reinterpret_cast<std::uintptr_t>(addr);
        std::lock_guard<std::mutex> g(v.mu);
        v.by_base.erase(base);
        for (auto it = v.objects.begin(); it != v.objects.end();) {
            if (it->second.bases.erase(base) && it->second.bases.empty()) {
                unused.push_back(it->second.handle);
                it = v.objects.erase(it);
            } else {
                ++it;
            }
        }
    }
    for (HANDLE h : unused) CloseHandle(h);
    UnmapViewOfFile(addr);
}

void shm_release(handle_t, std::size_t, std::size_t) noexcept {
    // Best effort, and Win32 has no way to drop the pages of a pagefile section
    // while it stays mapped elsewhere: the memory stays committed.
}

std::size_t page_size() noexcept {
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return si.dwPageSize ? si.dwPageSize : 4096;
}

void shm_prefault(void* addr, std::size_t size, bool) noexcept {
    WIN32_MEMORY_RANGE_ENTRY range{addr, size};
    PrefetchVirtualMemory(GetCurrentProcess(), 1, &range, 0);
}

// ---------------------------------------------------------------- waiting on a word

namespace {
/// The semaphore that waiters on word `offset` of the section `tail` sleep on
/// (named after the section's random identity: any process mapping it finds it).
HANDLE word_semaphore(const ShmTail* tail, std::size_t offset) {
    char name[96];
    std::snprintf(name, sizeof name, "Local\\mpservice-w-%016llx%016llx-%llx", (unsigned long long)tail->id[0],
                  (unsigned long long)tail->id[1], (unsigned long long)offset);
    HANDLE s = cached_object(name, tail, [](const char* n) { return CreateSemaphoreA(nullptr, 0, LONG_MAX, n); });
    if (!s) throw_win32("mpservice: CreateSemaphore");
    return s;
}

std::atomic<std::uint32_t>& waiter_slot(ShmTail* tail, std::size_t offset) {
    return tail->waiters[(offset / 4) % kWaiterSlots];
}
}  // namespace

bool futex_wait(const std::atomic<std::uint32_t>* word, std::uint32_t expected, Deadline deadline) {
    View view{};
    if (!find_view(word, view)) {
        // Memory of this process only: the system's address wait.
        DWORD ms = wait_ms(deadline);
        std::uint32_t cmp = expected;
        if (WaitOnAddress(const_cast<std::atomic<std::uint32_t>*>(word), &cmp, sizeof cmp, ms)) return true;
        return GetLastError() != ERROR_TIMEOUT;
    }
    const std::size_t offset = reinterpret_cast<std::uintptr_t>(word) - view.base;
    HANDLE sem = word_semaphore(view.tail, offset);
    auto& waiters = waiter_slot(view.tail, offset);
    // Announce the wait before the last look at the word: a waker that changes
    // the word afterwards sees us counted and releases the semaphore, whose
    // count keeps the wake-up even if we are not asleep yet.
    waiters.fetch_add(1, std::memory_order_seq_cst);
    if (word->load(std::memory_order_seq_cst) != expected) {
        waiters.fetch_sub(1, std::memory_order_seq_cst);
        return true;
    }
    DWORD rc = WaitForSingleObject(sem, wait_ms(deadline));
    waiters.fetch_sub(1, std::memory_order_seq_cst);
    return rc != WAIT_TIMEOUT;
}

void futex_wake(const std::atomic<std::uint32_t>* word, int count) {
    View view{};
    if (!find_view(word, view)) {
        if (count == 1) WakeByAddressSingle(const_cast<std::atomic<std::uint32_t>*>(word));
        else WakeByAddressAll(const_cast<std::atomic<std::uint32_t>*>(word));
        return;
    }
    const std::size_t offset = reinterpret_cast<std::uintptr_t>(word) - view.base;
    std::uint32_t n = waiter_slot(view.tail, offset).load(std::memory_order_seq_cst);
    if (n == 0) return;
    // The count is shared by the words of one slot: releasing more than the
    // word's own waiters costs spurious wake-ups (allowed), never a lost one.
    LONG release = static_cast<LONG>(count > 0 && static_cast<std::uint32_t>(count) < n ? count : n);
    ReleaseSemaphore(word_semaphore(view.tail, offset), release, nullptr);
}

// ---------------------------------------------------------------- robust mutex
//
// A word in the shared memory, taken and given back by compare-exchange: an
// uncontended acquire+release is two atomic instructions, no system call (a
// Win32 mutex object costs a kernel call for each, a wineserver round trip
// under Wine).  The kernel is met only by a thread that must wait: it sleeps
// on the word's semaphore *and* on the owner thread's handle, so it wakes when
// the lock is given back or when its owner ends - a dead owner is found at
// once, with no polling.  The word holds the owner's process and thread ids
// together: a waiter that finds that thread gone (or its id reused by a thread
// of another process) takes the word over by one compare-exchange from exactly
// the value it judged dead, and is told owner_died - the story of a robust
// pthread mutex, and of WAIT_ABANDONED.

namespace {
struct WinMutex {
    std::atomic<std::uint64_t> owner;     // 0 free, else owner process id << 32 | owner thread id
    std::atomic<std::uint32_t> sleepers;  // threads in (or entering) the kernel wait for it
};
static_assert(sizeof(WinMutex) <= sizeof(RobustMutex::storage), "RobustMutex storage too small");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free, "the lock word must be a plain atomic in shared memory");
WinMutex* win(RobustMutex* m) noexcept { return reinterpret_cast<WinMutex*>(m->storage); }
const WinMutex* win(const RobustMutex* m) noexcept { return reinterpret_cast<const WinMutex*>(m->storage); }

constexpr int kStatusBusy = 1, kStatusOwnerDied = 2, kStatusNotOwner = 3, kStatusTimedOut = 4, kStatusDeadlock = 5;
// A sleeper that has no owner handle to wait on (memory of this process only,
// or an owner it may not open) looks at the owner again this often.
constexpr DWORD kOwnerRecheckMs = 100;

std::uint64_t caller_token() noexcept {
    return (static_cast<std::uint64_t>(GetCurrentProcessId()) << 32) | GetCurrentThreadId();
}

/// Whether the owner `token` has ended.  If it runs, *thread is a handle to
/// wait on for its end (null if it may not be opened: then it counts as running).
bool owner_ended(std::uint64_t token, HANDLE* thread) noexcept {
    *thread = nullptr;
    const DWORD tid = static_cast<DWORD>(token), pid = static_cast<DWORD>(token >> 32);
    HANDLE t = OpenThread(SYNCHRONIZE | THREAD_QUERY_LIMITED_INFORMATION, FALSE, tid);
    if (!t) return GetLastError() != ERROR_ACCESS_DENIED;  // no such thread any more
    if (WaitForSingleObject(t, 0) == WAIT_OBJECT_0 || GetProcessIdOfThread(t) != pid) {
        CloseHandle(t);  // ended (a handle kept it), or its id now names another process's thread
        return true;
    }
    *thread = t;
    return false;
}

/// Counts the caller among the sleepers for its scope.
struct Sleeping {
    explicit Sleeping(WinMutex* w) : w_(w) { w_->sleepers.fetch_add(1, std::memory_order_seq_cst); }
    ~Sleeping() { w_->sleepers.fetch_sub(1, std::memory_order_seq_cst); }
    WinMutex* w_;
};

/// Sleeps (at most `ms`) while `token` holds the lock and its thread runs.
void sleep_while_held(WinMutex* w, std::uint64_t token, HANDLE owner_thread, DWORD ms) {
    View view{};
    const bool shared = find_view(w, view);
    // Counted before the last look at the word: a release after it sees us
    // and wakes us (the semaphore keeps the wake-up if we are not asleep yet).
    Sleeping counted(w);
    if (w->owner.load(std::memory_order_seq_cst) != token) return;
    if (!shared) {
        // Memory of this process: the system's address wait (which cannot also
        // wait for a thread, hence the bounded sleep).
        std::uint64_t seen = token;
        WaitOnAddress(&w->owner, &seen, sizeof seen, std::min(ms, kOwnerRecheckMs));
        return;
    }
    const std::size_t offset = reinterpret_cast<std::uintptr_t>(&w->owner) - view.base;
    HANDLE objects[2] = {word_semaphore(view.tail, offset), owner_thread};
    WaitForMultipleObjects(owner_thread ? 2 : 1, objects, FALSE, owner_thread ? ms : std::min(ms, kOwnerRecheckMs));
}

/// Wakes one sleeper of a lock just given back.
void wake_one(WinMutex* w) noexcept {
    try {
        View view{};
        if (!find_view(w, view)) {
            WakeByAddressAll(&w->owner);
            return;
        }
        const std::size_t offset = reinterpret_cast<std::uintptr_t>(&w->owner) - view.base;
        ReleaseSemaphore(word_semaphore(view.tail, offset), 1, nullptr);
    } catch (...) {
        // (A sleeper also looks again when its owner's thread ends.)
    }
}

/// Takes the lock: 0, or a kStatus code.  `try_only`: never waits.
int acquire(WinMutex* w, Deadline deadline, bool try_only) {
    const std::uint64_t me = caller_token();
    for (;;) {
        std::uint64_t seen = 0;
        if (w->owner.compare_exchange_strong(seen, me, std::memory_order_acquire, std::memory_order_relaxed)) return 0;
        if (seen == me) return try_only ? kStatusBusy : kStatusDeadlock;  // not recursive
        HANDLE owner_thread = nullptr;
        if (owner_ended(seen, &owner_thread)) {
            if (w->owner.compare_exchange_strong(seen, me, std::memory_order_acquire, std::memory_order_relaxed))
                return kStatusOwnerDied;
            continue;  // another waiter took it over first: look again
        }
        const DWORD ms = try_only ? 0 : wait_ms(deadline);
        if (ms != 0) {
            try {
                sleep_while_held(w, seen, owner_thread, ms);
            } catch (...) {
                if (owner_thread) CloseHandle(owner_thread);
                throw;
            }
        }
        if (owner_thread) CloseHandle(owner_thread);
        if (ms == 0) return try_only ? kStatusBusy : kStatusTimedOut;
    }
}

LockResult lock_result(int status) {
    switch (status) {
        case 0: return LockResult::acquired;
        case kStatusOwnerDied: return LockResult::owner_died;
        case kStatusTimedOut: return LockResult::timed_out;
        case kStatusBusy: return LockResult::busy;
        default:
            throw std::system_error(status == kStatusDeadlock ? EDEADLK : EPERM, std::generic_category(),
                                    "mpservice: mutex lock");
    }
}
}  // namespace

void robust_mutex_init(RobustMutex* m) { std::memset(m->storage, 0, sizeof m->storage); }

LockResult robust_mutex_trylock(RobustMutex* m) { return lock_result(acquire(win(m), no_deadline, true)); }

LockResult robust_mutex_lock(RobustMutex* m, Deadline deadline) { return robust_mutex_lock_blocking(m, deadline); }

LockResult robust_mutex_lock_blocking(RobustMutex* m, Deadline deadline) {
    return lock_result(acquire(win(m), deadline, false));
}

void robust_mutex_unlock(RobustMutex* m) {
    int status = robust_mutex_unlock_status(m);
    if (status != 0) robust_mutex_unlock_failed(status);
}

void robust_mutex_consistent(RobustMutex*) {}

bool robust_mutex_has_sleepers(const RobustMutex* m) noexcept {
    return win(m)->sleepers.load(std::memory_order_relaxed) != 0;
}

int robust_mutex_trylock_status(RobustMutex* m) noexcept {
    // The free word only: judging a holder costs three kernel calls (under
    // Wine, three wineserver round trips), and a contended acquire judges it
    // once where it waits.  So busy here does not say the holder lives; a
    // caller that gives up on busy asks robust_mutex_trylock (os.hpp).
    std::uint64_t expected = 0;
    if (win(m)->owner.compare_exchange_strong(expected, caller_token(), std::memory_order_acquire,
                                              std::memory_order_relaxed))
        return 0;
    return kStatusBusy;
}

int robust_mutex_unlock_status(RobustMutex* m) noexcept {
    WinMutex* w = win(m);
    std::uint64_t me = caller_token();
    if (!w->owner.compare_exchange_strong(me, 0, std::memory_order_seq_cst, std::memory_order_relaxed))
        return kStatusNotOwner;
    if (w->sleepers.load(std::memory_order_seq_cst) != 0) wake_one(w);
    return 0;
}

LockResult robust_mutex_trylock_result(int status) { return lock_result(status); }

void robust_mutex_unlock_failed(int) {
    throw std::system_error(EPERM, std::generic_category(), "mpservice: mutex unlock");
}

bool robust_mutex_held_in_this_process(const RobustMutex* m) noexcept {
    return static_cast<DWORD>(win(m)->owner.load(std::memory_order_acquire) >> 32) == GetCurrentProcessId();
}

// ---------------------------------------------------------------- processes

long current_pid() noexcept { return static_cast<long>(GetCurrentProcessId()); }

bool pid_alive(long pid) noexcept {
    HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, FALSE, static_cast<DWORD>(pid));
    if (!h) return GetLastError() == ERROR_ACCESS_DENIED;
    CloseHandle(h);
    return true;
}

bool process_running(long pid) noexcept {
    // SYNCHRONIZE: the wait below needs it (without it the wait fails, and
    // every process looked ended - a Barrier with parties in other processes broke).
    HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | SYNCHRONIZE, FALSE, static_cast<DWORD>(pid));
    if (!h) return GetLastError() == ERROR_ACCESS_DENIED;
    DWORD code = 0;
    bool running = GetExitCodeProcess(h, &code) && code == STILL_ACTIVE &&
                   WaitForSingleObject(h, 0) == WAIT_TIMEOUT;  // STILL_ACTIVE may be a real exit code
    CloseHandle(h);
    return running;
}

long current_tid() noexcept { return static_cast<long>(GetCurrentThreadId()); }

bool is_main_thread() noexcept { return GetCurrentThreadId() == g_main_thread; }

long parent_pid() noexcept {
    static const long parent = [] {
        // The layout of PROCESS_BASIC_INFORMATION, spelled out: MinGW's and
        // the Windows SDK's headers name its fields differently.
        struct BasicInformation {
            LONG exit_status;
            void* peb;
            ULONG_PTR affinity;
            LONG base_priority;
            ULONG_PTR pid;
            ULONG_PTR parent_pid;
        } info{};
        ULONG len = 0;
        if (NtQueryInformationProcess(GetCurrentProcess(), ProcessBasicInformation, &info, sizeof info, &len) != 0)
            return -1L;
        return static_cast<long>(info.parent_pid);
    }();
    return parent;
}

// ---------------------------------------------------------------- logging

void write_stderr(const char* data, std::size_t n) noexcept {
    HANDLE h = GetStdHandle(STD_ERROR_HANDLE);
    while (n > 0 && h && h != INVALID_HANDLE_VALUE) {
        DWORD done = 0;
        DWORD chunk = static_cast<DWORD>(std::min<std::size_t>(n, 1u << 30));
        if (is_socket(from_handle(h))) {
            int k = send(reinterpret_cast<SOCKET>(h), data, static_cast<int>(chunk), 0);
            if (k <= 0) {
                if (WSAGetLastError() != WSAEWOULDBLOCK) return;
                WSAPOLLFD q{reinterpret_cast<SOCKET>(h), POLLWRNORM, 0};
                WSAPoll(&q, 1, 100);
                continue;
            }
            done = static_cast<DWORD>(k);
        } else if (!WriteFile(h, data, chunk, &done, nullptr) || done == 0) {
            return;
        }
        data += done;
        n -= done;
    }
}

void local_time(long long seconds, int fields[6]) noexcept {
    std::time_t t = static_cast<std::time_t>(seconds);
    std::tm tm{};
    localtime_s(&tm, &t);
    fields[0] = tm.tm_year + 1900;
    fields[1] = tm.tm_mon + 1;
    fields[2] = tm.tm_mday;
    fields[3] = tm.tm_hour;
    fields[4] = tm.tm_min;
    fields[5] = tm.tm_sec;
}

// ---------------------------------------------------------------- channels

namespace {
// The frame header before the bytes of every channel write.
struct FrameHeader {
    std::uint32_t payload;   // bytes after the handle values
    std::uint32_t handles;   // handle values that follow this header
    std::uint32_t sender;    // pid of the process the handle values belong to
    std::uint32_t check;     // kFrameCheck ^ payload: a stream that is not ours is refused
};
constexpr std::uint32_t kFrameCheck = 0x4d505346;  // "MPSF"
constexpr std::size_t kMaxFrameHandles = 253;      // as on Linux, so callers batch alike
constexpr std::size_t kMaxFramePayload = 1u << 20;
// A handle value that says "a WSAPROTOCOL_INFOW record follows the values".
constexpr std::uint64_t kSocketRecord = ~std::uint64_t(0);

}  // namespace

/// A socket that WSADuplicateSocket prepared for this process.
handle_t socket_from_info(WSAPROTOCOL_INFOW& info) {
    if (!winsock_start()) throw_wsa("mpservice: WSAStartup");
    SOCKET s = WSASocketW(FROM_PROTOCOL_INFO, FROM_PROTOCOL_INFO, FROM_PROTOCOL_INFO, &info, 0,
                          WSA_FLAG_NO_HANDLE_INHERIT);
    if (s == INVALID_SOCKET) throw_wsa("mpservice: WSASocket from a duplicated socket");
    set_nonblocking(s);
    return static_cast<handle_t>(s);
}

namespace {

/// This process's parent, opened to put handles into its table (once: a
/// child dies with its parent, so the pid cannot be another process's).
HANDLE parent_for_handles() {
    static const HANDLE parent = [] {
        const long pid = parent_pid();
        return pid > 0 ? OpenProcess(PROCESS_DUP_HANDLE, FALSE, static_cast<DWORD>(pid)) : nullptr;
    }();
    return parent;
}

/// Puts copies of `handles` into `target`'s table; false (and nothing left
/// there) if one cannot be copied.  Sockets are skipped (nullptr): they travel
/// by their WSADuplicateSocket record.
bool push_handles(HANDLE target, const handle_t* handles, std::size_t nhandles, std::vector<HANDLE>& pushed) {
    for (std::size_t i = 0; i < nhandles; ++i) {
        HANDLE remote = nullptr;
        if (is_socket(handles[i])) {
            pushed.push_back(nullptr);
        } else if (DuplicateHandle(GetCurrentProcess(), as_handle(handles[i]), target, &remote, 0, FALSE,
                                   DUPLICATE_SAME_ACCESS)) {
            pushed.push_back(remote);
        } else {
            for (HANDLE r : pushed)
                if (r) DuplicateHandle(target, r, nullptr, nullptr, 0, FALSE, DUPLICATE_CLOSE_SOURCE);
            pushed.clear();
            return false;
        }
    }
    return true;
}

/// The frame carrying `a`, `b` and `handles`.  The handles are put straight
/// into the reader's table when the reader is a child of ours or our parent;
/// otherwise copies stay valid in this process until the reader takes them.
std::string frame_bytes(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                        const handle_t* handles, std::size_t nhandles) {
    DWORD peer = 0;
    bool to_child = false;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto it = reg().channels.find(ch);
        if (it != reg().channels.end()) peer = it->second.peer_pid, to_child = it->second.peer_is_child;
    }
    // To a child of ours, the handles are put straight into its handle table
    // (the values are its own): a frame it never reads - it was killed first -
    // leaves nothing behind here.  To our parent too: a child ends right after
    // it has sent its outcome, and its own table goes with it - copies left
    // there for the parent to pull would be gone before the parent read the
    // frame.  Otherwise copies of ours wait for the reader to take them
    // (pull_handle, DUPLICATE_CLOSE_SOURCE).
    std::vector<HANDLE> pushed;
    bool pushed_to_peer = false;
    if (to_child && nhandles > 0) {
        std::lock_guard<std::mutex> g(reg().mu);
        auto child = reg().children.find(static_cast<long>(peer));
        // (Not found, or a copy refused: it has ended, nobody will read the frame.)
        pushed_to_peer = child != reg().children.end() && push_handles(child->second.process, handles, nhandles, pushed);
    } else if (nhandles > 0 && peer != 0 && static_cast<long>(peer) == parent_pid() && parent_for_handles()) {
        pushed_to_peer = push_handles(parent_for_handles(), handles, nhandles, pushed);
    }
    FrameHeader hdr{static_cast<std::uint32_t>(na + nb), static_cast<std::uint32_t>(nhandles),
                    static_cast<std::uint32_t>(pushed_to_peer ? peer : GetCurrentProcessId()), 0};
    hdr.check = kFrameCheck ^ hdr.payload;
    std::string out(sizeof hdr + nhandles * sizeof(std::uint64_t) + na + nb, '\0');
    char* p = &out[0];
    std::memcpy(p, &hdr, sizeof hdr);
    p += sizeof hdr;
    std::string socket_infos;
    for (std::size_t i = 0; i < nhandles; ++i) {
        // A socket for a known peer travels as Winsock wants (and Wine needs):
        // WSADuplicateSocket for that process, whose record follows the values.
        WSAPROTOCOL_INFOW info{};
        if (peer && is_socket(handles[i]) && WSADuplicateSocketW(as_socket(handles[i]), peer, &info) == 0) {
            std::uint64_t v = kSocketRecord;
            std::memcpy(p, &v, sizeof v);
            p += sizeof v;
            socket_infos.append(reinterpret_cast<const char*>(&info), sizeof info);
            // That end now lives in `peer`: the end paired with it here talks to
            // `peer`, so sockets sent over it later travel the same way (a Pipe
            // made here, one end sent to a child, then an end sent over the
            // other: without this it went as a plain handle, unusable as a
            // socket there, and nothing arrived).
            std::lock_guard<std::mutex> g(reg().mu);
            auto it = reg().channels.find(handles[i]);
            if (it != reg().channels.end() && it->second.partner >= 0) {
                auto other = reg().channels.find(it->second.partner);
                if (other != reg().channels.end() && other->second.peer_pid == 0) other->second.peer_pid = peer;
            }
            continue;
        }
        HANDLE copy = nullptr;
        if (pushed_to_peer) {
            copy = pushed[i];
            if (!copy)  // a socket WSADuplicateSocket refused for the peer
                throw std::system_error(EIO, std::generic_category(), "mpservice: a socket for a peer could not be prepared");
        } else if (!DuplicateHandle(GetCurrentProcess(), as_handle(handles[i]), GetCurrentProcess(), &copy, 0, FALSE,
                                    DUPLICATE_SAME_ACCESS)) {
            throw_win32("mpservice: DuplicateHandle for a channel");
        }
        std::uint64_t v = reinterpret_cast<std::uintptr_t>(copy);
        std::memcpy(p, &v, sizeof v);
        p += sizeof v;
    }
    out.insert(sizeof hdr + nhandles * sizeof(std::uint64_t), socket_infos);
    p = &out[0] + sizeof hdr + nhandles * sizeof(std::uint64_t) + socket_infos.size();
    if (na) std::memcpy(p, a, na), p += na;
    if (nb) std::memcpy(p, b, nb);
    return out;
}

/// Sends what the socket takes now; the bytes sent, or -1 if the peer is gone.
long send_now(SOCKET s, const char* p, std::size_t n) {
    long total = 0;
    while (n > 0) {
        int k = send(s, p, static_cast<int>(std::min<std::size_t>(n, 1 << 20)), 0);
        if (k > 0) {
            p += k, n -= static_cast<std::size_t>(k), total += k;
            continue;
        }
        int err = WSAGetLastError();
        if (err == WSAEWOULDBLOCK) break;
        if (err == WSAECONNRESET || err == WSAECONNABORTED || err == WSAESHUTDOWN || err == WSAENOTCONN) return -1;
        throw_win32("mpservice: send", static_cast<DWORD>(err));
    }
    return total;
}

/// Sends all of it, waiting for room; false if the peer is gone.
bool send_blocking(SOCKET s, const char* p, std::size_t n) {
    while (n > 0) {
        long k = send_now(s, p, n);
        if (k < 0) return false;
        p += k, n -= static_cast<std::size_t>(k);
        if (n > 0) {
            WSAPOLLFD q{s, POLLWRNORM, 0};
            WSAPoll(&q, 1, -1);
            if (q.revents & (POLLHUP | POLLERR | POLLNVAL)) return false;
        }
    }
    return true;
}

/// Flushes a frame left over by channel_write_some; true when nothing is left.
bool flush_pending(handle_t ch, bool block) {
    std::string pending;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto it = reg().channels.find(ch);
        if (it == reg().channels.end() || it->second.pending.empty()) return true;
        pending.swap(it->second.pending);
    }
    long k = block ? (send_blocking(as_socket(ch), pending.data(), pending.size()) ? long(pending.size()) : -1)
                   : send_now(as_socket(ch), pending.data(), pending.size());
    if (k < 0) return true;  // the peer is gone: nothing to keep
    if (static_cast<std::size_t>(k) == pending.size()) return true;
    std::lock_guard<std::mutex> g(reg().mu);
    reg().channels[ch].pending = pending.substr(static_cast<std::size_t>(k));
    return false;
}

/// Receives exactly n bytes, waiting; false at end of stream.
bool recv_exact(SOCKET s, char* p, std::size_t n) {
    while (n > 0) {
        int k = recv(s, p, static_cast<int>(std::min<std::size_t>(n, 1 << 20)), 0);
        if (k > 0) {
            p += k, n -= static_cast<std::size_t>(k);
            continue;
        }
        if (k == 0) return false;
        int err = WSAGetLastError();
        if (err != WSAEWOULDBLOCK) return false;
        WSAPOLLFD q{s, POLLRDNORM, 0};
        WSAPoll(&q, 1, -1);
    }
    return true;
}

/// Takes a handle out of the process that sent it (see the top of the file).
handle_t pull_handle(DWORD sender, std::uint64_t value) {
    HANDLE mine = nullptr;
    if (sender == GetCurrentProcessId()) return static_cast<handle_t>(value);
    HANDLE proc = OpenProcess(PROCESS_DUP_HANDLE, FALSE, sender);
    if (!proc) throw_win32("mpservice: OpenProcess of a handle's sender");
    BOOL ok = DuplicateHandle(proc, reinterpret_cast<HANDLE>(static_cast<std::uintptr_t>(value)), GetCurrentProcess(),
                              &mine, 0, FALSE, DUPLICATE_SAME_ACCESS | DUPLICATE_CLOSE_SOURCE);
    DWORD err = GetLastError();
    CloseHandle(proc);
    if (!ok) throw_win32("mpservice: DuplicateHandle from a handle's sender", err);
    return from_handle(mine);
}
}  // namespace

void channel_pair(handle_t& a, handle_t& b) {
    tcp_pair(a, b);
    std::lock_guard<std::mutex> g(reg().mu);
    reg().channels[a].partner = b;
    reg().channels[b].partner = a;
}

void packet_pair(handle_t&, handle_t&) {
    throw std::system_error(ENOSYS, std::generic_category(),
                            "mpservice: packet channels exist only for the fork server, which Windows does not have");
}

bool channel_write(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb, const handle_t* handles,
                   std::size_t nhandles) {
    std::size_t batches = (nhandles + kMaxFrameHandles - 1) / kMaxFrameHandles;
    if (batches > na + nb)
        throw std::invalid_argument("mpservice: " + std::to_string(nhandles) + " OS handles need at least " +
                                    std::to_string(batches) + " bytes to ride on");
    if (!flush_pending(ch, true)) return false;
    // Frames of at most kMaxFramePayload bytes; each batch of handles rides on its own frame.
    const char* pa = static_cast<const char*>(a);
    const char* pb = static_cast<const char*>(b);
    std::size_t hs_done = 0;
    bool first = true;
    while (first || na + nb > 0) {
        first = false;
        std::size_t hs = std::min(nhandles - hs_done, kMaxFrameHandles);
        std::size_t room = (nhandles - hs_done > kMaxFrameHandles) ? 1 : kMaxFramePayload;
        std::size_t ta = std::min(na, room);
        std::size_t tb = std::min(nb, room - ta);
        std::string frame = frame_bytes(ch, pa, ta, pb, tb, handles + hs_done, hs);
        hs_done += hs;
        pa += ta, na -= ta, pb += tb, nb -= tb;
        if (!send_blocking(as_socket(ch), frame.data(), frame.size())) return false;
    }
    return true;
}

long channel_write_some(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                        const handle_t* handles, std::size_t nhandles) {
    if (nhandles > kMaxFrameHandles) throw std::invalid_argument("mpservice: more than 253 OS handles in one message");
    if (na + nb == 0) return 0;
    if (!flush_pending(ch, false)) return 0;
    WSAPOLLFD q{as_socket(ch), POLLWRNORM, 0};
    if (WSAPoll(&q, 1, 0) <= 0) return 0;
    if (q.revents & (POLLHUP | POLLERR | POLLNVAL)) return -1;
    // One frame of a bounded size; what the socket does not take now is kept
    // and sent first by the next write on this end (the bytes count as written).
    constexpr std::size_t kChunk = 64 * 1024;
    std::size_t ta = std::min(na, kChunk);
    std::size_t tb = std::min(nb, kChunk - ta);
    std::string frame = frame_bytes(ch, a, ta, b, tb, handles, nhandles);
    long k = send_now(as_socket(ch), frame.data(), frame.size());
    if (k < 0) return -1;
    if (static_cast<std::size_t>(k) < frame.size()) {
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[ch].pending = frame.substr(static_cast<std::size_t>(k));
    }
    return static_cast<long>(ta + tb);
}

long channel_read(handle_t ch, void* buf, std::size_t cap, std::vector<handle_t>* handles, bool nonblocking) {
    SOCKET s = as_socket(ch);
    for (;;) {
        if (nonblocking) {
            WSAPOLLFD q{s, POLLRDNORM, 0};
            if (WSAPoll(&q, 1, 0) <= 0) return -1;
        }
        std::uint64_t left = 0;
        {
            std::lock_guard<std::mutex> g(reg().mu);
            left = reg().channels[ch].payload_left;
        }
        if (left == 0) {
            // A new frame: its header and handles (sent together, so waiting
            // for their last bytes is short).
            FrameHeader hdr{};
            if (!recv_exact(s, reinterpret_cast<char*>(&hdr), sizeof hdr)) return 0;
            if ((hdr.check ^ kFrameCheck) != hdr.payload || hdr.handles > kMaxFrameHandles)
                throw std::system_error(EPROTO, std::generic_category(), "mpservice: a channel frame is malformed");
            std::vector<std::uint64_t> values(hdr.handles);
            if (hdr.handles && !recv_exact(s, reinterpret_cast<char*>(values.data()), values.size() * sizeof values[0]))
                return 0;
            for (std::uint64_t v : values) {
                handle_t h;
                if (v == kSocketRecord) {
                    WSAPROTOCOL_INFOW info{};
                    if (!recv_exact(s, reinterpret_cast<char*>(&info), sizeof info)) return 0;
                    h = socket_from_info(info);
                } else {
                    h = pull_handle(hdr.sender, v);
                }
                if (is_socket(h)) {
                    std::lock_guard<std::mutex> g(reg().mu);
                    reg().channels[h];
                }
                if (handles) handles->push_back(h);
                else close_handle(h);
            }
            if (hdr.payload == 0) {
                if (hdr.handles > 0 && handles) return 0 + 0;  // handles only: nothing to count (callers send bytes)
                continue;
            }
            left = hdr.payload;
        }
        std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(left, cap));
        int k;
        for (;;) {
            k = recv(s, static_cast<char*>(buf), static_cast<int>(std::min<std::size_t>(want, 1 << 30)), 0);
            if (k >= 0) break;
            int err = WSAGetLastError();
            if (err == WSAECONNRESET || err == WSAECONNABORTED) return 0;
            if (err != WSAEWOULDBLOCK) throw_win32("mpservice: recv", static_cast<DWORD>(err));
            WSAPOLLFD q{s, POLLRDNORM, 0};
            WSAPoll(&q, 1, -1);
        }
        if (k == 0) return 0;
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[ch].payload_left = left - static_cast<std::uint64_t>(k);
        return k;
    }
}

unsigned wait_readable(const handle_t* hs, int n, int timeout_ms) {
    std::vector<WSAPOLLFD> p;
    for (int i = 0; i < n && i < 32; ++i) p.push_back(WSAPOLLFD{as_socket(hs[i]), POLLRDNORM, 0});
    poll_sockets(p, timeout_ms);
    unsigned mask = 0;
    for (std::size_t i = 0; i < p.size(); ++i)
        if (readable_revents(p[i].revents)) mask |= 1u << i;
    return mask;
}

unsigned wait_io(handle_t h, unsigned want, int timeout_ms) {
    WSAPOLLFD q{as_socket(h), 0, 0};
    if (want & io_readable) q.events |= POLLRDNORM;
    if (want & io_writable) q.events |= POLLWRNORM;
    if (WSAPoll(&q, 1, timeout_ms) <= 0) return 0;
    bool failed = (q.revents & (POLLERR | POLLHUP | POLLNVAL)) != 0;
    unsigned got = 0;
    if ((want & io_readable) && ((q.revents & POLLRDNORM) || failed)) got |= io_readable;
    if ((want & io_writable) && ((q.revents & POLLWRNORM) || failed)) got |= io_writable;
    return got;
}

std::size_t wait_readable_any(const handle_t* hs, std::size_t n, int timeout_ms, unsigned char* ready) {
    std::vector<WSAPOLLFD> p(n);
    for (std::size_t i = 0; i < n; ++i) p[i] = WSAPOLLFD{as_socket(hs[i]), POLLRDNORM, 0};
    poll_sockets(p, timeout_ms);
    std::size_t count = 0;
    for (std::size_t i = 0; i < n; ++i) {
        ready[i] = readable_revents(p[i].revents);
        count += ready[i];
    }
    return count;
}

// ---- pollers and wake events

namespace {
std::shared_ptr<Poller> find_poller(handle_t h) {
    std::lock_guard<std::mutex> g(reg().mu);
    auto it = reg().pollers.find(h);
    return it == reg().pollers.end() ? nullptr : it->second;
}

/// The sockets a poller watches, nested pollers flattened (with the outer
/// token), each poller's own wake socket included (token: none).
void flatten(const std::shared_ptr<Poller>& p, std::uint64_t token, bool outer, std::vector<WSAPOLLFD>& fds,
             std::vector<std::pair<bool, std::uint64_t>>& tokens, int depth) {
    std::vector<std::pair<handle_t, std::uint64_t>> items;
    {
        std::lock_guard<std::mutex> g(p->mu);
        items = p->items;
    }
    fds.push_back(WSAPOLLFD{as_socket(p->wake_read), POLLRDNORM, 0});
    tokens.emplace_back(false, 0);
    for (auto& [h, t] : items) {
        if (auto nested = depth < 4 ? find_poller(h) : nullptr) {
            flatten(nested, outer ? t : token, false, fds, tokens, depth + 1);
            continue;
        }
        fds.push_back(WSAPOLLFD{as_socket(h), POLLRDNORM, 0});
        tokens.emplace_back(true, outer ? t : token);
    }
}

void drain_socket(handle_t h) noexcept {
    char buf[256];
    while (recv(as_socket(h), buf, sizeof buf, 0) > 0) {
    }
}
}  // namespace

handle_t poller_create() {
    auto p = std::make_shared<Poller>();
    tcp_pair(p->wake_read, p->wake_write);
    // The poller's own handle: an event object, so that its value is unique
    // among this process's handles (nothing waits on it).
    HANDLE id = CreateEventW(nullptr, TRUE, FALSE, nullptr);
    if (!id) throw_win32("mpservice: CreateEvent");
    std::lock_guard<std::mutex> g(reg().mu);
    reg().pollers[from_handle(id)] = p;
    return from_handle(id);
}

void poller_add(handle_t poller, handle_t h, std::uint64_t token) {
    auto p = find_poller(poller);
    if (!p) throw std::system_error(EBADF, std::generic_category(), "mpservice: poller_add");
    {
        std::lock_guard<std::mutex> g(p->mu);
        for (auto& item : p->items)
            if (item.first == h) throw std::system_error(EEXIST, std::generic_category(), "mpservice: poller_add");
        p->items.emplace_back(h, token);
    }
    char one = 1;
    send(as_socket(p->wake_write), &one, 1, 0);  // a waiting poller_wait looks again
}

void poller_remove(handle_t poller, handle_t h) noexcept {
    auto p = find_poller(poller);
    if (!p) return;
    {
        std::lock_guard<std::mutex> g(p->mu);
        p->items.erase(std::remove_if(p->items.begin(), p->items.end(), [&](auto& i) { return i.first == h; }),
                       p->items.end());
    }
    char one = 1;
    send(as_socket(p->wake_write), &one, 1, 0);
}

int poller_wait(handle_t poller, std::uint64_t* tokens, int max, int timeout_ms) {
    auto p = find_poller(poller);
    if (!p) throw std::system_error(EBADF, std::generic_category(), "mpservice: poller_wait");
    const Deadline until = timeout_ms < 0 ? no_deadline : deadline_after(std::chrono::milliseconds(timeout_ms));
    for (;;) {
        std::vector<WSAPOLLFD> fds;
        std::vector<std::pair<bool, std::uint64_t>> toks;
        flatten(p, 0, true, fds, toks, 0);
        DWORD ms = wait_ms(until);
        int rc = WSAPoll(fds.data(), static_cast<ULONG>(fds.size()), ms == INFINITE ? -1 : static_cast<int>(ms));
        if (rc < 0) rc = 0;
        int n = 0;
        bool changed = false;
        for (std::size_t i = 0; i < fds.size(); ++i) {
            if (!readable_revents(fds[i].revents)) continue;
            if (!toks[i].first) {  // a wake socket: the registrations changed
                drain_socket(static_cast<handle_t>(fds[i].fd));
                changed = true;
                continue;
            }
            bool dup = false;
            for (int j = 0; j < n; ++j) dup = dup || tokens[j] == toks[i].second;
            if (!dup && n < max) tokens[n++] = toks[i].second;
        }
        if (n > 0) return n;
        if (!changed && Clock::now() >= until) return 0;
        if (!changed && rc == 0 && until != no_deadline) return 0;
    }
}

handle_t wake_event_create() {
    handle_t r, w;
    tcp_pair(r, w);
    std::lock_guard<std::mutex> g(reg().mu);
    reg().paired_write_ends[r] = w;
    return r;
}

void wake_event_signal(handle_t ev) noexcept {
    handle_t w = invalid_handle;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto it = reg().paired_write_ends.find(ev);
        if (it != reg().paired_write_ends.end()) w = it->second;
    }
    char one = 1;
    if (w >= 0) send(as_socket(w), &one, 1, 0);
}

void wake_event_drain(handle_t ev) noexcept { drain_socket(ev); }

// ---- starting children

namespace {
/// The kill-on-close job every child of this process is put into: when the
/// last handle closes - at our exit however it happens - the system ends them.
HANDLE children_job() {
    static HANDLE job = [] {
        HANDLE j = CreateJobObjectW(nullptr, nullptr);
        if (!j) throw_win32("mpservice: CreateJobObject");
        JOBOBJECT_EXTENDED_LIMIT_INFORMATION info{};
        info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
        if (!SetInformationJobObject(j, JobObjectExtendedLimitInformation, &info, sizeof info))
            throw_win32("mpservice: SetInformationJobObject");
        return j;
    }();
    return job;
}

std::wstring quote_argument(const std::wstring& arg) {
    // The quoting CommandLineToArgvW and the C runtime undo.
    if (!arg.empty() && arg.find_first_of(L" \t\n\v\"") == std::wstring::npos) return arg;
    std::wstring out = L"\"";
    std::size_t backslashes = 0;
    for (wchar_t c : arg) {
        if (c == L'\\') {
            ++backslashes;
            continue;
        }
        if (c == L'"') out.append(backslashes * 2 + 1, L'\\');
        else out.append(backslashes, L'\\');
        backslashes = 0;
        out.push_back(c);
    }
    out.append(backslashes * 2, L'\\');
    out.push_back(L'"');
    return out;
}

std::wstring own_executable() {
    std::wstring path(MAX_PATH, L'\0');
    for (;;) {
        DWORD n = GetModuleFileNameW(nullptr, &path[0], static_cast<DWORD>(path.size()));
        if (n == 0) throw_win32("mpservice: GetModuleFileName");
        if (n < path.size()) {
            path.resize(n);
            return path;
        }
        path.resize(path.size() * 2);
    }
}
}  // namespace

long spawn_self(const std::string& argv0, const std::string& marker, handle_t inherit,
                const std::vector<std::string>* environment) {
    std::wstring exe = own_executable();
    // A given environment becomes the child's block: "NAME=value" entries, each
    // ended by a NUL, the block by one more.
    std::wstring env_block;
    if (environment) {
        for (const std::string& entry : *environment) {
            env_block += widen(entry);
            env_block.push_back(L'\0');
        }
        if (environment->empty()) env_block.push_back(L'\0');  // an empty block is two NULs
        env_block.push_back(L'\0');
    }
    // The child takes its channel from us (adopt_channel): an inherited socket
    // is not usable as one under Wine, and Winsock's own way to hand a socket
    // over is WSADuplicateSocket for a process id - known only once the child
    // exists.  So the marker names a small section of ours that receives the
    // socket's record before the child runs, and stays open until it is
    // reaped; the marker ends "<handle>:<pid>", and the handle is swapped.
    HANDLE keeper = CreateFileMappingW(INVALID_HANDLE_VALUE, nullptr, PAGE_READWRITE, 0, sizeof(WSAPROTOCOL_INFOW), nullptr);
    if (!keeper) throw_win32("mpservice: CreateFileMapping for a child's channel");
    // The "<handle>:<pid>" part may be followed by a suffix (":w" for a warm
    // spawn child): it is found where it is, not only at the very end.
    std::string marked = marker;
    const std::string old_value = std::to_string(inherit) + ":" + std::to_string(current_pid());
    const std::string new_value = std::to_string(reinterpret_cast<std::uintptr_t>(keeper)) + ":" + std::to_string(current_pid());
    const std::size_t at = marked.rfind(old_value);
    if (at != std::string::npos && at > 0 && (marked[at - 1] == '=' || marked[at - 1] == ':') &&
        (at + old_value.size() == marked.size() || marked[at + old_value.size()] == ':'))
        marked.replace(at, old_value.size(), new_value);
    std::wstring cmd = quote_argument(widen(argv0.empty() ? narrow(exe.c_str()) : argv0)) + L" " + quote_argument(widen(marked));
    // Only the standard handles are inherited: the handle list names them,
    // and no other thread's spawn can inherit them unasked (each lists its own).
    std::vector<HANDLE> list;
    auto add = [&](HANDLE h) {
        if (!h || h == INVALID_HANDLE_VALUE) return;
        if (std::find(list.begin(), list.end(), h) != list.end()) return;
        DWORD type = GetFileType(h);
        if (type == FILE_TYPE_UNKNOWN && GetLastError() != NO_ERROR && !is_socket(from_handle(h))) return;
        if (!SetHandleInformation(h, HANDLE_FLAG_INHERIT, HANDLE_FLAG_INHERIT)) return;
        list.push_back(h);
    };
    HANDLE std_in = GetStdHandle(STD_INPUT_HANDLE), std_out = GetStdHandle(STD_OUTPUT_HANDLE),
           std_err = GetStdHandle(STD_ERROR_HANDLE);
    add(std_in), add(std_out), add(std_err);

    SIZE_T size = 0;
    InitializeProcThreadAttributeList(nullptr, 1, 0, &size);
    std::vector<unsigned char> attr_buf(size);
    auto* attrs = reinterpret_cast<LPPROC_THREAD_ATTRIBUTE_LIST>(attr_buf.data());
    if (!InitializeProcThreadAttributeList(attrs, 1, 0, &size)) throw_win32("mpservice: InitializeProcThreadAttributeList");
    if (!UpdateProcThreadAttribute(attrs, 0, PROC_THREAD_ATTRIBUTE_HANDLE_LIST, list.data(), list.size() * sizeof(HANDLE),
                                   nullptr, nullptr)) {
        DeleteProcThreadAttributeList(attrs);
        throw_win32("mpservice: UpdateProcThreadAttribute");
    }
    STARTUPINFOEXW si{};
    si.StartupInfo.cb = sizeof si;
    si.StartupInfo.dwFlags = STARTF_USESTDHANDLES;
    si.StartupInfo.hStdInput = std_in;
    si.StartupInfo.hStdOutput = std_out;
    si.StartupInfo.hStdError = std_err;
    si.lpAttributeList = attrs;
    PROCESS_INFORMATION pi{};
    std::vector<wchar_t> cmdline(cmd.begin(), cmd.end());
    cmdline.push_back(L'\0');
    HANDLE job = children_job();
    BOOL ok = CreateProcessW(exe.c_str(), cmdline.data(), nullptr, nullptr, TRUE,
                             CREATE_SUSPENDED | EXTENDED_STARTUPINFO_PRESENT | CREATE_UNICODE_ENVIRONMENT,
                             environment ? static_cast<void*>(&env_block[0]) : nullptr, nullptr, &si.StartupInfo,
                             &pi);
    DWORD err = GetLastError();
    DeleteProcThreadAttributeList(attrs);
    if (!ok) {
        CloseHandle(keeper);
        throw_win32("mpservice: CreateProcessW of this executable", err);
    }
    // In the job before it runs a single instruction: it cannot outlive us.
    if (!AssignProcessToJobObject(job, pi.hProcess)) {
        err = GetLastError();
        TerminateProcess(pi.hProcess, 1);
        CloseHandle(pi.hThread);
        CloseHandle(pi.hProcess);
        CloseHandle(keeper);
        throw_win32("mpservice: AssignProcessToJobObject", err);
    }
    WSAPROTOCOL_INFOW info{};
    void* view = MapViewOfFile(keeper, FILE_MAP_WRITE, 0, 0, sizeof info);
    if (!view || WSADuplicateSocketW(as_socket(inherit), pi.dwProcessId, &info) != 0) {
        err = view ? static_cast<DWORD>(WSAGetLastError()) : GetLastError();
        if (view) UnmapViewOfFile(view);
        TerminateProcess(pi.hProcess, 1);
        CloseHandle(pi.hThread);
        CloseHandle(pi.hProcess);
        CloseHandle(keeper);
        throw_win32("mpservice: WSADuplicateSocket for a child", err);
    }
    std::memcpy(view, &info, sizeof info);
    UnmapViewOfFile(view);
    ResumeThread(pi.hThread);
    CloseHandle(pi.hThread);
    std::lock_guard<std::mutex> g(reg().mu);
    Child& child = reg().children[static_cast<long>(pi.dwProcessId)];
    child.process = pi.hProcess;
    child.keeper = keeper;
    // Frames on the parent's end may carry sockets: they are prepared for the child.
    if (auto it = reg().channels.find(inherit); it != reg().channels.end() && it->second.partner >= 0)
        reg().channels[it->second.partner].peer_pid = pi.dwProcessId,
        reg().channels[it->second.partner].peer_is_child = true;
    return static_cast<long>(pi.dwProcessId);
}

long fork_process() {
    throw std::system_error(ENOSYS, std::generic_category(),
                            "mpservice: the 'fork' start method does not exist on Windows (as in Python): use 'spawn'");
}

namespace {
void CALLBACK on_child_exit(void* param, BOOLEAN) {
    // The read end becomes readable: end of stream.  The wait ran once
    // (WT_EXECUTEONLYONCE); reap_child unregisters it and frees the notice.
    static_cast<ExitNotice*>(param)->close_write_end();
}

/// A duplicate of child `pid`'s process handle (the caller closes it), or
/// null if it is not one of ours or was reaped: the registry's own handle is
/// closed by reap_child while another thread may still want to use it.
HANDLE child_process(long pid) {
    std::lock_guard<std::mutex> g(reg().mu);
    auto it = reg().children.find(pid);
    if (it == reg().children.end()) return nullptr;
    HANDLE copy = nullptr;
    if (!DuplicateHandle(GetCurrentProcess(), it->second.process, GetCurrentProcess(), &copy, 0, FALSE,
                         DUPLICATE_SAME_ACCESS))
        return nullptr;
    return copy;
}

/// The Python-style exit code of a Win32 exit status (see README, platforms).
int python_exitcode(DWORD status) {
    if (status >= 0x10000 && status < 0x10000 + 64) return -static_cast<int>(status - 0x10000);  // send_signal
    switch (status) {
        case 0xC0000005: return -11;  // access violation: SIGSEGV
        case 0xC000001D: return -4;   // illegal instruction: SIGILL
        case 0xC0000094:
        case 0xC0000095: return -8;   // integer division: SIGFPE
        case 0xC00000FD: return -11;  // stack overflow: SIGSEGV
        case 0xC0000409: return -6;   // fail-fast (abort in the UCRT): SIGABRT
        default: break;
    }
    if (status >= 0xC0000000) return -6;  // another fatal exception: abnormal end
    return static_cast<int>(status & 0x7fffffff);
}
}  // namespace

handle_t process_handle(long pid) noexcept {
    try {
        handle_t r, w;
        tcp_pair(r, w);
        auto* notice = new ExitNotice;
        notice->write_end = w;
        {
            // Under the lock: reap_child cannot close the process handle meanwhile.
            std::lock_guard<std::mutex> g(reg().mu);
            auto it = reg().children.find(pid);
            if (it != reg().children.end() &&
                RegisterWaitForSingleObject(&notice->wait, it->second.process, on_child_exit, notice, INFINITE,
                                            WT_EXECUTEONLYONCE | WT_EXECUTEINWAITTHREAD)) {
                it->second.notices.push_back(notice);  // freed by reap_child
                return r;
            }
        }
        close_raw(r), close_raw(w);
        delete notice;
        return invalid_handle;
    } catch (...) {
        return invalid_handle;
    }
}

ReapResult reap_child(long pid, handle_t, bool block, int* exitcode) {
    HANDLE proc = child_process(pid);  // (our own duplicate: waited on outside the lock)
    if (!proc) {
        // Not one of ours (any more): it was collected already.
        return ReapResult::reaped_elsewhere;
    }
    DWORD rc = WaitForSingleObject(proc, block ? INFINITE : 0);
    if (rc == WAIT_TIMEOUT) {
        CloseHandle(proc);
        return ReapResult::running;
    }
    DWORD status = 0;
    const BOOL got = GetExitCodeProcess(proc, &status);
    const DWORD err = GetLastError();
    CloseHandle(proc);
    if (!got) throw_win32("mpservice: GetExitCodeProcess", err);
    *exitcode = python_exitcode(status);
    // The child's end: what we held for it goes (once, by whichever thread
    // gets here first; another one reaping it at the same time has its status too).
    Child child;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto it = reg().children.find(pid);
        if (it != reg().children.end()) {
            child = std::move(it->second);
            reg().children.erase(it);
        }
    }
    for (ExitNotice* n : child.notices) {
        // Waits until a running callback has returned; a wait that had not
        // fired yet is cancelled, and its end of stream is given here.
        UnregisterWaitEx(n->wait, INVALID_HANDLE_VALUE);
        n->close_write_end();
        delete n;
    }
    if (child.keeper) CloseHandle(child.keeper);
    if (child.process) CloseHandle(child.process);
    return ReapResult::reaped;
}

bool reap_any_child(long*, int*) { return false; }

bool send_signal(long pid, handle_t, int sig) noexcept {
    // Windows has no signals: every signal ends the process (as Python's
    // terminate() and kill() on Windows), with an exit status that names it.
    if (sig == 0) return process_running(pid);
    HANDLE proc = child_process(pid);  // (a duplicate, or a handle of our own)
    if (!proc) proc = OpenProcess(PROCESS_TERMINATE | SYNCHRONIZE, FALSE, static_cast<DWORD>(pid));
    if (!proc) return false;
    BOOL ok = TerminateProcess(proc, 0x10000u + static_cast<unsigned>(sig & 63));
    // A process that has ended already counts as signalled (as kill() on a zombie).
    const bool ended = !ok && WaitForSingleObject(proc, 0) == WAIT_OBJECT_0;
    CloseHandle(proc);  // (only after the wait: it used the handle)
    return ok != 0 || ended;
}

int signal_terminate() noexcept { return 15; }
int signal_kill() noexcept { return 9; }

std::string signal_name(int sig) {
    switch (sig) {
        case 2: return "SIGINT";
        case 4: return "SIGILL";
        case 6: return "SIGABRT";
        case 8: return "SIGFPE";
        case 9: return "SIGKILL";
        case 11: return "SIGSEGV";
        case 15: return "SIGTERM";
        default: return "signal " + std::to_string(sig);
    }
}

bool secure_execution() noexcept { return false; }

bool channel_peer(handle_t h, long* pid, long* uid) noexcept {
    // A handle value in a fresh process's table got there by inheritance from
    // the process that created it (or by someone allowed to duplicate handles
    // into us: our own user); a loopback stream socket is a channel.
    int type = 0;
    int len = sizeof type;
    if (!winsock_start() || getsockopt(as_socket(h), SOL_SOCKET, SO_TYPE, reinterpret_cast<char*>(&type), &len) != 0 ||
        type != SOCK_STREAM)
        return false;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[h];
    }
    *pid = parent_pid();
    *uid = current_user();
    return true;
}

bool is_own_user(long uid) noexcept { return uid == current_user(); }

handle_t adopt_channel(handle_t marked, long parent) noexcept {
    HANDLE proc = OpenProcess(PROCESS_DUP_HANDLE, FALSE, static_cast<DWORD>(parent));
    if (!proc) return invalid_handle;
    HANDLE mine = nullptr;
    // Not DUPLICATE_CLOSE_SOURCE: the parent closes its copy when it reaps us.
    BOOL ok = DuplicateHandle(proc, as_handle(marked), GetCurrentProcess(), &mine, 0, FALSE, DUPLICATE_SAME_ACCESS);
    CloseHandle(proc);
    if (!ok) return invalid_handle;
    WSAPROTOCOL_INFOW info{};
    void* view = MapViewOfFile(mine, FILE_MAP_READ, 0, 0, sizeof info);
    if (view) std::memcpy(&info, view, sizeof info), UnmapViewOfFile(view);
    CloseHandle(mine);
    if (!view) return invalid_handle;
    try {
        handle_t ch = socket_from_info(info);
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[ch].peer_pid = static_cast<DWORD>(parent);
        return ch;
    } catch (...) {
        return invalid_handle;
    }
}

namespace {
void CALLBACK on_parent_exit(void*, BOOLEAN) { TerminateProcess(GetCurrentProcess(), 0x10000u + 9); }
}  // namespace

long hold_address_space_past_exit() noexcept { return 0; }  // a Windows exit has no such teardown to skip

bool die_with_parent(long expected_parent) noexcept {
    // The parent's job ends us when it dies; this wait covers a process whose
    // job could not be set (and ends us within the same instant otherwise).
    HANDLE parent = OpenProcess(SYNCHRONIZE, FALSE, static_cast<DWORD>(expected_parent));
    if (!parent) return false;
    HANDLE wait = nullptr;
    RegisterWaitForSingleObject(&wait, parent, on_parent_exit, nullptr, INFINITE, WT_EXECUTEONLYONCE);
    return parent_pid() == expected_parent && WaitForSingleObject(parent, 0) == WAIT_TIMEOUT;
}

void reset_signal_handlers() noexcept {}

bool current_thread_stack(void** low, std::size_t* size) noexcept {
    ULONG_PTR lo = 0, hi = 0;
    GetCurrentThreadStackLimits(&lo, &hi);
    if (!lo || hi <= lo) return false;
    *low = reinterpret_cast<void*>(lo);
    *size = static_cast<std::size_t>(hi - lo);
    return true;
}

void leak_checker_root(const void*, std::size_t) noexcept {}

void close_handles_except(handle_t) noexcept {
    // Nothing to do: a child inherits only the handles its spawn listed.
}

void exit_now(int code) noexcept {
    TerminateProcess(GetCurrentProcess(), static_cast<UINT>(code));
    std::_Exit(code);  // not reached
}

bool on_exit_status(void (*)(int) noexcept) noexcept { return false; }

handle_t child_exit_events() {
    throw std::system_error(ENOSYS, std::generic_category(), "mpservice: child-exit events exist only for the fork server");
}
void child_exit_events_drain(handle_t) noexcept {}
void child_exit_events_release(handle_t) noexcept {}

// ---------------------------------------------------------------- modules and code addresses

namespace {
/// The module holding `addr` and its base; false if none.
bool module_of(const void* addr, HMODULE& mod) noexcept {
    return GetModuleHandleExW(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS | GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
                              static_cast<LPCWSTR>(addr), &mod) != 0;
}

/// "" for the executable, the module's path otherwise (as the loader has it).
std::string module_name(HMODULE mod) {
    if (mod == GetModuleHandleW(nullptr)) return {};
    wchar_t path[MAX_PATH * 2];
    DWORD n = GetModuleFileNameW(mod, path, static_cast<DWORD>(sizeof path / sizeof path[0]));
    return narrow(path, static_cast<int>(n));
}

HMODULE module_named(const std::string& name) {
    if (name.empty()) return GetModuleHandleW(nullptr);
    HMODULE mods[1024];
    DWORD needed = 0;
    if (K32EnumProcessModules(GetCurrentProcess(), mods, sizeof mods, &needed)) {
        for (DWORD i = 0; i < needed / sizeof(HMODULE) && i < 1024; ++i)
            if (module_name(mods[i]) == name) return mods[i];
    }
    return nullptr;
}

const IMAGE_NT_HEADERS* nt_headers(HMODULE mod) noexcept {
    auto base = reinterpret_cast<const unsigned char*>(mod);
    auto dos = reinterpret_cast<const IMAGE_DOS_HEADER*>(base);
    return reinterpret_cast<const IMAGE_NT_HEADERS*>(base + dos->e_lfanew);
}

/// Whether the offset from the module's base lies in an executable section.
bool in_code(HMODULE mod, std::uintptr_t offset) noexcept {
    const IMAGE_NT_HEADERS* nt = nt_headers(mod);
    const IMAGE_SECTION_HEADER* sec = IMAGE_FIRST_SECTION(nt);
    for (unsigned i = 0; i < nt->FileHeader.NumberOfSections; ++i, ++sec)
        if ((sec->Characteristics & IMAGE_SCN_MEM_EXECUTE) && offset >= sec->VirtualAddress &&
            offset < sec->VirtualAddress + std::max(sec->Misc.VirtualSize, sec->SizeOfRawData))
            return true;
    return false;
}

/// module_of, and the address lies inside the module's image (Wine answers
/// for some addresses outside any image too).
bool image_of(const void* addr, HMODULE& mod) noexcept {
    if (!module_of(addr, mod)) return false;
    auto pc = reinterpret_cast<std::uintptr_t>(addr), base = reinterpret_cast<std::uintptr_t>(mod);
    return pc >= base && pc - base < nt_headers(mod)->OptionalHeader.SizeOfImage;
}

std::uint64_t module_hash(const std::string& name) noexcept {
    std::uint64_t h = 1469598103934665603ull;  // FNV-1a, as on POSIX
    for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
    return h ? h : 1;
}
}  // namespace

bool module_address(const void* addr, ModuleAddress& out) {
    HMODULE mod;
    if (!module_of(addr, mod)) return false;
    out.module = module_name(mod);
    out.offset = reinterpret_cast<std::uintptr_t>(addr) - reinterpret_cast<std::uintptr_t>(mod);
    return true;
}

const void* module_resolve(const ModuleAddress& where) {
    HMODULE mod = module_named(where.module);
    if (!mod && !where.module.empty()) mod = LoadLibraryW(widen(where.module).c_str());
    if (!mod) return nullptr;
    return reinterpret_cast<const unsigned char*>(mod) + where.offset;
}

std::string module_fingerprint(const std::string& module) {
    HMODULE mod = module_named(module);
    if (!mod) return "unknown";
    const IMAGE_NT_HEADERS* nt = nt_headers(mod);
    // The link time stamp, image size and checksum the linker wrote: the same
    // build has the same ones.
    return "pe:" + std::to_string(nt->FileHeader.TimeDateStamp) + ":" + std::to_string(nt->OptionalHeader.SizeOfImage) +
           ":" + std::to_string(nt->OptionalHeader.CheckSum) + ":" + std::to_string(nt->OptionalHeader.SizeOfCode);
}

CodeRef code_ref_of(const void* address) {
    HMODULE mod;
    if (!module_of(address, mod)) throw std::invalid_argument("mpservice: the address is not inside any loaded module");
    CodeRef ref;
    ref.module = module_hash(module_name(mod));
    ref.offset = reinterpret_cast<std::uintptr_t>(address) - reinterpret_cast<std::uintptr_t>(mod);
    return ref;
}

const void* code_ref_resolve(const CodeRef& ref) noexcept {
    if (ref.empty()) return nullptr;
    try {
        HMODULE found = nullptr;
        if (ref.module == module_hash(std::string())) {
            found = GetModuleHandleW(nullptr);
        } else {
            HMODULE mods[1024];
            DWORD needed = 0;
            if (K32EnumProcessModules(GetCurrentProcess(), mods, sizeof mods, &needed))
                for (DWORD i = 0; i < needed / sizeof(HMODULE) && i < 1024 && !found; ++i)
                    if (mods[i] != GetModuleHandleW(nullptr) && module_hash(module_name(mods[i])) == ref.module)
                        found = mods[i];
        }
        if (!found || !in_code(found, static_cast<std::uintptr_t>(ref.offset))) return nullptr;
        return reinterpret_cast<const unsigned char*>(found) + ref.offset;
    } catch (...) {
        return nullptr;
    }
}

// ---------------------------------------------------------------- CPUs

int affinity_cpu_count() noexcept {
    DWORD_PTR process = 0, system = 0;
    if (GetProcessAffinityMask(GetCurrentProcess(), &process, &system) && process) {
        int n = 0;
        for (DWORD_PTR m = process; m; m &= m - 1) ++n;
        return n;
    }
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return static_cast<int>(si.dwNumberOfProcessors);
}

double cgroup_cpu_quota() noexcept {
    // The job-object counterpart: a hard CPU rate cap on a job holding us.
    JOBOBJECT_CPU_RATE_CONTROL_INFORMATION info{};
    DWORD len = 0;
    if (!QueryInformationJobObject(nullptr, JobObjectCpuRateControlInformation, &info, sizeof info, &len)) return 0;
    if (!(info.ControlFlags & JOB_OBJECT_CPU_RATE_CONTROL_ENABLE) || !(info.ControlFlags & JOB_OBJECT_CPU_RATE_CONTROL_HARD_CAP))
        return 0;
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return static_cast<double>(info.CpuRate) / 10000.0 * si.dwNumberOfProcessors;
}

// ---------------------------------------------------------------- fork protection: nothing forks here

void at_fork_child(void (*)()) {}

namespace {
/// A thread's at_thread_exit functions, in a fiber-local slot whose callback
/// runs them (newest first) when the thread ends.  Not a thread_local object:
/// with MinGW's emulated TLS, those are destroyed after winpthreads freed
/// their storage.  The FLS callback runs later still (at ExitThread, after
/// winpthreads' key destructors), on the list, which is not TLS storage.
struct ThreadExitList {
    std::vector<std::pair<void (*)(void*), void*>> fns;
};
VOID NTAPI run_thread_exit(PVOID p) {
    auto* list = static_cast<ThreadExitList*>(p);
    if (!list) return;
    while (!list->fns.empty()) {
        auto f = list->fns.back();
        list->fns.pop_back();
        f.first(f.second);
    }
    delete list;
}
DWORD thread_exit_slot() {
    static const DWORD slot = FlsAlloc(&run_thread_exit);
    return slot;
}
}  // namespace

void at_thread_exit(void (*fn)(void*), void* arg) {
    // The initial thread: nothing at exit (whether Windows runs FLS callbacks
    // at process exit, when other threads were ended holding locks, is not
    // something to rely on); the process's end frees what the objects hold.
    if (is_main_thread()) return;
    const DWORD slot = thread_exit_slot();
    if (slot == FLS_OUT_OF_INDEXES) throw std::system_error(static_cast<int>(GetLastError()), std::system_category(), "mpservice: FlsAlloc");
    auto* list = static_cast<ThreadExitList*>(FlsGetValue(slot));
    if (!list) {
        auto fresh = std::make_unique<ThreadExitList>();
        if (!FlsSetValue(slot, fresh.get()))
            throw std::system_error(static_cast<int>(GetLastError()), std::system_category(), "mpservice: FlsSetValue");
        list = fresh.release();
    }
    list->fns.emplace_back(fn, arg);
}
void at_fork_protect(const ForkLock&) noexcept {}

void sleep_until(Deadline deadline) noexcept {
    for (;;) {
        DWORD ms = wait_ms(deadline);
        if (ms == 0) return;
        Sleep(ms == INFINITE ? INFINITE - 1 : ms);
    }
}

// ---------------------------------------------------------------- output forwarding

void output_pipe(handle_t& read_end, handle_t& write_end) {
    // A socket pair, not a pipe: the reactor's poll can watch only sockets.
    tcp_pair(read_end, write_end);
    u_long off = 0;
    ioctlsocket(as_socket(write_end), FIONBIO, &off);  // writers block, as on a pipe
}

long pipe_read(handle_t h, void* buf, std::size_t cap) noexcept {
    int n = recv(as_socket(h), static_cast<char*>(buf), static_cast<int>(std::min<std::size_t>(cap, 1 << 30)), 0);
    if (n >= 0) return n;
    return WSAGetLastError() == WSAEWOULDBLOCK ? -1 : 0;
}

void redirect_standard_output(handle_t out, handle_t err) {
    std::fflush(stdout);
    std::fflush(stderr);
    HANDLE o = nullptr, e = nullptr;
    DuplicateHandle(GetCurrentProcess(), as_handle(out), GetCurrentProcess(), &o, 0, TRUE, DUPLICATE_SAME_ACCESS);
    DuplicateHandle(GetCurrentProcess(), as_handle(err), GetCurrentProcess(), &e, 0, TRUE, DUPLICATE_SAME_ACCESS);
    if (!o || !e) throw_win32("mpservice: DuplicateHandle for standard output");
    SetStdHandle(STD_OUTPUT_HANDLE, o);
    SetStdHandle(STD_ERROR_HANDLE, e);
    int fo = _open_osfhandle(reinterpret_cast<intptr_t>(o), _O_BINARY);
    int fe = _open_osfhandle(reinterpret_cast<intptr_t>(e), _O_BINARY);
    if (fo < 0 || fe < 0 || _dup2(fo, 1) != 0 || _dup2(fe, 2) != 0)
        throw std::system_error(errno, std::generic_category(), "mpservice: _dup2");
    static char line_buffer[BUFSIZ];
    std::setvbuf(stdout, line_buffer, _IOLBF, sizeof line_buffer);
}

// ---------------------------------------------------------------- server process: loopback TCP

handle_t listener_create(std::string& address) {
    SOCKET s = new_tcp_socket();
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int len = sizeof addr;
    if (bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        getsockname(s, reinterpret_cast<sockaddr*>(&addr), &len) != 0 || listen(s, SOMAXCONN) != 0) {
        int e = WSAGetLastError();
        closesocket(s);
        throw_win32("mpservice: listener", static_cast<DWORD>(e));
    }
    address = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
    handle_t wake = wake_event_create();
    std::lock_guard<std::mutex> g(reg().mu);
    reg().listener_wakes[static_cast<handle_t>(s)] = wake;
    return static_cast<handle_t>(s);
}

namespace {
/// The wake event that ends a listener_accept on `listener`, made on first use
/// for a listener this process did not create: one received from the parent
/// (the server process's) has none in this process's registry, so its
/// shutdown woke nobody and the server ran on until it was terminated.
handle_t listener_wake(handle_t listener) noexcept {
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto it = reg().listener_wakes.find(listener);
        if (it != reg().listener_wakes.end()) return it->second;
    }
    handle_t made = invalid_handle;
    try {
        made = wake_event_create();
    } catch (...) {
        return invalid_handle;
    }
    handle_t existing = invalid_handle;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto ins = reg().listener_wakes.emplace(listener, made);
        if (ins.second) return made;
        existing = ins.first->second;  // another thread made one meanwhile
    }
    close_handle(made);
    return existing;
}
}  // namespace

handle_t listener_accept(handle_t listener) {
    const handle_t wake = listener_wake(listener);
    for (;;) {
        WSAPOLLFD p[2] = {{as_socket(listener), POLLRDNORM, 0}, {as_socket(wake), POLLRDNORM, 0}};
        int rc = WSAPoll(p, wake >= 0 ? 2 : 1, -1);
        if (rc < 0) return invalid_handle;
        if (wake >= 0 && readable_revents(p[1].revents)) return invalid_handle;  // shut down
        if (!readable_revents(p[0].revents)) continue;
        SOCKET c = accept(as_socket(listener), nullptr, nullptr);
        if (c == INVALID_SOCKET) {
            if (WSAGetLastError() == WSAEWOULDBLOCK || WSAGetLastError() == WSAECONNRESET) continue;
            return invalid_handle;
        }
        SetHandleInformation(reinterpret_cast<HANDLE>(c), HANDLE_FLAG_INHERIT, 0);
        u_long off = 0;
        ioctlsocket(c, FIONBIO, &off);
        BOOL one = TRUE;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one), sizeof one);
        return static_cast<handle_t>(c);
    }
}

void listener_shutdown(handle_t listener) noexcept {
    const handle_t wake = listener_wake(listener);
    if (wake >= 0) wake_event_signal(wake);
}

handle_t unix_connect(const std::string& address) {
    auto colon = address.rfind(':');
    if (colon == std::string::npos) throw std::system_error(EINVAL, std::generic_category(), "mpservice: bad address");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<u_short>(std::atoi(address.c_str() + colon + 1)));
    SOCKET s = new_tcp_socket();
    if (connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        int e = WSAGetLastError();
        closesocket(s);
        throw_win32("mpservice: connect", static_cast<DWORD>(e));
    }
    BOOL one = TRUE;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one), sizeof one);
    return static_cast<handle_t>(s);
}

long peer_user(handle_t socket) noexcept {
    // Loopback TCP does not tell the peer's user (see README, platforms): any
    // local connection is taken as ours, and the server's own checks apply.
    return is_socket(socket) ? current_user() : -1;
}

long current_user() noexcept { return 0; }

void socket_shutdown(handle_t socket) noexcept {
    shutdown(as_socket(socket), SD_BOTH);
    // A thread of ours blocked in WSAPoll on it is not woken by that under
    // Wine (the server's connection threads stayed blocked, so it never
    // ended): its pending poll is cancelled, and its next recv sees the end.
    CancelIoEx(reinterpret_cast<HANDLE>(as_socket(socket)), nullptr);
}

void random_bytes(void* out, std::size_t n) {
    if (BCryptGenRandom(nullptr, static_cast<PUCHAR>(out), static_cast<ULONG>(n), BCRYPT_USE_SYSTEM_PREFERRED_RNG) != 0)
        throw std::system_error(EIO, std::generic_category(), "mpservice: BCryptGenRandom");
}

namespace {
/// This process's entries in the system's handle table (SystemHandleInformation):
/// what Wine gives where its GetProcessHandleCount answers 0 for every process.
long handle_table_count() noexcept {
    struct Entry {
        ULONG pid;
        UCHAR type, flags;
        USHORT value;
        void* object;
        ACCESS_MASK access;
    };
    struct Table {
        ULONG count;
        Entry entries[1];
    };
    constexpr auto system_handle_information = static_cast<SYSTEM_INFORMATION_CLASS>(16);
    constexpr NTSTATUS length_mismatch = static_cast<NTSTATUS>(0xC0000004L);
    try {
        std::vector<ULONG_PTR> buf(1 << 14);  // (pointer-aligned)
        for (int i = 0; i < 12; ++i) {
            ULONG got = 0;
            const auto bytes = static_cast<ULONG>(buf.size() * sizeof(ULONG_PTR));
            NTSTATUS st = NtQuerySystemInformation(system_handle_information, buf.data(), bytes, &got);
            if (st == length_mismatch) {
                buf.resize(buf.size() * 2);
                continue;
            }
            if (st != 0) return -1;
            const auto* table = reinterpret_cast<const Table*>(buf.data());
            const ULONG self = GetCurrentProcessId();
            long n = 0;
            for (ULONG k = 0; k < table->count; ++k)
                if (table->entries[k].pid == self) ++n;
            return n;
        }
    } catch (...) {
    }
    return -1;
}
}  // namespace

long open_handle_count() noexcept {
    DWORD n = 0;
    if (GetProcessHandleCount(GetCurrentProcess(), &n) && n > 0) return static_cast<long>(n);
    return handle_table_count();  // (a live process always has handles: 0 is no answer)
}

long mapping_count() noexcept {
    std::lock_guard<std::mutex> g(views().mu);
    return static_cast<long>(views().by_base.size());
}

std::string current_directory() {
    DWORD n = GetCurrentDirectoryW(0, nullptr);
    std::wstring w(n, L'\0');
    n = GetCurrentDirectoryW(n, &w[0]);
    return narrow(w.c_str(), static_cast<int>(n));
}

bool change_directory(const std::string& path) noexcept {
    return !path.empty() && SetCurrentDirectoryW(widen(path).c_str()) != 0;
}

std::vector<std::string> environment_entries() {
    std::vector<std::string> out;
    wchar_t* block = GetEnvironmentStringsW();
    if (!block) return out;
    for (const wchar_t* p = block; *p; p += wcslen(p) + 1)
        if (*p != L'=') out.push_back(narrow(p));  // "=C:=C:\..." entries are the shell's, not variables
    FreeEnvironmentStringsW(block);
    return out;
}

void replace_environment(const std::vector<std::string>& entries) {
    for (const std::string& e : environment_entries()) {
        auto eq = e.find('=');
        if (eq != std::string::npos) SetEnvironmentVariableW(widen(e.substr(0, eq)).c_str(), nullptr);
    }
    for (const std::string& e : entries) {
        auto eq = e.find('=');
        if (eq != std::string::npos && eq > 0)
            SetEnvironmentVariableW(widen(e.substr(0, eq)).c_str(), widen(e.substr(eq + 1)).c_str());
    }
}

// ---------------------------------------------------------------- remote exception / symbolization

namespace {
// Without a hook on the C++ runtime's throw (MinGW links it statically, so it
// cannot be interposed), the place a stack is recorded at is where the
// exception is sent or re-raised; these tables keep the re-raise sites.
constexpr int kSiteFrames = 48;
struct Site {
    const void* object = nullptr;
    int depth = 0;
    void* pcs[kSiteFrames];
};
thread_local Site t_raise_sites[4];
thread_local unsigned t_raise_next = 0;
std::atomic<bool> g_line_lookup{true};
}  // namespace

bool throw_hook_active() noexcept { return false; }
bool allocator_fork_safe() noexcept { return true; }  // no fork() here
void set_throw_site_capture(bool) noexcept {}
int throw_site_stack(const void*, const std::type_info*, void**, int) noexcept { return 0; }

int capture_stack(void** pcs, int max, int skip, const void* from) noexcept {
    void* buf[kSiteFrames + 16];
    int want = std::min(max + skip + 8, static_cast<int>(sizeof buf / sizeof buf[0]));
    int n = RtlCaptureStackBackTrace(0, static_cast<DWORD>(want), buf, nullptr);
    int first = std::min(n, skip + 1);  // +1: this function's own frame
    if (from)
        for (int i = 0; i < n; ++i)
            if (buf[i] == from) {
                first = i;
                break;
            }
    int count = std::max(0, std::min(n - first, max));
    // The walk runs past the thread's first frame into words that are no
    // return addresses: stop at the first one outside every module.
    HMODULE mod;
    for (int i = 0; i < count; ++i)
        if (!image_of(buf[first + i], mod)) count = i;
    std::copy(buf + first, buf + first + count, pcs);
    return count;
}

void note_raise_site(const void* object, const void* caller) noexcept {
    Site& s = t_raise_sites[t_raise_next++ % 4];
    s.object = object;
    s.depth = capture_stack(s.pcs, kSiteFrames, 1, caller);
}

int raise_site_stack(const void* object, void** pcs, int max) noexcept {
    for (const Site& s : t_raise_sites)
        if (object && s.object == object) {
            int n = std::min(s.depth, max);
            std::copy(s.pcs, s.pcs + n, pcs);
            return n;
        }
    return 0;
}

std::vector<StackFrame> symbolize(void* const* pcs, int n, bool (*)(const std::string&)) {
    // Module and offset for every frame.  MinGW writes DWARF, which the Win32
    // symbol engine (DbgHelp) does not read, and no PDB: function names and
    // lines are not shown here; addr2line on the offsets gives them offline.
    std::vector<StackFrame> out;
    for (int i = 0; i < n; ++i) {
        StackFrame f;
        f.pc = pcs[i];
        HMODULE mod;
        if (image_of(pcs[i], mod)) {
            wchar_t path[MAX_PATH * 2];
            DWORD len = GetModuleFileNameW(mod, path, static_cast<DWORD>(sizeof path / sizeof path[0]));
            f.module = narrow(path, static_cast<int>(len));
            f.offset = reinterpret_cast<std::uintptr_t>(pcs[i]) - reinterpret_cast<std::uintptr_t>(mod);
        }
        out.push_back(std::move(f));
    }
    return out;
}

void set_line_lookup(bool enabled) noexcept { g_line_lookup.store(enabled); }

std::string demangle(const char* mangled) {
    if (!mangled) return std::string();
#if defined(__GNUC__)
    int status = 0;
    char* out = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
    if (status != 0 || !out) return mangled;
    std::string s(out);
    std::free(out);
    return s;
#else
    return mangled;  // MSVC's type names are readable already
#endif
}

const std::type_info* current_exception_type() noexcept {
#if defined(__GNUC__)
    return abi::__cxa_current_exception_type();
#else
    return nullptr;
#endif
}

const void* exception_object(const std::exception_ptr& e) noexcept {
#if defined(__GNUC__)
    // libstdc++ fact (the Itanium C++ ABI, which MinGW's g++ follows): an
    // exception_ptr is one pointer, to the thrown object.
    static_assert(sizeof(std::exception_ptr) == sizeof(void*), "exception_ptr is not a single pointer here");
    const void* p = nullptr;
    std::memcpy(&p, static_cast<const void*>(&e), sizeof p);
    return p;
#else
    (void)e;
    return nullptr;
#endif
}

}  // namespace mpservice::detail::os

#endif  // _WIN32
