// codec: how values cross process boundaries.
//
// A value is written into an Encoder (bytes plus, for library handles such as
// Lock or Queue, OS handles that travel beside the bytes) and read back from a
// Decoder, which checks every length against the bytes that are really there:
// truncated, oversized or random input throws DecodeError and never reads out
// of bounds or allocates more than the input could describe.
//
// Both ends run the same build of the same program, so scalars are written in
// native byte order and layout.
//
// Customization (the one way to make your own type travel): give it a member
//
//     template <class Archive> void serialize(Archive& ar) { ar(field1, field2); }
//
// and a default constructor.  The same member both writes and reads.  Library
// types whose encode and decode differ specialize mpservice::Codec<T>.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "errors.hpp"

namespace mpservice {

namespace detail::os {
#if defined(_WIN32)
using handle_t = void*;  // HANDLE
#else
using handle_t = int;  // file descriptor
#endif
}  // namespace detail::os

/// Specialize to make a type travel when a member serialize() is not enough.
/// Needs: static void encode(Encoder&, const T&); static T decode(Decoder&);
template <class T, class Enable = void>
struct Codec;

class Encoder {
public:
    /// Appends raw bytes.
    void write_bytes(const void* data, std::size_t n) {
        if (n) buf_.append(static_cast<const char*>(data), n);
    }
    /// Appends one value through its Codec.
    template <class T>
    void write(const T& value);
    /// Writes each argument in order; this is what serialize() members call.
    template <class... T>
    void operator()(const T&... values) {
        (write(values), ...);
    }
    /// Attaches an OS handle (kept open by the caller until the message is
    /// sent) to travel with the bytes; returns its index for Decoder::take_handle.
    std::uint32_t attach(detail::os::handle_t h) {
        handles_.push_back(h);
        return static_cast<std::uint32_t>(handles_.size() - 1);
    }

    const std::string& bytes() const noexcept { return buf_; }
    std::string& bytes() noexcept { return buf_; }
    const std::vector<detail::os::handle_t>& handles() const noexcept { return handles_; }

private:
    std::string buf_;
    std::vector<detail::os::handle_t> handles_;
};

class Decoder {
public:
    /// `handles` are the OS handles that arrived with the bytes, if any.
    Decoder(const void* data, std::size_t n, const std::vector<detail::os::handle_t>* handles = nullptr)
        : p_(static_cast<const unsigned char*>(data)), end_(p_ + n), handles_(handles) {}
    explicit Decoder(std::string_view s, const std::vector<detail::os::handle_t>* handles = nullptr)
        : Decoder(s.data(), s.size(), handles) {}

    /// Copies n bytes out; throws DecodeError if fewer remain.
    void read_bytes(void* out, std::size_t n) {
        require(n, "bytes");
        if (n) std::memcpy(out, p_, n);
        p_ += n;
    }
    /// Returns a pointer to the next n bytes and skips them (no copy).
    const unsigned char* take(std::size_t n, const char* what = "bytes") {
        require(n, what);
        const unsigned char* at = p_;
        p_ += n;
        return at;
    }
    template <class T>
    T read();
    /// Reads each argument in order; this is what serialize() members call.
    template <class... T>
    void operator()(T&... values) {
        ((values = read<T>()), ...);
    }
    /// Reads a container length and checks that at least `min_bytes_each`
    /// bytes per element remain, so a corrupt length cannot make us allocate.
    std::size_t read_length(std::size_t min_bytes_each, const char* what) {
        std::uint64_t n = read<std::uint64_t>();
        std::size_t each = min_bytes_each ? min_bytes_each : 1;
        if (n > remaining() / each)
            throw DecodeError(std::string("decode: ") + what + " length " + std::to_string(n) +
                              " exceeds the " + std::to_string(remaining()) + " bytes left");
        return static_cast<std::size_t>(n);
    }
    /// The OS handle attached at `index` by Encoder::attach.
    detail::os::handle_t handle(std::uint32_t index) const {
        if (!handles_)
            throw DecodeError("decode: this value holds an OS handle (a Lock, Queue, Value, ...) but "
                              "it arrived over a channel that carries no handles; pass such objects "
                              "as Process arguments");
        if (index >= handles_->size())
            throw DecodeError("decode: handle index " + std::to_string(index) + " out of range (" +
                              std::to_string(handles_->size()) + " handles arrived)");
        return (*handles_)[index];
    }

    std::size_t remaining() const noexcept { return static_cast<std::size_t>(end_ - p_); }
    bool at_end() const noexcept { return p_ == end_; }
    /// Throws unless every byte was consumed (trailing garbage is an error).
    void expect_end(const char* what = "value") const {
        if (!at_end())
            throw DecodeError(std::string("decode: ") + std::to_string(remaining()) +
                              " unexpected trailing bytes after " + what);
    }

private:
    void require(std::size_t n, const char* what) const {
        if (n > remaining())
            throw DecodeError(std::string("decode: truncated input: needed ") + std::to_string(n) + " " +
                              what + ", " + std::to_string(remaining()) + " left");
    }
    const unsigned char* p_;
    const unsigned char* end_;
    const std::vector<detail::os::handle_t>* handles_;
};

template <class T>
void Encoder::write(const T& value) {
    Codec<std::decay_t<T>>::encode(*this, value);
}

template <class T>
T Decoder::read() {
    return Codec<std::decay_t<T>>::decode(*this);
}

/// Encodes one value into bytes (values holding OS handles need an Encoder
/// and a channel that carries handles, such as Process arguments).
template <class T>
std::string encode(const T& value) {
    Encoder e;
    e.write(value);
    return std::move(e.bytes());
}

/// Decodes bytes made by encode<T>; throws DecodeError on malformed input.
template <class T>
T decode(std::string_view bytes) {
    Decoder d(bytes);
    T v = d.read<T>();
    d.expect_end();
    return v;
}

// ---------------------------------------------------------------------------
// Codecs of the standard types.  (Type coverage is filled in below.)

template <class T>
struct Codec<T, std::enable_if_t<std::is_arithmetic_v<T> || std::is_enum_v<T>>> {
    static void encode(Encoder& e, const T& v) { e.write_bytes(&v, sizeof v); }
    static T decode(Decoder& d) {
        T v;
        d.read_bytes(&v, sizeof v);
        return v;
    }
};

template <>
struct Codec<std::string> {
    static void encode(Encoder& e, const std::string& s) {
        e.write(static_cast<std::uint64_t>(s.size()));
        e.write_bytes(s.data(), s.size());
    }
    static std::string decode(Decoder& d) {
        std::size_t n = d.read_length(1, "string");
        const unsigned char* p = d.take(n, "string bytes");
        return std::string(reinterpret_cast<const char*>(p), n);
    }
};

}  // namespace mpservice
