// pool_internal: what the Pool's parts share - the layout of the shared memory
// between a pool and its workers, and the parent's state of a pool.
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
//
// pool_worker.cpp is the worker loop (child side); pool.cpp starts, feeds and
// stops the workers; pool_results.cpp reads the results and reckons with dead
// workers.

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

inline void copy_item(void* context, const unsigned char* data, std::size_t size) {
    static_cast<std::string*>(context)->assign(reinterpret_cast<const char*>(data), size);
}

}  // namespace

// ---------------------------------------------------------------- the parent's state of a pool

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

/// Hands the collected outcomes to their jobs (outside the pool's lock).
inline void deliver(PoolCore::Deliveries& out) {
    for (auto& [job, run] : out.runs) job->on_records(run);
    out.runs.clear();
    for (auto& [job, items] : out.batches) job->on_items(items.data(), items.size());
    out.batches.clear();
    out.keep.clear();
}

}  // namespace detail
}  // namespace mpservice
