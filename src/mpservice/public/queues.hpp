// queues: Queue<T>, SimpleQueue<T> and JoinableQueue<T>, typed MPMC queues in
// shared memory, usable from any number of threads and processes.
//
//     mp::Queue<std::string> q;              // unbounded, as in Python
//     mp::Queue<Job> jobs(100, 8 << 20);     // at most 100 items and 8 MiB waiting
//     q.put("hello");  std::string s = q.get();
//     if (auto v = q.try_get()) use(*v);     // nothing there: std::nullopt
//     q.get(std::chrono::milliseconds(50));  // nothing within 50 ms: throws mp::Empty
//
// A queue is a handle: copies refer to the same queue, and so does the queue a
// child receives when a Queue is passed as a Process argument (its shared memory
// travels as a file descriptor; there is no name to leak).  The memory goes away
// with the last handle in any process, whether it exits or is killed.  Items are
// any type the codec handles; items holding OS handles (a Queue, a Lock, ...)
// cannot be put into a queue - pass those as Process arguments.
//
// Bounds.  `maxsize` bounds the number of items (0: no bound, as in Python).  By
// default nothing bounds the bytes waiting: a put never waits for room, in one
// process or many (the ring is a sparse 4 GiB reservation that commits memory only
// as it fills, and gives it back as items are consumed; a default queue commits
// one page at creation).  Only past 4 GiB of encoded items waiting would a put
// wait, as on a bounded queue.  Given `capacity_bytes`, the ring is that big and
// bounds the bytes waiting: a put waits for room when it is full.  An item larger
// than half the ring (half of 1 MiB when unbounded) is streamed in chunks while a
// consumer copies them out, so items of any size pass; producers stream one at a
// time, never interleaved.
//
// Order.  Items from one producer (thread) arrive in the order it put them; items
// from several producers interleave.
//
// close().  Further puts throw QueueClosed (in every process); gets return what is
// left, then throw QueueClosed (try_get returns std::nullopt).  A put already
// running when close() is called may still land.
//
// Timeouts.  A put or get gives up at its timeout while it waits for room, for an
// item or for the queue's lock, whatever the other side does.  A get that times out
// in the middle of a chunked item (its producer stopped or slow) keeps the part it
// received: the next get in the same process continues that item, intact; a get in
// another process waits (within its timeout) until that process has taken it, or
// drops the rest if that process has ended (the item is then lost, as with a
// consumer killed mid-item).  A put that times out in the middle of a chunked item
// withdraws it: no consumer receives it.
//
// Crash safety (SIGKILL at any instant).  Producers are serialized by one robust
// mutex and consumers by another; each side publishes its ring position with a
// single store after the bytes are in place, through a journal that the next
// holder of the lock finishes if the writer died in between.  So:
//  - A producer killed inside put(): its item is either delivered whole or not at
//    all.  A half-written small item is overwritten by the next put; a large item
//    it was streaming is discarded by the consumer receiving it (a consumer waiting
//    for the next chunk checks every 20 ms whether the producer's lock owner died).
//  - A consumer killed inside get() before the item was taken off the ring leaves
//    it there for the next consumer.  Killed after that (a small item between
//    taking and returning, or a large item once its first chunk was received), the
//    item is lost and the next consumer drops the rest of it.
//  - Nothing else is lost, duplicated or reordered, and the other processes carry
//    on: a waiter never depends on a dead process (a put waiting for room whose
//    consumers all died can still time out).
//  - Batches: a producer killed inside put_many delivers a prefix of its batch
//    (whole items, in order); a consumer killed inside get_many loses at most that
//    batch - none of it before the batch's one commit, all of it after.
// For JoinableQueue, an item lost by a dead consumer is counted as done only when
// the consumers dropped part of it; one it had taken whole is waiting for its
// task_done() like any other (as in Python).
//
// Speed.  A small item costs one encode and one copy into the ring, one copy out
// (decoded in place); no system call unless the other side sleeps.  Waits spin
// ~20 us before sleeping on a futex.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "codec.hpp"
#include "errors.hpp"
#include "../detail/queue_ring.hpp"

namespace mpservice {

template <class T>
class Queue;
template <class T>
class SimpleQueue;
template <class T>
class JoinableQueue;

namespace detail {

template <class T>
struct IsByteVector : std::false_type {};
template <class E, class A>
struct IsByteVector<std::vector<E, A>> : std::bool_constant<std::is_arithmetic_v<E>> {};

/// Items as bytes.  Arithmetic and enum items are copied as they are (what their
/// codec writes); a std::string or a vector of numbers is copied straight into the
/// ring without the codec's length prefix (the record knows its length), which
/// saves a copy; everything else goes through the codec into a reused buffer.
template <class T>
struct QueueItems {
    static constexpr bool raw = std::is_arithmetic_v<T> || std::is_enum_v<T>;
    static constexpr bool contiguous = std::is_same_v<T, std::string> || IsByteVector<T>::value;

    static std::uint64_t type_tag() { return QueueCore::tag_of(typeid(T).name()); }

    template <class F>
    static decltype(auto) with_bytes(const T& item, F&& f) {
        if constexpr (raw) {
            return f(static_cast<const void*>(&item), sizeof(T));
        } else if constexpr (contiguous) {
            return f(static_cast<const void*>(item.data()), item.size() * sizeof(item[0]));
        } else {
            std::string& buffer = QueueCore::encode_buffer();
            Encoder e;
            e.bytes().swap(buffer);
            e.bytes().clear();
            struct GiveBack {
                std::string& buffer;
                Encoder& e;
                ~GiveBack() { buffer.swap(e.bytes()); }
            } give_back{buffer, e};
            e.write(item);
            if (!e.handles().empty())
                throw std::invalid_argument(
                    "mpservice: a queue item cannot hold OS handles (a Queue, Lock, Value, ...); "
                    "pass such objects as Process arguments");
            return f(static_cast<const void*>(e.bytes().data()), e.bytes().size());
        }
    }

    static void consume(void* context, const unsigned char* data, std::size_t size) {
        auto& out = *static_cast<std::optional<T>*>(context);
        if constexpr (raw) {
            if (size != sizeof(T)) throw DecodeError("decode: queue item has the wrong size for its type");
            T value;
            std::memcpy(&value, data, sizeof(T));
            out.emplace(value);
        } else if constexpr (contiguous) {
            using E = typename T::value_type;
            if constexpr (std::is_same_v<T, std::string>) {
                out.emplace(reinterpret_cast<const char*>(data), size);
            } else {
                if (size % sizeof(E)) throw DecodeError("decode: queue item has the wrong size for its type");
                out.emplace(size / sizeof(E), E());
                if (size) std::memcpy(static_cast<void*>(out->data()), data, size);
            }
        } else {
            Decoder d(data, size);
            out.emplace(d.read<T>());
            d.expect_end("queue item");
        }
    }

    /// A batch appends its items to a std::vector<T>.
    static void consume_into(void* context, const unsigned char* data, std::size_t size) {
        std::optional<T> one;
        consume(&one, data, size);
        static_cast<std::vector<T>*>(context)->push_back(std::move(*one));
    }

    /// A batch that overwrites a vector's elements from the start, keeping
    /// their storage: a string or a vector of numbers is assigned in place (no
    /// allocation once it is large enough); past the vector's end, items are
    /// appended.  The caller trims the vector to `next` afterwards.
    struct Refill {
        std::vector<T>* out;
        std::size_t next = 0;
    };
    static void consume_reusing(void* context, const unsigned char* data, std::size_t size) {
        auto& r = *static_cast<Refill*>(context);
        if (r.next >= r.out->size()) {
            consume_into(r.out, data, size);
            ++r.next;
            return;
        }
        T& slot = (*r.out)[r.next];
        if constexpr (raw) {
            if (size != sizeof(T)) throw DecodeError("decode: queue item has the wrong size for its type");
            std::memcpy(static_cast<void*>(&slot), data, sizeof(T));
        } else if constexpr (contiguous) {
            using E = typename T::value_type;
            if constexpr (std::is_same_v<T, std::string>) {
                slot.assign(reinterpret_cast<const char*>(data), size);
            } else {
                if (size % sizeof(E)) throw DecodeError("decode: queue item has the wrong size for its type");
                slot.resize(size / sizeof(E));
                if (size) std::memcpy(static_cast<void*>(slot.data()), data, size);
            }
        } else {
            std::optional<T> one;
            consume(&one, data, size);
            slot = std::move(*one);
        }
        ++r.next;
    }

    /// A batch being put: the items of [first, last) one by one, each item's
    /// bytes valid until the next is asked for.
    template <class It>
    struct Batch {
        It next;
        std::size_t index = 0;
        std::string encoded;  // an encoded item's bytes (with_bytes's own buffer is gone after it returns)
        static void bytes_of(void* context, std::size_t i, const void** data, std::size_t* size) {
            auto& b = *static_cast<Batch*>(context);
            for (; b.index < i; ++b.index) ++b.next;  // the core asks in order
            with_bytes(*b.next, [&](const void* d, std::size_t n) {
                if constexpr (raw || contiguous) {
                    *data = d;  // the caller's item itself, alive for the whole batch
                } else {
                    b.encoded.assign(static_cast<const char*>(d), n);
                    *data = b.encoded.data();
                }
                *size = n;
                return 0;
            });
        }
    };
    template <class It>
    static QueueCore::Status put_many(QueueCore& core, It first, std::size_t count, std::size_t& done,
                                      os::Deadline deadline) {
        Batch<It> batch{first, 0, {}};
        return core.put_many(&Batch<It>::bytes_of, &batch, count, done, deadline);
    }

    static QueueCore::Status put(QueueCore& core, const T& item, os::Deadline deadline) {
        return with_bytes(item, [&](const void* data, std::size_t size) { return core.put(data, size, deadline); });
    }
    static QueueCore::Status get(QueueCore& core, std::optional<T>& out, os::Deadline deadline) {
        return core.get(&consume, &out, deadline);
    }
};

}  // namespace detail

/// A multi-producer multi-consumer queue of T in shared memory (see the top of
/// this part for bounds, timeouts and what survives a crash).
template <class T>
class Queue {
    using Items = detail::QueueItems<T>;
    using Status = detail::QueueCore::Status;

public:
    /// `capacity_bytes` for a queue with no byte bound (the default, as in Python).
    static constexpr std::size_t unbounded = 0;
    /// A byte bound often used for a ring of fixed size (1 MiB).
    static constexpr std::size_t default_capacity = std::size_t(1) << 20;

    /// A new queue holding at most `maxsize` items (0: no item bound) and, if
    /// `capacity_bytes` is given, at most that many bytes of encoded items at a
    /// time (then larger items stream through it).  Without a byte bound a put
    /// never waits for room.
    explicit Queue(std::size_t maxsize = 0, std::size_t capacity_bytes = unbounded)
        : core_(detail::QueueCore::create(detail::QueueKind::queue, Items::type_tag(), maxsize, capacity_bytes)) {}

    /// Puts `item`, waiting for room as long as it takes.  Throws QueueClosed.
    void put(const T& item) { check_put(Items::put(core_, item, detail::os::no_deadline)); }
    /// Puts `item`, waiting at most `timeout`; throws Full when there was no room.
    template <class Rep, class Period>
    void put(const T& item, std::chrono::duration<Rep, Period> timeout) {
        if (!check_put(Items::put(core_, item, detail::os::deadline_after(timeout)))) throw Full();
    }
    /// Puts `item` if there is room now; throws Full otherwise.
    void put_nowait(const T& item) {
        if (!check_put(Items::put(core_, item, detail::os::Clock::now()))) throw Full();
    }
    /// Puts `item` if there is room now; false otherwise.  Throws QueueClosed.
    bool try_put(const T& item) { return check_put(Items::put(core_, item, detail::os::Clock::now())); }
    /// Puts `item` if there is room within `timeout`; false otherwise.
    template <class Rep, class Period>
    bool try_put(const T& item, std::chrono::duration<Rep, Period> timeout) {
        return check_put(Items::put(core_, item, detail::os::deadline_after(timeout)));
    }

    /// Takes the next item, waiting as long as it takes.  Throws QueueClosed when
    /// the queue is closed and empty.
    T get() { return take(detail::os::no_deadline); }
    /// Takes the next item, waiting at most `timeout`; throws Empty when none came.
    template <class Rep, class Period>
    T get(std::chrono::duration<Rep, Period> timeout) {
        return take(detail::os::deadline_after(timeout));
    }
    /// Takes the next item if there is one now; throws Empty otherwise.
    T get_nowait() { return take(detail::os::Clock::now()); }
    /// The next item if there is one now (std::nullopt if not, or if closed and empty).
    std::optional<T> try_get() { return try_take(detail::os::Clock::now()); }
    /// The next item if one comes within `timeout`.
    template <class Rep, class Period>
    std::optional<T> try_get(std::chrono::duration<Rep, Period> timeout) {
        return try_take(detail::os::deadline_after(timeout));
    }

    /// Puts every item of `items` (a range: vector, array, initializer list...) in
    /// order, as one batch: one hold of the producers' lock and one commit that
    /// publishes them all (more commits only while it waits for room, or around
    /// an item larger than half the ring).  Waits for room as long as it takes.
    /// Throws QueueClosed (nothing put), or what encoding an item throws (the
    /// items before it are put, it and the rest are not).  Items of one batch stay
    /// together: no other producer's item lands between them, unless the batch
    /// had to wait for room.
    template <class Range>
    void put_many(const Range& items) {
        std::size_t done = 0;
        check_put(Items::put_many(core_, std::begin(items), count_of(items), done, detail::os::no_deadline));
    }
    void put_many(std::initializer_list<T> items) { put_many<std::initializer_list<T>>(items); }
    /// As put_many(items), waiting at most `timeout` for room; returns how many
    /// items were put - always the first ones; the rest were not.
    template <class Range, class Rep, class Period>
    std::size_t put_many(const Range& items, std::chrono::duration<Rep, Period> timeout) {
        std::size_t done = 0;
        check_put(Items::put_many(core_, std::begin(items), count_of(items), done, detail::os::deadline_after(timeout)));
        return done;
    }

    /// Takes up to `max_items` items as one batch and appends them to `out`:
    /// waits for the first as long as it takes, then takes the whole items
    /// already queued behind it without waiting, with one commit.  Returns the
    /// number appended (1..max_items; 0 only for max_items == 0).  Throws
    /// QueueClosed when closed and empty.  An item that fails to decode is
    /// dropped (as get() drops it), the items before it are in `out`, and the
    /// exception propagates.  A consumer killed inside get_many loses the whole
    /// batch if it dies after the commit, none of it before (see the README).
    std::size_t get_many(std::vector<T>& out, std::size_t max_items) {
        return take_many(out, max_items, detail::os::no_deadline, true);
    }
    /// As get_many(out, max_items), waiting at most `timeout` for the first item;
    /// throws Empty if none came.
    template <class Rep, class Period>
    std::size_t get_many(std::vector<T>& out, std::size_t max_items, std::chrono::duration<Rep, Period> timeout) {
        return take_many(out, max_items, detail::os::deadline_after(timeout), true);
    }
    /// The batch as a new vector.
    std::vector<T> get_many(std::size_t max_items) {
        std::vector<T> out;
        take_many(out, max_items, detail::os::no_deadline, true);
        return out;
    }
    /// What get_many would take, without waiting: possibly nothing (also when
    /// closed and empty).
    std::size_t try_get_many(std::vector<T>& out, std::size_t max_items) {
        return take_many(out, max_items, detail::os::Clock::now(), false);
    }
    /// As get_many(out, max_items), but `out` is *replaced* by the batch, and
    /// the elements it already holds are reused: a std::string or a vector of
    /// numbers is assigned in place, keeping its storage.  A consumer that
    /// loops on one vector then allocates nothing once it is warm - where
    /// get_many after out.clear() allocates every item anew (and a batch of
    /// large items freed at once can make malloc hand its pages back to the
    /// system and fault them in again, batch after batch).  Returns out.size().
    std::size_t get_many_reusing(std::vector<T>& out, std::size_t max_items) {
        return refill(out, max_items, detail::os::no_deadline);
    }
    /// As get_many_reusing(out, max_items), waiting at most `timeout` for the
    /// first item; throws Empty if none came (`out` is then empty).
    template <class Rep, class Period>
    std::size_t get_many_reusing(std::vector<T>& out, std::size_t max_items, std::chrono::duration<Rep, Period> timeout) {
        return refill(out, max_items, detail::os::deadline_after(timeout));
    }

    /// Number of complete items in the queue (a snapshot; others may change it).
    std::size_t qsize() const noexcept { return core_.qsize(); }
    bool empty() const noexcept { return core_.qsize() == 0; }
    /// True when maxsize items are queued or the ring has no room left.
    bool full() const noexcept { return core_.full(); }
    /// The item bound given at creation (0: none).
    std::size_t maxsize() const noexcept { return core_.maxsize(); }
    /// The byte bound (the requested one rounded up to a multiple of 64); 0 for none.
    std::size_t capacity() const noexcept { return core_.byte_bound(); }
    /// Closes the queue for every process: puts throw QueueClosed, gets drain.
    void close() noexcept { core_.close(); }
    bool closed() const noexcept { return core_.closed(); }

protected:
    Queue(detail::QueueKind kind, std::size_t maxsize, std::size_t capacity_bytes)
        : core_(detail::QueueCore::create(kind, Items::type_tag(), maxsize, capacity_bytes)) {}
    explicit Queue(detail::QueueCore core) : core_(std::move(core)) {}

    static bool check_put(Status s) {
        if (s == Status::closed) throw QueueClosed();
        return s == Status::ok;
    }
    T take(detail::os::Deadline deadline) {
        std::optional<T> out;
        Status s = Items::get(core_, out, deadline);
        if (s == Status::closed) throw QueueClosed();
        if (s == Status::timeout) throw Empty();
        return std::move(*out);
    }
    std::optional<T> try_take(detail::os::Deadline deadline) {
        std::optional<T> out;
        Items::get(core_, out, deadline);
        return out;
    }
    std::size_t take_many(std::vector<T>& out, std::size_t max_items, detail::os::Deadline deadline, bool throws) {
        std::size_t taken = 0;
        Status s = core_.get_many(&Items::consume_into, &out, max_items, taken, deadline);
        if (throws && s == Status::closed) throw QueueClosed();
        if (throws && s == Status::timeout) throw Empty();
        return taken;
    }
    std::size_t refill(std::vector<T>& out, std::size_t max_items, detail::os::Deadline deadline) {
        typename Items::Refill r{&out};
        std::size_t taken = 0;
        Status s = Status::ok;
        struct Trim {  // also when a decode throws: out holds the items before it
            std::vector<T>& out;
            typename Items::Refill& r;
            ~Trim() {
                if (out.size() > r.next) out.erase(out.begin() + static_cast<std::ptrdiff_t>(r.next), out.end());
            }
        } trim{out, r};
        s = core_.get_many(&Items::consume_reusing, &r, max_items, taken, deadline);
        if (s == Status::closed) throw QueueClosed();
        if (s == Status::timeout) throw Empty();
        return taken;
    }
    template <class Range>
    static std::size_t count_of(const Range& items) {
        return static_cast<std::size_t>(std::distance(std::begin(items), std::end(items)));
    }

    detail::QueueCore core_;
    friend struct Codec<Queue<T>>;
    friend struct Codec<JoinableQueue<T>>;
};

/// A Queue that counts unfinished items: every put adds one, task_done()
/// removes one, join() waits until none is left (as Python's JoinableQueue).
template <class T>
class JoinableQueue : public Queue<T> {
public:
    explicit JoinableQueue(std::size_t maxsize = 0, std::size_t capacity_bytes = Queue<T>::unbounded)
        : Queue<T>(detail::QueueKind::joinable, maxsize, capacity_bytes) {}

    /// Marks one item taken from the queue as processed.  Throws
    /// std::invalid_argument when called more times than items were put.
    void task_done() { this->core_.task_done(); }
    /// Waits until every item put has been marked done.
    void join() { this->core_.join(detail::os::no_deadline); }
    /// Waits at most `timeout`; false if items are still unfinished then.
    template <class Rep, class Period>
    bool join(std::chrono::duration<Rep, Period> timeout) {
        return this->core_.join(detail::os::deadline_after(timeout));
    }

private:
    explicit JoinableQueue(detail::QueueCore core) : Queue<T>(std::move(core)) {}
    friend struct Codec<JoinableQueue<T>>;
};

/// The plain queue of Python's SimpleQueue: put, get, empty, close.  No item
/// bound; the ring's byte capacity still applies (larger items stream).
template <class T>
class SimpleQueue {
    using Items = detail::QueueItems<T>;
    using Status = detail::QueueCore::Status;

public:
    explicit SimpleQueue(std::size_t capacity_bytes = Queue<T>::unbounded)
        : core_(detail::QueueCore::create(detail::QueueKind::simple, Items::type_tag(), 0, capacity_bytes)) {}

    /// Puts `item`, waiting for room.  Throws QueueClosed after close().
    void put(const T& item) {
        if (Items::put(core_, item, detail::os::no_deadline) == Status::closed) throw QueueClosed();
    }
    /// Takes the next item, waiting for one.  Throws QueueClosed when closed and empty.
    T get() {
        std::optional<T> out;
        if (Items::get(core_, out, detail::os::no_deadline) == Status::closed) throw QueueClosed();
        return std::move(*out);
    }
    bool empty() const noexcept { return core_.qsize() == 0; }
    void close() noexcept { core_.close(); }

private:
    explicit SimpleQueue(detail::QueueCore core) : core_(std::move(core)) {}
    detail::QueueCore core_;
    friend struct Codec<SimpleQueue<T>>;
};

// Queues travel as their shared memory (a file descriptor beside the bytes).

template <class T>
struct Codec<Queue<T>> {
    static void encode(Encoder& e, const Queue<T>& q) { e.write(q.core_.memory()); }
    static Queue<T> decode(Decoder& d) {
        return Queue<T>(detail::QueueCore::attach(d.read<detail::SharedMemory>(), detail::QueueKind::queue,
                                                  detail::QueueItems<T>::type_tag()));
    }
};

template <class T>
struct Codec<JoinableQueue<T>> {
    static void encode(Encoder& e, const JoinableQueue<T>& q) { e.write(q.core_.memory()); }
    static JoinableQueue<T> decode(Decoder& d) {
        return JoinableQueue<T>(detail::QueueCore::attach(
            d.read<detail::SharedMemory>(), detail::QueueKind::joinable, detail::QueueItems<T>::type_tag()));
    }
};

template <class T>
struct Codec<SimpleQueue<T>> {
    static void encode(Encoder& e, const SimpleQueue<T>& q) { e.write(q.core_.memory()); }
    static SimpleQueue<T> decode(Decoder& d) {
        return SimpleQueue<T>(detail::QueueCore::attach(d.read<detail::SharedMemory>(), detail::QueueKind::simple,
                                                        detail::QueueItems<T>::type_tag()));
    }
};

}  // namespace mpservice
