// pool: the worker loop (child side) and PoolCore (parent side: workers,
// dispatch, reading results - by a waiting caller or the result thread - and
// what a dead worker costs).
//
// Shared memory of one worker:
//   - its task ring (parent -> this worker): one message per chunk,
//     [PoolTaskHeader | the items' arguments];
//   - its progress slot: the chunk and item it runs, and the outcomes of the
//     chunk's finished items not yet sent, laid out as a result message;
// and of the pool: the result ring (every worker -> parent), messages
// [PoolResultHeader | records], a record being [PoolRecordHeader | encoded value or exception].
//
// The parent keeps every chunk until all of its items have an outcome, so when
// a worker dies it can tell, from the worker's slot, which item was running
// (it fails, with ProcessError), which had finished (their outcomes are read
// from the slot) and which had not started (they go to another worker).

#include <algorithm>
#include <cstring>
#include <thread>
#include <unordered_map>

namespace mpservice {
namespace detail {
namespace {

constexpr std::uint32_t pool_task_chunk = 1;
constexpr std::uint32_t pool_result_records = 1;
constexpr std::uint32_t pool_result_wake = 2;
constexpr std::uint32_t no_item = 0xFFFFFFFFu;

constexpr std::size_t task_ring_bytes = std::size_t(4) << 20;
constexpr std::size_t result_ring_bytes = std::size_t(4) << 20;
constexpr std::uint32_t slot_record_bytes = 256u << 10;
constexpr std::uint32_t slot_flush_bytes = pool_slot_flush_bytes;  // see there
/// Chunks a worker holds at once: the one it runs and the next, so that it
/// never waits for the parent between two chunks.
constexpr std::size_t chunks_per_worker = 2;
/// A reading caller looks up from the ring this often (its result may come
/// from terminate() in another thread); one that found the reader role taken
/// looks again this often; the result thread looks at the ring this often
/// while results are due and nobody waits, and when idle.
constexpr auto reader_slice = std::chrono::milliseconds(20);
constexpr auto follower_slice = std::chrono::milliseconds(2);
constexpr auto busy_tick = std::chrono::milliseconds(1);
constexpr auto idle_tick = std::chrono::milliseconds(20);

struct PoolTaskHeader {
    std::uint32_t kind;
    std::uint32_t count;  // items in this message
    std::uint64_t chunk;
    std::uint32_t base;  // index (in the chunk) of the message's first item
    std::uint32_t nhandles;
    std::uint64_t fn_module, fn_offset, runner_module, runner_offset;
};
static_assert(sizeof(PoolTaskHeader) == 56 && sizeof(PoolTaskHeader) == pool_task_room,
              "task header layout (ChunkDraft leaves room for it)");

struct PoolResultHeader {
    std::uint32_t kind;
    std::uint32_t first;  // index (in the chunk) of the first record
    std::uint64_t chunk;
};

/// A worker's progress, in shared memory.  `header` and the records after it
/// form a result message that the worker sends as is.
struct PoolSlot {
    std::atomic<std::uint32_t> ready{0};        // the initializer has run
    std::atomic<std::uint32_t> index{no_item};  // item (in the chunk) being run
    std::atomic<std::uint64_t> chunk{0};        // chunk being run
    std::atomic<std::uint32_t> used{0};         // record bytes committed after header
    std::uint32_t pad = 0;
    PoolResultHeader header{};
    unsigned char* records() { return reinterpret_cast<unsigned char*>(this + 1); }
};
static_assert(sizeof(PoolSlot) == 40, "slot layout: records follow the header directly");

const std::uint64_t task_tag = QueueCore::tag_of("mpservice.pool.tasks");
const std::uint64_t result_tag = QueueCore::tag_of("mpservice.pool.results");

/// Polls `ring` for up to `budget` until it holds an item or stop().  A
/// blocking get spins only briefly before it sleeps, and waking a sleeper on
/// another CPU costs tens of microseconds on a VM - more than a whole task
/// round trip - so both ends of a task look a little longer, yielding between
/// looks: the other end may be waiting for this very CPU (the scheduler put
/// both on it).
template <class Stop>
void spin_for_item(const QueueCore& ring, std::chrono::microseconds budget, Stop&& stop) {
    spin_for([&] { return ring.qsize() != 0 || stop(); }, budget, BetweenLooks::yield);
}
/// How long a worker looks for its next task, and a waiting caller for its
/// result, before the blocking get (see spin_for_item).
constexpr auto worker_spin = std::chrono::microseconds(50);
constexpr auto caller_spin = std::chrono::microseconds(100);

void copy_item(void* context, const unsigned char* data, std::size_t size) {
    static_cast<std::string*>(context)->assign(reinterpret_cast<const char*>(data), size);
}

// ---------------------------------------------------------------- worker side

/// The worker's end of its slot and of the result ring.  `cur` is the write
/// position (ItemSink's inline path appends bitwise values through it too).
struct WorkerLink {
    QueueCore results;
    PoolSlot* slot = nullptr;
    SlotCursor cur;

    void attach(PoolSlot* s) {
        slot = s;
        cur.index = &s->index;
        cur.used = &s->used;
        cur.records = s->records();
    }
    /// A new message (chunk part) whose first item is `base`; the slot is empty.
    void start_message(std::uint32_t base) {
        cur.base = base;
        cur.next_local = 0;
        cur.in_slot = 0;
        cur.end = 0;
        cur.dense_at = SlotCursor::no_dense;
    }
    void commit_length() { slot->used.store(cur.end, std::memory_order_release); }

    /// One bitwise value, appended to the dense record at the end of the slot
    /// (opened if there is none of this size; the slot sent first if it is
    /// full).  Order of stores as in ItemSink::commit_bitwise.
    void append_dense(const void* value, std::uint32_t elem) {
        unsigned char* records = cur.records;
        if (cur.dense_at != SlotCursor::no_dense && cur.dense_elem == elem && cur.end + elem <= slot_record_bytes) {
            std::memcpy(records + cur.end, value, elem);
            PoolRecordHeader rh;
            std::memcpy(&rh, records + cur.dense_at, sizeof rh);
            rh.size += elem;
            std::memcpy(records + cur.dense_at, &rh, sizeof rh);
            cur.end += elem;
        } else {
            if (cur.end + sizeof(PoolRecordHeader) + elem > slot_record_bytes) flush();
            PoolRecordHeader rh{elem, dense_record_kind(elem)};
            std::memcpy(records + cur.end + sizeof rh, value, elem);
            std::memcpy(records + cur.end, &rh, sizeof rh);
            cur.dense_at = cur.end;
            cur.dense_elem = elem;
            cur.end += static_cast<std::uint32_t>(sizeof rh) + elem;
        }
        commit_length();
        ++cur.in_slot;
        if (cur.end >= slot_flush_bytes) flush();
    }

    void append(std::uint32_t kind, const std::string& payload) {
        cur.dense_at = SlotCursor::no_dense;  // a dense record after this one is a new one
        auto size = static_cast<std::uint32_t>(sizeof(PoolRecordHeader) + payload.size());
        if (cur.end + size > slot_record_bytes) flush();
        PoolRecordHeader rh{static_cast<std::uint32_t>(payload.size()), kind};
        if (size > slot_record_bytes) {
            // Too big for the slot: it travels alone (a crash while it is sent loses it).
            std::string msg;
            PoolResultHeader h{pool_result_records, slot->header.first, slot->header.chunk};
            msg.append(reinterpret_cast<const char*>(&h), sizeof h);
            msg.append(reinterpret_cast<const char*>(&rh), sizeof rh);
            msg.append(payload);
            results.put(msg.data(), msg.size(), os::no_deadline);
            slot->header.first += 1;
            return;
        }
        unsigned char* at = cur.records + cur.end;
        std::memcpy(at, &rh, sizeof rh);
        if (!payload.empty()) std::memcpy(at + sizeof rh, payload.data(), payload.size());
        cur.end += size;
        commit_length();
        ++cur.in_slot;
        if (cur.end >= slot_flush_bytes) flush();
    }
    /// Sends the slot's records, then empties it.
    void flush() {
        if (!cur.end) return;
        slot->header.kind = pool_result_records;
        results.put(&slot->header, sizeof(PoolResultHeader) + cur.end, os::no_deadline);
        cur.end = 0;
        commit_length();
        slot->header.first += cur.in_slot;
        cur.in_slot = 0;
        cur.dense_at = SlotCursor::no_dense;
    }
};

const void* resolve_code(const os::CodeRef& ref) {
    static std::map<std::pair<std::uint64_t, std::uint64_t>, const void*> cache;
    auto key = std::make_pair(ref.module, ref.offset);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    const void* p = os::code_ref_resolve(ref);
    if (!p)
        throw Error("mpservice: the pool worker cannot find the task's function in its program (a different "
                    "build, or a library loaded only in the parent?)");
    cache.emplace(key, p);
    return p;
}

void read_lane_handles(os::handle_t lane, std::uint32_t n, std::vector<os::handle_t>& out) {
    while (out.size() < n) {
        char byte;
        long got = os::channel_read(lane, &byte, 1, &out, false);
        if (got <= 0) throw Error("mpservice: the pool's handle channel closed");
    }
}

}  // namespace

void ItemSink::begin(std::uint32_t local) {
    auto* l = static_cast<WorkerLink*>(link);
    l->slot->index.store(l->cur.base + local, std::memory_order_release);
    if (!out_.handles().empty()) out_ = Encoder();
    out_.bytes().clear();
}

void ItemSink::commit_value() {
    auto* l = static_cast<WorkerLink*>(link);
    if (!out_.handles().empty()) {
        commit_error(std::make_exception_ptr(std::invalid_argument(
            "mpservice: a pool task's result cannot hold OS handles (a Queue, Lock, Value, ...)")));
        return;
    }
    l->append(record_value, out_.bytes());
    ++l->cur.next_local;
}

void ItemSink::commit_dense(const void* value, std::uint32_t size) {
    auto* l = static_cast<WorkerLink*>(link);
    l->append_dense(value, size);
    ++l->cur.next_local;
}

void ItemSink::commit_error(const std::exception_ptr& e) {
    auto* l = static_cast<WorkerLink*>(link);
    Encoder enc;
    try {
        encode_exception(enc, e);
    } catch (...) {
        enc = Encoder();
        encode_exception(enc, std::make_exception_ptr(Error("mpservice: the task's exception could not be encoded")));
    }
    l->append(record_error, enc.bytes());
    ++l->cur.next_local;
}

PoolWorkerParts::~PoolWorkerParts() { os::close_handle(lane); }

const void* resolve_initializer(const PoolWorkerBoot& b) { return resolve_code(b.p->initializer); }

void serve_pool_tasks(const PoolWorkerBoot& b, void* state) {
    const PoolWorkerParts& boot = *b.p;
    WorkerLink link;
    link.results = boot.results;
    link.attach(static_cast<PoolSlot*>(boot.slot.data()));
    PoolSlot& slot = *link.slot;
    slot.ready.store(1, std::memory_order_release);
    QueueCore tasks = boot.tasks;
    std::string msg;
    for (std::uint64_t done = 0; boot.maxtasks == 0 || done < boot.maxtasks; ++done) {
        spin_for_item(tasks, worker_spin, [&] { return tasks.closed(); });
        if (tasks.get(&copy_item, &msg, os::no_deadline) != QueueCore::Status::ok) break;  // closed: the pool is done
        if (msg.size() < sizeof(PoolTaskHeader)) throw Error("mpservice: a torn pool task");
        PoolTaskHeader th;
        std::memcpy(&th, msg.data(), sizeof th);
        std::vector<os::handle_t> handles;
        if (th.nhandles) read_lane_handles(boot.lane, th.nhandles, handles);

        // Start of the chunk: the slot says which one, and that no item runs yet.
        slot.used.store(0, std::memory_order_relaxed);
        slot.header.chunk = th.chunk;
        slot.header.first = th.base;
        slot.index.store(no_item, std::memory_order_relaxed);
        slot.chunk.store(th.chunk, std::memory_order_release);
        link.start_message(th.base);

        ItemSink sink;
        sink.link = &link;
        sink.cur = &link.cur;
        try {
            const void* fn = th.fn_module ? resolve_code(os::CodeRef{th.fn_module, th.fn_offset}) : nullptr;
            auto runner = reinterpret_cast<ChunkRunner>(
                reinterpret_cast<std::uintptr_t>(resolve_code(os::CodeRef{th.runner_module, th.runner_offset})));
            Decoder d(msg.data() + sizeof th, msg.size() - sizeof th, &handles);
            runner(fn, state, d, th.count, sink);
        } catch (...) {
            // The arguments could not be decoded (or the function found): the
            // items without an outcome fail with that error.
            auto e = std::current_exception();
            for (std::uint32_t i = link.cur.next_local; i < th.count; ++i) {
                sink.begin(i);
                sink.commit_error(e);
            }
        }
        link.flush();
        wire::close_all(handles);
    }
}

PoolResultState::PoolResultState() { name = "AsyncResult"; }

void PoolResultState::read_from(const Shared<PoolCore>& pool) { pool_ = pool.shared(); }

bool PoolResultState::wait_until(os::Deadline deadline) const {
    if (done_relaxed()) return true;
    if (auto pool = pool_.lock())
        return pool->serve_until([this] { return done_relaxed(); }, deadline,
                                 [this](os::Deadline d) { FutureCore::wait_until(d); });
    return FutureCore::wait_until(deadline);  // the pool is gone: it resolved every result first
}

void log_callback_error(const std::exception_ptr& e) {
    std::string what = "unknown exception";
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        what = x.what();
    } catch (...) {
    }
    get_logger("mpservice.pool").error("a result callback threw: " + what);
}

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

// ---------------------------------------------------------------- parent side

/// What a worker's exit hook needs: no pointer to the pool itself (the hook
/// runs on the reactor thread, which must never end up destroying a pool).
struct PoolDoorbell {
    QueueCore results;
    std::atomic<int> deaths{0};
    // The result thread's tick: a death or stop() wakes it before its timeout.
    std::mutex tick_mutex;
    std::condition_variable tick;
    /// Wakes a reader blocked on the ring (a waiting caller) and the result thread.
    void ring() noexcept {
        {
            std::lock_guard<std::mutex> lk(tick_mutex);
        }
        tick.notify_all();
        PoolResultHeader h{pool_result_wake, 0, 0};
        try {
            results.put(&h, sizeof h, os::Clock::now());  // a full ring wakes the thread anyway
        } catch (...) {
        }
    }
};

/// Outcomes to hand to jobs outside the pool's lock, in batches per job.
/// The bytes are the result message's (valid until delivered) or, for outcomes
/// read from a dead worker's slot, copies kept here.
struct PoolDeliveries {
    std::deque<std::string> keep;  // a deque: strings never move (their data must not)
    std::vector<std::pair<std::shared_ptr<JobBase>, std::vector<JobItem>>> batches;
    std::vector<std::pair<std::shared_ptr<JobBase>, JobRecords>> runs;  // records in place, per message

    void add(const std::shared_ptr<JobBase>& job, JobItem item) {
        if (batches.empty() || batches.back().first != job) batches.emplace_back(job, std::vector<JobItem>());
        batches.back().second.push_back(std::move(item));
    }
};

struct PoolCore::State {
    enum class Phase { running, closing, terminated };

    struct Chunk {
        std::shared_ptr<JobBase> job;
        std::size_t job_first = 0;
        std::uint32_t count = 0;
        std::uint32_t next = 0;  // the items before it have an outcome
        PoolTarget target;
        std::string args;
        std::vector<std::uint32_t> offsets;
        std::uint32_t stride = 0;
        /// Where item i's arguments start in args (see ChunkDraft).
        std::size_t item_offset(std::uint32_t i) const noexcept {
            if (i >= count) return args.size();
            return stride ? pool_task_room + std::size_t(i) * stride : offsets[i];
        }
        std::vector<os::handle_t> handles;  // owned copies
        int worker = -1;
        ~Chunk() { wire::close_all(handles); }
        Chunk() = default;
        Chunk(const Chunk&) = delete;
        Chunk& operator=(const Chunk&) = delete;
    };

    struct WorkerRec {
        std::unique_ptr<Process<void>> proc;
        QueueCore tasks;
        SharedMemory slot;
        os::handle_t lane = os::invalid_handle;
        std::deque<std::uint64_t> outstanding;
        std::uint64_t sent = 0;
        bool ended = true;
        bool ring_closed = false;
        std::shared_ptr<std::atomic<bool>> dead;
        ~WorkerRec() { os::close_handle(lane); }
    };

    WorkerFactory factory;
    std::shared_ptr<PoolDoorbell> bell;
    mutable std::mutex mutex;
    std::condition_variable changed;
    Phase phase = Phase::running;
    std::exception_ptr broken;
    int failed_starts = 0;
    std::unordered_map<std::uint64_t, std::unique_ptr<Chunk>> chunks;
    std::deque<std::uint64_t> pending;
    std::deque<WorkerRec> workers;  // a deque: records never move
    std::uint64_t next_chunk = 1;
    std::thread thread;
    std::atomic<bool> stop{false};
    // The reader role: who holds it takes result messages off the ring and
    // books them (in ring order, so a chunk's messages are booked in the order
    // its worker sent them); deliveries happen after it is released.
    std::mutex reader;
    std::atomic<int> waiting{0};  // callers in serve_until
    std::atomic<bool> warm_starts{false};  // a replacement took a warm start (its spawner keeps a child)
};

namespace {
using State = PoolCore::State;

bool is_remote_error(const std::exception_ptr& e) {
    try {
        std::rethrow_exception(e);
    } catch (const RemoteError&) {
        return true;
    } catch (...) {
    }
    return false;
}

std::string error_text(const std::exception_ptr& e) {
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        return x.what();
    } catch (...) {
    }
    return "unknown error";
}

/// Deliveries for items [from, to) of `c`, all failing with `e`.
void fail_items(State::Chunk& c, std::uint32_t from, std::uint32_t to, const std::exception_ptr& e,
                PoolCore::Deliveries& out) {
    for (std::uint32_t i = from; i < to; ++i) out.add(c.job, JobItem{c.job_first + i, record_error, nullptr, 0, e});
}

void deliver(PoolCore::Deliveries& out) {
    for (auto& [job, run] : out.runs) job->on_records(run);
    out.runs.clear();
    for (auto& [job, items] : out.batches) job->on_items(items.data(), items.size());
    out.batches.clear();
    out.keep.clear();
}

}  // namespace

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

void PoolCore::maybe_finish_locked() {
    State& s = *s_;
    if (s.phase != State::Phase::closing || !s.pending.empty()) return;
    for (auto& w : s.workers)
        if (!w.outstanding.empty()) return;
    for (auto& w : s.workers)
        if (w.proc && !w.ended && !w.ring_closed) {
            w.tasks.close();  // the worker drains its ring, finds it closed and exits
            w.ring_closed = true;
        }
}

void PoolCore::complete_locked(std::uint64_t id) {
    State& s = *s_;
    auto it = s.chunks.find(id);
    if (it == s.chunks.end()) return;
    int wi = it->second->worker;
    if (wi >= 0) {
        auto& out = s.workers[static_cast<std::size_t>(wi)].outstanding;
        out.erase(std::remove(out.begin(), out.end(), id), out.end());
    }
    s.chunks.erase(it);
}

void PoolCore::book_results(const unsigned char* p, std::size_t n, Deliveries& out) {
    State& s = *s_;
    if (n < sizeof(PoolResultHeader)) return;
    PoolResultHeader h;
    std::memcpy(&h, p, sizeof h);
    if (h.kind != pool_result_records) return;
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        auto it = s.chunks.find(h.chunk);
        if (it == s.chunks.end()) return;  // terminated meanwhile
        State::Chunk& c = *it->second;
        // Count the records (their headers only); the job decodes them later,
        // outside every lock, straight from the message.
        std::uint32_t after = walk_records(p + sizeof h, n - sizeof h, h.first,
                                           [](std::uint32_t, std::uint32_t, const unsigned char*, std::size_t) {});
        std::uint32_t end = std::min<std::uint32_t>(after, c.count);
        if (end > c.next) {
            out.runs.emplace_back(c.job, JobRecords{c.job_first, h.first, c.next, end, p + sizeof h, n - sizeof h});
            c.next = end;
        }
        if (c.next >= c.count) {
            complete_locked(h.chunk);
            dispatch_locked();
            maybe_finish_locked();
            s.changed.notify_all();
        }
    }
}

std::vector<const void*> PoolCore::dead_workers() const {
    State& s = *s_;
    std::lock_guard<std::mutex> lk(s.mutex);
    std::vector<const void*> dead;
    for (auto& w : s.workers)
        if (w.proc && !w.ended && w.dead->load(std::memory_order_acquire)) dead.push_back(w.dead.get());
    return dead;
}

void PoolCore::handle_deaths(const std::vector<const void*>& dead, Deliveries& out) {
    State& s = *s_;
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        for (std::size_t i = 0; i < s.workers.size(); ++i) {
            State::WorkerRec& w = s.workers[i];
            // Only deaths seen before the ring was drained: a worker that died
            // since may have sent outcomes that are not taken yet (its death
            // rang the bell again, so it is handled next round).
            if (!w.proc || w.ended || std::find(dead.begin(), dead.end(), w.dead.get()) == dead.end()) continue;
            w.ended = true;
            reconcile_locked(i, out);
        }
        dispatch_locked();
        maybe_finish_locked();
        s.changed.notify_all();
    }
}

void PoolCore::reconcile_locked(std::size_t wi, Deliveries& out) {
    State& s = *s_;
    State::WorkerRec& w = s.workers[wi];
    int code = w.proc->exitcode().value_or(0);
    std::exception_ptr werr = w.proc->core().error();
    auto* slot = static_cast<PoolSlot*>(w.slot.data());
    bool was_ready = slot->ready.load(std::memory_order_acquire) != 0;
    std::uint64_t running = slot->chunk.load(std::memory_order_acquire);
    std::uint32_t index = slot->index.load(std::memory_order_acquire);
    std::uint32_t used = std::min(slot->used.load(std::memory_order_acquire), slot_record_bytes);

    std::string how = werr ? error_text(werr)
                           : (w.proc->name() + " (pid " + std::to_string(w.proc->pid()) + ") exited with code " +
                              std::to_string(code));
    auto task_error = std::make_exception_ptr(
        ProcessError("mpservice: the " + settings_.kind + " worker died while running this task: " + how, code));

    std::vector<std::uint64_t> resend;
    for (std::uint64_t id : w.outstanding) {
        auto it = s.chunks.find(id);
        if (it == s.chunks.end()) continue;
        State::Chunk& c = *it->second;
        c.worker = -1;
        if (id == running) {
            // The outcomes of the finished items still in the slot...
            const std::string& kept =
                out.keep.emplace_back(reinterpret_cast<const char*>(slot->records()), used);
            walk_records(reinterpret_cast<const unsigned char*>(kept.data()), kept.size(), slot->header.first,
                         [&](std::uint32_t i, std::uint32_t kind, const unsigned char* data, std::size_t size) {
                                if (i < c.next || i >= c.count) return;
                                out.add(c.job, JobItem{c.job_first + i, kind, data, size, nullptr});
                                c.next = i + 1;
                            });
            // ...and the one that was running when the worker died fails, once.
            if (index != no_item && index == c.next && c.next < c.count) {
                fail_items(c, c.next, c.next + 1, task_error, out);
                ++c.next;
            }
        }
        if (c.next < c.count) {
            resend.push_back(id);
        } else {
            s.chunks.erase(it);
        }
    }
    w.outstanding.clear();
    s.pending.insert(s.pending.begin(), resend.begin(), resend.end());

    // Should the worker be replaced?
    bool init_failed = !was_ready && werr != nullptr;
    s.failed_starts = init_failed ? s.failed_starts + 1 : 0;
    if (!s.broken && s.phase != State::Phase::terminated) {
        if (init_failed && is_remote_error(werr)) {
            // The initializer (a runner's constructor) threw: every new
            // worker would fail the same way.
            s.broken = werr;
        } else if (!settings_.replace_dead_workers && !(s.phase == State::Phase::closing && code == 0 && !werr)) {
            s.broken = std::make_exception_ptr(ProcessError(
                "mpservice: the " + settings_.kind + "'s process has died (" + how + "); it serves no more calls",
                code));
        } else if (init_failed && s.failed_starts >= 3) {
            s.broken = werr;  // the workers keep dying before they are ready
        }
    }
    if (s.broken) {
        fail_all_locked(s.broken, out);
        return;
    }
    if (s.phase == State::Phase::terminated || !settings_.replace_dead_workers) return;
    if (s.phase == State::Phase::closing && s.pending.empty()) return;
    try {
        start_worker(wi, true);
    } catch (...) {
        s.broken = std::current_exception();
        fail_all_locked(s.broken, out);
    }
}

void PoolCore::fail_all_locked(const std::exception_ptr& e,
                               Deliveries& out) {
    State& s = *s_;
    for (auto& [id, c] : s.chunks) fail_items(*c, c->next, c->count, e, out);
    s.chunks.clear();
    s.pending.clear();
    for (auto& w : s.workers) w.outstanding.clear();
}

bool PoolCore::read_results(os::Deadline deadline, Deliveries& out) {
    State& s = *s_;
    PoolDoorbell& bell = *s.bell;
    auto take = [&](os::Deadline d) {
        // Read into a string the deliveries keep: their items point into it.
        std::string& msg = out.keep.emplace_back();
        if (bell.results.get(&copy_item, &msg, d) != QueueCore::Status::ok) {
            out.keep.pop_back();
            return false;
        }
        book_results(reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), out);
        return true;
    };
    auto deaths = [&] {
        if (!bell.deaths.exchange(0, std::memory_order_acq_rel)) return;
        // Whatever the dead workers sent before they died is in the ring: book it first.
        auto dead = dead_workers();
        while (take(os::Clock::now())) {
        }
        handle_deaths(dead, out);
    };
    deaths();
    bool got = take(deadline);
    deaths();  // a death's bell may be what woke the get
    return got;
}

bool PoolCore::serve_until(const std::function<bool()>& done, os::Deadline deadline,
                           const std::function<void(os::Deadline)>& sleep) {
    State& s = *s_;
    struct Waiting {
        std::atomic<int>& n;
        explicit Waiting(std::atomic<int>& c) : n(c) { n.fetch_add(1, std::memory_order_acq_rel); }
        ~Waiting() { n.fetch_sub(1, std::memory_order_acq_rel); }
    } waiting{s.waiting};
    while (!done()) {
        auto now = os::Clock::now();
        if (now >= deadline) return done();
        if (s.reader.try_lock()) {
            Deliveries out;
            {
                std::lock_guard<std::mutex> role(s.reader, std::adopt_lock);
                try {
                    spin_for_item(s.bell->results, caller_spin, [&] {
                        return done() || s.bell->deaths.load(std::memory_order_relaxed) != 0;
                    });
                    // In slices: what we wait for may also be resolved by
                    // terminate() in another thread.
                    read_results(std::min(deadline, now + reader_slice), out);
                } catch (...) {
                    log_callback_error(std::current_exception());
                }
            }
            deliver(out);
        } else {
            // Another thread reads and delivers (to us as well); look again soon.
            sleep(std::min(deadline, now + follower_slice));
        }
    }
    return true;
}

void PoolCore::result_loop() {
    State& s = *s_;
    PoolDoorbell& bell = *s.bell;
    for (;;) {
        // Callers that wait read their own results; this thread takes what
        // nobody waits for (callbacks, imap buffers, deaths) on a tick.
        bool busy;
        {
            std::lock_guard<std::mutex> lk(s.mutex);
            busy = !s.chunks.empty();
        }
        auto tick = busy && s.waiting.load(std::memory_order_acquire) == 0 ? busy_tick : idle_tick;
        {
            std::unique_lock<std::mutex> lk(bell.tick_mutex);
            bell.tick.wait_for(lk, tick, [&] {
                return s.stop.load(std::memory_order_acquire) || bell.deaths.load(std::memory_order_acquire) != 0;
            });
        }
        if (s.stop.load(std::memory_order_acquire)) return;
        if (!s.reader.try_lock()) continue;  // a caller reads
        Deliveries out;
        {
            std::lock_guard<std::mutex> role(s.reader, std::adopt_lock);
            try {
                for (int i = 0; i < 256 && read_results(os::Clock::now(), out); ++i) {
                }
            } catch (...) {
                log_callback_error(std::current_exception());
            }
        }
        try {
            deliver(out);
        } catch (...) {
            log_callback_error(std::current_exception());
        }
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

void Codec<detail::PoolWorkerBoot>::encode(Encoder& e, const detail::PoolWorkerBoot& boot) {
    const detail::PoolWorkerParts& b = *boot.p;
    e.write(b.tasks.memory());
    e.write(b.results.memory());
    e.write(b.slot);
    e.write(e.attach(b.lane));
    e(b.initializer.module, b.initializer.offset, b.maxtasks);
}

detail::PoolWorkerBoot Codec<detail::PoolWorkerBoot>::decode(Decoder& d) {
    detail::PoolWorkerBoot boot;
    detail::PoolWorkerParts& b = *boot.p;
    b.tasks = detail::QueueCore::attach(d.read<detail::SharedMemory>(), detail::QueueKind::simple, detail::task_tag);
    b.results =
        detail::QueueCore::attach(d.read<detail::SharedMemory>(), detail::QueueKind::simple, detail::result_tag);
    b.slot = d.read<detail::SharedMemory>();
    if (b.slot.size() < sizeof(detail::PoolSlot)) throw DecodeError("decode: pool slot too small");
    b.lane = detail::os::duplicate_handle(d.handle(d.read<std::uint32_t>()));
    d(b.initializer.module, b.initializer.offset, b.maxtasks);
    return boot;
}

}  // namespace mpservice
