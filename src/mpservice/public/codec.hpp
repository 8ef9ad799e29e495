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
//     containers of them in one block.  The rule: decoding never makes a value whose
//     loading is undefined behaviour.  A bool may only hold 0 or 1, so an aggregate with a
//     bool anywhere inside (in nested aggregates and arrays too) is checked field by field
//     after the copy - a bad byte is a DecodeError - and containers of it decode element by
//     element.  The codec finds an aggregate's fields itself (up to 24 direct members, no
//     base classes); for other trivially copyable classes (private members, constructors,
//     bases) it cannot, so they are copied unchecked: give such a class serialize() if it
//     holds a bool.  A pointer field means nothing in another process.
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
#pragma once

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

#include "errors.hpp"

namespace mpservice {

namespace detail::os {
#if defined(_WIN32)
// A HANDLE's value as an integer: a kernel handle is never negative, so -1
// (INVALID_HANDLE_VALUE) means "none" as on POSIX and `h < 0` reads the same.
using handle_t = std::intptr_t;  // HANDLE
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
    MPSERVICE_API std::uint32_t attach(detail::os::handle_t h);
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
        if (min_bytes_each == 0 ? n > max_empty_elements : n > remaining() / min_bytes_each)
            throw_bad_length(n, min_bytes_each, what);
        return static_cast<std::size_t>(n);
    }
    static constexpr std::size_t max_empty_elements = std::size_t(1) << 20;

    /// The OS handle attached at `index` by Encoder::attach.
    detail::os::handle_t handle(std::uint32_t index) const {
        if (!handles_ || index >= handles_->size()) throw_bad_handle(index);
        return (*handles_)[index];
    }

    std::size_t remaining() const noexcept { return static_cast<std::size_t>(end_ - p_); }
    bool at_end() const noexcept { return p_ == end_; }
    /// Throws unless every byte was consumed (trailing garbage is an error).
    void expect_end(const char* what = "value") const {
        if (!at_end()) throw_trailing(what);
    }

private:
    void require(std::size_t n, const char* what) const {
        if (n > remaining()) throw_truncated(n, what);
    }
    // The failures, out of line (the implementation) and cold: they keep the
    // fast paths small (and g++ 12's -Warray-bounds from reasoning about the
    // bytes past a failed check), and every includer from compiling the
    // messages' string code.
    [[noreturn]] MPSERVICE_API void throw_truncated(std::size_t n, const char* what) const;
    [[noreturn]] MPSERVICE_API void throw_bad_length(std::uint64_t n, std::size_t min_bytes_each, const char* what) const;
    [[noreturn]] MPSERVICE_API void throw_bad_handle(std::uint32_t index) const;
    [[noreturn]] MPSERVICE_API void throw_trailing(const char* what) const;
    const unsigned char* p_;
    const unsigned char* end_;
    const std::vector<detail::os::handle_t>* handles_;
    unsigned depth_ = 0;
};

namespace detail {

/// DecodeError for a map or set whose bytes repeat a key (out of line: cold).
[[noreturn]] MPSERVICE_API void throw_duplicate_key(bool is_map);

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

// ---------------------------------------------------------------------------
// Bytewise aggregates that hold bools: checked field by field.
//
// A bool may only hold 0 or 1; loading any other byte as a bool is undefined
// behaviour.  So a trivially copyable aggregate is decoded from its bytes and
// then each field is looked at through a structured binding - as raw bytes,
// never loaded as the field's type - down through nested aggregates and arrays:
// a bool byte other than 0 or 1 is a DecodeError.  Aggregates without a bool
// anywhere stay a plain copy (and containers of them one block).  The members
// are found with the standard C++17 means: the number of `{}` initializers the
// aggregate accepts, then a structured binding of that many names (up to
// codec_max_checked_fields).

inline constexpr int codec_max_checked_fields = 24;

template <class... T>
struct FieldTypes {};

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wmissing-braces"
#endif
/// Whether T{{}, ..., {}} with N initializers is valid: N <= T's direct members
/// (bases count as members in C++17 aggregate initialization).
template <class T, int N, class = void>
struct accepts_braces : std::false_type {};

template <class T>
struct accepts_braces<T, 1, std::void_t<decltype(T{{}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 2, std::void_t<decltype(T{{}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 3, std::void_t<decltype(T{{}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 4, std::void_t<decltype(T{{}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 5, std::void_t<decltype(T{{}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 6, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 7, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 8, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 9, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 10, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 11, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 12, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 13, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 14, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 15, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 16, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 17, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 18, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 19, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 20, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 21, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 22, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 23, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
template <class T>
struct accepts_braces<T, 24, std::void_t<decltype(T{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}})>> : std::true_type {};
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

template <class T, int N = 1>
constexpr int brace_count() {
    if constexpr (N > codec_max_checked_fields || !accepts_braces<T, N>::value)
        return N - 1;
    else
        return brace_count<T, N + 1>();
}

/// Converts only to a proper base of T: T{BaseProbe<T>{}} is valid iff T's
/// first initializer is a base class (its fields then cannot be bound by name).
template <class T>
struct BaseProbe {
    template <class U, class = std::enable_if_t<std::is_base_of_v<U, T> && !std::is_same_v<U, T>>>
    operator U() const;
};
template <class T, class = void>
struct has_aggregate_base : std::false_type {};
template <class T>
struct has_aggregate_base<T, std::void_t<decltype(T{BaseProbe<T>{}})>> : std::true_type {};

template <class T>
constexpr bool bindable_aggregate() {
    // Only trivially copyable aggregates are copied bytewise (and so checked); asking
    // more of other classes would count braces where default members refuse them.
    if constexpr (std::is_class_v<T> && std::is_trivially_copyable_v<T> && std::is_aggregate_v<T> &&
                  !std::is_empty_v<T> && !std::is_union_v<T>) {
        if constexpr (has_aggregate_base<T>::value) {
            return false;
        } else {
            constexpr int n = brace_count<T>();
            return n >= 1 && n <= codec_max_checked_fields;
        }
    } else {
        return false;
    }
}

/// Calls f(field...) with references to T's members (T bindable_aggregate).
template <class T, class F>
decltype(auto) with_fields(T& v, F&& f) {
    constexpr int n = brace_count<T>();
    if constexpr (n == 1) {
        auto& [m0] = v;
        return f(m0);
    } else if constexpr (n == 2) {
        auto& [m0, m1] = v;
        return f(m0, m1);
    } else if constexpr (n == 3) {
        auto& [m0, m1, m2] = v;
        return f(m0, m1, m2);
    } else if constexpr (n == 4) {
        auto& [m0, m1, m2, m3] = v;
        return f(m0, m1, m2, m3);
    } else if constexpr (n == 5) {
        auto& [m0, m1, m2, m3, m4] = v;
        return f(m0, m1, m2, m3, m4);
    } else if constexpr (n == 6) {
        auto& [m0, m1, m2, m3, m4, m5] = v;
        return f(m0, m1, m2, m3, m4, m5);
    } else if constexpr (n == 7) {
        auto& [m0, m1, m2, m3, m4, m5, m6] = v;
        return f(m0, m1, m2, m3, m4, m5, m6);
    } else if constexpr (n == 8) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7);
    } else if constexpr (n == 9) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8);
    } else if constexpr (n == 10) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9);
    } else if constexpr (n == 11) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10);
    } else if constexpr (n == 12) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11);
    } else if constexpr (n == 13) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12);
    } else if constexpr (n == 14) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13);
    } else if constexpr (n == 15) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14);
    } else if constexpr (n == 16) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15);
    } else if constexpr (n == 17) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16);
    } else if constexpr (n == 18) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17);
    } else if constexpr (n == 19) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18);
    } else if constexpr (n == 20) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19);
    } else if constexpr (n == 21) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19, m20] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19, m20);
    } else if constexpr (n == 22) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19, m20, m21] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19, m20, m21);
    } else if constexpr (n == 23) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19, m20, m21, m22] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19, m20, m21, m22);
    } else if constexpr (n == 24) {
        auto& [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19, m20, m21, m22, m23] = v;
        return f(m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15, m16, m17, m18, m19, m20, m21, m22, m23);
    }
}

struct FieldTypesOf {
    template <class... M>
    FieldTypes<M...> operator()(M&...) const {
        return {};
    }
};
template <class T>
using field_types_t = decltype(with_fields(std::declval<T&>(), FieldTypesOf{}));

template <class T>
constexpr bool holds_bool();
template <class... T>
constexpr bool any_holds_bool(FieldTypes<T...>) {
    return (holds_bool<T>() || ...);
}
/// Whether a bool lies anywhere inside T's bytes (as far as the codec can see).
template <class T>
constexpr bool holds_bool() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, bool>)
        return true;
    else if constexpr (std::is_array_v<U>)
        return holds_bool<std::remove_extent_t<U>>();
    else if constexpr (bindable_aggregate<U>())
        return any_holds_bool(field_types_t<U>{});
    else
        return false;
}

/// Throws DecodeError if a bool inside `v` holds a byte other than 0 or 1.
template <class T>
void check_bool_bytes(const T& v) {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, bool>) {
        unsigned char byte;
        std::memcpy(&byte, static_cast<const void*>(&v), 1);
        if (byte > 1)
            throw DecodeError("decode: a bool field's byte is " + std::to_string(byte) + ", not 0 or 1");
    } else if constexpr (std::is_array_v<U>) {
        for (const auto& x : v) check_bool_bytes(x);
    } else if constexpr (bindable_aggregate<U>() && holds_bool<U>()) {
        with_fields(const_cast<U&>(v), [](auto&... m) { (check_bool_bytes(m), ...); });
    }
}

/// A trivially copyable aggregate with a bool inside: its bytes, checked.
/// Not `bitwise`, so containers decode it element by element.
template <class T>
struct CheckedBytesCodec {
    static constexpr std::size_t min_encoded_size() { return sizeof(T); }
    static void encode(Encoder& e, const T& v) { e.write_bytes(&v, sizeof v); }
    static T decode(Decoder& d) {
        T v = BitwiseCodec<T>::from_bytes(d.take(sizeof(T), "bytes"));
        check_bool_bytes(v);
        return v;
    }
};

}  // namespace detail

namespace detail {
template <class T>
using default_codec_t = std::conditional_t<
    has_serialize<T>::value, SerializeCodec<T>,
    std::conditional_t<
        std::is_empty_v<T> && std::is_trivially_copyable_v<T>, EmptyCodec<T>,
        std::conditional_t<(std::is_class_v<T> || std::is_union_v<T>)&&std::is_trivially_copyable_v<T>,
                           std::conditional_t<holds_bool<T>(), CheckedBytesCodec<T>, BitwiseCodec<T>>,
                           mpservice_cannot_encode_this_type<T>>>>;

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
                throw_duplicate_key(is_map);
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
