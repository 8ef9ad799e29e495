// threading: implementation - the future core shared by Process and Thread,
// wait() and as_completed().
#include <algorithm>

namespace mpservice {
namespace detail {

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
    std::vector<std::weak_ptr<CompletionQueue>> subscribers;
    std::vector<Owned<Task>> hooks;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        if (done_) return;
        done_ = true;
        done_flag_.store(true, std::memory_order_release);
        error_ = std::move(error);
        result_error_ = std::move(result_error);
        subscribers.swap(subscribers_);
        hooks.swap(hooks_);
        cv_.notify_all();
    }
    // Outside our lock: subscribe() takes ours, then the queue's.
    for (auto& w : subscribers)
        if (auto q = w.lock()) q->push(this);
    for (auto& h : hooks) h->run();
}

void FutureCore::on_resolve(Owned<Task> hook) {
    {
        std::lock_guard<std::mutex> lk(mutex_);
        if (!done_) {
            hooks_.push_back(std::move(hook));
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
    // Drop queues of finished waits so a long-lived worker's list stays short.
    subscribers_.erase(std::remove_if(subscribers_.begin(), subscribers_.end(),
                                      [](const std::weak_ptr<CompletionQueue>& w) { return w.expired(); }),
                       subscribers_.end());
    subscribers_.push_back(q);
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

std::pair<WorkerList, WorkerList> wait_until(const WorkerList& workers, os::Deadline deadline, ReturnWhen return_when) {
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
    std::pair<WorkerList, WorkerList> out;
    for (Worker* w : workers) (w->done() ? out.first : out.second).push_back(w);
    return out;
}

}  // namespace detail

std::pair<WorkerList, WorkerList> wait(const WorkerList& workers, ReturnWhen return_when) {
    return detail::wait_until(workers, detail::os::no_deadline, return_when);
}

AsCompleted as_completed(const WorkerList& workers) { return AsCompleted(workers, detail::os::no_deadline); }

AsCompleted::AsCompleted(const WorkerList& workers, detail::os::Deadline deadline)
    : queue_(std::make_shared<detail::CompletionQueue>()), workers_(workers), deadline_(deadline) {
    detail::check_started(workers_);
    for (std::size_t i = 0; i < workers_.size(); ++i)
        if (std::find(workers_.begin(), workers_.begin() + static_cast<std::ptrdiff_t>(i), workers_[i]) ==
            workers_.begin() + static_cast<std::ptrdiff_t>(i))
            pending_.push_back(i);
    for (std::size_t i : pending_) const_cast<detail::FutureCore&>(workers_[i]->core()).subscribe(queue_);
}

Completed AsCompleted::next_completed() {
    while (!pending_.empty()) {
        const detail::FutureCore* c = queue_->pop_until(deadline_);
        if (!c) {
            throw TimeoutError("mpservice: as_completed: " + std::to_string(pending_.size()) +
                               " worker(s) still running after the timeout");
        }
        auto it = std::find_if(pending_.begin(), pending_.end(),
                               [&](std::size_t i) { return &workers_[i]->core() == c; });
        if (it == pending_.end()) continue;
        Completed done{workers_[*it], *it};
        pending_.erase(it);
        return done;
    }
    return Completed{};
}

}  // namespace mpservice
