// process_core: ProcessCore (start, wait, signals) and the public process
// functions (init, contexts, cpu_count, current/parent/active processes).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <iostream>
#include <map>
#include <thread>
#include <unordered_map>
#include <unordered_set>

namespace mpservice {
namespace detail {

// ---------------------------------------------------------------- ProcessCore

ProcessCore::ProcessCore(const Context& ctx) : method_(ctx.start_method()), io_(std::make_unique<Io>()) {
    Runtime& r = rt();
    int n = r.next_child.fetch_add(1);
    identity_ = r.identity.empty() ? std::to_string(n) : r.identity + ":" + std::to_string(n);
    name = "Process-" + identity_;
}

ProcessCore::~ProcessCore() {
    for (auto h : value_handles_) os::close_handle(h);
    if (io_) {
        os::close_handle(io_->channel);
        os::close_handle(io_->pidfd);
    }
}

void test_corrupt_next_fingerprint() noexcept { rt().corrupt_next_fingerprint = true; }
void test_set_initialized(bool initialized) noexcept { rt().initialized = initialized; }

namespace {
std::string boot_payload(const ProcessCore& core, const ChildTask& task, std::vector<os::handle_t>& handles) {
    os::ModuleAddress target, tramp;
    if (!os::module_address(task.target, target) ||
        !os::module_address(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(task.trampoline)), tramp))
        throw std::invalid_argument("mpservice: the target is not in any loaded module");
    std::string target_fp = fingerprint_of(target.module), tramp_fp = fingerprint_of(tramp.module);
    if (rt().corrupt_next_fingerprint.exchange(false)) target_fp += "-corrupted";
    Encoder e;
    e(protocol_version, target.module, static_cast<std::uint64_t>(target.offset), target_fp, tramp.module,
      static_cast<std::uint64_t>(tramp.offset), tramp_fp, core.name, core.identity_, process_name(),
      static_cast<std::int64_t>(os::current_pid()), core.daemon(), static_cast<std::int32_t>(log_level()));
    encode_parent_present(e, core.method_);
    task.encode_args(e);
    handles = e.handles();
    return std::move(e.bytes());
}
}  // namespace

void ProcessCore::start(std::unique_ptr<ChildTask>& task) {
    if (started() || !task) throw InvalidStateError("mpservice: " + describe(name, pid_) + " was already started");
    Runtime& r = rt();
    if (method_ != StartMethod::fork) {
        if (!r.initialized)
            throw InvalidStateError(
                "mpservice: call mpservice::init(argc, argv) as the first line of main() before starting a "
                "process with the spawn or forkserver context (the child runs its task inside init)");
        if (!task->target)
            throw std::invalid_argument(
                "mpservice: this target has no plain-function form (a lambda with captures, a functor?); use "
                "a free function, a static member function or a capture-less lambda - or the fork context");
    }
    Reactor& reactor = Reactor::get();
    auto& io = *io_;

    std::vector<os::handle_t> boot_handles;
    std::string boot;
    if (method_ != StartMethod::fork) boot = boot_payload(*this, *task, boot_handles);  // encode errors throw here

    os::handle_t parent_end, child_end;
    os::channel_pair(parent_end, child_end);
    io.channel = parent_end;
    long pid = 0;
    bool boot_sent = false;
    try {
        switch (method_) {
            case StartMethod::spawn: {
                std::string marker = child_marker + std::to_string(child_end) + ":" + std::to_string(os::current_pid());
                pid = reactor.on_long_lived_thread([&] { return os::spawn_self(r.argv0, marker, child_end); });
                os::close_handle(child_end);
                child_end = os::invalid_handle;
                io.pidfd = os::process_handle(pid);
                break;
            }
            case StartMethod::forkserver: {
                std::lock_guard<std::mutex> lk(*r.forkserver_mutex);
                if (r.forkserver.control == os::invalid_handle)
                    reactor.on_long_lived_thread([] {
                        start_fork_server();  // not made at init (we are a child): make one now
                        return 0;
                    });
                reactor.watch_fork_server(r.forkserver.control);
                // A small BOOT waits in the socket, so the worker starts at once;
                // a big one would block us before the worker exists: it goes later.
                if (boot.size() <= boot_early_limit) {
                    write_frame(parent_end, frame_boot, boot, boot_handles);
                    boot_sent = true;
                }
                char request = 'S';
                if (!os::channel_write(r.forkserver.control, &request, 1, nullptr, 0, &child_end, 1))
                    throw Error("mpservice: the fork server is gone");
                os::close_handle(child_end);
                child_end = os::invalid_handle;
                Frame hello;
                if (!io.reader.read_blocking(parent_end, hello) || hello.kind != frame_hello)
                    throw Error("mpservice: the fork server failed to start a worker");
                Decoder d(hello.payload);
                std::int64_t worker_pid;
                d(worker_pid, io.serial);
                pid = static_cast<long>(worker_pid);
                io.pidfd = os::process_handle(pid);  // for signals; the exit status comes from the server
                io.via_server = true;
                break;
            }
            case StartMethod::fork: {
                flush_stdio();  // or the child would write the parent's buffered output again
                long parent = os::current_pid();
                Level level = log_level();  // read here: the child must not take the logging lock
                ChildTask& t = *task;
                pid = reactor.on_long_lived_thread([&] {
                    long p = os::fork_process();
                    if (p == 0) run_forked_child(child_end, parent_end, t, name, identity_, parent, level);
                    return p;
                });
                os::close_handle(child_end);
                child_end = os::invalid_handle;
                io.pidfd = os::process_handle(pid);
                break;
            }
        }
    } catch (...) {
        os::close_handle(child_end);
        os::close_handle(parent_end);
        io.channel = os::invalid_handle;
        throw;
    }
    {
        std::lock_guard<std::mutex> lk(mutex_);
        pid_ = pid;
    }
    mark_started();
    if (method_ == StartMethod::forkserver) reactor.add(shared_from_this());
    // A child that died before reading this shows up as its exit status.
    if (method_ != StartMethod::fork && !boot_sent) write_frame(parent_end, frame_boot, boot, boot_handles);
    if (method_ != StartMethod::forkserver) reactor.add(shared_from_this());
    io.task = std::move(task);  // the encoded arguments may still refer to it until here
}

bool ProcessCore::wait_until(os::Deadline deadline) const {
    if (done_relaxed()) return true;
    os::handle_t exit_handle;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        exit_handle = io_->pidfd;  // stays open until this core is destroyed
    }
    if (exit_handle != os::invalid_handle) {
        int timeout_ms = -1;
        if (deadline != os::no_deadline) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - os::Clock::now()).count();
            timeout_ms = left <= 0 ? 0 : static_cast<int>(std::min<long long>(left + 1, 1 << 30));
        }
        if (os::wait_readable(&exit_handle, 1, timeout_ms)) {
            // The child has ended; the reactor, woken by the same event, is
            // draining and resolving right now: wait for it briefly, awake.
            auto until = os::Clock::now() + std::chrono::microseconds(500);
            while (!done_relaxed() && os::Clock::now() < until) std::this_thread::yield();
        }
    }
    return FutureCore::wait_until(deadline);
}

long ProcessCore::pid() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return pid_;
}

std::optional<int> ProcessCore::exitcode() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return exitcode_;
}

bool ProcessCore::is_alive() const { return started() && !exitcode().has_value(); }

bool ProcessCore::has_value() const { return has_value_; }

void ProcessCore::send_signal(int sig) {
    std::lock_guard<std::mutex> lk(mutex_);
    if (pid_ == 0 || exitcode_) return;
    os::send_signal(pid_, io_->pidfd, sig);
}

void ProcessCore::set_daemon(bool daemon) {
    if (started()) throw InvalidStateError("mpservice: set_daemon() after start()");
    daemon_ = daemon;
}

void ProcessCore::release() noexcept {
    try {
        if (!started() || done()) return;
        if (daemon_) send_signal(os::signal_terminate());
        wait_until(os::no_deadline);
    } catch (...) {
    }
}

}  // namespace detail

// ---------------------------------------------------------------- public functions

void init(int argc, char** argv) {
    auto& r = detail::rt();
    for (int i = 1; i < argc && argv && argv[i]; ++i) {
        if (std::strncmp(argv[i], detail::child_marker, sizeof detail::child_marker - 1) != 0) continue;
        const char* spec = argv[i] + sizeof detail::child_marker - 1;
        char* end = nullptr;
        long fd = std::strtol(spec, &end, 10);
        long parent = end && *end == ':' ? std::strtol(end + 1, nullptr, 10) : 0;
        detail::run_bootstrapped_child(static_cast<detail::os::handle_t>(fd), parent,
                                       detail::ChildKind::spawned);
    }
    if (r.initialized) return;
    r.initialized = true;
    if (argc > 0 && argv && argv[0]) r.argv0 = argv[0];
    try {
        detail::start_fork_server();
    } catch (...) {
        // No fork server now; the fork-server context makes one at first use.
    }
}

const char* Context::name() const noexcept {
    switch (method_) {
        case StartMethod::spawn: return "spawn";
        case StartMethod::fork: return "fork";
        case StartMethod::forkserver: return "forkserver";
    }
    return "spawn";
}

const Context& get_context(const std::string& method) {
    static const SpawnContext spawn;
    static const ForkContext fork;
    static const ForkServerContext forkserver;
    if (method.empty()) return default_context();
    if (method == "spawn") return spawn;
    if (method == "fork") return fork;
    if (method == "forkserver") return forkserver;
    throw std::invalid_argument("mpservice: unknown start method '" + method +
                                "' (expected \"spawn\", \"fork\" or \"forkserver\")");
}

namespace {
/// The default start method: kUnset until set_start_method or its first use.
/// An atomic rather than a lock: a fork child may read it while another
/// thread of its parent was setting it at the moment of the fork.
constexpr int kUnset = -1;
std::atomic<int> g_start_method{kUnset};
}  // namespace

void set_start_method(const std::string& method, bool force) {
    if (method.empty() && force) {  // as Python's set_start_method(None, force=True): not chosen again
        g_start_method.store(kUnset);
        return;
    }
    int wanted = static_cast<int>(get_context(method).start_method());  // std::invalid_argument if unknown
    if (force) {
        g_start_method.store(wanted);
        return;
    }
    int expected = kUnset;
    if (!g_start_method.compare_exchange_strong(expected, wanted))
        throw InvalidStateError("mpservice: the start method was already set (to \"" +
                                std::string(Context(static_cast<StartMethod>(expected)).name()) +
                                "\"); pass force = true to replace it");
}

std::string get_start_method(bool allow_none) {
    int m = g_start_method.load();
    if (m == kUnset) {
        if (allow_none) return std::string();
        int expected = kUnset;
        m = g_start_method.compare_exchange_strong(expected, static_cast<int>(StartMethod::spawn))
                ? static_cast<int>(StartMethod::spawn)
                : expected;
    }
    return Context(static_cast<StartMethod>(m)).name();
}

std::vector<std::string> get_all_start_methods() { return {"spawn", "fork", "forkserver"}; }

const Context& default_context() { return get_context(get_start_method()); }

int cpu_count() {
    int n = detail::os::affinity_cpu_count();
    double quota = detail::os::cgroup_cpu_quota();
    if (quota > 0) n = std::min(n, static_cast<int>(std::ceil(quota)));
    return std::max(n, 1);
}

ProcessInfo current_process() { return ProcessInfo{detail::process_name(), detail::os::current_pid()}; }

std::optional<ProcessInfo> parent_process() { return detail::rt().parent; }

std::vector<ProcessInfo> active_children() {
    std::vector<ProcessInfo> out;
    if (!detail::g_reactor.load()) return out;
    for (auto& c : detail::Reactor::get().live()) out.push_back(ProcessInfo{c->name, c->pid()});
    return out;
}

}  // namespace mpservice
