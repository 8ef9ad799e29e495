// process_fork: the fork server (a clean process forked at init() that forks
// the fork-server workers) and the start-up of fork-context children.

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

}  // namespace

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

namespace {

/// In the child of every fork() of this process (ours, the fork server's, the
/// user's): the parent's helpers are not ours, and the locks of per-process
/// state may have been copied held by threads that do not exist here.
void reset_after_fork_in_child() {
    Runtime& r = rt();
    forget_reactor_after_fork();
    ::new (r.forkserver_mutex) std::mutex();  // the forking thread may hold it (it starts fork servers)
    os::close_handle(r.forkserver.control);
    r.forkserver = ForkServerLink{};
    ::new (&child_link().mutex) std::mutex();  // the channel is replaced by whoever uses it next
}

}  // namespace

[[noreturn]] void run_forked_child(os::handle_t channel, os::handle_t parent_end, ChildTask& task,
                                   const std::string& name, const std::string& identity,
                                   const std::string& parent_name, long parent, Level parent_log_level) {
    os::close_handle(parent_end);
    if (!os::die_with_parent(parent)) os::exit_now(1);
    adopt_child_identity(name, identity, parent_name, parent);
    child_link().channel = channel;
    watch_own_exit();
    set_log_level_from_parent(parent_log_level);
    install_log_forwarding();
    int code = run_and_report([&](Encoder& out, std::shared_ptr<void>& keep) {
        trace_phase(StartPhase::task_begins);
        task.run_here(out, keep);
    });
    flush_stdio();
    trace_phase(StartPhase::child_exiting);
    os::exit_now(code);
}

}  // namespace detail
}  // namespace mpservice
