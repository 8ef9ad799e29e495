// process_child: the child side - reads its BOOT frame, runs the target,
// reports the outcome (VALUE or EXCEPTION, then END) and exits.

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
namespace {
using namespace wire;

// ---------------------------------------------------------------- the child side

/// The child's end of its channel; frames from several threads are serialized.
struct ChildLink {
    os::handle_t channel = os::invalid_handle;
    std::mutex mutex;
    bool send(std::uint32_t kind, const std::string& payload, const std::vector<os::handle_t>& handles = {}) {
        std::lock_guard<std::mutex> lk(mutex);
        try {
            return write_frame(channel, kind, payload, handles);
        } catch (const std::exception& e) {
            // Not swallowed: the parent cannot hear of it, so this process's stderr does.
            std::string text = "mpservice: " + process_name() + " could not send a frame to its parent: " + e.what() + "\n";
            os::write_stderr(text.data(), text.size());
            return false;
        }
    }
};

ChildLink& child_link() {
    static ChildLink* l = [] {
        register_after_fork_reset();  // its mutex is made afresh in a forked child
        return new ChildLink;
    }();
    return *l;
}

void install_log_forwarding() {
    set_log_forwarder([](const LogRecord& record) {
        Encoder e;
        e.write(record);
        child_link().send(frame_log, e.bytes());
    });
}

// ---- a child that ends by exit(n) itself announces n
// When SIGCHLD is ignored, or another waitpid() takes the status, the kernel
// cannot tell the parent how a child ended.  A child that returns or throws
// sends END with its code; one that calls exit(n) in its target sends END with
// n on its way out, so the parent reports "exited with code n" all the same.

std::atomic<bool> g_outcome_sent{false};
std::atomic<long> g_link_owner{0};  // the process whose channel child_link() is

void announce_exit_status(int status) noexcept {
    if (g_outcome_sent.exchange(true) || os::current_pid() != g_link_owner.load()) return;
    try {
        Encoder end;
        end.write(static_cast<std::int32_t>(status & 0xff));
        FrameHeader h{frame_end, 0, end.bytes().size()};
        std::string frame(reinterpret_cast<const char*>(&h), sizeof h);
        frame.append(end.bytes());
        ChildLink& link = child_link();
        std::lock_guard<std::mutex> lk(link.mutex);
        if (link.channel != os::invalid_handle) os::channel_write(link.channel, frame.data(), frame.size(), nullptr, 0);
    } catch (...) {
    }
}

}  // namespace

// Registers announce_exit_status with the C library (once per program).  The
// parent calls it before it forks: registering takes the C library's exit
// lock, which a forked child of a threaded parent must never need.
void register_exit_announcement() noexcept { os::on_exit_status(&announce_exit_status); }

namespace {

/// Called once the channel to the parent is set up in this process.
void watch_own_exit() noexcept {
    g_outcome_sent = false;
    g_link_owner = os::current_pid();
    os::on_exit_status(&announce_exit_status);
}

enum class SendOutcome { sent, parent_gone, failed };

/// Sends `kind` (VALUE or EXCEPTION) with `payload` and `handles`, then END
/// carrying `code`, in one write: one system call, one wake-up of the parent.
/// On failure `why` says what went wrong.
SendOutcome send_outcome(std::uint32_t kind, const Encoder& payload, int code, std::string& why) {
    g_outcome_sent = true;  // END goes now (or never): exit() need not announce one
    const auto& hs = payload.handles();
    // A closed descriptor would fail the write half-way through the frames;
    // find it first, while a clear report can still be sent instead.
    for (auto h : hs) {
        if (!os::handle_valid(h)) {
            why = "the result holds OS handle " + std::to_string(h) +
                  ", which is not open (a shared object destroyed before the result was sent?)";
            return SendOutcome::failed;
        }
    }
    std::string frames;
    auto append = [&](std::uint32_t k, const std::string& bytes, std::size_t nhandles) {
        FrameHeader h{k, static_cast<std::uint32_t>(nhandles), bytes.size()};
        frames.append(reinterpret_cast<const char*>(&h), sizeof h);
        frames.append(bytes);
    };
    append(kind, payload.bytes(), hs.size());
    Encoder end;
    end.write(static_cast<std::int32_t>(code));
    append(frame_end, end.bytes(), 0);
    ChildLink& link = child_link();
    std::lock_guard<std::mutex> lk(link.mutex);
    try {
        if (os::channel_write(link.channel, frames.data(), frames.size(), nullptr, 0, hs.data(), hs.size()))
            return SendOutcome::sent;
        return SendOutcome::parent_gone;
    } catch (const std::exception& e) {
        why = e.what();
        return SendOutcome::failed;
    }
}

/// Sends the outcome of `run` (VALUE or EXCEPTION), then END; returns the exit
/// code.  Before reporting, the child's own children are finished as a normal
/// exit would (the child then ends with exit_now: see run_bootstrapped_child).
template <class Run>
int run_and_report(Run&& run) {
    int code = 0;
    Encoder out;
    std::shared_ptr<void> keep;  // the result: its handles must stay open until it is sent
    std::uint32_t kind = frame_value;
    auto encode_error = [&](std::exception_ptr e) {
        out = Encoder();
        kind = frame_exception;
        code = 1;
        try {
            encode_exception(out, e);
        } catch (...) {
            out = Encoder();
            encode_exception(out, std::make_exception_ptr(Error("mpservice: the child's exception could not be encoded")));
        }
    };
    try {
        run(out, keep);
    } catch (...) {
        encode_error(std::current_exception());
    }
    try {
        at_exit_handler();  // grandchildren's log records still travel up through us
    } catch (...) {
    }
    set_log_forwarder({});  // later records stay here: END is the last frame
    std::string why;
    SendOutcome sent = send_outcome(kind, out, code, why);
    trace_phase(StartPhase::outcome_sent);
    if (sent == SendOutcome::failed) {
        // Never swallowed: the parent learns why it gets no result.
        encode_error(std::make_exception_ptr(
            Error("mpservice: " + process_name() + " could not deliver its " +
                  (kind == frame_value ? std::string("result") : std::string("exception")) + ": " + why)));
        std::string ignored;
        sent = send_outcome(kind, out, code, ignored);
        if (sent != SendOutcome::sent) {
            std::string text = "mpservice: " + process_name() + " could not deliver its outcome: " + why + "\n";
            os::write_stderr(text.data(), text.size());
        }
    }
    keep.reset();
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

// ---- the parent's present: what a child adopts that a fork-server worker,
// forked from a server made at init(), would otherwise have from init() time

/// The parent's state at start() that its child adopts: the default start
/// method (every child) and - for a fork-server worker - the working directory
/// and environment, which a spawned child has already (exec inherits them).
struct ParentPresent {
    std::int8_t start_method = -1;  // StartMethod, or -1: not chosen in the parent
    bool has_environment = false;
    std::string cwd;
    std::vector<std::string> environment;
};

}  // namespace

void encode_parent_present(Encoder& e, StartMethod child_method) {
    ParentPresent p;
    std::string method = get_start_method(true);
    if (!method.empty()) p.start_method = static_cast<std::int8_t>(get_context(method).start_method());
    p.has_environment = child_method == StartMethod::forkserver;
    if (p.has_environment) {
        p.cwd = os::current_directory();
        p.environment = os::environment_entries();
    }
    e(p.start_method, p.has_environment);
    if (p.has_environment) e(p.cwd, p.environment);
}

namespace {

ParentPresent decode_parent_present(Decoder& d) {
    ParentPresent p;
    d(p.start_method, p.has_environment);
    if (p.has_environment) d(p.cwd, p.environment);
    return p;
}

/// In the child, before the target runs (after the module checks, which may
/// use paths relative to the old working directory).
void adopt_parent_present(const ParentPresent& p) {
    if (p.start_method >= 0)
        set_start_method(Context(static_cast<StartMethod>(p.start_method)).name(), true);
    if (!p.has_environment) return;
    os::replace_environment(p.environment);
    if (!p.cwd.empty() && !os::change_directory(p.cwd))
        throw Error("mpservice: the fork-server worker cannot enter the parent's working directory '" + p.cwd + "'");
}

}  // namespace

void prepare_child_link() { (void)child_link(); }

[[noreturn]] void run_bootstrapped_child(os::handle_t channel, long expected_parent, ChildKind kind,
                                         std::uint64_t serial) {
    if (!os::die_with_parent(expected_parent)) os::exit_now(1);
    if (kind != ChildKind::forkserver_worker) os::close_handles_except(channel);
    child_link().channel = channel;
    watch_own_exit();
    if (kind == ChildKind::warm_spawned) {
        // The part of the task's checks that does not depend on the task: the
        // build fingerprint of this executable (read from its file), cached
        // for the comparison with the one BOOT carries.
        try {
            (void)fingerprint_of(std::string());
        } catch (...) {
        }
        // Its exit then skips the teardown of its address space (the parent
        // waits for that exit before the task's result is final); the holder
        // goes right after it, reaped by the parent's reactor, which learns
        // of it here.
        const long holder = os::hold_address_space_past_exit();
        Encoder hello;
        hello(static_cast<std::int64_t>(os::current_pid()), std::uint64_t(0), static_cast<std::int64_t>(holder));
        if (!write_frame(channel, frame_hello, hello.bytes())) os::exit_now(1);
    }
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

    int code = run_and_report([&](Encoder& out, std::shared_ptr<void>& keep) {
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
        ParentPresent present = decode_parent_present(d);
        (void)daemon;
        set_log_level_from_parent(static_cast<Level>(log_level));
        adopt_forwarded_output(d);
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
        adopt_parent_present(present);
        trampoline(fn, d, out, keep);
    });
    close_all(boot.handles);
    // Every context ends its child the same way once the outcome is reported:
    // streams flushed, no static destructors or atexit handlers.  A forked
    // child must not run them (they are its parent's), and a spawned child
    // follows suit so that the contexts agree: a crash in teardown after the
    // answer was sent cannot happen, and exitcode() is the code reported
    // (README, "How a child ends").
    flush_stdio();
    os::exit_now(code);
}

}  // namespace detail
}  // namespace mpservice
