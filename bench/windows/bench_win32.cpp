// bench/windows/bench_win32.cpp - the Windows figures of bench/run --windows:
// our spawn, lock and queue against what a Windows program would use instead,
// measured in the same run.  Built with MinGW-w64 and run under Wine on the
// Linux CI machines (bench/run --windows), so every figure is Wine's: its
// kernel objects (mutexes, events) are served by the wineserver process, which
// makes the Win32-object anchors far slower than on real Windows.  Quote them
// as "under Wine" only.
//
//   process: spawn start->result       mp::Process (spawn) vs CreateProcessW of this
//                                      executable returning at the top of main, + wait
//   process: warm spawn start->result  the same, taking a warm child (set_warm_start)
//   sync: Lock acquire+release, uncontended
//                                      mp::Lock vs a Win32 mutex object, an SRWLOCK
//                                      (process-local: the floor)
//   sync: 2 procs x 20k increments under the lock
//                                      two spawned children incrementing one counter,
//                                      mp::Value<long>::with_lock vs a named Win32 mutex
//                                      over a named file mapping; timed from the start
//                                      signal to the later child's last increment
//   queue 1P1C 8 B x 20k               a spawned child puts 8-byte items, the parent
//                                      gets them: mp::Queue vs a named pipe (WriteFile/
//                                      ReadFile of 8 bytes each)
#if !defined(_WIN32)
#error "bench_win32.cpp is the Windows benchmark: build it with MinGW-w64 (bench/run --windows)"
#endif
#define WIN32_LEAN_AND_MEAN
#define NOMINMAX
#include <windows.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../harness.hpp"
#include "mpservice.hpp"

namespace mp = mpservice;

namespace {

constexpr const char raw_child_flag[] = "--bench-raw-child";

std::wstring widen(const std::string& s) { return std::wstring(s.begin(), s.end()); }

/// A name no other run uses (kernel object names are machine-wide).
std::string unique_name(const char* what) {
    static int serial = 0;
    return std::string("mpservice-bench-") + what + "-" + std::to_string(GetCurrentProcessId()) + "-" +
           std::to_string(++serial);
}

[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "bench_win32: %s failed (error %lu)\n", what, GetLastError());
    std::exit(1);
}

// ---------------------------------------------------------------- process

int plus_one(int x) { return x + 1; }

void raw_reexec() {
    wchar_t exe[MAX_PATH];
    if (!GetModuleFileNameW(nullptr, exe, MAX_PATH)) fail("GetModuleFileNameW");
    std::wstring cmd = L"\"" + std::wstring(exe) + L"\" " + widen(raw_child_flag);
    STARTUPINFOW si{};
    si.cb = sizeof si;
    PROCESS_INFORMATION pi{};
    if (!CreateProcessW(exe, &cmd[0], nullptr, nullptr, FALSE, 0, nullptr, nullptr, &si, &pi)) fail("CreateProcessW");
    WaitForSingleObject(pi.hProcess, INFINITE);
    CloseHandle(pi.hThread);
    CloseHandle(pi.hProcess);
}

double spawn_once(bool warm) {
    const auto t0 = std::chrono::steady_clock::now();
    {
        mp::Process<int> p(mp::SpawnContext{}, plus_one, 41);
        if (warm) p.set_warm_start(true);
        p.start();
        if (p.result() != 42) fail("the child's result");
    }
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

void process_cases(int n) {
    const std::string cold = "process: spawn start->result", warm = "process: warm spawn start->result";
    if (!bench::wanted(cold) && !bench::wanted(warm)) return;
    std::vector<double> ours, ours_warm, raw;
    for (int i = 0; i < n + 2; ++i) {  // interleaved, so that a change in load hits all alike
        double a = spawn_once(false);
        if (i > 0 && !mp::detail::test_warm_child(std::chrono::seconds(30))) fail("waiting for a warm child");
        double b = spawn_once(true);
        const auto t0 = std::chrono::steady_clock::now();
        raw_reexec();
        double c = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        if (i < 2) continue;  // warm-up (the first warm start is cold: no warm child yet)
        ours.push_back(a);
        ours_warm.push_back(b);
        raw.push_back(c);
    }
    mp::set_warm_spawn(false);
    bench::report(cold, "ours", "mp::Process spawn", "us", ours);
    bench::report(cold, "anchor", "raw CreateProcessW self + wait", "us", raw);
    bench::report(warm, "ours", "mp::Process spawn, warm child", "us", ours_warm);
    bench::report(warm, "anchor", "raw CreateProcessW self + wait", "us", raw);
    bench::report(warm, "anchor", "mp::Process spawn, cold", "us", ours);
}

// ---------------------------------------------------------------- locks

void uncontended_lock(int reps) {
    const std::string name = "sync: Lock acquire+release, uncontended";
    if (!bench::wanted(name)) return;
    // Our Lock is a Win32 mutex object on Windows (its owner's death is seen as WAIT_ABANDONED): under
    // Wine each acquire and release is a call to the wineserver, as for the anchor's mutex.
    constexpr int pairs = 20'000, object_pairs = 20'000, slim_pairs = 1'000'000;
    mp::Lock lock;
    HANDLE mutex = CreateMutexW(nullptr, FALSE, nullptr);
    if (!mutex) fail("CreateMutexW");
    SRWLOCK srw = SRWLOCK_INIT;
    std::vector<double> ours, object, slim;
    for (int r = 0; r < reps; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < pairs; ++i) {
            lock.acquire();
            lock.release();
        }
        auto t1 = std::chrono::steady_clock::now();
        for (int i = 0; i < object_pairs; ++i) {
            WaitForSingleObject(mutex, INFINITE);
            ReleaseMutex(mutex);
        }
        auto t2 = std::chrono::steady_clock::now();
        for (int i = 0; i < slim_pairs; ++i) {
            AcquireSRWLockExclusive(&srw);
            ReleaseSRWLockExclusive(&srw);
        }
        auto t3 = std::chrono::steady_clock::now();
        ours.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / pairs);
        object.push_back(std::chrono::duration<double, std::nano>(t2 - t1).count() / object_pairs);
        slim.push_back(std::chrono::duration<double, std::nano>(t3 - t2).count() / slim_pairs);
    }
    CloseHandle(mutex);
    bench::report(name, "ours", "mp::Lock acquire()+release()", "ns", ours);
    bench::report(name, "anchor", "Win32 mutex object (Wine: wineserver)", "ns", object);
    bench::report(name, "anchor", "SRWLOCK, process-local", "ns", slim);
}

constexpr int per_child = 20'000;

/// Both children say they are ready, then wait for `go`; each returns the
/// time of its last increment.
std::int64_t increment_ours(mp::Value<long> value, mp::Value<int> ready, mp::Event go) {
    ready.with_lock([](int& r) { ++r; });
    go.wait();
    for (int i = 0; i < per_child; ++i) value.with_lock([](long& x) { ++x; });
    return bench::now_ns();
}

std::int64_t increment_win32(std::string mutex_name, std::string mapping_name, mp::Value<int> ready, mp::Event go) {
    HANDLE mutex = OpenMutexW(SYNCHRONIZE | MUTEX_MODIFY_STATE, FALSE, widen(mutex_name).c_str());
    HANDLE mapping = OpenFileMappingW(FILE_MAP_ALL_ACCESS, FALSE, widen(mapping_name).c_str());
    if (!mutex || !mapping) fail("opening the anchor's objects");
    auto* counter = static_cast<volatile long*>(MapViewOfFile(mapping, FILE_MAP_ALL_ACCESS, 0, 0, sizeof(long)));
    if (!counter) fail("MapViewOfFile");
    ready.with_lock([](int& r) { ++r; });
    go.wait();
    for (int i = 0; i < per_child; ++i) {
        WaitForSingleObject(mutex, INFINITE);
        *counter = *counter + 1;
        ReleaseMutex(mutex);
    }
    std::int64_t end = bench::now_ns();
    UnmapViewOfFile(const_cast<long*>(counter));
    CloseHandle(mapping);
    CloseHandle(mutex);
    return end;
}

/// Starts two children with `make`, waits until both are ready, signals go;
/// returns ns per increment (start signal -> the later child's end).
template <class Make>
double contended_run(Make make) {
    mp::Value<int> ready(0);
    mp::Event go;
    auto a = make(ready, go);
    auto b = make(ready, go);
    a.start();
    b.start();
    while (ready.get() < 2) std::this_thread::yield();  // a bench, not a test: bounded by the children
    const std::int64_t t0 = bench::now_ns();
    go.set();
    const std::int64_t end = std::max(a.result(), b.result());
    return double(end - t0) / (2.0 * per_child);
}

void contended_increments(int reps) {
    const std::string name = "sync: 2 procs x 20k increments under the lock";
    if (!bench::wanted(name)) return;
    mp::Value<long> value(0);
    const std::string mutex_name = unique_name("mutex"), mapping_name = unique_name("counter");
    HANDLE mutex = CreateMutexW(nullptr, FALSE, widen(mutex_name).c_str());
    HANDLE mapping =
        CreateFileMappingW(INVALID_HANDLE_VALUE, nullptr, PAGE_READWRITE, 0, sizeof(long), widen(mapping_name).c_str());
    if (!mutex || !mapping) fail("creating the anchor's objects");
    auto* counter = static_cast<volatile long*>(MapViewOfFile(mapping, FILE_MAP_ALL_ACCESS, 0, 0, sizeof(long)));
    std::vector<double> ours, anchor;
    for (int r = 0; r < reps; ++r) {
        value.set(0);
        ours.push_back(contended_run([&](mp::Value<int>& ready, mp::Event& go) {
            return mp::Process<std::int64_t>(mp::SpawnContext{}, increment_ours, value, ready, go);
        }));
        if (value.get() != 2L * per_child) std::fprintf(stderr, "bench_win32: ours lost increments\n");
        *counter = 0;
        anchor.push_back(contended_run([&](mp::Value<int>& ready, mp::Event& go) {
            return mp::Process<std::int64_t>(mp::SpawnContext{}, increment_win32, mutex_name, mapping_name, ready, go);
        }));
        if (*counter != 2L * per_child) std::fprintf(stderr, "bench_win32: the anchor lost increments\n");
    }
    UnmapViewOfFile(const_cast<long*>(counter));
    CloseHandle(mapping);
    CloseHandle(mutex);
    bench::report(name, "ours", "mp::Value<long>::with_lock", "ns", ours);
    bench::report(name, "anchor", "named Win32 mutex + file mapping (Wine: wineserver)", "ns", anchor);
}

// ---------------------------------------------------------------- queue

constexpr long queue_items = 20'000;

int produce_ours(mp::Queue<std::uint64_t> q, mp::Event go) {
    go.wait();
    for (long i = 0; i < queue_items; ++i) q.put(static_cast<std::uint64_t>(i));
    return 0;
}

int produce_pipe(std::string pipe_name) {
    HANDLE h = CreateFileW(widen(pipe_name).c_str(), GENERIC_WRITE, 0, nullptr, OPEN_EXISTING, 0, nullptr);
    if (h == INVALID_HANDLE_VALUE) fail("opening the pipe");
    for (long i = 0; i < queue_items; ++i) {
        std::uint64_t v = static_cast<std::uint64_t>(i);
        DWORD wrote = 0;
        if (!WriteFile(h, &v, sizeof v, &wrote, nullptr) || wrote != sizeof v) fail("WriteFile");
    }
    CloseHandle(h);
    return 0;
}

double queue_ours() {
    mp::Queue<std::uint64_t> q;
    mp::Event go;
    mp::Process<int> p(mp::SpawnContext{}, produce_ours, q, go);
    p.start();
    const auto t0 = std::chrono::steady_clock::now();
    go.set();
    std::uint64_t sum = 0;
    for (long i = 0; i < queue_items; ++i) sum += q.get();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    p.join();
    if (sum != std::uint64_t(queue_items) * (queue_items - 1) / 2) std::fprintf(stderr, "bench_win32: ours: bad sum\n");
    return s;
}

double queue_pipe() {
    const std::string name = "\\\\.\\pipe\\" + unique_name("pipe");
    HANDLE h = CreateNamedPipeW(widen(name).c_str(), PIPE_ACCESS_INBOUND, PIPE_TYPE_BYTE | PIPE_WAIT, 1, 1 << 16,
                                1 << 16, 0, nullptr);
    if (h == INVALID_HANDLE_VALUE) fail("CreateNamedPipeW");
    mp::Process<int> p(mp::SpawnContext{}, produce_pipe, name);
    p.start();
    if (!ConnectNamedPipe(h, nullptr) && GetLastError() != ERROR_PIPE_CONNECTED) fail("ConnectNamedPipe");
    const auto t0 = std::chrono::steady_clock::now();  // the child writes as soon as it is connected
    std::uint64_t sum = 0, v = 0;
    for (long i = 0; i < queue_items; ++i) {
        DWORD got = 0, have = 0;
        while (have < sizeof v) {  // a byte pipe may return part of an item
            if (!ReadFile(h, reinterpret_cast<char*>(&v) + have, sizeof v - have, &got, nullptr)) fail("ReadFile");
            have += got;
        }
        sum += v;
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    p.join();
    CloseHandle(h);
    if (sum != std::uint64_t(queue_items) * (queue_items - 1) / 2) std::fprintf(stderr, "bench_win32: pipe: bad sum\n");
    return s;
}

void queue_case(int reps) {
    const std::string name = "queue 1P1C 8 B x 20k";
    if (!bench::wanted(name)) return;
    std::vector<double> ours, pipe;
    for (int r = 0; r < reps; ++r) {
        ours.push_back(queue_items / queue_ours());
        pipe.push_back(queue_items / queue_pipe());
    }
    bench::report(name, "ours", "mp::Queue 1 producer proc -> 1 consumer", "msg/s", ours);
    bench::report(name, "anchor", "named pipe, 8 B WriteFile/ReadFile", "msg/s", pipe);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 1 && std::strcmp(argv[1], raw_child_flag) == 0) return 0;  // the raw re-exec: return at once
    mp::init(argc, argv);
    process_cases(bench::reps(20));
    uncontended_lock(bench::reps(5));
    contended_increments(bench::reps(5));
    queue_case(bench::reps(5));
    return 0;
}
