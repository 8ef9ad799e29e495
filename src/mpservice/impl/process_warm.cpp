// process_warm: warm spawn - the spawn context keeps one child exec'd ahead
// of demand, so that a start pays for handing over the task instead of an exec.
//
// A warm child is a spawned child whose BOOT has not been written yet: it is
// made exactly as a cold one (posix_spawn of /proc/self/exe, the marker, the
// one inherited channel, PR_SET_PDEATHSIG tied to a thread that never ends),
// runs the library's bootstrap only - the marker checks in init(), the
// parent-death signal, every other descriptor closed, its own build
// fingerprint read - says HELLO and blocks reading its channel.  What it is
// to run arrives with BOOT like any spawned child's task, and goes through the
// same checks (protocol version, build fingerprints of the target's module).
//
// It is used only when it would see what a fresh spawn sees now: the parent's
// working directory and environment at start() are compared with those it
// was made with; any difference (a setenv, a chdir since) discards it and the
// start spawns afresh.  The "warm spawner" thread makes the children (it is
// their parent thread: it never ends, so their parent-death signal fires only
// when the process dies) and reaps a warm child that died unused (no zombie
// stays behind).  A taken child is replaced once it has ended, or after
// replace_after at the latest: an exec (about a millisecond of CPU) made at
// the moment of the start would compete with the child just given its task,
// and with the parent waiting for it, on a machine with few CPUs.  Three children in a row
// that die before saying HELLO stop it (the starts are then cold).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <optional>
#include <thread>

namespace mpservice {

namespace {
std::atomic<bool> g_warm_spawn{false};
}  // namespace

namespace detail {
namespace {
using namespace wire;

class WarmSpawner {
public:
    /// The spawner of this process, made (with its thread) on first use.
    static WarmSpawner& get();
    static WarmSpawner* existing() noexcept { return g_spawner.load(std::memory_order_acquire); }
    /// In a forked child: the parent's warm child is not ours.
    static void forget_after_fork() noexcept;

    /// The warm child, if there is one that sees what a fresh spawn would
    /// see now; asks for the next one either way.
    std::optional<WarmChild> take();
    /// Discards the warm child and makes no more until the next take().
    void stop();
    /// The warm child's pid once it is ready, waiting up to `timeout`; 0 if none.
    long wait_ready(std::chrono::milliseconds timeout);

private:
    WarmSpawner();
    void loop();
    /// Spawns a warm child (outside the lock); false if it could not be made.
    bool make_one(WarmChild& c);
    /// Kills and reaps children that will not be used (spawner thread).
    static void finish(std::vector<WarmChild>& dying) noexcept;

    static constexpr int max_failures = 3;
    static constexpr std::chrono::milliseconds replace_after{20};
    static std::atomic<WarmSpawner*> g_spawner;

    os::handle_t wake_ = os::invalid_handle;
    std::mutex mutex_;
    std::condition_variable ready_cv_;
    std::optional<WarmChild> child_;
    std::vector<WarmChild> dying_;  // taken off, to be killed and reaped
    bool wanted_ = false;
    int failures_ = 0;
    // The last child taken (a duplicate of its pidfd): the replacement is
    // made when it ends or at replace_at_, whichever comes first.
    os::handle_t taken_ = os::invalid_handle;
    os::Deadline replace_at_{};  // children in a row that died before HELLO, or spawns that failed
};

std::atomic<WarmSpawner*> WarmSpawner::g_spawner{nullptr};
std::mutex* g_spawner_mutex = new std::mutex;
void* volatile g_abandoned_spawner = nullptr;  // a forked child's copy: kept reachable for leak checkers

WarmSpawner& WarmSpawner::get() {
    if (WarmSpawner* s = existing()) return *s;
    std::lock_guard<std::mutex> lk(*g_spawner_mutex);
    WarmSpawner* s = g_spawner.load(std::memory_order_relaxed);
    if (!s) {
        static const bool fork_hook = (os::at_fork_child(&WarmSpawner::forget_after_fork), true);
        (void)fork_hook;
        s = new WarmSpawner;  // never deleted: its thread runs until the process ends
        g_spawner.store(s, std::memory_order_release);
    }
    return *s;
}

void WarmSpawner::forget_after_fork() noexcept {
    WarmSpawner* s = g_spawner.exchange(nullptr);
    ::new (g_spawner_mutex) std::mutex();  // the forking thread may have held it
    if (!s) return;
    // Single-threaded here: the spawner thread does not exist in this copy.
    // Its descriptors are closed; the children themselves are the parent's.
    os::close_handle(s->wake_);
    os::close_handle(s->taken_);
    if (s->child_) {
        os::close_handle(s->child_->pidfd);
        os::close_handle(s->child_->channel);
    }
    for (auto& d : s->dying_) {
        os::close_handle(d.pidfd);
        os::close_handle(d.channel);
    }
    g_abandoned_spawner = s;
}

WarmSpawner::WarmSpawner() : wake_(os::wake_event_create()) {
    // A thread that lives as long as the process: a child's parent-death
    // signal fires when the thread that made it ends.
    std::thread([this] { loop(); }).detach();
}

std::optional<WarmChild> WarmSpawner::take() {
    std::optional<WarmChild> c;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        wanted_ = true;
        c.swap(child_);
        if (c && taken_ == os::invalid_handle) {
            try {
                taken_ = os::duplicate_handle(c->pidfd);
                replace_at_ = os::Clock::now() + replace_after;
            } catch (...) {
                // No descriptor to spare: the replacement is made at once.
            }
        }
    }
    os::wake_event_signal(wake_);
    if (!c) return std::nullopt;
    const bool alive = os::wait_readable(&c->pidfd, 1, 0) == 0;
    // The same working directory and environment as a fresh spawn would get
    // (an unnameable directory - deleted - never matches).
    const bool current = alive && !c->cwd.empty() && c->cwd == os::current_directory() &&
                         c->environment == os::environment_entries();
    if (current) return c;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        dying_.push_back(std::move(*c));
    }
    os::wake_event_signal(wake_);
    return std::nullopt;
}

void WarmSpawner::stop() {
    {
        std::lock_guard<std::mutex> lk(mutex_);
        wanted_ = false;
        failures_ = 0;
        os::close_handle(taken_);
        taken_ = os::invalid_handle;
        if (child_) dying_.push_back(std::move(*child_));
        child_.reset();
    }
    os::wake_event_signal(wake_);
}

long WarmSpawner::wait_ready(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lk(mutex_);
    ready_cv_.wait_for(lk, timeout, [&] { return child_ && child_->ready; });
    return child_ && child_->ready ? child_->pid : 0;
}

bool WarmSpawner::make_one(WarmChild& c) {
    c.cwd = os::current_directory();
    c.environment = os::environment_entries();  // given to the child as they are here
    os::handle_t mine, theirs;
    try {
        os::channel_pair(mine, theirs);
    } catch (...) {
        return false;
    }
    try {
        std::string marker = child_marker + std::to_string(theirs) + ":" + std::to_string(os::current_pid()) +
                             warm_marker_suffix;
        c.pid = os::spawn_self(rt().argv0, marker, theirs, &c.environment);
    } catch (...) {
        os::close_handle(mine);
        os::close_handle(theirs);
        return false;
    }
    os::close_handle(theirs);
    c.channel = mine;
    c.pidfd = os::process_handle(c.pid);
    if (c.pidfd == os::invalid_handle) {
        // No pidfd (an old kernel): a warm child could not be watched while it waits.
        std::vector<WarmChild> one;
        one.push_back(std::move(c));
        finish(one);
        return false;
    }
    return true;
}

void WarmSpawner::finish(std::vector<WarmChild>& dying) noexcept {
    for (auto& d : dying) {
        // A child killed before its HELLO could leave a holder no one knows
        // of: one still booting is given the time to say HELLO (or to die).
        if (!d.ready) {
            os::handle_t either[2] = {d.channel, d.pidfd};
            (void)os::wait_readable(either, 2, 5000);
        }
        os::send_signal(d.pid, d.pidfd, os::signal_kill());
        int code;
        try {
            os::reap_child(d.pid, d.pidfd, true, &code);  // SIGKILLed: short; ECHILD if SIGCHLD is ignored
        } catch (...) {
        }
        end_holder_named_on(d.channel);
        os::close_handle(d.pidfd);
        os::close_handle(d.channel);
    }
    dying.clear();
}

void WarmSpawner::loop() {
    for (;;) {
        try {
            os::handle_t watch[4] = {wake_, os::invalid_handle, os::invalid_handle, os::invalid_handle};
            int n = 1;
            long watched = 0;
            bool watching_hello = false;
            int timeout_ms = -1;
            os::handle_t taken = os::invalid_handle;
            {
                std::lock_guard<std::mutex> lk(mutex_);
                if (taken_ != os::invalid_handle) {
                    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(replace_at_ - os::Clock::now());
                    if (left.count() > 0 && wanted_) {
                        taken = taken_;
                        timeout_ms = static_cast<int>(left.count()) + 1;
                    } else {
                        os::close_handle(taken_);  // due: the replacement is made below
                        taken_ = os::invalid_handle;
                    }
                }
                if (child_) {
                    watched = child_->pid;
                    watch[n++] = child_->pidfd;
                    if (!child_->ready) {
                        watch[n++] = child_->channel;
                        watching_hello = true;
                    }
                }
            }
            const int taken_slot = taken != os::invalid_handle ? n : -1;
            if (taken_slot >= 0) watch[n++] = taken;
            const unsigned ready = os::wait_readable(watch, n, timeout_ms);
            os::wake_event_drain(wake_);
            std::vector<WarmChild> dying;
            bool make = false;
            {
                std::lock_guard<std::mutex> lk(mutex_);
                const bool same = child_ && child_->pid == watched;
                if (same && (ready & 2u)) {  // died unused
                    if (!child_->ready) ++failures_;
                    dying_.push_back(std::move(*child_));
                    child_.reset();
                } else if (same && watching_hello && (ready & 4u)) {
                    // HELLO is there (left unread: the reactor reads and skips it).
                    child_->ready = true;
                    failures_ = 0;
                    ready_cv_.notify_all();
                }
                if (taken_slot >= 0 && taken_ == taken && (ready & (1u << taken_slot))) {
                    os::close_handle(taken_);  // it has ended: replace it now
                    taken_ = os::invalid_handle;
                }
                if (taken_ != os::invalid_handle && os::Clock::now() >= replace_at_) {
                    os::close_handle(taken_);
                    taken_ = os::invalid_handle;
                }
                dying.swap(dying_);
                make = wanted_ && !child_ && taken_ == os::invalid_handle && failures_ < max_failures;
            }
            finish(dying);
            if (!make) continue;
            WarmChild c;
            const bool made = make_one(c);
            std::lock_guard<std::mutex> lk(mutex_);
            if (!made) {
                ++failures_;
            } else if (wanted_ && !child_) {
                child_ = std::move(c);
            } else {
                dying_.push_back(std::move(c));  // stopped meanwhile
                os::wake_event_signal(wake_);
            }
        } catch (...) {
            // Out of memory or descriptors: the starts are cold meanwhile.
        }
    }
}

}  // namespace

std::optional<WarmChild> take_warm_child() { return WarmSpawner::get().take(); }

void end_holder_named_on(os::handle_t channel) noexcept {
    long holder = 0;
    try {
        // The child has ended: its HELLO is there, or the channel's end comes.
        if (os::wait_readable(&channel, 1, 5000) == 0) return;
        FrameReader reader;
        Frame hello;
        if (!reader.read_blocking(channel, hello) || hello.kind != frame_hello) return;
        close_all(hello.handles);
        holder = holder_named_in_hello(hello.payload);
    } catch (...) {
        return;
    }
    if (holder <= 0) return;
    // It ends by itself now that the child has; SIGKILL makes that certain.
    // Unreaped, its pid cannot have been reused.
    os::handle_t h = os::process_handle(holder);
    if (h == os::invalid_handle) return;  // reaped already (SIGCHLD ignored, a foreign waitpid)
    os::send_signal(holder, h, os::signal_kill());
    int code;
    try {
        os::reap_child(holder, h, true, &code);
    } catch (...) {
    }
    os::close_handle(h);
}

long test_warm_child(std::chrono::milliseconds timeout) {
    WarmSpawner* s = WarmSpawner::existing();
    return s ? s->wait_ready(timeout) : 0;
}

void discard_unwanted_warm_child() noexcept {
    if (g_warm_spawn.load(std::memory_order_relaxed)) return;  // the program keeps one anyway
    if (WarmSpawner* s = WarmSpawner::existing()) s->stop();
}

}  // namespace detail

void set_warm_spawn(bool keep_warm) {
    g_warm_spawn.store(keep_warm, std::memory_order_relaxed);
    if (!keep_warm)
        if (detail::WarmSpawner* s = detail::WarmSpawner::existing()) s->stop();
}

bool warm_spawn() noexcept { return g_warm_spawn.load(std::memory_order_relaxed); }

}  // namespace mpservice
