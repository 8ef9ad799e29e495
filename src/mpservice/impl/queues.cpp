// queues: the shared byte ring under Queue<T> (layout and protocol in detail/queue_ring.hpp).
#include <algorithm>
#include <climits>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace mpservice::detail {

namespace {

constexpr std::uint32_t queue_magic = 0x5155455Au;  // "QUEZ"
constexpr std::uint32_t rec_whole = 1, rec_first = 2, rec_cont = 3, rec_last = 4, rec_pad = 5;
constexpr std::uint64_t small_header = 8;   // len u32 + kind u32
constexpr std::uint64_t first_header = 16;  // + total u64
constexpr std::uint64_t min_capacity = 256;
constexpr std::uint64_t max_capacity = std::uint64_t(1) << 40;
constexpr std::uint64_t ring_offset = 4096;  // the ring starts on its own page
// Unbounded in bytes (see queue_ring.hpp): the sparse reservation, the part of it
// reused cycle after cycle, how far past that part pages may stay, and how many
// consumed bytes a consumer lets pile up before it gives their pages back.  The
// reservation costs address space only (4 GiB per queue per process that maps it).
constexpr std::uint64_t unbounded_reserve = std::uint64_t(4) << 30;
constexpr std::uint64_t hot_default = std::uint64_t(1) << 20;
constexpr std::uint64_t keep_past_hot = std::uint64_t(256) << 10;
constexpr std::uint64_t release_batch = std::uint64_t(1) << 20;
// How far ahead a producer or consumer of an unbounded ring maps its pages, in
// one system call (see map_ahead_for_write): pages mapped ahead of the tail
// stay committed until written, so this is also what a queue may hold past its backlog.
constexpr std::uint64_t map_ahead_bytes = std::uint64_t(256) << 10;
// A producer past the hot part with items queued waits for the consumers to
// drain them while they keep taking them (see wait_for_drain): at most this
// long without one being taken (a consumer asleep takes 30-60 us to wake on
// the VMs measured), this long in all, and again only after this many bytes.
constexpr auto drain_stall = std::chrono::microseconds(100);
constexpr auto drain_wait_limit = std::chrono::milliseconds(1);
constexpr std::uint64_t drain_retry_bytes = std::uint64_t(1) << 20;
// A reassembly or encoding buffer larger than this is given back after use.
constexpr std::size_t keep_buffer_bytes = std::size_t(64) << 20;

// A cross-CPU futex wake-up costs ~30 us on the machines we measured, a spin
// hand-off ~0.1 us: spin for a while before sleeping.
constexpr auto spin_budget = std::chrono::microseconds(20);
// A spinning waiter looks at the other side's line once per this many pauses
// (~25 ns each on the machines we measured).  Each look pulls the line from the
// writer's cache, and the writer's next locked instruction then waits for the
// line to come back: polling that line every pause made a 1P1C stream of 8-byte
// items ~25% slower than polling every 8 pauses, which lets the producer publish
// several items per look.
constexpr int spin_pauses = 8;
// How often a sleeper looks whether the other side's lock holder died.
constexpr auto probe_interval = std::chrono::milliseconds(20);

std::uint64_t align8(std::uint64_t n) noexcept { return (n + 7) & ~std::uint64_t(7); }

std::uint64_t power_of_two_mask(std::uint64_t capacity) noexcept {
    return (capacity & (capacity - 1)) == 0 ? capacity - 1 : 0;
}

struct RecordHeader {
    std::uint32_t len;
    std::uint32_t kind;
};

/// A record's bytes in the ring, `to_end` bytes before the ring's end: a pad
/// runs to the end.
std::uint64_t record_size(const RecordHeader& hdr, std::uint64_t to_end) noexcept {
    if (hdr.kind == rec_pad) return to_end;
    return (hdr.kind == rec_first ? first_header : small_header) + align8(hdr.len);
}

[[noreturn]] void corrupt(const char* what) {
    throw Error(std::string("mpservice: queue memory is corrupt (") + what +
                "); was it written by something other than this library?");
}

/// Wakes sleepers on `w` if there may be any, right after a commit: the commit's
/// position store is seq_cst, and so is our load of the flag, which pairs with the
/// fence a waiter issues between raising the flag and re-checking its condition
/// (Dekker): either the waiter sees the new position or we see its flag.
void notify_after_commit(QueueWaitWord& w) noexcept {
    if (w.sleepers.load(std::memory_order_seq_cst) == 0) return;
    w.sleepers.store(0, std::memory_order_relaxed);  // sleepers that stay asleep raise it again
    w.seq.fetch_add(1, std::memory_order_release);
    os::futex_wake(&w.seq, INT_MAX);
}

/// The same after any other change of state.
void notify(QueueWaitWord& w) noexcept {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    notify_after_commit(w);
}

void notify_always(QueueWaitWord& w) noexcept {
    w.sleepers.store(0, std::memory_order_relaxed);
    w.seq.fetch_add(1, std::memory_order_seq_cst);
    os::futex_wake(&w.seq, INT_MAX);
}

/// Waits until pred() or the deadline: spins first, then sleeps on `w` in
/// slices, calling probe() between slices (to notice a dead lock holder).
/// Returns pred() as last seen.
template <class Pred, class Probe>
bool wait_until(QueueWaitWord& w, os::Deadline deadline, Pred&& pred, Probe&& probe) {
    if (pred()) return true;
    const auto spin_start = os::Clock::now();
    for (unsigned i = 1;; ++i) {
        for (int k = 0; k < spin_pauses; ++k) os::cpu_relax();
        if (pred()) return true;
        if ((i & 7) == 0) {
            auto now = os::Clock::now();
            if (now >= deadline) return false;
            if (now - spin_start >= spin_budget) break;
        }
    }
    for (;;) {
        auto now = os::Clock::now();
        if (now >= deadline) return pred();
        // Read the sequence before raising the flag and re-checking: a notify
        // after this read changes it, so futex_wait then returns at once.
        std::uint32_t seq = w.seq.load(std::memory_order_acquire);
        w.sleepers.store(1, std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        if (pred()) return true;
        os::Deadline slice = (deadline - now > probe_interval) ? now + probe_interval : deadline;
        os::futex_wait(&w.seq, seq, slice);
        if (pred()) return true;
        probe();
    }
}

/// Takes a side's lock.  The uncontended case is one call straight into the
/// system: robust_mutex_lock's extra frame and result mapping cost ~10% of an
/// uncontended put.  A busy lock (another producer, or consumer, on this side)
/// is waited for as a busy Lock is (lock_contended): tried at doubling
/// intervals, so that the holder's stream of puts keeps the line in its own
/// cache, and not at all while someone sleeps for it - then we sleep too.
os::LockResult take_lock(os::RobustMutex* m, os::Deadline deadline) {
    int status = os::robust_mutex_trylock_status(m);
    if (status == 0) return os::LockResult::acquired;
    os::LockResult r = os::robust_mutex_trylock_result(status);
    if (r == os::LockResult::owner_died) return r;
    if (!os::robust_mutex_has_sleepers(m)) {
        auto taken = [&] {
            r = os::robust_mutex_trylock(m);
            return r != os::LockResult::busy;
        };
        if (spin_backing_off_for(taken, spin_budget_within(std::chrono::nanoseconds(spin_max_ns), deadline))) return r;
    }
    return os::robust_mutex_lock_blocking(m, deadline);
}

/// Unlocks a robust mutex at scope exit.
class Held {
public:
    explicit Held(os::RobustMutex* m) noexcept : m_(m) {}
    Held(const Held&) = delete;
    Held& operator=(const Held&) = delete;
    ~Held() { release(); }
    void release() noexcept {
        if (!m_) return;
        // Fails only if we do not hold it, which this scope guarantees we do.
        (void)os::robust_mutex_unlock_status(m_);
        m_ = nullptr;
    }

private:
    os::RobustMutex* m_;
};

/// Per-thread buffers (os::thread_object, not thread_local: see there).
struct ReassemblyBuffer {
    std::string bytes;
};
struct EncodeBuffer {
    std::string bytes;
};
std::string& reassembly_buffer() { return os::thread_object<ReassemblyBuffer>().bytes; }

/// The parts of streamed items that gets of this process left half-received at
/// their timeout (see "Parked items" in queue_ring.hpp).
struct ParkedPart {
    std::uint64_t queue = 0;  // QueueHeader::uid
    std::uint64_t item = 0;
    std::uint64_t received = 0;
    std::uint64_t total = 0;
    std::string data;
};
class ParkedParts {
public:
    void put(ParkedPart part) {
        std::lock_guard<std::mutex> g(guard_);
        parts_.push_back(std::move(part));
    }
    bool take(std::uint64_t queue, std::uint64_t item, ParkedPart& out) {
        std::lock_guard<std::mutex> g(guard_);
        for (std::size_t i = 0; i < parts_.size(); ++i) {
            if (parts_[i].queue != queue || parts_[i].item != item) continue;
            out = std::move(parts_[i]);
            parts_.erase(parts_.begin() + static_cast<std::ptrdiff_t>(i));
            return true;
        }
        return false;
    }

private:
    std::mutex guard_;
    std::vector<ParkedPart> parts_;
};
ParkedParts& parked_parts() {
    static ParkedParts* parts = new ParkedParts();  // never destroyed: gets may run at exit
    return *parts;
}

std::uint64_t new_queue_uid() noexcept {
    static std::atomic<std::uint64_t> counter{0};
    std::uint64_t x = static_cast<std::uint64_t>(os::current_pid()) << 40;
    x ^= static_cast<std::uint64_t>(os::Clock::now().time_since_epoch().count());
    x ^= counter.fetch_add(1, std::memory_order_relaxed) * 0x9e3779b97f4a7c15ull;
    return x ? x : 1;
}

bool kind_accepts(QueueKind wanted, std::uint32_t actual) noexcept {
    // A JoinableQueue is a Queue: a function taking Queue<T> may receive one.
    return actual == static_cast<std::uint32_t>(wanted) ||
           (wanted == QueueKind::queue && actual == static_cast<std::uint32_t>(QueueKind::joinable));
}

}  // namespace

// ---------------------------------------------------------------- creation

QueueCore QueueCore::create(QueueKind kind, std::uint64_t type_tag, std::size_t maxsize,
                            std::size_t capacity_bytes) {
    if (capacity_bytes > max_capacity)
        throw std::invalid_argument("mpservice: queue capacity " + std::to_string(capacity_bytes) +
                                    " bytes is more than the 1 TiB supported");
    const bool unbounded = capacity_bytes == 0;  // no byte bound: a sparse reservation
    std::uint64_t capacity = unbounded ? unbounded_reserve : std::max<std::uint64_t>(capacity_bytes, min_capacity);
    capacity = (capacity + 63) & ~std::uint64_t(63);
    static_assert(sizeof(QueueHeader) <= ring_offset, "queue header outgrew its page");
    static_assert(std::atomic<std::uint64_t>::is_always_lock_free, "queues need lock-free 64-bit atomics");

    QueueCore q;
    q.mem_ = SharedMemory::create(static_cast<std::size_t>(ring_offset + capacity));
    auto* h = ::new (q.mem_.data()) QueueHeader();
    h->kind = static_cast<std::uint32_t>(kind);
    h->type_tag = type_tag;
    h->capacity = capacity;
    h->maxsize = maxsize;
    h->ring_offset = ring_offset;
    h->hot_bytes = unbounded ? hot_default : 0;
    h->uid = new_queue_uid();
    h->released.store(unbounded ? hot_default + keep_past_hot : 0, std::memory_order_relaxed);
    os::robust_mutex_init(&h->put_lock);
    os::robust_mutex_init(&h->get_lock);
    std::atomic_thread_fence(std::memory_order_release);
    h->magic = queue_magic;
    q.h_ = h;
    q.ring_ = static_cast<unsigned char*>(q.mem_.data()) + ring_offset;
    q.set_limits();
    // A bounded ring is all used soon: map its pages now.  An unbounded one
    // commits memory only as items fill it.
    if (!unbounded) os::shm_prefault(q.ring_, static_cast<std::size_t>(capacity));
    return q;
}

QueueCore QueueCore::attach(SharedMemory memory, QueueKind kind, std::uint64_t type_tag) {
    if (!memory || memory.size() < ring_offset) throw DecodeError("decode: shared block is too small to be a queue");
    auto* h = static_cast<QueueHeader*>(memory.data());
    if (h->magic != queue_magic) throw DecodeError("decode: shared block is not a queue");
    if (!kind_accepts(kind, h->kind))
        throw DecodeError("decode: the queue is of another kind (Queue, SimpleQueue or JoinableQueue) than expected");
    if (h->type_tag != type_tag) throw DecodeError("decode: the queue carries items of another type than expected");
    if (h->ring_offset != ring_offset || h->capacity < min_capacity || h->capacity % 64 != 0 ||
        h->capacity > memory.size() - ring_offset || h->hot_bytes > h->capacity / 2 || h->hot_bytes % 64 != 0)
        throw DecodeError("decode: queue header does not match its shared block");
    QueueCore q;
    q.mem_ = std::move(memory);
    q.h_ = h;
    q.ring_ = static_cast<unsigned char*>(q.mem_.data()) + ring_offset;
    q.set_limits();
    if (!h->hot_bytes) os::shm_prefault(q.ring_, static_cast<std::size_t>(h->capacity));
    return q;
}

std::string& QueueCore::encode_buffer() {
    std::string& buffer = os::thread_object<EncodeBuffer>().bytes;
    if (buffer.capacity() > keep_buffer_bytes) std::string().swap(buffer);
    return buffer;
}

// ---------------------------------------------------------------- commits and recovery
//
// Each side publishes a position and a counter.  A process can die between the
// two stores, so the new values go to a journal first; whoever takes the lock
// next and is told the owner died finishes the commit (both stores are
// idempotent).  A record's bytes are always complete before its commit starts.

void QueueCore::commit_put(std::uint64_t tail, std::uint64_t completed) noexcept {
    h_->j_tail = tail;
    h_->j_completed = completed;
    h_->j_put_active.store(1, std::memory_order_release);
    h_->completed.store(completed, std::memory_order_relaxed);
    h_->tail.store(tail, std::memory_order_seq_cst);  // publishes the record (and `completed`)
    h_->j_put_active.store(0, std::memory_order_release);
}

void QueueCore::commit_get(std::uint64_t head, std::uint64_t taken) noexcept {
    h_->j_head = head;
    h_->j_taken = taken;
    h_->j_get_active.store(1, std::memory_order_release);
    h_->taken.store(taken, std::memory_order_relaxed);
    h_->head.store(head, std::memory_order_seq_cst);  // hands the bytes back to producers
    h_->j_get_active.store(0, std::memory_order_release);
}

void QueueCore::recover_put() noexcept {
    if (h_->j_put_active.load(std::memory_order_acquire)) {
        h_->completed.store(h_->j_completed, std::memory_order_relaxed);
        h_->tail.store(h_->j_tail, std::memory_order_release);
        h_->j_put_active.store(0, std::memory_order_release);
    }
    // A chunked item its producer did not finish is abandoned: the consumer
    // reading it sees `streaming` change and discards what it has.
    h_->streaming.store(0, std::memory_order_release);
    os::robust_mutex_consistent(&h_->put_lock);
    notify(h_->data);
}

void QueueCore::recover_get() noexcept {
    if (h_->j_get_active.load(std::memory_order_acquire)) {
        h_->taken.store(h_->j_taken, std::memory_order_relaxed);
        h_->head.store(h_->j_head, std::memory_order_release);
        h_->j_get_active.store(0, std::memory_order_release);
    }
    // A chunked item the dead consumer was reading: its remaining chunks are
    // discarded by the next consumer (they arrive as orphan `cont` records).
    os::robust_mutex_consistent(&h_->get_lock);
    notify(h_->space);
}

void QueueCore::probe_producers() noexcept {
    try {
        auto r = os::robust_mutex_trylock(&h_->put_lock);
        if (r == os::LockResult::busy) return;
        Held held(&h_->put_lock);
        if (r == os::LockResult::owner_died) recover_put();
    } catch (...) {
    }
}

void QueueCore::probe_consumers() noexcept {
    try {
        auto r = os::robust_mutex_trylock(&h_->get_lock);
        if (r == os::LockResult::busy) return;
        Held held(&h_->get_lock);
        if (r == os::LockResult::owner_died) recover_get();
    } catch (...) {
    }
}

// ---------------------------------------------------------------- put

QueueCore::Status QueueCore::put(const void* data, std::size_t size, os::Deadline deadline) {
    if (closed()) return Status::closed;
    auto r = take_lock(&h_->put_lock, deadline);
    if (r == os::LockResult::timed_out) return Status::timeout;
    Held held(&h_->put_lock);
    if (r == os::LockResult::owner_died) recover_put();
    if (closed()) return Status::closed;

    if (h_->maxsize) {
        const Status s = wait_below_maxsize(0, deadline);
        if (s != Status::ok) return s;
    }
    const std::uint64_t bytes = small_header + align8(size);
    if (bytes > whole_limit_) return put_chunked(data, size, deadline);

    // A whole record.  Padding the ring's end, starting the next cycle early
    // and waiting for room are out of line: most puts need none of them, and an
    // extra call costs ~10% of a put.
    std::uint64_t tail = h_->tail.load(std::memory_order_relaxed);
    if (offset(tail) + bytes > h_->capacity || tail + bytes > h_->head_cache + h_->capacity ||
        wrap_check_due(tail) || tail + bytes > write_mapped_to_) {
        Status s = make_room(tail, bytes, deadline);
        if (s != Status::ok) return s;
    }
    unsigned char* rec = at(tail);
    RecordHeader hdr{static_cast<std::uint32_t>(size), rec_whole};
    std::memcpy(rec, &hdr, sizeof hdr);
    if (size) std::memcpy(rec + small_header, data, size);
    commit_put(tail + bytes, h_->completed.load(std::memory_order_relaxed) + 1);
    notify_after_commit(h_->data);
    return Status::ok;
}

QueueCore::Status QueueCore::wait_below_maxsize(std::uint64_t pending, os::Deadline deadline) {
    auto below_maxsize = [&] {
        return h_->completed.load(std::memory_order_relaxed) + pending - h_->taken.load(std::memory_order_acquire) <
                   h_->maxsize ||
               closed();
    };
    if (!wait_until(h_->space, deadline, below_maxsize, [&] { probe_consumers(); })) return Status::timeout;
    return closed() ? Status::closed : Status::ok;
}

QueueCore::Status QueueCore::put_many(Source source, void* context, std::size_t count, std::size_t& done,
                                      os::Deadline deadline) {
    done = 0;
    if (closed()) return Status::closed;
    if (count == 0) return Status::ok;
    auto r = take_lock(&h_->put_lock, deadline);
    if (r == os::LockResult::timed_out) return Status::timeout;
    Held held(&h_->put_lock);
    if (r == os::LockResult::owner_died) recover_put();
    if (closed()) return Status::closed;

    // Records written but not yet published: [published, tail), `pending` items.
    // A producer killed before the commit leaves them unpublished (the next put
    // writes over them); the batch's items before them were published whole.
    std::uint64_t tail = h_->tail.load(std::memory_order_relaxed);
    std::uint64_t pending = 0;
    auto publish = [&] {
        if (!pending) return;
        commit_put(tail, h_->completed.load(std::memory_order_relaxed) + pending);
        notify_after_commit(h_->data);
        done += static_cast<std::size_t>(pending);
        pending = 0;
    };
    // What stops the batch early: the rest is not put.
    auto stop = [&](Status s) {
        publish();
        return s;
    };
    try {
        for (std::size_t i = 0; i < count; ++i) {
            const void* data = nullptr;
            std::size_t size = 0;
            source(context, i, &data, &size);
            if (h_->maxsize &&
                h_->completed.load(std::memory_order_relaxed) + pending - h_->taken.load(std::memory_order_acquire) >=
                    h_->maxsize) {
                publish();  // consumers can only take what is published
                const Status s = wait_below_maxsize(0, deadline);
                if (s != Status::ok) return s;
            }
            const std::uint64_t bytes = small_header + align8(size);
            if (bytes > whole_limit_) {  // streamed in chunks, published as it goes
                publish();
                const Status s = put_chunked(data, size, deadline);
                if (s != Status::ok) return s;
                ++done;
                tail = h_->tail.load(std::memory_order_relaxed);
                continue;
            }
            if (offset(tail) + bytes > h_->capacity || tail + bytes > h_->head_cache + h_->capacity ||
                wrap_check_due(tail)) {
                publish();  // make_room pads and waits on published positions only
                const Status s = make_room(tail, bytes, deadline);
                if (s != Status::ok) return s;
            }
            if (tail + bytes > write_mapped_to_) map_ahead_for_write(tail, bytes);
            unsigned char* rec = at(tail);
            RecordHeader hdr{static_cast<std::uint32_t>(size), rec_whole};
            std::memcpy(rec, &hdr, sizeof hdr);
            if (size) std::memcpy(rec + small_header, data, size);
            tail += bytes;
            ++pending;
        }
    } catch (...) {
        publish();
        throw;
    }
    return stop(Status::ok);
}

bool QueueCore::wait_for_room(std::uint64_t tail, std::uint64_t bytes, os::Deadline deadline,
                              bool give_up_on_close) {
    const std::uint64_t cap = h_->capacity;
    if (tail + bytes <= h_->head_cache + cap) return true;
    h_->head_cache = h_->head.load(std::memory_order_acquire);
    if (tail + bytes <= h_->head_cache + cap) return true;
    auto room = [&] {
        return tail + bytes <= h_->head.load(std::memory_order_acquire) + cap || (give_up_on_close && closed());
    };
    wait_until(h_->space, deadline, room, [&] { probe_consumers(); });
    h_->head_cache = h_->head.load(std::memory_order_acquire);
    return tail + bytes <= h_->head_cache + cap;
}

void QueueCore::write_pad(std::uint64_t tail, std::uint64_t bytes) {
    // A pad always runs to the ring's end; readers take its length from there
    // (an unbounded ring's pad can be longer than 32 bits can say).
    RecordHeader hdr{static_cast<std::uint32_t>(std::min<std::uint64_t>(bytes - small_header, UINT32_MAX)), rec_pad};
    std::memcpy(at(tail), &hdr, sizeof hdr);
    commit_put(tail + bytes, h_->completed.load(std::memory_order_relaxed));
    notify_after_commit(h_->data);
}

bool QueueCore::should_wrap_early(std::uint64_t tail, os::Deadline deadline) noexcept {
    if (offset(tail) < wrap_from_) return false;
    const std::uint64_t head = h_->head.load(std::memory_order_acquire);
    if (head == tail) return true;
    if (tail >= drain_retry_at_ && wait_for_drain(tail, head, deadline)) return true;
    // Not empty: look again on the next page (the wrap comes at most a page
    // later, within the pages kept past the hot part).
    const std::uint64_t page = os::page_size();
    h_->wrap_check_at = (tail + page) & ~(page - 1);
    return false;
}

bool QueueCore::wait_for_drain(std::uint64_t tail, std::uint64_t head, os::Deadline deadline) noexcept {
    const auto give_up_at = std::min(deadline, os::Clock::now() + drain_wait_limit);
    if (os::Clock::now() >= give_up_at) return false;  // put_nowait and friends do not wait
    for (;;) {
        const std::uint64_t seen = head;
        const bool moved = spin_for(
            [&] {
                head = h_->head.load(std::memory_order_acquire);
                return head != seen;
            },
            drain_stall, BetweenLooks::yield);
        if (head == tail) return true;
        if (!moved || os::Clock::now() >= give_up_at) break;
    }
    drain_retry_at_ = tail + drain_retry_bytes;  // the consumers stalled: run on for a while
    return false;
}

void QueueCore::release_pages_below(std::uint64_t below) noexcept {
    if (!h_->hot_bytes) return;
    const std::uint64_t page = os::page_size();
    const std::uint64_t cycle = below - offset(below);
    // Pages past the hot part (and a margin, so that a cycle that runs a little
    // past it does not fault the same pages in again every time).
    const std::uint64_t first = cycle + h_->hot_bytes + keep_past_hot;
    std::uint64_t from = h_->released.load(std::memory_order_relaxed);
    if (from < first) from = first;  // an earlier cycle's mark: this cycle starts afresh
    const std::uint64_t to = below & ~(page - 1);
    if (to > from) {
        os::shm_release(mem_.handle(), static_cast<std::size_t>(ring_offset + offset(from)),
                        static_cast<std::size_t>(to - from));
        from = to;
    }
    h_->released.store(from, std::memory_order_relaxed);
}

void QueueCore::release_consumed() noexcept {
    const std::uint64_t head = h_->head.load(std::memory_order_relaxed);
    const std::uint64_t page = os::page_size();
    h_->release_check_at = (head + page) & ~(page - 1);  // the next look, unless it gives back now
    const std::uint64_t released = h_->released.load(std::memory_order_relaxed);
    if (head < released + release_batch && (head <= released || head != h_->tail.load(std::memory_order_acquire)))
        return;
    // The pages below the committed head are read by nobody; holding the put
    // lock too, nobody writes them either while they are given back.
    try {
        auto r = os::robust_mutex_trylock(&h_->put_lock);
        if (r == os::LockResult::busy) return;  // a producer is at work: next time
        Held held(&h_->put_lock);
        if (r == os::LockResult::owner_died) recover_put();
        release_pages_below(head);
    } catch (...) {
    }
}

void QueueCore::set_limits() noexcept {
    mask_ = power_of_two_mask(h_->capacity);
    const std::uint64_t span = h_->hot_bytes ? h_->hot_bytes : h_->capacity;
    whole_limit_ = span / 2;
    chunk_bytes_ = span / 4;
    wrap_from_ = h_->hot_bytes ? h_->hot_bytes : ~std::uint64_t(0);
    release_from_ = h_->hot_bytes ? h_->hot_bytes + keep_past_hot : ~std::uint64_t(0);
    write_mapped_to_ = read_mapped_to_ = h_->hot_bytes ? 0 : ~std::uint64_t(0);
}

void QueueCore::map_ahead_for_write(std::uint64_t tail, std::uint64_t bytes) noexcept {
    if (tail + bytes <= write_mapped_to_) return;
    const std::uint64_t page = os::page_size();
    const std::uint64_t cycle = tail - offset(tail);
    const std::uint64_t kept_end = cycle + release_from_;  // the hot part and the pages kept past it
    if (tail + bytes <= kept_end && kept_mapped_for_write_) {
        write_mapped_to_ = kept_end;  // mapped in an earlier cycle, and never given back
        return;
    }
    // Within the kept pages, no further than their end: the next cycle usually
    // starts there, and pages mapped past it would be fresh ones, given back
    // at the wrap.
    const std::uint64_t want = (std::max(tail + bytes, tail + map_ahead_bytes) + page - 1) & ~(page - 1);
    const std::uint64_t to = std::min(want, tail + bytes <= kept_end ? kept_end : cycle + h_->capacity);
    const std::uint64_t from = std::max(write_mapped_to_, tail & ~(page - 1));
    if (to > from) os::shm_prefault(at(from), static_cast<std::size_t>(to - from), true);
    if (to == kept_end) kept_mapped_for_write_ = true;
    write_mapped_to_ = to;
}

void QueueCore::map_ahead_for_read(std::uint64_t head) noexcept {
    if (!h_->hot_bytes) return;
    const std::uint64_t page = os::page_size();
    const std::uint64_t cycle = head - offset(head);
    const std::uint64_t kept_end = cycle + release_from_;
    if (head + 64 <= kept_end && kept_mapped_for_read_) {
        read_mapped_to_ = kept_end;
        return;
    }
    // Only committed bytes: mapping the holes past the tail would allocate them.
    const std::uint64_t written = (h_->tail.load(std::memory_order_acquire) + page - 1) & ~(page - 1);
    const std::uint64_t bound = head + 64 <= kept_end ? kept_end : cycle + h_->capacity;
    const std::uint64_t from = std::max(read_mapped_to_, head & ~(page - 1));
    const std::uint64_t to = std::min({bound, written, (head + map_ahead_bytes) & ~(page - 1)});
    if (to >= from + 16 * page || (to == kept_end && to > from)) {
        os::shm_prefault(at(from), static_cast<std::size_t>(to - from), false);
        if (to == kept_end) kept_mapped_for_read_ = true;
        read_mapped_to_ = to;
    } else {
        // Close behind the producers: a fault per page costs what a call would;
        // look again on the next page.
        read_mapped_to_ = std::max(read_mapped_to_, (head & ~(page - 1)) + page);
    }
}

QueueCore::Status QueueCore::make_room(std::uint64_t& tail, std::uint64_t bytes, os::Deadline deadline) {
    if (should_wrap_early(tail, deadline)) wrap_early(tail);
    const std::uint64_t to_end = h_->capacity - offset(tail);
    if (to_end < bytes) {  // records never wrap: skip the ring's end
        if (!wait_for_room(tail, to_end, deadline, true)) return closed() ? Status::closed : Status::timeout;
        write_pad(tail, to_end);
        tail += to_end;
    }
    if (!wait_for_room(tail, bytes, deadline, true)) return closed() ? Status::closed : Status::timeout;
    map_ahead_for_write(tail, bytes);
    return Status::ok;
}

void QueueCore::wrap_early(std::uint64_t& tail) noexcept {
    // Past the hot part and nothing queued: the next cycle starts at the
    // ring's start, on warm pages; the ones written past them go back, and so
    // do the ones mapped ahead past the pad (nobody reads under a pad).
    release_pages_below(tail);
    write_pad(tail, h_->capacity - offset(tail));
    const std::uint64_t page = os::page_size();
    const std::uint64_t cycle = tail - offset(tail);
    // (Only past the pages kept past the hot part: those stay, warm, for the next cycles.)
    const std::uint64_t above = std::max((tail + small_header + page - 1) & ~(page - 1), cycle + release_from_);
    const std::uint64_t cycle_end = cycle + h_->capacity;
    const std::uint64_t mapped = std::min(write_mapped_to_, cycle_end);
    if (mapped > above)
        os::shm_release(mem_.handle(), static_cast<std::size_t>(ring_offset + offset(above)),
                        static_cast<std::size_t>(mapped - above));
    tail = cycle_end;
}

QueueCore::Status QueueCore::put_chunked(const void* data, std::size_t size, os::Deadline deadline) {
    const std::uint64_t cap = h_->capacity;
    // Chunks of a quarter ring (of its hot part when unbounded): the consumer
    // copies one out while we write the next.
    const std::uint64_t chunk_bytes = chunk_bytes_;
    const auto* src = static_cast<const unsigned char*>(data);
    std::uint64_t remaining = size;
    std::uint64_t tail = h_->tail.load(std::memory_order_relaxed);
    bool first = true;

    auto give_up = [&] {
        if (first) return closed() ? Status::closed : Status::timeout;
        // Mid-item: tell the consumer reading it to discard what it has.
        h_->streaming.store(0, std::memory_order_release);
        notify(h_->data);
        return Status::timeout;
    };

    while (remaining) {
        const std::uint64_t header = first ? first_header : small_header;
        std::uint64_t piece = std::min<std::uint64_t>(remaining, chunk_bytes - header);
        if (should_wrap_early(tail, deadline)) {
            wrap_early(tail);
            continue;
        }
        const std::uint64_t to_end = cap - offset(tail);
        if (to_end < header + std::min<std::uint64_t>(align8(piece), 64)) {
            if (!wait_for_room(tail, to_end, deadline, first)) return give_up();
            write_pad(tail, to_end);
            tail += to_end;
            continue;
        }
        piece = std::min(piece, to_end - header);
        const std::uint64_t bytes = header + align8(piece);
        if (!wait_for_room(tail, bytes, deadline, first)) return give_up();
        map_ahead_for_write(tail, bytes);

        unsigned char* rec = at(tail);
        const bool done = piece == remaining;
        RecordHeader hdr{static_cast<std::uint32_t>(piece), first ? rec_first : done ? rec_last : rec_cont};
        std::memcpy(rec, &hdr, sizeof hdr);
        if (first) {
            std::uint64_t total = size;
            std::memcpy(rec + small_header, &total, sizeof total);
            // The item's id is its position; the consumer reading it watches this.
            h_->streaming.store(tail + 1, std::memory_order_relaxed);
        }
        std::memcpy(rec + header, src, piece);
        src += piece;
        remaining -= piece;
        commit_put(tail + bytes, h_->completed.load(std::memory_order_relaxed) + (done ? 1 : 0));
        tail += bytes;
        first = false;
        notify_after_commit(h_->data);
    }
    h_->streaming.store(0, std::memory_order_release);
    return Status::ok;
}

// ---------------------------------------------------------------- get

QueueCore::Status QueueCore::get_many(Consume consume, void* context, std::size_t max_items, std::size_t& got,
                                      os::Deadline deadline) {
    got = 0;
    if (max_items == 0) return Status::ok;
    auto something = [&] {
        return h_->tail.load(std::memory_order_acquire) != h_->head.load(std::memory_order_acquire) || closed();
    };
    // Look under the lock first: while items stream, a get then reads no line the
    // producers write, except the ring and (when its cached copy runs out) `tail`.
    for (bool look_now = true;; ) {
        if (!look_now && !wait_until(h_->data, deadline, something, [&] { probe_producers(); })) return Status::timeout;
        look_now = false;
        auto r = take_lock(&h_->get_lock, deadline);
        if (r == os::LockResult::timed_out) return Status::timeout;
        Held held(&h_->get_lock);
        if (r == os::LockResult::owner_died) recover_get();

        // Hands a reassembled streamed item to `consume`, outside the lock.
        auto deliver = [&](std::string& buffer, std::uint64_t total) {
            release_consumed();
            held.release();
            struct Shrink {
                std::string& b;
                ~Shrink() {
                    if (b.size() > keep_buffer_bytes) std::string().swap(b);
                }
            } shrink{buffer};
            got = 1;
            consume(context, reinterpret_cast<const unsigned char*>(buffer.data()), static_cast<std::size_t>(total));
            return Status::ok;
        };
        bool wait_for_parker = false;
        for (;;) {
            const std::uint64_t head = h_->head.load(std::memory_order_relaxed);
            if (head == h_->tail_cache) h_->tail_cache = h_->tail.load(std::memory_order_acquire);
            if (head != h_->tail_cache && h_->parked_item.load(std::memory_order_relaxed)) {
                std::string& buffer = reassembly_buffer();
                std::uint64_t total = 0;
                Taken taken = Taken::discarded;
                const ParkedAction action = handle_parked(buffer, total, deadline, taken);
                if (action == ParkedAction::wait) {
                    wait_for_parker = true;
                    break;
                }
                if (action == ParkedAction::resumed) {
                    if (taken == Taken::parked) return Status::timeout;
                    if (taken == Taken::delivered) return deliver(buffer, total);
                }
                continue;  // dropped or discarded: what follows is read as usual
            }
            if (head == h_->tail_cache) {
                // Empty.  Reading `closed` first makes every put that finished
                // before close() visible to the second look at the tail.
                bool was_closed = closed();
                h_->tail_cache = h_->tail.load(std::memory_order_acquire);
                if (head != h_->tail_cache) continue;
                if (was_closed) return Status::closed;
                break;  // unlock and wait again
            }
            const std::uint64_t cap = h_->capacity;
            if (read_map_due(head)) map_ahead_for_read(head);
            unsigned char* rec = at(head);
            RecordHeader hdr;
            std::memcpy(&hdr, rec, sizeof hdr);
            if (hdr.kind < rec_whole || hdr.kind > rec_pad) corrupt("record kind");
            const std::uint64_t bytes = record_size(hdr, cap - offset(head));
            if (offset(head) + bytes > cap || head + bytes > h_->tail_cache) corrupt("record length");
            const std::uint64_t taken = h_->taken.load(std::memory_order_relaxed);

            switch (hdr.kind) {
                case rec_pad:
                    commit_get(head + bytes, taken);
                    notify(h_->space);
                    continue;
                case rec_cont:
                case rec_last: {
                    // The rest of an item whose consumer died after taking its
                    // first chunk: that item is lost; drop the rest.  A complete
                    // item counts as taken and (for join) as done.
                    const bool last = hdr.kind == rec_last;
                    commit_get(head + bytes, taken + (last ? 1 : 0));
                    if (last) {
                        h_->tasks_done.fetch_add(1, std::memory_order_acq_rel);
                        notify(h_->joined);
                    }
                    notify(h_->space);
                    continue;
                }
                case rec_whole: {
                    // Decoded in place, under the lock: one copy, and a consumer
                    // killed while decoding leaves the item for the next one.
                    try {
                        consume(context, rec + small_header, hdr.len);
                    } catch (...) {
                        commit_get(head + bytes, taken + 1);
                        notify(h_->space);
                        throw;
                    }
                    if (max_items > 1) {
                        got = take_following(head + bytes, taken, max_items, consume, context);
                        return Status::ok;
                    }
                    got = 1;
                    commit_get(head + bytes, taken + 1);
                    notify_after_commit(h_->space);
                    if (release_check_due(head + bytes)) release_consumed();
                    return Status::ok;
                }
                default: {  // rec_first
                    std::string& buffer = reassembly_buffer();
                    std::uint64_t total = 0;
                    std::memcpy(&total, rec + small_header, sizeof total);
                    const Taken taken = read_chunked(head, buffer, deadline);
                    if (taken == Taken::discarded) continue;
                    if (taken == Taken::parked) return Status::timeout;
                    return deliver(buffer, total);
                }
            }
        }
        if (wait_for_parker) {
            // The rest of another process's parked item is at the head: wait until
            // that process has taken it (or ended), within our own deadline.
            const std::uint64_t item = h_->parked_item.load(std::memory_order_relaxed);
            const long parker = static_cast<long>(h_->parked_pid.load(std::memory_order_relaxed));
            held.release();
            bool parker_ended = false;
            auto moved_on = [&] {
                return parker_ended || h_->parked_item.load(std::memory_order_acquire) != item;
            };
            if (!wait_until(h_->data, deadline, moved_on, [&] { parker_ended = !os::process_running(parker); }))
                return Status::timeout;
            look_now = true;  // look again at once, under the lock
        }
    }
}

std::size_t QueueCore::take_following(std::uint64_t next, std::uint64_t taken, std::size_t max_items,
                                      Consume consume, void* context) {
    // Nothing is committed until the end: a consumer killed before it leaves
    // every item of the batch on the ring for the next one.
    const std::uint64_t cap = h_->capacity;
    std::size_t n = 1;
    auto commit = [&] {
        commit_get(next, taken + n);
        notify_after_commit(h_->space);
        if (release_check_due(next)) release_consumed();
    };
    try {
        while (n < max_items) {
            if (next == h_->tail_cache) {
                h_->tail_cache = h_->tail.load(std::memory_order_acquire);
                if (next == h_->tail_cache) break;
            }
            if (read_map_due(next)) map_ahead_for_read(next);
            unsigned char* rec = at(next);
            RecordHeader hdr;
            std::memcpy(&hdr, rec, sizeof hdr);
            if (hdr.kind < rec_whole || hdr.kind > rec_pad) corrupt("record kind");
            const std::uint64_t bytes = record_size(hdr, cap - offset(next));
            if (offset(next) + bytes > cap || next + bytes > h_->tail_cache) corrupt("record length");
            if (hdr.kind == rec_pad) {
                next += bytes;
                continue;
            }
            if (hdr.kind != rec_whole) break;  // a streamed item (or the rest of one): the next get's
            next += bytes;
            ++n;  // counted before the call: an item whose decoding throws is consumed
            consume(context, rec + small_header, hdr.len);
        }
    } catch (...) {
        commit();
        throw;
    }
    commit();
    return n;
}

QueueCore::ParkedAction QueueCore::handle_parked(std::string& out, std::uint64_t& total, os::Deadline deadline,
                                                 Taken& result) {
    const std::uint64_t item = h_->parked_item.load(std::memory_order_relaxed);
    const long parker = static_cast<long>(h_->parked_pid.load(std::memory_order_relaxed));
    if (parker == os::current_pid()) {
        ParkedPart part;
        h_->parked_item.store(0, std::memory_order_release);
        if (!parked_parts().take(h_->uid, item, part)) return ParkedAction::dropped;  // not ours after all
        out = std::move(part.data);
        total = part.total;
        result = continue_chunked(h_->head.load(std::memory_order_relaxed), item, part.received, part.total, out,
                                  deadline);
        if (result != Taken::parked) notify(h_->data);  // gets of other processes wait for this
        return ParkedAction::resumed;
    }
    if (os::process_running(parker)) return ParkedAction::wait;
    // Its process ended with the part it had: the item is lost (as for a
    // consumer killed mid-item); the rest is dropped as it comes.
    h_->parked_item.store(0, std::memory_order_release);
    notify(h_->data);
    return ParkedAction::dropped;
}

QueueCore::Taken QueueCore::read_chunked(std::uint64_t head, std::string& out, os::Deadline deadline) {
    RecordHeader hdr;
    std::memcpy(&hdr, at(head), sizeof hdr);
    std::uint64_t total = 0;
    std::memcpy(&total, at(head) + small_header, sizeof total);
    if (hdr.len > total) corrupt("first chunk longer than its item");
    if (out.size() < total) out.resize(static_cast<std::size_t>(total));
    std::memcpy(&out[0], at(head) + first_header, hdr.len);
    const std::uint64_t received = hdr.len;
    const std::uint64_t id = head + 1;
    head += first_header + align8(hdr.len);
    std::uint64_t taken = h_->taken.load(std::memory_order_relaxed);
    if (received == total) ++taken;
    commit_get(head, taken);
    notify(h_->space);
    return continue_chunked(head, id, received, total, out, deadline);
}

QueueCore::Taken QueueCore::continue_chunked(std::uint64_t head, std::uint64_t id, std::uint64_t received,
                                             std::uint64_t total, std::string& out, os::Deadline deadline) {
    const std::uint64_t cap = h_->capacity;
    RecordHeader hdr;
    std::uint64_t taken = h_->taken.load(std::memory_order_relaxed);
    // The producer holds the put lock until the item is complete, so its chunks
    // follow one another.  It gives up (timeout) or dies: `streaming` changes.
    auto next_or_abandoned = [&] {
        return h_->streaming.load(std::memory_order_acquire) != id ||
               h_->tail.load(std::memory_order_acquire) != head;
    };
    while (received < total) {
        if (!wait_until(h_->data, deadline, next_or_abandoned, [&] { probe_producers(); })) {
            // Our timeout, with the producer stopped or slow mid-item: keep what
            // we have for the next get of this process (see "Parked items").
            try {
                parked_parts().put(ParkedPart{h_->uid, id, received, total, std::move(out)});
            } catch (...) {
                return Taken::discarded;  // no memory to keep it: the item is lost
            }
            h_->parked_pid.store(os::current_pid(), std::memory_order_relaxed);
            h_->parked_item.store(id, std::memory_order_release);
            return Taken::parked;
        }
        const std::uint64_t streaming = h_->streaming.load(std::memory_order_acquire);
        const std::uint64_t tail = h_->tail.load(std::memory_order_acquire);
        if (tail == head) {
            if (streaming != id) return Taken::discarded;
            continue;
        }
        h_->tail_cache = tail;
        if (read_map_due(head)) map_ahead_for_read(head);
        unsigned char* rec = at(head);
        std::memcpy(&hdr, rec, sizeof hdr);
        if (hdr.kind < rec_whole || hdr.kind > rec_pad) corrupt("record kind");
        const std::uint64_t bytes = record_size(hdr, cap - offset(head));
        if (offset(head) + bytes > cap || head + bytes > tail) corrupt("record length");
        if (hdr.kind == rec_pad) {
            head += bytes;
            commit_get(head, taken);
            notify(h_->space);
            continue;
        }
        // A new item where our next chunk should be: ours was given up.
        if (hdr.kind != rec_cont && hdr.kind != rec_last) return Taken::discarded;
        if (received + hdr.len > total) corrupt("chunks longer than their item");
        std::memcpy(&out[static_cast<std::size_t>(received)], rec + small_header, hdr.len);
        received += hdr.len;
        if (received == total) ++taken;
        head += bytes;
        commit_get(head, taken);
        notify(h_->space);
    }
    return Taken::delivered;
}

// ---------------------------------------------------------------- state, close, join

std::size_t QueueCore::qsize() const noexcept {
    const std::uint64_t taken = h_->taken.load(std::memory_order_acquire);
    const std::uint64_t completed = h_->completed.load(std::memory_order_acquire);
    return completed > taken ? static_cast<std::size_t>(completed - taken) : 0;
}

bool QueueCore::full() const noexcept {
    if (h_->maxsize && qsize() >= h_->maxsize) return true;
    const std::uint64_t head = h_->head.load(std::memory_order_acquire);
    const std::uint64_t tail = h_->tail.load(std::memory_order_acquire);
    return tail - head + small_header > h_->capacity;
}

void QueueCore::close() noexcept {
    h_->closed.store(1, std::memory_order_seq_cst);
    notify_always(h_->data);
    notify_always(h_->space);
}

void QueueCore::task_done() {
    std::uint64_t done = h_->tasks_done.load(std::memory_order_acquire);
    for (;;) {
        if (done >= h_->completed.load(std::memory_order_acquire))
            throw std::invalid_argument("mpservice: JoinableQueue::task_done() called more times than items were put");
        if (h_->tasks_done.compare_exchange_weak(done, done + 1, std::memory_order_acq_rel)) break;
    }
    notify(h_->joined);
}

bool QueueCore::join(os::Deadline deadline) {
    auto all_done = [&] {
        return h_->tasks_done.load(std::memory_order_acquire) >= h_->completed.load(std::memory_order_acquire);
    };
    return wait_until(h_->joined, deadline, all_done, [&] { probe_producers(); });
}

}  // namespace mpservice::detail
