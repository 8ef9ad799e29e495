// pool: PoolCore's life - starting its workers (and their replacements),
// chunking and dispatching tasks to them, closing and stopping them.

namespace mpservice {
namespace detail {

os::CodeRef pool_code_ref(const void* fn) {
    static std::mutex m;
    static std::unordered_map<const void*, os::CodeRef> cache;
    std::lock_guard<std::mutex> lk(m);
    auto it = cache.find(fn);
    if (it != cache.end()) return it->second;
    os::CodeRef r = os::code_ref_of(fn);
    cache.emplace(fn, r);
    return r;
}

PoolWorkerBoot::PoolWorkerBoot() : p(std::make_shared<PoolWorkerParts>()) {}

ChunkBuilder::ChunkBuilder(std::shared_ptr<JobBase> job, std::size_t chunksize) : job_(std::move(job)), chunksize_(chunksize) {}

std::vector<ChunkDraft> ChunkBuilder::take_full() {
    std::vector<ChunkDraft> full;
    if (chunks_.size() < 2) return full;
    full.reserve(chunks_.size() - 1);
    for (std::size_t i = 0; i + 1 < chunks_.size(); ++i) full.push_back(std::move(chunks_[i]));
    chunks_.erase(chunks_.begin(), chunks_.end() - 1);
    return full;
}

Encoder ChunkBuilder::rebuild_without_handles(ChunkDraft& c) {
    Encoder e;
    e.write_bytes(c.args.bytes().data(), c.args.bytes().size());
    return e;
}

void ChunkBuilder::throw_too_big() {
    throw std::length_error("mpservice: a pool chunk's arguments exceed 4 GiB; use a smaller chunksize");
}

void ChunkBuilder::open() {
    // Room for a chunk like the last one, so that filling it never reallocates.
    std::size_t last_bytes = chunks_.empty() ? 0 : chunks_.back().args.bytes().size();
    chunks_.emplace_back();
    ChunkDraft& c = chunks_.back();
    c.job = job_;
    c.job_first = items_;
    c.offsets.reserve(std::min<std::size_t>(chunksize_, std::size_t(1) << 20));
    if (last_bytes) c.args.bytes().reserve(last_bytes);
    c.args.bytes().resize(pool_task_room);  // the task header goes here
}

std::shared_ptr<PoolCore> PoolCore::create(PoolSettings settings, WorkerFactory factory) {
    auto core = std::make_shared<PoolCore>(std::move(settings), std::move(factory));
    return core;
}

PoolCore::PoolCore(PoolSettings settings, WorkerFactory factory) : s_(new State()), settings_(std::move(settings)) {
    State& s = *s_;
    s.factory = std::move(factory);
    s.bell = std::make_shared<PoolDoorbell>();
    s.bell->results = QueueCore::create(QueueKind::simple, result_tag, 0, result_ring_bytes);
    for (int i = 0; i < settings_.processes; ++i) s.workers.emplace_back();
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        try {
            for (std::size_t i = 0; i < s.workers.size(); ++i) start_worker(i);
        } catch (...) {
            s.phase = State::Phase::terminated;
            for (auto& w : s.workers)
                if (w.proc && !w.ended) w.proc->kill();
            throw;  // ~State waits for the ones that started
        }
    }
    s.thread = std::thread([this] { result_loop(); });
}

PoolCore::~PoolCore() {
    try {
        terminate();
        join();
    } catch (...) {
    }
}

void PoolCore::start_worker(std::size_t i, bool replacement) {
    State& s = *s_;
    State::WorkerRec& w = s.workers[i];
    w.tasks = QueueCore::create(QueueKind::simple, task_tag, 0, task_ring_bytes);
    w.slot = SharedMemory::create(sizeof(PoolSlot) + slot_record_bytes);
    ::new (w.slot.data()) PoolSlot();
    os::handle_t mine, theirs;
    os::channel_pair(mine, theirs);
    os::close_handle(w.lane);
    w.lane = mine;
    PoolWorkerBoot boot;
    boot.p->tasks = w.tasks;
    boot.p->results = s.bell->results;
    boot.p->slot = w.slot;
    boot.p->lane = theirs;
    boot.p->initializer = settings_.initializer;
    boot.p->maxtasks = settings_.maxtasks;
    w.outstanding.clear();
    w.sent = 0;
    w.ring_closed = false;
    w.proc = s.factory(boot);
    w.proc->set_name((settings_.kind == runner_kind ? "ProcessRunner-" : "PoolWorker-") + std::to_string(i + 1));
    w.proc->set_daemon(true);
    // A pool that replaces workers keeps doing so: the replacements come from a
    // child exec'd ahead of demand (spawn context; others ignore it), so a
    // worker's end does not stall the pool for a whole re-exec.  The first
    // workers start cold: a pool that never loses one keeps no idle child.
    // When the pool ends, join() discards the warm child kept for the next replacement.
    if (replacement) {
        w.proc->set_warm_start(true);
        s.warm_starts.store(true);
    }
    w.proc->start();
    // Sent (or, under fork, copied into the child): the parent needs none of it.
    boot.release();
    w.ended = false;
    auto dead = std::make_shared<std::atomic<bool>>(false);
    w.dead = dead;
    auto bell = s.bell;
    const_cast<FutureCore&>(w.proc->core()).on_resolve(make_task([dead, bell] {
        dead->store(true, std::memory_order_release);
        bell->deaths.fetch_add(1, std::memory_order_acq_rel);
        bell->ring();
    }));
}

void PoolCore::check_accepting() const {
    State& s = *s_;
    std::lock_guard<std::mutex> lk(s.mutex);
    if (s.broken) std::rethrow_exception(s.broken);
    if (s.phase == State::Phase::closing)
        throw InvalidStateError("mpservice: the " + settings_.kind + " is closed (close() was called)");
    if (s.phase == State::Phase::terminated)
        throw InvalidStateError("mpservice: the " + settings_.kind + " was terminated");
}

void PoolCore::submit(const PoolTarget& target, std::vector<ChunkDraft>& drafts) {
    State& s = *s_;
    // Copy the handles first (outside the lock): the arguments' owners may go
    // away before a chunk is sent again to a replacement worker.
    std::vector<std::unique_ptr<State::Chunk>> made;
    made.reserve(drafts.size());
    for (auto& d : drafts) {
        auto c = std::make_unique<State::Chunk>();
        c->job = d.job.shared();
        c->job_first = d.job_first;
        c->count = d.count;
        c->target = target;
        c->args = std::move(d.args.bytes());
        c->offsets = std::move(d.offsets);
        c->stride = d.stride;
        for (auto h : d.args.handles()) c->handles.push_back(os::duplicate_handle(h));
        made.push_back(std::move(c));
    }
    check_accepting();
    std::lock_guard<std::mutex> lk(s.mutex);
    if (s.broken) std::rethrow_exception(s.broken);
    if (s.phase != State::Phase::running)
        throw InvalidStateError("mpservice: the " + settings_.kind + " is closed or terminated");
    for (auto& c : made) {
        std::uint64_t id = s.next_chunk++;
        s.chunks.emplace(id, std::move(c));
        s.pending.push_back(id);
    }
    dispatch_locked();
}

bool PoolCore::send_locked(std::size_t wi, std::uint64_t id, bool may_block) {
    State& s = *s_;
    State::WorkerRec& w = s.workers[wi];
    State::Chunk& c = *s.chunks.at(id);
    PoolTaskHeader th{pool_task_chunk,
                  c.count - c.next,
                  id,
                  c.next,
                  static_cast<std::uint32_t>(c.handles.size()),
                  c.target.fn.module,
                  c.target.fn.offset,
                  c.target.runner.module,
                  c.target.runner.offset};
    // The whole chunk goes as it is, its header in the room left for it; the
    // rest of one whose worker died is copied behind a new header.
    std::string rest;
    const char* msg = c.args.data();
    std::size_t size = c.args.size();
    if (c.next == 0) {
        std::memcpy(&c.args[0], &th, sizeof th);
    } else {
        std::size_t from = c.item_offset(c.next);
        rest.reserve(sizeof th + c.args.size() - from);
        rest.append(reinterpret_cast<const char*>(&th), sizeof th);
        rest.append(c.args, from, std::string::npos);
        msg = rest.data();
        size = rest.size();
    }
    QueueCore::Status st;
    if (!may_block) {
        st = w.tasks.put(msg, size, os::Clock::now());
    } else {
        // A chunk bigger than half the ring streams through it while the (idle)
        // worker reads; give up only if the worker dies meanwhile.
        while ((st = w.tasks.put(msg, size, os::Clock::now() + std::chrono::milliseconds(200))) ==
                   QueueCore::Status::timeout &&
               !w.dead->load(std::memory_order_acquire)) {
        }
    }
    if (st != QueueCore::Status::ok) return false;
    if (!c.handles.empty()) {
        char byte = 'h';
        os::channel_write(w.lane, &byte, 1, nullptr, 0, c.handles.data(), c.handles.size());
    }
    c.worker = static_cast<int>(wi);
    w.outstanding.push_back(id);
    ++w.sent;
    return true;
}

void PoolCore::dispatch_locked() {
    State& s = *s_;
    std::vector<bool> full(s.workers.size(), false);
    while (!s.pending.empty()) {
        std::uint64_t id = s.pending.front();
        State::Chunk& c = *s.chunks.at(id);
        std::size_t bytes = c.args.size();  // the header's room included
        int best = -1;
        for (std::size_t i = 0; i < s.workers.size(); ++i) {
            State::WorkerRec& w = s.workers[i];
            if (full[i] || !w.proc || w.ended || w.ring_closed || w.dead->load(std::memory_order_acquire)) continue;
            if (w.outstanding.size() >= chunks_per_worker) continue;
            if (settings_.maxtasks && w.sent >= settings_.maxtasks) continue;
            if (best < 0 || w.outstanding.size() < s.workers[static_cast<std::size_t>(best)].outstanding.size())
                best = static_cast<int>(i);
        }
        if (best < 0) return;
        auto bi = static_cast<std::size_t>(best);
        bool big = bytes > s.workers[bi].tasks.capacity() / 2;
        if (big && !s.workers[bi].outstanding.empty()) {
            full[bi] = true;  // a big chunk goes only to an idle worker
            continue;
        }
        if (!send_locked(bi, id, big)) {
            full[bi] = true;
            continue;
        }
        s.pending.pop_front();
    }
}

void PoolCore::close() {
    State& s = *s_;
    std::lock_guard<std::mutex> lk(s.mutex);
    if (s.phase == State::Phase::running) s.phase = State::Phase::closing;
    maybe_finish_locked();
}

void PoolCore::terminate() {
    State& s = *s_;
    Deliveries out;
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        if (s.phase != State::Phase::terminated) {
            s.phase = State::Phase::terminated;
            fail_all_locked(std::make_exception_ptr(InvalidStateError(
                                "mpservice: the " + settings_.kind + " was terminated before this task finished")),
                            out);
        }
        for (auto& w : s.workers)
            if (w.proc && !w.ended) w.proc->terminate();
    }
    deliver(out);
    s.bell->ring();  // a caller blocked on the ring looks at its (now failed) result
    if (!wait_workers_ended(os::deadline_after(std::chrono::seconds(2)))) {
        // A worker that ignores SIGTERM is killed.
        std::lock_guard<std::mutex> lk(s.mutex);
        for (auto& w : s.workers)
            if (w.proc && !w.ended) w.proc->kill();
    }
}

bool PoolCore::wait_workers_ended(os::Deadline deadline) {
    State& s = *s_;
    auto all_ended = [&] {
        for (auto& w : s.workers)
            if (w.proc && !w.ended) return false;
        return true;
    };
    // Deaths are handled by whoever reads the ring: read it here too.
    return serve_until(
        [&] {
            std::lock_guard<std::mutex> lk(s.mutex);
            return all_ended();
        },
        deadline,
        [&](os::Deadline d) {
            std::unique_lock<std::mutex> lk(s.mutex);
            s.changed.wait_until(lk, d, all_ended);
        });
}

void PoolCore::join() {
    State& s = *s_;
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        if (s.phase == State::Phase::running)
            throw InvalidStateError("mpservice: join() on a " + settings_.kind + " that is neither closed nor terminated");
    }
    wait_workers_ended(os::no_deadline);
    if (s.thread.joinable()) {
        s.stop.store(true, std::memory_order_release);
        s.bell->ring();
        s.thread.join();
    }
    // The warm child made for this pool's next replacement is nobody's now:
    // it goes with the pool (unless the program keeps warm children anyway).
    if (s.warm_starts.exchange(false)) discard_unwanted_warm_child();
}

std::vector<long> PoolCore::worker_pids() const {
    State& s = *s_;
    std::lock_guard<std::mutex> lk(s.mutex);
    std::vector<long> pids;
    for (auto& w : s.workers)
        if (w.proc && !w.ended) pids.push_back(w.proc->pid());
    return pids;
}
}  // namespace detail

std::vector<long> Pool::worker_pids() const { return core_->worker_pids(); }

}  // namespace mpservice
