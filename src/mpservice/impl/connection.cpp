// connection: ConnectionCore (the frames of a Pipe end) and connection_wait.
//
// Wire format: frames of
//     u32 magic | u32 handle count | u64 payload size | payload
// with the frame's handles attached to its first byte.  The magic makes bytes
// that are not frames (written to the descriptor by hand) an error instead of
// a length of garbage to wait for.
//
// Every wait is a poll() of at most close_check_interval, after which the
// waiter looks whether another thread has closed the end: a descriptor must
// not be closed while another thread waits on it (it could be reused at once).

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

namespace mpservice {
namespace detail {

namespace {

constexpr std::uint32_t connection_magic = 0x4d50434eu;  // "MPCN"
struct ConnectionHeader {
    std::uint32_t magic;
    std::uint32_t handles;
    std::uint64_t size;
};
constexpr auto close_check_interval = std::chrono::milliseconds(100);
// The inbox keeps at most this much room once it is empty again.
constexpr std::size_t inbox_keep = std::size_t(1) << 20;
constexpr std::size_t read_chunk = std::size_t(1) << 16;
// A size beyond this is corrupt framing, not a message (and would overflow).
constexpr std::uint64_t max_message_size = std::uint64_t(1) << 48;

/// Milliseconds to wait: until `deadline`, but at most close_check_interval (rounded up, so no busy loop).
int wait_slice_ms(os::Deadline deadline) {
    auto slice = std::chrono::duration_cast<std::chrono::milliseconds>(close_check_interval).count();
    if (deadline == os::no_deadline) return static_cast<int>(slice);
    auto left = std::chrono::duration_cast<std::chrono::microseconds>(deadline - os::Clock::now()).count();
    if (left <= 0) return 0;
    return static_cast<int>(std::min<long long>((left + 999) / 1000, slice));
}

[[noreturn]] void throw_closed(const char* what) {
    throw InvalidStateError(std::string("mpservice: Connection::") + what + " on a closed connection");
}

}  // namespace

struct ConnectionCore::Impl {
    std::atomic<os::handle_t> handle{os::invalid_handle};
    unsigned mode = 0;
    std::atomic<bool> closed{false};
    std::mutex send_mutex;         // one sender at a time: messages never interleave
    std::timed_mutex recv_mutex;   // one receiver at a time; guards everything below
    std::mutex close_mutex;        // close() once

    // What has arrived and not been taken yet.
    std::unique_ptr<char[]> buf;
    std::size_t cap = 0, pos = 0, len = 0;
    std::deque<os::handle_t> handles;
    bool eof = false;
    bool broken = false;  // bytes that are not frames arrived: no later frame can be found

    os::handle_t fd() const noexcept { return handle.load(std::memory_order_relaxed); }
    void check_open(const char* what) const {
        if (closed.load(std::memory_order_acquire)) throw_closed(what);
    }

    std::size_t buffered() const noexcept { return len - pos; }

    /// The size of the whole frame at the front, or 0 if its header has not arrived.
    std::size_t front_frame_size() {
        if (buffered() < sizeof(ConnectionHeader)) return 0;
        ConnectionHeader h;
        std::memcpy(&h, buf.get() + pos, sizeof h);
        if (h.magic != connection_magic || h.size > max_message_size) {
            broken = true;
            return 0;
        }
        return sizeof h + static_cast<std::size_t>(h.size);
    }
    bool frame_complete() {
        std::size_t n = front_frame_size();
        return n && buffered() >= n;
    }
    /// A receive would not block: a whole message, the end of the stream, or broken framing.
    bool ready() { return frame_complete() || broken || eof; }

    /// Reads what is there without waiting: >0 bytes, 0 at end (eof set), -1 if nothing is there.
    long fill() {
        std::size_t want = front_frame_size();
        std::size_t missing = want > buffered() ? want - buffered() : 0;
        std::size_t room_wanted = std::max(missing, read_chunk);
        if (pos == len) pos = len = 0;
        if (cap - len < room_wanted && pos > 0) {  // move the unread bytes to the front first
            std::memmove(buf.get(), buf.get() + pos, len - pos);
            len -= pos;
            pos = 0;
        }
        if (cap - len < room_wanted) {
            // Grow for the frame being received, by at most 64 MiB or the bytes
            // already here (so geometrically for a big message): a corrupt
            // size must not allocate what never arrives.
            std::size_t grow = std::min(room_wanted, std::max(std::size_t(64) << 20, len));
            std::size_t new_cap = len + grow;
            std::unique_ptr<char[]> bigger(new char[new_cap]);
            if (len) std::memcpy(bigger.get(), buf.get(), len);
            buf = std::move(bigger);
            cap = new_cap;
        }
        std::vector<os::handle_t> arrived;
        long n = os::channel_read(fd(), buf.get() + len, cap - len, &arrived, true);
        for (auto h : arrived) handles.push_back(h);
        if (n > 0) len += static_cast<std::size_t>(n);
        if (n == 0) eof = true;
        return n;
    }

    /// Takes the frame at the front (complete) and hands it to `consume`.
    void take_frame(Consume consume, void* context) {
        ConnectionHeader h;
        std::memcpy(&h, buf.get() + pos, sizeof h);
        const unsigned char* data = reinterpret_cast<const unsigned char*>(buf.get() + pos + sizeof h);
        std::size_t size = static_cast<std::size_t>(h.size);
        pos += sizeof h + size;  // consumed whatever consume does: the stream stays in step
        std::vector<os::handle_t> frame_handles;
        for (std::uint32_t i = 0; i < h.handles && !handles.empty(); ++i) {
            frame_handles.push_back(handles.front());
            handles.pop_front();
        }
        struct CloseHandles {
            std::vector<os::handle_t>& hs;
            ~CloseHandles() {
                for (auto x : hs) os::close_handle(x);  // decoded objects hold their own duplicates
            }
        } close_handles{frame_handles};
        bool handles_missing = frame_handles.size() != h.handles;
        struct Shrink {
            Impl& s;
            ~Shrink() {
                if (s.pos == s.len && s.cap > inbox_keep) {
                    s.buf.reset();
                    s.cap = s.pos = s.len = 0;
                }
            }
        } shrink{*this};
        if (handles_missing)
            throw DecodeError("decode: a connection message announced " + std::to_string(h.handles) +
                              " OS handles but fewer arrived");
        consume(context, data, size, &frame_handles);
    }

    [[noreturn]] void throw_end() {
        if (broken)
            throw DecodeError(
                "decode: bytes that are not connection messages arrived (written to the descriptor by hand?); "
                "the stream has lost its framing and this connection cannot receive any more");
        if (buffered() > 0) {
            std::size_t want = front_frame_size();
            throw EOFError("connection: the other end closed in the middle of a message (" +
                           std::to_string(buffered()) + " of " +
                           (want ? std::to_string(want) : std::string("at least 16")) + " bytes arrived)");
        }
        throw EOFError();
    }

    /// Takes recv_mutex by `deadline`, looking every close_check_interval
    /// whether the end was closed meanwhile.
    bool lock_receiver(std::unique_lock<std::timed_mutex>& lk, os::Deadline deadline, const char* what) {
        for (;;) {
            // A slice on the system clock: the steady-clock form is made of
            // pthread_mutex_clocklock, which ThreadSanitizer does not know;
            // a clock jump can only lengthen or shorten one slice.
            auto slice = std::min<os::Clock::duration>(deadline - os::Clock::now(), close_check_interval);
            if (slice < slice.zero()) slice = slice.zero();
            if (lk.try_lock_until(std::chrono::system_clock::now() + slice)) {
                check_open(what);
                return true;
            }
            check_open(what);
            if (os::Clock::now() >= deadline) return false;
        }
    }

    /// Waits (holding recv_mutex) until ready() or `deadline`; false on timeout.
    bool wait_ready(os::Deadline deadline, const char* what) {
        for (;;) {
            if (ready()) return true;
            long n = fill();
            if (n != -1) continue;  // got bytes, or the end: look again
            if (os::Clock::now() >= deadline) return false;
            os::wait_io(fd(), os::io_readable, wait_slice_ms(deadline));
            check_open(what);
        }
    }
};

void ConnectionCore::make_pair(bool duplex, Shared<ConnectionCore>& a, Shared<ConnectionCore>& b) {
    os::handle_t x, y;
    os::channel_pair(x, y);
    try {
        a = std::make_shared<ConnectionCore>(x, duplex ? Mode::duplex : Mode::receives);
    } catch (...) {
        os::close_handle(y);
        throw;
    }
    b = std::make_shared<ConnectionCore>(y, duplex ? Mode::duplex : Mode::sends);
}

Shared<ConnectionCore> ConnectionCore::adopt(os::handle_t h, unsigned mode) {
    return std::make_shared<ConnectionCore>(h, mode);
}

ConnectionCore::ConnectionCore(os::handle_t h, unsigned mode) {
    try {
        impl_ = Owned<Impl>(new Impl());
    } catch (...) {
        os::close_handle(h);
        throw;
    }
    impl_->handle = h;
    impl_->mode = mode;
}

ConnectionCore::~ConnectionCore() { close(); }

void ConnectionCore::close() noexcept {
    Impl& s = *impl_;
    std::lock_guard<std::mutex> once(s.close_mutex);
    if (s.closed.exchange(true, std::memory_order_acq_rel)) return;
    // Threads inside send/recv notice `closed` within close_check_interval and
    // leave; only then is the descriptor closed.
    std::lock_guard<std::mutex> no_sender(s.send_mutex);
    std::lock_guard<std::timed_mutex> no_receiver(s.recv_mutex);
    os::close_handle(s.handle.exchange(os::invalid_handle));
    for (auto h : s.handles) os::close_handle(h);
    s.handles.clear();
    s.buf.reset();
    s.cap = s.pos = s.len = 0;
}

bool ConnectionCore::closed() const noexcept { return impl_->closed.load(std::memory_order_acquire); }
unsigned ConnectionCore::mode() const noexcept { return impl_->mode; }
os::handle_t ConnectionCore::handle() const noexcept { return impl_->fd(); }

os::handle_t ConnectionCore::handle_to_pass() const {
    Impl& s = *impl_;
    if (closed()) throw std::invalid_argument("mpservice: cannot pass a closed Connection to another process");
    std::unique_lock<std::timed_mutex> lk(s.recv_mutex, std::defer_lock);
    if (!lk.try_lock_until(std::chrono::system_clock::now() + std::chrono::seconds(1)))
        throw std::invalid_argument(
            "mpservice: cannot pass a Connection end to another process while a thread of this one receives on it");
    if (s.buffered() > 0 || !s.handles.empty())
        throw std::invalid_argument(
            "mpservice: this Connection end holds received data that recv() has not taken yet (after poll or "
            "connection_wait); the other process would never see it - receive it before passing the end on");
    return s.fd();
}

void ConnectionCore::send(const void* data, std::size_t n, const os::handle_t* handles, std::size_t nhandles) {
    Impl& s = *impl_;
    s.check_open("send");
    if (!(s.mode & sends)) throw InvalidStateError("mpservice: Connection::send on the receiving end of a one-way Pipe");
    if (nhandles > 253) throw std::invalid_argument("mpservice: a connection message holds at most 253 OS handles");
    std::lock_guard<std::mutex> lk(s.send_mutex);
    s.check_open("send");
    ConnectionHeader h{connection_magic, static_cast<std::uint32_t>(nhandles), static_cast<std::uint64_t>(n)};
    const char* head = reinterpret_cast<const char*>(&h);
    const char* body = static_cast<const char*>(data);
    std::size_t head_left = sizeof h, body_left = n;
    bool first = true;
    while (head_left + body_left > 0) {
        long k = os::channel_write_some(s.fd(), head, head_left, body, body_left, first ? handles : nullptr,
                                        first ? nhandles : 0);
        if (k < 0) throw BrokenPipeError();
        if (k > 0) {
            first = false;
            auto done = static_cast<std::size_t>(k);
            std::size_t from_head = std::min(done, head_left);
            head += from_head;
            head_left -= from_head;
            body += done - from_head;
            body_left -= done - from_head;
            continue;
        }
        // No room.  Take in what the peer sends meanwhile, if nobody else is
        // receiving: a peer that is itself stuck sending to us can go on.
        std::unique_lock<std::timed_mutex> rl(s.recv_mutex, std::defer_lock);
        if ((s.mode & receives) && rl.try_lock() && (s.eof || s.broken)) rl.unlock();
        bool pull = rl.owns_lock();
        unsigned got = os::wait_io(s.fd(), os::io_writable | (pull ? os::io_readable : 0u),
                                   wait_slice_ms(os::no_deadline));
        if (pull && (got & os::io_readable)) s.fill();
        if (rl.owns_lock()) rl.unlock();
        if (s.closed.load(std::memory_order_acquire))
            throw InvalidStateError("mpservice: Connection::send: the connection was closed by another thread "
                                    "while a message was being sent (the peer receives a torn message)");
    }
}

bool ConnectionCore::receive(Consume consume, void* context, os::Deadline deadline) {
    Impl& s = *impl_;
    s.check_open("recv");
    if (!(s.mode & receives)) throw InvalidStateError("mpservice: Connection::recv on the sending end of a one-way Pipe");
    std::unique_lock<std::timed_mutex> lk(s.recv_mutex, std::defer_lock);
    if (!s.lock_receiver(lk, deadline, "recv")) return false;
    if (!s.wait_ready(deadline, "recv")) return false;
    if (!s.frame_complete()) s.throw_end();
    s.take_frame(consume, context);
    return true;
}

bool ConnectionCore::poll(os::Deadline deadline) {
    Impl& s = *impl_;
    s.check_open("poll");
    if (!(s.mode & receives)) throw InvalidStateError("mpservice: Connection::poll on the sending end of a one-way Pipe");
    std::unique_lock<std::timed_mutex> lk(s.recv_mutex, std::defer_lock);
    if (!s.lock_receiver(lk, deadline, "poll")) return false;
    return s.wait_ready(deadline, "poll");
}

bool ConnectionCore::ready_now(bool* busy) {
    Impl& s = *impl_;
    *busy = false;
    std::unique_lock<std::timed_mutex> lk(s.recv_mutex, std::try_to_lock);
    if (!lk.owns_lock()) {
        *busy = true;
        return false;
    }
    if (s.closed.load(std::memory_order_acquire)) return false;
    while (!s.ready() && s.fill() > 0) {
    }
    return s.ready();
}

void throw_unconnected(const char* what) {
    throw InvalidStateError(std::string("mpservice: Connection::") + what +
                            " on a Connection that is not connected (default-constructed); make ends with mp::Pipe<T>()");
}

void throw_recv_timeout() { throw TimeoutError("mpservice: Connection::recv: nothing arrived within the timeout"); }

namespace {
void copy_message(void* context, const unsigned char* data, std::size_t n, const std::vector<os::handle_t>*) {
    static_cast<std::string*>(context)->assign(reinterpret_cast<const char*>(data), n);
}
}  // namespace

bool ConnectionCore::receive_bytes(std::string& out, os::Deadline deadline) {
    return receive(&copy_message, &out, deadline);
}

// ---------------------------------------------------------------- connection_wait

std::vector<std::size_t> connection_wait_until(const std::vector<WaitTarget>& targets, os::Deadline deadline) {
    for (const WaitTarget& t : targets) {
        if (t.connection) {
            if (t.connection->closed()) throw InvalidStateError("mpservice: connection_wait on a closed Connection");
            if (!(t.connection->mode() & ConnectionCore::receives))
                throw InvalidStateError("mpservice: connection_wait on the sending end of a one-way Pipe");
        } else if (t.process) {
            if (!t.process->started()) throw_not_started("connection_wait", t.process->name);
        } else {
            throw std::invalid_argument("mpservice: connection_wait on a null pointer");
        }
    }
    std::vector<std::size_t> ready;
    std::vector<os::handle_t> watch;
    std::vector<std::size_t> watch_owner;
    std::vector<unsigned char> readable;
    for (;;) {
        ready.clear();
        watch.clear();
        watch_owner.clear();
        for (std::size_t i = 0; i < targets.size(); ++i) {
            const WaitTarget& t = targets[i];
            if (t.connection) {
                bool busy = false;
                if (t.connection->closed())
                    throw InvalidStateError("mpservice: connection_wait: a Connection was closed while waited on");
                if (t.connection->ready_now(&busy)) {
                    ready.push_back(i);
                } else {
                    // Another thread receiving on it sees its bytes first; we
                    // only look again each slice.
                    if (!busy) {
                        watch.push_back(t.connection->handle());
                        watch_owner.push_back(i);
                    }
                }
            } else if (t.process->done()) {
                ready.push_back(i);
            } else {
                os::handle_t h = exit_handle_of(*t.process);
                if (h != os::invalid_handle) {
                    watch.push_back(h);
                    watch_owner.push_back(i);
                }
            }
        }
        if (!ready.empty() || os::Clock::now() >= deadline) return ready;
        readable.assign(watch.size(), 0);
        os::wait_readable_any(watch.data(), watch.size(), wait_slice_ms(deadline), readable.data());
        for (std::size_t k = 0; k < watch.size(); ++k) {
            const WaitTarget& t = targets[watch_owner[k]];
            // The process has ended; the reactor is resolving it right now.
            if (readable[k] && t.process) t.process->wait_until(deadline);
        }
    }
}

}  // namespace detail
// ---------------------------------------------------------------- connection_wait (out of line: the
// vectors it fills are instantiated here once, not in every includer)

std::vector<Waitable> connection_wait_at(const std::vector<Waitable>& objects, detail::os::Deadline deadline) {
    std::vector<detail::WaitTarget> targets;
    targets.reserve(objects.size());
    for (const Waitable& w : objects) targets.push_back(w.target());
    std::vector<Waitable> ready;
    for (std::size_t i : detail::connection_wait_until(targets, deadline)) {
        ready.push_back(objects[i]);
        ready.back().index_ = i;
    }
    return ready;
}

std::vector<Waitable> connection_wait(const std::vector<Waitable>& objects) {
    return connection_wait_at(objects, detail::os::no_deadline);
}

}  // namespace mpservice
