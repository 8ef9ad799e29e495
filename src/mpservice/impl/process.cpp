// process: implementation - start-up, the child side, the fork server, the
// parent's reactor thread and ProcessCore.
//
// Wire format of a channel (a Unix stream socket per child): frames of
//     u32 kind | u32 handle count | u64 payload size | payload
// with the frame's OS handles attached to its first byte.  The parent sends
// one BOOT frame; the child sends HELLO (fork-server workers only), any number
// of LOG frames, then VALUE or EXCEPTION, then END.  The parent resolves a
// Process when the child has exited, after reading everything it sent: a dead
// child's writes are all queued in the socket already, so a non-blocking
// drain at exit sees every record (join() therefore returns only after all of
// the child's log records were handled, in order).
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
// Named (not anonymous) because ProcessCore::Io holds a FrameReader.
namespace wire {

// ---------------------------------------------------------------- frames

enum FrameKind : std::uint32_t { frame_boot = 1, frame_hello, frame_log, frame_value, frame_exception, frame_end };
constexpr std::uint32_t protocol_version = 1;
constexpr const char child_marker[] = "--mpservice-child=";
constexpr std::size_t boot_early_limit = 32 * 1024;

struct FrameHeader {
    std::uint32_t kind;
    std::uint32_t handles;
    std::uint64_t size;
};

/// What the fork server tells its parent when a worker has ended.
struct ServerStatus {
    std::uint64_t serial;  // the worker's number (pids may be reused; serials are not)
    std::int32_t code;     // Python-style exit code
    std::int32_t pad;
};

struct Frame {
    std::uint32_t kind = 0;
    std::string payload;
    std::vector<os::handle_t> handles;
};

void close_all(std::vector<os::handle_t>& hs) noexcept {
    for (auto h : hs) os::close_handle(h);
    hs.clear();
}

bool write_frame(os::handle_t ch, std::uint32_t kind, const std::string& payload,
                 const std::vector<os::handle_t>& handles = {}) {
    FrameHeader h{kind, static_cast<std::uint32_t>(handles.size()), payload.size()};
    return os::channel_write(ch, &h, sizeof h, payload.data(), payload.size(), handles.data(), handles.size());
}

/// Splits the byte stream of a channel into frames.  The buffer starts small
/// and grows while reads fill it (a chatty child): every page written costs a
/// copy-on-write fault in a process that forks, so no page is touched in vain.
class FrameReader {
public:
    /// Reads once from `ch`: >0 bytes, 0 at end, -1 if nothing is ready (nonblocking).
    long fill(os::handle_t ch, bool nonblocking) {
        if (pos_ == len_) {
            pos_ = len_ = 0;
        } else if (pos_ > 0 && cap_ - len_ < want_) {
            std::memmove(buf_.get(), buf_.get() + pos_, len_ - pos_);
            len_ -= pos_;
            pos_ = 0;
        }
        if (cap_ - len_ < want_) {
            std::size_t cap = std::max(len_ + want_, 2 * cap_);
            std::unique_ptr<char[]> bigger(new char[cap]);  // uninitialized: untouched pages stay free
            if (len_) std::memcpy(bigger.get(), buf_.get(), len_);
            buf_ = std::move(bigger);
            cap_ = cap;
        }
        std::vector<os::handle_t> fds;
        std::size_t room = cap_ - len_;
        long n = os::channel_read(ch, buf_.get() + len_, room, &fds, nonblocking);
        if (n > 0) len_ += static_cast<std::size_t>(n);
        if (n > 0 && static_cast<std::size_t>(n) == room && want_ < max_read) want_ *= 2;
        for (auto fd : fds) fds_.push_back(fd);
        return n;
    }
    /// The next complete frame, if there is one.
    bool next(Frame& out) {
        if (len_ - pos_ < sizeof(FrameHeader)) return false;
        FrameHeader h;
        std::memcpy(&h, buf_.get() + pos_, sizeof h);
        if (len_ - pos_ - sizeof h < h.size) {
            // Make room for the whole frame at once rather than doubling step by step.
            if (sizeof h + h.size > want_) want_ = std::min<std::size_t>(sizeof h + h.size, std::size_t(1) << 30);
            return false;
        }
        out.kind = h.kind;
        out.payload.assign(buf_.get() + pos_ + sizeof h, h.size);
        pos_ += sizeof h + h.size;
        out.handles.clear();
        for (std::uint32_t i = 0; i < h.handles && !fds_.empty(); ++i) {
            out.handles.push_back(fds_.front());
            fds_.pop_front();
        }
        return true;
    }
    /// Reads (blocking) until a whole frame is there; false at end of stream.
    bool read_blocking(os::handle_t ch, Frame& out) {
        while (!next(out))
            if (fill(ch, false) <= 0) return false;
        return true;
    }
    FrameReader() = default;
    FrameReader(const FrameReader&) = delete;
    FrameReader& operator=(const FrameReader&) = delete;
    ~FrameReader() {
        for (auto fd : fds_) os::close_handle(fd);
    }

private:
    static constexpr std::size_t max_read = 1 << 18;
    std::unique_ptr<char[]> buf_;
    std::size_t cap_ = 0, pos_ = 0, len_ = 0;
    std::size_t want_ = 2048;  // room wanted for the next read
    std::deque<os::handle_t> fds_;
};

}  // namespace wire
namespace {
using namespace wire;

// ---------------------------------------------------------------- process-wide state

/// The fork server as seen from its parent.
struct ForkServerLink {
    os::handle_t control = os::invalid_handle;
    long pid = 0;
};

struct Runtime {
    bool initialized = false;
    bool is_child = false;
    std::string argv0 = "/proc/self/exe";
    std::string identity;  // "" in the main process, "2" or "2:1" in children
    std::atomic<int> next_child{1};
    std::optional<ProcessInfo> parent;
    // Heap-allocated so a forked child can replace them (they may have been
    // held by another thread at the moment of the fork).
    std::mutex* forkserver_mutex = new std::mutex;
    ForkServerLink forkserver;
    std::mutex* fingerprint_mutex = new std::mutex;
    std::map<std::string, std::string> fingerprints;
    std::atomic<bool> corrupt_next_fingerprint{false};
};

Runtime& rt() {
    static Runtime* r = new Runtime;  // never destroyed: the reactor thread outlives static destruction
    return *r;
}

std::string fingerprint_of(const std::string& module) {
    Runtime& r = rt();
    std::lock_guard<std::mutex> lk(*r.fingerprint_mutex);
    auto it = r.fingerprints.find(module);
    if (it != r.fingerprints.end()) return it->second;
    return r.fingerprints[module] = os::module_fingerprint(module);
}

void flush_stdio() noexcept {
    try {
        std::cout.flush();
        std::cerr.flush();
        std::clog.flush();
    } catch (...) {
    }
    std::fflush(nullptr);
}

std::string describe(const std::string& name, long pid) {
    return "process '" + name + "' (pid " + std::to_string(pid) + ")";
}

// ---------------------------------------------------------------- the child side

/// The child's end of its channel; frames from several threads are serialized.
struct ChildLink {
    os::handle_t channel = os::invalid_handle;
    std::mutex mutex;
    bool send(std::uint32_t kind, const std::string& payload, const std::vector<os::handle_t>& handles = {}) {
        std::lock_guard<std::mutex> lk(mutex);
        try {
            return write_frame(channel, kind, payload, handles);
        } catch (...) {
            return false;
        }
    }
};

ChildLink& child_link() {
    static ChildLink* l = new ChildLink;
    return *l;
}

void install_log_forwarding() {
    set_log_forwarder([](const LogRecord& record) {
        Encoder e;
        e.write(record);
        child_link().send(frame_log, e.bytes());
    });
}

/// Sends the outcome of `run` (VALUE or EXCEPTION), then END; returns the exit code.
template <class Run>
int run_and_report(Run&& run) {
    int code = 0;
    Encoder out;
    std::uint32_t kind = frame_value;
    try {
        run(out);
    } catch (...) {
        out = Encoder();
        kind = frame_exception;
        code = 1;
        try {
            encode_exception(out, std::current_exception());
        } catch (...) {
            out = Encoder();
            encode_exception(out, std::make_exception_ptr(Error("mpservice: the child's exception could not be encoded")));
        }
    }
    set_log_forwarder({});  // later records stay here: END is the last frame
    // The outcome and END (which carries the exit code we are about to exit
    // with) leave in one write: one system call, one wake-up of the parent.
    std::string frames;
    auto append = [&](std::uint32_t k, const std::string& payload, std::size_t nhandles) {
        FrameHeader h{k, static_cast<std::uint32_t>(nhandles), payload.size()};
        frames.append(reinterpret_cast<const char*>(&h), sizeof h);
        frames.append(payload);
    };
    append(kind, out.bytes(), kind == frame_value ? out.handles().size() : 0);
    Encoder end;
    end.write(static_cast<std::int32_t>(code));
    append(frame_end, end.bytes(), 0);
    ChildLink& link = child_link();
    std::lock_guard<std::mutex> lk(link.mutex);
    try {
        const auto& hs = out.handles();
        os::channel_write(link.channel, frames.data(), frames.size(), nullptr, 0, kind == frame_value ? hs.data() : nullptr,
                          kind == frame_value ? hs.size() : 0);
    } catch (...) {
        // The parent is gone; nobody is left to tell.
    }
    return code;
}

void adopt_child_identity(const std::string& name, const std::string& identity, const std::string& parent_name,
                          long parent_pid) {
    Runtime& r = rt();
    r.is_child = true;
    r.initialized = true;
    r.identity = identity;
    r.next_child = 1;
    r.parent = ProcessInfo{parent_name, parent_pid};
    set_process_name(name);
}

enum class ChildKind { spawned, forkserver_worker };

/// A spawned child or a fork-server worker: reads BOOT, runs the target, reports, exits.
[[noreturn]] void run_bootstrapped_child(os::handle_t channel, long expected_parent, ChildKind kind,
                                         std::uint64_t serial = 0) {
    if (!os::die_with_parent(expected_parent)) os::exit_now(1);
    if (kind == ChildKind::spawned) os::close_handles_except(channel);
    child_link().channel = channel;
    if (kind == ChildKind::forkserver_worker) {
        Encoder hello;
        hello(static_cast<std::int64_t>(os::current_pid()), serial);
        if (!write_frame(channel, frame_hello, hello.bytes())) os::exit_now(1);
    }
    Frame boot;
    FrameReader reader;
    bool got = false;
    try {
        got = reader.read_blocking(channel, boot) && boot.kind == frame_boot;
    } catch (...) {
    }
    if (!got) os::exit_now(1);  // the parent went away before telling us what to run

    int code = run_and_report([&](Encoder& out) {
        Decoder d(boot.payload.data(), boot.payload.size(), &boot.handles);
        auto version = d.read<std::uint32_t>();
        if (version != protocol_version)
            throw Error("mpservice: the parent speaks protocol " + std::to_string(version) + ", this child " +
                        std::to_string(protocol_version) + ": it is a different build of the program");
        os::ModuleAddress target, tramp;
        std::string target_fp, tramp_fp, name, identity, parent_name;
        std::uint64_t target_off, tramp_off;
        std::int64_t parent_pid;
        bool daemon;
        std::int32_t log_level;
        d(target.module, target_off, target_fp, tramp.module, tramp_off, tramp_fp, name, identity, parent_name,
          parent_pid, daemon, log_level);
        (void)daemon;
        set_log_level_from_parent(static_cast<Level>(log_level));
        target.offset = static_cast<std::uintptr_t>(target_off);
        tramp.offset = static_cast<std::uintptr_t>(tramp_off);
        adopt_child_identity(name, identity, parent_name, static_cast<long>(parent_pid));
        install_log_forwarding();
        for (auto* m : {&target, &tramp}) {
            const std::string& want = m == &target ? target_fp : tramp_fp;
            std::string have = fingerprint_of(m->module);
            if (have != want)
                throw Error("mpservice: refusing to run the task: this child runs a different build of " +
                            (m->module.empty() ? std::string("the program") : m->module) +
                            " than its parent (build fingerprints differ); rebuild and restart the parent");
        }
        const void* fn = os::module_resolve(target);
        const void* tr = os::module_resolve(tramp);
        if (!fn || !tr)
            throw Error("mpservice: the child cannot find the target's module '" + target.module + "'");
        auto trampoline = reinterpret_cast<Trampoline>(reinterpret_cast<std::uintptr_t>(tr));
        trampoline(fn, d, out);
    });
    close_all(boot.handles);
    if (kind == ChildKind::spawned) {
        // A fresh program: end it the normal way (static destructors, stream flushing).
        std::exit(code);
    }
    flush_stdio();
    os::exit_now(code);  // a copy of another process: run none of its exit handlers
}

}  // namespace

// ---------------------------------------------------------------- the reactor

struct ProcessCore::Io {
    os::handle_t channel = os::invalid_handle;
    os::handle_t pidfd = os::invalid_handle;  // guarded by the core's mutex once registered
    wire::FrameReader reader;
    std::uint64_t id = 0;
    bool via_server = false;
    std::uint64_t serial = 0;            // fork-server workers: the server's number for it
    std::optional<int> end_code;         // the exit code the child announced in END
    bool eof = false;
    bool finished = false;
    std::exception_ptr exception;
    std::unique_ptr<ChildTask> task;  // kept until start() returns
};

namespace {

class Reactor {
public:
    /// The reactor of this process (started on first use).
    static Reactor& get();
    /// Called in a forked child: the parent's reactor thread does not exist here.
    static void forget_after_fork() noexcept;

    void add(const std::shared_ptr<ProcessCore>& core);
    void watch_fork_server(os::handle_t control);
    /// Runs `fn` on a thread that lives as long as the process: the initial
    /// thread, or else the reactor's.  A child's parent-death signal fires when
    /// the *thread* that made it ends, so children are never made on a
    /// short-lived thread.
    template <class Fn>
    auto on_long_lived_thread(Fn&& fn) -> decltype(fn());
    std::vector<std::shared_ptr<ProcessCore>> live();
    bool on_reactor_thread() const { return std::this_thread::get_id() == thread_id_; }
    bool owned_by_this_process() const { return owner_pid_ == os::current_pid(); }

private:
    Reactor();
    void loop();
    void on_channel(const std::shared_ptr<ProcessCore>& core);
    void on_pidfd(const std::shared_ptr<ProcessCore>& core);
    void drain(ProcessCore& core);
    void on_frame(ProcessCore& core, Frame& f);
    void on_exit(const std::shared_ptr<ProcessCore>& core, int code);
    void on_fork_server();
    void finish(const std::shared_ptr<ProcessCore>& core, int code);
    std::shared_ptr<ProcessCore> find(std::uint64_t id);

    static constexpr std::uint64_t tag_channel = 0, tag_pidfd = 1, tag_wake = 2, tag_server = 3;

    os::handle_t poller_ = os::invalid_handle;
    os::handle_t wake_ = os::invalid_handle;
    os::handle_t server_ = os::invalid_handle;
    bool server_gone_ = false;
    std::mutex mutex_;
    std::uint64_t next_id_ = 1;
    std::unordered_map<std::uint64_t, std::shared_ptr<ProcessCore>> children_;
    std::unordered_map<std::uint64_t, std::uint64_t> server_serials_;  // fork-server serial -> id
    std::unordered_map<std::uint64_t, int> early_exits_;               // statuses before registration
    std::unordered_set<std::uint64_t> finished_serials_;               // ended before their status came
    std::deque<std::function<void()>> tasks_;
    // What the reactor works on lives here rather than on its stack: a child
    // forked meanwhile has no reactor thread, and its leak checker scans
    // reachable memory only (this object stays reachable there).
    std::deque<std::function<void()>> running_tasks_;
    std::shared_ptr<ProcessCore> current_;
    void* stack_low_ = nullptr;  // the reactor thread's stack: a forked child's leak checker must scan it
    std::size_t stack_size_ = 0;
    std::thread::id thread_id_;
    long owner_pid_ = 0;
};

std::atomic<Reactor*> g_reactor{nullptr};
std::mutex* g_reactor_mutex = new std::mutex;

void at_exit_handler();

Reactor& Reactor::get() {
    Reactor* r = g_reactor.load(std::memory_order_acquire);
    if (r) return *r;
    std::lock_guard<std::mutex> lk(*g_reactor_mutex);
    r = g_reactor.load(std::memory_order_relaxed);
    if (!r) {
        r = new Reactor;  // never deleted: its thread runs until the process ends
        g_reactor.store(r, std::memory_order_release);
        std::atexit(at_exit_handler);
    }
    return *r;
}

// The parent's objects a forked child stops using; kept reachable so that a
// leak checker in a child that calls exit() does not report them.
void* volatile g_abandoned_after_fork[8];

void Reactor::forget_after_fork() noexcept {
    if (Reactor* r = g_reactor.load()) os::leak_checker_root(r->stack_low_, r->stack_size_);
    g_abandoned_after_fork[0] = g_reactor.exchange(nullptr);
    g_abandoned_after_fork[1] = g_reactor_mutex;
    g_reactor_mutex = new std::mutex;
}

Reactor::Reactor() : owner_pid_(os::current_pid()) {
    poller_ = os::poller_create();
    wake_ = os::wake_event_create();
    os::poller_add(poller_, wake_, tag_wake);
    std::thread t([this] {
        os::current_thread_stack(&stack_low_, &stack_size_);
        loop();
    });
    thread_id_ = t.get_id();
    t.detach();
}

template <class Fn>
auto Reactor::on_long_lived_thread(Fn&& fn) -> decltype(fn()) {
    if (os::is_main_thread() || on_reactor_thread()) return fn();
    using T = decltype(fn());
    std::mutex m;
    std::condition_variable cv;
    bool ready = false;
    std::optional<T> value;
    std::exception_ptr error;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        tasks_.push_back([&] {
            try {
                value.emplace(fn());
            } catch (...) {
                error = std::current_exception();
            }
            std::lock_guard<std::mutex> l2(m);
            ready = true;
            cv.notify_one();
        });
    }
    os::wake_event_signal(wake_);
    std::unique_lock<std::mutex> lk(m);
    cv.wait(lk, [&] { return ready; });
    if (error) std::rethrow_exception(error);
    return std::move(*value);
}

void Reactor::add(const std::shared_ptr<ProcessCore>& core) {
    auto& io = *core->io_;
    std::optional<int> early;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        io.id = next_id_++;
        children_[io.id] = core;
        if (io.via_server) {
            auto it = early_exits_.find(io.serial);
            if (it != early_exits_.end()) {
                early = it->second;
                early_exits_.erase(it);
            } else {
                server_serials_[io.serial] = io.id;
            }
        }
        os::poller_add(poller_, io.channel, io.id << 2 | tag_channel);
        if (io.pidfd != os::invalid_handle) os::poller_add(poller_, io.pidfd, io.id << 2 | tag_pidfd);
        if (early) {
            int code = *early;
            tasks_.push_back([this, core, code] { on_exit(core, code); });
        }
    }
    if (early) os::wake_event_signal(wake_);
}

void Reactor::watch_fork_server(os::handle_t control) {
    std::lock_guard<std::mutex> lk(mutex_);
    if (server_ == control) return;
    server_ = control;
    server_gone_ = false;
    os::poller_add(poller_, control, tag_server);
}

std::vector<std::shared_ptr<ProcessCore>> Reactor::live() {
    std::lock_guard<std::mutex> lk(mutex_);
    std::vector<std::shared_ptr<ProcessCore>> out;
    for (auto& kv : children_) out.push_back(kv.second);
    return out;
}

std::shared_ptr<ProcessCore> Reactor::find(std::uint64_t id) {
    std::lock_guard<std::mutex> lk(mutex_);
    auto it = children_.find(id);
    return it == children_.end() ? nullptr : it->second;
}

void Reactor::loop() {
    std::uint64_t tokens[64];
    for (;;) {
        int n;
        try {
            n = os::poller_wait(poller_, tokens, 64, -1);
        } catch (...) {
            continue;
        }
        for (int i = 0; i < n; ++i) {
            std::uint64_t tag = tokens[i] & 3, id = tokens[i] >> 2;
            try {
                if (tag == tag_wake) {
                    os::wake_event_drain(wake_);
                    {
                        std::lock_guard<std::mutex> lk(mutex_);
                        running_tasks_.swap(tasks_);
                    }
                    for (auto& t : running_tasks_) t();
                    running_tasks_.clear();
                } else if (tag == tag_server) {
                    on_fork_server();
                } else if ((current_ = find(id))) {
                    if (tag == tag_channel) on_channel(current_);
                    else on_pidfd(current_);
                }
            } catch (...) {
                // The reactor must survive anything; a broken child resolves at its exit.
            }
            running_tasks_.clear();
            current_.reset();
        }
    }
}

void Reactor::on_pidfd(const std::shared_ptr<ProcessCore>& core) {
    auto& io = *core->io_;
    if (!io.via_server) {
        int code;
        if (os::reap_child(core->pid_, false, &code)) on_exit(core, code);
        return;
    }
    // A fork-server worker has ended (the server reaps it).  If it said how it
    // would exit (END), we know all there is: finish now, without waiting for
    // the server's report.  Otherwise the server's status tells.
    {
        std::lock_guard<std::mutex> lk(core->io_mutex());
        os::poller_remove(poller_, io.pidfd);
    }
    drain(*core);
    if (io.end_code) {
        {
            std::lock_guard<std::mutex> lk(mutex_);
            if (server_serials_.erase(io.serial)) finished_serials_.insert(io.serial);
        }
        finish(core, *io.end_code);
    }
}

void Reactor::on_channel(const std::shared_ptr<ProcessCore>& core) {
    auto& io = *core->io_;
    drain(*core);
    if (!io.eof || io.finished) return;
    // No pidfd (old kernel): the end of the channel means the child is exiting.
    if (!io.via_server && io.pidfd == os::invalid_handle) {
        int code;
        os::reap_child(core->pid_, true, &code);
        on_exit(core, code);
    } else if (io.via_server && server_gone_) {
        on_exit(core, -os::signal_kill());
    }
}

void Reactor::drain(ProcessCore& core) {
    auto& io = *core.io_;
    if (io.eof) return;
    Frame f;
    for (;;) {
        long n = io.reader.fill(io.channel, true);
        while (io.reader.next(f)) on_frame(core, f);
        if (n == 0) {
            io.eof = true;
            os::poller_remove(poller_, io.channel);
            return;
        }
        if (n < 0) return;
    }
}

void Reactor::on_frame(ProcessCore& core, Frame& f) {
    auto& io = *core.io_;
    switch (f.kind) {
        case frame_log: {
            close_all(f.handles);
            try {
                Decoder d(f.payload);
                LogRecord record = d.read<LogRecord>();
                handle_log_record(record);
            } catch (...) {
                // A failing handler or a torn record must not lose the child's outcome.
            }
            break;
        }
        case frame_value:
            core.value_bytes_ = std::move(f.payload);
            core.value_handles_ = std::move(f.handles);
            core.has_value_ = true;
            break;
        case frame_exception:
            close_all(f.handles);
            try {
                Decoder d(f.payload);
                io.exception = decode_exception(d);
            } catch (...) {
                io.exception = std::current_exception();
            }
            break;
        case frame_end:
            close_all(f.handles);
            try {
                Decoder d(f.payload);
                io.end_code = d.read<std::int32_t>();
            } catch (...) {
            }
            break;
        default:  // HELLO: nothing to keep
            close_all(f.handles);
            break;
    }
}

void Reactor::on_fork_server() {
    ServerStatus st;
    for (;;) {
        long n = os::channel_read(server_, &st, sizeof st, nullptr, true);
        if (n < 0) return;
        if (n == 0) {  // the server died: its workers die with it (parent-death signal)
            std::vector<std::shared_ptr<ProcessCore>> eof_workers;
            {
                std::lock_guard<std::mutex> lk(mutex_);
                os::poller_remove(poller_, server_);
                server_gone_ = true;
                for (auto& kv : children_)
                    if (kv.second->io_->via_server && kv.second->io_->eof) eof_workers.push_back(kv.second);
            }
            for (auto& c : eof_workers) on_exit(c, -os::signal_kill());
            return;
        }
        if (n != static_cast<long>(sizeof st)) continue;
        std::shared_ptr<ProcessCore>& core = current_;
        core.reset();
        {
            std::lock_guard<std::mutex> lk(mutex_);
            auto it = server_serials_.find(st.serial);
            if (it == server_serials_.end()) {
                // Finished already (through its pidfd), or not registered yet.
                if (!finished_serials_.erase(st.serial)) early_exits_[st.serial] = st.code;
                continue;
            }
            auto c = children_.find(it->second);
            server_serials_.erase(it);
            if (c != children_.end()) core = c->second;
        }
        if (core) on_exit(core, st.code);
        core.reset();
    }
}

void Reactor::on_exit(const std::shared_ptr<ProcessCore>& core, int code) {
    if (core->io_->finished) return;
    drain(*core);  // the child is gone: everything it wrote is already queued
    finish(core, code);
}

void Reactor::finish(const std::shared_ptr<ProcessCore>& core, int code) {
    auto& io = *core->io_;
    io.finished = true;
    if (!io.eof) os::poller_remove(poller_, io.channel);
    {
        std::lock_guard<std::mutex> lk(mutex_);
        children_.erase(io.id);
        if (io.via_server) server_serials_.erase(io.serial);
    }
    std::exception_ptr error = io.exception, result_error;
    std::string who = describe(core->name, core->pid_);
    if (!error && !core->has_value_) {
        if (code == 0) {
            result_error = std::make_exception_ptr(ProcessError(who + " exited with code 0 before returning a value", 0));
        } else if (code == -os::signal_terminate()) {
            result_error = std::make_exception_ptr(ProcessError(who + " was terminated by SIGTERM", code));
        } else if (code > 0) {
            error = std::make_exception_ptr(ProcessError(who + " exited with code " + std::to_string(code), code));
        } else {
            std::string text = who + " was killed by signal " + os::signal_name(-code) + " (" +
                               std::to_string(-code) + ")";
            if (-code == os::signal_kill()) text += " - possibly out of memory";
            error = std::make_exception_ptr(ProcessError(text, code));
        }
    }
    {
        std::lock_guard<std::mutex> lk(core->io_mutex());
        core->exitcode_ = code;
        os::poller_remove(poller_, io.pidfd);  // kept open for waiters; closed with the core
        os::close_handle(io.channel);
        io.channel = os::invalid_handle;
    }
    core->resolve(error, result_error);
}

void at_exit_handler() {
    Reactor* r = g_reactor.load();
    if (!r || !r->owned_by_this_process()) return;
    // Like Python: daemon children are terminated, the others are waited for.
    auto children = r->live();
    for (auto& c : children)
        if (c->daemon()) c->send_signal(os::signal_terminate());
    for (auto& c : children) c->wait_until(os::no_deadline);
}

// ---------------------------------------------------------------- the fork server

[[noreturn]] void fork_server_main(os::handle_t control, long parent) {
    if (!os::die_with_parent(parent)) os::exit_now(0);
    os::close_handles_except(control);
    const long self = os::current_pid();
    os::handle_t exits = os::child_exit_events();
    ServerStatus st{};
    std::uint64_t next_serial = 1;
    std::unordered_map<long, std::uint64_t> serial_of;  // worker pid -> serial
    const os::handle_t watch[2] = {control, exits};
    for (;;) {
        unsigned ready = os::wait_readable(watch, 2, -1);
        if (ready & 2u) {
            os::child_exit_events_drain(exits);
            long pid;
            int code;
            while (os::reap_any_child(&pid, &code)) {
                auto it = serial_of.find(pid);
                if (it == serial_of.end()) continue;
                st.serial = it->second;
                st.code = code;
                serial_of.erase(it);
                if (!os::channel_write(control, &st, sizeof st, nullptr, 0)) os::exit_now(0);
            }
        }
        if (ready & 1u) {
            std::vector<os::handle_t> fds;
            char request = 0;
            long n = 0;
            try {
                n = os::channel_read(control, &request, 1, &fds, false);
            } catch (...) {
                n = 0;
            }
            if (n <= 0) os::exit_now(0);  // the parent is gone: so are we (and our workers with us)
            for (auto fd : fds) {
                long pid = -1;
                std::uint64_t serial = next_serial++;
                try {
                    pid = os::fork_process();
                } catch (...) {
                }
                if (pid == 0) {
                    os::close_handle(control);
                    os::child_exit_events_release(exits);
                    run_bootstrapped_child(fd, self, ChildKind::forkserver_worker, serial);
                }
                if (pid > 0) serial_of[pid] = serial;
                os::close_handle(fd);  // the worker has it (or, if the fork failed, the parent sees EOF)
            }
        }
    }
}

void start_fork_server() {
    Runtime& r = rt();
    os::handle_t mine, theirs;
    os::packet_pair(mine, theirs);
    flush_stdio();
    long parent = os::current_pid();
    long pid;
    try {
        pid = os::fork_process();
    } catch (...) {
        os::close_handle(mine);
        os::close_handle(theirs);
        throw;
    }
    if (pid == 0) {
        os::close_handle(mine);
        fork_server_main(theirs, parent);
    }
    os::close_handle(theirs);
    r.forkserver.control = mine;
    r.forkserver.pid = pid;
}

/// After fork in a child: the parent's helpers are not ours.
void reset_after_fork_in_child() {
    Runtime& r = rt();
    Reactor::forget_after_fork();
    g_abandoned_after_fork[2] = r.forkserver_mutex;
    g_abandoned_after_fork[3] = r.fingerprint_mutex;
    r.forkserver_mutex = new std::mutex;
    r.fingerprint_mutex = new std::mutex;
    os::close_handle(r.forkserver.control);
    r.forkserver = ForkServerLink{};
}

[[noreturn]] void run_forked_child(os::handle_t channel, os::handle_t parent_end, ChildTask& task,
                                   const std::string& name, const std::string& identity, long parent,
                                   Level parent_log_level) {
    os::close_handle(parent_end);
    std::string parent_name = process_name();
    reset_after_fork_in_child();
    if (!os::die_with_parent(parent)) os::exit_now(1);
    adopt_child_identity(name, identity, parent_name, parent);
    child_link().channel = channel;
    set_log_level_from_parent(parent_log_level);
    install_log_forwarding();
    int code = run_and_report([&](Encoder& out) { task.run_here(out); });
    flush_stdio();
    os::exit_now(code);
}

}  // namespace

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
    if (method == "spawn") return spawn;
    if (method == "fork") return fork;
    if (method == "forkserver") return forkserver;
    throw std::invalid_argument("mpservice: unknown start method '" + method +
                                "' (expected \"spawn\", \"fork\" or \"forkserver\")");
}

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
