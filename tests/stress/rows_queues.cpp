// Rows: Queue, SimpleQueue and JoinableQueue with items from 8 B to larger
// than the ring - producers and consumers that end every way, counted item
// by item: lost, duplicated, reordered, torn.
//
// The README's bound: a producer killed inside put delivers its item whole or
// not at all; a consumer killed inside get loses at most the one item it had
// taken; nothing else is lost, duplicated or reordered.
#include "harness.hpp"

#include <signal.h>

#include <cstring>
#include <map>

namespace stress {
namespace {

using Status = mp::RawArray<long>;
enum Slot : std::size_t { started = 0, acked = 1, slots = 4 };

// ---------------------------------------------------------------- items

/// An item of `size` bytes (>= 8): seq, a check of (seq, size), then a fill
/// derived from seq - so a torn or mixed-up item is noticed.
std::string make_item(std::uint32_t seq, std::size_t size) {
    std::string s(size, '\0');
    const std::uint32_t check = seq * 2654435761u ^ static_cast<std::uint32_t>(size);
    std::memcpy(&s[0], &seq, 4);
    std::memcpy(&s[4], &check, 4);
    for (std::size_t i = 8; i < size; ++i) s[i] = static_cast<char>(seq * 31 + i);
    return s;
}

bool parse_item(const std::string& s, std::size_t size, std::uint32_t& seq) {
    if (s.size() != size || size < 8) return false;
    std::uint32_t check;
    std::memcpy(&seq, s.data(), 4);
    std::memcpy(&check, s.data() + 4, 4);
    if (check != (seq * 2654435761u ^ static_cast<std::uint32_t>(size))) return false;
    for (std::size_t i = 8; i < size; ++i)
        if (s[i] != static_cast<char>(seq * 31 + i)) return false;
    return true;
}

// ---------------------------------------------------------------- the three kinds behind one face

template <class Q>
struct Ops {  // Queue and JoinableQueue
    static Q make(std::size_t capacity, std::size_t maxsize = 0) { return Q(maxsize, capacity); }
    static bool put(Q& q, const std::string& s, milliseconds t) {
        try {
            q.put(s, t);
            return true;
        } catch (const mp::Full&) {
            return false;
        }
    }
    static std::optional<std::string> get(Q& q, milliseconds t) { return q.try_get(t); }
    static void done(Q&) {}
    static constexpr bool bounded = true;
};
template <>
struct Ops<mp::JoinableQueue<std::string>> {
    using Q = mp::JoinableQueue<std::string>;
    static Q make(std::size_t capacity, std::size_t maxsize = 0) { return Q(maxsize, capacity); }
    static bool put(Q& q, const std::string& s, milliseconds t) {
        try {
            q.put(s, t);
            return true;
        } catch (const mp::Full&) {
            return false;
        }
    }
    static std::optional<std::string> get(Q& q, milliseconds t) { return q.try_get(t); }
    static void done(Q& q) { q.task_done(); }
    static constexpr bool bounded = true;
};
template <>
struct Ops<mp::SimpleQueue<std::string>> {  // no timeouts: poll empty() for the parent's timed gets
    using Q = mp::SimpleQueue<std::string>;
    static Q make(std::size_t capacity, std::size_t = 0) { return Q(capacity); }
    static bool put(Q& q, const std::string& s, milliseconds) {
        q.put(s);
        return true;
    }
    static std::optional<std::string> get(Q& q, milliseconds t) {
        auto until = Clock::now() + t;
        while (q.empty()) {
            if (Clock::now() >= until) return std::nullopt;
            std::this_thread::yield();
        }
        return q.get();
    }
    static void done(Q&) {}
    static constexpr bool bounded = false;
};

/// Sizes of the matrix: 8 B, 4 KiB, and 256 KiB through a 64 KiB ring.
struct Size {
    std::size_t item, capacity;
    long count;  // items a finite producer puts
};
constexpr Size sizes[] = {{8, 1 << 20, 3000}, {4096, 1 << 20, 150}, {256 * 1024, 64 * 1024, 6}};

template <class Q>
int producer_child(Q q, Status st, int ending, int size_index) {
    const auto e = static_cast<Ending>(ending);
    const Size& z = sizes[size_index];
    const bool forever = e == Ending::sigkill || e == Ending::parent_killed;
    st[started] = 1;
    for (std::uint32_t seq = 0; forever || seq < z.count; ++seq) {
        if (!Ops<Q>::put(q, make_item(seq, z.item), std::chrono::hours(1))) return 1;
        st[acked] = seq + 1;
    }
    if (e == Ending::sigstop) return 0;  // it was stopped and continued on the way: it finishes normally
    end_child(e);
    return 0;
}

template <class Q>
int consumer_child(Q q, Status log, int size_index) {
    const Size& z = sizes[size_index];
    // log[0] = items taken so far, log[1 + k] = the k-th seq taken (-1 if torn).
    for (;;) {
        std::string s = q.get();
        std::uint32_t seq = 0;
        long n = log[0];
        log[static_cast<std::size_t>(1 + n)] = parse_item(s, z.item, seq) ? static_cast<long>(seq) : -1;
        log[0] = n + 1;
        Ops<Q>::done(q);
    }
}


template <class Q>
std::vector<long> drain(Q& q, const Size& z, milliseconds quiet, long at_most = -1) {
    std::vector<long> got;
    while (at_most < 0 || static_cast<long>(got.size()) < at_most) {
        auto s = Ops<Q>::get(q, quiet);
        if (!s) break;
        std::uint32_t seq = 0;
        got.push_back(parse_item(*s, z.item, seq) ? static_cast<long>(seq) : -1);
        Ops<Q>::done(q);
    }
    return got;
}

// ---------------------------------------------------------------- producer rows

template <class Q, int SizeIndex>
void producer_row(Round& r) {
    const Ending e = r.ending();
    const Size& z = sizes[SizeIndex];
    Q q = Ops<Q>::make(z.capacity);
    Status st(slots, 0L);
    if (e == Ending::parent_killed) {
        // One child blocked in get() on an empty queue, one in put() on a full one.
        Q empty = Ops<Q>::make(z.capacity);
        mp::Process getter(r.context(), consumer_child<Q>, empty, Status(4, 0L), SizeIndex);
        getter.start();
        Q full = Ops<Q>::make(z.capacity, 1);
        // (A >buffer item blocks the putter by itself: no consumer takes its chunks.)
        if constexpr (Ops<Q>::bounded && SizeIndex != 2) Ops<Q>::put(full, make_item(0, z.item), guard);
        mp::Process putter(r.context(), producer_child<Q>, full, st, static_cast<int>(e), SizeIndex);
        putter.start();
        if (!await([&] { return st[started] == 1; })) return r.hang("the children never started");
        r.random_pause(3000);
        r.ready_to_be_killed();
    }
    mp::Process p(r.context(), producer_child<Q>, q, st, static_cast<int>(e), SizeIndex);
    p.start();
    STRESS_KILL_ON_EXIT(p);
    std::vector<long> got;
    if (e == Ending::sigkill) {
        // The parent consumes while the producer runs; the kill lands at a random instant.
        std::atomic<bool> producer_dead{false};
        std::thread consumer([&] {
            for (;;) {
                auto part = drain(q, z, milliseconds(20));
                got.insert(got.end(), part.begin(), part.end());
                if (producer_dead.load() && part.empty()) break;
            }
            auto rest = drain(q, z, milliseconds(300));  // what a dead producer left whole
            got.insert(got.end(), rest.begin(), rest.end());
        });
        if (!await([&] { return st[acked] > 0; })) {
            p.kill();
            producer_dead = true;
            consumer.join();
            return r.hang("the producer never put an item");
        }
        r.random_pause(8000);
        p.kill();
        check_ending(r, p, Ending::sigkill, 0, "the producer");
        producer_dead = true;
        consumer.join();
        account_sequences(r, {got}, st[acked], true, "put");
        return;
    }
    if (e == Ending::sigstop) {
        if (!await([&] { return st[started] == 1; })) return r.hang("the producer never started");
        r.random_pause(2000);
        signal_process(p.pid(), SIGSTOP);
        auto t0 = Clock::now();
        std::optional<std::string> first;
        // A get that ignores its timeout would wait for the stopped producer
        // forever: this thread continues the producer after a long while, so
        // that such a get ends (late, which is counted) instead of hanging.
        std::atomic<bool> returned{false};
        std::thread rescue([&] {
            auto until = Clock::now() + milliseconds(100) + late_slack + milliseconds(1500);
            while (!returned.load() && Clock::now() < until) std::this_thread::sleep_for(milliseconds(5));
            if (!returned.load()) signal_process(p.pid(), SIGCONT);
        });
        try {
            first = Ops<Q>::get(q, milliseconds(100));
        } catch (const std::exception& ex) {
            r.wrong(std::string("get(100ms) threw ") + ex.what());
        }
        returned = true;
        rescue.join();
        if (Clock::now() - t0 > milliseconds(100) + late_slack)
            r.wrong("get(100ms) took " +
                    std::to_string(std::chrono::duration_cast<milliseconds>(Clock::now() - t0).count()) +
                    " ms while the producer was stopped");
        signal_process(p.pid(), SIGCONT);
        if (first) {
            std::uint32_t seq = 0;
            got.push_back(parse_item(*first, z.item, seq) ? static_cast<long>(seq) : -1);
            Ops<Q>::done(q);
        }
    }
    // The producer puts z.count items, then ends its way: all of them arrive.
    auto rest = drain(q, z, guard, z.count - static_cast<long>(got.size()));
    got.insert(got.end(), rest.begin(), rest.end());
    check_ending(r, p, e == Ending::sigstop ? Ending::ret : e, 0, "the producer");
    account_sequences(r, {got}, z.count, false, "put");
}

// ---------------------------------------------------------------- consumer rows

template <class Q, int SizeIndex>
void consumer_row(Round& r) {
    const Ending e = r.ending();
    const Size& z = sizes[SizeIndex];
    const long total = z.count * 4;
    Q q = Ops<Q>::make(z.capacity);
    Status log(static_cast<std::size_t>(total + 2), 0L);
    if (e == Ending::parent_killed) {
        mp::Process a(r.context(), consumer_child<Q>, q, log, SizeIndex);
        mp::Process b(r.context(), consumer_child<Q>, q, log, SizeIndex);
        a.start();
        b.start();
        r.random_pause(3000);  // (a child that has not reached get() yet dies with us all the same)
        r.ready_to_be_killed();
    }
    mp::Process c(r.context(), consumer_child<Q>, q, log, SizeIndex);
    c.start();
    STRESS_KILL_ON_EXIT(c);
    std::atomic<long> put_ok{0};
    std::thread producer([&] {
        for (long seq = 0; seq < total; ++seq) {
            if (!Ops<Q>::put(q, make_item(static_cast<std::uint32_t>(seq), z.item), guard)) return;
            put_ok = seq + 1;
        }
    });
    if (!await([&] { return log[0] > 0; })) {
        c.kill();
        producer.join();
        return r.hang("the consumer never took an item");
    }
    r.random_pause(5000);
    std::vector<long> drained;
    if (e == Ending::sigstop) {
        // Another consumer's timed get ends on time while this one is stopped
        // (perhaps inside get, holding the consumers' side of the queue).
        signal_process(c.pid(), SIGSTOP);
        auto t0 = Clock::now();
        auto part = drain(q, z, milliseconds(100), 1);
        if (Clock::now() - t0 > milliseconds(100) + late_slack)
            r.wrong("get(100ms) took " +
                    std::to_string(std::chrono::duration_cast<milliseconds>(Clock::now() - t0).count()) +
                    " ms while another consumer was stopped");
        drained.insert(drained.end(), part.begin(), part.end());
        signal_process(c.pid(), SIGCONT);
        // The continued consumer takes the rest.
        if (!await([&] { return put_ok.load() == total && log[0] + static_cast<long>(drained.size()) >= total; },
                   guard * 2))
            r.hang("the continued consumer did not take the rest");
        producer.join();
        c.kill();  // it would wait for more forever
        check_ending(r, c, Ending::sigkill, 0, "the consumer");
    } else {
        c.kill();
        check_ending(r, c, Ending::sigkill, 0, "the consumer");
        r.allow_lost(1);  // the item the killed consumer had taken but not yet recorded
        // The parent takes over: everything the consumer did not take comes out here.
        for (;;) {
            auto part = drain(q, z, milliseconds(300));
            drained.insert(drained.end(), part.begin(), part.end());
            if (!part.empty()) continue;
            if (put_ok.load() == total) break;
            auto more = drain(q, z, guard);  // the producer may be streaming a big item
            drained.insert(drained.end(), more.begin(), more.end());
            if (more.empty()) break;
        }
        producer.join();
    }
    if (put_ok.load() != total) r.wrong("the parent's put() failed after the consumer ended");
    std::vector<long> got;
    const long taken = std::min<long>(log[0], total);
    for (long i = 0; i < taken; ++i) got.push_back(log[static_cast<std::size_t>(1 + i)]);
    account_sequences(r, {got, drained}, total, false, "put");
    if (r.lost_count() > r.lost_bound())
        r.wrong(std::to_string(r.lost_count()) + " items lost, more than the one the killed consumer held");
}

#define PRODUCER_ROW(kind, Q, size_name, I, ending) ROW(kind " " size_name " producer", ending, producer_row<Q, I>)
#define CONSUMER_ROW(kind, Q, size_name, I, ending) ROW(kind " " size_name " consumer", ending, consumer_row<Q, I>)

#define FULL_PRODUCER_ROWS(kind, Q, size_name, I)                   \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::ret);               \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::thrw);              \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::exit_n);            \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::abrt);              \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::segv);              \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::sigkill);           \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::sigstop);           \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::parent_killed);     \
    CONSUMER_ROW(kind, Q, size_name, I, Ending::sigkill);           \
    CONSUMER_ROW(kind, Q, size_name, I, Ending::sigstop);           \
    CONSUMER_ROW(kind, Q, size_name, I, Ending::parent_killed)

#define SHORT_ROWS(kind, Q, size_name, I)                           \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::exit_n);            \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::sigkill);           \
    PRODUCER_ROW(kind, Q, size_name, I, Ending::parent_killed);     \
    CONSUMER_ROW(kind, Q, size_name, I, Ending::sigkill)

using StrQueue = mp::Queue<std::string>;
using StrSimple = mp::SimpleQueue<std::string>;
using StrJoinable = mp::JoinableQueue<std::string>;

FULL_PRODUCER_ROWS("Queue", StrQueue, "8 B", 0);
FULL_PRODUCER_ROWS("Queue", StrQueue, "4 KiB", 1);
FULL_PRODUCER_ROWS("Queue", StrQueue, ">buffer", 2);
SHORT_ROWS("SimpleQueue", StrSimple, "8 B", 0);
// SimpleQueue has no timed get: the parent's side polls empty(), which stays
// true while an item larger than the ring streams in - so its rows keep to
// items that fit (its >buffer path is the same ring code as Queue's).
SHORT_ROWS("SimpleQueue", StrSimple, "4 KiB", 1);
SHORT_ROWS("JoinableQueue", StrJoinable, "8 B", 0);
SHORT_ROWS("JoinableQueue", StrJoinable, ">buffer", 2);

// ---------------------------------------------------------------- issue 8 #5: an unbounded queue in one process

ROW("Queue unbounded, 2 MiB in one process", Ending::none, [](Round& r) {
    mp::Queue<long> q;
    const long n = 300000;  // 8 B items plus framing: well over the 1 MiB ring
    for (long i = 0; i < n; ++i) {
        try {
            q.put(i, milliseconds(2000));
        } catch (const mp::Full&) {
            return r.wrong("put() on an unbounded queue waited for room after " + std::to_string(i) + " items");
        }
    }
    for (long i = 0; i < n; ++i) {
        auto v = q.try_get();
        if (!v) return r.wrong("item " + std::to_string(i) + " missing");
        if (*v != i) return r.wrong("items out of order");
    }
});

}  // namespace
}  // namespace stress
