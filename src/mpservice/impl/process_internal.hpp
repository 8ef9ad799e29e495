// process_internal.hpp: what the two process parts share.
//
//   part 5 - the process-wide runtime (process_runtime.cpp), the child's side
//            (process_child.cpp), the fork server and the after-fork reset
//            (process_fork.cpp), the warm spawner (process_warm.cpp);
//   part 6 - the parent's side: output capture (process_output.cpp), the
//            reactor (process_reactor.cpp), ProcessCore::start and the public
//            process functions (process_core.cpp), connections (connection.cpp).
//
// Everything else the files of a part share stays in their unnamed namespace.

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace mpservice {
namespace detail {

// ---------------------------------------------------------------- process-wide state (process_runtime.cpp)

/// The fork server as seen from its parent.
struct ForkServerLink {
    os::handle_t control = os::invalid_handle;
    long pid = 0;
};

/// The lock of the build-fingerprint cache: a fork lock, made before main().
std::mutex& fingerprints_mutex();

struct Runtime {
    bool initialized = false;
    bool is_child = false;
    std::string argv0 = "/proc/self/exe";
    std::string identity;  // "" in the main process, "2" or "2:1" in children
    std::atomic<int> next_child{1};
    std::optional<ProcessInfo> parent;
    // Made afresh in every forked child: the thread that starts a fork server
    // forks while holding it.
    std::mutex* forkserver_mutex = new std::mutex;
    ForkServerLink forkserver;
    std::mutex* fingerprint_mutex = &fingerprints_mutex();  // a fork lock (os::at_fork_protect)
    std::map<std::string, std::string> fingerprints;
    std::atomic<bool> corrupt_next_fingerprint{false};
    // How long start() waits for the fork server to make a worker: a stopped
    // or wedged server must not block start() for ever.
    std::atomic<long long> forkserver_timeout_ms{30000};
};

/// The runtime of this process, made on first use and never destroyed (the
/// reactor thread outlives static destruction).
Runtime& rt();

/// Registers, once, the at-fork hook that makes a forked child forget its
/// parent's reactor, fork server and child link (process_fork.cpp).
void register_after_fork_reset();

/// Flushes C++ and C standard streams (before a fork, before an exit).
void flush_stdio() noexcept;

/// "process 'name' (pid 12)", for messages.
std::string describe_process(const std::string& name, long pid);

/// Where trace_phase writes, when a bench asked for it (test_trace_start_phases).
inline std::atomic<std::int64_t*> g_phase_slots{nullptr};

/// Records `phase` when a bench asked for it.
inline void trace_phase(StartPhase phase) noexcept {
    if (std::int64_t* slots = g_phase_slots.load(std::memory_order_relaxed))
        slots[static_cast<int>(phase)] =
            std::chrono::duration_cast<std::chrono::nanoseconds>(os::Clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------- the child's side (process_child.cpp)

enum class ChildKind {
    spawned,            ///< exec'd for one start: BOOT is on its way
    warm_spawned,       ///< exec'd ahead of demand (process_warm.cpp): says HELLO, then waits for BOOT
    forkserver_worker,  ///< forked by the fork server
};

/// Makes the child's link to its parent now, in the parent before a fork:
/// made at its first use in the child, it would allocate there (page faults
/// on the child's way to running the task).
void prepare_child_link();

/// Writes what a child needs to know of its parent being alive (part of BOOT).
void encode_parent_present(Encoder& e, StartMethod child_method);

/// Makes a normal exit of this process announce its status to its parent.
void register_exit_announcement() noexcept;

/// A spawned child or a fork-server worker: reads BOOT, runs the target, reports, exits.
[[noreturn]] void run_bootstrapped_child(os::handle_t channel, long expected_parent, ChildKind kind,
                                         std::uint64_t serial = 0);

/// A forked child, right after fork (process_fork.cpp): runs the task, reports, exits.
[[noreturn]] void run_forked_child(os::handle_t channel, os::handle_t parent_end, ChildTask& task,
                                   const std::string& name, const std::string& identity,
                                   const std::string& parent_name, long parent, Level parent_log_level);

/// Starts this process's fork server (process_fork.cpp); caller holds rt().forkserver_mutex.
void start_fork_server();

/// In a spawn or fork-server child, reading BOOT (process_output.cpp): the
/// counterpart of OutputCapture::encode.
void adopt_forwarded_output(Decoder& d);

// ---------------------------------------------------------------- the warm spawner (process_warm.cpp)

/// A child exec'd ahead of demand, waiting for its BOOT.
struct WarmChild {
    long pid = 0;
    os::handle_t pidfd = os::invalid_handle;
    os::handle_t channel = os::invalid_handle;  // the parent's end
    std::string cwd;                            // what it was made with
    std::vector<std::string> environment;
    bool ready = false;  // its HELLO has arrived: bootstrapped, blocked on the channel
};

/// The warm child, if there is one that sees what a fresh spawn would see
/// now; asks for the next one either way.
std::optional<WarmChild> take_warm_child();
/// A warm child has ended before its HELLO was read: reads it from `channel`
/// and kills and reaps the address-space holder it names (process_warm.cpp).
void end_holder_named_on(os::handle_t channel) noexcept;

// ---------------------------------------------------------------- the parent's side (process_reactor.cpp, process_core.cpp)

/// In a forked child: the parent's reactor is not ours.
void forget_reactor_after_fork() noexcept;

/// What a normal exit does for this process's own children (daemons are
/// terminated, the others waited for).
void at_exit_handler();

/// The handle that becomes readable when the process ends, or invalid.
os::handle_t exit_handle_of(const ProcessCore& p);

}  // namespace detail
}  // namespace mpservice
