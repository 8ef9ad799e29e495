// connection: Pipe<T>() and Connection<T>, Python's multiprocessing.Pipe with types.
//
//     auto [parent_end, child_end] = mp::Pipe<std::string>();
//     mp::Process p(talk, child_end);          // the child gets the same end
//     p.start();
//     child_end.close();                        // the parent's copy: now the child's is the only one
//     parent_end.send("ping");
//     std::string reply = parent_end.recv();   // waits; EOFError once the child's end is closed
//     if (parent_end.poll(50ms)) ...           // a recv() now would not block
//
// The two ends are the two sides of a Unix stream socket.  A message is a
// length-prefixed frame (any size: a 4 MiB vector is one message); items are
// any type the codec carries, including library handles (a Queue, a Lock, a
// Connection), whose descriptors ride beside the bytes.  Pipe<T>(false) makes a
// one-way pipe as Python does: the first end only receives, the second only
// sends.
//
// An end is a handle: copies refer to the same end, and an end passed as a
// Process argument reaches the child as the same socket (its descriptor
// travels with the arguments, under every context).  The socket stays open
// while any copy in any process holds it, so, as in Python, close the copy of
// the child's end that the parent keeps after start() - otherwise the parent
// never sees EOF when the child is done.  (Under the fork context the child
// inherits every descriptor of the parent, the parent's ends too.)
//
// Ends of the pipe:
//   - recv() waits for a message; EOFError once the other end is closed (in
//     every process, including by the death of its process) and nothing is left.
//     recv(timeout) throws TimeoutError; try_recv(timeout) returns
//     std::nullopt instead (at end of stream it throws EOFError too: an ended
//     stream is not an empty one).  A peer that dies in the middle of a message
//     is an EOFError saying so.
//   - A message that does not decode as T (garbage sent with send_bytes, a
//     different T on the other side) throws DecodeError; that message is
//     consumed and dropped, the connection stays usable.  Bytes that are not
//     frames at all (written to fileno() by hand) break the framing: every
//     later recv throws DecodeError.
//   - send() waits until the socket has taken all the bytes, which may mean
//     until the peer receives; BrokenPipeError when the peer is closed.  While
//     a send waits for room it takes in whatever the peer sends meanwhile (kept
//     for recv), so two sides sending large messages to each other at once both
//     finish - in Python they deadlock.
//   - Threads: sends from several threads are serialized (messages never
//     interleave), receives too (each gets whole messages); a send and a recv
//     run at the same time.  close() from another thread wakes a blocked
//     recv/send/poll within 100 ms, which then throws InvalidStateError.
//   - poll(timeout) is true when recv() would not block: a whole message has
//     arrived, or the end of the stream (then recv throws EOFError).
//
// connection_wait (Python's multiprocessing.connection.wait) waits on several
// ends and processes at once and returns the ready ones.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../detail/os.hpp"
#include "codec.hpp"
#include "errors.hpp"
#include "process.hpp"

namespace mpservice {

template <class T>
class Connection;

namespace detail {

/// The untyped end of a pipe: its socket, what has arrived of the next
/// messages, and the locks that serialize senders and receivers.
class ConnectionCore {
public:
    enum Mode : unsigned { receives = 1, sends = 2, duplex = 3 };

    /// A connected pair; one-way: `a` receives, `b` sends.
    MPSERVICE_API static void make_pair(bool duplex, Shared<ConnectionCore>& a, Shared<ConnectionCore>& b);
    /// An end over `h` (taking ownership of it), as a decoded Connection is.
    MPSERVICE_API static Shared<ConnectionCore> adopt(os::handle_t h, unsigned mode);
    /// Takes ownership of `h`.
    MPSERVICE_API ConnectionCore(os::handle_t h, unsigned mode);
    MPSERVICE_API ~ConnectionCore();
    ConnectionCore(const ConnectionCore&) = delete;
    ConnectionCore& operator=(const ConnectionCore&) = delete;

    /// Sends one message: `data` plus `handles` (kept open by the caller until this returns).
    MPSERVICE_API void send(const void* data, std::size_t n, const os::handle_t* handles, std::size_t nhandles);

    /// What receive() hands a message to.  It may throw: the message is consumed anyway.
    using Consume = void (*)(void* context, const unsigned char* data, std::size_t n,
                             const std::vector<os::handle_t>* handles);
    /// Receives one message by `deadline`; false if none came.  EOFError at end of stream.
    MPSERVICE_API bool receive(Consume consume, void* context, os::Deadline deadline);
    /// receive() of the message's bytes as they are, into `out`.
    MPSERVICE_API bool receive_bytes(std::string& out, os::Deadline deadline);
    /// Whether a receive would not block (a whole message, or the end), waiting until `deadline`.
    MPSERVICE_API bool poll(os::Deadline deadline);
    /// poll() without waiting, or false when another thread is receiving
    /// (`busy` is then set): for connection_wait.
    MPSERVICE_API bool ready_now(bool* busy);

    MPSERVICE_API void close() noexcept;
    MPSERVICE_API bool closed() const noexcept;
    MPSERVICE_API unsigned mode() const noexcept;
    /// The socket (invalid_handle after close()).
    MPSERVICE_API os::handle_t handle() const noexcept;
    /// The socket, to pass this end to another process; refuses a closed end
    /// and one holding received bytes not yet taken by recv (the other process
    /// would never see them).
    MPSERVICE_API os::handle_t handle_to_pass() const;

    struct Impl;

private:
    Owned<Impl> impl_;
};

/// InvalidStateError for an operation on an end that was never connected.
[[noreturn]] MPSERVICE_API void throw_unconnected(const char* what);
/// TimeoutError for recv(timeout).
[[noreturn]] MPSERVICE_API void throw_recv_timeout();

/// Decodes a message as T into a std::optional<T> (the context).
template <class T>
void decode_message(void* context, const unsigned char* data, std::size_t n, const std::vector<os::handle_t>* handles) {
    Decoder d(data, n, handles);
    static_cast<std::optional<T>*>(context)->emplace(d.read<T>());
    d.expect_end("connection message");
}

/// One entry of connection_wait: an end, or a process.
struct WaitTarget {
    ConnectionCore* connection = nullptr;
    const ProcessCore* process = nullptr;
};
/// Positions (in `targets`) of the ready ones, in order; empty at the deadline.
MPSERVICE_API std::vector<std::size_t> connection_wait_until(const std::vector<WaitTarget>& targets,
                                                             os::Deadline deadline);

}  // namespace detail

/// One end of a Pipe (see the top of this part).  Copies refer to the same end.
template <class T>
class Connection {
public:
    /// An end that is not connected to anything: every operation throws InvalidStateError.
    Connection() = default;

    /// Sends `item` as one message (waits for room; BrokenPipeError if the peer is closed).
    void send(const T& item) {
        Encoder e;
        e.write(item);
        core("send").send(e.bytes().data(), e.bytes().size(), e.handles().data(), e.handles().size());
    }
    /// The next item, waiting as long as it takes; EOFError at end of stream.
    T recv() { return *take(detail::os::no_deadline); }
    /// The next item, waiting at most `timeout`; TimeoutError if none came.
    template <class Rep, class Period>
    T recv(std::chrono::duration<Rep, Period> timeout) {
        auto v = take(detail::os::deadline_after(timeout));
        if (!v) detail::throw_recv_timeout();
        return std::move(*v);
    }
    /// The next item if one is there now, else std::nullopt (EOFError at end of stream).
    std::optional<T> try_recv() { return take(detail::os::Clock::now()); }
    /// The next item if one comes within `timeout`, else std::nullopt (EOFError at end of stream).
    template <class Rep, class Period>
    std::optional<T> try_recv(std::chrono::duration<Rep, Period> timeout) {
        return take(detail::os::deadline_after(timeout));
    }

    /// Whether recv() would not block now (a whole message arrived, or the end of the stream).
    bool poll() { return core("poll").poll(detail::os::Clock::now()); }
    /// Whether recv() would not block, waiting at most `timeout` for it.
    template <class Rep, class Period>
    bool poll(std::chrono::duration<Rep, Period> timeout) {
        return core("poll").poll(detail::os::deadline_after(timeout));
    }

    /// Sends raw bytes as one message (recv_bytes on the other side; not encoded).
    void send_bytes(std::string_view bytes) { core("send_bytes").send(bytes.data(), bytes.size(), nullptr, 0); }
    void send_bytes(const void* data, std::size_t n) { core("send_bytes").send(data, n, nullptr, 0); }
    /// The next message's bytes as they were sent, whatever sent them; EOFError at end.
    std::string recv_bytes() {
        std::string out;
        core("recv_bytes").receive_bytes(out, detail::os::no_deadline);
        return out;
    }
    /// As recv_bytes(), but TimeoutError if nothing came within `timeout`.
    template <class Rep, class Period>
    std::string recv_bytes(std::chrono::duration<Rep, Period> timeout) {
        std::string out;
        if (!core("recv_bytes").receive_bytes(out, detail::os::deadline_after(timeout))) detail::throw_recv_timeout();
        return out;
    }

    /// Closes this end for this process (every copy here); other processes'
    /// copies stay open.  The peer sees EOF once no process holds this end.
    void close() noexcept {
        if (core_) core_->close();
    }
    /// Closed by close(), or never connected.
    bool closed() const noexcept { return !core_ || core_->closed(); }
    /// Whether this end receives / sends (a one-way pipe's ends do one each).
    bool readable() const noexcept { return core_ && (core_->mode() & detail::ConnectionCore::receives); }
    bool writable() const noexcept { return core_ && (core_->mode() & detail::ConnectionCore::sends); }
    /// The socket's descriptor (as Python's fileno()); invalid_handle once closed.
    detail::os::handle_t fileno() const noexcept { return core_ ? core_->handle() : detail::os::invalid_handle; }

    /// Whether two handles refer to the same end.
    friend bool operator==(const Connection& a, const Connection& b) noexcept { return a.core_ == b.core_; }
    friend bool operator!=(const Connection& a, const Connection& b) noexcept { return a.core_ != b.core_; }

    /// The untyped end (for connection_wait).
    detail::ConnectionCore* core_ptr() const noexcept { return core_.get(); }

private:
    explicit Connection(detail::Shared<detail::ConnectionCore> core) : core_(std::move(core)) {}
    detail::ConnectionCore& core(const char* what) const {
        if (!core_) detail::throw_unconnected(what);
        return *core_;
    }
    std::optional<T> take(detail::os::Deadline deadline) {
        std::optional<T> out;
        core("recv").receive(&detail::decode_message<T>, &out, deadline);
        return out;
    }

    detail::Shared<detail::ConnectionCore> core_;

    template <class U>
    friend std::pair<Connection<U>, Connection<U>> Pipe(bool duplex);
    friend struct Codec<Connection<T>>;
};

/// A connected pair of ends (Python's Pipe(duplex)).  duplex: both ends send
/// and receive; otherwise the first end only receives and the second only sends.
template <class T>
std::pair<Connection<T>, Connection<T>> Pipe(bool duplex = true) {
    detail::Shared<detail::ConnectionCore> a, b;
    detail::ConnectionCore::make_pair(duplex, a, b);
    return {Connection<T>(std::move(a)), Connection<T>(std::move(b))};
}

/// An end travels as its socket (a descriptor beside the bytes) and its mode.
template <class T>
struct Codec<Connection<T>> {
    static void encode(Encoder& e, const Connection<T>& c) {
        if (!c.core_) throw std::invalid_argument("mpservice: cannot pass a Connection that is not connected");
        std::uint8_t mode = static_cast<std::uint8_t>(c.core_->mode());
        std::uint32_t index = e.attach(c.core_->handle_to_pass());
        e(mode, index);
    }
    static Connection<T> decode(Decoder& d) {
        std::uint8_t mode = 0;
        std::uint32_t index = 0;
        d(mode, index);
        if (mode < 1 || mode > 3) throw DecodeError("decode: connection mode " + std::to_string(mode) + " is not 1, 2 or 3");
        detail::os::handle_t h = detail::os::duplicate_handle(d.handle(index));  // the channel keeps its own
        return Connection<T>(detail::ConnectionCore::adopt(h, mode));
    }
    static constexpr std::size_t min_encoded_size() { return 5; }
};

class Waitable;
/// connection_wait with an absolute deadline (the other overloads call it).
MPSERVICE_API std::vector<Waitable> connection_wait_at(const std::vector<Waitable>& objects, detail::os::Deadline deadline);

/// One thing connection_wait watches: a Connection end (ready when recv()
/// would not block: a whole message has arrived, or the other end is closed)
/// or a started Process (ready when it has ended, as done() says).
class Waitable {
public:
    template <class T>
    Waitable(const Connection<T>* c) : object_(c), target_{c ? c->core_ptr() : nullptr, nullptr} {
        if (!c || !c->core_ptr()) detail::throw_unconnected("connection_wait");
    }
    template <class R>
    Waitable(const Process<R>* p)
        : object_(p), target_{nullptr, p ? &static_cast<const detail::ProcessCore&>(p->core()) : nullptr} {}

    /// The position of this entry in the list given to connection_wait.
    std::size_t index() const noexcept { return index_; }
    /// Whether this entry is `object` (the Connection or Process passed).
    bool is(const void* object) const noexcept { return object_ == object; }
    const detail::WaitTarget& target() const noexcept { return target_; }

private:
    const void* object_;
    detail::WaitTarget target_;
    std::size_t index_ = 0;
    friend std::vector<Waitable> connection_wait_at(const std::vector<Waitable>&, detail::os::Deadline);
};

/// Waits until at least one of `objects` is ready and returns the ready ones,
/// in the order given (Python's multiprocessing.connection.wait):
///     for (const mp::Waitable& w : mp::connection_wait({&a, &b, &proc})) ... w.index() / w.is(&a)
/// A closed end, a send-only end or a process never started is an InvalidStateError.
MPSERVICE_API std::vector<Waitable> connection_wait(const std::vector<Waitable>& objects);
/// As above, waiting at most `timeout`; empty if nothing was ready by then.
template <class Rep, class Period>
std::vector<Waitable> connection_wait(const std::vector<Waitable>& objects, std::chrono::duration<Rep, Period> timeout) {
    return connection_wait_at(objects, detail::os::deadline_after(timeout));
}

namespace detail {
template <class T>
std::vector<Connection<T>*> connection_wait_typed(const std::vector<Connection<T>*>& connections,
                                                  os::Deadline deadline) {
    std::vector<Waitable> objects(connections.begin(), connections.end());
    std::vector<Connection<T>*> ready;
    for (const Waitable& w : connection_wait_at(objects, deadline)) ready.push_back(connections[w.index()]);
    return ready;
}
}  // namespace detail

/// The typed form for ends of one type: returns the ready ends themselves.
///     for (mp::Connection<int>* c : mp::connection_wait(readers, 5s)) total += c->recv();
template <class T>
std::vector<Connection<T>*> connection_wait(const std::vector<Connection<T>*>& connections) {
    return detail::connection_wait_typed(connections, detail::os::no_deadline);
}
template <class T, class Rep, class Period>
std::vector<Connection<T>*> connection_wait(const std::vector<Connection<T>*>& connections,
                                            std::chrono::duration<Rep, Period> timeout) {
    return detail::connection_wait_typed(connections, detail::os::deadline_after(timeout));
}

}  // namespace mpservice
