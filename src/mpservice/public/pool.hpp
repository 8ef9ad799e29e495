// pool: Pool, a pool of worker processes, and AsyncResult<R>, the future of
// one submission to it.
//
//     mp::Pool pool(4);                                   // or mp::Pool pool(ctx, 4, options)
//     std::vector<double> a = pool.map(work, inputs);     // input order; optional chunksize
//     for (double r : pool.imap(work, inputs)) ...        // input order, lazy, bounded
//     for (double r : pool.imap_unordered(work, inputs)) ...
//     auto b = pool.starmap(add, std::vector<std::tuple<int, int>>{{1, 2}, {3, 4}});
//     double c = pool.apply(work, 21);
//     mp::AsyncResult<double> d = pool.apply_async(work, 21);
//     pool.close(); pool.join();                          // or pool.terminate()
//
// Workers are the library's processes (spawned by default): their log records
// reach the parent's handler, a task's exception comes back typed with the
// worker's throw-site stack, and library handles (Lock, Queue, Value, ...) can
// be task arguments.  Targets are what Process accepts in the spawn context -
// free functions, static member functions, capture-less lambdas - under every
// context (a lambda with captures is refused at compile time... or at run time).
//
// The data path of a task: the caller encodes a chunk of arguments (codec),
// the pool puts it on one worker's own task ring (shared memory, so the pool
// knows which worker holds which task), the worker runs the items one by one,
// recording each outcome in its own shared progress slot, and sends the
// chunk's outcomes on the pool's result ring; in the parent, the caller that
// waits reads that ring itself (PoolCore::serve_until: one reader at a time)
// and decodes what it finds into the AsyncResults / imap buffers, running the
// callbacks; the pool's result thread takes what nobody waits for, on a tick.
//
// A worker that dies in a task (signal, exit(n)) fails exactly that task with
// ProcessError naming the signal or code: the outcomes of the items of its
// chunk that had finished are read from its progress slot, the items after the
// fatal one are sent to another worker, nothing runs twice.  The worker is
// replaced and the pool keeps serving.
//
// Lifetime: destroying a Pool terminates it (as Python's `with Pool() as p:`
// does); call close() and join() first to wait for the queued work.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/os.hpp"
#include "../detail/queue_ring.hpp"
#include "../detail/shm.hpp"
#include "codec.hpp"
#include "errors.hpp"
#include "futures.hpp"
#include "process.hpp"
#include "remote_exception.hpp"

namespace mpservice {

template <class R>
class AsyncResult;
class Pool;

namespace detail {

// ---------------------------------------------------------------- result records

/// A record of a result message: [PoolRecordHeader | payload].  Its kind is
/// record_value (one encoded value), record_error (one encoded exception) or
/// dense_record_kind(e): the values of consecutive items, e bytes each, back to
/// back - the form of bitwise results (numbers, trivially copyable structs),
/// which a worker appends in place with no header per item.
struct PoolRecordHeader {
    std::uint32_t size;
    std::uint32_t kind;
};
constexpr std::uint32_t record_value = 0;
constexpr std::uint32_t record_error = 1;
constexpr std::uint32_t record_dense = 2;  // the low byte of a dense record's kind
/// Results of at most this size travel densely.
constexpr std::uint32_t dense_max_elem = 4096;
constexpr std::uint32_t dense_record_kind(std::uint32_t elem) { return record_dense | (elem << 8); }

/// Walks the records of a result message's body (records of items first,
/// first + 1, ...): item(index, kind, data, size) for each encoded one,
/// run(index, count, elem, data) for the `count` values of a dense record.
/// Stops at a torn record; a dense record longer than the bytes there (a
/// dead worker's slot: it had grown the record's size, not yet the slot's
/// length) gives the whole values it holds.  Returns the index after the last.
template <class Item, class Run>
std::uint32_t walk_record_runs(const unsigned char* p, std::size_t n, std::uint32_t first, Item&& item, Run&& run) {
    std::size_t at = 0;
    std::uint32_t index = first;
    while (at + sizeof(PoolRecordHeader) <= n) {
        PoolRecordHeader rh;
        std::memcpy(&rh, p + at, sizeof rh);
        at += sizeof rh;
        const std::size_t avail = n - at;
        if ((rh.kind & 0xFFu) == record_dense) {
            const std::size_t elem = rh.kind >> 8;
            if (elem == 0) break;
            const auto count = static_cast<std::uint32_t>(std::min<std::size_t>(rh.size, avail) / elem);
            if (count) run(index, count, elem, p + at);
            index += count;
            if (rh.size > avail) break;
        } else {
            if (rh.size > avail) break;  // torn: cannot happen with a committed length
            item(index++, rh.kind, p + at, static_cast<std::size_t>(rh.size));
        }
        at += rh.size;
    }
    return index;
}
/// As walk_record_runs, with a dense record's values given one by one:
/// fn(index, kind, data, size) for every item.
template <class F>
std::uint32_t walk_records(const unsigned char* p, std::size_t n, std::uint32_t first, F&& fn) {
    return walk_record_runs(p, n, first, fn,
                            [&](std::uint32_t index, std::uint32_t count, std::size_t elem, const unsigned char* d) {
                                for (std::uint32_t k = 0; k < count; ++k) fn(index + k, record_value, d + k * elem, elem);
                            });
}

// ---------------------------------------------------------------- worker side

/// A worker's write position in its progress slot (impl/pool.cpp), shared
/// with the inline fast path of bitwise results (ItemSink::commit_bitwise).
struct SlotCursor {
    static constexpr std::uint32_t no_dense = 0xFFFFFFFFu;
    std::atomic<std::uint32_t>* index = nullptr;  // the slot's "item being run"
    std::atomic<std::uint32_t>* used = nullptr;   // the slot's committed record bytes
    unsigned char* records = nullptr;             // the slot's records
    std::uint32_t base = 0;             // the message's first item (in the chunk)
    std::uint32_t next_local = 0;       // items of the message with an outcome
    std::uint32_t in_slot = 0;          // items with a record in the slot now
    std::uint32_t end = 0;              // == *used (this worker is its only writer)
    std::uint32_t dense_at = no_dense;  // the open dense record's header, or none
    std::uint32_t dense_elem = 0;
};
/// A worker sends its slot's records once they fill this much of it: small
/// messages stay in the caches of both ends (a 256 KiB one is a cache miss
/// per line on each side, and a fresh allocation in the parent).
constexpr std::uint32_t pool_slot_flush_bytes = 16u << 10;

/// Where a worker records the outcome of each item of the chunk it runs
/// (impl/pool.cpp): in its shared progress slot first, so that a crash loses
/// only the item in progress, then on the pool's result ring.
class ItemSink {
public:
    /// Item `local` of the chunk (0-based) is about to run.
    MPSERVICE_API void begin(std::uint32_t local);
    /// The encoder for the item's result (empty at begin()).
    Encoder& out() noexcept { return out_; }
    /// The item returned (its value, if any, is in out()).
    MPSERVICE_API void commit_value();
    /// The item threw.
    MPSERVICE_API void commit_error(const std::exception_ptr& e);
    /// The item returned a bitwise value of `size` bytes (<= dense_max_elem):
    /// appended to the slot's dense record (opened, or the slot sent, first if need be).
    MPSERVICE_API void commit_dense(const void* value, std::uint32_t size);

    /// begin() for an item whose result is bitwise (out() is not used).
    void begin_bitwise(std::uint32_t local) { cur->index->store(cur->base + local, std::memory_order_release); }
    /// commit_dense() of a value, inline while the open dense record has room:
    /// the value's bytes, the record's size, then the slot's length are
    /// stored, in that order, so a parent reading a dead worker's slot sees
    /// every value the length covers.
    template <class R>
    void commit_bitwise(const R& v) {
        SlotCursor& c = *cur;
        if (c.dense_elem == sizeof(R) && c.dense_at != SlotCursor::no_dense &&
            c.end + sizeof(R) < pool_slot_flush_bytes) {
            std::memcpy(c.records + c.end, &v, sizeof(R));
            c.end += static_cast<std::uint32_t>(sizeof(R));
            const std::uint32_t size = c.end - c.dense_at - static_cast<std::uint32_t>(sizeof(PoolRecordHeader));
            std::memcpy(c.records + c.dense_at, &size, sizeof size);
            c.used->store(c.end, std::memory_order_release);
            ++c.in_slot;
            ++c.next_local;
        } else {
            commit_dense(&v, static_cast<std::uint32_t>(sizeof(R)));
        }
    }

    void* link = nullptr;         // the worker's slot and rings (impl/pool.cpp)
    SlotCursor* cur = nullptr;    // its write position (in *link)

private:
    Encoder out_;
};

/// Runs `count` items whose arguments are in `in`; `state` is a ProcessRunner's object.
using ChunkRunner = void (*)(const void* fn, void* state, Decoder& in, std::uint32_t count, ItemSink& sink);

/// Results that travel densely (dense_record_kind): the codec copies them byte for byte.
template <class R, class = void>
struct dense_result_t : std::false_type {};
template <class R>
struct dense_result_t<R, std::enable_if_t<!std::is_void_v<R>>>
    : std::bool_constant<is_bitwise_v<R> && sizeof(R) <= dense_max_elem> {};
template <class R>
inline constexpr bool dense_result = dense_result_t<R>::value;

template <class R, class... A, class Call>
void run_items(Decoder& in, std::uint32_t count, ItemSink& sink, Call& call) {
    for (std::uint32_t i = 0; i < count; ++i) {
        std::tuple<A...> args{in.read<A>()...};  // braced: decoded left to right
        if constexpr (dense_result<R>) {
            sink.begin_bitwise(i);
        } else {
            sink.begin(i);
        }
        try {
            if constexpr (std::is_void_v<R>) {
                std::apply(call, std::move(args));
            } else if constexpr (dense_result<R>) {
                sink.commit_bitwise(static_cast<const R&>(std::apply(call, std::move(args))));
                continue;
            } else {
                sink.out().write(std::apply(call, std::move(args)));
            }
        } catch (...) {
            sink.commit_error(std::current_exception());
            continue;
        }
        sink.commit_value();
    }
}

/// The runner of a pool task: a plain function of arguments A...
template <class Fn, class... A>
void run_function_chunk(const void* fn, void*, Decoder& in, std::uint32_t count, ItemSink& sink) {
    Fn f = reinterpret_cast<Fn>(reinterpret_cast<std::uintptr_t>(fn));
    using R = std::invoke_result_t<Fn, A...>;
    run_items<R, A...>(in, count, sink, f);
}

/// The runner of a ProcessRunner call: T::operator()(A...) on the worker's object.
template <class T, class... A>
void run_method_chunk(const void*, void* state, Decoder& in, std::uint32_t count, ItemSink& sink) {
    T& obj = *static_cast<T*>(state);
    using R = std::invoke_result_t<T&, A...>;
    auto call = [&obj](A&&... a) -> R { return obj(std::move(a)...); };
    run_items<R, A...>(in, count, sink, call);
}

/// What a worker process is handed at start: its task ring, the pool's result
/// ring, its progress slot, its side channel for OS handles, the initializer.
struct PoolWorkerParts {
    QueueCore tasks;
    QueueCore results;
    SharedMemory slot;
    os::handle_t lane = os::invalid_handle;  // owned; handles of task arguments travel here
    os::CodeRef initializer;
    std::uint64_t maxtasks = 0;  // 0: no limit

    PoolWorkerParts() = default;
    PoolWorkerParts(const PoolWorkerParts&) = delete;
    PoolWorkerParts& operator=(const PoolWorkerParts&) = delete;
    MPSERVICE_API ~PoolWorkerParts();
};
/// The worker's Process argument.  Copies share the parts, so that the parent
/// can let go of them (release()) as soon as the worker has started, instead
/// of when its Process is destroyed.
struct PoolWorkerBoot {
    MPSERVICE_API PoolWorkerBoot();  // fresh parts (defined in the implementation)
    Shared<PoolWorkerParts> p;
    /// Closes the parent's copies of the worker's descriptors and mappings.
    void release() { p->~PoolWorkerParts(), new (p.get()) PoolWorkerParts(); }
};

/// The worker's loop: takes chunks off its ring and runs them until the ring
/// is closed or maxtasks chunks are done.  `state`: a ProcessRunner's object.
MPSERVICE_API void serve_pool_tasks(const PoolWorkerBoot& boot, void* state);
/// The initializer named in `boot` (throws if it cannot be found).
MPSERVICE_API const void* resolve_initializer(const PoolWorkerBoot& boot);

/// A pool worker's process target: runs the initializer, then serves.
template <class Fn, class... A>
void pool_worker_entry(PoolWorkerBoot boot, A... args) {
    if (!boot.p->initializer.empty()) {
        Fn init = reinterpret_cast<Fn>(reinterpret_cast<std::uintptr_t>(resolve_initializer(boot)));
        init(std::move(args)...);
    }
    serve_pool_tasks(boot, nullptr);
}
inline void pool_no_initializer() {}

/// A ProcessRunner's process target: constructs the T, then serves its calls.
template <class T, class... A>
void runner_entry(PoolWorkerBoot boot, A... args) {
    T obj(std::move(args)...);
    serve_pool_tasks(boot, &obj);
}

// ---------------------------------------------------------------- parent side

/// The outcome of one item: its encoded value or exception (kind 0 / 1), or
/// an error made in the parent (a dead worker, terminate()).
struct JobItem {
    std::size_t index;
    std::uint32_t kind;
    const unsigned char* data;
    std::size_t size;
    std::exception_ptr error;
};

/// The records of one result message, as its worker sent them: record k is
/// the outcome of item first + k of a chunk whose item 0 is the job's item
/// `job_first`; only items in [from, to) are new (the others are known).
struct JobRecords {
    std::size_t job_first;
    std::uint32_t first, from, to;
    const unsigned char* data;
    std::size_t size;

    /// fn(job index, kind, data, size) for each new record.
    template <class F>
    void for_each(F&& fn) const {
        walk_records(data, size, first, [&](std::uint32_t i, std::uint32_t kind, const unsigned char* p, std::size_t n) {
            if (i >= from && i < to) fn(job_first + i, kind, p, n);
        });
    }
    /// As for_each, with the new values of a dense record as runs:
    /// run(job index, count, elem, data).
    template <class Item, class Run>
    void for_each_run(Item&& item, Run&& run) const {
        walk_record_runs(
            data, size, first,
            [&](std::uint32_t i, std::uint32_t kind, const unsigned char* p, std::size_t n) {
                if (i >= from && i < to) item(job_first + i, kind, p, n);
            },
            [&](std::uint32_t i, std::uint32_t count, std::size_t elem, const unsigned char* p) {
                const std::uint32_t lo = std::max(i, from), hi = std::min(i + count, to);
                if (lo < hi) run(job_first + lo, hi - lo, elem, p + (lo - i) * elem);
            });
    }
};

/// One submission (map, apply_async, imap, ...): receives the outcome of each
/// of its items, by index, from whoever reads the pool's results (or from terminate()).
class JobBase {
public:
    virtual ~JobBase() = default;
    virtual void on_value(std::size_t index, Decoder& value) = 0;
    virtual void on_error(std::size_t index, std::exception_ptr error) = 0;
    /// A batch of outcomes made in the parent; a job may take it at once.
    virtual void on_items(const JobItem* items, std::size_t n) {
        for (std::size_t i = 0; i < n; ++i) deliver_one(items[i]);
    }
    /// The new outcomes of one result message; a job may take them at once.
    virtual void on_records(const JobRecords& r) {
        r.for_each([&](std::size_t index, std::uint32_t kind, const unsigned char* data, std::size_t size) {
            deliver_one(JobItem{index, kind, data, size, nullptr});
        });
    }

protected:
    void deliver_one(const JobItem& x) {
        try {
            if (x.error) {
                on_error(x.index, x.error);
                return;
            }
            Decoder d(x.data, x.size);
            if (x.kind == 0) {
                on_value(x.index, d);
            } else {
                on_error(x.index, decode_exception(d));
            }
        } catch (...) {
            on_error(x.index, std::current_exception());  // a result that does not decode fails its item
        }
    }
};

/// The size of a task message's header (impl/pool.cpp: PoolTaskHeader).
constexpr std::size_t pool_task_room = 56;

/// A chunk on its way to a worker: the encoded task message and where each
/// item's arguments start in it (so that the rest of a chunk can be sent again
/// when its worker dies in the middle).
struct ChunkDraft {
    Shared<JobBase> job;
    std::size_t job_first = 0;
    std::uint32_t count = 0;
    /// pool_task_room bytes for the task header (so that a chunk's first
    /// sending needs no copy), then the items' arguments, back to back.
    Encoder args;
    std::vector<std::uint32_t> offsets;  // offsets[i]: start of item i in args
    std::uint32_t stride = 0;            // nonzero: item i starts at pool_task_room + i * stride (no offsets)
};

struct PoolTarget {
    os::CodeRef fn;      // the user's function (empty for a ProcessRunner call)
    os::CodeRef runner;  // the ChunkRunner instance that decodes and calls it
};

/// Starts one worker process for a boot (made by Pool / ProcessRunner, which
/// know the initializer's types); returns its Process.
using WorkerFactory = std::function<std::unique_ptr<Process<void>>(const PoolWorkerBoot& boot)>;

/// PoolSettings::kind of a ProcessRunner (a pointer, not a literal: each
/// length of literal assigned to a std::string costs an includer its checks).
inline constexpr const char* runner_kind = "runner";

struct PoolSettings {
    int processes = 1;
    std::uint64_t maxtasks = 0;
    os::CodeRef initializer;
    bool replace_dead_workers = true;  // false: a ProcessRunner (one death ends it)
    std::string kind = "pool";         // for messages: "pool" or runner_kind
};

struct PoolDeliveries;

/// The non-template part of a Pool: workers, dispatch, reading results, the result thread.
class PoolCore : public std::enable_shared_from_this<PoolCore> {
public:
    MPSERVICE_API static std::shared_ptr<PoolCore> create(PoolSettings settings, WorkerFactory factory);
    MPSERVICE_API ~PoolCore();

    /// Queues chunks of `target`; InvalidStateError after close()/terminate(),
    /// the worker's error once a ProcessRunner has died.
    MPSERVICE_API void submit(const PoolTarget& target, std::vector<ChunkDraft>& chunks);
    MPSERVICE_API void close();
    MPSERVICE_API void terminate();
    /// Waits for the workers to end (after close or terminate).
    MPSERVICE_API void join();
    /// Throws what submit() would throw now (closed, terminated, broken).
    MPSERVICE_API void check_accepting() const;
    /// Pids of the live workers (for tests and diagnostics).
    MPSERVICE_API std::vector<long> worker_pids() const;
    int processes() const noexcept { return settings_.processes; }

    /// Waits until done() or the deadline (false then) by reading the pool's
    /// results in the calling thread: a waiting caller takes its own result
    /// off the result ring, with no hand-off through the result thread.
    /// While another thread holds the reader role (and delivers to everyone),
    /// it sleeps in sleep(until) slices instead.  Safe from any thread.
    MPSERVICE_API bool serve_until(const std::function<bool()>& done, os::Deadline deadline,
                                   const std::function<void(os::Deadline)>& sleep);

    /// Items per chunk when the caller gives none (Python's rule for map).
    static std::size_t default_chunksize(std::size_t n, int processes) {
        std::size_t per = static_cast<std::size_t>(processes) * 4;
        std::size_t c = n / per + (n % per ? 1 : 0);
        return c ? c : 1;
    }

    struct State;
    using Deliveries = PoolDeliveries;
    MPSERVICE_API PoolCore(PoolSettings settings, WorkerFactory factory);

private:
    /// `replacement`: a worker that takes the place of one that ended
    /// (maxtasksperchild, a crash) - started from a warm child under spawn.
    void start_worker(std::size_t i, bool replacement = false);
    bool send_locked(std::size_t worker, std::uint64_t chunk, bool may_block);
    void dispatch_locked();
    void maybe_finish_locked();
    void complete_locked(std::uint64_t chunk);
    void book_results(const unsigned char* p, std::size_t n, Deliveries& out);
    bool read_results(os::Deadline deadline, Deliveries& out);
    bool wait_workers_ended(os::Deadline deadline);
    std::vector<const void*> dead_workers() const;
    void handle_deaths(const std::vector<const void*>& dead, Deliveries& out);
    void reconcile_locked(std::size_t worker, Deliveries& out);
    void fail_all_locked(const std::exception_ptr& e, Deliveries& out);
    void result_loop();

    Owned<State> s_;
    PoolSettings settings_;
};

/// The code reference of a function pointer (cached per function).
MPSERVICE_API os::CodeRef pool_code_ref(const void* fn);
template <class Fn>
const void* fn_address(Fn fn) {
    return reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(fn));
}

/// Appends one item's arguments to a chunk.  An item carrying OS handles
/// (a Queue, a Lock, ...) travels alone in its chunk, since the handles go to
/// the worker beside the chunk rather than inside it.
class ChunkBuilder {
public:
    MPSERVICE_API ChunkBuilder(std::shared_ptr<JobBase> job, std::size_t chunksize);

    template <class... A>
    void add(const A&... args) {
        if (chunks_.empty() || chunks_.back().count >= chunksize_ || carries_handles(chunks_.back()) ||
            chunks_.back().stride)
            open();
        ChunkDraft* c = &chunks_.back();
        std::size_t at = c->args.bytes().size();
        c->offsets.push_back(static_cast<std::uint32_t>(at));
        (c->args.write(args), ...);
        if (!c->args.handles().empty() && c->count > 0) {
            // Handles in an item that has neighbours: move it to a chunk of its own.
            c->args.bytes().resize(at);
            c->offsets.pop_back();
            c->args = rebuild_without_handles(*c);
            open();
            c = &chunks_.back();
            c->offsets.push_back(static_cast<std::uint32_t>(c->args.bytes().size()));
            (c->args.write(args), ...);
        }
        check_size(*c);
        ++c->count;
        ++items_;
    }
    /// Appends the `n` items at `p`, one bitwise argument each, a block per
    /// chunk (the fast path of map over a contiguous range of numbers).
    template <class T>
    void add_bitwise(const T* p, std::size_t n) {
        static_assert(is_bitwise_v<T>, "add_bitwise: the codec must copy T byte for byte");
        while (n) {
            if (chunks_.empty() || chunks_.back().count >= chunksize_ || carries_handles(chunks_.back()) ||
                (chunks_.back().count && chunks_.back().stride != sizeof(T)))
                open();
            ChunkDraft& c = chunks_.back();
            c.stride = static_cast<std::uint32_t>(sizeof(T));  // items side by side: no offsets kept
            const std::size_t k = std::min<std::size_t>(n, chunksize_ - c.count);
            if (c.args.bytes().size() + k * sizeof(T) > 0xFFFFFFF0u) throw_too_big();
            c.args.write_bytes(p, k * sizeof(T));
            c.count += static_cast<std::uint32_t>(k);
            items_ += k;
            p += k;
            n -= k;
        }
    }
    std::size_t items() const noexcept { return items_; }
    std::size_t chunksize() const noexcept { return chunksize_; }
    std::vector<ChunkDraft>& chunks() noexcept { return chunks_; }
    /// Whether a chunk is complete (a later one has been opened).
    bool has_full() const noexcept { return chunks_.size() > 1; }
    /// Takes the complete chunks, leaving the one being filled.
    MPSERVICE_API std::vector<ChunkDraft> take_full();

private:
    // The non-template parts are defined in the implementation (impl/pool.cpp):
    // what an includer compiles stays small, and none of them runs per item.
    static bool carries_handles(const ChunkDraft& c) { return !c.args.handles().empty(); }
    MPSERVICE_API static Encoder rebuild_without_handles(ChunkDraft& c);
    [[noreturn]] MPSERVICE_API static void throw_too_big();
    static void check_size(const ChunkDraft& c) {
        if (c.args.bytes().size() > 0xFFFFFFF0u) throw_too_big();
    }
    /// Opens the next chunk (once per chunk, not per item).
    MPSERVICE_API void open();

    Shared<JobBase> job_;
    std::size_t chunksize_;
    std::size_t items_ = 0;
    std::vector<ChunkDraft> chunks_;
};

/// Whether `Range` is contiguous storage of T (std::vector<T>, std::array, a
/// C array, ...): map then encodes a chunk's arguments as one block.
template <class Range, class T, class = void>
struct contiguous_range_of : std::false_type {};
template <class Range, class T>
struct contiguous_range_of<Range, T,
                           std::void_t<decltype(std::data(std::declval<const Range&>())),
                                       decltype(std::size(std::declval<const Range&>()))>>
    : std::is_same<std::remove_cv_t<std::remove_pointer_t<decltype(std::data(std::declval<const Range&>()))>>, T> {};

template <class A>
struct tuple_args;
template <class... A>
struct tuple_args<std::tuple<A...>> {
    template <class Fn>
    static constexpr ChunkRunner runner() {
        return &run_function_chunk<Fn, A...>;
    }
};

/// A callback threw: logged (as Python's pool does not stop for it either).
MPSERVICE_API void log_callback_error(const std::exception_ptr& e);

/// What an AsyncState's waiter does, whatever its R (in the implementation):
/// it serves the results of the pool or runner that resolves it itself.
class PoolResultState : public FutureCore {
public:
    MPSERVICE_API PoolResultState();
    /// The pool or runner whose results resolve it: a waiter reads them itself.
    MPSERVICE_API void read_from(const Shared<PoolCore>& pool);
    MPSERVICE_API bool wait_until(os::Deadline deadline) const override;

private:
    std::weak_ptr<PoolCore> pool_;
};

/// The outcome state of an AsyncResult: the value, and the callbacks that run
/// (in whichever thread read the result) before it resolves.
template <class R>
class AsyncState : public PoolResultState {
public:
    using Holder = std::conditional_t<std::is_void_v<R>, bool, R>;
    using Success = std::function<void(const Holder&)>;
    using Failure = std::function<void(const std::exception_ptr&)>;

    AsyncState(Success s, Failure f) : on_success_(std::move(s)), on_failure_(std::move(f)) { mark_started(); }

    void succeed(Holder v) {
        value_.emplace(std::move(v));
        if (on_success_) run_callback([&] { on_success_(*value_); });
        resolve(nullptr);
    }
    void fail(std::exception_ptr e) {
        if (on_failure_) run_callback([&] { on_failure_(e); });
        resolve(e);
    }
    const Holder& value() const { return *value_; }
    /// Moves the value out (for the pool's blocking calls, which own their AsyncResult).
    Holder take_value() { return std::move(*value_); }

private:
    template <class F>
    void run_callback(F&& f) {
        try {
            f();
        } catch (...) {
            log_callback_error(std::current_exception());
        }
    }
    std::optional<Holder> value_;
    Success on_success_;
    Failure on_failure_;
};

/// map / map_async / starmap: every item's outcome in input order; the
/// first failure by position once all have finished.
template <class R>
class MapJob final : public JobBase {
    using Slot = std::conditional_t<std::is_void_v<R>, bool, R>;
    // Values in place when a Slot can be made empty, so that the finished
    // vector is handed over without a copy; else each in an optional.
    static constexpr bool in_place = std::is_default_constructible_v<Slot>;
    using Stored = std::conditional_t<in_place, Slot, std::optional<Slot>>;
    enum : unsigned char { empty = 0, value = 1, failed = 2 };

public:
    explicit MapJob(std::shared_ptr<AsyncState<std::conditional_t<std::is_void_v<R>, void, std::vector<Slot>>>> st)
        : state_(std::move(st)) {}

    void expect(std::size_t n) {
        slots_.resize(n);
        have_.assign(n, empty);
        remaining_ = n;
        if (n == 0) finish();
    }
    void on_value(std::size_t index, Decoder& d) override {
        std::unique_lock<std::mutex> lk(mutex_);
        if (!take_value(index, d)) return;
        settle(lk, 1);
    }
    void on_error(std::size_t index, std::exception_ptr e) override {
        std::unique_lock<std::mutex> lk(mutex_);
        if (!take_error(index, std::move(e))) return;
        settle(lk, 1);
    }
    /// A batch under one lock.
    void on_items(const JobItem* items, std::size_t n) override {
        std::unique_lock<std::mutex> lk(mutex_);
        std::size_t settled = 0;
        for (std::size_t i = 0; i < n; ++i) {
            const JobItem& x = items[i];
            settled += x.error ? take_error(x.index, x.error) : take_record(x.index, x.kind, x.data, x.size);
        }
        if (settled) settle(lk, settled);
    }
    /// A whole result message under one lock, decoded in place: the fast path of map.
    void on_records(const JobRecords& r) override {
        std::unique_lock<std::mutex> lk(mutex_);
        std::size_t settled = 0;
        auto item = [&](std::size_t index, std::uint32_t kind, const unsigned char* data, std::size_t size) {
            settled += take_record(index, kind, data, size);
        };
        if constexpr (dense_result<R> && in_place) {
            r.for_each_run(item, [&](std::size_t index, std::uint32_t count, std::size_t elem, const unsigned char* data) {
                if (elem != sizeof(R) || index + count > slots_.size()) {
                    for (std::uint32_t k = 0; k < count; ++k) item(index + k, record_value, data + k * elem, elem);
                    return;
                }
                for (std::uint32_t k = 0; k < count; ++k) {
                    if (have_[index + k] != empty) continue;
                    std::memcpy(static_cast<void*>(&slots_[index + k]), data + k * sizeof(R), sizeof(R));
                    have_[index + k] = value;
                    ++settled;
                }
            });
        } else {
            r.for_each(item);
        }
        if (settled) settle(lk, settled);
    }

private:
    bool take_record(std::size_t index, std::uint32_t kind, const unsigned char* data, std::size_t size) {
        try {
            Decoder d(data, size);
            return kind == 0 ? take_value(index, d) : take_error(index, decode_exception(d));
        } catch (...) {
            return take_error(index, std::current_exception());  // a result that does not decode fails its item
        }
    }
    bool take_value(std::size_t index, Decoder& d) {
        if (index >= slots_.size() || have_[index] != empty) return false;
        if constexpr (std::is_void_v<R>) {
            slots_[index] = true;
        } else if constexpr (in_place) {
            slots_[index] = d.read<R>();
        } else {
            slots_[index].emplace(d.read<R>());
        }
        have_[index] = value;
        return true;
    }
    bool take_error(std::size_t index, std::exception_ptr e) {
        if (index >= slots_.size() || have_[index] != empty) return false;
        have_[index] = failed;
        if (index < first_error_index_) {  // the failure at the lowest position is the one reported
            first_error_index_ = index;
            first_error_ = std::move(e);
        }
        return true;
    }
    void settle(std::unique_lock<std::mutex>& lk, std::size_t n) {
        remaining_ -= n;
        if (remaining_ != 0) return;
        lk.unlock();
        finish();
    }
    void finish() {
        if (first_error_index_ != no_error) {
            state_->fail(first_error_);
            return;
        }
        if constexpr (std::is_void_v<R>) {
            state_->succeed(true);
        } else if constexpr (in_place) {
            state_->succeed(std::move(slots_));
        } else {
            std::vector<Slot> out;
            out.reserve(slots_.size());
            for (auto& s : slots_) out.push_back(std::move(*s));
            slots_.clear();
            state_->succeed(std::move(out));
        }
    }

    std::mutex mutex_;
    std::vector<Stored> slots_;
    std::vector<unsigned char> have_;
    static constexpr std::size_t no_error = ~std::size_t(0);
    std::size_t first_error_index_ = no_error;  // the lowest position that failed (no_error: none)
    std::exception_ptr first_error_;
    std::size_t remaining_ = 0;
    std::shared_ptr<AsyncState<std::conditional_t<std::is_void_v<R>, void, std::vector<Slot>>>> state_;
};

/// apply / apply_async: one item.
template <class R>
class SingleJob final : public JobBase {
public:
    explicit SingleJob(std::shared_ptr<AsyncState<R>> st) : state_(std::move(st)) {}
    void on_value(std::size_t, Decoder& d) override {
        if (settled_.exchange(true)) return;
        if constexpr (std::is_void_v<R>) {
            (void)d;
            state_->succeed(true);
        } else {
            state_->succeed(d.read<R>());
        }
    }
    void on_error(std::size_t, std::exception_ptr e) override {
        if (settled_.exchange(true)) return;
        state_->fail(std::move(e));
    }

private:
    std::atomic<bool> settled_{false};
    std::shared_ptr<AsyncState<R>> state_;
};

/// Pulls items from the caller's input range, lazily, into chunks.
class InputFeed {
public:
    virtual ~InputFeed() = default;
    /// Adds up to `n` items to `b`; false once the input is exhausted.  An
    /// exception from the input range propagates.
    virtual bool pull(ChunkBuilder& b, std::size_t n) = 0;
};
template <class Range, class Arg, bool Star>
class InputFeedOf final : public InputFeed {
public:
    explicit InputFeedOf(Range&& r) : range_(std::forward<Range>(r)), it_(std::begin(range_)), end_(std::end(range_)) {}
    bool pull(ChunkBuilder& b, std::size_t n) override {
        for (std::size_t i = 0; i < n; ++i) {
            if (!(it_ != end_)) return false;
            if constexpr (Star) {
                std::apply([&](const auto&... a) { b.add(a...); }, Arg(*it_));
            } else {
                b.add(Arg(*it_));
            }
            ++it_;
        }
        return true;
    }

private:
    Range range_;  // a reference for an lvalue range, a copy of an rvalue one
    decltype(std::begin(std::declval<std::remove_reference_t<Range>&>())) it_;
    decltype(std::end(std::declval<std::remove_reference_t<Range>&>())) end_;
};

/// imap / imap_unordered: outcomes buffered until the consumer takes them.
/// The buffer holds at most the pool's window of items (ImapResult bounds
/// what is in flight), kept in deques: no allocation per item.
template <class R>
class StreamJob final : public JobBase {
public:
    using Slot = std::conditional_t<std::is_void_v<R>, bool, R>;
    struct Outcome {
        std::optional<Slot> value;
        std::exception_ptr error;
    };
    explicit StreamJob(bool ordered) : ordered_(ordered) {}

    void on_value(std::size_t index, Decoder& d) override {
        std::lock_guard<std::mutex> lk(mutex);
        put(index, decode_value(d));
        cv.notify_all();
    }
    void on_error(std::size_t index, std::exception_ptr e) override {
        Outcome o;
        o.error = std::move(e);
        std::lock_guard<std::mutex> lk(mutex);
        put(index, std::move(o));
        cv.notify_all();
    }
    /// A whole result message under one lock, one wake-up.
    void on_records(const JobRecords& r) override {
        std::lock_guard<std::mutex> lk(mutex);
        r.for_each([&](std::size_t index, std::uint32_t kind, const unsigned char* data, std::size_t size) {
            Outcome o;
            try {
                Decoder d(data, size);
                if (kind == 0) {
                    o = decode_value(d);
                } else {
                    o.error = decode_exception(d);
                }
            } catch (...) {
                o.value.reset();
                o.error = std::current_exception();  // a result that does not decode fails its item
            }
            put(index, std::move(o));
        });
        cv.notify_all();
    }
    /// The next outcome in the consumer's order if one is there.
    std::optional<Outcome> take() {
        if (!has_next()) return std::nullopt;
        Outcome o;
        if (ordered_) {
            o = std::move(*window_.front());
            window_.pop_front();
        } else {
            o = std::move(arrived_.front());
            arrived_.pop_front();
        }
        ++next_;
        return o;
    }
    std::size_t taken() const noexcept { return next_; }
    /// Whether take() would give an outcome.
    bool has_next() const {
        return ordered_ ? !window_.empty() && window_.front().has_value() : !arrived_.empty();
    }

    std::mutex mutex;
    std::condition_variable cv;

private:
    static Outcome decode_value(Decoder& d) {
        Outcome o;
        if constexpr (std::is_void_v<R>) {
            (void)d;
            o.value.emplace(true);
        } else {
            o.value.emplace(d.read<R>());
        }
        return o;
    }
    void put(std::size_t index, Outcome o) {
        if (!ordered_) {
            arrived_.push_back(std::move(o));
            return;
        }
        if (index < next_) return;  // cannot happen: every item has one outcome
        std::size_t at = index - next_;
        if (window_.size() <= at) window_.resize(at + 1);
        window_[at].emplace(std::move(o));
    }
    bool ordered_;
    std::deque<std::optional<Outcome>> window_;  // ordered: item next_ + i at i
    std::deque<Outcome> arrived_;                // unordered: as they came
    std::size_t next_ = 0;
};

}  // namespace detail

template <>
struct Codec<detail::PoolWorkerBoot> {
    MPSERVICE_API static void encode(Encoder& e, const detail::PoolWorkerBoot& b);
    MPSERVICE_API static detail::PoolWorkerBoot decode(Decoder& d);
};

/// The future of one submission to a Pool (apply_async, map_async) or a
/// ProcessRunner (submit).  It is a Worker, so mp::wait / mp::as_completed
/// take it among Processes and Threads.  Movable, not copyable.
template <class R>
class AsyncResult : public Worker {
    using State = detail::AsyncState<R>;

public:
    explicit AsyncResult(std::shared_ptr<State> st) : Worker(st) {}  // named "AsyncResult" by PoolResultState
    AsyncResult(AsyncResult&&) noexcept = default;
    AsyncResult& operator=(AsyncResult&&) noexcept = default;

    /// The value (waits); re-throws the task's exception (typed, as from Process).
    detail::result_ref_t<R> get() { return get_at(detail::os::no_deadline); }
    /// As get(), but TimeoutError if the result is not there within `timeout`.
    template <class Rep, class Period>
    detail::result_ref_t<R> get(std::chrono::duration<Rep, Period> timeout) {
        return get_at(detail::os::deadline_after(timeout));
    }
    /// Waits for the result; the callbacks have run when it returns.
    void wait() { core_->wait_until(detail::os::no_deadline); }
    /// Waits at most `timeout`; true if the result is there.
    template <class Rep, class Period>
    bool wait(std::chrono::duration<Rep, Period> timeout) {
        return core_->wait_until(detail::os::deadline_after(timeout));
    }
    /// Whether the result is there (its callbacks have run).
    bool ready() const { return core_->done(); }
    /// Whether it ended with a value; InvalidStateError while not ready (Python: ValueError).
    bool successful() const {
        if (!ready()) throw InvalidStateError("mpservice: successful() called on an AsyncResult that is not ready");
        return core_->error() == nullptr;
    }

    /// As get(), moving the value out of the (temporary) AsyncResult: what
    /// the blocking calls (Pool::map, apply, ProcessRunner's call) return, so
    /// that a map's vector is handed over, not copied.
    R take() && {
        get_at(detail::os::no_deadline);
        if constexpr (!std::is_void_v<R>) return state().take_value();
    }

private:
    State& state() const { return static_cast<State&>(*core_); }
    detail::result_ref_t<R> get_at(detail::os::Deadline deadline) {
        if (!core_->wait_until(deadline)) throw TimeoutError("mpservice: the result was not ready within the timeout");
        if (auto e = core_->error()) detail::rethrow_exception(e);
        if constexpr (!std::is_void_v<R>) return state().value();
    }
};

/// The lazy result of imap / imap_unordered: a single-pass input range.
/// Iterating yields each result; a failed task throws its exception from
/// next() (or the iterator's ++), and next() may be called again to go on.
/// At most a bounded number of chunks are in flight or buffered, so an input
/// of any length (read only as the results are consumed) uses bounded memory.
template <class R>
class ImapResult {
    using Job = detail::StreamJob<R>;
    using Slot = typename Job::Slot;

public:
    /// The next result in order (imap) or as it finished (imap_unordered);
    /// std::nullopt at the end.  Re-throws the task's exception, or - after
    /// every earlier result - the exception the input range threw.
    std::optional<Slot> next() { return next_at(detail::os::no_deadline); }
    /// As next(), but TimeoutError if no result comes within `timeout`.
    template <class Rep, class Period>
    std::optional<Slot> next(std::chrono::duration<Rep, Period> timeout) {
        return next_at(detail::os::deadline_after(timeout));
    }

    class iterator {
    public:
        using value_type = Slot;
        using reference = const Slot&;
        using difference_type = std::ptrdiff_t;
        using iterator_category = std::input_iterator_tag;
        const Slot& operator*() const { return *current_; }
        iterator& operator++() {
            current_ = owner_->next();
            return *this;
        }
        bool operator==(const iterator& o) const noexcept { return current_.has_value() == o.current_.has_value(); }
        bool operator!=(const iterator& o) const noexcept { return !(*this == o); }

    private:
        friend class ImapResult;
        iterator(ImapResult* owner, std::optional<Slot> c) : owner_(owner), current_(std::move(c)) {}
        ImapResult* owner_;
        std::optional<Slot> current_;
    };
    iterator begin() { return iterator(this, next()); }
    iterator end() { return iterator(this, std::nullopt); }

    ImapResult(detail::Shared<detail::PoolCore> pool, detail::PoolTarget target, detail::Owned<detail::InputFeed> feed,
               std::size_t chunksize, bool ordered)
        : pool_(std::move(pool)),
          target_(target),
          feed_(std::move(feed)),
          job_(std::make_shared<Job>(ordered)),
          chunksize_(chunksize ? chunksize : 1),
          window_chunks_(static_cast<std::size_t>(pool_->processes()) * 4) {
        top_up();
    }

private:
    /// Submits chunks until `window_chunks_` worth of items are outstanding.
    void top_up() {
        while (!exhausted_ && submitted_ - consumed() < window_chunks_ * chunksize_) {
            detail::ChunkBuilder b(job_, chunksize_);
            b.chunks().reserve(1);
            bool more;
            try {
                more = feed_->pull(b, chunksize_);
            } catch (...) {
                input_error_ = std::current_exception();
                more = false;
            }
            // A builder's items are numbered from 0: shift them to this job's positions.
            for (auto& c : b.chunks()) c.job_first += submitted_;
            if (b.items()) pool_->submit(target_, b.chunks());
            submitted_ += b.items();
            if (!more) exhausted_ = true;
        }
    }
    /// Items the consumer has taken (only this thread takes them: no lock).
    std::size_t consumed() const noexcept { return consumed_; }
    /// Moves every outcome that is ready into taken_ (the job's lock held).
    void take_ready() {
        while (auto o = job_->take()) taken_.push_back(std::move(*o));
    }
    std::optional<Slot> pop_taken() {
        typename Job::Outcome o = std::move(taken_.front());
        taken_.pop_front();
        ++consumed_;
        if (o.error) detail::rethrow_exception(o.error);
        return std::move(o.value);
    }
    std::optional<Slot> next_at(detail::os::Deadline deadline) {
        for (;;) {
            if (!taken_.empty()) return pop_taken();
            top_up();
            {
                // Everything that is ready at once, under one lock.
                std::lock_guard<std::mutex> lk(job_->mutex);
                take_ready();
            }
            if (!taken_.empty()) return pop_taken();
            if (exhausted_ && consumed_ == submitted_) {
                if (input_error_) {
                    auto e = input_error_;
                    input_error_ = nullptr;
                    std::rethrow_exception(e);
                }
                return std::nullopt;
            }
            // Read the pool's results here (no hand-off through its thread)
            // until the next one of ours is there.
            bool got = pool_->serve_until(
                [this] {
                    std::lock_guard<std::mutex> g(job_->mutex);
                    return job_->has_next();
                },
                deadline,
                [this](detail::os::Deadline d) {
                    std::unique_lock<std::mutex> g(job_->mutex);
                    job_->cv.wait_until(g, d, [this] { return job_->has_next(); });
                });
            if (!got) {
                {
                    std::lock_guard<std::mutex> lk(job_->mutex);
                    take_ready();
                }
                if (!taken_.empty()) return pop_taken();
                throw TimeoutError("mpservice: no imap result within the timeout");
            }
        }
    }

    detail::Shared<detail::PoolCore> pool_;
    detail::PoolTarget target_;
    detail::Owned<detail::InputFeed> feed_;
    std::shared_ptr<Job> job_;
    std::size_t chunksize_;
    std::size_t window_chunks_;
    std::size_t submitted_ = 0;
    std::size_t consumed_ = 0;
    std::deque<typename Job::Outcome> taken_;  // taken from the job, not yet returned
    bool exhausted_ = false;
    std::exception_ptr input_error_;
};

/// Options of a Pool beyond the number of processes.
struct PoolOptions {
    /// A worker is replaced after this many tasks (a chunk counts as one, as
    /// in Python); 0 = never.  Negative is std::invalid_argument.
    long maxtasksperchild = 0;
};

/// A pool of worker processes (see the top of this part).
class Pool {
public:
    // The constructors without initializer are templates only so that the
    // worker start they instantiate (a Process over the pool's entry) is
    // compiled, and linked, only where such a Pool is made - not in every
    // translation unit that includes the header.

    /// cpu_count() workers in the default context (spawn unless set_start_method chose another).
    template <class NoInitializer = void>
    Pool() : Pool(default_context(), cpu_count()) {}
    /// `processes` workers (≤ 0 is std::invalid_argument) in the default context.
    template <class NoInitializer = void>
    explicit Pool(int processes, PoolOptions options = {}) : Pool(default_context(), processes, options) {}
    /// Workers made by `ctx`.
    template <class NoInitializer = void>
    Pool(const Context& ctx, int processes, PoolOptions options = {})
        : Pool(ctx, processes, options, &detail::pool_no_initializer) {}
    /// Workers that each run initializer(initargs...) once before any task.
    /// The initializer's arguments may be library handles (they travel with
    /// the worker's start, as Process arguments do).
    template <class Init, class... A>
    Pool(const Context& ctx, int processes, PoolOptions options, Init initializer, A&&... initargs) {
        if (processes <= 0)
            throw std::invalid_argument("mpservice: Pool needs at least one process (got " +
                                        std::to_string(processes) + ")");
        if (options.maxtasksperchild < 0)
            throw std::invalid_argument("mpservice: maxtasksperchild must be positive (or 0 for no limit)");
        static_assert(detail::function_pointer_of<Init>::value,
                      "mpservice: a Pool initializer must be a function, a static member function or a "
                      "capture-less lambda");
        auto fp = detail::function_pointer_of<Init>::get(initializer);
        using Fp = decltype(fp);
        detail::PoolSettings s;
        s.processes = processes;
        s.maxtasks = static_cast<std::uint64_t>(options.maxtasksperchild);
        if (detail::fn_address(fp) != detail::fn_address(&detail::pool_no_initializer))
            s.initializer = detail::pool_code_ref(detail::fn_address(fp));
        Context c = ctx;  // a copy: the caller's context may be a temporary
        auto entry = &detail::pool_worker_entry<Fp, std::decay_t<A>...>;
        detail::WorkerFactory factory =
            [c, entry, args = std::make_tuple(std::decay_t<A>(std::forward<A>(initargs))...)](
                const detail::PoolWorkerBoot& boot) {
                return std::apply(
                    [&](const auto&... a) { return std::make_unique<Process<void>>(c, entry, boot, a...); }, args);
            };
        core_ = detail::PoolCore::create(std::move(s), std::move(factory));
    }
    Pool(const Pool&) = delete;
    Pool& operator=(const Pool&) = delete;
    /// Terminates the pool (as Python's context manager does): running tasks
    /// are stopped and unfinished results fail with InvalidStateError.
    ~Pool() {
        try {
            core_->terminate();
            core_->join();
        } catch (...) {
        }
    }

    /// f(args...) in a worker; waits for the value, re-throws its exception.
    template <class F, class... A>
    auto apply(F f, A&&... args) {
        return apply_async(f, std::forward<A>(args)...).take();
    }
    /// f(args...) in a worker, without waiting.
    template <class F, class... A>
    auto apply_async(F f, A&&... args) {
        using R = detail::process_result_t<F, A...>;
        return apply_async_with(typename detail::AsyncState<R>::Success(), typename detail::AsyncState<R>::Failure(), f,
                                std::forward<A>(args)...);
    }
    /// As apply_async, with callbacks run in the parent (on the thread that
    /// read the result) before the result becomes ready: on_success(value) or on_error(e).
    template <class F, class S, class E, class... A>
    auto apply_async_with(S on_success, E on_error, F f, A&&... args) {
        using Fp = decltype(detail::function_pointer_of<F>::get(f));
        using R = detail::process_result_t<F, A...>;
        auto st = std::make_shared<detail::AsyncState<R>>(std::move(on_success), std::move(on_error));
        st->read_from(core_);
        auto job = std::make_shared<detail::SingleJob<R>>(st);
        detail::ChunkBuilder b(job, 1);
        b.add(std::decay_t<A>(args)...);
        submit<Fp, std::decay_t<A>...>(f, b.chunks());
        return AsyncResult<R>(st);
    }

    /// f(x) for each x of `inputs`, in input order.  Waits until every task has
    /// finished, then re-throws the first failure by input position.
    template <class F, class Range>
    auto map(F f, const Range& inputs, std::size_t chunksize = 0) {
        return map_async(f, inputs, chunksize).take();
    }
    template <class F, class Range>
    auto map_async(F f, const Range& inputs, std::size_t chunksize = 0) {
        using Arg = std::decay_t<decltype(*std::begin(inputs))>;
        using R = detail::process_result_t<F, Arg>;
        using V = std::conditional_t<std::is_void_v<R>, void, std::vector<R>>;
        return map_async_with(typename detail::AsyncState<V>::Success(), typename detail::AsyncState<V>::Failure(), f,
                              inputs, chunksize);
    }
    /// As map_async; on_success gets the whole vector once, on_error the first
    /// failure once (and on_success is then never called).
    template <class F, class Range, class S, class E>
    auto map_async_with(S on_success, E on_error, F f, const Range& inputs, std::size_t chunksize = 0) {
        using Arg = std::decay_t<decltype(*std::begin(inputs))>;
        return map_like<F, std::tuple<Arg>>(std::move(on_success), std::move(on_error), f, inputs, chunksize,
                                            [](ChunkAdder& add, const Arg& a) { add(a); });
    }
    /// f(a, b, ...) for each tuple of `inputs`, in input order.
    template <class F, class Range>
    auto starmap(F f, const Range& inputs, std::size_t chunksize = 0) {
        return starmap_async(f, inputs, chunksize).take();
    }
    template <class F, class Range>
    auto starmap_async(F f, const Range& inputs, std::size_t chunksize = 0) {
        using Tuple = std::decay_t<decltype(*std::begin(inputs))>;
        using R = decltype(std::apply(f, std::declval<Tuple>()));
        using V = std::conditional_t<std::is_void_v<R>, void, std::vector<R>>;
        return map_like<F, Tuple>(typename detail::AsyncState<V>::Success(), typename detail::AsyncState<V>::Failure(),
                                  f, inputs, chunksize,
                                  [](ChunkAdder& add, const Tuple& t) { std::apply(add, t); });
    }

    /// f(x) for each x, yielded in input order as a lazy range (chunksize 1 by
    /// default, as in Python).  Range is held by reference if an lvalue.
    template <class F, class Range>
    auto imap(F f, Range&& inputs, std::size_t chunksize = 1) {
        return imap_impl<false>(f, std::forward<Range>(inputs), chunksize, true);
    }
    /// As imap, in the order the tasks finish.
    template <class F, class Range>
    auto imap_unordered(F f, Range&& inputs, std::size_t chunksize = 1) {
        return imap_impl<false>(f, std::forward<Range>(inputs), chunksize, false);
    }

    /// No more submissions; the workers exit once the queued work is done.
    void close() { core_->close(); }
    /// Stops the workers now (SIGTERM); unfinished results fail with InvalidStateError.
    void terminate() { core_->terminate(); }
    /// Waits for the workers to exit; InvalidStateError before close()/terminate().
    void join() { core_->join(); }

    /// The pids of the live workers (a snapshot).
    MPSERVICE_API std::vector<long> worker_pids() const;
    int processes() const noexcept { return core_->processes(); }

private:
    struct ChunkAdder {
        detail::ChunkBuilder& b;
        template <class... A>
        void operator()(const A&... a) {
            b.add(a...);
        }
    };

    template <class Fp, class... A, class F>
    void submit(F f, std::vector<detail::ChunkDraft>& chunks) {
        static_assert(detail::function_pointer_of<F>::value,
                      "mpservice: a pool task must be a function, a static member function or a capture-less "
                      "lambda (a lambda with captures cannot be named in another process)");
        Fp fp = detail::function_pointer_of<F>::get(f);
        detail::PoolTarget t{detail::pool_code_ref(detail::fn_address(fp)),
                             detail::pool_code_ref(detail::fn_address(&detail::run_function_chunk<Fp, A...>))};
        core_->submit(t, chunks);
    }

    template <class F, class Tuple, class S, class E, class Range, class Add>
    auto map_like(S on_success, E on_error, F f, const Range& inputs, std::size_t chunksize, Add add_item) {
        using Fp = decltype(detail::function_pointer_of<F>::get(f));
        using R = decltype(std::apply(f, std::declval<Tuple>()));
        using V = std::conditional_t<std::is_void_v<R>, void, std::vector<R>>;
        auto st = std::make_shared<detail::AsyncState<V>>(std::move(on_success), std::move(on_error));
        st->read_from(core_);
        auto job = std::make_shared<detail::MapJob<R>>(st);
        std::size_t n = 0;
        if constexpr (std::is_base_of_v<std::forward_iterator_tag,
                                        typename std::iterator_traits<decltype(std::begin(inputs))>::iterator_category>)
            n = static_cast<std::size_t>(std::distance(std::begin(inputs), std::end(inputs)));
        std::vector<Tuple> buffered;  // an input range of unknown length is read first
        if (!n) {
            for (const auto& x : inputs) buffered.emplace_back(x);
            n = buffered.size();
        }
        core_->check_accepting();
        detail::ChunkBuilder b(job, chunksize ? chunksize : detail::PoolCore::default_chunksize(n, processes()));
        ChunkAdder adder{b};
        job->expect(n);
        // Each chunk leaves as soon as it is complete: the workers start while
        // the rest of the input is encoded.
        auto flush = [&](bool all) {
            if (all) {
                apply_tuple_submit<Fp>(f, b.chunks(), static_cast<Tuple*>(nullptr));
                b.chunks().clear();
            } else if (b.has_full()) {
                auto full = b.take_full();
                apply_tuple_submit<Fp>(f, full, static_cast<Tuple*>(nullptr));
            }
        };
        using First = std::tuple_element_t<0, Tuple>;
        if constexpr (std::tuple_size_v<Tuple> == 1 && detail::is_bitwise_v<First> &&
                      detail::contiguous_range_of<Range, First>::value) {
            // Numbers (or trivially copyable structs) side by side: a block per chunk.
            const First* p = std::data(inputs);
            for (std::size_t left = n, step = b.chunksize(); left;) {
                const std::size_t k = std::min(left, step);
                b.add_bitwise(p, k);
                flush(false);
                p += k;
                left -= k;
            }
        } else if (buffered.empty()) {
            for (const auto& x : inputs) {
                add_item(adder, x);
                flush(false);
            }
        } else {
            for (const auto& t : buffered) {
                std::apply(adder, t);
                flush(false);
            }
        }
        flush(true);
        return AsyncResult<V>(st);
    }
    template <class Fp, class F, class... A>
    void apply_tuple_submit(F f, std::vector<detail::ChunkDraft>& chunks, std::tuple<A...>*) {
        if (chunks.empty()) return;
        submit<Fp, A...>(f, chunks);
    }

    template <bool, class F, class Range>
    auto imap_impl(F f, Range&& inputs, std::size_t chunksize, bool ordered) {
        using Arg = std::decay_t<decltype(*std::begin(inputs))>;
        using R = detail::process_result_t<F, Arg>;
        using Fp = decltype(detail::function_pointer_of<F>::get(f));
        static_assert(detail::function_pointer_of<F>::value,
                      "mpservice: a pool task must be a function, a static member function or a capture-less "
                      "lambda");
        core_->check_accepting();
        Fp fp = detail::function_pointer_of<F>::get(f);
        detail::PoolTarget t{detail::pool_code_ref(detail::fn_address(fp)),
                             detail::pool_code_ref(detail::fn_address(&detail::run_function_chunk<Fp, Arg>))};
        detail::Owned<detail::InputFeed> feed(new detail::InputFeedOf<Range, Arg, false>(std::forward<Range>(inputs)));
        return ImapResult<R>(core_, t, std::move(feed), chunksize, ordered);
    }

    detail::Shared<detail::PoolCore> core_;
};

}  // namespace mpservice
