// process_core: ProcessCore (start, wait, signals) and the public process
// functions (init, contexts, cpu_count, current/parent/active processes).

#include <algorithm>
#include <cerrno>
#include <cstdint>
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

ProcessCore::ProcessCore(const Context& ctx) : method_(ctx.start_method()), io_(new Io()) {
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
        os::close_handle(io_->holder_pidfd);  // (not moved to the reactor's watch: it is gone already)
    }
}

void test_corrupt_next_fingerprint() noexcept { rt().corrupt_next_fingerprint = true; }
void test_set_initialized(bool initialized) noexcept { rt().initialized = initialized; }
long test_fork_server_pid() noexcept {
    std::lock_guard<std::mutex> lk(*rt().forkserver_mutex);
    return rt().forkserver.pid;
}
void test_set_fork_server_timeout(std::chrono::milliseconds timeout) noexcept {
    rt().forkserver_timeout_ms = timeout.count();
}

namespace {
using namespace wire;

/// Calls, once in the parent before its first fork, the std::string members a
/// forked child calls only there (adopting its name and identity, building
/// its outcome): the C++ library's functions are bound lazily, so each one
/// would otherwise be looked up anew in every child - a walk of the
/// libraries' symbol tables and a write to the child's copy of the GOT, page
/// faults costing ~3 us each (LD_DEBUG=bindings showed the move constructor,
/// _M_assign, append and _M_append resolved in every forked child).
void bind_forked_child_string_calls() {
    static volatile std::size_t sink = 0;
    std::string source(sink + 40, 'x');  // longer than the in-place buffer: the heap paths
    std::string copy;
    copy = source;
    copy.append(source.data(), 3);
    copy.append(source);
    std::string moved(std::move(copy));
    copy = moved;
    sink = moved.size() + copy.size();
}

std::string boot_payload(const ProcessCore& core, const ChildTask& task, const OutputCapture& output,
                         std::vector<os::handle_t>& handles) {
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
    output.encode(e);
    task.encode_args(e);
    handles = e.handles();
    return std::move(e.bytes());
}
/// Kills and reaps a fork server that is gone or does not answer, so that the
/// next fork-server start makes a new one.  Caller holds forkserver_mutex.
void drop_fork_server(Runtime& r, Reactor& reactor) noexcept {
    if (r.forkserver.pid > 0) {
        os::send_signal(r.forkserver.pid, os::invalid_handle, os::signal_kill());  // its workers die with it
        int code;
        try {
            os::reap_child(r.forkserver.pid, os::invalid_handle, true, &code);
        } catch (...) {
        }
    }
    if (r.forkserver.control != os::invalid_handle) {
        try {
            reactor.retire_fork_server(r.forkserver.control);  // closes it
        } catch (...) {
            // Out of memory for the task: keep the descriptor rather than race the reactor.
        }
    }
    r.forkserver = ForkServerLink{};
}

/// Reads the worker's HELLO, waiting at most the fork-server timeout.
bool read_hello(wire::FrameReader& reader, os::handle_t channel, Frame& hello, long long timeout_ms) {
    const auto until = os::Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!reader.next(hello)) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - os::Clock::now()).count();
        if (left <= 0 || !os::wait_readable(&channel, 1, static_cast<int>(std::min<long long>(left + 1, 1 << 30))))
            return false;
        if (reader.fill(channel, true) == 0) throw Error("mpservice: the fork server failed to start a worker");
    }
    return true;
}

/// Undoes a start that failed after the child was made: kills and reaps the
/// child (a fork-server worker is reaped by the server) and forgets it, so that
/// nothing is left behind and start() can be tried again.
void abandon_child(ProcessCore& core, Reactor& reactor) noexcept {
    auto& io = *core.io_;
    os::send_signal(core.pid_, io.pidfd, os::signal_kill());
    if (io.via_server) {
        reactor.discard_worker(io.serial);  // its status, when the server reports it, is not wanted
    } else {
        int code;
        try {
            os::reap_child(core.pid_, io.pidfd, true, &code);  // SIGKILLed: the wait is short
        } catch (...) {
        }
        if (io.warm) end_holder_named_on(io.channel);  // never registered: its HELLO is unread
    }
    os::close_handle(io.channel);
    os::close_handle(io.pidfd);
    io.channel = io.pidfd = os::invalid_handle;
    io.via_server = false;
    io.reader.reset();
    std::lock_guard<std::mutex> lk(core.io_mutex());
    core.pid_ = 0;
}
}  // namespace

void ProcessCore::start(Owned<ChildTask>& task) {
    if (started() || !task) throw InvalidStateError("mpservice: " + describe_process(name, pid_) + " was already started");
    trace_phase(StartPhase::start_entered);
    register_exit_announcement();  // inherited by forked children (see process_child)
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
    OutputCapture output(reactor.output(), *this, forward_output_);
    if (method_ != StartMethod::fork) boot = boot_payload(*this, *task, output, boot_handles);  // encode errors throw here

    // A warm child (process_warm.cpp) comes with its channel; any other start makes one.
    std::optional<WarmChild> warm;
    if (method_ == StartMethod::spawn && warm_start_) warm = take_warm_child();
    os::handle_t parent_end, child_end = os::invalid_handle;
    if (warm) parent_end = warm->channel;
    else os::channel_pair(parent_end, child_end);
    io.channel = parent_end;
    long pid = 0;
    bool boot_sent = false;
    try {
        switch (method_) {
            case StartMethod::spawn: {
                if (warm) {
                    pid = warm->pid;
                    io.pidfd = warm->pidfd;
                    io.warm = true;
                    break;
                }
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
                if (!os::channel_write(r.forkserver.control, &request, 1, nullptr, 0, &child_end, 1)) {
                    drop_fork_server(r, reactor);  // the next start makes a new one
                    throw Error("mpservice: the fork server is gone (it is replaced at the next start)");
                }
                os::close_handle(child_end);
                child_end = os::invalid_handle;
                Frame hello;
                if (!read_hello(io.reader, parent_end, hello, r.forkserver_timeout_ms.load())) {
                    long server = r.forkserver.pid;
                    drop_fork_server(r, reactor);
                    throw Error("mpservice: the fork server (pid " + std::to_string(server) +
                                ") did not start a worker in time (stopped?); it was killed and is replaced at "
                                "the next start");
                }
                if (hello.kind != frame_hello) throw Error("mpservice: the fork server failed to start a worker");
                Decoder d(hello.payload);
                std::int64_t worker_pid;
                d(worker_pid, io.serial);
                pid = static_cast<long>(worker_pid);
                io.pidfd = os::process_handle(pid);  // for signals; the exit status comes from the server
                io.via_server = true;
                break;
            }
            case StartMethod::fork: {
                static const bool bound = (bind_forked_child_string_calls(), true);
                (void)bound;
                // Built here, not in the child: a table another thread was
                // building at the fork would stay locked in the child.
                prepare_exception_types_for_fork();
                flush_stdio();  // or the child would write the parent's buffered output again
                prepare_child_link();  // made here, once: in the child its first use would allocate (page faults)
                long parent = os::current_pid();
                Level level = log_level();  // read here: the child must not take the logging lock
                std::string parent_name = process_name();  // read here: in the child its first use allocates
                ChildTask& t = *task;
                pid = reactor.on_long_lived_thread([&] {
                    long p = os::fork_process();
                    if (p == 0) {
                        trace_phase(StartPhase::child_running);
                        output.redirect_in_forked_child();
                        run_forked_child(child_end, parent_end, t, name, identity_, parent_name, parent, level);
                    }
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
    trace_phase(StartPhase::child_made);
    // A forked child runs on its copy of the arguments; ours stay until it
    // ends (the reactor drops them then), which covers the child taking its
    // own references to the proxies it inherited.
    if (method_ == StartMethod::fork) io.task = std::move(task);
    {
        std::lock_guard<std::mutex> lk(mutex_);
        pid_ = pid;
    }
    try {
        // A child that died before reading BOOT shows up as its exit status
        // (the write returns false); any other failure means the child cannot
        // run: it is killed and reaped here, so no child is left behind.
        if (method_ != StartMethod::fork && !boot_sent) write_frame(parent_end, frame_boot, boot, boot_handles);
        reactor.add(shared_from_this());
    } catch (const std::system_error& e) {
        abandon_child(*this, reactor);
        throw std::system_error(e.code(), "mpservice: could not start " + describe_process(name, pid) +
                                              " (sending its task failed; the child was killed): " + e.what());
    } catch (...) {
        abandon_child(*this, reactor);
        throw;
    }
    mark_started();
    output.commit(pid);  // the child has the pipes' write ends now (BOOT was sent)
    // Spawn and fork-server children got the arguments encoded: drop our copies
    // now (a proxy argument must not keep its object alive after the child took
    // it over).  (A forked child's task was kept above, until the child ends.)
    task.reset();
    trace_phase(StartPhase::start_returned);
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
            trace_phase(StartPhase::waiter_woke);
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
    if (!exited_) return std::nullopt;
    return exitcode_;
}

std::optional<int> ProcessBase::exitcode() const { return static_cast<const ProcessCore&>(core()).exitcode(); }

bool ProcessCore::is_alive() const { return started() && !exitcode().has_value(); }

bool ProcessCore::has_value() const { return has_value_; }

void ProcessCore::send_signal(int sig) {
    std::lock_guard<std::mutex> lk(mutex_);
    if (pid_ == 0 || exited_) return;
    // Remembered: if someone else collects the exit status, this is what is known of the end.
    if (os::send_signal(pid_, io_->pidfd, sig)) io_->signal_sent = sig;
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

os::handle_t exit_handle_of(const ProcessCore& p) {
    std::lock_guard<std::mutex> lk(p.io_mutex());
    return p.io_ ? p.io_->pidfd : os::invalid_handle;  // open until the core is destroyed
}

}  // namespace detail

// ---------------------------------------------------------------- public functions

namespace detail {
namespace {
/// The exit code of a program that refuses to act as a child (a forged or
/// misplaced marker): EX_NOPERM of <sysexits.h>.
constexpr int child_refused_exit_code = 77;

[[noreturn]] void refuse_child_mode(const std::string& why) {
    std::string text = "mpservice: refusing to run as a child process: " + why +
                       " (the child marker is meant only for processes started by mpservice)\n";
    os::write_stderr(text.data(), text.size());
    os::exit_now(child_refused_exit_code);
}

/// Parses "<digits>" into `out`; false on anything else.
bool parse_number(const char*& p, long& out) {
    if (*p < '0' || *p > '9') return false;
    char* end = nullptr;
    errno = 0;
    out = std::strtol(p, &end, 10);
    if (errno != 0 || end == p) return false;
    p = end;
    return true;
}

/// Child mode, if this process was started by mpservice as a spawn child:
/// the marker is argv[1], the process is not in secure-execution mode (a
/// caller of a set-user-ID program must not make it run code of its choice),
/// and the channel named by the marker was made by our parent, of our user.
/// Anything else carrying the marker is refused with a message and exit code
/// 77 - never a silent run of main() or of the frame.
void enter_child_mode_if_marked(int argc, char** argv) {
    if (argc <= 0 || !argv) return;
    const std::size_t marker_len = sizeof child_marker - 1;
    for (int i = 2; i < argc && argv[i]; ++i)
        if (std::strncmp(argv[i], child_marker, marker_len) == 0)
            refuse_child_mode("the marker argument is accepted only as the first argument (found at argv[" +
                              std::to_string(i) + "])");
    if (argc < 2 || !argv[1] || std::strncmp(argv[1], child_marker, marker_len) != 0) return;
    const char* p = argv[1] + marker_len;
    long fd = -1, parent = -1;
    bool warm = false;  // ":w": exec'd ahead of demand (a warm spawn child)
    if (!parse_number(p, fd) || *p++ != ':' || !parse_number(p, parent))
        refuse_child_mode("malformed marker '" + std::string(argv[1]) + "'");
    if (std::strcmp(p, warm_marker_suffix) == 0) {
        warm = true;
        p += sizeof warm_marker_suffix - 1;
    }
    if (*p != '\0') refuse_child_mode("malformed marker '" + std::string(argv[1]) + "'");
    if (os::secure_execution())
        refuse_child_mode("the program runs in secure-execution mode (set-user-ID, set-group-ID or capabilities)");
    // Our parent died before we got here (we were re-parented): nobody is left
    // to serve, and nothing runs; leave quietly, as a child whose parent dies.
    if (parent != os::parent_pid() && !os::pid_alive(parent)) os::exit_now(1);
    if (parent != os::parent_pid())
        refuse_child_mode("the marker names process " + std::to_string(parent) + " as the parent, but the parent is " +
                          std::to_string(os::parent_pid()));
    long peer_pid = 0, peer_uid = 0;
    if (fd <= INT32_MAX) fd = static_cast<long>(os::adopt_channel(static_cast<os::handle_t>(fd), parent));
    if (fd < 0 || fd > INT32_MAX || !os::channel_peer(static_cast<os::handle_t>(fd), &peer_pid, &peer_uid))
        refuse_child_mode("descriptor " + std::to_string(fd) + " is not a local stream channel");
    if (peer_pid != parent)
        refuse_child_mode("the channel was made by process " + std::to_string(peer_pid) + ", not by the parent (" +
                          std::to_string(parent) + ")");
    if (!os::is_own_user(peer_uid))
        refuse_child_mode("the channel was made by user " + std::to_string(peer_uid) + ", not by this process's user");
    run_bootstrapped_child(static_cast<os::handle_t>(fd), parent, warm ? ChildKind::warm_spawned : ChildKind::spawned);
}
}  // namespace
}  // namespace detail

void init(int argc, char** argv) {
    auto& r = detail::rt();
    detail::enter_child_mode_if_marked(argc, argv);  // a child never returns from here
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
