// server_wire.hpp: what a server process and its clients say to each other
// (the server part and the client part both include it).
//
// Each client thread has one connection (a Unix stream socket) to the server,
// served there by one thread; each client process has one more, its "main"
// connection, which anchors its session: the references the process holds.
// When the main connection ends - the process released its last proxy, or it
// died, even by SIGKILL - the server drops the session's references.
//
// On a connection: frames as on a parent-child channel (process_wire: u32 kind,
// u32 handle count, u64 size, payload), a request's kind being its operation
// and a reply's kind reply_ok or reply_error (payload: an encoded exception).
// The first frame is HELLO (protocol version, authentication key, session,
// build fingerprint); a client of another build or without the key is refused.
//
// The fast path: a thread connection hands the server a shared-memory slot
// (SLOT, the memfd attached).  Requests and replies without OS handles that fit
// then go through the slot, and no socket message is made at all: each side
// spins briefly (adaptively) on the slot's sequence words, then sleeps on a
// futex in the slot - the server on the doorbell the client rings with every
// request, the client on the reply word.  (A futex rather than a socket read
// for sleeping: a socket write wakes its reader on the writer's CPU, which
// leaves the partner nowhere to spin.)  Since neither futex sees the other
// side die, both sleep in bounded slices and look at the socket in between: a
// client sees its server's death within client_check, a server thread its
// client's within server_check.  The socket still carries what does not fit,
// what carries handles, and the end of either side.

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <unordered_set>

namespace mpservice {
namespace detail {
namespace server {

using wire::FrameHeader;

enum Op : std::uint32_t {
    op_hello = 100,
    op_create,
    op_call,
    op_mint,         // no reply: an encoded proxy's ticket (chosen by the client), a reference in flight
    op_adopt,        // a decoded proxy takes over its ticket's reference (a memory block's memfd comes back)
    op_incref,
    op_decref,       // no reply
    op_drop_ticket,  // no reply
    op_block,        // the memfd of a memory block
    op_count,
    op_shutdown,
    op_slot,
    op_wake,  // no reply; also sent by the server to a sleeping client
    op_last
};
enum Reply : std::uint32_t { reply_ok = 200, reply_error = 201 };

constexpr std::uint32_t server_protocol = 1;
constexpr std::uint32_t proxy_magic = 0x50524f58;  // "PROX"
constexpr std::size_t authkey_size = 16;
/// The largest frame a server accepts from a client (a garbled length is refused, not allocated).
constexpr std::uint64_t max_request = std::uint64_t(1) << 30;

// ---------------------------------------------------------------- the slot

/// A thread connection's shared-memory request/response slot.
struct SlotHeader {
    alignas(64) std::atomic<std::uint32_t> request_seq{0};  // the client's last request
    std::atomic<std::uint32_t> doorbell{0};  // bumped for every request, slot or socket: the server's futex
    std::atomic<std::uint32_t> server_sleeping{0};
    alignas(64) std::atomic<std::uint32_t> reply_seq{0};  // the request the server answered last
    std::atomic<std::uint32_t> client_sleeping{0};  // waiting on reply_seq's futex
    /// Set by the client with a request: after answering it, the server stays
    /// awake this long for the next one (a resynchronization, see slot_call).
    std::atomic<std::uint32_t> resync_ns{0};
    std::uint32_t request_op = 0;
    std::uint32_t request_size = 0;
    std::uint32_t reply_kind = 0;  // reply_ok / reply_error, or 0: the reply is on the socket
    std::uint32_t reply_size = 0;
};
constexpr std::size_t slot_bytes = 64 * 1024;
constexpr std::size_t slot_data_offset = 256;
constexpr std::size_t slot_capacity = slot_bytes - slot_data_offset;
static_assert(sizeof(SlotHeader) <= slot_data_offset, "slot header too large");

inline SlotHeader* slot_header(void* base) { return static_cast<SlotHeader*>(base); }
inline char* slot_data(void* base) { return static_cast<char*>(base) + slot_data_offset; }

/// Each side spins on the slot before it sleeps on the socket, with the
/// adaptive budget of the synchronization primitives (detail::spin_until in
/// synchronize.hpp): a trivial call's round trip is ~1-2 us when both sides
/// run on their own CPUs, and when they cannot (a loaded machine) spinning
/// turns itself off instead of delaying the partner.

/// When both sides sleep between calls while running on different CPUs, each
/// call costs two cross-CPU wake-ups (~30 us each on the KVM guests measured,
/// bench-anchors/RESULTS.md) and the adaptive spins cannot recover: a spin
/// short enough to be cheap ends before the sleeping partner is even awake,
/// so both keep finding that spinning does not pay.  A client that sees a
/// call answered that slowly after sleeping asks for one long spin on both
/// sides ("resync"): it spins up to resync_ns for the next reply, and the
/// server stays awake as long for the request after it.  If that meets, both
/// sides spin again; if not (the other CPU is busy), the next attempt waits
/// twice as many slow calls, up to resync_backoff_max.
constexpr std::uint32_t slow_call_ns = 20000;
constexpr std::uint32_t resync_ns = 80000;
constexpr std::uint32_t resync_backoff_max = 4096;

/// Counters of the slot path in this process (diagnostics, bench_server).
struct SlotStats {
    std::atomic<std::uint64_t> calls{0};       // requests through a slot
    std::atomic<std::uint64_t> spun{0};        // answered while the client spun
    std::atomic<std::uint64_t> slept{0};       // the client slept for the answer
    std::atomic<std::uint64_t> slow{0};        // ... and it took longer than slow_call_ns
    std::atomic<std::uint64_t> woke_server{0}; // the request found the server asleep
    std::atomic<std::uint64_t> resyncs{0};     // resynchronizations tried
    std::atomic<std::uint64_t> resynced{0};    // ... that met
};
inline SlotStats& slot_stats() {
    static SlotStats s;
    return s;
}

/// How often a sleeping side looks at the socket (its partner's death).
constexpr std::chrono::milliseconds client_check{20};
constexpr std::chrono::milliseconds server_check{50};

// ---------------------------------------------------------------- reading frames

/// Reads frames from a socket with a bound on their size (the server must not
/// trust a client's lengths).  Buffers what arrives, so a small frame costs one
/// read.
class BoundedReader {
public:
    enum Status { got, eof, too_big, nothing };
    /// The next frame; `nothing` only when `nonblocking` and no whole frame is there.
    Status read(os::handle_t fd, wire::Frame& out, std::uint64_t limit, bool nonblocking = false) {
        for (;;) {
            if (len_ - pos_ >= sizeof(FrameHeader)) {
                FrameHeader h;
                std::memcpy(&h, buf_.data() + pos_, sizeof h);
                if (h.size > limit || h.handles > 253) return too_big;
                std::size_t whole = sizeof h + static_cast<std::size_t>(h.size);
                if (len_ - pos_ >= whole) {
                    out.kind = h.kind;
                    out.payload.assign(buf_.data() + pos_ + sizeof h, static_cast<std::size_t>(h.size));
                    pos_ += whole;
                    out.handles.clear();
                    for (std::uint32_t i = 0; i < h.handles && !fds_.empty(); ++i) {
                        out.handles.push_back(fds_.front());
                        fds_.erase(fds_.begin());
                    }
                    return got;
                }
                if (buf_.size() < whole) {
                    compact();
                    buf_.resize(std::max(whole, buf_.size() * 2));
                }
            }
            compact();
            if (buf_.size() - len_ < 4096) buf_.resize(std::max<std::size_t>(buf_.size() * 2, 8192));
            long n = os::channel_read(fd, &buf_[len_], buf_.size() - len_, &fds_, nonblocking);
            if (n < 0) return nothing;
            if (n == 0) return eof;
            len_ += static_cast<std::size_t>(n);
        }
    }
    /// Whether a whole frame or part of one is already buffered.
    bool buffered() const noexcept { return len_ > pos_; }
    BoundedReader() = default;
    BoundedReader(const BoundedReader&) = delete;
    BoundedReader& operator=(const BoundedReader&) = delete;
    ~BoundedReader() {
        for (auto fd : fds_) os::close_handle(fd);
    }

private:
    void compact() {
        if (pos_ == 0) return;
        std::memmove(&buf_[0], buf_.data() + pos_, len_ - pos_);
        len_ -= pos_;
        pos_ = 0;
    }
    std::string buf_;
    std::size_t pos_ = 0, len_ = 0;
    std::vector<os::handle_t> fds_;
};

inline bool send_frame(os::handle_t fd, std::uint32_t kind, const std::string& payload,
                       const std::vector<os::handle_t>& handles = {}) {
    try {
        return wire::write_frame(fd, kind, payload, handles);
    } catch (...) {
        return false;
    }
}

/// An invoker on the wire: where it is in its module, and its identity.
struct InvokerRef {
    os::CodeRef code;
    std::uint64_t identity = 0;
};
inline void write_invoker(Encoder& e, const InvokerRef& r) { e(r.code.module, r.code.offset, r.identity); }
inline InvokerRef read_invoker(Decoder& d) {
    InvokerRef r;
    d(r.code.module, r.code.offset, r.identity);
    return r;
}

// ---------------------------------------------------------------- invokers

/// Every invoker this build instantiated, with the hash of its identity.
struct InvokerSet {
    std::mutex mutex;
    std::unordered_map<const void*, std::uint64_t> fns;
};
/// The identity hash of an announced invoker; 0 if `fn` is not one (server_wire.cpp).
std::uint64_t invoker_identity(const void* fn);
inline InvokerSet& invokers() {
    static InvokerSet* s = new InvokerSet;  // never destroyed: static initializers of any order use it
    return *s;
}

}  // namespace server
}  // namespace detail

}  // namespace mpservice
