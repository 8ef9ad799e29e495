// Rows: Pipe / Connection ends - the peer process ends every way while the
// other end is in recv (the peer sends a stream of items) or in send (the peer
// receives one), with items of 8 B, 4 KiB and 1 MiB (bigger than the socket
// buffers, ~208 KiB here: one item is many writes, and a send blocks inside it).
//
// What is right (connection.hpp):
//   * recv: what the peer sent arrives, in order, whole, once; then EOFError
//     when the peer's end is gone however its process ended (a peer killed
//     inside a message: EOFError saying so) - never a hang.  Every item whose
//     send() returned in the peer arrives (send returns once the socket has
//     taken all the bytes, which outlive the process);
//   * a stopped peer: recv(timeout) / try_recv(timeout) return on time; after
//     SIGCONT the stream completes;
//   * send: BrokenPipeError once the peer's end is gone (also for a send
//     blocked in the middle of a large item); then recv is EOFError;
//   * the parent SIGKILLed while one child is blocked in recv and another in
//     send: both gone within 1 s.
#include "harness.hpp"

#include <signal.h>

#include <atomic>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <vector>

namespace stress {
namespace {

using Conn = mp::Connection<std::string>;
using Status = mp::RawArray<long>;
enum Slot : std::size_t { started = 0, acked = 1, taken = 2, torn = 3, out_of_order = 4, slots = 5 };

struct Size {
    std::size_t item;
    long count;  // items a finite sender sends
    const char* name;
};
constexpr Size sizes[] = {{8, 2000, "8 B"}, {4096, 300, "4 KiB"}, {1 << 20, 8, "1 MiB"}};

std::string make_item(std::uint32_t seq, std::size_t size) {
    std::string s(size, '\0');
    const std::uint32_t check = seq * 2654435761u ^ static_cast<std::uint32_t>(size);
    std::memcpy(&s[0], &seq, 4);
    std::memcpy(&s[4], &check, 4);
    for (std::size_t i = 8; i < size; ++i) s[i] = static_cast<char>(seq * 31 + i);
    return s;
}

/// The item's seq, or -1 if it is torn or mixed up.
long parse_item(const std::string& s, std::size_t size) {
    if (s.size() != size || size < 8) return -1;
    std::uint32_t seq, check;
    std::memcpy(&seq, s.data(), 4);
    std::memcpy(&check, s.data() + 4, 4);
    if (check != (seq * 2654435761u ^ static_cast<std::uint32_t>(size))) return -1;
    for (std::size_t i = 8; i < size; ++i)
        if (s[i] != static_cast<char>(seq * 31 + i)) return -1;
    return seq;
}

// ---------------------------------------------------------------- children

/// Sends items 0, 1, ... (forever for sigkill / parent_killed), then ends its way.
int sender_child(Conn c, Status st, int ending, int size_index) {
    const auto e = static_cast<Ending>(ending);
    const Size& z = sizes[size_index];
    const bool forever = e == Ending::sigkill || e == Ending::parent_killed;
    st[started] = 1;
    for (std::uint32_t seq = 0; forever || seq < z.count; ++seq) {
        c.send(make_item(seq, z.item));
        st[acked] = seq + 1;
    }
    if (e == Ending::sigstop) return 0;  // stopped and continued on the way: it finishes normally
    end_child(e);
    return 0;
}

/// Receives items (checking order and integrity in st) - forever, or
/// `stop_after` of them and then ends its way.
int receiver_child(Conn c, Status st, int ending, int size_index, long stop_after) {
    const auto e = static_cast<Ending>(ending);
    const Size& z = sizes[size_index];
    st[started] = 1;
    for (long n = 0; stop_after < 0 || n < stop_after; ++n) {
        std::string s = c.recv();
        long seq = parse_item(s, z.item);
        if (seq < 0) st[torn] += 1;
        else if (seq != n) st[out_of_order] += 1;
        st[taken] = n + 1;
    }
    end_child(e);
    return 0;
}

// ---------------------------------------------------------------- accounting


/// Receives until EOFError (the right end), each recv within `each`.  Returns
/// false on a hang (recorded); other errors are recorded as wrong.
bool recv_to_eof(Round& r, Conn& c, const Size& z, std::vector<long>& got, milliseconds each, long at_most) {
    for (long n = 0; n < at_most; ++n) {
        try {
            got.push_back(parse_item(c.recv(each), z.item));
        } catch (const mp::EOFError&) {
            return true;
        } catch (const mp::TimeoutError&) {
            r.hang("recv() saw neither an item nor EOF within " + std::to_string(each.count()) + " ms (after " +
                   std::to_string(got.size()) + " items)");
            return false;
        } catch (const std::exception& e) {
            r.wrong(std::string("recv() threw '") + e.what() + "' instead of EOFError (after " +
                    std::to_string(got.size()) + " items)");
            return true;
        }
    }
    r.wrong("more items than were sent arrived");
    return true;
}

// ---------------------------------------------------------------- the peer sends, we receive

template <int SizeIndex>
void peer_sends_row(Round& r) {
    const Ending e = r.ending();
    const Size& z = sizes[SizeIndex];
    Status st(slots, 0L);
    if (e == Ending::parent_killed) {
        // One child blocked in recv (we send nothing), one in send (we receive nothing).
        Conn mine_a, theirs_a, mine_b, theirs_b;
        std::tie(mine_a, theirs_a) = mp::Pipe<std::string>();
        std::tie(mine_b, theirs_b) = mp::Pipe<std::string>();
        Status st_b(slots, 0L);
        mp::Process receiver(r.context(), receiver_child, theirs_a, st, static_cast<int>(e), SizeIndex, -1L);
        mp::Process sender(r.context(), sender_child, theirs_b, st_b, static_cast<int>(e), SizeIndex);
        receiver.start();
        sender.start();
        theirs_a.close();
        theirs_b.close();
        if (!await([&] { return st[started] == 1 && st_b[started] == 1; })) return r.hang("the children never started");
        r.random_pause(3000);
        r.ready_to_be_killed();
    }
    Conn mine, theirs;  // (not a structured binding: lambdas capture these)
    std::tie(mine, theirs) = mp::Pipe<std::string>();
    mp::Process p(r.context(), sender_child, theirs, st, static_cast<int>(e), SizeIndex);
    p.start();
    theirs.close();  // the child's is now the only copy of its end
    STRESS_KILL_ON_EXIT(p);
    std::vector<long> got;
    const long bound = 1L << 30;
    if (e == Ending::sigkill) {
        // We receive while the sender runs; the kill lands at a random instant
        // (inside a send, between two, or while the sender waits for room).
        std::atomic<bool> ok{true};
        std::thread consumer([&] { ok = recv_to_eof(r, mine, z, got, guard, bound); });
        if (!await([&] { return st[started] == 1; })) {
            p.kill();
            consumer.join();
            return r.hang("the sender never started");
        }
        r.random_pause(8000);
        p.kill();
        check_ending(r, p, Ending::sigkill, 0, "the sender");
        consumer.join();
        if (!ok) return;
        account_sequences(r, {got}, st[acked], true, "sent");
        return;
    }
    if (e == Ending::sigstop) {
        if (!await([&] { return st[started] == 1; })) return r.hang("the sender never started");
        r.random_pause(2000);
        signal_process(p.pid(), SIGSTOP);
        // Take what has arrived; the last try_recv finds nothing and must return on time.
        std::atomic<bool> returned{false};
        std::thread rescue([&] {  // a wait that ignores its timeout must not hang the round
            auto until = Clock::now() + std::chrono::seconds(8);
            while (!returned.load() && Clock::now() < until) std::this_thread::sleep_for(milliseconds(5));
            if (!returned.load()) signal_process(p.pid(), SIGCONT);
        });
        for (long n = 0; n <= z.count; ++n) {
            auto t0 = Clock::now();
            std::optional<std::string> s;
            try {
                s = mine.try_recv(milliseconds(100));
            } catch (const std::exception& ex) {
                r.wrong(std::string("try_recv(100ms) from a stopped peer threw ") + ex.what());
                break;
            }
            auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - t0);
            if (took > milliseconds(100) + late_slack) {
                r.wrong("try_recv(100ms) took " + std::to_string(took.count()) + " ms while the sender was stopped");
                if (s) got.push_back(parse_item(*s, z.item));
                break;
            }
            if (!s) break;
            got.push_back(parse_item(*s, z.item));
        }
        returned = true;
        rescue.join();
        signal_process(p.pid(), SIGCONT);
    }
    // The sender sends z.count items, then ends its way: all of them arrive, then EOF.
    if (!recv_to_eof(r, mine, z, got, guard, z.count + 2)) return;
    check_ending(r, p, e == Ending::sigstop ? Ending::ret : e, 0, "the sender");
    account_sequences(r, {got}, z.count, false, "sent");
    // EOF again, at once.
    try {
        mine.recv(milliseconds(500));
        r.wrong("a second recv after EOF returned an item");
    } catch (const mp::EOFError&) {
    } catch (const std::exception& ex) {
        r.wrong(std::string("a second recv after EOF threw ") + ex.what());
    }
}

// ---------------------------------------------------------------- the peer receives, we send

template <int SizeIndex>
void peer_receives_row(Round& r) {
    const Ending e = r.ending();
    const Size& z = sizes[SizeIndex];
    Status st(slots, 0L);
    Conn mine, theirs;  // (not a structured binding: lambdas capture these)
    std::tie(mine, theirs) = mp::Pipe<std::string>();
    const long stop_after = e == Ending::sigkill ? -1 : r.uniform(1, z.count / 2);
    mp::Process p(r.context(), receiver_child, theirs, st, static_cast<int>(e), SizeIndex, stop_after);
    p.start();
    theirs.close();
    STRESS_KILL_ON_EXIT(p);
    // We send forever in a thread until send fails - BrokenPipeError is right.
    // send() has no timeout: a send still blocked after the guard is a hang,
    // and close() from here wakes it (documented: InvalidStateError).
    std::atomic<bool> done{false};
    std::atomic<long> sent{0};
    std::string error;
    bool broken_pipe = false;
    std::thread sender([&] {
        try {
            for (std::uint32_t seq = 0;; ++seq) {
                mine.send(make_item(seq, z.item));
                sent = seq + 1;
            }
        } catch (const mp::BrokenPipeError&) {
            broken_pipe = true;
        } catch (const std::exception& ex) {
            error = ex.what();
        }
        done = true;
    });
    if (e == Ending::sigkill) {
        if (!await([&] { return st[taken] > 0; })) {
            p.kill();
        } else {
            r.random_pause(8000);
            p.kill();
        }
    }
    const bool ended = await([&] { return done.load(); });
    if (!ended) {
        mine.close();
        await([&] { return done.load(); }, milliseconds(2000));
        if (!done.load()) {
            r.hang("send() did not fail after the peer ended, not even when its end was closed");
            r.abandon();  // the thread cannot be woken
        }
        sender.join();
        return r.hang("send() was still blocked " + std::to_string(guard.count()) + " ms after the peer ended (" +
                      std::to_string(sent.load()) + " items sent, " + std::to_string(st[taken]) + " taken)");
    }
    sender.join();
    if (!broken_pipe) r.wrong("send() to an ended peer threw '" + error + "' instead of BrokenPipeError");
    check_ending(r, p, e, 0, "the receiver");
    if (st[torn]) r.wrong(std::to_string(st[torn]) + " torn item(s) at the receiver");
    r.reordered(st[out_of_order]);
    if (stop_after >= 0 && st[taken] != stop_after)
        r.wrong("the receiver took " + std::to_string(st[taken]) + " items, expected " + std::to_string(stop_after));
    if (st[taken] > sent.load() + 1) r.duplicated(st[taken] - sent.load() - 1);
    try {
        (void)mine.recv(guard);
        r.wrong("recv on an end whose peer ended returned an item");
    } catch (const mp::EOFError&) {
    } catch (const mp::TimeoutError&) {
        r.hang("recv on an end whose peer ended did not see EOF");
    } catch (const std::exception& ex) {
        r.wrong(std::string("recv on an end whose peer ended threw ") + ex.what());
    }
}

#define SENDS_ROW(size_name, I, ending) ROW("Pipe end in recv, " size_name " items (peer sends)", ending, peer_sends_row<I>)
#define RECEIVES_ROW(size_name, I, ending) ROW("Pipe end in send, " size_name " items (peer receives)", ending, peer_receives_row<I>)
#define PIPE_ROWS(size_name, I)                 \
    SENDS_ROW(size_name, I, Ending::ret);       \
    SENDS_ROW(size_name, I, Ending::thrw);      \
    SENDS_ROW(size_name, I, Ending::exit_n);    \
    SENDS_ROW(size_name, I, Ending::abrt);      \
    SENDS_ROW(size_name, I, Ending::segv);      \
    SENDS_ROW(size_name, I, Ending::sigkill);   \
    SENDS_ROW(size_name, I, Ending::sigstop);   \
    SENDS_ROW(size_name, I, Ending::parent_killed); \
    RECEIVES_ROW(size_name, I, Ending::ret);    \
    RECEIVES_ROW(size_name, I, Ending::exit_n); \
    RECEIVES_ROW(size_name, I, Ending::segv);   \
    RECEIVES_ROW(size_name, I, Ending::sigkill)

PIPE_ROWS("8 B", 0);
PIPE_ROWS("4 KiB", 1);
PIPE_ROWS("1 MiB", 2);

}  // namespace
}  // namespace stress
