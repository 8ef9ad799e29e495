// process_reactor: the parent's reactor thread - one thread watches every
// child's channel and pidfd (and the fork server's control socket) and
// resolves each ProcessCore when its child has ended.

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

// ---------------------------------------------------------------- the reactor

struct ProcessCore::Io {
    os::handle_t channel = os::invalid_handle;
    os::handle_t pidfd = os::invalid_handle;  // guarded by the core's mutex once registered
    wire::FrameReader reader;
    std::uint64_t id = 0;
    bool via_server = false;
    std::uint64_t server_generation = 0;  // which fork server made it (fork-server workers)
    std::uint64_t serial = 0;            // fork-server workers: the server's number for it
    std::optional<int> end_code;         // the exit code the child announced in END
    int signal_sent = 0;                 // the last signal the parent sent (guarded by the core's mutex)
    bool warm = false;                   // a warm child (its HELLO is read by the reactor)
    long holder = 0;                     // a warm child's address-space holder (its HELLO names it),
    os::handle_t holder_pidfd = os::invalid_handle;  // opened at HELLO, while it is certainly ours
    bool eof = false;
    bool finished = false;
    std::exception_ptr exception;
    Owned<ChildTask> task;  // a forked child's arguments, kept until it ends
};

namespace {
using namespace wire;

class Reactor {
public:
    /// The reactor of this process (started on first use).
    static Reactor& get();
    /// Called in a forked child: the parent's reactor thread does not exist here.
    static void forget_after_fork() noexcept;

    /// Starts watching a started child; on failure (std::system_error) nothing is registered.
    void add(const std::shared_ptr<ProcessCore>& core);
    /// A fork-server worker that will not be registered: drop its status when it comes.
    void discard_worker(std::uint64_t serial);
    void watch_fork_server(os::handle_t control);
    /// The fork server behind `control` was killed: stop watching it, close
    /// `control` (on the reactor thread, which may be reading it) and resolve
    /// its workers that have ended.
    void retire_fork_server(os::handle_t control);
    /// Returns once the reactor thread has run a task posted now: every event
    /// it was handling before (and the references it held for it) is done.
    void barrier();
    /// Runs `fn` on a thread that lives as long as the process: the initial
    /// thread, or else the reactor's.  A child's parent-death signal fires when
    /// the *thread* that made it ends, so children are never made on a
    /// short-lived thread.
    template <class Fn>
    auto on_long_lived_thread(Fn&& fn) -> decltype(fn());
    std::vector<std::shared_ptr<ProcessCore>> live();
    bool on_reactor_thread() const { return std::this_thread::get_id() == thread_id_; }
    bool owned_by_this_process() const { return owner_pid_ == os::current_pid(); }
    int unreaped_holders() const noexcept { return unreaped_holders_.load(); }
    /// The readers of children's forwarded output (process_output.cpp).
    OutputPump& output() { return output_; }

private:
    Reactor();
    /// Posts `task` (which must not throw) to the reactor thread and returns
    /// once it has run there; never called on the reactor thread itself.
    void run_posted_and_wait(std::function<void()> task);
    void loop();
    void on_channel(const std::shared_ptr<ProcessCore>& core);
    void on_pidfd(const std::shared_ptr<ProcessCore>& core);
    void drain(ProcessCore& core);
    void on_frame(ProcessCore& core, Frame& f);
    /// The child has ended; `status` is its exit code, or empty when its
    /// status was collected by someone else (SIGCHLD ignored, a foreign waitpid).
    void on_exit(const std::shared_ptr<ProcessCore>& core, std::optional<int> status);
    void on_fork_server();
    void fork_server_gone(os::handle_t control, std::uint64_t generation, bool close);
    void finish(const std::shared_ptr<ProcessCore>& core, std::optional<int> status);
    /// Collects the exit status of a direct child (not a fork-server worker).
    void reap(const std::shared_ptr<ProcessCore>& core, bool block);
    /// A warm child's address-space holder (os::hold_address_space_past_exit),
    /// which ends right after the child: reaped when its pidfd says so.
    void watch_holder(long pid, os::handle_t pidfd) noexcept;
    void on_holder(std::uint64_t key) noexcept;
    std::shared_ptr<ProcessCore> find(std::uint64_t id);

    static constexpr std::uint64_t tag_channel = 0, tag_pidfd = 1, tag_wake = 2, tag_server = 3;
    static constexpr std::uint64_t token_output = 1 << 2 | tag_wake;  // output_'s poller (id 1 of tag_wake)
    static constexpr std::uint64_t first_holder_id = 2;                // holders: ids 2, 3, ... of tag_wake
    OutputPump output_;

    os::handle_t poller_ = os::invalid_handle;
    os::handle_t wake_ = os::invalid_handle;
    os::handle_t server_ = os::invalid_handle;
    std::uint64_t server_generation_ = 0;                  // counts the fork servers watched
    std::unordered_set<std::uint64_t> dead_generations_;   // fork servers that are gone (reactor thread)
    std::mutex mutex_;
    std::uint64_t next_id_ = 1;
    std::unordered_map<std::uint64_t, std::shared_ptr<ProcessCore>> children_;
    std::unordered_map<std::uint64_t, std::uint64_t> server_serials_;  // fork-server serial -> id
    std::unordered_map<std::uint64_t, int> early_exits_;               // statuses before registration
    std::unordered_set<std::uint64_t> finished_serials_;               // ended before their status came
    struct Holder {
        long pid;
        os::handle_t pidfd;
    };
    std::unordered_map<std::uint64_t, Holder> holders_;  // reactor thread only
    std::atomic<int> unreaped_holders_{0};               // its size, for test_unreaped_holders
    std::uint64_t next_holder_ = first_holder_id;
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

Reactor& Reactor::get() {
    Reactor* r = g_reactor.load(std::memory_order_acquire);
    if (r) return *r;
    std::lock_guard<std::mutex> lk(*g_reactor_mutex);
    r = g_reactor.load(std::memory_order_relaxed);
    if (!r) {
        register_after_fork_reset();  // a forked child must not take our reactor for its own
        r = new Reactor;  // never deleted: its thread runs until the process ends
        g_reactor.store(r, std::memory_order_release);
        std::atexit(at_exit_handler);
    }
    return *r;
}

// The reactors of the ancestors a forked child stops using (one per fork
// generation that had one); kept reachable so that a leak checker in a child
// that calls exit() does not report them.
void* volatile g_abandoned_reactors[16];
int g_abandoned_reactor_count = 0;

void Reactor::forget_after_fork() noexcept {
    Reactor* r = g_reactor.exchange(nullptr);
    if (r) {
        os::leak_checker_root(r->stack_low_, r->stack_size_);
        if (g_abandoned_reactor_count < 16) g_abandoned_reactors[g_abandoned_reactor_count++] = r;
    }
    ::new (g_reactor_mutex) std::mutex();  // may have been copied held by another thread
}

Reactor::Reactor() : owner_pid_(os::current_pid()) {
    poller_ = os::poller_create();
    wake_ = os::wake_event_create();
    os::poller_add(poller_, wake_, tag_wake);
    os::poller_add(poller_, output_.poller(), token_output);
    std::thread t([this] {
        os::current_thread_stack(&stack_low_, &stack_size_);
        loop();
    });
    thread_id_ = t.get_id();
    t.detach();
}

void Reactor::run_posted_and_wait(std::function<void()> task) {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        tasks_.push_back([&] {
            task();
            std::lock_guard<std::mutex> l2(m);
            done = true;
            cv.notify_one();
        });
    }
    os::wake_event_signal(wake_);
    std::unique_lock<std::mutex> lk(m);
    cv.wait(lk, [&] { return done; });
}

template <class Fn>
auto Reactor::on_long_lived_thread(Fn&& fn) -> decltype(fn()) {
    if (os::is_main_thread() || on_reactor_thread()) return fn();
    std::optional<decltype(fn())> value;
    std::exception_ptr error;
    run_posted_and_wait([&] {
        try {
            value.emplace(fn());
        } catch (...) {
            error = std::current_exception();
        }
    });
    if (error) std::rethrow_exception(error);
    return std::move(*value);
}

void Reactor::barrier() {
    if (!on_reactor_thread()) run_posted_and_wait([] {});
}

void Reactor::add(const std::shared_ptr<ProcessCore>& core) {
    auto& io = *core->io_;
    std::optional<int> early;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        io.id = next_id_++;
        io.server_generation = server_generation_;
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
        try {
            os::poller_add(poller_, io.channel, io.id << 2 | tag_channel);
            if (io.pidfd != os::invalid_handle) os::poller_add(poller_, io.pidfd, io.id << 2 | tag_pidfd);
        } catch (...) {
            os::poller_remove(poller_, io.channel);
            children_.erase(io.id);
            if (io.via_server) {
                server_serials_.erase(io.serial);
                if (early) early_exits_[io.serial] = *early;
            }
            throw;
        }
        if (early) {
            int code = *early;
            tasks_.push_back([this, core, code] { on_exit(core, code); });
        }
    }
    if (early) os::wake_event_signal(wake_);
}

void Reactor::retire_fork_server(os::handle_t control) {
    {
        std::lock_guard<std::mutex> lk(mutex_);
        std::uint64_t generation = server_generation_;
        tasks_.push_back([this, control, generation] { fork_server_gone(control, generation, true); });
    }
    os::wake_event_signal(wake_);
}

void Reactor::fork_server_gone(os::handle_t control, std::uint64_t generation, bool close) {
    // Its workers die with it (parent-death signal); those whose channel has
    // ended already will hear no status from it.
    std::vector<std::shared_ptr<ProcessCore>> eof_workers;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        os::poller_remove(poller_, control);
        if (server_ == control) server_ = os::invalid_handle;
        dead_generations_.insert(generation);
        for (auto& kv : children_) {
            auto& io = *kv.second->io_;
            if (io.via_server && io.server_generation == generation && io.eof) eof_workers.push_back(kv.second);
        }
    }
    if (close) os::close_handle(control);
    for (auto& c : eof_workers) on_exit(c, std::optional<int>(-os::signal_kill()));
}

void Reactor::discard_worker(std::uint64_t serial) {
    std::lock_guard<std::mutex> lk(mutex_);
    if (!early_exits_.erase(serial)) finished_serials_.insert(serial);
}

void Reactor::watch_fork_server(os::handle_t control) {
    std::lock_guard<std::mutex> lk(mutex_);
    if (server_ == control) return;
    server_ = control;
    ++server_generation_;
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
                if (tokens[i] == token_output) {
                    output_.on_ready();
                } else if (tag == tag_wake && id >= first_holder_id) {
                    on_holder(id);
                } else if (tag == tag_wake) {
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
                // The reactor must survive anything; a broken child resolves at
                // its exit.  An exit event that could not be handled would stay
                // ready and spin this loop: resolve that child with the error.
                if (current_ && tag == tag_pidfd && !current_->io_->finished) {
                    if (!current_->io_->exception) current_->io_->exception = std::current_exception();
                    try {
                        finish(current_, std::nullopt);
                    } catch (...) {
                        std::lock_guard<std::mutex> lk(current_->io_mutex());
                        os::poller_remove(poller_, current_->io_->pidfd);
                    }
                }
            }
            running_tasks_.clear();
            current_.reset();
        }
    }
}

void Reactor::reap(const std::shared_ptr<ProcessCore>& core, bool block) {
    int code = 0;
    switch (os::reap_child(core->pid_, core->io_->pidfd, block, &code)) {
        case os::ReapResult::running: return;  // not ended (a spurious wake-up)
        case os::ReapResult::reaped: on_exit(core, code); return;
        case os::ReapResult::reaped_elsewhere: on_exit(core, std::nullopt); return;
    }
}

void Reactor::watch_holder(long pid, os::handle_t pidfd) noexcept {
    if (pidfd == os::invalid_handle) return;  // reaped already (SIGCHLD ignored, a foreign waitpid)
    const std::uint64_t key = next_holder_++;
    try {
        holders_.emplace(key, Holder{pid, pidfd});
        os::poller_add(poller_, pidfd, key << 2 | tag_wake);
        ++unreaped_holders_;
    } catch (...) {
        holders_.erase(key);
        int code;
        os::send_signal(pid, pidfd, os::signal_kill());  // out of memory: reap it here instead
        try {
            os::reap_child(pid, pidfd, true, &code);
        } catch (...) {
        }
        os::close_handle(pidfd);
    }
}

void Reactor::on_holder(std::uint64_t key) noexcept {
    auto it = holders_.find(key);
    if (it == holders_.end()) return;
    int code;
    try {
        if (os::reap_child(it->second.pid, it->second.pidfd, false, &code) == os::ReapResult::running) return;
    } catch (...) {
    }
    try {
        os::poller_remove(poller_, it->second.pidfd);
    } catch (...) {
    }
    os::close_handle(it->second.pidfd);
    holders_.erase(it);
    --unreaped_holders_;
}

void Reactor::on_pidfd(const std::shared_ptr<ProcessCore>& core) {
    trace_phase(StartPhase::reactor_exit);
    auto& io = *core->io_;
    if (!io.via_server) {
        reap(core, false);
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
        reap(core, true);
    } else if (io.via_server && dead_generations_.count(io.server_generation)) {
        on_exit(core, std::optional<int>(-os::signal_kill()));
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
                trace_phase(StartPhase::reactor_outcome);
            } catch (...) {
            }
            break;
        default:  // HELLO: a warm child's names its address-space holder
            close_all(f.handles);
            if (f.kind == frame_hello && io.holder == 0 && (io.holder = holder_named_in_hello(f.payload)) > 0)
                io.holder_pidfd = os::process_handle(io.holder);
            break;
    }
}

void Reactor::on_fork_server() {
    ServerStatus st;
    for (;;) {
        long n = os::channel_read(server_, &st, sizeof st, nullptr, true);
        if (n < 0) return;
        if (n == 0) {  // the server died (the runtime still owns `server_`: not closed here)
            std::uint64_t generation;
            {
                std::lock_guard<std::mutex> lk(mutex_);
                generation = server_generation_;
            }
            fork_server_gone(server_, generation, false);
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

void Reactor::on_exit(const std::shared_ptr<ProcessCore>& core, std::optional<int> status) {
    if (core->io_->finished) return;
    drain(*core);  // the child is gone: everything it wrote is already queued
    finish(core, status);
}

void Reactor::finish(const std::shared_ptr<ProcessCore>& core, std::optional<int> status) {
    auto& io = *core->io_;
    output_.drain_for(core.get(), core->pid_);  // the child's last lines before its outcome
    int signal_sent;
    {
        std::lock_guard<std::mutex> lk(core->io_mutex());
        signal_sent = io.signal_sent;
    }
    // Without the exit status, say what is known: the code the child announced
    // in END (it exits with exactly that code once END is sent), else the
    // signal we sent it, else nothing - an error that says so.
    bool status_lost = false;
    if (!status) {
        if (io.end_code) status = io.end_code;
        else if (signal_sent) status = -signal_sent;
        else status_lost = true;
    }
    const int code = status.value_or(255);
    io.finished = true;
    if (!io.eof) os::poller_remove(poller_, io.channel);
    {
        std::lock_guard<std::mutex> lk(mutex_);
        children_.erase(io.id);
        if (io.via_server) server_serials_.erase(io.serial);
    }
    std::exception_ptr error = io.exception, result_error;
    std::string who = describe_process(core->name, core->pid_);
    if (status_lost && !error && !core->has_value_) {
        error = std::make_exception_ptr(ProcessError(
            who + " ended without reporting an outcome, and its exit status was collected by someone else "
                  "(SIGCHLD is ignored, or another waitpid() took it): how it ended is unknown",
            code));
    } else if (!error && !core->has_value_) {
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
    Owned<ChildTask> task;
    {
        std::lock_guard<std::mutex> lk(core->io_mutex());
        core->exitcode_ = code;
        core->exited_ = true;
        os::poller_remove(poller_, io.pidfd);  // kept open for waiters; closed with the core
        os::close_handle(io.channel);
        io.channel = os::invalid_handle;
        task = std::move(io.task);
    }
    task.reset();  // a forked child's argument copies: released before anyone learns it ended
    if (io.holder_pidfd != os::invalid_handle) {
        watch_holder(io.holder, io.holder_pidfd);
        io.holder_pidfd = os::invalid_handle;
    }
    core->resolve(error, result_error);
    trace_phase(StartPhase::resolved);
}

}  // namespace

void at_exit_handler() {
    Reactor* r = g_reactor.load();
    if (!r || !r->owned_by_this_process()) return;
    // Like Python: daemon children are terminated, the others are waited for.
    auto children = r->live();
    for (auto& c : children)
        if (c->daemon()) c->send_signal(os::signal_terminate());
    for (auto& c : children) c->wait_until(os::no_deadline);
}

void forget_reactor_after_fork() noexcept { Reactor::forget_after_fork(); }

void test_reactor_barrier() {
    if (g_reactor.load(std::memory_order_acquire)) Reactor::get().barrier();
}

int test_unreaped_holders() noexcept {
    Reactor* r = g_reactor.load(std::memory_order_acquire);
    return r ? r->unreaped_holders() : 0;
}

}  // namespace detail
}  // namespace mpservice
