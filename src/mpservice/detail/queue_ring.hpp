// queue_ring: the untyped engine under Queue<T>, SimpleQueue<T> and JoinableQueue<T>.
//
// One block of shared memory holds a header and a byte ring.  Items travel as
// encoded bytes in *records* (8-byte aligned, never straddling the ring's end):
//
//     whole  [len u32 | kind u32 | payload ...]            an item that fits in half the ring
//     first  [len u32 | kind u32 | total u64 | payload]    first chunk of a larger item
//     cont   [len u32 | kind u32 | payload ...]            a middle chunk ("last" for the final one)
//     pad    [len u32 | kind u32 | skipped ...]            fills the ring's end so records stay contiguous
//
// Producers are serialized by one robust mutex (the put lock), consumers by another
// (the get lock): between them the ring behaves as a single-producer single-consumer
// ring whose positions (tail, head) are published with release stores.  Each side
// commits its positions and counters through a small journal (see commit_put /
// commit_get), so a process killed between two stores leaves a commit the next
// holder of the lock finishes ("rolls forward").
//
// Unbounded in bytes (the default: no byte capacity given).  The ring is a sparse
// reservation of unbounded_reserve bytes (a memfd of that size: pages exist only
// once written), so a put never waits for room.  To keep the pages it touches few
// and warm, a producer that finds the queue empty once it is past the first
// hot_bytes of the ring starts the next cycle at the ring's start (a pad record),
// and gives back the pages it wrote past them.  A consumer that falls behind
// lets the producers run on into fresh pages, and gives those back as it
// consumes them (in batches, holding both locks: the pages given back lie below
// the committed head, so neither a crash nor a producer can be hurt by it).
//
// Parked items.  A get that reaches its timeout in the middle of a streamed
// item (its producer is stopped, or slow) keeps the part it received in its
// process and records the item in the header, then reports the timeout.  The
// next get in that process continues the item where it stopped.  A get in
// another process finds the rest of a parked item at the head: it waits (within
// its own timeout) until the parking process has taken it - or, if that
// process has ended, drops the rest, as for a consumer killed mid-item.
//
// Waiting: futex words with a "sleepers" flag.  A waiter spins briefly, then sets
// the flag and sleeps; a notifier pays a system call only if the flag is set and
// clears it when it wakes everyone, so a waiter killed while asleep does not leave
// the notifiers paying for a wake-up forever.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "os.hpp"
#include "shm.hpp"

namespace mpservice::detail {

/// A futex word plus the flag that says someone may sleep on it.
struct alignas(64) QueueWaitWord {
    std::atomic<std::uint32_t> seq{0};
    std::atomic<std::uint32_t> sleepers{0};
};

/// Everything that lives at the start of a queue's shared block.  Trivially
/// destructible: nobody knows which process is the last one to leave.
struct QueueHeader {
    // ---- set once by the creator, read-only afterwards
    std::uint32_t magic = 0;
    std::uint32_t kind = 0;       // QueueKind
    std::uint64_t type_tag = 0;   // which T the queue carries (a hash of its type name)
    std::uint64_t capacity = 0;   // ring bytes, a multiple of 64
    std::uint64_t maxsize = 0;    // item bound, 0 = none
    std::uint64_t ring_offset = 0;
    std::uint64_t uid = 0;        // tells queues apart within a process (parked items)
    // 0 for a ring bounded in bytes.  Otherwise the ring is a large sparse
    // reservation (`capacity`) of which only the first `hot_bytes` are reused
    // cycle after cycle; see "Unbounded in bytes" above.
    std::uint64_t hot_bytes = 0;

    alignas(64) std::atomic<std::uint32_t> closed{0};

    // ---- producers' private state, guarded by put_lock
    alignas(64) os::RobustMutex put_lock;
    std::uint64_t head_cache = 0;  // a lower bound of `head`, saves reading the consumers' line
    std::uint64_t j_tail = 0, j_completed = 0;
    std::atomic<std::uint32_t> j_put_active{0};
    // Unbounded in bytes: the next position at which a producer past the hot
    // part looks whether the queue is empty (to start the next cycle early).
    // Looking reads the consumers' line; once per page is enough.
    std::uint64_t wrap_check_at = 0;
    // Unbounded in bytes: pages of positions below this (in its ring cycle,
    // beyond the hot part) were given back.  Changed only with the put lock held.
    std::atomic<std::uint64_t> released{0};

    // ---- published by producers, read by consumers
    alignas(64) std::atomic<std::uint64_t> tail{0};       // bytes ever published
    std::atomic<std::uint64_t> completed{0};              // items ever published completely
    std::atomic<std::uint64_t> streaming{0};              // id of the chunked item in progress, 0 = none

    // ---- consumers' private state, guarded by get_lock
    alignas(64) os::RobustMutex get_lock;
    std::uint64_t tail_cache = 0;  // a lower bound of `tail`
    std::uint64_t j_head = 0, j_taken = 0;
    std::atomic<std::uint32_t> j_get_active{0};
    // Unbounded in bytes: the next position at which a consumer past the hot
    // part looks whether pages can be given back (reading the producers' line:
    // once per page is enough).
    std::uint64_t release_check_at = 0;
    // A streamed item a get left half-received at its timeout (see "Parked
    // items"): its id and the process that holds the part received.
    std::atomic<std::uint64_t> parked_item{0};
    std::atomic<std::int64_t> parked_pid{0};

    // ---- published by consumers, read by producers
    alignas(64) std::atomic<std::uint64_t> head{0};       // bytes ever consumed
    std::atomic<std::uint64_t> taken{0};                  // items ever taken completely

    // ---- JoinableQueue
    alignas(64) std::atomic<std::uint64_t> tasks_done{0};

    QueueWaitWord data;    // "a record was published" and "the queue was closed"
    QueueWaitWord space;   // "a record was consumed" and "the queue was closed"
    QueueWaitWord joined;  // "task_done was called"
};

enum class QueueKind : std::uint32_t { queue = 1, simple = 2, joinable = 3 };

/// A per-process handle to one shared queue of bytes.  Copies share the queue.
class QueueCore {
public:
    enum class Status { ok, timeout, closed };
    /// Called with the bytes of one item (valid only during the call).
    using Consume = void (*)(void* context, const unsigned char* data, std::size_t size);

    QueueCore() = default;
    MPSERVICE_API static QueueCore create(QueueKind kind, std::uint64_t type_tag, std::size_t maxsize,
                                          std::size_t capacity_bytes);
    /// Attaches to a queue that arrived from another process; checks that it is a
    /// queue of this kind and item type.
    MPSERVICE_API static QueueCore attach(SharedMemory memory, QueueKind kind, std::uint64_t type_tag);

    /// Puts one item's bytes: ok, timeout (no room before `deadline`) or closed.
    MPSERVICE_API Status put(const void* data, std::size_t size, os::Deadline deadline);
    /// Takes one item and hands its bytes to `consume`: ok, timeout (nothing
    /// before `deadline`) or closed (closed and drained).  An exception from
    /// `consume` propagates; the item is consumed all the same.
    Status get(Consume consume, void* context, os::Deadline deadline) {
        std::size_t taken = 0;
        return get_many(consume, context, 1, taken, deadline);
    }

    /// Gives the bytes of item `index` of a batch being put: sets *data and
    /// *size, valid until the next call.  May throw (the batch stops there).
    using Source = void (*)(void* context, std::size_t index, const void** data, std::size_t* size);
    /// Puts items [0, count) of a batch in order, holding the put lock once and
    /// publishing them with one commit - more only where it must: before waiting
    /// for room (so consumers can make it) and around an item streamed in chunks.
    /// `done` is the number put, always a prefix of the batch: ok (all),
    /// timeout or closed (the rest was not put).  An exception from `source`
    /// propagates after the items before it are published.
    MPSERVICE_API Status put_many(Source source, void* context, std::size_t count, std::size_t& done,
                                  os::Deadline deadline);
    /// Takes up to `max_items` items (at least 1 unless it returns timeout or
    /// closed), waiting for the first until `deadline` but not for the others:
    /// it takes whole items that are already there, in order, hands each to
    /// `consume`, and takes them off the ring with one commit.  A streamed item
    /// (larger than half the ring) comes alone.  `taken` is the number handed
    /// over.  An exception from `consume` propagates; that item and the ones
    /// before it are consumed.
    MPSERVICE_API Status get_many(Consume consume, void* context, std::size_t max_items, std::size_t& taken,
                                  os::Deadline deadline);

    MPSERVICE_API std::size_t qsize() const noexcept;
    MPSERVICE_API bool full() const noexcept;
    std::size_t maxsize() const noexcept { return static_cast<std::size_t>(h_->maxsize); }
    std::size_t capacity() const noexcept { return static_cast<std::size_t>(h_->capacity); }
    /// The byte bound the queue was made with, 0 for none.
    std::size_t byte_bound() const noexcept { return h_->hot_bytes ? 0 : static_cast<std::size_t>(h_->capacity); }
    MPSERVICE_API void close() noexcept;
    bool closed() const noexcept { return h_->closed.load(std::memory_order_acquire) != 0; }

    /// JoinableQueue: marks one taken item done; throws std::invalid_argument
    /// when called more often than items were put.
    MPSERVICE_API void task_done();
    /// JoinableQueue: true once every item put has been marked done.
    MPSERVICE_API bool join(os::Deadline deadline);

    const SharedMemory& memory() const noexcept { return mem_; }
    explicit operator bool() const noexcept { return h_ != nullptr; }

    /// A per-thread buffer reused for encoding items (no allocation per put).
    MPSERVICE_API static std::string& encode_buffer();
    /// A stable tag for a type name (FNV-1a).
    static std::uint64_t tag_of(const char* name) noexcept {
        std::uint64_t h = 1469598103934665603ull;
        for (; *name; ++name) h = (h ^ static_cast<unsigned char>(*name)) * 1099511628211ull;
        return h;
    }

private:
    enum class Taken { delivered, discarded, parked };

    /// Pads the ring's end if a record of `bytes` would cross it (advancing
    /// `tail`), then waits until the record fits.
    Status make_room(std::uint64_t& tail, std::uint64_t bytes, os::Deadline deadline);
    Status put_chunked(const void* data, std::size_t size, os::Deadline deadline);
    /// Waits (holding the put lock) until the item bound leaves room for one more
    /// than `pending` uncommitted items: ok, timeout or closed.
    Status wait_below_maxsize(std::uint64_t pending, os::Deadline deadline);
    /// Takes, after the whole record just consumed at `head` (ending at `next`),
    /// the whole records that follow, up to `max_items` in all; commits once.
    std::size_t take_following(std::uint64_t next, std::uint64_t taken, std::size_t max_items, Consume consume,
                               void* context);
    bool wait_for_room(std::uint64_t tail, std::uint64_t bytes, os::Deadline deadline, bool give_up_on_close);
    void write_pad(std::uint64_t tail, std::uint64_t bytes);
    void commit_put(std::uint64_t tail, std::uint64_t completed) noexcept;
    void commit_get(std::uint64_t head, std::uint64_t taken) noexcept;
    void recover_put() noexcept;
    void recover_get() noexcept;
    void probe_producers() noexcept;
    void probe_consumers() noexcept;
    /// Unbounded in bytes: true if a producer at `tail` should start the ring's
    /// next cycle now (past the hot part, queue empty - or emptied by
    /// consumers that were taking the items, see wait_for_drain).
    bool should_wrap_early(std::uint64_t tail, os::Deadline deadline) noexcept;
    /// Past the hot part with items queued (`head` < `tail`): waits, spinning
    /// and yielding, while the consumers keep taking items, for the ring to
    /// empty (true), so that the next cycle reuses the warm pages at the
    /// ring's start.  Running on instead writes fresh pages - an allocation,
    /// zeroing and a later release per 4 KiB, about 5 us on the VMs measured,
    /// more than the copy of the four 1 KiB items a page holds - and a
    /// consumer slower than its producer would keep it doing so.  Consumers
    /// that stall (stopped, dead, or this very thread) end the wait within
    /// drain_stall, and this handle waits again only drain_retry_bytes later;
    /// the wait never exceeds drain_wait_limit nor the put's deadline.  Put lock held.
    bool wait_for_drain(std::uint64_t tail, std::uint64_t head, os::Deadline deadline) noexcept;
    /// Starts the next cycle at `tail` (a pad to the ring's end; the pages past
    /// the hot part given back); advances `tail`.  Put lock held.
    void wrap_early(std::uint64_t& tail) noexcept;
    /// Whether a producer at `tail` is due to look at should_wrap_early (put lock held).
    bool wrap_check_due(std::uint64_t tail) const noexcept {
        return offset(tail) >= wrap_from_ && tail >= h_->wrap_check_at;
    }
    /// Whether a consumer whose head moved to `head` is due to call release_consumed (get lock held).
    bool release_check_due(std::uint64_t head) const noexcept {
        return offset(head) >= release_from_ && head >= h_->release_check_at;
    }
    /// Gives back the pages of this cycle, past the hot part, below `below`
    /// (a position no process reads or writes any more); needs the put lock.
    void release_pages_below(std::uint64_t below) noexcept;
    /// A consumer's chance to give back what it consumed: with the put lock if free.
    void release_consumed() noexcept;
    /// Unbounded in bytes: maps, in this process, the pages from `tail` on
    /// that a producer is about to write - a batch per system call.  A
    /// producer running ahead of its consumers writes fresh pages all the
    /// time, and a fault per 4 KiB cost more than the copy of a 1 KiB item.
    void map_ahead_for_write(std::uint64_t tail, std::uint64_t bytes) noexcept;
    /// The same for a consumer at `head`: the committed pages it is about to read.
    void map_ahead_for_read(std::uint64_t head) noexcept;
    bool read_map_due(std::uint64_t head) const noexcept { return head + 64 > read_mapped_to_; }
    Taken read_chunked(std::uint64_t head, std::string& out, os::Deadline deadline);
    /// Receives the rest of item `id` (`received` of `total` bytes in `out`).
    Taken continue_chunked(std::uint64_t head, std::uint64_t id, std::uint64_t received, std::uint64_t total,
                           std::string& out, os::Deadline deadline);
    /// A parked item at the head: resumes it (ours), waits for its process
    /// (someone else's), or drops it (its process ended).  Holding the get lock.
    enum class ParkedAction { none, resumed, dropped, wait };
    ParkedAction handle_parked(std::string& out, std::uint64_t& total, os::Deadline deadline, Taken& result);
    /// Where `position` falls in the ring.  A 64-bit division costs ~25-40 cycles,
    /// as much as the rest of an uncontended put: a ring whose capacity is a power
    /// of two (the default) takes a mask instead.
    std::uint64_t offset(std::uint64_t position) const noexcept {
        return mask_ ? position & mask_ : position % h_->capacity;
    }
    unsigned char* at(std::uint64_t position) const noexcept { return ring_ + offset(position); }
    /// The per-handle copies of the header's limits (see set_limits).
    void set_limits() noexcept;

    SharedMemory mem_;
    QueueHeader* h_ = nullptr;
    unsigned char* ring_ = nullptr;
    std::uint64_t mask_ = 0;  // capacity - 1 when the capacity is a power of two, else 0
    std::uint64_t whole_limit_ = 0;   // larger records are streamed in chunks...
    std::uint64_t chunk_bytes_ = 0;   // ...of this size
    std::uint64_t wrap_from_ = ~std::uint64_t(0);     // unbounded: offset past which a producer may wrap early
    std::uint64_t release_from_ = ~std::uint64_t(0);  // unbounded: offset past which consumers give pages back
    // Unbounded: positions up to which this process has mapped the ring's pages
    // ahead of its writes / reads (bounded rings are mapped whole at attach).
    std::uint64_t write_mapped_to_ = ~std::uint64_t(0);
    std::uint64_t read_mapped_to_ = ~std::uint64_t(0);
    bool kept_mapped_for_write_ = false;  // this process has mapped the kept pages (see map_ahead_for_write)
    bool kept_mapped_for_read_ = false;
    std::uint64_t drain_retry_at_ = 0;  // wait_for_drain gave up: not before this position again
};

}  // namespace mpservice::detail
