// threading: implementation - the future core shared by Process and Thread,
// wait() and as_completed().
#include <algorithm>
#include <deque>

namespace mpservice {
namespace detail {

/// Cores that have resolved, in the order they did (wait, as_completed).
class CompletionQueue {
public:
    void push(const FutureCore* core);
    /// The next resolved core, or nullptr if `deadline` passes first.
    const FutureCore* pop_until(os::Deadline deadline);

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    std::deque<const FutureCore*> ready_;
};

struct FutureCore::Listeners {
    std::vector<std::weak_ptr<CompletionQueue>> queues;
    std::vector<Owned<Task>> hooks;
};

FutureCore::FutureCore() = default;
FutureCore::~FutureCore() = default;

void FutureCore::mark_started() {
    std::lock_guard<std::mutex> lk(mutex_);
    started_ = true;
}

bool FutureCore::started() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return started_;
}

bool FutureCore::done() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return done_;
}

void FutureCore::resolve(std::exception_ptr error, std::exception_ptr result_error) {
    Owned<Listeners> listeners;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        if (done_) return;
        done_ = true;
        done_flag_.store(true, std::memory_order_release);
        error_ = std::move(error);
        result_error_ = std::move(result_error);
        listeners = std::move(listeners_);
        cv_.notify_all();
    }
    // Outside our lock: subscribe() takes ours, then the queue's.
    if (!listeners) return;
    for (auto& w : listeners->queues)
        if (auto q = w.lock()) q->push(this);
    for (auto& h : listeners->hooks) h->run();
}

void FutureCore::on_resolve(Owned<Task> hook) {
    {
        std::lock_guard<std::mutex> lk(mutex_);
        if (!done_) {
            if (!listeners_) listeners_ = Owned<Listeners>(new Listeners);
            listeners_->hooks.push_back(std::move(hook));
            return;
        }
    }
    hook->run();
}

bool FutureCore::wait_until(os::Deadline deadline) const {
    std::unique_lock<std::mutex> lk(mutex_);
    if (deadline == os::no_deadline) {
        cv_.wait(lk, [&] { return done_; });
        return true;
    }
    return cv_.wait_until(lk, deadline, [&] { return done_; });
}

std::exception_ptr FutureCore::error() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return error_;
}

std::exception_ptr FutureCore::result_error() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return result_error_;
}

void FutureCore::subscribe(const std::shared_ptr<CompletionQueue>& q) {
    std::lock_guard<std::mutex> lk(mutex_);
    if (done_) {
        q->push(this);
        return;
    }
    if (!listeners_) listeners_ = Owned<Listeners>(new Listeners);
    // Drop queues of finished waits so a long-lived worker's list stays short.
    auto& queues = listeners_->queues;
    queues.erase(std::remove_if(queues.begin(), queues.end(),
                                [](const std::weak_ptr<CompletionQueue>& w) { return w.expired(); }),
                 queues.end());
    queues.push_back(q);
}

void CompletionQueue::push(const FutureCore* core) {
    std::lock_guard<std::mutex> lk(mutex_);
    ready_.push_back(core);
    cv_.notify_all();
}

const FutureCore* CompletionQueue::pop_until(os::Deadline deadline) {
    std::unique_lock<std::mutex> lk(mutex_);
    auto ready = [&] { return !ready_.empty(); };
    if (deadline == os::no_deadline) cv_.wait(lk, ready);
    else if (!cv_.wait_until(lk, deadline, ready)) return nullptr;
    const FutureCore* c = ready_.front();
    ready_.pop_front();
    return c;
}

void throw_not_started(const std::string& what, const std::string& name) {
    throw InvalidStateError("mpservice: " + what + "() on '" + name + "', which was never started; call start() first");
}

void throw_timeout(const std::string& name) {
    throw TimeoutError("mpservice: '" + name + "' is still running after the timeout");
}

void throw_result_taken(const std::string& name) {
    throw InvalidStateError("mpservice: the result of '" + name +
                            "' was moved out by take_result() (or std::move(worker).result()); it is gone");
}

Shared<std::atomic<bool>> make_stop_flag() { return std::make_shared<std::atomic<bool>>(false); }

std::string next_thread_name() {
    static std::atomic<int> counter{1};
    return "Thread-" + std::to_string(counter.fetch_add(1));
}

namespace {
void check_started(const WorkerList& workers) {
    for (Worker* w : workers) {
        if (!w) throw std::invalid_argument("mpservice: null worker given to wait/as_completed");
        if (!w->core().started())
            throw InvalidStateError("mpservice: '" + w->name() + "' was never started; wait() and as_completed() "
                                    "take started workers only");
    }
}

}  // namespace

namespace {
/// Blocks until `return_when` holds for `workers` or `deadline` passes.
void wait_for(const WorkerList& workers, os::Deadline deadline, ReturnWhen return_when) {
    check_started(workers);
    auto queue = std::make_shared<CompletionQueue>();
    for (Worker* w : workers) const_cast<FutureCore&>(w->core()).subscribe(queue);
    std::size_t finished = 0;
    // The same worker may be listed twice: count distinct cores.
    std::vector<const FutureCore*> distinct;
    for (Worker* w : workers)
        if (std::find(distinct.begin(), distinct.end(), &w->core()) == distinct.end()) distinct.push_back(&w->core());
    while (finished < distinct.size()) {
        const FutureCore* c = queue->pop_until(deadline);
        if (!c) break;
        ++finished;
        if (return_when == ReturnWhen::first_completed) break;
        if (return_when == ReturnWhen::first_exception && c->error()) break;
    }
}
}  // namespace

std::pair<WorkerList, WorkerList> wait_until(const WorkerList& workers, os::Deadline deadline, ReturnWhen return_when) {
    wait_for(workers, deadline, return_when);
    std::pair<WorkerList, WorkerList> out;
    for (Worker* w : workers) (w->done() ? out.first : out.second).push_back(w);
    return out;
}

WorkerList wait_until_split(const WorkerList& workers, os::Deadline deadline, ReturnWhen return_when,
                            std::size_t& done_count) {
    wait_for(workers, deadline, return_when);
    WorkerList split = workers;
    auto first_running = std::stable_partition(split.begin(), split.end(), [](Worker* w) { return w->done(); });
    done_count = static_cast<std::size_t>(first_running - split.begin());
    return split;
}

}  // namespace detail

std::pair<WorkerList, WorkerList> wait(const WorkerList& workers, ReturnWhen return_when) {
    return detail::wait_until(workers, detail::os::no_deadline, return_when);
}

AsCompleted as_completed(const WorkerList& workers) { return AsCompleted(workers, detail::os::no_deadline); }

struct AsCompleted::State {
    std::shared_ptr<detail::CompletionQueue> queue = std::make_shared<detail::CompletionQueue>();
    WorkerList workers;
    std::vector<std::size_t> pending;  // positions in workers, one per distinct worker
    detail::os::Deadline deadline;
};

AsCompleted::AsCompleted(const WorkerList& workers, detail::os::Deadline deadline) : state_(new State) {
    State& s = *state_;
    s.workers = workers;
    s.deadline = deadline;
    detail::check_started(s.workers);
    for (std::size_t i = 0; i < s.workers.size(); ++i)
        if (std::find(s.workers.begin(), s.workers.begin() + static_cast<std::ptrdiff_t>(i), s.workers[i]) ==
            s.workers.begin() + static_cast<std::ptrdiff_t>(i))
            s.pending.push_back(i);
    for (std::size_t i : s.pending) const_cast<detail::FutureCore&>(s.workers[i]->core()).subscribe(s.queue);
}

AsCompleted::~AsCompleted() = default;
AsCompleted& AsCompleted::operator=(AsCompleted&&) noexcept = default;

Completed AsCompleted::next_completed() {
    if (!state_) return Completed{};  // moved from
    State& s = *state_;
    while (!s.pending.empty()) {
        const detail::FutureCore* c = s.queue->pop_until(s.deadline);
        if (!c) {
            throw TimeoutError("mpservice: as_completed: " + std::to_string(s.pending.size()) +
                               " worker(s) still running after the timeout");
        }
        auto it = std::find_if(s.pending.begin(), s.pending.end(),
                               [&](std::size_t i) { return &s.workers[i]->core() == c; });
        if (it == s.pending.end()) continue;
        Completed done{s.workers[*it], *it};
        s.pending.erase(it);
        return done;
    }
    return Completed{};
}

}  // namespace mpservice
