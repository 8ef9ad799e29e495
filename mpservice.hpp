// mpservice.hpp - Python-style multiprocessing for C++17, in one header.
//
// GENERATED FILE - DO NOT EDIT.  Made by tools/amalgamate.py from src/mpservice.hpp
// and the parts under src/mpservice/; edit those and run the tool again.
//
// Use: #include "mpservice.hpp" anywhere; in exactly one .cpp file write
//   #define MPSERVICE_IMPLEMENTATION
// before the include to compile the implementation there.
// SPDX-License-Identifier: MIT

// mpservice - Python-style multiprocessing for C++17.
//
// This umbrella file is the table of contents of the library and the input of
// tools/amalgamate.py, which inlines every part below into the single header
// mpservice.hpp at the repository root.  It can also be included directly
// (with -I src) while working on the parts.
//
// Order: configuration, then the public parts, then - once per program, in the
// translation unit that defines MPSERVICE_IMPLEMENTATION - the implementation.

#ifndef MPSERVICE_HPP_INCLUDED
#define MPSERVICE_HPP_INCLUDED

// ---- begin part: mpservice/public/config.hpp --------------------------------
// config: version and the few switches a user may set before including.

#define MPSERVICE_VERSION_MAJOR 0
#define MPSERVICE_VERSION_MINOR 1
#define MPSERVICE_VERSION_PATCH 0
#define MPSERVICE_VERSION "0.1.0"

#if __cplusplus < 201703L && !(defined(_MSVC_LANG) && _MSVC_LANG >= 201703L)
#error "mpservice.hpp needs C++17 or later"
#endif

#if defined(_WIN32)
#define MPSERVICE_WIN32 1
#else
#define MPSERVICE_POSIX 1
#endif

// Linkage of the non-template functions defined in the implementation part.
#ifndef MPSERVICE_API
#define MPSERVICE_API
#endif
// ---- end part: mpservice/public/config.hpp
// ---- begin part: mpservice/public/errors.hpp --------------------------------
// errors: the exception types every part throws.
//
// All library errors derive from mpservice::Error (a std::runtime_error), so one
// catch clause takes them all.  Exceptions re-thrown from another process are a
// separate family: see remote_exception.hpp.

#include <stdexcept>
#include <string>

namespace mpservice {

/// Base of every error the library throws itself.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Bytes that do not decode to the expected type: truncated, oversized, corrupt.
class DecodeError : public Error {
public:
    using Error::Error;
};

/// A wait with a timeout expired (result(), exception(), get(), acquire(), ...).
class TimeoutError : public Error {
public:
    using Error::Error;
};

/// An operation that the object's state does not allow, e.g. waiting on a
/// worker that was never started, or starting one twice.
class InvalidStateError : public Error {
public:
    using Error::Error;
};

/// A child process ended without delivering a result: exit(n) or a signal.
/// exitcode() follows Python: n after exit(n), -N after signal N.
class ProcessError : public Error {
public:
    ProcessError(const std::string& what, int exitcode) : Error(what), exitcode_(exitcode) {}
    int exitcode() const noexcept { return exitcode_; }
    /// The signal that ended the process, or 0 if it exited.
    int signal() const noexcept { return exitcode_ < 0 ? -exitcode_ : 0; }

private:
    int exitcode_;
};

/// A Barrier was aborted, reset, timed out or lost a party while threads waited.
class BrokenBarrierError : public Error {
public:
    using Error::Error;
};

/// The process that held a lock died while holding it.  Thrown by the next
/// acquirer *after* it has taken the lock: the caller owns the lock and must
/// either repair the protected state and call make_consistent(), or release.
class OwnerDiedError : public Error {
public:
    using Error::Error;
};

/// get_nowait() / get(timeout) found the queue empty.
class Empty : public Error {
public:
    Empty() : Error("queue is empty") {}
    using Error::Error;
};

/// put_nowait() / put(timeout) found the queue full.
class Full : public Error {
public:
    Full() : Error("queue is full") {}
    using Error::Error;
};

/// put() on a closed queue, or get() on a closed queue with nothing left.
class QueueClosed : public Error {
public:
    QueueClosed() : Error("queue is closed") {}
    using Error::Error;
};

}  // namespace mpservice
// ---- end part: mpservice/public/errors.hpp
// ---- begin part: mpservice/public/codec.hpp ---------------------------------
// codec: how values cross process boundaries.
//
// A value is written into an Encoder (bytes plus, for library handles such as
// Lock or Queue, OS handles that travel beside the bytes) and read back from a
// Decoder, which checks every length against the bytes that are really there:
// truncated, oversized or random input throws DecodeError and never reads out
// of bounds or allocates more than the input could describe.
//
// Both ends run the same build of the same program, so scalars are written in
// native byte order and layout.  The format is not meant for files or for
// other programs.
//
// What travels, out of the box:
//   - arithmetic types (bool is one byte that must decode as 0 or 1), char types, enums;
//   - std::string (any std::basic_string), std::vector (vector<bool> packed), std::deque,
//     std::list, std::array, C arrays as fields, std::pair, std::tuple, std::optional,
//     std::variant, std::monostate, std::map, std::multimap, std::unordered_map,
//     std::unordered_multimap, std::set, std::multiset, std::unordered_set,
//     std::unordered_multiset, nested to any depth (up to codec_max_depth levels);
//   - trivially copyable classes that have no serialize member: copied byte for byte, and
//     containers of them in one block.  Such a struct is taken as it is: a struct that holds
//     a pointer (or a pointer-like handle) means nothing in another process, and one whose
//     fields are not valid for every byte pattern (bool, an enum without a fixed underlying
//     type) is not checked against corrupt input.  Give such a struct serialize() instead:
//     then every field is carried and checked by its own codec.
//   - Enums travel as their bytes.  An enum with a fixed underlying type (every enum class,
//     `enum E : int`) can hold any value, so nothing can go wrong; for an unscoped enum
//     without one, a corrupt value outside its enumerators' range is not detected.
//
// Customization (the ONE way to make your own type travel): give it a member
//
//     template <class Archive> void serialize(Archive& ar) { ar(field1, field2); }
//
// The same member both writes (Archive = Encoder) and reads (Archive = Decoder),
// so it must be public and non-const and must only call ar(...) on the fields.  A
// type with serialize() is default constructed and then filled in when it is
// decoded, so it needs a public default constructor.
//
// Library types whose encode and decode differ (handles to shared objects)
// specialize mpservice::Codec<T> instead:
//     static void encode(Encoder&, const T&);  static T decode(Decoder&);
//     optional: static constexpr std::size_t min_encoded_size() - a lower bound on the
//     bytes one value takes, used to reject impossible container lengths (default 1).
//
// Anything else - raw pointers, references, std::function, classes that are not
// trivially copyable and have no serialize() - is a compile-time error naming the
// type (see mpservice_cannot_encode_this_type below).

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <new>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

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
/// The primary template serves types with a serialize() member and trivially
/// copyable classes, and refuses everything else at compile time.
template <class T, class Enable = void>
struct Codec;

class Encoder;
class Decoder;

/// Values nest at most this deep (a vector of vectors is two levels).  Only a
/// recursive user type can reach it; the limit keeps a crafted input from
/// overflowing the stack of the decoding process.
inline constexpr unsigned codec_max_depth = 256;

/// Instantiated for a type the codec cannot carry.  The compiler's note
/// "required from mpservice::mpservice_cannot_encode_this_type<T>" names the type.
template <class T>
struct mpservice_cannot_encode_this_type {
    static_assert(
        sizeof(T*) == 0 || !sizeof(T*),
        "mpservice codec: this type cannot cross a process boundary (it is the T of the "
        "mpservice_cannot_encode_this_type<T> the compiler names here). Raw pointers, references, "
        "std::function, std::string_view and classes that are neither trivially copyable nor customized are "
        "refused. To make your own class travel, give it a member "
        "`template <class Archive> void serialize(Archive& ar) { ar(field1, field2); }` "
        "or specialize `mpservice::Codec<T>` with static encode(Encoder&, const T&) and "
        "T decode(Decoder&).");
    static void encode(Encoder&, const T&);
    static T decode(Decoder&);
};

// References get their own message: the fix is to pass the value, not to customize.
template <class T>
struct mpservice_cannot_encode_this_type<T&> {
    static_assert(
        sizeof(T*) == 0 || !sizeof(T*),
        "mpservice codec: a reference cannot cross a process boundary (it is the T& of the "
        "mpservice_cannot_encode_this_type<T&> the compiler names here); pass the value itself. For your own "
        "types the customization points are a member `serialize(Archive&)` or "
        "`mpservice::Codec<T>`.");
    static void encode(Encoder&, const T&);
    static T& decode(Decoder&);
};

namespace detail {

template <class T>
using codec_t = std::conditional_t<std::is_reference_v<T>, mpservice_cannot_encode_this_type<T>,
                                   Codec<std::remove_cv_t<T>>>;

// True when Codec<T> copies T byte for byte, so that containers of T can be
// copied in one block.
template <class T, class = void>
struct is_bitwise : std::false_type {};
template <class T>
struct is_bitwise<T, std::enable_if_t<codec_t<T>::bitwise>> : std::true_type {};
template <class T>
inline constexpr bool is_bitwise_v = is_bitwise<T>::value;

template <class T, class = void>
struct has_min_encoded_size : std::false_type {};
template <class T>
struct has_min_encoded_size<T, std::void_t<decltype(codec_t<T>::min_encoded_size())>> : std::true_type {};

/// A lower bound on the bytes one encoded T takes; containers use it to refuse
/// lengths the remaining input cannot hold before they allocate anything.
template <class T>
std::size_t min_encoded_size() {
    if constexpr (has_min_encoded_size<T>::value)
        return codec_t<T>::min_encoded_size();
    else
        return 1;
}

}  // namespace detail

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
    /// sent) to travel with the bytes; returns its index for Decoder::handle.
    std::uint32_t attach(detail::os::handle_t h) {
        handles_.push_back(h);
        return static_cast<std::uint32_t>(handles_.size() - 1);
    }
    /// Reserves room for n more bytes (an optimization only).
    void reserve(std::size_t n) { buf_.reserve(buf_.size() + n); }

    const std::string& bytes() const noexcept { return buf_; }
    std::string& bytes() noexcept { return buf_; }
    const std::vector<detail::os::handle_t>& handles() const noexcept { return handles_; }

private:
    std::string buf_;
    std::vector<detail::os::handle_t> handles_;
    unsigned depth_ = 0;
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
    /// Reads one value through its Codec.
    template <class T>
    T read();
    /// Reads into an existing object (also C arrays, which read<T> cannot return).
    template <class T>
    void read_into(T& out);
    /// Reads each argument in order; this is what serialize() members call.
    template <class... T>
    void operator()(T&... values) {
        (read_into(values), ...);
    }
    /// Reads a container length and checks that at least `min_bytes_each`
    /// bytes per element remain, so a corrupt length cannot make us allocate.
    /// Elements that take no bytes at all (an empty tuple, a serialize() that
    /// writes nothing) are limited to max_empty_elements per container.
    std::size_t read_length(std::size_t min_bytes_each, const char* what) {
        std::uint64_t n = read<std::uint64_t>();
        if (min_bytes_each == 0) {
            if (n > max_empty_elements)
                throw DecodeError(std::string("decode: ") + what + " length " + std::to_string(n) +
                                  " of elements that take no bytes exceeds the limit of " +
                                  std::to_string(max_empty_elements));
        } else if (n > remaining() / min_bytes_each) {
            throw DecodeError(std::string("decode: ") + what + " length " + std::to_string(n) +
                              " cannot fit in the " + std::to_string(remaining()) +
                              " bytes left (each element takes at least " + std::to_string(min_bytes_each) +
                              ")");
        }
        return static_cast<std::size_t>(n);
    }
    static constexpr std::size_t max_empty_elements = std::size_t(1) << 20;

    /// The OS handle attached at `index` by Encoder::attach.
    detail::os::handle_t handle(std::uint32_t index) const {
        if (!handles_)
            throw DecodeError(
                "decode: this value holds an OS handle (a Lock, Queue, Value, ...) but "
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
        if (n > remaining()) throw_truncated(n, what);
    }
    // Out of line and cold: keeps the fast path small (and g++ 12's -Warray-bounds
    // from reasoning about the bytes past a failed check).
    [[noreturn]] void throw_truncated(std::size_t n, const char* what) const {
        throw DecodeError(std::string("decode: truncated input: needed ") + std::to_string(n) + " " + what +
                          ", " + std::to_string(remaining()) + " left");
    }
    const unsigned char* p_;
    const unsigned char* end_;
    const std::vector<detail::os::handle_t>* handles_;
    unsigned depth_ = 0;
};

namespace detail {

// Counts one nesting level for the lifetime of a compound value being read or
// written; past codec_max_depth it throws instead of recursing further.
class NestingGuard {
public:
    NestingGuard(unsigned& depth, bool decoding) : depth_(depth) {
        if (depth_ >= codec_max_depth) {
            if (decoding)
                throw DecodeError("decode: value nests deeper than " + std::to_string(codec_max_depth) +
                                  " levels (corrupt input, or a recursive type that deep)");
            throw Error("encode: value nests deeper than " + std::to_string(codec_max_depth) +
                        " levels; the other side could not decode it");
        }
        ++depth_;
    }
    ~NestingGuard() { --depth_; }
    NestingGuard(const NestingGuard&) = delete;
    NestingGuard& operator=(const NestingGuard&) = delete;

private:
    unsigned& depth_;
};

}  // namespace detail

template <class T>
void Encoder::write(const T& value) {
    using C = detail::codec_t<T>;
    if constexpr (detail::is_bitwise_v<T>) {
        C::encode(*this, value);
    } else {
        detail::NestingGuard guard(depth_, false);
        C::encode(*this, value);
    }
}

template <class T>
T Decoder::read() {
    using C = detail::codec_t<T>;
    if constexpr (detail::is_bitwise_v<T>) {
        return C::decode(*this);
    } else {
        detail::NestingGuard guard(depth_, true);
        return C::decode(*this);
    }
}

template <class T>
void Decoder::read_into(T& out) {
    if constexpr (std::is_array_v<T>) {
        detail::NestingGuard guard(depth_, true);
        Codec<std::remove_cv_t<T>>::decode_into(*this, out);
    } else {
        out = read<T>();
    }
}

/// Encodes one value into bytes (values holding OS handles need an Encoder
/// and a channel that carries handles, such as Process arguments).
template <class T>
std::string encode(const T& value) {
    Encoder e;
    e.write(value);
    return std::move(e.bytes());
}

/// Decodes bytes made by encode<T>; throws DecodeError on malformed input,
/// including bytes left over after the value.
template <class T>
T decode(std::string_view bytes) {
    Decoder d(bytes);
    T v = d.read<T>();
    d.expect_end();
    return v;
}

// ---------------------------------------------------------------------------
// The default codec: serialize() members, trivially copyable classes, refusal.

namespace detail {

template <class T, class = void>
struct has_serialize : std::false_type {};
template <class T>
struct has_serialize<T, std::void_t<decltype(std::declval<T&>().serialize(std::declval<Encoder&>()))>>
    : std::true_type {};

// An archive that visits a default-constructed value's fields only to add up
// their minimum encoded sizes.
struct MinSizeProbe {
    std::size_t total = 0;
    template <class... T>
    void operator()(T&...) {
        ((total += min_encoded_size<T>()), ...);
    }
};

template <class T>
struct SerializeCodec {
    static_assert(std::is_default_constructible_v<T>,
                  "mpservice codec: a type with a serialize() member needs a default constructor to be "
                  "decoded (it is default constructed, then serialize() fills in the fields); add one or "
                  "specialize mpservice::Codec<T>");
    static void encode(Encoder& e, const T& v) { const_cast<T&>(v).serialize(e); }
    static T decode(Decoder& d) {
        T v{};
        v.serialize(d);
        return v;
    }
    // Found by running serialize() once on a default-constructed value with an
    // archive that only adds up its fields' minimum sizes.  A serialize() that
    // is not a template (it takes only Encoder& / Decoder&) cannot be probed:
    // then each value is assumed to take at least one byte.
    static std::size_t min_encoded_size() {
        if constexpr (accepts_probe<T>::value) {
            static const std::size_t size = [] {
                T v{};
                MinSizeProbe probe;
                v.serialize(probe);
                return probe.total;
            }();
            return size;
        } else {
            return 1;
        }
    }

private:
    template <class X, class = void>
    struct accepts_probe : std::false_type {};
    template <class X>
    struct accepts_probe<X,
                         std::void_t<decltype(std::declval<X&>().serialize(std::declval<MinSizeProbe&>()))>>
        : std::true_type {};
};

// Arithmetic types, enums and trivially copyable classes: the object's bytes.
template <class T>
struct BitwiseCodec {
    static constexpr bool bitwise = true;
    static constexpr std::size_t min_encoded_size() { return sizeof(T); }
    static void encode(Encoder& e, const T& v) { e.write_bytes(&v, sizeof v); }
    static T decode(Decoder& d) { return from_bytes(d.take(sizeof(T), "bytes")); }
    static T from_bytes(const unsigned char* p) {
        if constexpr (std::is_default_constructible_v<T>) {
            T v;
            std::memcpy(static_cast<void*>(&v), p, sizeof v);
            return v;
        } else {
            alignas(T) unsigned char storage[sizeof(T)];
            std::memcpy(storage, p, sizeof storage);
            return *std::launder(reinterpret_cast<T*>(storage));
        }
    }
};

// Empty classes (std::monostate, tag types) carry no information: no bytes.
template <class T>
struct EmptyCodec {
    static constexpr std::size_t min_encoded_size() { return 0; }
    static void encode(Encoder&, const T&) {}
    static T decode(Decoder&) {
        const unsigned char zeros[sizeof(T)] = {};
        return BitwiseCodec<T>::from_bytes(zeros);
    }
};

template <class T>
using default_codec_t = std::conditional_t<
    has_serialize<T>::value, SerializeCodec<T>,
    std::conditional_t<
        std::is_empty_v<T> && std::is_trivially_copyable_v<T>, EmptyCodec<T>,
        std::conditional_t<(std::is_class_v<T> || std::is_union_v<T>)&&std::is_trivially_copyable_v<T>,
                           BitwiseCodec<T>, mpservice_cannot_encode_this_type<T>>>>;

}  // namespace detail

template <class T, class Enable>
struct Codec : detail::default_codec_t<T> {};

// ---------------------------------------------------------------------------
// Scalars.

template <class T>
struct Codec<T, std::enable_if_t<std::is_arithmetic_v<T> || std::is_enum_v<T>>> : detail::BitwiseCodec<T> {};

/// bool travels as one byte that must be 0 or 1: any other byte is corrupt
/// input, and loading it as a bool would be undefined behaviour.
template <>
struct Codec<bool> {
    static constexpr std::size_t min_encoded_size() { return 1; }
    static void encode(Encoder& e, const bool& v) {
        const unsigned char byte = v ? 1 : 0;
        e.write_bytes(&byte, 1);
    }
    static bool decode(Decoder& d) {
        const unsigned char byte = *d.take(1, "bool");
        if (byte > 1) throw DecodeError("decode: bool byte is " + std::to_string(byte) + ", not 0 or 1");
        return byte == 1;
    }
};

// Views and pointer-like standard types hold addresses that mean nothing in
// another process.
template <class C, class Tr>
struct Codec<std::basic_string_view<C, Tr>>
    : mpservice_cannot_encode_this_type<std::basic_string_view<C, Tr>> {};

// ---------------------------------------------------------------------------
// Strings and sequences.

template <class C, class Tr, class A>
struct Codec<std::basic_string<C, Tr, A>> {
    using S = std::basic_string<C, Tr, A>;
    static constexpr std::size_t min_encoded_size() { return sizeof(std::uint64_t); }
    static void encode(Encoder& e, const S& s) {
        e.write(static_cast<std::uint64_t>(s.size()));
        e.write_bytes(s.data(), s.size() * sizeof(C));
    }
    static S decode(Decoder& d) {
        const std::size_t n = d.read_length(sizeof(C), "string");
        const unsigned char* p = d.take(n * sizeof(C), "string bytes");
        S s;
        if constexpr (sizeof(C) == 1) {
            s.assign(reinterpret_cast<const C*>(p), n);
        } else {
            s.resize(n);
            if (n) std::memcpy(&s[0], p, n * sizeof(C));
        }
        return s;
    }
};

namespace detail {

// How many elements to reserve up front for n elements still to be read: never
// more than about 1 MiB ahead of the bytes actually decoded, so a length that
// passed the minimum-size check still cannot make a large type allocate
// out of proportion to the input.
template <class T>
std::size_t safe_reserve(std::size_t n) {
    constexpr std::size_t ahead = (std::size_t(1) << 20) / sizeof(T) + 1;
    return n < ahead ? n : ahead;
}

template <class Seq>
struct SequenceCodec {
    using T = typename Seq::value_type;
    static constexpr std::size_t min_encoded_size() { return sizeof(std::uint64_t); }
    static void encode(Encoder& e, const Seq& s) {
        e.write(static_cast<std::uint64_t>(s.size()));
        for (const auto& x : s) e.write(x);
    }
    static Seq decode(Decoder& d) {
        const std::size_t n = d.read_length(detail::min_encoded_size<T>(), "sequence");
        Seq s;
        if constexpr (std::is_same_v<Seq, std::vector<T, typename Seq::allocator_type>>)
            s.reserve(safe_reserve<T>(n));
        for (std::size_t i = 0; i < n; ++i) s.push_back(d.read<T>());
        return s;
    }
};

}  // namespace detail

/// Vectors of bitwise elements (numbers, enums, trivially copyable structs) are
/// one length and one block of bytes.
template <class T, class A>
struct Codec<std::vector<T, A>> {
    using V = std::vector<T, A>;
    static constexpr std::size_t min_encoded_size() { return sizeof(std::uint64_t); }
    static void encode(Encoder& e, const V& v) {
        if constexpr (detail::is_bitwise_v<T>) {
            e.write(static_cast<std::uint64_t>(v.size()));
            e.write_bytes(v.data(), v.size() * sizeof(T));
        } else {
            detail::SequenceCodec<V>::encode(e, v);
        }
    }
    static V decode(Decoder& d) {
        if constexpr (detail::is_bitwise_v<T>) {
            const std::size_t n = d.read_length(sizeof(T), "vector");
            const unsigned char* p = d.take(n * sizeof(T), "vector elements");
            V v(n);
            if (n) std::memcpy(static_cast<void*>(v.data()), p, n * sizeof(T));
            return v;
        } else {
            return detail::SequenceCodec<V>::decode(d);
        }
    }
};

/// vector<bool>: a bit count, then the bits packed eight to a byte; the unused
/// bits of the last byte must be zero.
template <class A>
struct Codec<std::vector<bool, A>> {
    using V = std::vector<bool, A>;
    static constexpr std::size_t min_encoded_size() { return sizeof(std::uint64_t); }
    static void encode(Encoder& e, const V& v) {
        e.write(static_cast<std::uint64_t>(v.size()));
        std::string packed((v.size() + 7) / 8, '\0');
        for (std::size_t i = 0; i < v.size(); ++i)
            if (v[i]) packed[i / 8] = static_cast<char>(packed[i / 8] | (1 << (i % 8)));
        e.write_bytes(packed.data(), packed.size());
    }
    static V decode(Decoder& d) {
        const std::uint64_t n = d.read<std::uint64_t>();
        const std::uint64_t nbytes = n / 8 + (n % 8 != 0);
        if (nbytes > d.remaining())
            throw DecodeError("decode: vector<bool> of " + std::to_string(n) + " bits cannot fit in the " +
                              std::to_string(d.remaining()) + " bytes left");
        const unsigned char* p = d.take(static_cast<std::size_t>(nbytes), "vector<bool> bits");
        if (n % 8 != 0 && (p[nbytes - 1] >> (n % 8)) != 0)
            throw DecodeError("decode: vector<bool> has bits set past its length");
        V v(static_cast<std::size_t>(n));
        for (std::size_t i = 0; i < v.size(); ++i) v[i] = (p[i / 8] >> (i % 8)) & 1;
        return v;
    }
};

template <class T, class A>
struct Codec<std::deque<T, A>> : detail::SequenceCodec<std::deque<T, A>> {};
template <class T, class A>
struct Codec<std::list<T, A>> : detail::SequenceCodec<std::list<T, A>> {};

/// std::array: its elements, no length (the type says it).
template <class T, std::size_t N>
struct Codec<std::array<T, N>> {
    using Arr = std::array<T, N>;
    static constexpr bool bitwise = detail::is_bitwise_v<T>;
    static std::size_t min_encoded_size() { return N * detail::min_encoded_size<T>(); }
    static void encode(Encoder& e, const Arr& a) {
        if constexpr (bitwise)
            e.write_bytes(a.data(), sizeof(T) * N);
        else
            for (const auto& x : a) e.write(x);
    }
    static Arr decode(Decoder& d) {
        static_assert(std::is_default_constructible_v<T>,
                      "mpservice codec: decoding std::array<T, N> needs a default constructible T");
        Arr a;
        if constexpr (bitwise) {
            if (N) d.read_bytes(static_cast<void*>(a.data()), sizeof(T) * N);
        } else {
            for (auto& x : a) x = d.read<T>();
        }
        return a;
    }
};

/// C arrays, as fields of a serialize() type (read through Decoder::read_into).
template <class T, std::size_t N>
struct Codec<T[N]> {
    static std::size_t min_encoded_size() { return N * detail::min_encoded_size<T>(); }
    static void encode(Encoder& e, const T (&a)[N]) {
        for (const auto& x : a) e.write(x);
    }
    static void decode_into(Decoder& d, T (&a)[N]) {
        for (auto& x : a) d.read_into(x);
    }
};

// ---------------------------------------------------------------------------
// Product and sum types.

template <class A, class B>
struct Codec<std::pair<A, B>> {
    static std::size_t min_encoded_size() {
        return detail::min_encoded_size<A>() + detail::min_encoded_size<B>();
    }
    static void encode(Encoder& e, const std::pair<A, B>& p) {
        // Explicit arguments so that a reference member is refused, not copied.
        e.template write<A>(p.first);
        e.template write<B>(p.second);
    }
    static std::pair<A, B> decode(Decoder& d) {
        // A braced list is evaluated left to right, so first is read first.
        return std::pair<A, B>{d.read<A>(), d.read<B>()};
    }
};

template <class... T>
struct Codec<std::tuple<T...>> {
    static std::size_t min_encoded_size() { return (std::size_t(0) + ... + detail::min_encoded_size<T>()); }
    static void encode(Encoder& e, const std::tuple<T...>& t) {
        encode_each(e, t, std::index_sequence_for<T...>{});
    }
    static std::tuple<T...> decode([[maybe_unused]] Decoder& d) {
        return std::tuple<T...>{d.read<T>()...};  // braced: left to right
    }

private:
    template <std::size_t... I>
    static void encode_each([[maybe_unused]] Encoder& e, [[maybe_unused]] const std::tuple<T...>& t,
                            std::index_sequence<I...>) {
        // Explicit arguments so that a reference element is refused, not copied.
        (e.template write<T>(std::get<I>(t)), ...);
    }
};

/// optional: a flag byte (0 empty, 1 present) and the value if present.
template <class T>
struct Codec<std::optional<T>> {
    static constexpr std::size_t min_encoded_size() { return 1; }
    static void encode(Encoder& e, const std::optional<T>& o) {
        e.write(static_cast<std::uint8_t>(o.has_value()));
        if (o) e.write(*o);
    }
    static std::optional<T> decode(Decoder& d) {
        const auto flag = d.read<std::uint8_t>();
        if (flag == 0) return std::nullopt;
        if (flag != 1)
            throw DecodeError("decode: optional flag byte is " + std::to_string(flag) + ", not 0 or 1");
        return std::optional<T>(std::in_place, d.read<T>());
    }
};

/// variant: the alternative's index (32 bits, checked) and its value.
template <class... T>
struct Codec<std::variant<T...>> {
    using V = std::variant<T...>;
    static constexpr std::size_t min_encoded_size() { return sizeof(std::uint32_t); }
    static void encode(Encoder& e, const V& v) {
        if (v.valueless_by_exception())
            throw Error("encode: a std::variant that is valueless by exception cannot be sent");
        e.write(static_cast<std::uint32_t>(v.index()));
        std::visit([&e](const auto& x) { e.write(x); }, v);
    }
    static V decode(Decoder& d) {
        const auto index = d.read<std::uint32_t>();
        if (index >= sizeof...(T))
            throw DecodeError("decode: variant index " + std::to_string(index) +
                              " out of range (the variant has " + std::to_string(sizeof...(T)) +
                              " alternatives)");
        return decode_alternative(d, index, std::index_sequence_for<T...>{});
    }

private:
    template <std::size_t... I>
    static V decode_alternative(Decoder& d, std::uint32_t index, std::index_sequence<I...>) {
        using Reader = V (*)(Decoder&);
        static constexpr Reader readers[] = {[](Decoder& dd) -> V {
            return V(std::in_place_index<I>, dd.read<std::variant_alternative_t<I, V>>());
        }...};
        return readers[index](d);
    }
};

// ---------------------------------------------------------------------------
// Maps and sets.  Unique containers reject a repeated key as corrupt input.

namespace detail {

template <class M, bool Unique>
struct AssociativeCodec {
    using K = typename M::key_type;
    static constexpr bool is_map = !std::is_same_v<typename M::value_type, K>;
    static constexpr std::size_t min_encoded_size() { return sizeof(std::uint64_t); }

    static void encode(Encoder& e, const M& m) {
        e.write(static_cast<std::uint64_t>(m.size()));
        for (const auto& x : m) {
            if constexpr (is_map) {
                e.write(x.first);
                e.write(x.second);
            } else {
                e.write(x);
            }
        }
    }
    static M decode(Decoder& d) {
        std::size_t each = detail::min_encoded_size<K>();
        if constexpr (is_map) each += detail::min_encoded_size<typename M::mapped_type>();
        const std::size_t n = d.read_length(each, is_map ? "map" : "set");
        M m;
        if constexpr (has_reserve<M>::value) m.reserve(safe_reserve<typename M::value_type>(n));
        for (std::size_t i = 0; i < n; ++i) {
            const std::size_t before = m.size();
            if constexpr (is_map) {
                K key = d.read<K>();
                insert(m, std::move(key), d.read<typename M::mapped_type>());
            } else {
                insert(m, d.read<K>());
            }
            if (Unique && m.size() == before)
                throw DecodeError(std::string("decode: duplicate key in ") + (is_map ? "map" : "set"));
        }
        return m;
    }

private:
    template <class X, class = void>
    struct has_reserve : std::false_type {};
    template <class X>
    struct has_reserve<X, std::void_t<decltype(std::declval<X&>().reserve(std::size_t{}))>> : std::true_type {
    };
    template <class X, class = void>
    struct is_ordered : std::false_type {};
    template <class X>
    struct is_ordered<X, std::void_t<typename X::key_compare>> : std::true_type {};

    // Ordered containers were written in order, so the end is the right hint.
    template <class... Args>
    static void insert(M& m, Args&&... args) {
        if constexpr (is_ordered<M>::value)
            m.emplace_hint(m.end(), std::forward<Args>(args)...);
        else
            m.emplace(std::forward<Args>(args)...);
    }
};

}  // namespace detail

template <class K, class V, class C, class A>
struct Codec<std::map<K, V, C, A>> : detail::AssociativeCodec<std::map<K, V, C, A>, true> {};
template <class K, class V, class C, class A>
struct Codec<std::multimap<K, V, C, A>> : detail::AssociativeCodec<std::multimap<K, V, C, A>, false> {};
template <class K, class V, class H, class E, class A>
struct Codec<std::unordered_map<K, V, H, E, A>>
    : detail::AssociativeCodec<std::unordered_map<K, V, H, E, A>, true> {};
template <class K, class V, class H, class E, class A>
struct Codec<std::unordered_multimap<K, V, H, E, A>>
    : detail::AssociativeCodec<std::unordered_multimap<K, V, H, E, A>, false> {};
template <class K, class C, class A>
struct Codec<std::set<K, C, A>> : detail::AssociativeCodec<std::set<K, C, A>, true> {};
template <class K, class C, class A>
struct Codec<std::multiset<K, C, A>> : detail::AssociativeCodec<std::multiset<K, C, A>, false> {};
template <class K, class H, class E, class A>
struct Codec<std::unordered_set<K, H, E, A>>
    : detail::AssociativeCodec<std::unordered_set<K, H, E, A>, true> {};
template <class K, class H, class E, class A>
struct Codec<std::unordered_multiset<K, H, E, A>>
    : detail::AssociativeCodec<std::unordered_multiset<K, H, E, A>, false> {};

}  // namespace mpservice
// ---- end part: mpservice/public/codec.hpp
// ---- begin part: mpservice/detail/os.hpp ------------------------------------
// os: the platform layer.  Every system call the library makes goes through a
// function declared here and defined in impl/os_posix.cpp (impl/os_win32.cpp is
// where a Windows back-end goes).  Nothing here includes a platform header, so
// the public parts stay free of <unistd.h> and <windows.h>.
//
// The declarations are grouped by the concern that needs them; each group has
// a matching section in the implementation file.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>
#include <typeinfo>
#include <vector>

namespace mpservice::detail::os {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;
/// A deadline that never comes (wait without a timeout).
inline constexpr Deadline no_deadline = Deadline::max();

/// Deadline `timeout` from now; a negative timeout means "already expired",
/// and a huge one saturates to no_deadline instead of overflowing.
template <class Rep, class Period>
Deadline deadline_after(std::chrono::duration<Rep, Period> timeout) {
    auto now = Clock::now();
    if (timeout <= timeout.zero()) return now;
    if (std::chrono::duration<double>(timeout).count() >
        std::chrono::duration<double>(no_deadline - now).count())
        return no_deadline;
    return now + std::chrono::duration_cast<Clock::duration>(timeout);
}

// ---------------------------------------------------------------- handles
inline constexpr handle_t invalid_handle = handle_t(-1);
/// Closes a handle; invalid_handle is ignored.  Never throws.
MPSERVICE_API void close_handle(handle_t h) noexcept;
/// Duplicates a handle (close-on-exec); throws std::system_error.
MPSERVICE_API handle_t duplicate_handle(handle_t h);

// ---------------------------------------------------------------- shared memory
/// Creates anonymous shared memory of `size` bytes (zero-filled), private to
/// this user, with no name in any namespace: it lives while a handle or a
/// mapping of it exists.  Returns its handle (close-on-exec).
MPSERVICE_API handle_t shm_create(std::size_t size);
/// The size of the shared memory behind `h`.
MPSERVICE_API std::size_t shm_size(handle_t h);
/// Maps `size` bytes of `h` read-write and shared; throws std::system_error.
MPSERVICE_API void* shm_map(handle_t h, std::size_t size);
MPSERVICE_API void shm_unmap(void* addr, std::size_t size) noexcept;

// ---------------------------------------------------------------- waiting on a word
/// Blocks while `*word == expected` until futex_wake on the same word (from any
/// process that maps it) or until `deadline`.  Returns false on timeout; may
/// return true spuriously, so callers re-check their condition.
MPSERVICE_API bool futex_wait(const std::atomic<std::uint32_t>* word, std::uint32_t expected,
                              Deadline deadline = no_deadline);
/// Wakes up to `count` waiters blocked on `word` (INT32_MAX for all).
MPSERVICE_API void futex_wake(const std::atomic<std::uint32_t>* word, int count);
/// A pause instruction for spin loops.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// ---------------------------------------------------------------- robust mutex
/// Storage for a mutex that lives in shared memory and survives the death of
/// its owner: the next locker takes it and is told (LockResult::owner_died).
/// Placed inside shared structures; initialized once by robust_mutex_init.
struct alignas(16) RobustMutex {
    unsigned char storage[64];
};
enum class LockResult { acquired, owner_died, timed_out, busy };
/// Initializes a process-shared, robust, error-checking mutex in place.
MPSERVICE_API void robust_mutex_init(RobustMutex* m);
/// Locks, spinning briefly before blocking; `deadline` bounds the wait.
/// owner_died: the lock is now held by the caller but the previous owner
/// died holding it; call robust_mutex_consistent to keep using the mutex.
MPSERVICE_API LockResult robust_mutex_lock(RobustMutex* m, Deadline deadline = no_deadline);
/// Takes the lock if it is free: acquired, owner_died or busy.
MPSERVICE_API LockResult robust_mutex_trylock(RobustMutex* m);
/// Releases; throws std::system_error if the caller does not hold it.
MPSERVICE_API void robust_mutex_unlock(RobustMutex* m);
/// Marks the state protected by a mutex taken with owner_died as repaired.
MPSERVICE_API void robust_mutex_consistent(RobustMutex* m);

// ---------------------------------------------------------------- processes
/// This process's id.
MPSERVICE_API long current_pid() noexcept;
/// Whether a process with this id exists (it may be a zombie).
MPSERVICE_API bool pid_alive(long pid) noexcept;

// ---------------------------------------------------------------- remote exception / symbolization
/// Whether throw sites are recorded (see impl/os_posix_stacktrace.cpp: the
/// __cxa_throw interposition is off under sanitizers and MPSERVICE_NO_THROW_HOOK).
MPSERVICE_API bool throw_hook_active() noexcept;
/// Turns the recording of throw sites on or off at run time (default on).
MPSERVICE_API void set_throw_site_capture(bool enabled) noexcept;
/// Copies into `pcs` the return addresses recorded when `object` (of type
/// `type`) was last thrown by this thread; returns their number (0 if unknown).
MPSERVICE_API int throw_site_stack(const void* object, const std::type_info* type, void** pcs, int max) noexcept;
/// Records the calling stack, from the frame whose return address is `caller`
/// on, as the place where this thread re-raises `object` (read back by
/// raise_site_stack).
MPSERVICE_API void note_raise_site(const void* object, const void* caller) noexcept;
MPSERVICE_API int raise_site_stack(const void* object, void** pcs, int max) noexcept;
/// The caller's stack: up to `max` return addresses, skipping `skip` innermost
/// frames - or, if `from` is one of the return addresses, starting there.
MPSERVICE_API int capture_stack(void** pcs, int max, int skip, const void* from = nullptr) noexcept;

/// One symbolized stack frame.
struct StackFrame {
    const void* pc = nullptr;
    std::string function;  // demangled; empty if unknown
    std::string module;    // path of the executable or library
    std::uintptr_t offset = 0;  // pc relative to the module's load address
    std::string file;      // source file, if line information was found
    int line = 0;
    bool inlined = false;  // a function inlined into the next frame (same pc)
};
/// Names the functions at `pcs` (return addresses): dynamic symbols, the ELF
/// .symtab of each module (so static functions of an executable built without
/// -rdynamic are named), and file:line when line information is available.
MPSERVICE_API std::vector<StackFrame> symbolize(void* const* pcs, int n);
/// Whether symbolize looks up file:line (by running addr2line); default true.
MPSERVICE_API void set_line_lookup(bool enabled) noexcept;
/// Demangles a C++ type or symbol name; returns it unchanged if it is not mangled.
MPSERVICE_API std::string demangle(const char* mangled);
/// Type of the exception currently being handled (inside a catch clause), or null.
MPSERVICE_API const std::type_info* current_exception_type() noexcept;
/// Address of the thrown object an exception_ptr refers to (the key of the
/// throw-site table), or null.
MPSERVICE_API const void* exception_object(const std::exception_ptr& e) noexcept;

// ---------------------------------------------------------------- logging
/// Writes all of `data` to the standard error stream, in one write() when the
/// system allows it (so lines of several processes do not interleave).
MPSERVICE_API void write_stderr(const char* data, std::size_t n) noexcept;
/// Local calendar time of `seconds` since the epoch (thread-safe localtime).
MPSERVICE_API void local_time(long long seconds, int fields[6]) noexcept;

// ---------------------------------------------------------------- (process/channel section: process.hpp)

// ---------------------------------------------------------------- (synchronization section)

// ---------------------------------------------------------------- (queue section)

}  // namespace mpservice::detail::os
// ---- end part: mpservice/detail/os.hpp
// ---- begin part: mpservice/detail/shm.hpp -----------------------------------
// shm: a block of anonymous shared memory, the home of every shared object
// (locks, events, values, queues).
//
// A SharedMemory is a cheap, copyable, reference-counted view of one mapping.
// Encoding it attaches its handle to the message; decoding maps the handle that
// arrived, so a child that receives it sees the very same bytes.  The kernel
// frees the memory when the last handle and mapping in any process are gone,
// which includes processes killed by SIGKILL: there is no name to leak.

#include <cstddef>
#include <memory>
#include <new>
#include <type_traits>

namespace mpservice::detail {

class SharedMemory {
public:
    SharedMemory() = default;

    /// New zero-filled shared memory of `size` bytes (> 0).
    static SharedMemory create(std::size_t size);
    /// Maps the memory behind `h`, taking ownership of `h`.
    static SharedMemory adopt(os::handle_t h);

    void* data() const noexcept { return m_ ? m_->addr : nullptr; }
    std::size_t size() const noexcept { return m_ ? m_->size : 0; }
    os::handle_t handle() const noexcept { return m_ ? m_->handle : os::invalid_handle; }
    explicit operator bool() const noexcept { return static_cast<bool>(m_); }
    /// Number of SharedMemory objects in *this process* sharing the mapping.
    long use_count() const noexcept { return m_.use_count(); }

private:
    struct Mapping {
        os::handle_t handle = os::invalid_handle;
        void* addr = nullptr;
        std::size_t size = 0;
        Mapping() = default;
        Mapping(const Mapping&) = delete;
        Mapping& operator=(const Mapping&) = delete;
        ~Mapping();
    };
    std::shared_ptr<Mapping> m_;
};

/// A T constructed in its own block of shared memory, reached through a
/// SharedMemory; copies (and decoded copies in other processes) refer to the
/// same object.  The creator constructs it; nobody runs its destructor, since
/// no process knows it is the last one (T must be trivially destructible).
template <class T>
class SharedObject {
    static_assert(std::is_trivially_destructible_v<T>, "a shared object is never destroyed");

public:
    SharedObject() = default;
    template <class... Args>
    static SharedObject create(Args&&... args) {
        SharedObject o;
        o.mem_ = SharedMemory::create(sizeof(T));
        ::new (o.mem_.data()) T(std::forward<Args>(args)...);
        return o;
    }
    T* get() const noexcept { return static_cast<T*>(mem_.data()); }
    T* operator->() const noexcept { return get(); }
    T& operator*() const noexcept { return *get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(mem_); }
    const SharedMemory& memory() const noexcept { return mem_; }

    static void encode(Encoder& e, const SharedObject& o) { e.write(o.mem_); }
    static SharedObject decode(Decoder& d) {
        SharedObject o;
        o.mem_ = d.read<SharedMemory>();
        if (o.mem_.size() < sizeof(T)) throw DecodeError("decode: shared object is smaller than its type");
        return o;
    }

private:
    SharedMemory mem_;
};

}  // namespace mpservice::detail

namespace mpservice {

template <>
struct Codec<detail::SharedMemory> {
    static void encode(Encoder& e, const detail::SharedMemory& m);
    static detail::SharedMemory decode(Decoder& d);
};

template <class T>
struct Codec<detail::SharedObject<T>> {
    static void encode(Encoder& e, const detail::SharedObject<T>& o) { detail::SharedObject<T>::encode(e, o); }
    static detail::SharedObject<T> decode(Decoder& d) { return detail::SharedObject<T>::decode(d); }
};

}  // namespace mpservice
// ---- end part: mpservice/detail/shm.hpp
// ---- begin part: mpservice/public/remote_exception.hpp ----------------------
// remote_exception: exceptions that cross process boundaries with their type
// and the story of where they were thrown.
//
// How an exception travels
// ------------------------
// encode_exception writes: the demangled type name, what(), the process name
// and pid, the traceback text (the stack at the throw site, symbolized in the
// sending process) and, for a known type, the fields that type needs to be
// rebuilt.  The receiver rebuilds
//   * a standard exception type E (logic_error and runtime_error families,
//     system_error with its code and category, ios_base::failure, future_error,
//     bad_alloc, bad_cast, ...) and the library's own errors (Error, DecodeError,
//     TimeoutError, ProcessError with its exit code, ...) as Remote<E>, which
//     derives from E *and* from RemoteError: existing catch clauses keep working;
//   * a user type registered with register_exception<T>() the same way;
//   * any other type derived from a known one as Remote<nearest known base>
//     (a `class MyError : public std::invalid_argument` still lands in
//     `catch (const std::invalid_argument&)`), keeping the original type name;
//   * anything else - a std::exception of an unknown family, or a non-exception
//     such as `throw 42` - as Remote<mpservice::Error>.
// what() of the rebuilt object is the original what(), always.
//
// Registering your own exception type (in every process, i.e. at namespace
// scope, since a spawned child runs the same static initializers):
//
//     struct MyError : std::runtime_error { using std::runtime_error::runtime_error; };
//     MPSERVICE_REGISTER_EXCEPTION(MyError);
//
// T must not be final.  T is rebuilt, in this order of preference:
//   1. T has a member `template <class Ar> void serialize(Ar&)` and a default
//      constructor: T is default-constructed and its fields read back
//      (what() is still the original text);
//   2. T is constructible from std::string: T(original what());
//   3. T is default-constructible: T().
//
// The story across several processes (SPEC §3): a remote exception that is
// encoded again *while it is being handled* (inside the catch clause that
// caught it - which is what happens when it propagates out of a child's task)
// gets a new traceback: the old text as its cause, then "The above exception
// was the direct cause of the following exception:", then this process's part.
// A remote exception encoded while not being handled (an exception_ptr kept
// and sent on, e.g. put on a queue) keeps its text unchanged.  An exception
// thrown with std::throw_with_nested carries its nested exception as its cause.

#include <exception>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>

namespace mpservice {

namespace detail {
/// What a remote exception knows about its origin (filled in by decode).
struct RemoteInfo {
    std::string type_name;     // demangled original type, e.g. "std::invalid_argument"
    std::string message;       // original what()
    std::string process_name;  // process that encoded it
    long pid = 0;
    std::string traceback;     // full text, cause chain included
    std::exception_ptr cause;  // the decoded cause, if the story has one
    std::string registry_key;  // which registered type rebuilt it (for re-encoding)
};
}  // namespace detail

/// Mixin carried by every exception that came from another process.  It is
/// deliberately *not* a std::exception, so that `catch (const std::exception&)`
/// stays unambiguous for Remote<E>, which derives from both E and RemoteError.
class RemoteError {
public:
    virtual ~RemoteError() = default;

    /// Demangled type name of the exception as it was thrown, e.g. "std::out_of_range".
    const std::string& remote_type() const noexcept { return info_.type_name; }
    /// what() of the original exception.
    const std::string& remote_what() const noexcept { return info_.message; }
    /// Name of the process that sent it ("MainProcess", "Process-1", ...).
    const std::string& remote_process_name() const noexcept { return info_.process_name; }
    /// Id of the process that sent it.
    long remote_pid() const noexcept { return info_.pid; }
    /// The whole story: process, type, what() and the throw-site stack, with
    /// the causes (earlier processes, nested exceptions) first.
    const std::string& traceback() const noexcept { return info_.traceback; }
    /// The exception this one was a consequence of (its remote story in an
    /// earlier process, or its std::nested_exception), or null.
    const std::exception_ptr& cause() const noexcept { return info_.cause; }

    /// (internal) everything above.
    const detail::RemoteInfo& remote_info() const noexcept { return info_; }

protected:
    explicit RemoteError(detail::RemoteInfo info) : info_(std::move(info)) {}
    RemoteError(const RemoteError&) = default;
    RemoteError& operator=(const RemoteError&) = default;

private:
    detail::RemoteInfo info_;
};

/// The type a remote exception of type E (or of a type derived from E) is
/// re-thrown as: catch clauses for E and for RemoteError both take it.
template <class E>
class Remote final : public E, public RemoteError {
public:
    Remote(E original, detail::RemoteInfo info) : E(std::move(original)), RemoteError(std::move(info)) {}
    const char* what() const noexcept override { return remote_what().c_str(); }
};

/// The remote traceback of `e`, or "" if `e` did not come from another process.
inline std::string remote_traceback(const std::exception& e) {
    auto* r = dynamic_cast<const RemoteError*>(&e);
    return r ? r->traceback() : std::string();
}
/// Whether `e` came from another process.
inline bool is_remote(const std::exception& e) noexcept { return dynamic_cast<const RemoteError*>(&e) != nullptr; }

/// Whether tracebacks made in this process show file:line.  They come from
/// the `addr2line` program (binutils) when it is installed and the module has
/// debug line information (-g); it runs once per module for each new throw
/// site (answers are cached), which costs tens of milliseconds on the first
/// exception from a place.  Default: on.  Function names never need it.
MPSERVICE_API void set_traceback_source_lines(bool enabled) noexcept;

/// Whether each `throw` in this process records its stack (default: on, where
/// the build has the throw hook; see the comment at the top of
/// impl/os_posix_stacktrace.cpp).  Recording costs a few microseconds per
/// throw (a backtrace() of up to 48 frames, no symbol lookup); a program that
/// throws in hot loops can switch it off, and its remote tracebacks then show
/// the stack where the exception was sent instead.  Compile with
/// MPSERVICE_NO_THROW_HOOK to leave the hook out entirely.
MPSERVICE_API void set_throw_site_capture(bool enabled) noexcept;

namespace detail {

/// The name of this process as shown in tracebacks and log records
/// ("MainProcess" in the parent; the Process's name in a child).  The process
/// part sets it when a child starts.
MPSERVICE_API const std::string& process_name();
MPSERVICE_API void set_process_name(std::string name);

/// Writes `e` - type, what(), the throw-site stack, process name and pid, and
/// any remote story it already carries - so that decode_exception can rebuild it
/// in another process.
MPSERVICE_API void encode_exception(Encoder& out, const std::exception_ptr& e);
/// Rebuilds an exception written by encode_exception.  The result, when
/// re-thrown, is caught by the original type's catch clauses (for standard and
/// registered types) and always by `catch (const mpservice::RemoteError&)`.
MPSERVICE_API std::exception_ptr decode_exception(Decoder& in);

/// Re-throws `e` after noting the current stack as the place where this
/// process raised it, so that a remote exception passed on from here (A -> B
/// -> C) shows B's part of the story too.  Use instead of std::rethrow_exception
/// when re-throwing a received exception.
[[noreturn]] MPSERVICE_API void rethrow_exception(const std::exception_ptr& e);

// ---- the registry of exception types that can be rebuilt
struct ExceptionType {
    const std::type_info* type;
    /// Whether the object is a T (or derived from T).
    bool (*matches)(const std::exception& e);
    /// Writes the fields T needs beyond what() (may write nothing).
    void (*encode_fields)(Encoder& out, const std::exception& e);
    /// Rebuilds Remote<T> from the fields and the info.
    std::exception_ptr (*rebuild)(Decoder& fields, RemoteInfo&& info);
};
/// Adds a type; later registrations are preferred when several match.
MPSERVICE_API void register_exception_type(const ExceptionType& t);

template <class T, class = void>
struct has_serialize_member : std::false_type {};
template <class T>
struct has_serialize_member<T, std::void_t<decltype(std::declval<T&>().serialize(std::declval<Encoder&>()))>>
    : std::true_type {};

template <class T>
ExceptionType exception_type_of() {
    static_assert(std::is_base_of_v<std::exception, T>, "register_exception<T>: T must derive from std::exception");
    static_assert(!std::is_final_v<T>, "register_exception<T>: T must not be final (it is rebuilt as Remote<T>)");
    static_assert(std::is_copy_constructible_v<T>, "register_exception<T>: T must be copy-constructible");
    ExceptionType t;
    t.type = &typeid(T);
    t.matches = [](const std::exception& e) { return dynamic_cast<const T*>(&e) != nullptr; };
    t.encode_fields = [](Encoder& out, const std::exception& e) {
        if constexpr (has_serialize_member<T>::value) {
            T copy(dynamic_cast<const T&>(e));  // serialize() is not const
            copy.serialize(out);
        } else {
            (void)out;
            (void)e;
        }
    };
    t.rebuild = [](Decoder& fields, RemoteInfo&& info) -> std::exception_ptr {
        if constexpr (has_serialize_member<T>::value && std::is_default_constructible_v<T>) {
            T original;
            original.serialize(fields);
            return std::make_exception_ptr(Remote<T>(std::move(original), std::move(info)));
        } else if constexpr (std::is_constructible_v<T, std::string>) {
            (void)fields;
            T original(info.message);
            return std::make_exception_ptr(Remote<T>(std::move(original), std::move(info)));
        } else {
            static_assert(std::is_default_constructible_v<T>,
                          "register_exception<T>: T needs a serialize() member and a default constructor, "
                          "a constructor from std::string, or a default constructor");
            (void)fields;
            return std::make_exception_ptr(Remote<T>(T(), std::move(info)));
        }
    };
    return t;
}

}  // namespace detail

/// Makes exceptions of type T (and of types derived from it) arrive from other
/// processes as Remote<T>.  Call it in every process - at namespace scope
/// through MPSERVICE_REGISTER_EXCEPTION - before exceptions travel.  Returns
/// true so that it can initialize a static variable.
template <class T>
bool register_exception() {
    detail::register_exception_type(detail::exception_type_of<T>());
    return true;
}

#define MPSERVICE_PP_CAT2(a, b) a##b
#define MPSERVICE_PP_CAT(a, b) MPSERVICE_PP_CAT2(a, b)
/// Registers an exception type at namespace scope (see register_exception).
#define MPSERVICE_REGISTER_EXCEPTION(...)                                                            \
    [[maybe_unused]] static const bool MPSERVICE_PP_CAT(mpservice_registered_exception_, __LINE__) = \
        ::mpservice::register_exception<__VA_ARGS__>()

/// Exceptions travel through the codec as well (e.g. put on a queue): a null
/// exception_ptr stays null; anything else arrives as described at the top.
template <>
struct Codec<std::exception_ptr> {
    static void encode(Encoder& e, const std::exception_ptr& p) {
        e.write(static_cast<std::uint8_t>(p ? 1 : 0));
        if (p) detail::encode_exception(e, p);
    }
    static std::exception_ptr decode(Decoder& d) {
        auto present = d.read<std::uint8_t>();
        if (present > 1) throw DecodeError("decode: bad exception_ptr marker");
        return present ? detail::decode_exception(d) : std::exception_ptr();
    }
};

}  // namespace mpservice
// ---- end part: mpservice/public/remote_exception.hpp
// ---- begin part: mpservice/public/logging.hpp -------------------------------
// logging: a small logging API usable in every process.  In a child, records
// travel to the parent, where the parent's level, format and handler apply.
//
//     auto log = mpservice::get_logger("worker");
//     log.info("working on " + std::to_string(n));   // file, line, function captured here
//
// Configuration lives in the parent only (a child's records are filtered,
// formatted and written by the parent): set_log_level, set_log_format,
// set_log_handler.  The parent's level travels to its children so that they do
// not send records nobody will see.
//
// Levels are lower-case enumerators (Level::debug, not Level::DEBUG) because
// DEBUG and ERROR are macros in many builds (-DDEBUG, <windows.h>).

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>

// The caller's source location as default arguments (g++, clang and MSVC
// 19.26+ evaluate these at the call site).
#if defined(__GNUC__) || defined(__clang__) || (defined(_MSC_VER) && _MSC_VER >= 1926)
#define MPSERVICE_CALLER_FILE __builtin_FILE()
#define MPSERVICE_CALLER_LINE __builtin_LINE()
#define MPSERVICE_CALLER_FUNCTION __builtin_FUNCTION()
#else
#define MPSERVICE_CALLER_FILE ""
#define MPSERVICE_CALLER_LINE 0
#define MPSERVICE_CALLER_FUNCTION ""
#endif

namespace mpservice {

/// Severity of a record; the numbers are Python's.
enum class Level : int { notset = 0, debug = 10, info = 20, warning = 30, error = 40, critical = 50 };

/// "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "NOTSET" (or "LEVEL <n>").
MPSERVICE_API std::string level_name(Level level);

/// One log record, as created in any process and handled in the parent.
struct LogRecord {
    Level level = Level::notset;
    std::string logger;   // "root" for get_logger("")
    std::string message;
    std::string file;
    int line = 0;
    std::string function;
    std::chrono::system_clock::time_point time;
    long pid = 0;
    std::string process_name;

    template <class Archive>
    void serialize(Archive& ar) {
        std::int64_t ns = 0;
        if constexpr (std::is_same_v<Archive, Encoder>) {
            ns = std::chrono::duration_cast<std::chrono::nanoseconds>(time.time_since_epoch()).count();
        }
        std::int32_t lvl = static_cast<std::int32_t>(level);
        std::int32_t ln = line;
        std::int64_t id = pid;
        ar(lvl, logger, message, file, ln, function, ns, id, process_name);
        if constexpr (!std::is_same_v<Archive, Encoder>) {
            level = static_cast<Level>(lvl);
            line = ln;
            pid = static_cast<long>(id);
            time = std::chrono::system_clock::time_point(
                std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::nanoseconds(ns)));
        }
    }
};

template <>
struct Codec<LogRecord> {
    static void encode(Encoder& e, const LogRecord& r) { const_cast<LogRecord&>(r).serialize(e); }
    static LogRecord decode(Decoder& d) {
        LogRecord r;
        r.serialize(d);
        return r;
    }
};

/// A named source of records.  Cheap to copy; get_logger("a") twice gives
/// equivalent loggers.  Every method is thread-safe.
class Logger {
public:
    explicit Logger(std::string name = "") : name_(name.empty() ? "root" : std::move(name)) {}
    const std::string& name() const noexcept { return name_; }

    /// Whether a record of `level` would be passed on (by this process).
    MPSERVICE_API bool is_enabled_for(Level level) const noexcept;

    /// Creates a record at `level`; file, line and function are the caller's.
    MPSERVICE_API void log(Level level, const std::string& message, const char* file = MPSERVICE_CALLER_FILE,
                           int line = MPSERVICE_CALLER_LINE, const char* function = MPSERVICE_CALLER_FUNCTION) const;

    void debug(const std::string& message, const char* file = MPSERVICE_CALLER_FILE, int line = MPSERVICE_CALLER_LINE,
               const char* function = MPSERVICE_CALLER_FUNCTION) const {
        log(Level::debug, message, file, line, function);
    }
    void info(const std::string& message, const char* file = MPSERVICE_CALLER_FILE, int line = MPSERVICE_CALLER_LINE,
              const char* function = MPSERVICE_CALLER_FUNCTION) const {
        log(Level::info, message, file, line, function);
    }
    void warning(const std::string& message, const char* file = MPSERVICE_CALLER_FILE,
                 int line = MPSERVICE_CALLER_LINE, const char* function = MPSERVICE_CALLER_FUNCTION) const {
        log(Level::warning, message, file, line, function);
    }
    void error(const std::string& message, const char* file = MPSERVICE_CALLER_FILE, int line = MPSERVICE_CALLER_LINE,
               const char* function = MPSERVICE_CALLER_FUNCTION) const {
        log(Level::error, message, file, line, function);
    }
    void critical(const std::string& message, const char* file = MPSERVICE_CALLER_FILE,
                  int line = MPSERVICE_CALLER_LINE, const char* function = MPSERVICE_CALLER_FUNCTION) const {
        log(Level::critical, message, file, line, function);
    }

private:
    std::string name_;
};

/// The logger called `name` ("" or "root" = the root logger).  Names are
/// dotted paths: per-logger levels set on "a" apply to "a.b" too.
inline Logger get_logger(std::string name = "") { return Logger(std::move(name)); }

/// Parent-side threshold: records below it are dropped (default Level::info).
MPSERVICE_API void set_log_level(Level level);
/// Threshold for the logger `name` and its descendants ("a" covers "a.b"),
/// overriding the global one; Level::notset removes the override.
MPSERVICE_API void set_log_level(const std::string& name, Level level);
/// The threshold that applies to records of logger `name`.
MPSERVICE_API Level get_log_level(const std::string& name = "");

/// Format of a handled record.  Placeholders: {time} {level} {process} {pid}
/// {logger} {message} {file} {line} {function}; "{{" and "}}" are literal
/// braces.  Default: "[{time}] [{level}] [{process}:{pid}] {logger}: {message}",
/// e.g. "[2026-11-25 18:00:00.123] [INFO] [MainProcess:1234] worker: message".
/// Throws std::invalid_argument for an unknown placeholder or a stray brace.
MPSERVICE_API void set_log_format(const std::string& format);
/// A record formatted with the current format (no trailing newline).
MPSERVICE_API std::string format_log_record(const LogRecord& record);

/// Where handled records go.  The default writes the formatted line plus
/// "\n" to stderr in one write(), so lines of several processes do not
/// interleave.  Handlers are called one at a time, in the order records are
/// handled; an empty function restores the default.
using LogHandler = std::function<void(const LogRecord& record, const std::string& formatted)>;
MPSERVICE_API void set_log_handler(LogHandler handler);

namespace detail {

/// In a child: where records go instead of the local handler (the process
/// part installs a function that sends them to the parent).  Empty = handle
/// locally.
MPSERVICE_API void set_log_forwarder(std::function<void(const LogRecord&)> forward);
/// In the parent: hands a record that arrived from a child to the parent's
/// level filter, format and handler.
MPSERVICE_API void handle_log_record(const LogRecord& record);

/// The lowest threshold of the parent's configuration (global and per
/// logger): a child need not send records below it.  The process part sends
/// it to each child, which calls set_log_level_from_parent.
MPSERVICE_API Level log_level();
/// In a child: records below `level` are dropped before they are sent.
MPSERVICE_API void set_log_level_from_parent(Level level);

}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/public/logging.hpp
// ---- begin part: mpservice/public/process.hpp -------------------------------
// process: (to be written)
// ---- end part: mpservice/public/process.hpp
// ---- begin part: mpservice/public/threading.hpp -----------------------------
// threading: (to be written)
// ---- end part: mpservice/public/threading.hpp
// ---- begin part: mpservice/public/futures.hpp -------------------------------
// futures: (to be written)
// ---- end part: mpservice/public/futures.hpp
// ---- begin part: mpservice/public/synchronize.hpp ---------------------------
// synchronize: (to be written)
// ---- end part: mpservice/public/synchronize.hpp
// ---- begin part: mpservice/public/sharedctypes.hpp --------------------------
// sharedctypes: (to be written)
// ---- end part: mpservice/public/sharedctypes.hpp
// ---- begin part: mpservice/public/queues.hpp --------------------------------
// queues: (to be written)
// ---- end part: mpservice/public/queues.hpp

#endif  // MPSERVICE_HPP_INCLUDED

// The implementation is outside the include guard so that a second inclusion
// with MPSERVICE_IMPLEMENTATION defined still emits it, and its own guard makes
// sure it is emitted only once per translation unit.
#if defined(MPSERVICE_IMPLEMENTATION) && !defined(MPSERVICE_IMPLEMENTATION_INCLUDED)
#define MPSERVICE_IMPLEMENTATION_INCLUDED

// ---- begin part: mpservice/impl/os_posix.cpp --------------------------------
// os_posix: the POSIX (Linux first) back-end of detail/os.hpp.  This file is
// the only place that includes POSIX headers or makes system calls.
#if !defined(_WIN32)

#include <cerrno>
#include <climits>
#include <ctime>
#include <system_error>

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>
#if defined(__linux__)
#include <linux/futex.h>
#endif

namespace mpservice::detail::os {

namespace {
[[noreturn]] void throw_errno(const char* what) {
    throw std::system_error(errno, std::generic_category(), what);
}

timespec to_timespec(Deadline d) {
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(d.time_since_epoch()).count();
    timespec ts;
    ts.tv_sec = static_cast<time_t>(ns / 1000000000);
    ts.tv_nsec = static_cast<long>(ns % 1000000000);
    return ts;
}
}  // namespace

// ---------------------------------------------------------------- handles

void close_handle(handle_t h) noexcept {
    if (h >= 0) ::close(h);  // close() is never retried on Linux: the fd is gone even on EINTR
}

handle_t duplicate_handle(handle_t h) {
    int fd = ::fcntl(h, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) throw_errno("mpservice: dup");
    return fd;
}

// ---------------------------------------------------------------- shared memory

handle_t shm_create(std::size_t size) {
#if defined(__linux__)
    // memfd: no name in /dev/shm, so nothing can leak, whatever kills us.
    int fd = static_cast<int>(::syscall(SYS_memfd_create, "mpservice", MFD_CLOEXEC));
    if (fd < 0) throw_errno("mpservice: memfd_create");
#else
#error "shared memory back-end not written for this platform yet"
#endif
    if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
        int err = errno;
        ::close(fd);
        errno = err;
        throw_errno("mpservice: ftruncate of shared memory");
    }
    return fd;
}

std::size_t shm_size(handle_t h) {
    struct stat st;
    if (::fstat(h, &st) != 0) throw_errno("mpservice: fstat of shared memory");
    return static_cast<std::size_t>(st.st_size);
}

void* shm_map(handle_t h, std::size_t size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, h, 0);
    if (p == MAP_FAILED) throw_errno("mpservice: mmap of shared memory");
    return p;
}

void shm_unmap(void* addr, std::size_t size) noexcept {
    if (addr) ::munmap(addr, size);
}

// ---------------------------------------------------------------- waiting on a word

bool futex_wait(const std::atomic<std::uint32_t>* word, std::uint32_t expected, Deadline deadline) {
    static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t),
                  "futex needs a plain 32-bit atomic word");
    timespec ts;
    const timespec* tsp = nullptr;
    if (deadline != no_deadline) {
        if (Clock::now() >= deadline) return false;
        ts = to_timespec(deadline);
        tsp = &ts;
    }
    // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline (steady_clock
    // on Linux), so a retry after EINTR does not stretch the timeout.  Not
    // FUTEX_PRIVATE: the word may live in memory shared with other processes.
    long rc = ::syscall(SYS_futex, const_cast<std::atomic<std::uint32_t>*>(word), FUTEX_WAIT_BITSET, expected,
                        tsp, nullptr, FUTEX_BITSET_MATCH_ANY);
    if (rc == 0) return true;
    if (errno == ETIMEDOUT) return false;
    return true;  // EAGAIN (value changed) or EINTR: the caller re-checks
}

void futex_wake(const std::atomic<std::uint32_t>* word, int count) {
    ::syscall(SYS_futex, const_cast<std::atomic<std::uint32_t>*>(word), FUTEX_WAKE, count, nullptr, nullptr, 0);
}

// ---------------------------------------------------------------- robust mutex

namespace {
pthread_mutex_t* native(RobustMutex* m) noexcept { return reinterpret_cast<pthread_mutex_t*>(m->storage); }

LockResult lock_result(int rc, const char* what) {
    switch (rc) {
        case 0: return LockResult::acquired;
        case EOWNERDEAD: return LockResult::owner_died;
        case ETIMEDOUT: return LockResult::timed_out;
        case EBUSY: return LockResult::busy;
        default: throw std::system_error(rc, std::generic_category(), what);
    }
}
}  // namespace

void robust_mutex_init(RobustMutex* m) {
    static_assert(sizeof(pthread_mutex_t) <= sizeof(RobustMutex::storage), "RobustMutex storage too small");
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    // Error-checking: unlocking a mutex one does not hold is reported, not undefined.
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
    int rc = pthread_mutex_init(native(m), &a);
    pthread_mutexattr_destroy(&a);
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "mpservice: pthread_mutex_init");
}

LockResult robust_mutex_trylock(RobustMutex* m) {
    int rc = pthread_mutex_trylock(native(m));
    if (rc == EDEADLK) return LockResult::busy;  // held by the caller itself
    return lock_result(rc, "mpservice: mutex trylock");
}

LockResult robust_mutex_lock(RobustMutex* m, Deadline deadline) {
    // A blocking hand-off to another CPU costs ~30 us here while a critical
    // section is typically far shorter: spin a little before sleeping.
    for (int i = 0; i < 100; ++i) {
        LockResult r = robust_mutex_trylock(m);
        if (r != LockResult::busy) return r;
        cpu_relax();
    }
    if (deadline == no_deadline) return lock_result(pthread_mutex_lock(native(m)), "mpservice: mutex lock");
    timespec ts = to_timespec(deadline);
    return lock_result(pthread_mutex_clocklock(native(m), CLOCK_MONOTONIC, &ts), "mpservice: mutex lock");
}

void robust_mutex_unlock(RobustMutex* m) {
    int rc = pthread_mutex_unlock(native(m));
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "mpservice: mutex unlock");
}

void robust_mutex_consistent(RobustMutex* m) { pthread_mutex_consistent(native(m)); }

// ---------------------------------------------------------------- processes

long current_pid() noexcept { return static_cast<long>(::getpid()); }

bool pid_alive(long pid) noexcept {
    return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
}

// ---------------------------------------------------------------- logging

void write_stderr(const char* data, std::size_t n) noexcept {
    while (n > 0) {
        ssize_t k = ::write(STDERR_FILENO, data, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            return;  // nowhere to report a failure to write to stderr
        }
        data += k;
        n -= static_cast<std::size_t>(k);
    }
}

void local_time(long long seconds, int fields[6]) noexcept {
    time_t t = static_cast<time_t>(seconds);
    struct tm tm {};
    if (!::localtime_r(&t, &tm)) ::gmtime_r(&t, &tm);
    fields[0] = tm.tm_year + 1900;
    fields[1] = tm.tm_mon + 1;
    fields[2] = tm.tm_mday;
    fields[3] = tm.tm_hour;
    fields[4] = tm.tm_min;
    fields[5] = tm.tm_sec;
}

// ---------------------------------------------------------------- (process/channel section)

// ---------------------------------------------------------------- (synchronization section)

// ---------------------------------------------------------------- (queue section)

}  // namespace mpservice::detail::os

#endif  // !_WIN32
// ---- end part: mpservice/impl/os_posix.cpp
#if defined(MPSERVICE_POSIX)
// ---- begin part: mpservice/impl/os_posix_stacktrace.cpp ---------------------
// os_posix_stacktrace: throw-site stacks and their symbolization (POSIX, ELF,
// Itanium C++ ABI: Linux with g++ or clang).  The "remote exception /
// symbolization" section of detail/os.hpp.
//
// Throw sites.  This file defines __cxa_throw, the C++ runtime function every
// `throw` expression calls - including those inside libstdc++, such as
// vector::at, because the linker exports the executable's definition when the
// C++ runtime references it.  The definition records the return addresses of
// the throwing stack (backtrace(): cheap, no symbol lookup) in a small
// per-thread table keyed by the thrown object's address, then forwards to the
// real __cxa_throw found with dlsym(RTLD_NEXT).  Names are looked up only when
// an exception is encoded to cross a process boundary.
//
// The interposition is left out when MPSERVICE_NO_THROW_HOOK is defined (e.g.
// with -static-libstdc++, where the runtime's own __cxa_throw would be a
// duplicate definition) and under MemorySanitizer (untested).  Under the
// other sanitizers it stays, checked with clang 14 and g++ 12:
//   * ThreadSanitizer does not intercept __cxa_throw;
//   * AddressSanitizer does, to un-poison the stack that the throw unwinds.
//     With clang's static runtime our definition replaces its interceptor
//     (a weak alias), so the hook calls __asan_handle_no_return() itself, as
//     the interceptor would; with g++'s shared libasan, RTLD_NEXT finds the
//     interceptor and the call is made twice, which is harmless.
// Without the hook, the traceback shows the stack where the exception was
// encoded (the catch site), and says so.
//
// Symbols.  dladdr names only exported (dynamic) symbols, so an executable
// linked without -rdynamic would show no names for its own functions.  The
// reader below loads the ELF .symtab of each module (the executable through
// /proc/self/exe), which names static and internal functions too; dladdr is
// the fallback for stripped modules.  File and line come from the
// `addr2line` program when it is installed and the module has DWARF line
// information (.debug_line), run once per module per traceback, bounded in
// time; without it frames show function+offset and module.
#if !defined(_WIN32)

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <execinfo.h>
#include <fcntl.h>
#include <link.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MPSERVICE_DETAIL_ASAN 1
#endif
#if __has_feature(memory_sanitizer)
#define MPSERVICE_DETAIL_MSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define MPSERVICE_DETAIL_ASAN 1
#endif
#if !defined(MPSERVICE_NO_THROW_HOOK) && !defined(MPSERVICE_DETAIL_MSAN) && defined(__GLIBC__)
#define MPSERVICE_DETAIL_THROW_HOOK 1
#endif
#if defined(MPSERVICE_DETAIL_THROW_HOOK) && defined(MPSERVICE_DETAIL_ASAN)
extern "C" void __asan_handle_no_return();
#endif

namespace mpservice::detail::os {

namespace {

// ---- per-thread table of recent throw (and re-raise) sites
constexpr int kSiteFrames = 48;
constexpr int kSiteSlots = 8;

struct Site {
    const void* object;
    const std::type_info* type;
    int depth;
    void* pcs[kSiteFrames];
};
struct SiteTable {
    Site slots[kSiteSlots];
    unsigned next;
};
// Plain data, zero-initialized: no per-thread constructor or destructor.
thread_local SiteTable t_throw_sites;
thread_local SiteTable t_raise_sites;

/// Records the current stack in `table` for `object`, starting at the frame
/// whose return address is `caller` (the throw site, as seen from the hook):
/// frames of the hook itself - however many inlining and sanitizer
/// interceptors make them - are left out.
void record_site(SiteTable& table, const void* object, const std::type_info* type, const void* caller) noexcept {
    // A second throw of the same object (e.g. after a catch by reference and a
    // `throw` of a copy at the same address) replaces the old entry.
    Site* slot = nullptr;
    for (Site& s : table.slots)
        if (s.object == object) slot = &s;
    if (!slot) slot = &table.slots[table.next++ % kSiteSlots];
    slot->object = object;
    slot->type = type;
    slot->depth = capture_stack(slot->pcs, kSiteFrames, 0, caller);
}

int read_site(const SiteTable& table, const void* object, const std::type_info* type, void** pcs,
              int max) noexcept {
    for (const Site& s : table.slots) {
        if (s.object != object || !object) continue;
        if (type && s.type && *s.type != *type) continue;  // a stale entry for a reused address
        int n = std::min(s.depth, max);
        std::copy(s.pcs, s.pcs + n, pcs);
        return n;
    }
    return 0;
}

}  // namespace

namespace {
std::atomic<bool> g_capture_throw_sites{true};
}

bool throw_hook_active() noexcept {
#if defined(MPSERVICE_DETAIL_THROW_HOOK)
    return g_capture_throw_sites.load(std::memory_order_relaxed);
#else
    return false;
#endif
}

void set_throw_site_capture(bool enabled) noexcept {
    g_capture_throw_sites.store(enabled, std::memory_order_relaxed);
}

int capture_stack(void** pcs, int max, int skip, const void* from) noexcept {
    // backtrace() walks with the unwinder's tables, so it works without frame pointers.
    void* buf[kSiteFrames + 16];
    int want = std::min(max + skip + 8, static_cast<int>(sizeof buf / sizeof buf[0]));
    int n = ::backtrace(buf, want);
    int first = std::min(n, skip + 1);  // +1: this function's own frame
    if (from) {
        for (int i = 0; i < n; ++i)
            if (buf[i] == from) {
                first = i;
                break;
            }
    }
    int count = std::min(n - first, max);
    std::copy(buf + first, buf + first + count, pcs);
    return count;
}

int throw_site_stack(const void* object, const std::type_info* type, void** pcs, int max) noexcept {
    return read_site(t_throw_sites, object, type, pcs, max);
}

void note_raise_site(const void* object, const void* caller) noexcept {
    record_site(t_raise_sites, object, nullptr, caller);
}

int raise_site_stack(const void* object, void** pcs, int max) noexcept {
    return read_site(t_raise_sites, object, nullptr, pcs, max);
}

std::string demangle(const char* mangled) {
    if (!mangled) return std::string();
    int status = 0;
    char* out = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
    if (status != 0 || !out) return mangled;
    std::string s(out);
    std::free(out);
    return s;
}

const std::type_info* current_exception_type() noexcept { return abi::__cxa_current_exception_type(); }

const void* exception_object(const std::exception_ptr& e) noexcept {
    // Itanium C++ ABI fact, true of libstdc++ and libc++: an exception_ptr is
    // one pointer, to the thrown object (the address __cxa_throw received).
    static_assert(sizeof(std::exception_ptr) == sizeof(void*), "exception_ptr is not a single pointer here");
    const void* p = nullptr;
    std::memcpy(&p, static_cast<const void*>(&e), sizeof p);
    return p;
}

// ---------------------------------------------------------------- ELF symbol tables

namespace {

/// The function symbols of one module, from its .symtab (or nothing).
struct ModuleSymbols {
    struct Sym {
        std::uintptr_t value;
        std::uintptr_t size;
        std::uint32_t name;
    };
    std::vector<Sym> syms;  // sorted by value
    std::string strtab;
    bool has_line_info = false;

    const char* find(std::uintptr_t addr, std::uintptr_t* start) const {
        auto it = std::upper_bound(syms.begin(), syms.end(), addr,
                                   [](std::uintptr_t a, const Sym& s) { return a < s.value; });
        if (it == syms.begin()) return nullptr;
        --it;
        if (it->size != 0 && addr >= it->value + it->size) return nullptr;
        if (it->name >= strtab.size()) return nullptr;
        *start = it->value;
        return strtab.c_str() + it->name;
    }
};

/// Reads exactly n bytes at `offset`, refusing anything outside the file.
bool read_at(int fd, std::uint64_t file_size, std::uint64_t offset, std::uint64_t n, void* out) {
    if (offset > file_size || n > file_size - offset) return false;
    auto* p = static_cast<char*>(out);
    while (n > 0) {
        ssize_t k = ::pread(fd, p, n, static_cast<off_t>(offset));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return false;
        p += k;
        offset += static_cast<std::uint64_t>(k);
        n -= static_cast<std::uint64_t>(k);
    }
    return true;
}

/// A short, bounds-checked reader of an ELF file's section headers, .symtab and
/// its string table (native class and byte order only: it reads modules of
/// this very process).
void load_symbols(const char* path, ModuleSymbols& out) {
    constexpr std::uint64_t kMaxTable = 256u << 20;  // refuse absurd sizes (corrupt file)
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    struct Closer {
        int fd;
        ~Closer() { ::close(fd); }
    } closer{fd};
    struct stat st;
    if (::fstat(fd, &st) != 0) return;
    auto size = static_cast<std::uint64_t>(st.st_size);

    ElfW(Ehdr) eh;
    if (!read_at(fd, size, 0, sizeof eh, &eh)) return;
    if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0) return;
#if __SIZEOF_POINTER__ == 8
    if (eh.e_ident[EI_CLASS] != ELFCLASS64) return;
#else
    if (eh.e_ident[EI_CLASS] != ELFCLASS32) return;
#endif
    if (eh.e_shentsize != sizeof(ElfW(Shdr)) || eh.e_shnum == 0 || eh.e_shstrndx >= eh.e_shnum) return;
    std::vector<ElfW(Shdr)> sh(eh.e_shnum);
    if (!read_at(fd, size, eh.e_shoff, std::uint64_t(eh.e_shnum) * sizeof(ElfW(Shdr)), sh.data())) return;

    // Section names, to see whether DWARF line information is there.
    const ElfW(Shdr)& names = sh[eh.e_shstrndx];
    if (names.sh_size < kMaxTable) {
        std::string shstr(names.sh_size, '\0');
        if (read_at(fd, size, names.sh_offset, names.sh_size, shstr.data())) {
            for (const auto& s : sh)
                if (s.sh_name < shstr.size() && std::strcmp(shstr.c_str() + s.sh_name, ".debug_line") == 0)
                    out.has_line_info = true;
        }
    }

    for (const auto& s : sh) {
        if (s.sh_type != SHT_SYMTAB) continue;
        if (s.sh_entsize != sizeof(ElfW(Sym)) || s.sh_link >= sh.size()) return;
        const ElfW(Shdr)& str = sh[s.sh_link];
        if (s.sh_size > kMaxTable || str.sh_size > kMaxTable) return;
        std::vector<ElfW(Sym)> raw(s.sh_size / sizeof(ElfW(Sym)));
        out.strtab.assign(str.sh_size, '\0');
        if (!read_at(fd, size, s.sh_offset, raw.size() * sizeof(ElfW(Sym)), raw.data()) ||
            !read_at(fd, size, str.sh_offset, str.sh_size, out.strtab.data())) {
            out.strtab.clear();
            return;
        }
        for (const auto& y : raw) {
            if (ELF64_ST_TYPE(y.st_info) != STT_FUNC || y.st_value == 0 || y.st_shndx == SHN_UNDEF) continue;
            out.syms.push_back({static_cast<std::uintptr_t>(y.st_value), static_cast<std::uintptr_t>(y.st_size),
                                y.st_name});
        }
        std::sort(out.syms.begin(), out.syms.end(),
                  [](const ModuleSymbols::Sym& a, const ModuleSymbols::Sym& b) { return a.value < b.value; });
        return;
    }
}

const ModuleSymbols& module_symbols(const std::string& path) {
    static std::mutex mu;
    static auto* cache = new std::map<std::string, std::unique_ptr<ModuleSymbols>>;  // lives to the end
    std::lock_guard<std::mutex> lock(mu);
    auto& slot = (*cache)[path];
    if (!slot) {
        slot = std::make_unique<ModuleSymbols>();
        load_symbols(path.c_str(), *slot);
    }
    return *slot;
}

/// The module (loaded object) holding `pc`: its file path and load bias.
struct ModuleOf {
    std::uintptr_t pc;
    std::string path;
    std::uintptr_t bias = 0;
    bool found = false;
};

int find_module(struct dl_phdr_info* info, size_t, void* data) {
    auto* m = static_cast<ModuleOf*>(data);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const auto& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD) continue;
        std::uintptr_t start = info->dlpi_addr + ph.p_vaddr;
        if (m->pc >= start && m->pc < start + ph.p_memsz) {
            m->found = true;
            m->bias = info->dlpi_addr;
            // The main program has an empty name; its file is /proc/self/exe
            // (right even if argv[0] was relative and the directory changed).
            m->path = (info->dlpi_name && info->dlpi_name[0]) ? info->dlpi_name : "/proc/self/exe";
            return 1;
        }
    }
    return 0;
}

// ---------------------------------------------------------------- file:line through addr2line

/// Source position of one address, with the functions inlined at it:
/// innermost first, the last one being the function the code belongs to.
struct SourcePlace {
    std::string function;
    std::string file;
    int line = 0;
};
using InlineChain = std::vector<SourcePlace>;

/// Runs `addr2line -a -f -i -C -e module addr...` (bounded in time) and returns
/// one chain per address (empty where nothing was found).  Best effort.
std::vector<InlineChain> run_addr2line(const std::string& module, const std::vector<std::uintptr_t>& offsets) {
    std::vector<InlineChain> result(offsets.size());
    static const char* const candidates[] = {"/usr/bin/addr2line", "/bin/addr2line", "/usr/local/bin/addr2line"};
    const char* tool = nullptr;
    for (const char* c : candidates)
        if (!tool && ::access(c, X_OK) == 0) tool = c;
    if (!tool || offsets.empty()) return result;

    // "/proc/self/exe" would name addr2line itself in the child: name our pid.
    std::string file = module == "/proc/self/exe" ? "/proc/" + std::to_string(::getpid()) + "/exe" : module;
    std::vector<std::string> args = {tool, "-a", "-f", "-i", "-C", "-e", file};
    for (std::uintptr_t off : offsets) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(off));
        args.push_back(buf);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);

    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return result;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    pid_t pid = -1;
    int rc = ::posix_spawn(&pid, tool, &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    ::close(out[1]);
    if (rc != 0) {
        ::close(out[0]);
        return result;
    }
    // Read everything, giving up after 5 s in all (a huge binary, a hung tool).
    std::string text;
    auto deadline = Clock::now() + std::chrono::seconds(5);
    bool complete = false;
    for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
        if (left <= 0) break;
        pollfd p{out[0], POLLIN, 0};
        int k = ::poll(&p, 1, static_cast<int>(left));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        char buf[4096];
        ssize_t r = ::read(out[0], buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) break;
        if (r == 0) {
            complete = true;
            break;
        }
        text.append(buf, static_cast<std::size_t>(r));
    }
    ::close(out[0]);
    if (!complete) ::kill(pid, SIGKILL);
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (!complete) return result;

    // Output: per address a line "0x<addr>", then pairs "function" / "file:line"
    // (possibly followed by " (discriminator n)"; "??" where unknown).
    std::vector<std::string> lines;
    for (std::size_t pos = 0; pos < text.size();) {
        std::size_t end = text.find('\n', pos);
        if (end == std::string::npos) end = text.size();
        lines.push_back(text.substr(pos, end - pos));
        pos = end + 1;
    }
    int index = -1;
    for (std::size_t i = 0; i < lines.size(); ++i) {
        if (lines[i].compare(0, 2, "0x") == 0) {
            ++index;
            continue;
        }
        if (index < 0 || index >= static_cast<int>(result.size()) || i + 1 >= lines.size()) break;
        SourcePlace place;
        place.function = lines[i] == "??" ? std::string() : lines[i];
        std::string where = lines[++i];
        std::size_t paren = where.find(" (");
        if (paren != std::string::npos) where.resize(paren);
        std::size_t colon = where.rfind(':');
        if (colon != std::string::npos && where.compare(0, 2, "??") != 0) {
            int n = std::atoi(where.c_str() + colon + 1);
            if (n > 0) {
                place.file = where.substr(0, colon);
                place.line = n;
            }
        }
        result[index].push_back(std::move(place));
    }
    return result;
}

}  // namespace

namespace {
std::atomic<bool> g_line_lookup{true};
bool line_lookup_enabled() { return g_line_lookup.load(std::memory_order_relaxed); }
}  // namespace

void set_line_lookup(bool enabled) noexcept { g_line_lookup.store(enabled, std::memory_order_relaxed); }

std::vector<StackFrame> symbolize(void* const* pcs, int n) {
    std::vector<StackFrame> frames(static_cast<std::size_t>(std::max(n, 0)));
    std::map<std::string, std::vector<int>> want_lines;  // module -> frames to ask addr2line about
    for (int i = 0; i < n; ++i) {
        StackFrame& f = frames[i];
        f.pc = pcs[i];
        // A return address points after the call; look up the call itself.
        auto lookup = reinterpret_cast<std::uintptr_t>(pcs[i]) - 1;
        ModuleOf m;
        m.pc = lookup;
        dl_iterate_phdr(find_module, &m);
        if (m.found) {
            f.module = m.path;
            f.offset = lookup + 1 - m.bias;
            const ModuleSymbols& syms = module_symbols(m.path);
            std::uintptr_t start = 0;
            if (const char* name = syms.find(lookup - m.bias, &start)) f.function = demangle(name);
            if (syms.has_line_info) want_lines[m.path].push_back(i);
        }
        if (f.function.empty()) {
            Dl_info info;
            if (::dladdr(reinterpret_cast<void*>(lookup), &info) && info.dli_sname)
                f.function = demangle(info.dli_sname);
        }
    }
    if (want_lines.empty() || !line_lookup_enabled()) return frames;

    // Add file:line, and the functions inlined at each address as frames of
    // their own (marked inlined), innermost first.  Answers are cached, so an
    // exception thrown again from the same place costs no second addr2line run.
    static std::mutex cache_mu;
    static auto* cache = new std::map<std::pair<std::string, std::uintptr_t>, InlineChain>;
    std::vector<InlineChain> chains(frames.size());
    for (auto& [module, which] : want_lines) {
        std::vector<std::uintptr_t> offsets;
        std::vector<int> asked;
        {
            std::lock_guard<std::mutex> lock(cache_mu);
            for (int i : which) {
                auto it = cache->find({module, frames[i].offset});
                if (it != cache->end()) {
                    chains[i] = it->second;
                } else {
                    offsets.push_back(frames[i].offset - 1);
                    asked.push_back(i);
                }
            }
        }
        if (asked.empty()) continue;
        std::vector<InlineChain> found = run_addr2line(module, offsets);
        std::lock_guard<std::mutex> lock(cache_mu);
        if (cache->size() > 8192) cache->clear();
        for (std::size_t k = 0; k < asked.size(); ++k) {
            chains[asked[k]] = found[k];
            (*cache)[{module, frames[asked[k]].offset}] = std::move(found[k]);
        }
    }
    std::vector<StackFrame> out;
    for (std::size_t i = 0; i < frames.size(); ++i) {
        const InlineChain& chain = chains[i];
        for (std::size_t j = 0; j + 1 < chain.size(); ++j) {
            StackFrame inl;
            inl.pc = frames[i].pc;
            // addr2line names the innermost inlined function of a split-off
            // ".cold" part after the containing symbol: that name is wrong.
            inl.function = chain[j].function == frames[i].function ? std::string() : chain[j].function;
            inl.file = chain[j].file;
            inl.line = chain[j].line;
            inl.inlined = true;
            out.push_back(std::move(inl));
        }
        StackFrame f = std::move(frames[i]);
        if (!chain.empty()) {
            f.file = chain.back().file;
            f.line = chain.back().line;
            if (f.function.empty()) f.function = chain.back().function;
        }
        out.push_back(std::move(f));
    }
    return out;
}

}  // namespace mpservice::detail::os

#if defined(MPSERVICE_DETAIL_THROW_HOOK)
// The interposed C++ runtime entry point (see the top of this file).  Its
// signature is the one <cxxabi.h> declares.
namespace __cxxabiv1 {
extern "C" void __cxa_throw(void* object, std::type_info* type, void (*destroy)(void*)) {
    using Real = void (*)(void*, std::type_info*, void (*)(void*));
    static Real real = reinterpret_cast<Real>(::dlsym(RTLD_NEXT, "__cxa_throw"));
    if (!real) {
        static const char msg[] = "mpservice: cannot find the C++ runtime's __cxa_throw; "
                                  "build with -DMPSERVICE_NO_THROW_HOOK\n";
        mpservice::detail::os::write_stderr(msg, sizeof msg - 1);
        std::abort();
    }
    if (mpservice::detail::os::g_capture_throw_sites.load(std::memory_order_relaxed))
        mpservice::detail::os::record_site(mpservice::detail::os::t_throw_sites, object, type,
                                           __builtin_return_address(0));
#if defined(MPSERVICE_DETAIL_ASAN)
    __asan_handle_no_return();
#endif
    real(object, type, destroy);
    __builtin_unreachable();
}

// `throw;` inside a catch clause: noted as a re-raise site (used for remote
// exceptions passed on from this process, A -> B -> C).
extern "C" void __cxa_rethrow() {
    using Real = void (*)();
    static Real real = reinterpret_cast<Real>(::dlsym(RTLD_NEXT, "__cxa_rethrow"));
    if (!real) std::abort();
    if (mpservice::detail::os::g_capture_throw_sites.load(std::memory_order_relaxed)) {
        std::exception_ptr current = std::current_exception();
        mpservice::detail::os::record_site(mpservice::detail::os::t_raise_sites,
                                           mpservice::detail::os::exception_object(current), nullptr,
                                           __builtin_return_address(0));
    }
    real();
    __builtin_unreachable();
}
}  // namespace __cxxabiv1
#endif

#endif  // !_WIN32
// ---- end part: mpservice/impl/os_posix_stacktrace.cpp
#endif
// ---- begin part: mpservice/impl/shm.cpp -------------------------------------
// shm: SharedMemory and its codec.

namespace mpservice::detail {

SharedMemory::Mapping::~Mapping() {
    os::shm_unmap(addr, size);
    os::close_handle(handle);
}

SharedMemory SharedMemory::create(std::size_t size) {
    if (size == 0) throw std::invalid_argument("mpservice: shared memory of size 0");
    auto m = std::make_shared<Mapping>();
    m->handle = os::shm_create(size);
    m->size = size;
    m->addr = os::shm_map(m->handle, size);  // on throw, ~Mapping closes the handle
    SharedMemory s;
    s.m_ = std::move(m);
    return s;
}

SharedMemory SharedMemory::adopt(os::handle_t h) {
    auto m = std::make_shared<Mapping>();
    m->handle = h;
    m->size = os::shm_size(h);
    if (m->size == 0) throw DecodeError("decode: shared memory handle refers to an empty block");
    m->addr = os::shm_map(h, m->size);
    SharedMemory s;
    s.m_ = std::move(m);
    return s;
}

}  // namespace mpservice::detail

namespace mpservice {

void Codec<detail::SharedMemory>::encode(Encoder& e, const detail::SharedMemory& m) {
    if (!m) throw std::invalid_argument("mpservice: cannot send an empty shared-memory handle");
    e.write(e.attach(m.handle()));
}

detail::SharedMemory Codec<detail::SharedMemory>::decode(Decoder& d) {
    auto index = d.read<std::uint32_t>();
    // The channel owns the handles that arrived; this object keeps its own copy.
    return detail::SharedMemory::adopt(detail::os::duplicate_handle(d.handle(index)));
}

}  // namespace mpservice
// ---- end part: mpservice/impl/shm.cpp
// ---- begin part: mpservice/impl/remote_exception.cpp ------------------------
// remote_exception: implementation.
//
// Wire form of one exception (a "record"), all through the codec:
//   u8   tag 0xE1 (format version 1)
//   str  type name (demangled), what(), process name;  i64 pid
//   str  traceback text (complete, causes first)
//   str  registry key (mangled name of the registered type that rebuilds it; "" = none)
//   str  that type's extra fields (bytes, so an unknown key can be skipped)
//   u8   has cause; then the cause's record
#include <cstdio>
#include <functional>
#include <future>
#include <ios>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <system_error>
#include <typeinfo>
#include <variant>

namespace mpservice::detail {

// ---------------------------------------------------------------- process name

namespace {
std::string& process_name_storage() {
    static std::string* name = new std::string("MainProcess");  // outlives static destructors
    return *name;
}
}  // namespace

const std::string& process_name() { return process_name_storage(); }
void set_process_name(std::string name) { process_name_storage() = std::move(name); }

// ---------------------------------------------------------------- the registry

namespace {

// Error codes travel as value + category; these are the categories a receiver
// can name again.  Any other category arrives as generic (the value kept).
enum class Category : std::uint8_t { generic, system, iostream, future };

Category category_id(const std::error_category& c) {
    if (c == std::system_category()) return Category::system;
    if (c == std::iostream_category()) return Category::iostream;
    if (c == std::future_category()) return Category::future;
    return Category::generic;
}
const std::error_category& category_of(Category c) {
    switch (c) {
        case Category::system: return std::system_category();
        case Category::iostream: return std::iostream_category();
        case Category::future: return std::future_category();
        default: return std::generic_category();
    }
}

void write_code(Encoder& out, const std::error_code& ec) {
    out.write(static_cast<std::int32_t>(ec.value()));
    out.write(static_cast<std::uint8_t>(category_id(ec.category())));
}
std::error_code read_code(Decoder& in) {
    auto value = in.read<std::int32_t>();
    auto cat = in.read<std::uint8_t>();
    if (cat > static_cast<std::uint8_t>(Category::future)) throw DecodeError("decode: bad error category");
    return std::error_code(value, category_of(static_cast<Category>(cat)));
}

/// A registry entry for E whose extra fields are an error_code, rebuilt by `make`.
template <class E, class Make>
ExceptionType coded_type(Make) {
    ExceptionType t = {};
    t.type = &typeid(E);
    t.matches = [](const std::exception& e) { return dynamic_cast<const E*>(&e) != nullptr; };
    t.encode_fields = [](Encoder& out, const std::exception& e) { write_code(out, dynamic_cast<const E&>(e).code()); };
    t.rebuild = [](Decoder& in, RemoteInfo&& info) -> std::exception_ptr {
        std::error_code ec = read_code(in);
        return std::make_exception_ptr(Remote<E>(Make()(ec, info.message), std::move(info)));
    };
    return t;
}

ExceptionType process_error_type() {
    ExceptionType t = {};
    t.type = &typeid(ProcessError);
    t.matches = [](const std::exception& e) { return dynamic_cast<const ProcessError*>(&e) != nullptr; };
    t.encode_fields = [](Encoder& out, const std::exception& e) {
        out.write(static_cast<std::int32_t>(dynamic_cast<const ProcessError&>(e).exitcode()));
    };
    t.rebuild = [](Decoder& in, RemoteInfo&& info) -> std::exception_ptr {
        auto code = in.read<std::int32_t>();
        return std::make_exception_ptr(Remote<ProcessError>(ProcessError(info.message, code), std::move(info)));
    };
    return t;
}

/// The standard and library types, most derived first: the first entry whose
/// type the object has is the nearest known base of an unregistered type.
std::vector<ExceptionType> standard_types() {
    struct MakeSystemError {
        std::system_error operator()(std::error_code ec, const std::string&) const { return std::system_error(ec); }
    };
    struct MakeIosFailure {
        std::ios_base::failure operator()(std::error_code ec, const std::string& what) const {
            return std::ios_base::failure(what, ec);
        }
    };
    struct MakeFutureError {
        std::future_error operator()(std::error_code ec, const std::string&) const {
            if (ec.category() != std::future_category()) ec = std::make_error_code(std::future_errc::broken_promise);
            return std::future_error(static_cast<std::future_errc>(ec.value()));
        }
    };
    return {
        // the library's own errors (all runtime_errors)
        exception_type_of<DecodeError>(),
        exception_type_of<TimeoutError>(),
        exception_type_of<InvalidStateError>(),
        process_error_type(),
        exception_type_of<BrokenBarrierError>(),
        exception_type_of<OwnerDiedError>(),
        exception_type_of<Empty>(),
        exception_type_of<Full>(),
        exception_type_of<QueueClosed>(),
        exception_type_of<Error>(),
        // runtime_error family (ios_base::failure is a system_error in the C++11 ABI)
        coded_type<std::ios_base::failure>(MakeIosFailure()),
        coded_type<std::system_error>(MakeSystemError()),
        exception_type_of<std::range_error>(),
        exception_type_of<std::overflow_error>(),
        exception_type_of<std::underflow_error>(),
        exception_type_of<std::runtime_error>(),
        // logic_error family
        coded_type<std::future_error>(MakeFutureError()),
        exception_type_of<std::domain_error>(),
        exception_type_of<std::invalid_argument>(),
        exception_type_of<std::length_error>(),
        exception_type_of<std::out_of_range>(),
        exception_type_of<std::logic_error>(),
        // the bad_* family
        exception_type_of<std::bad_array_new_length>(),
        exception_type_of<std::bad_alloc>(),
        exception_type_of<std::bad_cast>(),
        exception_type_of<std::bad_typeid>(),
        exception_type_of<std::bad_optional_access>(),
        exception_type_of<std::bad_variant_access>(),
        exception_type_of<std::bad_function_call>(),
        exception_type_of<std::bad_weak_ptr>(),
        exception_type_of<std::bad_exception>(),
    };
}

struct Registry {
    std::mutex mu;
    std::vector<ExceptionType> user;  // in registration order
    const std::vector<ExceptionType> standard = standard_types();
};

Registry& registry() {
    static Registry* r = new Registry;  // used by static initializers of other parts; never destroyed
    return *r;
}

const ExceptionType* find_entry_by_key(const std::string& key) {
    Registry& r = registry();
    {
        std::lock_guard<std::mutex> lock(r.mu);
        for (auto it = r.user.rbegin(); it != r.user.rend(); ++it)
            if (key == it->type->name()) return &*it;
    }
    for (const auto& t : r.standard)
        if (key == t.type->name()) return &t;
    return nullptr;
}

/// The registered type that rebuilds `e`: its exact type if registered, else
/// its nearest registered base (the latest user registration among several),
/// else its nearest standard base; null for a plain std::exception.
const ExceptionType* find_entry_for(const std::exception& e) {
    Registry& r = registry();
    const std::type_info& dynamic = typeid(e);
    const ExceptionType* found = nullptr;
    {
        std::lock_guard<std::mutex> lock(r.mu);
        for (auto it = r.user.rbegin(); it != r.user.rend() && !found; ++it)
            if (*it->type == dynamic) found = &*it;
        for (auto it = r.user.rbegin(); it != r.user.rend() && !found; ++it)
            if (it->matches(e)) found = &*it;
    }
    if (found) return found;
    for (const auto& t : r.standard)
        if (*t.type == dynamic) return &t;
    for (const auto& t : r.standard)
        if (t.matches(e)) return &t;
    return nullptr;
}

}  // namespace

void register_exception_type(const ExceptionType& t) {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    r.user.push_back(t);
}

// ---------------------------------------------------------------- building records

namespace {

constexpr std::uint8_t kRecordTag = 0xE1;
constexpr int kMaxCauseDepth = 32;
constexpr int kMaxFrames = 48;
const char* const kCauseSeparator = "\nThe above exception was the direct cause of the following exception:\n\n";

struct Record {
    RemoteInfo info;  // info.cause unused here: see `cause`
    std::string fields;
    std::unique_ptr<Record> cause;
};

/// What the thrown object is, found by re-throwing it inside a try block.
struct Inspected {
    const std::exception* ex = nullptr;  // null for non-std::exception throws
    const RemoteError* remote = nullptr;
    const std::type_info* type = nullptr;
    std::string type_name;
    std::string message;
    std::exception_ptr nested;
};

template <class T>
bool describe_value(const std::exception_ptr& p, std::string& out) {
    try {
        std::rethrow_exception(p);
    } catch (std::conditional_t<std::is_class_v<T>, const T&, T> v) {
        // (Scalars are caught by value: clang binds a reference to a caught
        // pointer in a place libstdc++'s re-thrown exceptions do not have.)
        if constexpr (std::is_same_v<T, std::string>) {
            out = v;
        } else if constexpr (std::is_same_v<T, const char*>) {
            out = v ? v : "(null)";
        } else if constexpr (std::is_same_v<T, bool>) {
            out = v ? "true" : "false";
        } else {
            out = std::to_string(v);
        }
        return true;
    } catch (...) {
        return false;
    }
}

Inspected inspect(const std::exception_ptr& p) {
    Inspected r;
    try {
        std::rethrow_exception(p);
    } catch (const std::exception& e) {
        r.ex = &e;  // stays valid: `p` owns the object
        r.type = &typeid(e);
        r.remote = dynamic_cast<const RemoteError*>(&e);
        r.type_name = r.remote ? r.remote->remote_type() : os::demangle(r.type->name());
        r.message = e.what();
        if (auto* n = dynamic_cast<const std::nested_exception*>(&e)) r.nested = n->nested_ptr();
        return r;
    } catch (...) {
        r.type = os::current_exception_type();
    }
    r.type_name = r.type ? os::demangle(r.type->name()) : std::string("unknown type");
    std::string value;
    bool known = describe_value<const char*>(p, value) || describe_value<std::string>(p, value) ||
                 describe_value<int>(p, value) || describe_value<long>(p, value) ||
                 describe_value<long long>(p, value) || describe_value<unsigned>(p, value) ||
                 describe_value<unsigned long>(p, value) || describe_value<unsigned long long>(p, value) ||
                 describe_value<double>(p, value) || describe_value<bool>(p, value);
    r.message = "non-exception thrown: " + r.type_name + (known ? " " + value : std::string());
    return r;
}

std::string hex(std::uintptr_t v) {
    char buf[2 + 2 * sizeof v + 1];
    std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
    return buf;
}

/// "[name:pid] type: what" then the frames, innermost first, stopping at main.
std::string format_part(const std::string& type_name, const std::string& message, const char* where,
                        void* const* pcs, int n) {
    std::string s = "[" + process_name() + ":" + std::to_string(os::current_pid()) + "] " + type_name + ": " +
                    message + "\n";
    if (n == 0) return s + "  (no stack available)\n";
    s += std::string("  ") + where + " (innermost call first):\n";
    std::vector<os::StackFrame> frames = os::symbolize(pcs, n);
    for (std::size_t i = 0; i < frames.size(); ++i) {
        const os::StackFrame& f = frames[i];
        s += "    #" + std::to_string(i) + " " + (f.function.empty() ? std::string("??") : f.function);
        if (!f.file.empty()) s += " at " + f.file + ":" + std::to_string(f.line);
        if (f.inlined)
            s += " (inlined)";
        else if (!f.module.empty())
            s += " [" + f.module + "+" + hex(f.offset) + "]";
        else
            s += " [" + hex(reinterpret_cast<std::uintptr_t>(f.pc)) + "]";
        s += "\n";
        // Below main there is only the C runtime's start-up.
        if (!f.inlined && (f.function == "main" || f.function.rfind("main.", 0) == 0)) break;
    }
    return s;
}

Record make_record(const std::exception_ptr& p, bool being_handled, int depth);

/// Registry key and extra fields of an exception object.
void fill_type(Record& rec, const Inspected& x) {
    if (!x.ex) return;
    const ExceptionType* t = nullptr;
    if (x.remote && !x.remote->remote_info().registry_key.empty())
        t = find_entry_by_key(x.remote->remote_info().registry_key);
    if (!t && !x.remote) t = find_entry_for(*x.ex);
    if (!t) return;
    rec.info.registry_key = t->type->name();
    Encoder fields;
    t->encode_fields(fields, *x.ex);
    rec.fields = std::move(fields.bytes());
}

Record make_record(const std::exception_ptr& p, bool being_handled, int depth) {
    Inspected x = inspect(p);
    Record rec;
    rec.info.type_name = x.type_name;
    rec.info.message = x.message;
    fill_type(rec, x);

    if (x.remote && !being_handled) {
        // Passed on without being raised here: the story is unchanged (SPEC §3).
        const RemoteInfo& old = x.remote->remote_info();
        rec.info.process_name = old.process_name;
        rec.info.pid = old.pid;
        rec.info.traceback = old.traceback;
        if (old.cause && depth < kMaxCauseDepth)
            rec.cause = std::make_unique<Record>(make_record(old.cause, false, depth + 1));
        return rec;
    }

    rec.info.process_name = process_name();
    rec.info.pid = os::current_pid();
    void* pcs[kMaxFrames];
    int n = 0;
    const char* where = nullptr;
    const void* object = os::exception_object(p);
    if (x.remote) {
        // Raised again in this process: its old story becomes the cause.
        n = os::raise_site_stack(object, pcs, kMaxFrames);
        where = "re-raised at";
        if (depth < kMaxCauseDepth) rec.cause = std::make_unique<Record>(make_record(p, false, depth + 1));
    } else {
        n = os::throw_site_stack(object, x.type, pcs, kMaxFrames);
        where = "thrown at";
        if (x.nested && depth < kMaxCauseDepth)
            rec.cause = std::make_unique<Record>(make_record(x.nested, false, depth + 1));
    }
    if (n == 0) {
        // No recorded site (no throw hook in this build, or a foreign thread):
        // the stack of the code that sends the exception is the next best thing.
        n = os::capture_stack(pcs, kMaxFrames, 2);
        where = os::throw_hook_active() ? "sent from (throw site not recorded)"
                                        : "sent from (throw sites are not being recorded)";
    }
    std::string own = format_part(x.type_name, x.message, where, pcs, n);
    rec.info.traceback = rec.cause ? rec.cause->info.traceback + kCauseSeparator + own : own;
    return rec;
}

void write_record(Encoder& out, const Record& rec) {
    out.write(kRecordTag);
    out.write(rec.info.type_name);
    out.write(rec.info.message);
    out.write(rec.info.process_name);
    out.write(static_cast<std::int64_t>(rec.info.pid));
    out.write(rec.info.traceback);
    out.write(rec.info.registry_key);
    out.write(rec.fields);
    out.write(static_cast<std::uint8_t>(rec.cause ? 1 : 0));
    if (rec.cause) write_record(out, *rec.cause);
}

std::exception_ptr read_record(Decoder& in, int depth) {
    if (depth > kMaxCauseDepth) throw DecodeError("decode: exception cause chain is too deep");
    if (in.read<std::uint8_t>() != kRecordTag) throw DecodeError("decode: not an encoded exception");
    RemoteInfo info;
    info.type_name = in.read<std::string>();
    info.message = in.read<std::string>();
    info.process_name = in.read<std::string>();
    info.pid = static_cast<long>(in.read<std::int64_t>());
    info.traceback = in.read<std::string>();
    info.registry_key = in.read<std::string>();
    std::string fields = in.read<std::string>();
    auto has_cause = in.read<std::uint8_t>();
    if (has_cause > 1) throw DecodeError("decode: bad exception cause marker");
    if (has_cause) info.cause = read_record(in, depth + 1);

    if (const ExceptionType* t = info.registry_key.empty() ? nullptr : find_entry_by_key(info.registry_key)) {
        Decoder fd(fields);
        std::exception_ptr p = t->rebuild(fd, std::move(info));
        fd.expect_end("exception fields");
        return p;
    }
    // No type to rebuild (unknown family, non-exception, or a key this
    // process does not know): a library Error that says what it was.
    info.registry_key.clear();
    Error base(info.message);
    return std::make_exception_ptr(Remote<Error>(std::move(base), std::move(info)));
}

}  // namespace

void encode_exception(Encoder& out, const std::exception_ptr& e) {
    if (!e) throw std::invalid_argument("mpservice: encode_exception of a null exception_ptr");
    // "Being handled" = we are inside the catch clause that caught this very
    // exception; that is how a remote exception raised again here is told from
    // one merely passed on (SPEC §3).
    bool being_handled = std::current_exception() == e;
    write_record(out, make_record(e, being_handled, 0));
}

std::exception_ptr decode_exception(Decoder& in) { return read_record(in, 0); }

}  // namespace mpservice::detail

namespace mpservice {
void set_traceback_source_lines(bool enabled) noexcept { detail::os::set_line_lookup(enabled); }
void set_throw_site_capture(bool enabled) noexcept { detail::os::set_throw_site_capture(enabled); }
}  // namespace mpservice

namespace mpservice::detail {

void rethrow_exception(const std::exception_ptr& e) {
    if (!e) throw std::invalid_argument("mpservice: rethrow_exception of a null exception_ptr");
#if defined(__GNUC__) || defined(__clang__)
    os::note_raise_site(os::exception_object(e), __builtin_return_address(0));
#else
    os::note_raise_site(os::exception_object(e), nullptr);
#endif
    std::rethrow_exception(e);
}

}  // namespace mpservice::detail
// ---- end part: mpservice/impl/remote_exception.cpp
// ---- begin part: mpservice/impl/logging.cpp ---------------------------------
// logging: implementation.
//
// One process-wide state.  The level thresholds are atomics so that a record
// below the threshold costs a load and a compare; everything else (per-logger
// levels, format, handler) is behind one recursive mutex, held while a record
// is formatted and handed to the handler: handlers run one at a time and in
// order, and a handler may itself log (re-entrant) without deadlocking.
#include <atomic>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

namespace mpservice {

namespace {

enum class Field { literal, time, level, process, pid, logger, message, file, line, function };
struct Token {
    Field field;
    std::string text;  // for literals
};

const char* const kDefaultFormat = "[{time}] [{level}] [{process}:{pid}] {logger}: {message}";

std::vector<Token> parse_format(const std::string& f) {
    static const std::pair<const char*, Field> names[] = {
        {"time", Field::time},     {"level", Field::level},     {"process", Field::process},
        {"pid", Field::pid},       {"logger", Field::logger},   {"message", Field::message},
        {"file", Field::file},     {"line", Field::line},       {"function", Field::function},
    };
    std::vector<Token> out;
    std::string lit;
    for (std::size_t i = 0; i < f.size(); ++i) {
        char c = f[i];
        if (c == '}') {
            if (i + 1 < f.size() && f[i + 1] == '}') {
                lit += '}';
                ++i;
                continue;
            }
            throw std::invalid_argument("mpservice: log format has a stray '}' at offset " + std::to_string(i) +
                                        " (write '}}' for a literal brace): " + f);
        }
        if (c != '{') {
            lit += c;
            continue;
        }
        if (i + 1 < f.size() && f[i + 1] == '{') {
            lit += '{';
            ++i;
            continue;
        }
        std::size_t close = f.find('}', i);
        if (close == std::string::npos)
            throw std::invalid_argument("mpservice: log format has an unclosed '{' at offset " + std::to_string(i) +
                                        ": " + f);
        std::string name = f.substr(i + 1, close - i - 1);
        bool known = false;
        for (const auto& [n, field] : names) {
            if (name == n) {
                if (!lit.empty()) out.push_back({Field::literal, std::move(lit)});
                lit.clear();
                out.push_back({field, std::string()});
                known = true;
            }
        }
        if (!known)
            throw std::invalid_argument("mpservice: unknown log format placeholder {" + name +
                                        "}; known: {time} {level} {process} {pid} {logger} {message} {file} "
                                        "{line} {function}");
        i = close;
    }
    if (!lit.empty()) out.push_back({Field::literal, std::move(lit)});
    return out;
}

struct LogState {
    // Parent side (and a process without a parent).
    std::atomic<int> global_level{static_cast<int>(Level::info)};
    std::atomic<bool> has_overrides{false};
    std::recursive_mutex mu;              // guards everything below, and serializes handlers
    std::map<std::string, Level> levels;  // per-logger overrides
    std::vector<Token> format = parse_format(kDefaultFormat);
    LogHandler handler;

    // Child side.
    std::mutex forward_mu;
    std::shared_ptr<const std::function<void(const LogRecord&)>> forward;
    std::atomic<bool> forwarding{false};
    std::atomic<int> parent_level{static_cast<int>(Level::notset)};
};

LogState& state() {
    static LogState* s = new LogState;  // usable from static destructors and exiting threads
    return *s;
}

/// The threshold for logger `name`: the override of the longest dotted prefix,
/// else the global one.  Caller holds the mutex when overrides exist.
Level effective_level_locked(const LogState& s, const std::string& name) {
    std::string n = name;
    for (;;) {
        auto it = s.levels.find(n);
        if (it != s.levels.end()) return it->second;
        auto dot = n.rfind('.');
        if (dot == std::string::npos) break;
        n.resize(dot);
    }
    return static_cast<Level>(s.global_level.load(std::memory_order_relaxed));
}

bool passes_parent_filter(LogState& s, const LogRecord& r) {
    if (!s.has_overrides.load(std::memory_order_acquire))
        return static_cast<int>(r.level) >= s.global_level.load(std::memory_order_relaxed);
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    return r.level >= effective_level_locked(s, r.logger);
}

void append_time(std::string& out, std::chrono::system_clock::time_point t) {
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
    long long secs = ms / 1000;
    int millis = static_cast<int>(ms % 1000);
    if (millis < 0) {
        millis += 1000;
        secs -= 1;
    }
    int f[6];
    detail::os::local_time(secs, f);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02d %02d:%02d:%02d.%03d", f[0], f[1], f[2], f[3], f[4], f[5], millis);
    out += buf;
}

std::string format_locked(const LogState& s, const LogRecord& r) {
    std::string out;
    out.reserve(64 + r.message.size());
    for (const Token& t : s.format) {
        switch (t.field) {
            case Field::literal: out += t.text; break;
            case Field::time: append_time(out, r.time); break;
            case Field::level: out += level_name(r.level); break;
            case Field::process: out += r.process_name; break;
            case Field::pid: out += std::to_string(r.pid); break;
            case Field::logger: out += r.logger; break;
            case Field::message: out += r.message; break;
            case Field::file: out += r.file; break;
            case Field::line: out += std::to_string(r.line); break;
            case Field::function: out += r.function; break;
        }
    }
    return out;
}

}  // namespace

std::string level_name(Level level) {
    switch (level) {
        case Level::notset: return "NOTSET";
        case Level::debug: return "DEBUG";
        case Level::info: return "INFO";
        case Level::warning: return "WARNING";
        case Level::error: return "ERROR";
        case Level::critical: return "CRITICAL";
    }
    return "LEVEL " + std::to_string(static_cast<int>(level));
}

bool Logger::is_enabled_for(Level level) const noexcept {
    LogState& s = state();
    if (s.forwarding.load(std::memory_order_acquire))
        return static_cast<int>(level) >= s.parent_level.load(std::memory_order_relaxed);
    if (!s.has_overrides.load(std::memory_order_acquire))
        return static_cast<int>(level) >= s.global_level.load(std::memory_order_relaxed);
    try {
        std::lock_guard<std::recursive_mutex> lock(s.mu);
        return level >= effective_level_locked(s, name_);
    } catch (...) {
        return true;  // let the handler side decide
    }
}

void Logger::log(Level level, const std::string& message, const char* file, int line, const char* function) const {
    if (!is_enabled_for(level)) return;
    LogRecord r;
    r.level = level;
    r.logger = name_;
    r.message = message;
    r.file = file ? file : "";
    r.line = line;
    r.function = function ? function : "";
    r.time = std::chrono::system_clock::now();
    r.pid = detail::os::current_pid();
    r.process_name = detail::process_name();

    LogState& s = state();
    if (s.forwarding.load(std::memory_order_acquire)) {
        std::shared_ptr<const std::function<void(const LogRecord&)>> forward;
        {
            std::lock_guard<std::mutex> lock(s.forward_mu);
            forward = s.forward;
        }
        if (forward) {
            (*forward)(r);
            return;
        }
    }
    detail::handle_log_record(r);
}

void set_log_level(Level level) { state().global_level.store(static_cast<int>(level), std::memory_order_relaxed); }

void set_log_level(const std::string& name, Level level) {
    if (name.empty() || name == "root") return set_log_level(level);
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    if (level == Level::notset)
        s.levels.erase(name);
    else
        s.levels[name] = level;
    s.has_overrides.store(!s.levels.empty(), std::memory_order_release);
}

Level get_log_level(const std::string& name) {
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    return effective_level_locked(s, name.empty() ? std::string("root") : name);
}

void set_log_format(const std::string& format) {
    std::vector<Token> tokens = parse_format(format);  // throws before anything changes
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    s.format = std::move(tokens);
}

std::string format_log_record(const LogRecord& record) {
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    return format_locked(s, record);
}

void set_log_handler(LogHandler handler) {
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    s.handler = std::move(handler);
}

namespace detail {

void set_log_forwarder(std::function<void(const LogRecord&)> forward) {
    LogState& s = state();
    std::lock_guard<std::mutex> lock(s.forward_mu);
    if (forward)
        s.forward = std::make_shared<const std::function<void(const LogRecord&)>>(std::move(forward));
    else
        s.forward.reset();
    s.forwarding.store(static_cast<bool>(s.forward), std::memory_order_release);
}

void handle_log_record(const LogRecord& record) {
    LogState& s = state();
    if (!passes_parent_filter(s, record)) return;
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    std::string line = format_locked(s, record);
    if (!s.handler) {
        line += '\n';
        os::write_stderr(line.data(), line.size());
        return;
    }
    try {
        s.handler(record, line);
    } catch (const std::exception& e) {
        // The handler may run on the reactor thread: report, do not propagate.
        std::string msg = "mpservice: the log handler threw: " + std::string(e.what()) + "\n";
        os::write_stderr(msg.data(), msg.size());
    } catch (...) {
        static const char msg[] = "mpservice: the log handler threw a non-exception\n";
        os::write_stderr(msg, sizeof msg - 1);
    }
}

Level log_level() {
    LogState& s = state();
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    int lowest = s.global_level.load(std::memory_order_relaxed);
    for (const auto& [name, level] : s.levels) lowest = std::min(lowest, static_cast<int>(level));
    return static_cast<Level>(lowest);
}

void set_log_level_from_parent(Level level) {
    state().parent_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/logging.cpp
// ---- begin part: mpservice/impl/process.cpp ---------------------------------
// process: implementation (to be written)
// ---- end part: mpservice/impl/process.cpp
// ---- begin part: mpservice/impl/threading.cpp -------------------------------
// threading: implementation (to be written)
// ---- end part: mpservice/impl/threading.cpp
// ---- begin part: mpservice/impl/synchronize.cpp -----------------------------
// synchronize: implementation (to be written)
// ---- end part: mpservice/impl/synchronize.cpp
// ---- begin part: mpservice/impl/queues.cpp ----------------------------------
// queues: implementation (to be written)
// ---- end part: mpservice/impl/queues.cpp

#endif  // MPSERVICE_IMPLEMENTATION
