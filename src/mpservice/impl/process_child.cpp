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
        ParentPresent present = decode_parent_present(d);
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
        adopt_parent_present(present);
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
}  // namespace detail
}  // namespace mpservice
