// process_wire: the frames of a parent-child channel.
//
// Wire format of a channel (a Unix stream socket per child): frames of
//     u32 kind | u32 handle count | u64 payload size | payload
// with the frame's OS handles attached to its first byte.  The parent sends
// one BOOT frame; the child sends HELLO (fork-server workers only), any number
// of LOG frames, then VALUE or EXCEPTION, then END.  The parent resolves a
// Process when the child has exited, after reading everything it sent: a dead
// child's writes are all queued in the socket already, so a non-blocking
// drain at exit sees every record (join() therefore returns only after all of
// the child's log records were handled, in order).
//
// Included by impl/parts.hpp, ahead of every part: the process part and the
// server part both speak it, so its functions are inline.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <iostream>
#include <map>
#include <thread>
#include <unordered_map>
#include <unordered_set>

namespace mpservice {

namespace detail {
// Named (not anonymous) because ProcessCore::Io holds a FrameReader.
namespace wire {

// ---------------------------------------------------------------- frames

enum FrameKind : std::uint32_t { frame_boot = 1, frame_hello, frame_log, frame_value, frame_exception, frame_end };
constexpr std::uint32_t protocol_version = 1;
constexpr const char child_marker[] = "--mpservice-child=";  // then "<fd>:<parent pid>"
constexpr const char warm_marker_suffix[] = ":w";              // after it: a warm spawn child
constexpr std::size_t boot_early_limit = 32 * 1024;

struct FrameHeader {
    std::uint32_t kind;
    std::uint32_t handles;
    std::uint64_t size;
};

/// What the fork server tells its parent when a worker has ended.
struct ServerStatus {
    std::uint64_t serial;  // the worker's number (pids may be reused; serials are not)
    std::int32_t code;     // Python-style exit code
    std::int32_t pad;
};

struct Frame {
    std::uint32_t kind = 0;
    std::string payload;
    std::vector<os::handle_t> handles;
};

inline void close_all(std::vector<os::handle_t>& hs) noexcept {
    for (auto h : hs) os::close_handle(h);
    hs.clear();
}

inline bool write_frame(os::handle_t ch, std::uint32_t kind, const std::string& payload,
                 const std::vector<os::handle_t>& handles = {}) {
    FrameHeader h{kind, static_cast<std::uint32_t>(handles.size()), payload.size()};
    return os::channel_write(ch, &h, sizeof h, payload.data(), payload.size(), handles.data(), handles.size());
}

/// Splits the byte stream of a channel into frames.  The buffer starts small
/// and grows while reads fill it (a chatty child): every page written costs a
/// copy-on-write fault in a process that forks, so no page is touched in vain.
class FrameReader {
public:
    /// Reads once from `ch`: >0 bytes, 0 at end, -1 if nothing is ready (nonblocking).
    long fill(os::handle_t ch, bool nonblocking) {
        if (pos_ == len_) {
            pos_ = len_ = 0;
        } else if (pos_ > 0 && cap_ - len_ < want_) {
            std::memmove(buf_.get(), buf_.get() + pos_, len_ - pos_);
            len_ -= pos_;
            pos_ = 0;
        }
        if (cap_ - len_ < want_) {
            std::size_t cap = std::max(len_ + want_, 2 * cap_);
            std::unique_ptr<char[]> bigger(new char[cap]);  // uninitialized: untouched pages stay free
            if (len_) std::memcpy(bigger.get(), buf_.get(), len_);
            buf_ = std::move(bigger);
            cap_ = cap;
        }
        std::vector<os::handle_t> fds;
        std::size_t room = cap_ - len_;
        long n = os::channel_read(ch, buf_.get() + len_, room, &fds, nonblocking);
        if (n > 0) len_ += static_cast<std::size_t>(n);
        if (n > 0 && static_cast<std::size_t>(n) == room && want_ < max_read) want_ *= 2;
        for (auto fd : fds) fds_.push_back(fd);
        return n;
    }
    /// The next complete frame, if there is one.
    bool next(Frame& out) {
        if (len_ - pos_ < sizeof(FrameHeader)) return false;
        FrameHeader h;
        std::memcpy(&h, buf_.get() + pos_, sizeof h);
        if (len_ - pos_ - sizeof h < h.size) {
            // Make room for the whole frame at once rather than doubling step by step.
            if (sizeof h + h.size > want_) want_ = std::min<std::size_t>(sizeof h + h.size, std::size_t(1) << 30);
            return false;
        }
        out.kind = h.kind;
        out.payload.assign(buf_.get() + pos_ + sizeof h, h.size);
        pos_ += sizeof h + h.size;
        out.handles.clear();
        for (std::uint32_t i = 0; i < h.handles && !fds_.empty(); ++i) {
            out.handles.push_back(fds_.front());
            fds_.pop_front();
        }
        return true;
    }
    /// Reads (blocking) until a whole frame is there; false at end of stream.
    bool read_blocking(os::handle_t ch, Frame& out) {
        while (!next(out))
            if (fill(ch, false) <= 0) return false;
        return true;
    }
    /// Forgets everything read so far (closing the handles that came with it).
    void reset() noexcept {
        for (auto fd : fds_) os::close_handle(fd);
        fds_.clear();
        pos_ = len_ = 0;
    }
    FrameReader() = default;
    FrameReader(const FrameReader&) = delete;
    FrameReader& operator=(const FrameReader&) = delete;
    ~FrameReader() {
        for (auto fd : fds_) os::close_handle(fd);
    }

private:
    static constexpr std::size_t max_read = 1 << 18;
    std::unique_ptr<char[]> buf_;
    std::size_t cap_ = 0, pos_ = 0, len_ = 0;
    std::size_t want_ = 2048;  // room wanted for the next read
    std::deque<os::handle_t> fds_;
};

/// HELLO: (pid, serial[, holder]).  The address-space holder a warm child's
/// HELLO names (os::hold_address_space_past_exit), 0 if none.
inline long holder_named_in_hello(const std::string& payload) noexcept {
    try {
        Decoder d(payload);
        std::int64_t pid, holder = 0;
        std::uint64_t serial;
        d(pid, serial);
        if (!d.at_end()) d(holder);
        return static_cast<long>(holder);
    } catch (...) {
        return 0;
    }
}

}  // namespace wire
}  // namespace detail
}  // namespace mpservice
