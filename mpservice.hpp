// mpservice.hpp - Python's multiprocessing for C++17, in one header (MIT license).
//
// GENERATED FILE - DO NOT EDIT.  Made by tools/amalgamate.py from src/mpservice.hpp
// and the parts under src/mpservice/; edit those and run the tool again.
//
// What it is
//   Child processes you use like futures (spawned by default: a fresh exec of
//   the same program; fork and a fork server on request), shared-memory locks,
//   events, queues and values that survive a crashed owner, child log records
//   handled by the parent, and child exceptions re-thrown in the parent with
//   their type and the child's stack.  Standard library and POSIX; Linux.
//
// How to include it
//   #include "mpservice.hpp" anywhere.  In exactly ONE .cpp of the program write
//       #define MPSERVICE_IMPLEMENTATION
//       #include "mpservice.hpp"
//   to compile the implementation there.  Link with -pthread -ldl.  Call
//   mpservice::init(argc, argv) first in main(): a spawned child runs its task
//   inside it and never returns.
//   Or compile it in parts: 13 .cpp files, the n-th with
//       #define MPSERVICE_IMPLEMENTATION_PART n    (n = 1..13)
//       #include "mpservice.hpp"
//   made into a static library (CMake: link mpservice::parts).  The linker then
//   keeps only the parts the program uses, and the parts compile in parallel.
//
// Configuration macros (define before the include)
//   MPSERVICE_IMPLEMENTATION  emit the implementation in this translation unit
//   MPSERVICE_IMPLEMENTATION_PART  1..13: emit only that part of it
//   MPSERVICE_NO_THROW_HOOK   leave out the __cxa_throw hook that records throw
//                             sites (tracebacks then show where the exception
//                             was sent from); only matters with the implementation
//   MPSERVICE_API             linkage of the implementation's functions (default:
//                             empty), e.g. for a shared library's export attribute
//
// Ten lines
//   #define MPSERVICE_IMPLEMENTATION
//   #include "mpservice.hpp"
//   #include <iostream>
//   namespace mp = mpservice;
//   double work(int n) { if (n < 0) throw std::invalid_argument("negative"); return n * 0.5; }
//   int main(int argc, char** argv) {
//       mp::init(argc, argv);
//       mp::Process p(work, 21);            // spawned child; CTAD gives Process<double>
//       p.start();
//       std::cout << p.result() << "\n";   // 10.5; a child's exception is re-thrown here
//   }
//
// Read more
//   README.md of the project (the API table, semantics and deviations from
//   Python), examples/*.cpp, and the comment at the top of each part below
//   ("---- begin part: public/process.hpp" and so on).
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

#include <memory>

#if defined(_WIN32)
#define MPSERVICE_WIN32 1
#else
#define MPSERVICE_POSIX 1
#endif

// Linkage of the non-template functions defined in the implementation part.
#ifndef MPSERVICE_API
#define MPSERVICE_API
#endif

// Keeps a function out of its callers in the implementation TU, where its
// definition is visible: for code every template instance would otherwise
// copy (the footprint - bench/footprint_breakdown.py).
#if defined(__GNUC__) || defined(__clang__)
#define MPSERVICE_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define MPSERVICE_NOINLINE __declspec(noinline)
#else
#define MPSERVICE_NOINLINE
#endif

namespace mpservice::detail {

/// The owning pointer of a pimpl (a class defined in the implementation part):
/// std::unique_ptr<T>'s job, without its cost to every includer - each
/// unique_ptr<T> member instantiates some 150 class templates where the owner
/// is declared (bench/footprint_breakdown.py, includer).  Move-only; deletes
/// its object, so the owner's destructor must be out of line (as it must be
/// with unique_ptr).
template <class T>
class Owned {
public:
    Owned() noexcept = default;
    explicit Owned(T* p) noexcept : p_(p) {}
    Owned(Owned&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
    Owned& operator=(Owned&& o) noexcept {
        if (this != &o) {
            delete p_;
            p_ = o.p_;
            o.p_ = nullptr;
        }
        return *this;
    }
    Owned(const Owned&) = delete;
    Owned& operator=(const Owned&) = delete;
    ~Owned() { delete p_; }
    T* get() const noexcept { return p_; }
    T& operator*() const noexcept { return *p_; }
    T* operator->() const noexcept { return p_; }
    explicit operator bool() const noexcept { return p_ != nullptr; }
    /// Deletes the object now.
    void reset() noexcept {
        T* old = p_;
        p_ = nullptr;
        delete old;
    }

private:
    T* p_ = nullptr;
};

/// A shared owning pointer to a T, held as a std::shared_ptr<void>: the
/// library's classes keep their internal state this way.  Why: each distinct
/// std::shared_ptr<T> a class holds costs every includer some 60-150 class
/// instantiations (its converting constructors' constraints, __shared_ptr,
/// the traits) where the class is declared, while shared_ptr<void> is
/// instantiated once for all.  The conversions from and to std::shared_ptr<T>
/// instantiate shared_ptr<T> only where they are used - in the
/// implementation.  The stored pointer is the T* of the shared_ptr<T> it was
/// made from, so get() is a plain cast; ownership is the shared_ptr's.
template <class T>
class Shared {
public:
    Shared() noexcept = default;
    Shared(std::nullptr_t) noexcept {}
    template <class U>
    Shared(std::shared_ptr<U> p) noexcept : p_(std::shared_ptr<T>(std::move(p))) {}
    T* get() const noexcept { return static_cast<T*>(p_.get()); }
    T& operator*() const noexcept { return *get(); }
    T* operator->() const noexcept { return get(); }
    explicit operator bool() const noexcept { return p_ != nullptr; }
    /// As the std::shared_ptr<T> it is (sharing the ownership).
    std::shared_ptr<T> shared() const noexcept { return std::static_pointer_cast<T>(p_); }
    void reset() noexcept { p_.reset(); }
    long use_count() const noexcept { return p_.use_count(); }
    friend bool operator==(const Shared& a, const Shared& b) noexcept { return a.p_ == b.p_; }
    friend bool operator!=(const Shared& a, const Shared& b) noexcept { return a.p_ != b.p_; }

private:
    std::shared_ptr<void> p_;
};

}  // namespace mpservice::detail
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

/// recv() on a Connection whose other end is closed (every copy of it, in
/// every process) with nothing left to receive - as Python's EOFError.
class EOFError : public Error {
public:
    EOFError() : Error("connection: the other end is closed and nothing is left to receive") {}
    using Error::Error;
};

/// send() on a Connection whose other end is closed (every copy of it, in
/// every process): nobody can receive the item - as Python's BrokenPipeError.
class BrokenPipeError : public Error {
public:
    BrokenPipeError() : Error("connection: the other end is closed; nothing can be sent") {}
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
#include <new>
#include <string>
#include <typeinfo>
#include <vector>

namespace mpservice::detail::os {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;
/// A deadline that never comes (wait without a timeout).
inline constexpr Deadline no_deadline = Deadline::max();

/// The end of one bounded sleep of a wait that ends at `deadline`: `slice`
/// from now, or the deadline if that comes first.  The library's blocking
/// waits sleep in slices and look again after each, because a wake-up can be
/// lost to a process that dies or stops at the wrong instant (each caller
/// says how); the slice bounds what such a loss costs.
inline Deadline sleep_slice_end(Deadline deadline, Clock::duration slice) noexcept {
    const Deadline now = Clock::now();
    return deadline - now > slice ? now + slice : deadline;
}

/// Deadline `timeout` from now; a negative timeout means "already expired",
/// and a huge one saturates to no_deadline instead of overflowing.
/// `d` in seconds, in plain arithmetic on its count: a conversion to
/// std::chrono::duration<double> in a header template would be instantiated
/// in every includer.
template <class Rep, class Period>
double seconds_of(std::chrono::duration<Rep, Period> d) {
    return static_cast<double>(d.count()) * Period::num / Period::den;
}

template <class Rep, class Period>
Deadline deadline_after(std::chrono::duration<Rep, Period> timeout) {
    auto now = Clock::now();
    if (timeout <= timeout.zero()) return now;
    if (seconds_of(timeout) > seconds_of(no_deadline - now)) return no_deadline;
    return now + std::chrono::duration_cast<Clock::duration>(timeout);
}

// ---------------------------------------------------------------- handles
inline constexpr handle_t invalid_handle = handle_t(-1);
/// Closes a handle; invalid_handle is ignored.  Never throws.
MPSERVICE_API void close_handle(handle_t h) noexcept;
/// Duplicates a handle (close-on-exec); throws std::system_error.
MPSERVICE_API handle_t duplicate_handle(handle_t h);
/// Whether `h` is an open handle of this process.
MPSERVICE_API bool handle_valid(handle_t h) noexcept;

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
struct alignas(8) RobustMutex {
    // 48 bytes hold glibc's pthread_mutex_t (40 on x86-64, 48 on AArch64) and
    // leave a user of a 64-byte cache line room for its own fields beside it.
    unsigned char storage[48];
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
/// -rdynamic are named), and file:line when line information is available:
/// for every frame, or, given `last_line_frame`, for the frames up to the
/// first whose function it accepts (the caller shows none beyond it).
MPSERVICE_API std::vector<StackFrame> symbolize(void* const* pcs, int n,
                                                bool (*last_line_frame)(const std::string& function) = nullptr);
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

// ---------------------------------------------------------------- process/channel section (process.hpp)
// Channels are Unix stream sockets: ordered bytes plus handles riding beside
// them (SCM_RIGHTS), so a Lock or Queue passed as a Process argument reaches
// the child as the very same kernel object.

/// A connected pair of channel ends (stream, close-on-exec): {a, b}.
MPSERVICE_API void channel_pair(handle_t& a, handle_t& b);
/// A connected pair of datagram-like ends (message boundaries kept).
MPSERVICE_API void packet_pair(handle_t& a, handle_t& b);
/// Writes all of `a` then `b` (either may be empty) with `handles` attached;
/// blocks until done.  Any number of handles: the system takes a limited
/// number per message (253 on Linux), so they ride on successive bytes in
/// batches, in order (the bytes must be at least as many as the batches;
/// std::invalid_argument otherwise).  Returns false if the peer is gone (no
/// SIGPIPE is raised); throws std::system_error on other errors.
MPSERVICE_API bool channel_write(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                                 const handle_t* handles = nullptr, std::size_t nhandles = 0);
/// Reads what is there, up to `cap` bytes; handles that arrive are appended to
/// `*handles` (close-on-exec).  Returns the byte count, 0 at end of stream, or
/// -1 when `nonblocking` and nothing is ready.  Throws std::system_error
/// (EMFILE) if handles were lost because this process has no room for them.
MPSERVICE_API long channel_read(handle_t ch, void* buf, std::size_t cap, std::vector<handle_t>* handles,
                                bool nonblocking);
/// Blocks until one of `hs` is readable or `timeout_ms` passes (-1 = forever);
/// returns a bit mask of the readable ones (bit i = hs[i]).
MPSERVICE_API unsigned wait_readable(const handle_t* hs, int n, int timeout_ms);

/// A poller watches many handles for readability (epoll on Linux); each
/// registration carries a caller token.  Thread-safe registration.
MPSERVICE_API handle_t poller_create();
MPSERVICE_API void poller_add(handle_t poller, handle_t h, std::uint64_t token);
MPSERVICE_API void poller_remove(handle_t poller, handle_t h) noexcept;
/// Waits for events; stores up to `max` tokens; returns how many.
MPSERVICE_API int poller_wait(handle_t poller, std::uint64_t* tokens, int max, int timeout_ms);
/// A wake-up event (eventfd) that a poller can watch.
MPSERVICE_API handle_t wake_event_create();
MPSERVICE_API void wake_event_signal(handle_t ev) noexcept;
MPSERVICE_API void wake_event_drain(handle_t ev) noexcept;

/// Starts a fresh instance of this program (/proc/self/exe) with argv
/// {argv0, marker}; `inherit` is the one handle it inherits (same number);
/// `environment` ("NAME=value" entries) replaces this process's environment
/// when given.  Returns the child's pid.
MPSERVICE_API long spawn_self(const std::string& argv0, const std::string& marker, handle_t inherit,
                              const std::vector<std::string>* environment = nullptr);
/// fork(): 0 in the child, the child's pid in the parent; throws on failure.
/// The child starts with default signal handlers and no blocked signals.
MPSERVICE_API long fork_process();
/// A handle that becomes readable when process `pid` exits (pidfd); invalid
/// where the system has none.
MPSERVICE_API handle_t process_handle(long pid) noexcept;
/// What reap_child found.
enum class ReapResult {
    running,           ///< not ended yet (only without `block`)
    reaped,            ///< ended; *exitcode holds its status
    reaped_elsewhere,  ///< ended, but its status went to someone else: SIGCHLD
                       ///< ignored (the kernel discards it) or another waiter
                       ///< (e.g. a SIGCHLD handler calling waitpid(-1))
};
/// Reaps child `pid` (waiting if `block`) through `process_handle` when it is
/// valid (waitid(P_PIDFD): never another process that reused the pid), and
/// stores the Python-style exit code (n after exit(n), -N after signal N).
/// Throws std::system_error on unexpected errors.
MPSERVICE_API ReapResult reap_child(long pid, handle_t process_handle, bool block, int* exitcode);
/// Reaps any ended child without waiting: true with its pid and exit code.
MPSERVICE_API bool reap_any_child(long* pid, int* exitcode);
/// Sends `sig` (through the process handle when valid, so a reused pid is never hit).
MPSERVICE_API bool send_signal(long pid, handle_t process_handle, int sig) noexcept;
MPSERVICE_API int signal_terminate() noexcept;  // SIGTERM
MPSERVICE_API int signal_kill() noexcept;       // SIGKILL
/// "SIGSEGV", "SIGKILL", ... ("signal N" when unknown).
MPSERVICE_API std::string signal_name(int sig);
MPSERVICE_API long parent_pid() noexcept;
/// Whether this process runs in secure-execution mode (set-user-ID,
/// set-group-ID or file capabilities: AT_SECURE), where it must not trust
/// what its caller set up.
MPSERVICE_API bool secure_execution() noexcept;
/// The process and user at the other end of a local channel, as the system
/// recorded them when the channel was made; false if `h` is not such a channel.
MPSERVICE_API bool channel_peer(handle_t h, long* pid, long* uid) noexcept;
/// The handle of the channel whose value `marked` the spawn marker carries, in
/// this (child) process: `marked` itself where the system inherits it (POSIX);
/// on Windows, where spawn_self lets the child take it from `parent` instead
/// (Wine cannot use an inherited socket), a copy taken from the parent.
/// invalid_handle if it cannot be had.
MPSERVICE_API handle_t adopt_channel(handle_t marked, long parent) noexcept;
/// Whether `uid` is this process's real and effective user.
MPSERVICE_API bool is_own_user(long uid) noexcept;
/// Arranges for this process to be killed when its parent dies, then checks
/// that the parent is still `expected_parent` (closing the race); false if not.
MPSERVICE_API bool die_with_parent(long expected_parent) noexcept;
/// Starts a process that shares this process's address space and holds it
/// until this process has ended: this process's exit then skips the address
/// space's teardown (hundreds of microseconds for an exec'd program, all of
/// it before its parent can see the exit), which the holder does afterwards,
/// off the parent's path.  The holder is a child of this process's *parent*
/// (which must reap it), runs no library code and only waits.  Its pid, or 0
/// where there is none (not Linux, no pidfd).  Called once per process.
MPSERVICE_API long hold_address_space_past_exit() noexcept;
/// Puts every caught signal back to its default action and unblocks all
/// signals (a forked child starts like an exec'd one; ignored signals stay ignored).
MPSERVICE_API void reset_signal_handlers() noexcept;
/// The calling thread's stack (lowest address and size); false if unknown.
MPSERVICE_API bool current_thread_stack(void** low, std::size_t* size) noexcept;
/// Tells a leak checker, if one is linked in, that `p..p+size` holds live
/// pointers (a forked child still has the memory of threads it does not have).
MPSERVICE_API void leak_checker_root(const void* p, std::size_t size) noexcept;
/// Closes every handle above the standard ones except `keep`.
MPSERVICE_API void close_handles_except(handle_t keep) noexcept;
/// Ends the process at once with `code`: no atexit handlers, no destructors.
[[noreturn]] MPSERVICE_API void exit_now(int code) noexcept;
/// Makes exit(n) in this process call hook(n) (after the handlers registered
/// later, as atexit); false where the platform cannot tell the status.
MPSERVICE_API bool on_exit_status(void (*hook)(int status) noexcept) noexcept;
/// Whether the caller runs on the process's initial thread.
MPSERVICE_API bool is_main_thread() noexcept;
/// Blocks child-exit notifications for the calling (single-threaded) process
/// and returns a handle that becomes readable when a child ends (signalfd).
MPSERVICE_API handle_t child_exit_events();
/// Consumes the pending notifications of a child_exit_events handle.
MPSERVICE_API void child_exit_events_drain(handle_t h) noexcept;
/// Undoes child_exit_events in a freshly forked child: closes `h`, unblocks.
MPSERVICE_API void child_exit_events_release(handle_t h) noexcept;

/// Where a code address lives: the module (path as the loader knows it, ""
/// for the main executable) and the offset from the module's load base, which
/// stays valid across an exec of the same build.
struct ModuleAddress {
    std::string module;
    std::uintptr_t offset = 0;
};
MPSERVICE_API bool module_address(const void* addr, ModuleAddress& out);
/// The address of `offset` in `module` in this process (loading the module if
/// needed); nullptr if it cannot be found.
MPSERVICE_API const void* module_resolve(const ModuleAddress& where);
/// An identity of the module's build: its GNU build-id, or - when it has
/// none - the file's device, inode, size and modification time.
MPSERVICE_API std::string module_fingerprint(const std::string& module);

/// CPUs this process may run on (affinity mask).
MPSERVICE_API int affinity_cpu_count() noexcept;
/// The CPU bandwidth quota of this process's cgroup in CPUs (v2 cpu.max or
/// v1 cfs quota), or 0 if there is none.
MPSERVICE_API double cgroup_cpu_quota() noexcept;

// ---------------------------------------------------------------- (synchronization section)
/// robust_mutex_lock without its spinning: straight to the blocking wait (for
/// callers that spin in their own, adaptive way first).
MPSERVICE_API LockResult robust_mutex_lock_blocking(RobustMutex* m, Deadline deadline = no_deadline);
/// The uncontended paths of robust_mutex_trylock and robust_mutex_unlock, for
/// callers that inline their own fast path: 0 means taken (released), anything
/// else is a status for robust_mutex_trylock_result (robust_mutex_unlock_failed).
/// They only forward to the system, so they compile to a tail jump: the
/// result mapping of the full functions is an extra call frame per operation,
/// ~20% of an uncontended acquire+release.
MPSERVICE_API int robust_mutex_trylock_status(RobustMutex* m) noexcept;
MPSERVICE_API int robust_mutex_unlock_status(RobustMutex* m) noexcept;
/// busy (EBUSY, or held by the caller) or owner_died; throws std::system_error otherwise.
/// A busy status need not have looked at the holder (Win32 only compares the
/// word): a caller that gives up on busy asks robust_mutex_trylock, which
/// reports a holder that ended as owner_died.
MPSERVICE_API LockResult robust_mutex_trylock_result(int status);
/// Throws the std::system_error of a failed unlock.
[[noreturn]] MPSERVICE_API void robust_mutex_unlock_failed(int status);
/// The calling thread's kernel id: unique among the live threads of every process.
MPSERVICE_API long current_tid() noexcept;
/// Registers fn to run in the child after every fork() (not after exec).
MPSERVICE_API void at_fork_child(void (*fn)());
/// Runs fn(arg) when the calling thread ends, after its thread_local objects
/// are gone (fn must not use any).  The process's initial thread runs them at
/// exit on POSIX, never on Windows (the process's end frees what they hold).
MPSERVICE_API void at_thread_exit(void (*fn)(void*), void* arg);

/// The calling thread's T, made on first use and destroyed by at_thread_exit:
/// for per-thread state with a destructor that matters (one per type: give
/// each use a struct of its own).  Not a thread_local T,
/// because with MinGW-w64 (GCC's emulated TLS over winpthreads) a thread's
/// thread_local objects are destroyed after their storage was freed: emutls
/// frees it in a pthread key destructor that runs before the key destructor
/// that runs the thread_local destructors (issue 14).  Not to be used from
/// code that runs at thread exit itself.
template <class T>
T& thread_object() {
    thread_local T* p = nullptr;  // trivially destructible: nothing runs on its freed storage
    if (!p) {
        T* fresh = new T();
        try {
            at_thread_exit([](void* q) { delete static_cast<T*>(q); }, fresh);
        } catch (...) {
            delete fresh;
            throw;
        }
        p = fresh;
    }
    return *p;
}

/// A library lock that fork() must not copy while another thread holds it (the
/// child would have the lock held by a thread it does not have: a deadlock).
/// Before every fork() of this process the registered locks are taken, lowest
/// rank first (outer locks first), so that the state they guard is consistent
/// in the copy; after it they are released in the parent and made afresh,
/// unlocked, in the child.  A lock still busy after a bounded wait (its holder
/// waits for the forking thread, say) is left alone in the parent.
struct ForkLock {
    bool (*try_lock)(void* lock);
    void (*unlock)(void* lock);
    void (*reinit)(void* lock);
    void* lock;
    int rank;
};
MPSERVICE_API void at_fork_protect(const ForkLock& lock) noexcept;
/// Whether the C++ allocator can be used in a fork child whose parent had other
/// threads allocating: false only under an AddressSanitizer runtime that keeps
/// its allocator's locks across fork() unguarded and whose locks this library
/// cannot reach (os_posix.cpp: before LLVM 18, linked as a shared library).
MPSERVICE_API bool allocator_fork_safe() noexcept;
/// at_fork_protect for a std::mutex or std::recursive_mutex that lives for
/// the rest of the process.  Register a lock before any thread can take it
/// (at static initialization): a registration racing a fork cannot protect.
template <class Mutex>
void at_fork_protect(Mutex* m, int rank) noexcept {
    at_fork_protect(ForkLock{[](void* p) { return static_cast<Mutex*>(p)->try_lock(); },
                             [](void* p) { static_cast<Mutex*>(p)->unlock(); },
                             [](void* p) { ::new (p) Mutex(); },  // over the copy held by a thread that is gone
                             m, rank});
}
/// Whether a process with this id exists and has not ended: unlike pid_alive,
/// a zombie (killed or exited, not yet reaped) counts as ended.
MPSERVICE_API bool process_running(long pid) noexcept;

/// A code address in a form that stays valid in another process running the
/// same program, however its modules were placed (ASLR, exec): the module,
/// named by a hash of its path as the dynamic loader lists it, and the offset
/// from the module's load base.
struct CodeRef {
    std::uint64_t module = 0;  // 0: no code
    std::uint64_t offset = 0;
    bool empty() const noexcept { return module == 0; }
};
/// The CodeRef of an address inside a loaded module; throws std::invalid_argument if there is none.
MPSERVICE_API CodeRef code_ref_of(const void* address);
/// The address in this process, or nullptr if the module is not loaded here or
/// the offset is not inside its executable code.
MPSERVICE_API const void* code_ref_resolve(const CodeRef& ref) noexcept;

// ---------------------------------------------------------------- (synchronization fixes: fix-sync)
/// Sleeps until `deadline` (steady clock); returns at once if it has passed.
MPSERVICE_API void sleep_until(Deadline deadline) noexcept;
/// Whether a thread of *this* process holds the robust mutex now: its owner,
/// as the kernel's robust-futex protocol records it, is one of our threads.
/// (A block of shared memory holding such a mutex must stay mapped until that
/// thread ends, or the kernel cannot mark the mutex as its owner's death.)
MPSERVICE_API bool robust_mutex_held_in_this_process(const RobustMutex* m) noexcept;
/// Whether some thread sleeps in the kernel waiting for the robust mutex (the
/// waiters bit of its futex word; false where the word cannot be read).  A hint:
/// it may change at once.
MPSERVICE_API bool robust_mutex_has_sleepers(const RobustMutex* m) noexcept;

/// Gives the pages of bytes [offset, offset + size) of shared memory `h` back
/// to the system (they read as zeros afterwards, in every process that maps
/// them); offset and size are multiples of page_size().  Best effort.
MPSERVICE_API void shm_release(handle_t h, std::size_t offset, std::size_t size) noexcept;
/// The size of a memory page.
MPSERVICE_API std::size_t page_size() noexcept;

// ---------------------------------------------------------------- (queue section)
/// Populates the page tables of a shared mapping now (writable, or readable
/// only), so the first pass of data through it does not pay a page fault per
/// 4 KiB.  Best effort; never changes the bytes.
MPSERVICE_API void shm_prefault(void* addr, std::size_t size, bool for_write = true) noexcept;

// ---------------------------------------------------------------- (connection section)
// Pipe/Connection (connection.hpp) use channel_pair's stream sockets with
// non-blocking writes, so that a sender can also take in what its peer sends
// while it waits for room, and a waiter can notice close() from another thread.

/// Readiness bits of wait_io.
inline constexpr unsigned io_readable = 1;  ///< data, end of stream or an error: a read will not block
inline constexpr unsigned io_writable = 2;  ///< room, or the peer is gone: a write will not block
/// Writes what the socket takes now of `a` then `b`, without waiting; `handles`
/// ride on the first byte written (pass them only with a message's first
/// bytes).  Returns the bytes written, 0 when there is no room (nothing was
/// written, handles not sent), -1 when the peer is gone (no SIGPIPE is raised);
/// throws std::system_error on other errors.
MPSERVICE_API long channel_write_some(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                                      const handle_t* handles = nullptr, std::size_t nhandles = 0);
/// Waits until `h` is ready for one of `want` (io_readable | io_writable) or
/// `timeout_ms` passes (-1 = forever); returns the ready bits (0 on timeout).
MPSERVICE_API unsigned wait_io(handle_t h, unsigned want, int timeout_ms);
/// Waits until one of the `n` handles (any number) is readable or `timeout_ms`
/// passes; sets ready[i] to 1 for the readable ones and returns their number.
MPSERVICE_API std::size_t wait_readable_any(const handle_t* hs, std::size_t n, int timeout_ms, unsigned char* ready);

// ---------------------------------------------------------------- (output forwarding section)
// A child's standard output and error can go through pipes that the parent's
// reactor reads (Process::set_forward_output).

/// A pipe: {read end (non-blocking), write end (blocking)}, both close-on-exec.
MPSERVICE_API void output_pipe(handle_t& read_end, handle_t& write_end);
/// Reads what is in a pipe without waiting: the byte count, 0 at end of
/// stream (every write end closed), -1 if nothing is there now.
MPSERVICE_API long pipe_read(handle_t h, void* buf, std::size_t cap) noexcept;
/// Makes `out` this process's standard output and `err` its standard error
/// (descriptors 1 and 2, inherited by programs it starts; the two handles stay
/// open for the caller to close), and makes stdout line-buffered as it would
/// be on a terminal.
MPSERVICE_API void redirect_standard_output(handle_t out, handle_t err);

// ---------------------------------------------------------------- (server process section)
/// A listening Unix stream socket at a fresh, unguessable address (Linux: the
/// abstract namespace, so nothing appears in the file system and nothing is
/// left behind); `address` receives the name to connect to.  Close-on-exec.
MPSERVICE_API handle_t listener_create(std::string& address);
/// Waits for the next connection; invalid_handle once the listener was shut
/// down (listener_shutdown) or on an unrecoverable error.
MPSERVICE_API handle_t listener_accept(handle_t listener);
/// Makes a blocked listener_accept return invalid_handle.
MPSERVICE_API void listener_shutdown(handle_t listener) noexcept;
/// Connects to a listener_create address; throws std::system_error.
MPSERVICE_API handle_t unix_connect(const std::string& address);
/// The user id of the process at the other end of a connected socket, or -1.
MPSERVICE_API long peer_user(handle_t socket) noexcept;
/// This process's (real) user id.
MPSERVICE_API long current_user() noexcept;
/// Ends both directions of a socket: reads at either end return end-of-stream.
MPSERVICE_API void socket_shutdown(handle_t socket) noexcept;
/// Fills `out` with `n` random bytes from the system's generator.
MPSERVICE_API void random_bytes(void* out, std::size_t n);
/// Number of open descriptors and of memory mappings of this process (diagnostics; -1 if unknown).
MPSERVICE_API long open_handle_count() noexcept;
MPSERVICE_API long mapping_count() noexcept;
// ---- the working directory and environment (fork-server workers adopt the parent's)

/// This process's working directory ("" if it cannot be named, e.g. deleted).
MPSERVICE_API std::string current_directory();
/// chdir; false if it failed.
MPSERVICE_API bool change_directory(const std::string& path) noexcept;
/// Every "NAME=value" entry of this process's environment.
MPSERVICE_API std::vector<std::string> environment_entries();
/// Replaces the whole environment by `entries` ("NAME=value").  Single-threaded
/// processes only (the environment is not thread-safe).
MPSERVICE_API void replace_environment(const std::vector<std::string>& entries);

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
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

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

    /// Declares that a robust mutex lives at `m` inside this block.  While a
    /// thread of this process holds it, the block stays mapped even after its
    /// last handle here is gone: the kernel marks a robust mutex whose owner
    /// ended by walking that thread's robust list *in the mapped memory*, so an
    /// unmapped block would leave the mutex locked forever (and its list entry
    /// pointing at nothing).  Costs nothing on lock or unlock.
    MPSERVICE_API void keep_mapped_while_held(os::RobustMutex* m) const;

private:
    /// What the inline accessors read.  The rest of the mapping (the mutexes
    /// of keep_mapped_while_held, and unmapping) is the implementation's
    /// Mapping, which derives from it - out of every includer's sight.
    struct View {
        os::handle_t handle = os::invalid_handle;
        void* addr = nullptr;
        std::size_t size = 0;
    };
    struct Mapping;
    Shared<View> m_;
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
    // How `cause` relates to the exception (the wire's cause marker): 1 = an
    // earlier part of its story; 2 = its std::nested_exception; 3 = an earlier
    // part of its story, whose own nested exception is this one's too.
    std::uint8_t cause_kind = 0;
    std::exception_ptr nested;  // what std::rethrow_if_nested throws, if anything
};
}  // namespace detail

/// Mixin carried by every exception that came from another process.  It is
/// deliberately *not* a std::exception, so that `catch (const std::exception&)`
/// stays unambiguous for Remote<E>, which derives from both E and RemoteError.
class RemoteError {
public:
    // Out of line, as are the constructors: every re-throwable standard type
    // has a Remote<E> and a RemoteNested<E>, and an inline destructor of the
    // five strings and two exception_ptrs was copied into each of their
    // destructors and thunks (88 KiB of a 717 KiB example binary).
    MPSERVICE_API MPSERVICE_NOINLINE virtual ~RemoteError();

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

    /// what() of the original exception, so that
    /// `catch (const mp::RemoteError& e) { e.what(); }` works.
    virtual const char* what() const noexcept { return info_.message.c_str(); }

protected:
    MPSERVICE_API MPSERVICE_NOINLINE explicit RemoteError(detail::RemoteInfo info);
    MPSERVICE_API MPSERVICE_NOINLINE RemoteError(const RemoteError&);
    RemoteError& operator=(const RemoteError&) = default;

private:
    detail::RemoteInfo info_;
};

/// The type a remote exception of type E (or of a type derived from E) is
/// re-thrown as: catch clauses for E and for RemoteError both take it.
template <class E>
class Remote : public E, public RemoteError {
public:
    Remote(E original, detail::RemoteInfo info) : E(std::move(original)), RemoteError(std::move(info)) {}
    const char* what() const noexcept override { return remote_what().c_str(); }
    // Not inlined: each of the four destructor thunks of a RemoteNested<E>
    // (and two of a Remote<E>) had its own copy, for each of the 33 known
    // types (20 KiB of a program that starts processes).
    MPSERVICE_NOINLINE ~Remote() override {}
};

/// A remote exception that was thrown with std::throw_with_nested: also a
/// std::nested_exception, so std::rethrow_if_nested throws the (rebuilt)
/// nested exception.  Catch it as E, Remote<E> or RemoteError as any other.
template <class E>
class RemoteNested final : public Remote<E>, public std::nested_exception {
public:
    /// Call inside a catch clause of the nested exception (nested_exception
    /// keeps the exception being handled).
    RemoteNested(E original, detail::RemoteInfo info) : Remote<E>(std::move(original), std::move(info)) {}
    const char* what() const noexcept override { return this->remote_what().c_str(); }
    MPSERVICE_NOINLINE ~RemoteNested() override {}
};

namespace detail {
template <class E>
const RemoteError* as_remote(const E& e) noexcept {
    if constexpr (std::is_base_of_v<RemoteError, E>) return &e;
    else if constexpr (std::is_polymorphic_v<E>) return dynamic_cast<const RemoteError*>(&e);
    else return nullptr;
}
}  // namespace detail

/// The remote traceback of `e` - a std::exception, a RemoteError, or any
/// exception object - or "" if it did not come from another process.
template <class E>
std::string remote_traceback(const E& e) {
    const RemoteError* r = detail::as_remote(e);
    return r ? r->traceback() : std::string();
}
/// Whether `e` (a std::exception, a RemoteError, ...) came from another process.
template <class E>
bool is_remote(const E& e) noexcept {
    return detail::as_remote(e) != nullptr;
}
/// The same for an exception kept as an exception_ptr ("" / false for null).
inline std::string remote_traceback(const std::exception_ptr& p) {
    if (!p) return std::string();
    try {
        std::rethrow_exception(p);
    } catch (const RemoteError& r) {
        return r.traceback();
    } catch (...) {
    }
    return std::string();
}
inline bool is_remote(const std::exception_ptr& p) noexcept {
    if (!p) return false;
    try {
        std::rethrow_exception(p);
    } catch (const RemoteError&) {
        return true;
    } catch (...) {
    }
    return false;
}

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

/// Keeps the throw-site stack that this thread recorded for `e`, so that `e`
/// encoded later by another thread still shows where it was thrown (a
/// Thread does this for its target's exception).  The last few are kept.
MPSERVICE_API void keep_throw_site(const std::exception_ptr& e) noexcept;

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

/// The rebuilt exception: Remote<T>, or RemoteNested<T> when the original was
/// thrown with std::throw_with_nested.
template <class T>
std::exception_ptr make_remote(T original, RemoteInfo&& info) {
    if constexpr (!std::is_base_of_v<std::nested_exception, T>) {
        if (info.nested) {
            std::exception_ptr nested = info.nested;
            try {
                std::rethrow_exception(nested);
            } catch (...) {  // RemoteNested's nested_exception keeps the exception being handled
                return std::make_exception_ptr(RemoteNested<T>(std::move(original), std::move(info)));
            }
        }
    }
    return std::make_exception_ptr(Remote<T>(std::move(original), std::move(info)));
}

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
            return make_remote<T>(std::move(original), std::move(info));
        } else if constexpr (std::is_constructible_v<T, std::string>) {
            (void)fields;
            T original(info.message);
            return make_remote<T>(std::move(original), std::move(info));
        } else {
            static_assert(std::is_default_constructible_v<T>,
                          "register_exception<T>: T needs a serialize() member and a default constructor, "
                          "a constructor from std::string, or a default constructor");
            (void)fields;
            return make_remote<T>(T(), std::move(info));
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
    MPSERVICE_API static void encode(Encoder& e, const LogRecord& r);
    MPSERVICE_API static LogRecord decode(Decoder& d);
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
// process: child processes used as futures, the start-up hook and the contexts.
//
//     int main(int argc, char** argv) {
//         mp::init(argc, argv);               // first line: a spawned child runs its task here
//         mp::Process p(work, 21);            // spawn context by default; CTAD: Process<double>
//         p.start();
//         double r = p.result();              // waits; re-throws the child's exception
//     }
//
// Targets: any free function, static member function or capture-less lambda,
// with arguments and a return value the codec handles (or void).  Nothing is
// registered: the child is told the target's offset inside its module, and
// checks that it runs the same build.  Under the fork context a callable with
// captures works too (it simply runs in the forked copy).
//
// Arguments are converted to the target's parameter types when the Process is
// made, as std::thread converts them (a literal for a std::string parameter,
// an int for a double); the child receives that copy.  A target that cannot
// work is one static_assert saying why and what to do: a T& parameter or a
// reference result (the child cannot write into the parent's objects), and -
// under SpawnContext, ForkServerContext or no context - a lambda with
// captures, a generic lambda or a member function (use ForkContext).  Where
// the type cannot tell (a std::function; a Context chosen at run time),
// start() checks.
//
// The context is the optional first constructor argument,
//     mp::Process p(mp::ForkServerContext{}, work, 21);
//     mp::Process q(mp::get_context("fork"), work, 21);
// rather than a factory member such as ctx.Process(...): a constructor keeps
// class template argument deduction, and one Process type serves every context.
//
// Lifetime: destroying a started Process that has not finished waits for the
// child, as std::jthread waits for its thread; a daemon child is terminated
// (SIGTERM) first.  Children never outlive their parent: each one is killed
// when its parent dies, even by SIGKILL; at normal exit the parent terminates
// its daemon children and waits for the others (as Python does).
//
// Linux is the implemented platform; the system calls live in detail/os.hpp.

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- begin part: mpservice/public/futures.hpp -------------------------------
// futures: what Process and Thread have in common - a result that arrives
// once - and wait() / as_completed() over any mix of them.
//
//     mp::Process p1(work, 2), p2(work, 3);
//     mp::Thread t1(work, 4);
//     p1.start(); p2.start(); t1.start();
//     auto [done, not_done] = mp::wait({&p1, &p2, &t1}, 2.5s, mp::FIRST_COMPLETED);
//     for (mp::Worker* w : mp::as_completed({&p1, &p2, &t1})) std::cout << w->name() << " finished\n";
//
// Workers are passed by address (as Worker*), so Process<R> and Thread<R> of
// different R mix freely in one braced list; the results are the same pointers
// (as_completed also gives each one's position in the list).  Over a range of
// one type - std::vector<mp::Process<int>>, say - wait() gives Process<int>*
// and as_completed() yields Process<int>&, so result() needs no cast:
//     for (mp::Process<int>& p : mp::as_completed(procs)) sum += p.result();

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <atomic>
#include <exception>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace mpservice {

/// When wait() returns (as concurrent.futures).
enum class ReturnWhen {
    all_completed,    ///< every worker has finished (or the timeout expired)
    first_completed,  ///< any worker has finished, with a value or an exception
    first_exception,  ///< any worker has failed; like all_completed if none does
};
inline constexpr ReturnWhen ALL_COMPLETED = ReturnWhen::all_completed;
inline constexpr ReturnWhen FIRST_COMPLETED = ReturnWhen::first_completed;
inline constexpr ReturnWhen FIRST_EXCEPTION = ReturnWhen::first_exception;

namespace detail {

class CompletionQueue;

/// A move-only type-erased `void()` callable (std::function needs copyable ones).
class Task {
public:
    virtual ~Task() = default;
    virtual void run() = 0;
};
template <class L>
class TaskOf final : public Task {
public:
    explicit TaskOf(L&& l) : l_(std::move(l)) {}
    void run() override { l_(); }

private:
    L l_;
};
template <class L>
Owned<Task> make_task(L&& l) {
    return Owned<Task>(new TaskOf<std::decay_t<L>>(std::forward<L>(l)));
}

/// The shared completion state of one worker: started, then resolved exactly
/// once with an outcome.  Waiters block on it; wait()/as_completed() subscribe.
class FutureCore {
public:
    MPSERVICE_API FutureCore();  // out of line, as the destructor: Listeners is the implementation's
    FutureCore(const FutureCore&) = delete;
    FutureCore& operator=(const FutureCore&) = delete;
    MPSERVICE_API virtual ~FutureCore();

    MPSERVICE_API void mark_started();
    MPSERVICE_API bool started() const;
    MPSERVICE_API bool done() const;
    /// Resolves the future (only the first call counts).  `error` is what
    /// join() and result() throw and exception() returns; `result_error` is
    /// thrown by result() alone, when the worker ended cleanly but left no value
    /// (terminated by SIGTERM, exit(0) before returning).
    MPSERVICE_API void resolve(std::exception_ptr error, std::exception_ptr result_error = nullptr);
    /// Blocks until resolved or `deadline`; true if resolved.
    MPSERVICE_API virtual bool wait_until(os::Deadline deadline) const;
    /// done() without taking the lock (for brief spins).
    bool done_relaxed() const noexcept { return done_flag_.load(std::memory_order_acquire); }
    /// Outcome, valid once done().
    MPSERVICE_API std::exception_ptr error() const;
    MPSERVICE_API std::exception_ptr result_error() const;
    /// Pushes this core onto `q` when it resolves (at once if it already has).
    MPSERVICE_API void subscribe(const std::shared_ptr<CompletionQueue>& q);
    /// Runs `hook` once when this core resolves, in the resolving thread and
    /// outside the core's lock (at once, here, if it already has).  The pool
    /// uses it to hear of a worker's death without a thread per worker.
    MPSERVICE_API void on_resolve(Owned<Task> hook);

    std::string name;

protected:
    mutable std::mutex mutex_;
    mutable std::condition_variable cv_;

private:
    bool started_ = false;
    bool done_ = false;
    std::atomic<bool> done_flag_{false};
    std::exception_ptr error_;
    std::exception_ptr result_error_;
    /// Who hears of the resolution (wait/as_completed queues, on_resolve
    /// hooks): made on the first subscription, so a worker that no one waits
    /// on this way allocates nothing for it.  Defined in the implementation.
    struct Listeners;
    Owned<Listeners> listeners_;
};

}  // namespace detail

/// The common base of Process<R> and Thread<R>: what wait() and as_completed()
/// need.  Not copyable; the derived classes are movable.
class Worker {
public:
    Worker(const Worker&) = delete;
    Worker& operator=(const Worker&) = delete;
    virtual ~Worker() = default;

    /// True once the worker has finished - with a value, an exception or an exit.
    bool done() const { return core_->done(); }
    /// The worker's name ("Process-1", "Thread-2", or the one given).
    const std::string& name() const { return core_->name; }
    /// The completion state (for wait/as_completed).
    const detail::FutureCore& core() const noexcept { return *core_; }

protected:
    explicit Worker(detail::Shared<detail::FutureCore> core) : core_(std::move(core)) {}
    Worker(Worker&&) noexcept = default;
    Worker& operator=(Worker&&) noexcept = default;
    detail::Shared<detail::FutureCore> core_;
};

using WorkerList = std::vector<Worker*>;

namespace detail {
/// What result() returns: a reference to the kept value, or nothing.
template <class R>
struct result_ref {
    using type = const R&;
};
template <class R>
struct result_ref<R&> {  // a Thread whose target returns a reference (as std::async)
    using type = R&;
};
template <>
struct result_ref<void> {
    using type = void;
};
template <class R>
using result_ref_t = typename result_ref<R>::type;

/// InvalidStateError: `what` (join, result, ...) on a worker that was never started.
[[noreturn]] MPSERVICE_API void throw_not_started(const std::string& what, const std::string& name);
/// TimeoutError for result()/exception() of a worker still running.
[[noreturn]] MPSERVICE_API void throw_timeout(const std::string& name);
/// InvalidStateError: result() after take_result() moved the value out.
[[noreturn]] MPSERVICE_API void throw_result_taken(const std::string& name);
MPSERVICE_API std::pair<WorkerList, WorkerList> wait_until(const WorkerList& workers, os::Deadline deadline,
                                                           ReturnWhen return_when);
/// wait_until's answer in one list, the done workers first (`done_count` of
/// them), each part in the order given: the typed waits' form (a pair of
/// WorkerLists in a template would be instantiated in every includer).
MPSERVICE_API WorkerList wait_until_split(const WorkerList& workers, os::Deadline deadline, ReturnWhen return_when,
                                          std::size_t& done_count);
}

/// Waits for started workers (any mix of Process and Thread) and returns the
/// pair (done, not_done), each in the order given.  A worker that was never
/// started is an InvalidStateError.  Without a timeout, waits as `return_when`
/// says; with one, returns the split at the deadline (no error).
/// Over a range of one worker type (see the typed overloads below) the lists
/// hold that type, so result() needs no cast.
MPSERVICE_API std::pair<WorkerList, WorkerList> wait(const WorkerList& workers, ReturnWhen return_when = ALL_COMPLETED);
/// (The same std::pair<WorkerList, WorkerList>, spelled through the call so
/// that only a caller instantiates it.)
template <class Rep, class Period>
auto wait(const WorkerList& workers, std::chrono::duration<Rep, Period> timeout, ReturnWhen return_when = ALL_COMPLETED)
    -> decltype(detail::wait_until(workers, detail::os::deadline_after(timeout), return_when)) {
    return detail::wait_until(workers, detail::os::deadline_after(timeout), return_when);
}

/// One finished worker from as_completed over a list: the worker and its
/// position in the list, so the caller can reach its own typed object
/// (`results[c.index] = std::get<...>(...)`) without a cast.  Converts to Worker*.
struct Completed {
    Worker* worker = nullptr;
    std::size_t index = 0;
    operator Worker*() const noexcept { return worker; }
    Worker* operator->() const noexcept { return worker; }
};

/// Yields started workers in the order they finish:
///     for (mp::Worker* w : mp::as_completed({&p1, &t1}, 5s)) ...
///     for (mp::Completed c : mp::as_completed({&p1, &t1})) ... c.index ...
/// Advancing past the deadline throws TimeoutError.  Single pass.  A worker
/// listed twice is yielded once, with its first position.
class AsCompleted {
public:
    class iterator {
    public:
        using value_type = Completed;
        using reference = Completed;
        using difference_type = std::ptrdiff_t;
        using iterator_category = std::input_iterator_tag;
        Completed operator*() const noexcept { return current_; }
        iterator& operator++() {
            current_ = owner_->next_completed();
            return *this;
        }
        bool operator==(const iterator& o) const noexcept { return current_.worker == o.current_.worker; }
        bool operator!=(const iterator& o) const noexcept { return current_.worker != o.current_.worker; }

    private:
        friend class AsCompleted;
        iterator(AsCompleted* owner, Completed current) : owner_(owner), current_(current) {}
        AsCompleted* owner_;
        Completed current_;
    };

    /// Waits for the next worker to finish; nullptr once all have been yielded.
    Worker* next() { return next_completed().worker; }
    /// As next(), with the worker's position in the list (worker null at the end).
    MPSERVICE_API Completed next_completed();
    iterator begin() { return iterator(this, next_completed()); }
    iterator end() { return iterator(this, Completed{}); }

    /// Starts watching `workers` (every one must be started) until `deadline`.
    MPSERVICE_API AsCompleted(const WorkerList& workers, detail::os::Deadline deadline);
    MPSERVICE_API ~AsCompleted();
    AsCompleted(AsCompleted&&) noexcept = default;
    MPSERVICE_API AsCompleted& operator=(AsCompleted&&) noexcept;

private:
    struct State;  // the queue the workers report to, the list, the ones pending (the implementation's)
    detail::Owned<State> state_;
};

/// Workers in the order they finish (see AsCompleted); no time limit.
MPSERVICE_API AsCompleted as_completed(const WorkerList& workers);
/// Workers in the order they finish; TimeoutError if they have not all
/// finished `timeout` after this call.
template <class Rep, class Period>
AsCompleted as_completed(const WorkerList& workers, std::chrono::duration<Rep, Period> timeout) {
    return AsCompleted(workers, detail::os::deadline_after(timeout));
}

// ---- typed waits: over a range of one worker type (a std::vector<Process<int>>,
// an array of Thread<std::string>*, ...) the answers keep that type.

namespace detail {
template <class E>
struct worker_of_element {
    using type = void;
};
template <class E>
struct worker_of_element<E*> {
    using type = E;
};
template <class E>
using element_worker_t = std::conditional_t<std::is_base_of_v<Worker, E>, E, typename worker_of_element<E>::type>;
/// The worker type of a range whose elements are workers (or pointers to
/// them) of one type other than plain Worker (a WorkerList keeps the old form).
template <class Range>
using range_worker_t = element_worker_t<std::remove_reference_t<decltype(*std::begin(std::declval<Range&>()))>>;
template <class Range, class = void>
struct is_typed_worker_range : std::false_type {};
template <class Range>
struct is_typed_worker_range<Range, std::void_t<range_worker_t<Range>>>
    : std::bool_constant<std::is_base_of_v<Worker, range_worker_t<Range>> &&
                         !std::is_same_v<range_worker_t<Range>, Worker> &&
                         !std::is_const_v<range_worker_t<Range>>> {};

template <class W, class E>
W* worker_address(E& e) {
    if constexpr (std::is_pointer_v<E>) return e;
    else return &e;
}

template <class Range>
std::vector<range_worker_t<Range>*> typed_workers(Range& range) {
    std::vector<range_worker_t<Range>*> out;
    for (auto& e : range) out.push_back(worker_address<range_worker_t<Range>>(e));
    return out;
}

template <class W>
std::pair<std::vector<W*>, std::vector<W*>> typed_wait(const std::vector<W*>& typed, os::Deadline deadline,
                                                       ReturnWhen return_when) {
    WorkerList all(typed.begin(), typed.end());
    std::size_t done_count = 0;
    WorkerList split = wait_until_split(all, deadline, return_when, done_count);
    std::pair<std::vector<W*>, std::vector<W*>> out;
    // Every Worker* here was a W* a moment ago: the downcast is exact.
    for (std::size_t i = 0; i < split.size(); ++i)
        (i < done_count ? out.first : out.second).push_back(static_cast<W*>(split[i]));
    return out;
}
}  // namespace detail

/// as_completed over a range of one worker type: yields W& (a reference to
/// the worker in the range), on which result() works directly:
///     std::vector<mp::Process<int>> ps = ...;
///     for (mp::Process<int>& p : mp::as_completed(ps)) total += p.result();
template <class W>
class TypedAsCompleted {
public:
    class iterator {
    public:
        using value_type = W;
        using reference = W&;
        using difference_type = std::ptrdiff_t;
        using iterator_category = std::input_iterator_tag;
        W& operator*() const noexcept { return *owner_->workers_[current_.index]; }
        W* operator->() const noexcept { return owner_->workers_[current_.index]; }
        iterator& operator++() {
            current_ = owner_->inner_.next_completed();
            return *this;
        }
        bool operator==(const iterator& o) const noexcept { return current_.worker == o.current_.worker; }
        bool operator!=(const iterator& o) const noexcept { return current_.worker != o.current_.worker; }
        /// The position of the current worker in the range.
        std::size_t index() const noexcept { return current_.index; }

    private:
        friend class TypedAsCompleted;
        iterator(TypedAsCompleted* owner, Completed current) : owner_(owner), current_(current) {}
        TypedAsCompleted* owner_;
        Completed current_;
    };

    TypedAsCompleted(std::vector<W*> workers, detail::os::Deadline deadline)
        : workers_(std::move(workers)), inner_(WorkerList(workers_.begin(), workers_.end()), deadline) {}
    /// The next worker to finish, or nullptr once all have been yielded.
    W* next() {
        Completed c = inner_.next_completed();
        return c.worker ? workers_[c.index] : nullptr;
    }
    iterator begin() { return iterator(this, inner_.next_completed()); }
    iterator end() { return iterator(this, Completed{}); }

private:
    std::vector<W*> workers_;
    AsCompleted inner_;
};

template <class Range, std::enable_if_t<detail::is_typed_worker_range<Range>::value, int> = 0>
TypedAsCompleted<detail::range_worker_t<Range>> as_completed(Range& workers) {
    return {detail::typed_workers(workers), detail::os::no_deadline};
}
template <class Range, class Rep, class Period,
          std::enable_if_t<detail::is_typed_worker_range<Range>::value, int> = 0>
TypedAsCompleted<detail::range_worker_t<Range>> as_completed(Range& workers,
                                                             std::chrono::duration<Rep, Period> timeout) {
    return {detail::typed_workers(workers), detail::os::deadline_after(timeout)};
}

/// wait over a range of one worker type: (done, not_done) as W*, in range order.
template <class Range, std::enable_if_t<detail::is_typed_worker_range<Range>::value, int> = 0>
std::pair<std::vector<detail::range_worker_t<Range>*>, std::vector<detail::range_worker_t<Range>*>> wait(
    Range& workers, ReturnWhen return_when = ALL_COMPLETED) {
    return detail::typed_wait(detail::typed_workers(workers), detail::os::no_deadline, return_when);
}
template <class Range, class Rep, class Period,
          std::enable_if_t<detail::is_typed_worker_range<Range>::value, int> = 0>
std::pair<std::vector<detail::range_worker_t<Range>*>, std::vector<detail::range_worker_t<Range>*>> wait(
    Range& workers, std::chrono::duration<Rep, Period> timeout, ReturnWhen return_when = ALL_COMPLETED) {
    return detail::typed_wait(detail::typed_workers(workers), detail::os::deadline_after(timeout), return_when);
}

}  // namespace mpservice
// ---- end part: mpservice/public/futures.hpp

namespace mpservice {

/// Call as the first line of main().  In a child process started by this
/// library it runs the child's task and never returns (the process exits with
/// the task's exit code).  In any other process it returns at once, after
/// starting the fork server (a clean copy of the program, made before any
/// thread exists, that the fork-server context forks workers from).
MPSERVICE_API void init(int argc, char** argv);

/// How a child process is made.
enum class StartMethod {
    spawn,       ///< a fresh exec of this program: no inherited threads, locks or heap state (default)
    fork,        ///< fork(): fastest, runs any callable, but unsafe once the parent has threads;
                 ///< the child starts with default signal handlers, like the other contexts' children
    forkserver,  ///< fork() of a server forked at init(), before any thread existed
};

/// A start method; pass one as the first argument of Process.
class Context {
public:
    constexpr explicit Context(StartMethod method) noexcept : method_(method) {}
    constexpr StartMethod start_method() const noexcept { return method_; }
    /// "spawn", "fork" or "forkserver".
    MPSERVICE_API const char* name() const noexcept;

private:
    StartMethod method_;
};
class SpawnContext : public Context {
public:
    constexpr SpawnContext() noexcept : Context(StartMethod::spawn) {}
};
class ForkContext : public Context {
public:
    constexpr ForkContext() noexcept : Context(StartMethod::fork) {}
};
class ForkServerContext : public Context {
public:
    constexpr ForkServerContext() noexcept : Context(StartMethod::forkserver) {}
};

/// The default context (as the seed's MP_SPAWN_CTX).
inline constexpr SpawnContext MP_SPAWN_CTX{};

/// The context for "spawn", "fork" or "forkserver"; for "" (no argument) the
/// default context, as Python's get_context(None) (see set_start_method);
/// std::invalid_argument for any other name.
MPSERVICE_API const Context& get_context(const std::string& method = "");

/// Chooses the process-wide default start method ("spawn", "fork" or
/// "forkserver"), as Python's multiprocessing.set_start_method: a Process made
/// without a context - and the Pool and server process - use it.  The default
/// is fixed once: by the first call, or by its first use (a Process without a
/// context, default_context(), get_start_method()).  Setting it again without
/// `force` is an InvalidStateError, as Python's RuntimeError; `force = true`
/// replaces it, and ("", true) makes it unchosen again (Python: None, force=True).  Children inherit it.  std::invalid_argument for an unknown name.
/// A target only the fork context can run (a lambda with captures, ...) is
/// still refused at compile time by a Process without a context - name
/// mp::ForkContext{}, or pass default_context() to check at start() instead.
MPSERVICE_API void set_start_method(const std::string& method, bool force = false);
/// The default start method's name, fixing it to "spawn" if none was chosen;
/// with `allow_none`, "" when none was chosen yet (and nothing is fixed).
MPSERVICE_API std::string get_start_method(bool allow_none = false);
/// Every start method this platform has: {"spawn", "fork", "forkserver"}.
MPSERVICE_API std::vector<std::string> get_all_start_methods();
/// The context of the default start method (fixing it, see set_start_method).
MPSERVICE_API const Context& default_context();

/// CPUs this process may use: the affinity mask, lowered by a cgroup CPU
/// quota (rounded up); at least 1.
MPSERVICE_API int cpu_count();

/// The default of Process::set_forward_output for Process objects made from
/// now on (initially false: a child writes to the parent's own standard output
/// and error directly, as a plain fork/exec does).
MPSERVICE_API void set_output_forwarding(bool forward) noexcept;
MPSERVICE_API bool output_forwarding() noexcept;

/// Warm spawn (off by default): the default of Process::set_warm_start for
/// Process objects made from now on.  A spawn start that is warm takes a
/// child exec'd ahead of demand - bootstrapped and waiting for a task - and
/// has the next one made at once, so the exec is paid before the start rather
/// than in it.  The child is used only if the working directory and the
/// environment are still those it was made with (else the start spawns
/// afresh); it dies with this process, even by SIGKILL.  false also discards
/// the waiting child.  Costs nothing until a warm start happens; from then on
/// one idle child process (and a thread that makes them) exist.
MPSERVICE_API void set_warm_spawn(bool keep_warm);
MPSERVICE_API bool warm_spawn() noexcept;

/// A process as current_process() and friends describe it.
struct ProcessInfo {
    std::string name;  ///< "MainProcess", or the Process's name in a child
    long pid = 0;
};
/// This process (name and pid).
MPSERVICE_API ProcessInfo current_process();
/// The process that started this one; empty in the main process.
MPSERVICE_API std::optional<ProcessInfo> parent_process();
/// Children started by this process that have not finished yet.
MPSERVICE_API std::vector<ProcessInfo> active_children();

namespace detail {

/// Runs in the child: decodes the arguments, calls the target, encodes the
/// result; `keep` holds the result until it has been sent.
using Trampoline = void (*)(const void* target, Decoder& args, Encoder& result, std::shared_ptr<void>& keep);

/// Writes the value `call()` returns into `out` and keeps it alive in `keep`:
/// a shared object (Lock, Queue, ...) attaches its OS handle, which stays open
/// only as long as the object does, and the message leaves after the target
/// has returned - a temporary would close the handle before it is sent.
template <class Call>
void write_kept(Encoder& out, std::shared_ptr<void>& keep, Call&& call) {
    using V = decltype(call());
    if constexpr (std::is_lvalue_reference_v<V>) {
        out.write(call());  // the referent outlives the call
    } else {
        auto held = std::make_shared<std::decay_t<V>>(call());
        out.write(*held);
        keep = std::move(held);
    }
}

/// What the child stores and receives: the parameter type without cv-ref
/// qualifiers (a `const std::string&` parameter travels as a std::string).
template <class P>
using stored_t = std::remove_cv_t<std::remove_reference_t<P>>;

template <class R, class Fn, class... S>
void trampoline(const void* target, Decoder& in, Encoder& out, std::shared_ptr<void>& keep) {
    Fn fn = reinterpret_cast<Fn>(reinterpret_cast<std::uintptr_t>(target));
    std::tuple<S...> args{in.read<S>()...};  // braced: decoded left to right
    in.expect_end("process arguments");
    if constexpr (std::is_void_v<R>) {
        std::apply(fn, std::move(args));
        (void)out;
        (void)keep;
    } else {
        write_kept(out, keep, [&]() -> R { return static_cast<R>(std::apply(fn, std::move(args))); });
    }
}

// ---- what the type of a callable tells about it

template <class... T>
struct type_list {};

/// The signature of a callable whose type shows it: a function pointer, or a
/// class with exactly one, non-template operator() (a lambda with concrete
/// parameter types, a std::function, a function object).
template <class F, class = void>
struct signature_of {
    static constexpr bool known = false;
};
template <class R, class... P>
struct signature_is {
    static constexpr bool known = true;
    static constexpr std::size_t arity = sizeof...(P);
    using result = R;
    using params = type_list<P...>;
    using pointer = R (*)(P...);
};
template <class R, class... P>
struct signature_of<R (*)(P...)> : signature_is<R, P...> {};
template <class R, class... P>
struct signature_of<R (*)(P...) noexcept> : signature_is<R, P...> {};

template <class M>
struct call_operator_signature {
    static constexpr bool known = false;
};
#define MPSERVICE_CALL_OPERATOR_SIGNATURE(QUALIFIERS)                              \
    template <class C, class R, class... P>                                        \
    struct call_operator_signature<R (C::*)(P...) QUALIFIERS> : signature_is<R, P...> {}; \
    template <class C, class R, class... P>                                        \
    struct call_operator_signature<R (C::*)(P...) QUALIFIERS noexcept> : signature_is<R, P...> {};
MPSERVICE_CALL_OPERATOR_SIGNATURE()
MPSERVICE_CALL_OPERATOR_SIGNATURE(const)
MPSERVICE_CALL_OPERATOR_SIGNATURE(&)
MPSERVICE_CALL_OPERATOR_SIGNATURE(const&)
MPSERVICE_CALL_OPERATOR_SIGNATURE(&&)
MPSERVICE_CALL_OPERATOR_SIGNATURE(const&&)
#undef MPSERVICE_CALL_OPERATOR_SIGNATURE
template <class F>
struct signature_of<F, std::enable_if_t<std::is_class_v<F>, std::void_t<decltype(&F::operator())>>>
    : call_operator_signature<decltype(&F::operator())> {};

template <class F>
struct is_std_function : std::false_type {};
template <class Sig>
struct is_std_function<std::function<Sig>> : std::true_type {};

/// The plain function pointer behind a callable, when its type guarantees one:
/// a function pointer, a static member function or a capture-less lambda.
template <class F, class = void>
struct function_pointer_of {
    static constexpr bool value = false;
};
template <class F>
struct function_pointer_of<F, std::enable_if_t<std::is_pointer_v<F> && std::is_function_v<std::remove_pointer_t<F>>>> {
    static constexpr bool value = true;
    static F get(F f) { return f; }
};
template <class F>
struct function_pointer_of<
    F, std::enable_if_t<std::is_class_v<F> && std::is_pointer_v<decltype(+std::declval<F&>())> &&
                        std::is_function_v<std::remove_pointer_t<decltype(+std::declval<F&>())>>>> {
    static constexpr bool value = true;
    static auto get(F& f) { return +f; }
};

/// How a callable can reach a spawned or fork-server child.
enum class TargetKind {
    plain,          ///< a function's address: runs under every context
    maybe_plain,    ///< a std::function: only its content, at run time, tells
    stateful,       ///< a lambda with captures or a function object: fork only
    generic,        ///< a generic lambda or overloaded function object: fork only
    member,         ///< a pointer to member (needs its object): fork only
};
template <class F>
constexpr TargetKind target_kind() {
    if constexpr (function_pointer_of<F>::value) return TargetKind::plain;
    else if constexpr (is_std_function<F>::value) return TargetKind::maybe_plain;
    else if constexpr (std::is_member_pointer_v<F>) return TargetKind::member;
    else if constexpr (signature_of<F>::known) return TargetKind::stateful;
    else return TargetKind::generic;
}

/// Which contexts a Process constructor may use, as far as its type shows.
enum class ContextCheck {
    spawn,     ///< SpawnContext, ForkServerContext, or none (the default is chosen at run time)
    fork,      ///< ForkContext: any callable
    run_time,  ///< a Context& of unknown kind: start() checks
};

/// The one problem (if any) of running F with arguments A under `check`;
/// Process reports it with one static_assert.
enum class TargetProblem {
    none,
    needs_fork_stateful,
    needs_fork_generic,
    needs_fork_member,
    wrong_arity,
    mutable_reference_parameter,
    not_convertible,
    not_invocable,
    returns_reference,
    result_not_convertible,
};

template <class P>
constexpr bool is_mutable_lvalue_ref_v =
    std::is_lvalue_reference_v<P> && !std::is_const_v<std::remove_reference_t<P>>;

template <class Params, class... A>
struct params_check;
template <class... P, class... A>
struct params_check<type_list<P...>, A...> {
    static constexpr bool any_mutable_ref = (is_mutable_lvalue_ref_v<P> || ...);
    static constexpr bool all_convert() {
        if constexpr (sizeof...(P) != sizeof...(A)) return false;
        else return (std::is_convertible_v<A&&, stored_t<P>> && ...);
    }
};

/// Whether the target has a parameter list of its own (not a pointer to member).
template <class F>
constexpr bool has_own_signature_v = signature_of<F>::known && !std::is_member_pointer_v<F>;

template <class R, class F, ContextCheck check, class... A>
constexpr TargetProblem target_problem() {
    constexpr TargetKind kind = target_kind<F>();
    if constexpr (check == ContextCheck::spawn && kind == TargetKind::stateful) return TargetProblem::needs_fork_stateful;
    else if constexpr (check == ContextCheck::spawn && kind == TargetKind::generic) return TargetProblem::needs_fork_generic;
    else if constexpr (check == ContextCheck::spawn && kind == TargetKind::member) return TargetProblem::needs_fork_member;
    else if constexpr (has_own_signature_v<F>) {
        using sig = signature_of<F>;
        using pc = params_check<typename sig::params, A...>;
        if constexpr (sig::arity != sizeof...(A)) return TargetProblem::wrong_arity;
        else if constexpr (pc::any_mutable_ref) return TargetProblem::mutable_reference_parameter;
        else if constexpr (!pc::all_convert()) return TargetProblem::not_convertible;
        else if constexpr (std::is_reference_v<typename sig::result>) return TargetProblem::returns_reference;
        else if constexpr (!std::is_void_v<R> && !std::is_convertible_v<typename sig::result, R>)
            return TargetProblem::result_not_convertible;
        else return TargetProblem::none;
    } else if constexpr (!std::is_invocable_v<F&, std::decay_t<A>...>) {
        return TargetProblem::not_invocable;
    } else {
        using result = std::invoke_result_t<F&, std::decay_t<A>...>;
        if constexpr (std::is_reference_v<result>) return TargetProblem::returns_reference;
        else if constexpr (!std::is_void_v<R> && !std::is_convertible_v<result, R>)
            return TargetProblem::result_not_convertible;
        else return TargetProblem::none;
    }
}

/// Stands for the result of a call that cannot be made, so that class template
/// argument deduction succeeds and the constructor's static_assert explains.
struct uncallable_target {};

template <class F, class... A>
auto deduced_result() {
    if constexpr (has_own_signature_v<F>) return type_list<stored_t<typename signature_of<F>::result>>{};
    else if constexpr (std::is_invocable_v<F&, std::decay_t<A>...>)
        return type_list<stored_t<std::invoke_result_t<F&, std::decay_t<A>...>>>{};
    else return type_list<uncallable_target>{};
}
template <class L>
struct first_of;
template <class T>
struct first_of<type_list<T>> {
    using type = T;
};

template <class F, class... A>
struct process_result_impl {
    using type = typename first_of<decltype(deduced_result<F, A...>())>::type;
};
// No `type` for a Context or a worker in first place: those are other constructors.
template <class F, class... A>
using process_result_t = typename std::enable_if_t<
    !std::is_base_of_v<mpservice::Context, std::decay_t<F>> && !std::is_base_of_v<Worker, std::decay_t<F>>,
    process_result_impl<std::decay_t<F>, A...>>::type;

/// What a child runs: the target as an address plus trampoline (spawn,
/// fork-server) and, for fork, the callable itself.
class ChildTask {
public:
    virtual ~ChildTask() = default;
    const void* target = nullptr;  ///< null: the callable has no plain-function form
    Trampoline trampoline = nullptr;
    /// Writes the arguments (only when target is set).
    virtual void encode_args(Encoder& out) const = 0;
    /// Calls the target here (in a forked child) and writes its result, which
    /// `keep` holds until it has been sent.
    virtual void run_here(Encoder& result, std::shared_ptr<void>& keep) = 0;
};

template <class Fp>
const void* address_of_function(Fp fp) {
    return reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(fp));
}

/// F called with stored arguments S (the target's parameter types, or the
/// decayed arguments when the target's type does not show its parameters).
template <class R, class F, class... S>
class ChildTaskOf final : public ChildTask {
public:
    template <class FF, class... AA>
    explicit ChildTaskOf(FF&& f, AA&&... args) : f_(std::forward<FF>(f)), args_(std::forward<AA>(args)...) {
        if constexpr (function_pointer_of<F>::value) {
            auto fp = function_pointer_of<F>::get(f_);
            target = address_of_function(fp);
            trampoline = &detail::trampoline<R, decltype(fp), S...>;
        } else if constexpr (is_std_function<F>::value) {
            // Only its content tells: a plain function inside runs anywhere.
            using Fp = typename signature_of<F>::pointer;
            if (const Fp* fp = f_.template target<Fp>()) {
                target = address_of_function(*fp);
                trampoline = &detail::trampoline<R, Fp, S...>;
            }
        }
    }
    void encode_args(Encoder& out) const override {
        if (target) std::apply([&](const auto&... a) { (out.write(a), ...); }, args_);
    }
    void run_here(Encoder& result, std::shared_ptr<void>& keep) override {
        if constexpr (std::is_void_v<R>) {
            std::apply(f_, std::move(args_));
            (void)result;
            (void)keep;
        } else {
            write_kept(result, keep, [&]() -> R { return static_cast<R>(std::apply(f_, std::move(args_))); });
        }
    }

private:
    F f_;
    std::tuple<S...> args_;
};

template <class R, class F, class Params, class... A>
struct child_task_for;
template <class R, class F, class... P, class... A>
struct child_task_for<R, F, type_list<P...>, A...> {
    using type = ChildTaskOf<R, F, stored_t<P>...>;
};

/// The task of a Process<R> over f(args...), or - after one static_assert
/// that says what is wrong and what to do - nothing.
template <class R, ContextCheck check, class FF, class... A>
Owned<ChildTask> make_child_task(FF&& f, A&&... args) {
    using F = std::decay_t<FF>;
    constexpr TargetProblem problem = target_problem<R, F, check, A...>();
    static_assert(problem != TargetProblem::needs_fork_stateful,
                  "mpservice::Process: this target carries state (a lambda with captures, or a function object). "
                  "A spawned or fork-server child is a fresh program that is sent only a function's address and "
                  "the arguments, so it cannot have that state. Use a free function, a static member function or "
                  "a capture-less lambda and pass the state as arguments - or run it in a forked copy of this "
                  "process: mp::Process p(mp::ForkContext{}, f, args...). (A Process without a context is checked "
                  "as spawn, because the default start method is chosen at run time.)");
    static_assert(problem != TargetProblem::needs_fork_generic,
                  "mpservice::Process: this target is a generic lambda or an overloaded function object, so it is "
                  "not one function the child could be told to run. Give its parameters concrete types (a "
                  "capture-less lambda, a free or static member function) - or run it in a forked copy of this "
                  "process: mp::Process p(mp::ForkContext{}, f, args...). (A Process without a context is checked "
                  "as spawn, because the default start method is chosen at run time.)");
    static_assert(problem != TargetProblem::needs_fork_member,
                  "mpservice::Process: a member function needs its object, which lives in this process; a spawned "
                  "or fork-server child cannot call it. Use a free or static member function that takes the "
                  "object's data as arguments - or run it in a forked copy of this process: "
                  "mp::Process p(mp::ForkContext{}, &T::method, object, args...). (A Process without a context is "
                  "checked as spawn, because the default start method is chosen at run time.)");
    static_assert(problem != TargetProblem::wrong_arity,
                  "mpservice::Process: the number of arguments does not match the target's parameters (default "
                  "arguments do not count: a function pointer has none).");
    static_assert(problem != TargetProblem::mutable_reference_parameter,
                  "mpservice::Process: the target has a non-const lvalue reference parameter (T&). The child "
                  "works on its own copy of the argument, in another process: it cannot write into the parent's "
                  "object. Return the value instead (the parent reads it with result()), or pass a shared "
                  "mp::Value<T> / mp::Array<T> (by value: both processes then see the same memory).");
    static_assert(problem != TargetProblem::not_convertible,
                  "mpservice::Process: an argument does not convert to the target's parameter type. Arguments "
                  "are converted to the parameter types when the Process is made (as std::thread converts them "
                  "at the call), and that copy is what the child receives.");
    static_assert(problem != TargetProblem::not_invocable,
                  "mpservice::Process: the target cannot be called with copies of these arguments, passed as "
                  "rvalues (as std::thread passes them).");
    static_assert(problem != TargetProblem::returns_reference,
                  "mpservice::Process: the target returns a reference. A reference into the child's memory means "
                  "nothing in the parent: return the value (it is sent back; result() gives it), or write into a "
                  "shared mp::Value<T> / mp::Array<T>.");
    static_assert(problem != TargetProblem::result_not_convertible,
                  "mpservice::Process<R>: the target's return type does not convert to R.");
    if constexpr (problem != TargetProblem::none) {
        return Owned<ChildTask>();
    } else if constexpr (has_own_signature_v<F>) {
        using Task = typename child_task_for<R, F, typename signature_of<F>::params, A...>::type;
        return Owned<ChildTask>(new Task(std::forward<FF>(f), std::forward<A>(args)...));
    } else {
        return Owned<ChildTask>(
            new ChildTaskOf<R, F, std::decay_t<A>...>(std::forward<FF>(f), std::forward<A>(args)...));
    }
}

/// The non-template part of a Process: the child, its channel and its outcome.
class ProcessCore : public FutureCore, public std::enable_shared_from_this<ProcessCore> {
public:
    MPSERVICE_API explicit ProcessCore(const Context& ctx);
    MPSERVICE_API ~ProcessCore() override;

    /// Starts the child; takes `task` only if it succeeds (a failed start can be retried).
    MPSERVICE_API void start(Owned<ChildTask>& task);
    /// Also watches the child's exit itself, so the waiting thread wakes with
    /// the reactor rather than after it (one cross-CPU wake-up less).
    MPSERVICE_API bool wait_until(os::Deadline deadline) const override;
    MPSERVICE_API long pid() const;
    MPSERVICE_API std::optional<int> exitcode() const;
    MPSERVICE_API bool is_alive() const;
    MPSERVICE_API void send_signal(int sig);
    /// What ~Process does: wait, after terminating a daemon.
    MPSERVICE_API void release() noexcept;
    MPSERVICE_API void set_daemon(bool daemon);
    bool daemon() const { return daemon_; }

    /// The encoded value and the handles that came with it (after done()).
    MPSERVICE_API bool has_value() const;
    const std::string& value_bytes() const { return value_bytes_; }
    const std::vector<os::handle_t>& value_handles() const { return value_handles_; }
    /// The decoded value, cached by Process<R>::result.
    std::mutex value_mutex;
    std::shared_ptr<void> decoded;
    bool value_taken = false;  ///< take_result() moved the value out

    /// The lock of this core's state (the implementation's reactor uses it).
    std::mutex& io_mutex() const { return mutex_; }

    // ---- the rest is the implementation's (parent-side bookkeeping, reactor state)
    struct Io;
    StartMethod method_;
    bool daemon_ = false;
    long pid_ = 0;
    int exitcode_ = 0;
    bool exited_ = false;  // exitcode_ is known (a std::optional<int> here would cost every includer its instantiation)
    bool has_value_ = false;
    std::string value_bytes_;
    std::vector<os::handle_t> value_handles_;
    std::string identity_;  // "3", or "1:3" in a child: numbers the default name
    bool forward_output_ = output_forwarding();  // Process::set_forward_output
    bool warm_start_ = warm_spawn();              // Process::set_warm_start
    Owned<Io> io_;
};

/// Test hook: the next spawn/fork-server child is told a wrong build
/// fingerprint, as if the parent ran a different build.
MPSERVICE_API void test_corrupt_next_fingerprint() noexcept;
/// Test hook: pretend init() was (not) called.
MPSERVICE_API void test_set_initialized(bool initialized) noexcept;
/// Test hooks: the fork server's pid (0 if there is none), and how long
/// start() waits for it to make a worker before giving up on it (default 30 s).
MPSERVICE_API long test_fork_server_pid() noexcept;
MPSERVICE_API void test_set_fork_server_timeout(std::chrono::milliseconds timeout) noexcept;
/// Test hook: returns once the reactor thread has finished handling every
/// event it was handling when called.  A joined child's core (its pidfd) is
/// released by the reactor just after it resolves the child; descriptor
/// counts taken after this call are exact.
MPSERVICE_API void test_reactor_barrier();
/// Test hook: the address-space holders of ended warm children that the
/// reactor has not reaped yet (each ends just after its child, when it gets
/// a CPU: it runs at idle priority).
MPSERVICE_API int test_unreaped_holders() noexcept;
/// Test hook: the pid of the warm spawn child once it is ready (bootstrapped,
/// waiting for a task), waiting at most `timeout`; 0 if there is none by then.
MPSERVICE_API long test_warm_child(std::chrono::milliseconds timeout);
/// Discards the waiting warm spawn child, unless set_warm_spawn(true) keeps
/// one for the whole program: a Pool whose replacement workers took warm
/// starts calls it when it ends, so that no idle child outlives the pool.
MPSERVICE_API void discard_unwanted_warm_child() noexcept;

/// The phases of a start that bench/bench_process.cpp times (see
/// bench/PERFORMANCE-process.md).  Child phases are recorded by forked
/// children only (they share the parent's slots); an exec'd child cannot.
enum class StartPhase : int {
    start_entered,    ///< parent: ProcessCore::start begins
    child_made,       ///< parent: fork()/spawn returned the child
    start_returned,   ///< parent: start() returns
    child_running,    ///< child: first instruction after fork()
    task_begins,      ///< child: bootstrap done, the target is called
    outcome_sent,     ///< child: VALUE/EXCEPTION and END written
    child_exiting,    ///< child: about to _exit
    reactor_outcome,  ///< parent's reactor: END read
    reactor_exit,     ///< parent's reactor: the child's exit seen (pidfd)
    resolved,         ///< parent's reactor: the Process resolved
    waiter_woke,      ///< the thread in result()/join(): its wait on the pidfd returned
    count
};
/// Bench hook: every start from now on writes the steady-clock time (ns) of
/// each StartPhase into slots[phase] (StartPhase::count slots, in memory a
/// forked child shares, e.g. MAP_SHARED); nullptr stops.  One relaxed load per
/// phase when off.
MPSERVICE_API void test_trace_start_phases(std::int64_t* slots) noexcept;

/// What every Process<R> has that does not depend on R and is defined in the
/// implementation: a function of the template returning std::optional<int>
/// would instantiate it in every includer.
class ProcessBase : public Worker {
public:
    /// Empty while running; 0 after success, n after exit(n), 1 after an
    /// exception, -N after signal N.
    MPSERVICE_API std::optional<int> exitcode() const;

protected:
    using Worker::Worker;
};

}  // namespace detail

/// A child process running target(args...) and delivering its result like a
/// future.  See the top of this file for targets, contexts and lifetime.
template <class R>
class Process : public detail::ProcessBase {
    using Core = detail::ProcessCore;

public:
    /// Prepares (does not start) a child in the default context
    /// (default_context(): spawn unless set_start_method chose another).
    /// Arguments are converted to the target's parameter types here, and the
    /// child receives that copy.  Targets that only the fork context can run
    /// are refused at compile time (the default is chosen at run time).
    template <class F, class... A,
              std::enable_if_t<!std::is_base_of_v<Context, std::decay_t<F>> &&
                                   !std::is_base_of_v<Worker, std::decay_t<F>>,
                               int> = 0>
    explicit Process(F&& f, A&&... args)
        : ProcessBase(std::make_shared<Core>(default_context())),
          task_(detail::make_child_task<R, detail::ContextCheck::spawn>(std::forward<F>(f),
                                                                          std::forward<A>(args)...)) {}

    /// Prepares a child made by `ctx`.  With SpawnContext or ForkServerContext
    /// a target that needs the fork context is a compile-time error; with
    /// ForkContext any callable runs; with a Context of run-time kind
    /// (get_context(...), default_context()) start() checks.
    template <class Ctx, class F, class... A, std::enable_if_t<std::is_base_of_v<Context, Ctx>, int> = 0>
    Process(const Ctx& ctx, F&& f, A&&... args)
        : ProcessBase(std::make_shared<Core>(ctx)),
          task_(detail::make_child_task<R, check_for<Ctx>()>(std::forward<F>(f), std::forward<A>(args)...)) {}

    Process(Process&&) noexcept = default;
    Process& operator=(Process&&) = delete;
    /// Waits for a started child (terminating it first if it is a daemon).
    ~Process() override {
        if (core_) state().release();
    }

    /// Starts the child.  InvalidStateError if already started, or if init()
    /// was not called (spawn, fork-server); std::invalid_argument for a
    /// callable with captures outside the fork context.
    void start() { state().start(task_); }

    /// Waits for the child to end and for every log record it sent to be
    /// handled; re-throws the child's exception, or ProcessError if it exited
    /// with a non-zero code or died of a signal - except SIGTERM, which join()
    /// accepts quietly (after terminate(), join() does not throw).
    void join() { join_at(detail::os::no_deadline); }
    /// As join(), but returns quietly if the child is still running after `timeout`.
    template <class Rep, class Period>
    void join(std::chrono::duration<Rep, Period> timeout) {
        join_at(detail::os::deadline_after(timeout));
    }

    /// The target's return value (waits).  Re-throws as join() does; a child
    /// that ended without a value (terminated, exit(0)) is a ProcessError.
    /// The value is decoded once and kept: every call returns the same object.
    detail::result_ref_t<R> result() & { return result_at(detail::os::no_deadline); }
    /// As result(), but TimeoutError if the child is still running after `timeout`.
    template <class Rep, class Period>
    detail::result_ref_t<R> result(std::chrono::duration<Rep, Period> timeout) & {
        return result_at(detail::os::deadline_after(timeout));
    }
    /// std::move(p).result(): the value moved out (see take_result).
    R result() && { return take_result(); }
    template <class Rep, class Period>
    R result(std::chrono::duration<Rep, Period> timeout) && {
        return take_result(timeout);
    }
    /// The target's return value, moved out of this Process rather than
    /// copied (waits; re-throws as result()).  Afterwards result() and
    /// take_result() are an InvalidStateError; join() and exception() still work.
    R take_result() { return take_at(detail::os::no_deadline); }
    template <class Rep, class Period>
    R take_result(std::chrono::duration<Rep, Period> timeout) {
        return take_at(detail::os::deadline_after(timeout));
    }

    /// The exception join() would throw, or nullptr (waits).
    std::exception_ptr exception() { return exception_at(detail::os::no_deadline); }
    /// As exception(), but TimeoutError if the child is still running after `timeout`.
    template <class Rep, class Period>
    std::exception_ptr exception(std::chrono::duration<Rep, Period> timeout) {
        return exception_at(detail::os::deadline_after(timeout));
    }

    /// Started and not yet finished.
    bool is_alive() const { return state().is_alive(); }
    /// Sends SIGTERM (no-op once the child has ended).
    void terminate() { state().send_signal(detail::os::signal_terminate()); }
    /// Sends SIGKILL (no-op once the child has ended).
    void kill() { state().send_signal(detail::os::signal_kill()); }
    /// The child's pid; 0 before start().
    long pid() const { return state().pid(); }
    /// Renames the process (before start); the child sees it as current_process().name.
    void set_name(std::string name) {
        if (state().started()) throw InvalidStateError("mpservice: cannot rename a started process");
        core_->name = std::move(name);
    }
    bool daemon() const { return state().daemon(); }
    /// Marks the child as a daemon (before start): it is terminated, not
    /// waited for, when its Process is destroyed or the parent exits.
    void set_daemon(bool daemon) { state().set_daemon(daemon); }
    /// Sends the child's standard output and error through the parent's log
    /// path (before start): each line becomes a record of logger "stdout"
    /// (Level::info) or "stderr" (Level::warning) tagged with the child's name
    /// and pid, so lines of many children never mix.  Default: output_forwarding()
    /// at the time this Process was made.
    void set_forward_output(bool forward) {
        if (state().started()) throw InvalidStateError("mpservice: set_forward_output() after start()");
        state().forward_output_ = forward;
    }
    bool forward_output() const { return state().forward_output_; }
    /// Under the spawn context (before start): take the child exec'd ahead of
    /// demand if there is a current one, and have the next one made (see
    /// set_warm_spawn, whose value is the default).  Other contexts ignore it.
    void set_warm_start(bool warm) {
        if (state().started()) throw InvalidStateError("mpservice: set_warm_start() after start()");
        state().warm_start_ = warm;
    }
    bool warm_start() const { return state().warm_start_; }

private:
    template <class Ctx>
    static constexpr detail::ContextCheck check_for() {
        if constexpr (std::is_same_v<Ctx, ForkContext>) return detail::ContextCheck::fork;
        else if constexpr (std::is_same_v<Ctx, SpawnContext> || std::is_same_v<Ctx, ForkServerContext>)
            return detail::ContextCheck::spawn;
        else return detail::ContextCheck::run_time;
    }
    Core& state() const { return static_cast<Core&>(*core_); }

    bool wait_at(detail::os::Deadline deadline, const char* what) {
        if (!core_->started()) detail::throw_not_started(what, name());
        return core_->wait_until(deadline);
    }
    void join_at(detail::os::Deadline deadline) {
        if (!wait_at(deadline, "join")) return;
        if (auto e = core_->error()) detail::rethrow_exception(e);
    }
    /// Waits, then throws what result() throws instead of a value.
    void check_value_at(detail::os::Deadline deadline) {
        if (!wait_at(deadline, "result")) detail::throw_timeout(name());
        if (auto e = core_->error()) detail::rethrow_exception(e);
        if constexpr (std::is_void_v<R>) {
            // exit(0) from a void target is a success; a SIGTERM is not.
            if (!state().has_value() && this->exitcode() != 0)  // `this->`: checked where used
                if (auto e = core_->result_error()) detail::rethrow_exception(e);
        } else {
            if (!state().has_value()) detail::rethrow_exception(core_->result_error());
        }
    }
    R decode_value(Core& c) {
        Decoder d(c.value_bytes().data(), c.value_bytes().size(), &c.value_handles());
        R v = d.template read<R>();
        d.expect_end("process result");
        return v;
    }
    detail::result_ref_t<R> result_at(detail::os::Deadline deadline) {
        check_value_at(deadline);
        if constexpr (!std::is_void_v<R>) {
            Core& c = state();
            std::lock_guard<std::mutex> lk(c.value_mutex);
            if (c.value_taken) detail::throw_result_taken(name());
            if (!c.decoded) c.decoded = std::make_shared<R>(decode_value(c));
            return *static_cast<const R*>(c.decoded.get());
        }
    }
    R take_at(detail::os::Deadline deadline) {
        check_value_at(deadline);
        if constexpr (!std::is_void_v<R>) {
            Core& c = state();
            std::lock_guard<std::mutex> lk(c.value_mutex);
            if (c.value_taken) detail::throw_result_taken(name());
            c.value_taken = true;
            if (!c.decoded) return decode_value(c);  // straight out: never kept, never copied
            std::shared_ptr<void> kept = std::move(c.decoded);
            return std::move(*static_cast<R*>(kept.get()));
        }
    }
    std::exception_ptr exception_at(detail::os::Deadline deadline) {
        if (!wait_at(deadline, "exception")) detail::throw_timeout(name());
        return core_->error();
    }

    detail::Owned<detail::ChildTask> task_;
};

template <class F, class... A>
Process(F, A...) -> Process<detail::process_result_t<F, A...>>;
template <class Ctx, class F, class... A, std::enable_if_t<std::is_base_of_v<Context, Ctx>, int> = 0>
Process(const Ctx&, F, A...) -> Process<detail::process_result_t<F, A...>>;

}  // namespace mpservice
// ---- end part: mpservice/public/process.hpp
// ---- begin part: mpservice/public/threading.hpp -----------------------------
// threading: Thread<R>, a thread with the future API of Process<R>.
//
//     mp::Thread t(work, 21);              // CTAD: Thread<double>
//     t.start();
//     double r = t.result();               // waits; re-throws the target's exception
//
// Arguments follow std::thread: each is copied (decayed) into the thread and
// passed as an rvalue, so a T& parameter needs std::ref(x) (one static_assert
// says so otherwise).  A target returning a reference gives Thread<T&>, whose
// result() is that very object, as std::async's future<T&>.  take_result() (or
// std::move(t).result()) moves the value out instead of copying it.
//
// Cancellation is cooperative, as with std::jthread (C++ cannot inject an
// exception into a running thread the way Python's Thread.throw does): a
// target whose first parameter is mp::StopToken receives one, and polls
// stop_requested(); request_stop() sets it.  The destructor of a running
// Thread requests a stop and then joins.

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>

namespace mpservice {

/// Tells a Thread's target that a stop was requested (see Thread::request_stop).
class StopToken {
public:
    StopToken() = default;
    bool stop_requested() const noexcept { return flag_ && flag_->load(std::memory_order_acquire); }

private:
    template <class>
    friend class Thread;
    explicit StopToken(detail::Shared<std::atomic<bool>> flag) : flag_(std::move(flag)) {}
    detail::Shared<std::atomic<bool>> flag_;
};

template <class R>
class Thread;

namespace detail {

/// "Thread-N", numbered from 1 in each process.
MPSERVICE_API std::string next_thread_name();
/// A Thread's stop flag, not set.
MPSERVICE_API Shared<std::atomic<bool>> make_stop_flag();

template <class F, class... A>
constexpr bool takes_stop_token_v = std::is_invocable_v<std::decay_t<F>, StopToken, std::decay_t<A>...>;

/// Stands for the result of a call that cannot be made, so that class template
/// argument deduction succeeds and the constructor's static_assert explains.
struct uncallable_thread_target {};

template <class F, class... A>
auto thread_result_of() {
    if constexpr (takes_stop_token_v<F, A...>)
        return std::invoke_result<std::decay_t<F>&, StopToken, std::decay_t<A>...>{};
    else if constexpr (std::is_invocable_v<std::decay_t<F>&, std::decay_t<A>...>)
        return std::invoke_result<std::decay_t<F>&, std::decay_t<A>...>{};
    else
        return std::enable_if<true, uncallable_thread_target>{};
}
template <class F, class... A>
struct thread_result_impl {
    using type = typename decltype(thread_result_of<F, A...>())::type;
};
// No `type` for a Thread in first place: Thread b(std::move(a)) is the move
// constructor, and the deduction guide must step aside for it.
template <class F, class... A>
using thread_result_t =
    typename std::enable_if_t<!std::is_base_of_v<Worker, std::decay_t<F>>, thread_result_impl<F, A...>>::type;

/// Whether f(args...) - or f(stop_token, args...) - can be made from the
/// copies a Thread keeps (passed as rvalues, as std::thread passes them).
template <class F, class... A>
constexpr bool thread_callable_v =
    takes_stop_token_v<F, A...> || std::is_invocable_v<std::decay_t<F>&, std::decay_t<A>...>;

/// What a Thread keeps of R: a value, a pointer for a reference, a flag for void.
template <class R>
struct thread_value {
    using type = R;
};
template <class R>
struct thread_value<R&> {
    using type = R*;
};
template <>
struct thread_value<void> {
    using type = bool;
};

template <class R>
class ThreadCore : public FutureCore {
public:
    std::optional<typename thread_value<R>::type> value;
    bool value_taken = false;  ///< take_result() moved the value out
    std::mutex join_mutex;
    std::mutex value_mutex;
};

}  // namespace detail

/// A thread whose target's return value or exception is kept, like a future.
template <class R>
class Thread : public Worker {
    using Core = detail::ThreadCore<R>;

public:
    /// Prepares a thread running f(args...) - or f(stop_token, args...) if f
    /// takes a StopToken first.  Arguments are copied (decayed) into the thread
    /// and passed as rvalues, as std::thread does.  Nothing runs until start().
    template <class F, class... A,
              std::enable_if_t<!std::is_same_v<std::decay_t<F>, Thread>, int> = 0>
    explicit Thread(F&& f, A&&... args)
        : Worker(std::make_shared<Core>()), stop_(detail::make_stop_flag()) {
        static_assert(detail::thread_callable_v<F, A...>,
                      "mpservice::Thread: the target cannot be called with these arguments. As std::thread does, "
                      "Thread keeps a copy of each argument and passes the copies as rvalues, so a non-const "
                      "lvalue reference parameter (T&) cannot bind to one: pass std::ref(x) to let the thread use "
                      "your object x itself, or take the parameter by value or by const reference.");
        core_->name = detail::next_thread_name();
        if constexpr (detail::thread_callable_v<F, A...>)
            body_ = make_body(std::forward<F>(f), std::forward<A>(args)...);
    }
    Thread(Thread&&) noexcept = default;
    Thread& operator=(Thread&&) = delete;
    /// A running thread is asked to stop (request_stop) and joined; never throws.
    ~Thread() override {
        if (thread_.joinable()) {
            request_stop();
            thread_.join();
        }
    }

    /// Starts the thread; a second start() is an InvalidStateError.
    void start() {
        if (core_->started()) throw InvalidStateError("mpservice: thread '" + name() + "' was already started");
        core_->mark_started();
        thread_ = std::thread([body = std::move(body_)] { body->run(); });
    }

    /// Waits for the end; re-throws the target's exception (every time).
    void join() {
        wait_for_end(detail::os::no_deadline, "join");
        if (auto e = core_->error()) std::rethrow_exception(e);
    }
    /// Waits at most `timeout`; returns quietly if the thread is still running.
    template <class Rep, class Period>
    void join(std::chrono::duration<Rep, Period> timeout) {
        if (!wait_for_end(detail::os::deadline_after(timeout), "join")) return;
        if (auto e = core_->error()) std::rethrow_exception(e);
    }

    /// The target's value (waits); re-throws its exception.
    detail::result_ref_t<R> result() & { return result_at(detail::os::no_deadline); }
    /// As result(), but TimeoutError if not finished within `timeout`.
    template <class Rep, class Period>
    detail::result_ref_t<R> result(std::chrono::duration<Rep, Period> timeout) & {
        return result_at(detail::os::deadline_after(timeout));
    }
    /// std::move(t).result(): the value moved out (see take_result).
    R result() && { return take_result(); }
    template <class Rep, class Period>
    R result(std::chrono::duration<Rep, Period> timeout) && {
        return take_result(timeout);
    }
    /// The target's value moved out of this Thread rather than copied (waits;
    /// re-throws as result()).  Afterwards result() and take_result() are an
    /// InvalidStateError; join() and exception() still work.
    R take_result() { return take_at(detail::os::no_deadline); }
    template <class Rep, class Period>
    R take_result(std::chrono::duration<Rep, Period> timeout) {
        return take_at(detail::os::deadline_after(timeout));
    }
    /// The target's exception, or nullptr after a value (waits).
    std::exception_ptr exception() { return exception_at(detail::os::no_deadline); }
    template <class Rep, class Period>
    std::exception_ptr exception(std::chrono::duration<Rep, Period> timeout) {
        return exception_at(detail::os::deadline_after(timeout));
    }

    bool is_alive() const { return core_->started() && !core_->done(); }
    /// Asks the target to stop (it sees StopToken::stop_requested()).
    void request_stop() noexcept { stop_->store(true, std::memory_order_release); }
    bool stop_requested() const noexcept { return stop_->load(std::memory_order_acquire); }
    StopToken get_stop_token() const { return StopToken(stop_); }
    /// Renames the thread (before start).
    void set_name(std::string name) { core_->name = std::move(name); }

private:
    template <class F, class... A>
    detail::Owned<detail::Task> make_body(F&& f, A&&... args) {
        auto token = StopToken(stop_);
        auto core = std::static_pointer_cast<Core>(core_.shared());  // the thread's own reference
        return detail::make_task([core, token, fn = std::decay_t<F>(std::forward<F>(f)),
                                  tup = std::make_tuple(std::decay_t<A>(std::forward<A>(args))...)]() mutable {
            std::exception_ptr error;
            try {
                if constexpr (detail::takes_stop_token_v<F, A...>) {
                    call_and_store(*core, [&]() -> decltype(auto) {
                        return std::apply([&](auto&&... a) -> decltype(auto) { return std::invoke(fn, token, std::move(a)...); },
                                          std::move(tup));
                    });
                } else {
                    call_and_store(*core, [&]() -> decltype(auto) { return std::apply(fn, std::move(tup)); });
                }
            } catch (...) {
                error = std::current_exception();
                detail::keep_throw_site(error);  // the throw site is known in this thread only
            }
            core->resolve(error);
        });
    }
    template <class Call>
    static void call_and_store(Core& core, Call&& call) {
        if constexpr (std::is_void_v<R>) {
            call();
            core.value.emplace(true);
        } else if constexpr (std::is_reference_v<R>) {
            R r = call();
            core.value.emplace(&r);
        } else {
            core.value.emplace(call());
        }
    }
    Core& state() const { return static_cast<Core&>(*core_); }

    bool wait_for_end(detail::os::Deadline deadline, const char* what) {
        if (!core_->started()) detail::throw_not_started(what, name());
        if (!core_->wait_until(deadline)) return false;
        if (thread_.joinable()) {
            std::lock_guard<std::mutex> lk(state().join_mutex);
            if (thread_.joinable()) thread_.join();
        }
        return true;
    }
    detail::result_ref_t<R> result_at(detail::os::Deadline deadline) {
        if (!wait_for_end(deadline, "result")) detail::throw_timeout(name());
        if (auto e = core_->error()) std::rethrow_exception(e);
        if constexpr (!std::is_void_v<R>) {
            Core& c = state();
            std::lock_guard<std::mutex> lk(c.value_mutex);
            if (c.value_taken) detail::throw_result_taken(name());
            if constexpr (std::is_reference_v<R>) return **c.value;
            else return *c.value;
        }
    }
    R take_at(detail::os::Deadline deadline) {
        if (!wait_for_end(deadline, "result")) detail::throw_timeout(name());
        if (auto e = core_->error()) std::rethrow_exception(e);
        if constexpr (!std::is_void_v<R>) {
            Core& c = state();
            std::lock_guard<std::mutex> lk(c.value_mutex);
            if (c.value_taken) detail::throw_result_taken(name());
            c.value_taken = true;
            if constexpr (std::is_reference_v<R>) {
                return **c.value;
            } else {
                R v = std::move(*c.value);
                c.value.reset();
                return v;
            }
        }
    }
    std::exception_ptr exception_at(detail::os::Deadline deadline) {
        if (!wait_for_end(deadline, "exception")) detail::throw_timeout(name());
        return core_->error();
    }

    detail::Shared<std::atomic<bool>> stop_;
    detail::Owned<detail::Task> body_;
    std::thread thread_;
};

template <class F, class... A>
Thread(F, A...) -> Thread<detail::thread_result_t<F, A...>>;

}  // namespace mpservice
// ---- end part: mpservice/public/threading.hpp
// ---- begin part: mpservice/public/synchronize.hpp ---------------------------
// synchronize: Lock, RLock, Condition, Semaphore, BoundedSemaphore, Event and
// Barrier in shared memory, usable alike by the threads of one process and by
// many processes.
//
// Every object is a *handle*: copying it, or passing it as an argument to a
// Process, gives another handle to the same lock/event/...  The state lives in
// anonymous shared memory (see detail/shm.hpp); each handle keeps a mapping of
// it, and the kernel frees the memory when the last mapping and descriptor in
// any process are gone.  Nothing has a name, so nothing can be left behind:
// not by exceptions, not by exit(), not by SIGKILL (the kernel closes a killed
// process's descriptors and mappings like everyone else's).
//
// Waits spin for a few microseconds and then sleep on a futex: a wake-up that
// crosses CPUs costs ~30 us, while the other side often answers much sooner.
//
// Dead processes.  Lock and RLock are robust mutexes: if the holder dies, the
// next acquirer gets the lock *and* an OwnerDiedError (or the status
// LockStatus::owner_died from acquire_checked()).  It then owns the lock:
// repair what the lock protects and call make_consistent(), or simply
// release() - a release marks the lock consistent too, so the lock is never
// poisoned.  Only the acquirer that took the lock from the dead process is
// told.  A process that dies *waiting* (Condition::wait, Event::wait,
// Semaphore::acquire) leaves nothing behind that others wait for; one that dies
// inside Barrier::wait breaks the barrier (the other waiters check the
// liveness of the parties that arrived while they sleep).
//
// Differences from Python worth knowing:
// - A Lock is owned by the thread that acquired it; releasing it from another
//   thread or process throws InvalidStateError (use a Semaphore for hand-offs).
//   Acquiring a Lock the calling thread already holds, without a timeout,
//   throws InvalidStateError rather than deadlocking; try_lock() and a timed
//   acquire return false (after the timeout), as in Python.
// - Barrier's action is a plain function pointer; it runs in the process that
//   arrives last (see Barrier).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <utility>

namespace mpservice {

/// How acquire_checked() ended.
enum class LockStatus {
    acquired,    ///< the caller holds the lock
    owner_died,  ///< the caller holds the lock; its previous holder died holding it
    timed_out,   ///< the caller does not hold the lock
};

namespace detail {

// ---------------------------------------------------------------- identity and spinning

/// The calling thread's token, once made (0 before); reset in a forked child.
inline thread_local std::uint64_t t_thread_token = 0;
/// Makes a new token (and registers the reset after fork).
MPSERVICE_API std::uint64_t new_thread_token() noexcept;
/// A 64-bit identity of the calling thread that no other thread, in any
/// process, has now or had before (so a dead owner's identity is never
/// mistaken for a live thread's).  Cached per thread; renewed in a forked child.
inline std::uint64_t this_thread_token() noexcept {
    std::uint64_t t = t_thread_token;
    return t ? t : (t_thread_token = new_thread_token());
}

/// How long a waiter may spin before it sleeps: about a third of the cost of
/// a cross-CPU futex wake-up on the machines this was tuned on (RESULTS.md)...
inline constexpr std::uint32_t spin_max_ns = 10000;
/// ...and at least, so that a partner that answers at once is still caught.
inline constexpr std::uint32_t spin_min_ns = 500;

/// A failed spin of the least budget turns spinning off for the next
/// spin_probe_every - 1 waits; the one after probes again with the least budget.
inline constexpr std::uint32_t spin_probe_every = 8;
static_assert(spin_probe_every < spin_min_ns, "the budget's 'off' values must not look like budgets");

/// What a fixed spin does between batches of looks.
enum class BetweenLooks {
    relax,  // stay on the CPU (the partner runs on another one)
    yield,  // give the CPU away: the partner may be waiting for this very CPU
};

/// Spins until ready() or `budget` has passed, without adapting (the spin of
/// a partner known to answer soon); returns ready().  The one spin loop of
/// the library: spin_until adapts its budget around it.
template <class Ready>
bool spin_for(Ready&& ready, std::chrono::nanoseconds budget, BetweenLooks between = BetweenLooks::relax) {
    const auto until = os::Clock::now() + budget;
    for (;;) {
        for (int i = 0; i < 32; ++i) {  // reading the clock costs about as much as a pause
            os::cpu_relax();
            if (ready()) return true;
        }
        if (os::Clock::now() >= until) return ready();
        if (between == BetweenLooks::yield) std::this_thread::yield();
    }
}

/// Spins until ready() or `budget` has passed, looking at doubling intervals:
/// the first after about one cache-line transfer, the longest a quarter of the
/// budget.  For state that the other side keeps writing, as the holder of a
/// lock does when it releases and re-takes it in a stream: every look takes the
/// line from the holder's cache, so a waiter that looks at every pause turns
/// each of the holder's re-takes into a cross-CPU transfer (measured: 2x slower
/// than not spinning at all), while one that backs off lets the holder run at
/// its uncontended speed between looks and still sees a longer hold end within
/// one interval.
template <class Ready>
bool spin_backing_off_for(Ready&& ready, std::chrono::nanoseconds budget) {
    constexpr std::chrono::nanoseconds first_gap(64);
    const auto longest_gap = budget / 4;
    auto t = os::Clock::now();
    const auto until = t + budget;
    for (auto gap = first_gap;; gap = gap < longest_gap ? gap * 2 : gap) {
        const auto look_at = t + gap;
        while ((t = os::Clock::now()) < look_at) os::cpu_relax();
        if (ready()) return true;
        if (t >= until) return false;
    }
}

/// `budget`, or what is left until `deadline` if that is less (never negative).
inline std::chrono::nanoseconds spin_budget_within(std::chrono::nanoseconds budget, os::Deadline deadline) {
    if (deadline == os::no_deadline) return budget;
    const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - os::Clock::now());
    return std::max(std::chrono::nanoseconds(0), std::min(budget, left));
}

/// How a spin paces its looks at the state it waits for.
enum class Looks {
    every_pause,  // state that changes once (a notify, a put): see it at once
    backing_off,  // state the other side keeps writing: spin_backing_off_for
};

/// The bounds and pace of an adaptive spin (spin_until).
struct SpinStyle {
    std::uint32_t least_ns;  // a probe's budget, and the least before spinning turns off
    std::uint32_t most_ns;   // where a budget that keeps succeeding stops growing
    Looks looks;
    BetweenLooks between;
};

/// A wait for a partner that runs on another CPU and answers soon.
inline constexpr SpinStyle answer_spin{spin_min_ns, spin_max_ns, Looks::every_pause, BetweenLooks::relax};
/// A wait for a lock that someone holds (see lock_contended).
inline constexpr SpinStyle lock_spin{spin_min_ns, spin_max_ns, Looks::backing_off, BetweenLooks::relax};
/// A wait right after waking the partner that will answer it (see
/// partner_is_waking).  The partner must first wake up: a cross-CPU futex
/// wake-up took 8-30 us on the guests measured, longer than answer_spin lasts,
/// so that spin cannot succeed and both sides would sleep on every exchange.
/// One that outlasts the wake-up catches the answer, and the waiter, still
/// awake, needs no wake-up for the next one: the pair leaves the sleep-and-wake
/// cycle for exchanges answered from a spin (20-40x faster, measured).  It
/// yields between looks, because the woken partner may have been placed on
/// this very CPU; it then runs at once, as if the waiter had gone to sleep.
inline constexpr SpinStyle after_wake_spin{25000, 100000, Looks::every_pause, BetweenLooks::yield};

/// Spins until ready() or the spin budget is spent; returns ready().
///
/// The budget adapts, per object, in `budget_ns` (shared by every process
/// that waits on the object): it doubles after a spin that succeeded and
/// halves after one that failed, within the style's bounds.  Spinning pays
/// only while the other side answers within the budget; when it does not
/// (it is busy, or both share one CPU), a spin only burns the CPU.  So once
/// even a spin of the least budget fails, spinning stops: the budget then
/// holds a count of skipped waits (1..spin_probe_every), and every
/// spin_probe_every-th wait probes with the least budget to notice when
/// spinning pays again.
///
/// A spin never outlasts `deadline` (a wait with a timeout shorter than the
/// budget spins only until then, and such a cut-short spin that fails leaves
/// the budget as it was: it says nothing about the partner).
template <class Ready, class Budget>
bool spin_until(Ready&& ready, std::atomic<Budget>& budget_ns, const SpinStyle& style = answer_spin,
                os::Deadline deadline = os::no_deadline) {
    if (ready()) return true;
    const std::uint32_t stored = budget_ns.load(std::memory_order_relaxed);
    std::uint32_t budget = stored;
    if (budget == 0) budget = style.most_ns;  // a new object: optimistic
    if (budget < spin_probe_every) {          // spinning is off: skip it, count the skips
        budget_ns.store(Budget(budget + 1), std::memory_order_relaxed);
        return false;
    }
    if (budget < style.least_ns) budget = style.least_ns;  // a probe
    // The budget lives on the object's (shared) line: it is stored only when
    // it changes, so a steady budget costs the other side no transfer.
    auto keep = [&](std::uint32_t b) {
        if (b != stored) budget_ns.store(Budget(b), std::memory_order_relaxed);
    };
    const auto span = spin_budget_within(std::chrono::nanoseconds(budget), deadline);
    const bool cut_short = span < std::chrono::nanoseconds(budget);
    const bool ok = style.looks == Looks::backing_off ? spin_backing_off_for(ready, span)
                                                       : spin_for(ready, span, style.between);
    if (ok) {
        keep(budget >= style.most_ns / 2 ? style.most_ns : budget * 2);
        return true;
    }
    if (cut_short) return ready();
    std::uint32_t shrunk = budget / 2;
    if (budget <= 2 * style.least_ns) shrunk = budget <= style.least_ns ? 1 : style.least_ns;  // 1: off, see above
    keep(shrunk);
    return ready();
}

/// Whether the calling thread's last wake-up call woke a thread that slept in
/// the kernel (see partner_is_waking).
inline thread_local bool t_woke_a_sleeper = false;

/// Called by a wait before it spins: true if this thread has just woken a
/// sleeper (and forgets it).  The thread it woke is most likely the one that
/// will answer, and it is not running yet: the scheduler is placing it, on
/// another CPU or on this very one (a 2-CPU machine has no other to spare).
/// The wait then spins in after_wake_spin's style, with its own budget.  A
/// partner that was not asleep (both spinning on their own CPUs) is not
/// woken, so the ordinary spin goes on where it pays.
inline bool partner_is_waking() noexcept {
    const bool woke = t_woke_a_sleeper;
    t_woke_a_sleeper = false;
    return woke;
}

/// A wait's spin, bounded by `deadline`: after_wake_spin (budget
/// `after_wake_ns`) if `partner_waking` (partner_is_waking(), asked when the
/// wait began), answer_spin (budget `answer_ns`) otherwise.
template <class Ready, class Budget>
bool spin_for_answer(bool partner_waking, Ready&& ready, std::atomic<Budget>& answer_ns,
                     std::atomic<Budget>& after_wake_ns, os::Deadline deadline) {
    static_assert(after_wake_spin.most_ns <= Budget(~Budget(0)), "the spin budget's type is too small");
    return partner_waking ? spin_until(ready, after_wake_ns, after_wake_spin, deadline)
                          : spin_until(ready, answer_ns, answer_spin, deadline);
}

// ---------------------------------------------------------------- handles to shared state

/// Whether T holds a robust mutex named `mutex` (LockState, BarrierState).
template <class T, class = void>
struct has_robust_mutex : std::false_type {};
template <class T>
struct has_robust_mutex<T, std::enable_if_t<std::is_same_v<decltype(T::mutex), os::RobustMutex>>>
    : std::true_type {};

/// A T that lives at some offset inside a SharedMemory block.  Copies, and
/// decoded copies in other processes, refer to the same T.  The block stays
/// mapped as long as a SharedRef (or anything else) holds it.
template <class T>
class SharedRef {
public:
    SharedRef() = default;
    SharedRef(SharedMemory mem, T* p) : mem_(std::move(mem)), p_(p) {
        // A lock held when the last handle goes must stay mapped (see there).
        if constexpr (has_robust_mutex<T>::value)
            if (p_) mem_.keep_mapped_while_held(&p_->mutex);
    }

    /// A new zero-filled block of `size` bytes (at least sizeof(T)) with a T
    /// constructed at its start.
    template <class... Args>
    static SharedRef create_sized(std::size_t size, Args&&... args) {
        SharedMemory mem = SharedMemory::create(size < sizeof(T) ? sizeof(T) : size);
        T* p = ::new (mem.data()) T(std::forward<Args>(args)...);
        return SharedRef(std::move(mem), p);
    }
    /// A handle to a U that lives inside the same block.
    template <class U>
    SharedRef<U> alias(U* p) const {
        return SharedRef<U>(mem_, p);
    }

    T* get() const noexcept { return p_; }
    T* operator->() const noexcept { return p_; }
    T& operator*() const noexcept { return *p_; }
    explicit operator bool() const noexcept { return p_ != nullptr; }
    const SharedMemory& memory() const noexcept { return mem_; }
    std::size_t offset() const noexcept {
        return static_cast<std::size_t>(reinterpret_cast<const char*>(p_) -
                                        static_cast<const char*>(mem_.data()));
    }
    /// Bytes of the block from this T to the block's end.
    std::size_t bytes_available() const noexcept { return mem_.size() - offset(); }

private:
    SharedMemory mem_;
    T* p_ = nullptr;
};

// ---------------------------------------------------------------- shared states

/// Lock and RLock: a robust process-shared mutex plus the identity of the
/// owning thread (so ownership can be checked without a system call).
///
/// All of it fits one cache line, the mutex proper first: an acquire+release
/// touches the mutex and the owner fields together, and when the lock is handed
/// between CPUs, every extra line is one more transfer per hand-off.
struct alignas(64) LockState {
    os::RobustMutex mutex;
    std::atomic<std::uint64_t> owner{0};  // this_thread_token() of the holder, 0 if free
    std::atomic<std::uint32_t> depth{0};  // recursion depth of the holder (1 for a Lock)
    std::atomic<std::uint16_t> release_work{0};  // lock_release_work bits: what the release must do
    std::atomic<std::uint16_t> spin_ns{0};       // spin_until's budget for a busy lock
    LockState() { os::robust_mutex_init(&mutex); }
};
static_assert(sizeof(LockState) == 64, "LockState should fill exactly one cache line");
static_assert(lock_spin.most_ns <= UINT16_MAX, "LockState::spin_ns is too small for lock_spin's budget");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                  std::atomic<std::uint32_t>::is_always_lock_free &&
                  std::atomic<std::uint16_t>::is_always_lock_free,
              "shared-memory atomics must be lock-free");

/// Bits of LockState::release_work, written by the holder only.  Any bit set
/// sends the release down its slow path; none costs the fast path anything.
enum lock_release_work : std::uint16_t {
    /// Taken from a dead owner, not yet made consistent.
    release_repair = 1,
    /// A Condition over this lock was notified while it was held: the waiters
    /// are woken when the lock is released (see condition_notify).
    release_wake = 2,
};

/// The lock under a Condition (or a Value): a Lock or an RLock.
struct LockRef {
    SharedRef<LockState> state;
    bool recursive = false;
};

// The uncontended paths of Lock and RLock are inline: a trylock and a few
// relaxed stores on the mutex's own cache line.  Everything else is out of line.
MPSERVICE_API LockStatus lock_acquire_slow(const LockRef& l, os::Deadline deadline);
/// The rest of an acquire whose first trylock returned the nonzero `status`.
MPSERVICE_API LockStatus lock_acquire_after_try(const LockRef& l, os::Deadline deadline, int status);
MPSERVICE_API void lock_release_slow(const LockRef& l);
MPSERVICE_API void lock_make_consistent(const LockRef& l);
[[noreturn]] MPSERVICE_API void throw_owner_died(const LockRef& l);

inline bool lock_is_mine(const LockRef& l) noexcept {
    return l.state->owner.load(std::memory_order_relaxed) == this_thread_token();
}

/// Takes the lock (or, for the owner of an RLock, one more level).
inline LockStatus lock_acquire(const LockRef& l, os::Deadline deadline) {
    LockState* s = l.state.get();
    const std::uint64_t me = this_thread_token();
    if (s->owner.load(std::memory_order_relaxed) != me) {
        int status = os::robust_mutex_trylock_status(&s->mutex);
        if (status == 0) {
            s->owner.store(me, std::memory_order_relaxed);
            s->depth.store(1, std::memory_order_relaxed);
            return LockStatus::acquired;
        }
        return lock_acquire_after_try(l, deadline, status);
    }
    return lock_acquire_slow(l, deadline);
}
inline LockStatus lock_try_acquire(const LockRef& l) { return lock_acquire(l, os::Deadline{}); }

/// Releases (one level of an RLock); InvalidStateError if not the owner's.
inline void lock_release(const LockRef& l) {
    LockState* s = l.state.get();
    if (s->owner.load(std::memory_order_relaxed) == this_thread_token() &&
        s->depth.load(std::memory_order_relaxed) == 1 && !s->release_work.load(std::memory_order_relaxed)) {
        s->depth.store(0, std::memory_order_relaxed);
        s->owner.store(0, std::memory_order_relaxed);
        if (int status = os::robust_mutex_unlock_status(&s->mutex)) os::robust_mutex_unlock_failed(status);
        return;
    }
    lock_release_slow(l);
}

/// Throws OwnerDiedError for owner_died (the lock stays held), returns
/// whether it was acquired otherwise.
inline bool lock_status_to_bool(const LockRef& l, LockStatus s) {
    if (s == LockStatus::owner_died) throw_owner_died(l);
    return s == LockStatus::acquired;
}

/// How often (ms) a sleeping Condition waiter looks at the counter by itself,
/// so that the notify of a holder who died before releasing the lock is not
/// lost.  Per process; the tests raise it to tell real wake-ups from rechecks.
inline std::atomic<std::int64_t> condition_recheck_ms{100};

/// A Condition's waiters and notifications.  Every change but the spin
/// budget's is made under the condition's lock, which wait(), notify() and a
/// waiter's decision after waking all hold: so a notify(n) hands out exactly
/// min(n, un-notified waiters) wake-up tokens, and a waiter returns true only
/// with a token, taken from a notify that came after it began to wait.
struct ConditionState {
    std::atomic<std::uint32_t> sequence{0};  // futex word: bumped by every notify that hands out tokens
    std::atomic<std::uint32_t> sleepers{0};  // waiters registered (a dead one stays counted, see condition_notify)
    std::atomic<std::uint32_t> spin_ns{0};   // spin_until's budget (answer_spin)
    std::atomic<std::uint32_t> tokens{0};    // notified waiters that have not yet taken their wake-up
    std::atomic<std::uint32_t> after_wake_spin_ns{0};  // spin_until's budget (after_wake_spin)
};

struct SemaphoreState {
    std::atomic<std::uint32_t> value{0};     // futex word
    std::atomic<std::uint32_t> sleepers{0};  // as in ConditionState
    std::atomic<std::uint32_t> spin_ns{0};
    std::atomic<std::uint32_t> after_wake_spin_ns{0};
    std::uint32_t bounded = 0;               // BoundedSemaphore: value may not exceed limit
    std::uint32_t limit = 0;
};

struct EventState {
    std::atomic<std::uint32_t> word{0};      // futex word: bit 0 = flag, bits 1.. = number of set()s
    std::atomic<std::uint32_t> sleepers{0};  // as in ConditionState
    std::atomic<std::uint32_t> spin_ns{0};
    std::atomic<std::uint32_t> after_wake_spin_ns{0};
};

struct BarrierState {
    os::RobustMutex mutex;                      // guards everything but the atomics' lone reads
    std::atomic<std::uint32_t> generation{0};   // futex word: bumped when a cycle ends
    std::atomic<std::uint32_t> count{0};        // arrivals in the current cycle
    std::atomic<std::uint32_t> broken{0};
    std::atomic<std::uint32_t> spin_ns{0};
    std::uint32_t parties = 0;
    std::atomic<std::uint64_t> released_bits{0};  // bit g%64: cycle g ended by release, not break
    std::int64_t default_timeout_ns = -1;       // -1: none
    os::CodeRef action{};                        // empty: no action
    // followed by `parties` process ids (std::int64_t) of the current cycle's arrivals
    BarrierState() { os::robust_mutex_init(&mutex); }
    std::int64_t* pids() noexcept { return reinterpret_cast<std::int64_t*>(this + 1); }
    static std::size_t size_for(std::uint32_t parties) {
        return sizeof(BarrierState) + parties * sizeof(std::int64_t);
    }
};

MPSERVICE_API bool condition_wait(const SharedRef<ConditionState>& c, const LockRef& l, os::Deadline deadline);
MPSERVICE_API void condition_notify(const SharedRef<ConditionState>& c, const LockRef& l, int n);
/// The condition's lock was taken from a dead holder, who may have notified
/// without living to release: wakes the sleepers, then throws OwnerDiedError.
[[noreturn]] MPSERVICE_API void condition_lock_owner_died(const SharedRef<ConditionState>& c, const LockRef& l);
MPSERVICE_API bool semaphore_acquire(SemaphoreState* s, os::Deadline deadline);
MPSERVICE_API void semaphore_release(SemaphoreState* s, unsigned n);
MPSERVICE_API bool event_wait(EventState* e, os::Deadline deadline);
MPSERVICE_API void event_set(EventState* e);

template <class Rep, class Period>
os::Deadline deadline_of(std::chrono::duration<Rep, Period> timeout) {
    return os::deadline_after(timeout);
}

/// A T at `offset` in `mem`; throws DecodeError unless it (plus `extra`
/// bytes) fits inside the block at a properly aligned offset.
template <class T>
SharedRef<T> ref_at(const SharedMemory& mem, std::uint64_t offset, std::size_t extra = 0) {
    if (offset % alignof(T) != 0 || offset > mem.size() || mem.size() - offset < sizeof(T) + extra)
        throw DecodeError("decode: shared object does not fit its shared memory block");
    return SharedRef<T>(mem, reinterpret_cast<T*>(static_cast<char*>(mem.data()) + offset));
}
/// Reads a SharedRef<T> written by encode_ref.
template <class T>
SharedRef<T> decode_ref(Decoder& d, std::size_t extra = 0) {
    SharedMemory mem = d.read<SharedMemory>();
    auto offset = d.read<std::uint64_t>();
    return ref_at<T>(mem, offset, extra);
}
template <class T>
void encode_ref(Encoder& e, const SharedRef<T>& r) {
    e.write(r.memory());
    e.write(static_cast<std::uint64_t>(r.offset()));
}
/// A lock that often lives in the same block as the object it guards
/// (Condition, Value, Array): then only its offset travels, so the receiver
/// maps the block once.
inline void encode_lock_beside(Encoder& e, const SharedMemory& owner, const LockRef& l) {
    bool same_block = l.state.memory().handle() == owner.handle();
    e.write(static_cast<std::uint8_t>(same_block));
    e.write(static_cast<std::uint8_t>(l.recursive));
    if (same_block)
        e.write(static_cast<std::uint64_t>(l.state.offset()));
    else
        encode_ref(e, l.state);
}
inline LockRef decode_lock_beside(Decoder& d, const SharedMemory& owner) {
    auto same_block = d.read<std::uint8_t>();
    auto recursive = d.read<std::uint8_t>();
    if (same_block > 1 || recursive > 1) throw DecodeError("decode: bad lock description");
    if (same_block) return LockRef{ref_at<LockState>(owner, d.read<std::uint64_t>()), recursive == 1};
    return LockRef{decode_ref<LockState>(d), recursive == 1};
}

}  // namespace detail

// ============================================================================ Lock, RLock

/// A mutual-exclusion lock shared between threads and processes (Python's
/// multiprocessing.Lock).  Meets the standard Lockable and TimedLockable
/// requirements: std::lock_guard, std::unique_lock and std::scoped_lock work.
///
/// If the holder dies, the next acquirer takes the lock and acquire()/lock()/
/// try_lock() throw OwnerDiedError *with the lock held*; acquire_checked()
/// returns LockStatus::owner_died instead of throwing.  Repair the protected
/// state, then make_consistent() or release().
class Lock {
public:
    /// A new, unlocked lock.
    MPSERVICE_API Lock();

    /// Blocks until the lock is taken.
    void acquire() { to_bool(detail::lock_acquire(ref_, detail::os::no_deadline)); }
    /// Waits at most `timeout`; false if the lock could not be taken.
    template <class Rep, class Period>
    bool acquire(std::chrono::duration<Rep, Period> timeout) {
        return to_bool(detail::lock_acquire(ref_, detail::deadline_of(timeout)));
    }
    /// Like acquire, but reports a dead previous owner as a status, not an exception.
    LockStatus acquire_checked() { return detail::lock_acquire(ref_, detail::os::no_deadline); }
    template <class Rep, class Period>
    LockStatus acquire_checked(std::chrono::duration<Rep, Period> timeout) {
        return detail::lock_acquire(ref_, detail::deadline_of(timeout));
    }
    /// Releases; throws InvalidStateError if the calling thread does not hold the lock.
    void release() { detail::lock_release(ref_); }
    /// After a dead owner: declares the protected state repaired.
    void make_consistent() { detail::lock_make_consistent(ref_); }
    /// Whether the calling thread holds the lock.
    bool is_mine() const noexcept { return detail::lock_is_mine(ref_); }

    // The standard Lockable / TimedLockable interface.
    void lock() { acquire(); }
    void unlock() { release(); }
    bool try_lock() { return to_bool(detail::lock_try_acquire(ref_)); }
    template <class Rep, class Period>
    bool try_lock_for(std::chrono::duration<Rep, Period> timeout) {
        return acquire(timeout);
    }
    template <class Clock, class Duration>
    bool try_lock_until(std::chrono::time_point<Clock, Duration> t) {
        return acquire(t - Clock::now());
    }

    /// Internal: the shared state and its kind.
    const detail::LockRef& lock_ref() const noexcept { return ref_; }
    /// Internal: a handle to an existing lock (decoding, Value's own lock).
    explicit Lock(detail::SharedRef<detail::LockState> state) : ref_{std::move(state), false} {}

private:
    bool to_bool(LockStatus s) { return detail::lock_status_to_bool(ref_, s); }
    detail::LockRef ref_;
};

/// A re-entrant lock (Python's multiprocessing.RLock): the owning thread -
/// identified across processes - may acquire it again; it is free once released
/// as many times as acquired.  Same dead-owner protocol as Lock.
class RLock {
public:
    /// A new, unlocked recursive lock.
    MPSERVICE_API RLock();

    void acquire() { to_bool(detail::lock_acquire(ref_, detail::os::no_deadline)); }
    template <class Rep, class Period>
    bool acquire(std::chrono::duration<Rep, Period> timeout) {
        return to_bool(detail::lock_acquire(ref_, detail::deadline_of(timeout)));
    }
    LockStatus acquire_checked() { return detail::lock_acquire(ref_, detail::os::no_deadline); }
    template <class Rep, class Period>
    LockStatus acquire_checked(std::chrono::duration<Rep, Period> timeout) {
        return detail::lock_acquire(ref_, detail::deadline_of(timeout));
    }
    /// Releases one level; throws InvalidStateError if the calling thread is not the owner.
    void release() { detail::lock_release(ref_); }
    void make_consistent() { detail::lock_make_consistent(ref_); }
    bool is_mine() const noexcept { return detail::lock_is_mine(ref_); }
    /// How many times the owner holds it (0 if free); a snapshot.
    unsigned depth() const noexcept { return ref_.state->depth.load(std::memory_order_relaxed); }

    void lock() { acquire(); }
    void unlock() { release(); }
    bool try_lock() { return to_bool(detail::lock_try_acquire(ref_)); }
    template <class Rep, class Period>
    bool try_lock_for(std::chrono::duration<Rep, Period> timeout) {
        return acquire(timeout);
    }
    template <class Clock, class Duration>
    bool try_lock_until(std::chrono::time_point<Clock, Duration> t) {
        return acquire(t - Clock::now());
    }

    const detail::LockRef& lock_ref() const noexcept { return ref_; }
    explicit RLock(detail::SharedRef<detail::LockState> state) : ref_{std::move(state), true} {}

private:
    bool to_bool(LockStatus s) { return detail::lock_status_to_bool(ref_, s); }
    detail::LockRef ref_;
};

// ============================================================================ Condition

/// A condition variable over a Lock or an RLock (Python's
/// multiprocessing.Condition); by default over a new RLock of its own.  The
/// Condition is itself lockable: lock()/unlock()/acquire()/release() act on
/// its lock, so `std::unique_lock g(cond)` works.
///
/// Waiting: a futex on a notification counter, plus wake-up tokens.  notify(n)
/// hands out min(n, waiters not yet notified) tokens; a waiter returns true only
/// with a token from a notify that came after it began to wait, so exactly that
/// many waits return true.  A waiter that dies stays counted, but its token is
/// taken by whichever live waiter wakes first, so it costs the others nothing;
/// the lock under the condition follows the dead-owner protocol of Lock.
///
/// notify() bumps the counter at once but wakes the sleepers only when the
/// lock is released: woken earlier, they would find the lock still held and
/// go back to sleep on it (two more system calls and context switches per
/// wake-up).  A notifier that dies before releasing does not strand them:
/// sleepers look at the counter every 100 ms by themselves, and whoever takes
/// the lock from the dead holder through a Condition wakes them at once.
class Condition {
public:
    /// Over a new RLock.
    MPSERVICE_API Condition();
    MPSERVICE_API explicit Condition(Lock lock);
    MPSERVICE_API explicit Condition(RLock lock);

    /// Releases the lock (all levels of an RLock), waits for a notify, takes
    /// the lock back.  The caller must hold the lock (else InvalidStateError).
    /// If the lock's holder died meanwhile, throws OwnerDiedError holding it.
    void wait() { detail::condition_wait(state_, lock_, detail::os::no_deadline); }
    /// As wait(); false if `timeout` passed without a notify.
    template <class Rep, class Period>
    bool wait(std::chrono::duration<Rep, Period> timeout) {
        return detail::condition_wait(state_, lock_, detail::deadline_of(timeout));
    }
    /// Waits until pred() is true; returns pred()'s last value.
    template <class Predicate>
    bool wait_for(Predicate pred) {
        while (!pred()) wait();
        return true;
    }
    /// Waits until pred() is true or `timeout` passed; returns pred()'s last value.
    template <class Predicate, class Rep, class Period>
    bool wait_for(Predicate pred, std::chrono::duration<Rep, Period> timeout) {
        auto deadline = detail::deadline_of(timeout);
        bool result = pred();
        while (!result) {
            if (detail::os::Clock::now() >= deadline) break;
            detail::condition_wait(state_, lock_, deadline);
            result = pred();
        }
        return result;
    }
    /// Wakes up to n of the threads waiting now (as soon as the lock is
    /// released): exactly min(n, waiters not yet notified) waits return true.
    /// The caller must hold the lock.
    void notify(int n = 1) { detail::condition_notify(state_, lock_, n); }
    void notify_all() { detail::condition_notify(state_, lock_, INT_MAX); }

    // The lock's interface.
    void acquire() { lock_status(detail::lock_acquire(lock_, detail::os::no_deadline)); }
    template <class Rep, class Period>
    bool acquire(std::chrono::duration<Rep, Period> timeout) {
        return lock_status(detail::lock_acquire(lock_, detail::deadline_of(timeout)));
    }
    void release() { detail::lock_release(lock_); }
    void lock() { acquire(); }
    void unlock() { release(); }
    bool try_lock() { return lock_status(detail::lock_try_acquire(lock_)); }
    void make_consistent() { detail::lock_make_consistent(lock_); }

    /// Internal.
    Condition(detail::SharedRef<detail::ConditionState> state, detail::LockRef lock)
        : state_(std::move(state)), lock_(std::move(lock)) {}
    const detail::SharedRef<detail::ConditionState>& state_ref() const noexcept { return state_; }
    const detail::LockRef& lock_ref() const noexcept { return lock_; }

private:
    bool lock_status(LockStatus s) {
        if (s == LockStatus::owner_died) detail::condition_lock_owner_died(state_, lock_);
        return s == LockStatus::acquired;
    }
    detail::SharedRef<detail::ConditionState> state_;
    detail::LockRef lock_;
};

// ============================================================================ Semaphore

/// A counting semaphore (Python's multiprocessing.Semaphore).  It has no owner:
/// any thread or process may release.  lock()/unlock() make it usable with
/// std::lock_guard as well.
class Semaphore {
public:
    /// A semaphore whose counter starts at `value`.
    MPSERVICE_API explicit Semaphore(unsigned value = 1);

    /// Decrements the counter, waiting while it is zero.
    void acquire() { detail::semaphore_acquire(state_.get(), detail::os::no_deadline); }
    /// As acquire(); false if `timeout` passed while the counter stayed zero.
    template <class Rep, class Period>
    bool acquire(std::chrono::duration<Rep, Period> timeout) {
        return detail::semaphore_acquire(state_.get(), detail::deadline_of(timeout));
    }
    /// Decrements the counter if it is not zero.
    bool try_acquire() { return detail::semaphore_acquire(state_.get(), detail::os::Deadline{}); }
    /// Adds n to the counter, waking up to n waiters.  A BoundedSemaphore
    /// throws InvalidStateError rather than exceed its initial value.
    void release(unsigned n = 1) { detail::semaphore_release(state_.get(), n); }
    /// The counter now (a snapshot).
    unsigned get_value() const noexcept { return state_->value.load(std::memory_order_relaxed); }

    void lock() { acquire(); }
    void unlock() { release(); }
    bool try_lock() { return try_acquire(); }

    /// Internal.
    explicit Semaphore(detail::SharedRef<detail::SemaphoreState> state) : state_(std::move(state)) {}
    const detail::SharedRef<detail::SemaphoreState>& state_ref() const noexcept { return state_; }

protected:
    MPSERVICE_API Semaphore(unsigned value, unsigned limit);

private:
    detail::SharedRef<detail::SemaphoreState> state_;
};

/// A semaphore whose counter may never exceed its initial value: a release
/// beyond it throws InvalidStateError and changes nothing.
class BoundedSemaphore : public Semaphore {
public:
    explicit BoundedSemaphore(unsigned value = 1) : Semaphore(value, value) {}
    explicit BoundedSemaphore(detail::SharedRef<detail::SemaphoreState> state) : Semaphore(std::move(state)) {}
};

// ============================================================================ Event

/// A flag that processes can wait for (Python's multiprocessing.Event).
class Event {
public:
    /// A new event, not set.
    MPSERVICE_API Event();

    /// Sets the flag and wakes every waiter.
    void set() { detail::event_set(state_.get()); }
    /// Resets the flag.
    void clear() noexcept { state_->word.fetch_and(~1u, std::memory_order_acq_rel); }
    bool is_set() const noexcept { return state_->word.load(std::memory_order_acquire) & 1u; }
    /// Waits until the flag is set.  A set() while waiting wakes the waiter
    /// even if a clear() follows at once.
    void wait() { detail::event_wait(state_.get(), detail::os::no_deadline); }
    /// As wait(); returns false if `timeout` passed without a set().
    template <class Rep, class Period>
    bool wait(std::chrono::duration<Rep, Period> timeout) {
        return detail::event_wait(state_.get(), detail::deadline_of(timeout));
    }

    /// Internal.
    explicit Event(detail::SharedRef<detail::EventState> state) : state_(std::move(state)) {}
    const detail::SharedRef<detail::EventState>& state_ref() const noexcept { return state_; }

private:
    detail::SharedRef<detail::EventState> state_;
};

// ============================================================================ Barrier

/// A barrier for a fixed number of parties (Python's multiprocessing.Barrier).
///
/// wait() returns the arrival index, 0 for the first to arrive and parties-1
/// for the last.  The barrier breaks - every waiter and every later wait()
/// throws BrokenBarrierError until reset() - when a wait times out, when
/// abort() is called, when the action throws, or when a process dies while it
/// waits at the barrier (the sleepers check the arrived parties every
/// ~50 ms).
///
/// The action is a plain function (a capture-less lambda will do): it runs
/// once per cycle, in the process - and thread - that arrives last, before the
/// others are released.  It travels as an offset inside its module (executable
/// or shared library), so it is found again in a spawned child as well as
/// under fork and fork server.  It must not use the barrier itself.
class Barrier {
public:
    using Action = void (*)();

    /// `parties` >= 1 (else std::invalid_argument); no default timeout.
    explicit Barrier(unsigned parties, Action action = nullptr) : Barrier(parties, action, -1) {}
    /// `timeout` is the default for wait() without a timeout.
    template <class Rep, class Period>
    Barrier(unsigned parties, Action action, std::chrono::duration<Rep, Period> timeout)
        : Barrier(parties, action, timeout_ns(timeout)) {}

    /// Waits for all parties (or the default timeout, if one was given).
    MPSERVICE_API unsigned wait();
    template <class Rep, class Period>
    unsigned wait(std::chrono::duration<Rep, Period> timeout) {
        return wait_until(detail::deadline_of(timeout));
    }
    /// Returns the barrier to its initial state; current waiters get BrokenBarrierError.
    MPSERVICE_API void reset();
    /// Breaks the barrier: current and future waiters get BrokenBarrierError until reset().
    MPSERVICE_API void abort();
    bool broken() const noexcept { return state_->broken.load(std::memory_order_acquire) != 0; }
    /// Parties waiting in the current cycle (a snapshot).
    unsigned n_waiting() const noexcept { return state_->count.load(std::memory_order_relaxed); }
    unsigned parties() const noexcept { return state_->parties; }

    /// Internal.
    explicit Barrier(detail::SharedRef<detail::BarrierState> state) : state_(std::move(state)) {}
    const detail::SharedRef<detail::BarrierState>& state_ref() const noexcept { return state_; }

private:
    MPSERVICE_API Barrier(unsigned parties, Action action, std::int64_t timeout_ns);
    MPSERVICE_API unsigned wait_until(detail::os::Deadline deadline);
    template <class Rep, class Period>
    static std::int64_t timeout_ns(std::chrono::duration<Rep, Period> t) {
        if (t < t.zero()) return 0;
        constexpr double limit_s = 100.0 * 365 * 24 * 3600;  // practically forever
        if (detail::os::seconds_of(t) > limit_s) return -1;
        return std::chrono::duration_cast<std::chrono::nanoseconds>(t).count();
    }
    detail::SharedRef<detail::BarrierState> state_;
};

// ============================================================================ codecs

// (Defined in the implementation: the shared-state references they read and
// write are instantiated there once, not in every includer.)
template <>
struct Codec<Lock> {
    MPSERVICE_API static void encode(Encoder& e, const Lock& l);
    MPSERVICE_API static Lock decode(Decoder& d);
};
template <>
struct Codec<RLock> {
    MPSERVICE_API static void encode(Encoder& e, const RLock& l);
    MPSERVICE_API static RLock decode(Decoder& d);
};
template <>
struct Codec<Condition> {
    MPSERVICE_API static void encode(Encoder& e, const Condition& c);
    MPSERVICE_API static Condition decode(Decoder& d);
};
template <>
struct Codec<Semaphore> {
    MPSERVICE_API static void encode(Encoder& e, const Semaphore& s);
    MPSERVICE_API static Semaphore decode(Decoder& d);
};
template <>
struct Codec<BoundedSemaphore> {
    MPSERVICE_API static void encode(Encoder& e, const BoundedSemaphore& s);
    MPSERVICE_API static BoundedSemaphore decode(Decoder& d);
};
template <>
struct Codec<Event> {
    MPSERVICE_API static void encode(Encoder& e, const Event& ev);
    MPSERVICE_API static Event decode(Decoder& d);
};
template <>
struct Codec<Barrier> {
    MPSERVICE_API static void encode(Encoder& e, const Barrier& b);
    MPSERVICE_API static Barrier decode(Decoder& d);
};

}  // namespace mpservice
// ---- end part: mpservice/public/synchronize.hpp
// ---- begin part: mpservice/public/sharedctypes.hpp --------------------------
// sharedctypes: Value<T>, RawValue<T>, Array<T> and RawArray<T> - plain data in
// shared memory (Python's multiprocessing.Value/RawValue/Array/RawArray).
//
// T must be trivially copyable: its bytes are shared as they are, so it may
// not own memory of the process that wrote it (no std::string, no pointers
// into the heap).  Reads and writes through any handle, in any process, act
// on the same bytes at once.
//
// Value and Array carry a lock (an RLock unless you choose Lock) that lives in
// the same shared block; get()/set()/with_lock()/to_vector() take it, the raw
// access paths (get_obj(), operator[], data()) do not - use them under
// get_lock(), e.g. `std::lock_guard g(v.get_lock()); v.get_obj() += 1;`.
// The Raw variants have no lock.
//
// Handles: copies, and copies received by other processes as Process
// arguments, refer to the same memory, which is freed when the last handle in
// the last process goes (see synchronize.hpp: no names, nothing to leak).
//
// Dead lock holders: the locked operations here (get, set, with_lock,
// to_vector) take the lock and, if its previous holder died, release it again
// and throw OwnerDiedError without doing their work - the data may be
// half-updated.  The lock is usable again at once; to inspect and repair the
// data before anyone else sees it, take the lock yourself with
// get_lock().acquire_checked() and check for LockStatus::owner_died.

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace mpservice {

namespace detail {

template <class T>
inline constexpr bool shareable_v = std::is_trivially_copyable_v<T> && !std::is_pointer_v<T> && !std::is_array_v<T>;

template <class L>
inline constexpr bool is_lock_type_v = std::is_same_v<L, Lock> || std::is_same_v<L, RLock>;

/// Takes a data lock for one of the locked operations; see the file comment.
class DataLockGuard {
public:
    explicit DataLockGuard(const LockRef& l) : l_(l) {
        if (lock_acquire(l_, os::no_deadline) == LockStatus::owner_died) {
            lock_release(l_);
            throw OwnerDiedError(
                "mpservice: a process died while holding the lock of this shared value or array, so the "
                "data may be half-updated; the operation was not done. The lock is usable again; take it "
                "with get_lock().acquire_checked() to inspect and repair the data");
        }
    }
    ~DataLockGuard() { lock_release(l_); }
    DataLockGuard(const DataLockGuard&) = delete;
    DataLockGuard& operator=(const DataLockGuard&) = delete;

private:
    const LockRef& l_;
};

/// A value together with the lock made for it, in one block.
template <class T>
struct LockedValueBlock {
    LockState lock;
    T value;
    explicit LockedValueBlock(const T& v) : value(v) {}
};

/// Layout of an array block: this header at offset 0, the lock (locked
/// arrays) right after it, the elements at data_offset.
struct ArrayHeader {
    std::uint64_t size = 0;
    std::uint64_t data_offset = 0;
};

inline constexpr std::size_t array_lock_offset = 64;  // the lock has a cache line of its own
static_assert(sizeof(ArrayHeader) <= array_lock_offset && array_lock_offset % alignof(LockState) == 0);

template <class T>
constexpr std::size_t array_data_offset(bool locked) {
    std::size_t start = locked ? array_lock_offset + sizeof(LockState) : sizeof(ArrayHeader);
    std::size_t align = alignof(T) > 64 ? alignof(T) : 64;  // elements start on a cache line of their own
    return (start + align - 1) / align * align;
}

/// The block of an array of n T, with the elements value-initialized (or,
/// from `init`, copied); returns the header.
template <class T>
SharedRef<ArrayHeader> create_array(std::size_t n, bool locked, const T* init, const T* fill) {
    const std::size_t offset = array_data_offset<T>(locked);
    if (n > (SIZE_MAX - offset) / sizeof(T))
        throw std::length_error("mpservice: shared array of " + std::to_string(n) + " elements is too large");
    // Zero-filled memory: skip the elements' first touch when zero bytes are
    // already their value-initialized state.
    auto ref = SharedRef<ArrayHeader>::create_sized(offset + n * sizeof(T) + (n == 0 ? 1 : 0));
    ref->size = n;
    ref->data_offset = offset;
    if (locked) ::new (static_cast<char*>(ref.memory().data()) + array_lock_offset) LockState();
    T* data = reinterpret_cast<T*>(static_cast<char*>(ref.memory().data()) + offset);
    for (std::size_t i = 0; i < n; ++i) {
        if (init)
            ::new (data + i) T(init[i]);
        else if (fill)
            ::new (data + i) T(*fill);
        else if (!std::is_trivially_default_constructible_v<T>)
            ::new (data + i) T();
    }
    return ref;
}

/// Decodes an array block and checks that its header fits the block.
template <class T>
SharedRef<ArrayHeader> decode_array(Decoder& d, bool locked) {
    auto ref = decode_ref<ArrayHeader>(d);
    if (ref.offset() != 0) throw DecodeError("decode: shared array header is not at the start of its block");
    const std::uint64_t size = ref->size, offset = ref->data_offset;
    const std::size_t total = ref.memory().size();
    if (offset < array_data_offset<T>(locked) || offset % alignof(T) != 0 || offset > total ||
        size > (total - offset) / sizeof(T))
        throw DecodeError("decode: shared array does not fit its shared memory block");
    return ref;
}

template <class T>
T* array_data(const SharedRef<ArrayHeader>& h) noexcept {
    return reinterpret_cast<T*>(static_cast<char*>(h.memory().data()) + h->data_offset);
}

}  // namespace detail

// ============================================================================ RawValue

/// A T in shared memory, without a lock (Python's RawValue).  Accesses are
/// plain loads and stores: synchronize them yourself.
template <class T>
class RawValue {
    static_assert(detail::shareable_v<T>,
                  "mpservice::RawValue<T>: T must be trivially copyable, not a pointer, not a C array (use "
                  "RawArray) - its bytes are shared between processes as they are");

public:
    using value_type = T;

    /// A new shared T holding `initial`.
    explicit RawValue(const T& initial = T{}) : value_(detail::SharedRef<T>::create_sized(sizeof(T), initial)) {}

    T get() const noexcept { return *value_; }
    void set(const T& v) const noexcept { *value_ = v; }
    T load() const noexcept { return get(); }
    void store(const T& v) const noexcept { set(v); }
    RawValue& operator=(const T& v) noexcept {
        set(v);
        return *this;
    }
    /// The shared T itself.
    T& get_obj() const noexcept { return *value_; }
    T& operator*() const noexcept { return *value_; }
    T* operator->() const noexcept { return value_.get(); }

    /// Internal.
    explicit RawValue(detail::SharedRef<T> ref) : value_(std::move(ref)) {}
    const detail::SharedRef<T>& ref() const noexcept { return value_; }

private:
    detail::SharedRef<T> value_;
};

// ============================================================================ Value

/// A T in shared memory guarded by a lock (Python's Value): an RLock of its own
/// by default, or Lock with Value<T, mp::Lock>, or a lock you pass in.
template <class T, class L = RLock>
class Value {
    static_assert(detail::shareable_v<T>,
                  "mpservice::Value<T>: T must be trivially copyable, not a pointer, not a C array - its bytes are "
                  "shared between processes as they are");
    static_assert(detail::is_lock_type_v<L>, "mpservice::Value<T, L>: L must be mpservice::Lock or RLock");

public:
    using value_type = T;
    using lock_type = L;

    /// A new shared T holding `initial`, with a new lock in the same block.
    explicit Value(const T& initial = T{}) {
        auto block = detail::SharedRef<detail::LockedValueBlock<T>>::create_sized(
            sizeof(detail::LockedValueBlock<T>), initial);
        value_ = block.alias(&block->value);
        lock_ = L(block.alias(&block->lock));
    }
    /// A new shared T guarded by `lock`, which may guard other objects too.
    Value(const T& initial, L lock)
        : value_(detail::SharedRef<T>::create_sized(sizeof(T), initial)), lock_(std::move(lock)) {}

    /// Reads under the lock.
    T get() const {
        detail::DataLockGuard g(lock_.lock_ref());
        return *value_;
    }
    /// Writes under the lock.
    void set(const T& v) const {
        detail::DataLockGuard g(lock_.lock_ref());
        *value_ = v;
    }
    T load() const { return get(); }
    void store(const T& v) const { set(v); }
    Value& operator=(const T& v) {
        set(v);
        return *this;
    }
    /// Calls f(T&) on the shared T under the lock; returns what f returns.
    template <class F>
    decltype(auto) with_lock(F&& f) const {
        detail::DataLockGuard g(lock_.lock_ref());
        return std::forward<F>(f)(*value_);
    }

    /// The lock: `std::lock_guard g(v.get_lock());` then use get_obj().
    L& get_lock() const noexcept { return lock_; }
    /// The shared T itself, unsynchronized.
    T& get_obj() const noexcept { return *value_; }

    /// Internal.
    Value(detail::SharedRef<T> value, L lock) : value_(std::move(value)), lock_(std::move(lock)) {}
    const detail::SharedRef<T>& ref() const noexcept { return value_; }

private:
    detail::SharedRef<T> value_;
    mutable L lock_{detail::SharedRef<detail::LockState>()};
};

// ============================================================================ RawArray

/// A fixed-size array of T in shared memory, without a lock (Python's RawArray).
/// Contiguous; span-like access.  Elements start value-initialized.
template <class T>
class RawArray {
    static_assert(detail::shareable_v<T>,
                  "mpservice::RawArray<T>: T must be trivially copyable, not a pointer, not a C array - its bytes are "
                  "shared between processes as they are");

public:
    using value_type = T;
    using size_type = std::size_t;
    using iterator = T*;
    using const_iterator = const T*;

    /// n value-initialized elements.  (Note: RawArray<int>{5} is one element, 5.)
    explicit RawArray(std::size_t n) : header_(detail::create_array<T>(n, false, nullptr, nullptr)) {}
    RawArray(std::size_t n, const T& fill) : header_(detail::create_array<T>(n, false, nullptr, &fill)) {}
    RawArray(std::initializer_list<T> init)
        : header_(detail::create_array<T>(init.size(), false, init.begin(), nullptr)) {}
    explicit RawArray(const std::vector<T>& init)
        : header_(detail::create_array<T>(init.size(), false, init.data(), nullptr)) {}

    std::size_t size() const noexcept { return static_cast<std::size_t>(header_->size); }
    bool empty() const noexcept { return size() == 0; }
    T* data() const noexcept { return detail::array_data<T>(header_); }
    T& operator[](std::size_t i) const noexcept { return data()[i]; }
    /// Bounds-checked element access; throws std::out_of_range.
    T& at(std::size_t i) const {
        if (i >= size())
            throw std::out_of_range("mpservice: array index " + std::to_string(i) + " out of range (size " +
                                    std::to_string(size()) + ")");
        return data()[i];
    }
    T* begin() const noexcept { return data(); }
    T* end() const noexcept { return data() + size(); }
    std::vector<T> to_vector() const { return std::vector<T>(begin(), end()); }

    /// Internal.
    explicit RawArray(detail::SharedRef<detail::ArrayHeader> header) : header_(std::move(header)) {}
    const detail::SharedRef<detail::ArrayHeader>& ref() const noexcept { return header_; }

private:
    detail::SharedRef<detail::ArrayHeader> header_;
};

// ============================================================================ Array

/// A fixed-size array of T in shared memory with a lock in the same block
/// (Python's Array).  Element access is unsynchronized; take get_lock() around
/// it, or use with_lock()/to_vector().
template <class T, class L = RLock>
class Array {
    static_assert(detail::shareable_v<T>,
                  "mpservice::Array<T>: T must be trivially copyable, not a pointer, not a C array - its bytes are "
                  "shared between processes as they are");
    static_assert(detail::is_lock_type_v<L>, "mpservice::Array<T, L>: L must be mpservice::Lock or RLock");

public:
    using value_type = T;
    using size_type = std::size_t;
    using iterator = T*;
    using const_iterator = const T*;
    using lock_type = L;

    /// n value-initialized elements.  (Note: Array<int>{5} is one element, 5.)
    explicit Array(std::size_t n) : Array(detail::create_array<T>(n, true, nullptr, nullptr)) {}
    Array(std::size_t n, const T& fill) : Array(detail::create_array<T>(n, true, nullptr, &fill)) {}
    Array(std::initializer_list<T> init) : Array(detail::create_array<T>(init.size(), true, init.begin(), nullptr)) {}
    explicit Array(const std::vector<T>& init)
        : Array(detail::create_array<T>(init.size(), true, init.data(), nullptr)) {}

    std::size_t size() const noexcept { return static_cast<std::size_t>(header_->size); }
    bool empty() const noexcept { return size() == 0; }
    T* data() const noexcept { return detail::array_data<T>(header_); }
    T& operator[](std::size_t i) const noexcept { return data()[i]; }
    /// Bounds-checked element access; throws std::out_of_range.
    T& at(std::size_t i) const {
        if (i >= size())
            throw std::out_of_range("mpservice: array index " + std::to_string(i) + " out of range (size " +
                                    std::to_string(size()) + ")");
        return data()[i];
    }
    T* begin() const noexcept { return data(); }
    T* end() const noexcept { return data() + size(); }

    /// A copy of the elements, taken under the lock.
    std::vector<T> to_vector() const {
        detail::DataLockGuard g(lock_.lock_ref());
        return std::vector<T>(begin(), end());
    }
    /// Calls f(*this) under the lock; returns what f returns.
    template <class F>
    decltype(auto) with_lock(F&& f) const {
        detail::DataLockGuard g(lock_.lock_ref());
        return std::forward<F>(f)(*this);
    }
    L& get_lock() const noexcept { return lock_; }

    /// Internal.
    explicit Array(detail::SharedRef<detail::ArrayHeader> header)
        : header_(std::move(header)),
          lock_(header_.alias(reinterpret_cast<detail::LockState*>(static_cast<char*>(header_.memory().data()) +
                                                                   detail::array_lock_offset))) {}
    const detail::SharedRef<detail::ArrayHeader>& ref() const noexcept { return header_; }

private:
    detail::SharedRef<detail::ArrayHeader> header_;
    mutable L lock_;
};

// ============================================================================ codecs

template <class T>
struct Codec<RawValue<T>> {
    static void encode(Encoder& e, const RawValue<T>& v) { detail::encode_ref(e, v.ref()); }
    static RawValue<T> decode(Decoder& d) { return RawValue<T>(detail::decode_ref<T>(d)); }
};

template <class T, class L>
struct Codec<Value<T, L>> {
    static void encode(Encoder& e, const Value<T, L>& v) {
        detail::encode_ref(e, v.ref());
        detail::encode_lock_beside(e, v.ref().memory(), v.get_lock().lock_ref());
    }
    static Value<T, L> decode(Decoder& d) {
        auto value = detail::decode_ref<T>(d);
        auto lock = detail::decode_lock_beside(d, value.memory());
        if (lock.recursive != std::is_same_v<L, RLock>) throw DecodeError("decode: Value lock kind differs");
        return Value<T, L>(std::move(value), L(std::move(lock.state)));
    }
};

template <class T>
struct Codec<RawArray<T>> {
    static void encode(Encoder& e, const RawArray<T>& a) { detail::encode_ref(e, a.ref()); }
    static RawArray<T> decode(Decoder& d) { return RawArray<T>(detail::decode_array<T>(d, false)); }
};

template <class T, class L>
struct Codec<Array<T, L>> {
    static void encode(Encoder& e, const Array<T, L>& a) { detail::encode_ref(e, a.ref()); }
    static Array<T, L> decode(Decoder& d) { return Array<T, L>(detail::decode_array<T>(d, true)); }
};

}  // namespace mpservice
// ---- end part: mpservice/public/sharedctypes.hpp
// ---- begin part: mpservice/public/queues.hpp --------------------------------
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

// ---- begin part: mpservice/detail/queue_ring.hpp ----------------------------
// queue_ring: the untyped engine under Queue<T>, SimpleQueue<T> and JoinableQueue<T>.
//
// One block of shared memory holds a header and a byte ring.  Items travel as
// encoded bytes in *records* (8-byte aligned, never straddling the ring's end):
//
//     whole  [len u32 | kind u32 | payload ...]            an item that fits in half the ring
//     first  [len u32 | kind u32 | total u64 | payload]    first chunk of a larger item
//     cont   [len u32 | kind u32 | payload ...]            a middle chunk ("last" for the final one)
//     pad    [len u32 | kind u32 | skipped ...]            fills the ring's end so records stay contiguous
//
// Producers are serialized by one robust mutex (the put lock), consumers by another
// (the get lock): between them the ring behaves as a single-producer single-consumer
// ring whose positions (tail, head) are published with release stores.  Each side
// commits its positions and counters through a small journal (see commit_put /
// commit_get), so a process killed between two stores leaves a commit the next
// holder of the lock finishes ("rolls forward").
//
// Unbounded in bytes (the default: no byte capacity given).  The ring is a sparse
// reservation of unbounded_reserve bytes (a memfd of that size: pages exist only
// once written), so a put never waits for room.  To keep the pages it touches few
// and warm, a producer that finds the queue empty once it is past the first
// hot_bytes of the ring starts the next cycle at the ring's start (a pad record),
// and gives back the pages it wrote past them.  A consumer that falls behind
// lets the producers run on into fresh pages, and gives those back as it
// consumes them (in batches, holding both locks: the pages given back lie below
// the committed head, so neither a crash nor a producer can be hurt by it).
//
// Parked items.  A get that reaches its timeout in the middle of a streamed
// item (its producer is stopped, or slow) keeps the part it received in its
// process and records the item in the header, then reports the timeout.  The
// next get in that process continues the item where it stopped.  A get in
// another process finds the rest of a parked item at the head: it waits (within
// its own timeout) until the parking process has taken it - or, if that
// process has ended, drops the rest, as for a consumer killed mid-item.
//
// Waiting: futex words with a "sleepers" flag.  A waiter spins briefly, then sets
// the flag and sleeps; a notifier pays a system call only if the flag is set and
// clears it when it wakes everyone, so a waiter killed while asleep does not leave
// the notifiers paying for a wake-up forever.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace mpservice::detail {

/// A futex word plus the flag that says someone may sleep on it.
struct alignas(64) QueueWaitWord {
    std::atomic<std::uint32_t> seq{0};
    std::atomic<std::uint32_t> sleepers{0};
};

/// Everything that lives at the start of a queue's shared block.  Trivially
/// destructible: nobody knows which process is the last one to leave.
struct QueueHeader {
    // ---- set once by the creator, read-only afterwards
    std::uint32_t magic = 0;
    std::uint32_t kind = 0;       // QueueKind
    std::uint64_t type_tag = 0;   // which T the queue carries (a hash of its type name)
    std::uint64_t capacity = 0;   // ring bytes, a multiple of 64
    std::uint64_t maxsize = 0;    // item bound, 0 = none
    std::uint64_t ring_offset = 0;
    std::uint64_t uid = 0;        // tells queues apart within a process (parked items)
    // 0 for a ring bounded in bytes.  Otherwise the ring is a large sparse
    // reservation (`capacity`) of which only the first `hot_bytes` are reused
    // cycle after cycle; see "Unbounded in bytes" above.
    std::uint64_t hot_bytes = 0;

    alignas(64) std::atomic<std::uint32_t> closed{0};

    // ---- producers' private state, guarded by put_lock
    alignas(64) os::RobustMutex put_lock;
    std::uint64_t head_cache = 0;  // a lower bound of `head`, saves reading the consumers' line
    std::uint64_t j_tail = 0, j_completed = 0;
    std::atomic<std::uint32_t> j_put_active{0};
    // Unbounded in bytes: the next position at which a producer past the hot
    // part looks whether the queue is empty (to start the next cycle early).
    // Looking reads the consumers' line; once per page is enough.
    std::uint64_t wrap_check_at = 0;
    // Unbounded in bytes: pages of positions below this (in its ring cycle,
    // beyond the hot part) were given back.  Changed only with the put lock held.
    std::atomic<std::uint64_t> released{0};

    // ---- published by producers, read by consumers
    alignas(64) std::atomic<std::uint64_t> tail{0};       // bytes ever published
    std::atomic<std::uint64_t> completed{0};              // items ever published completely
    std::atomic<std::uint64_t> streaming{0};              // id of the chunked item in progress, 0 = none

    // ---- consumers' private state, guarded by get_lock
    alignas(64) os::RobustMutex get_lock;
    std::uint64_t tail_cache = 0;  // a lower bound of `tail`
    std::uint64_t j_head = 0, j_taken = 0;
    std::atomic<std::uint32_t> j_get_active{0};
    // Unbounded in bytes: the next position at which a consumer past the hot
    // part looks whether pages can be given back (reading the producers' line:
    // once per page is enough).
    std::uint64_t release_check_at = 0;
    // A streamed item a get left half-received at its timeout (see "Parked
    // items"): its id and the process that holds the part received.
    std::atomic<std::uint64_t> parked_item{0};
    std::atomic<std::int64_t> parked_pid{0};

    // ---- published by consumers, read by producers
    alignas(64) std::atomic<std::uint64_t> head{0};       // bytes ever consumed
    std::atomic<std::uint64_t> taken{0};                  // items ever taken completely

    // ---- JoinableQueue
    alignas(64) std::atomic<std::uint64_t> tasks_done{0};

    QueueWaitWord data;    // "a record was published" and "the queue was closed"
    QueueWaitWord space;   // "a record was consumed" and "the queue was closed"
    QueueWaitWord joined;  // "task_done was called"
};

enum class QueueKind : std::uint32_t { queue = 1, simple = 2, joinable = 3 };

/// A per-process handle to one shared queue of bytes.  Copies share the queue.
class QueueCore {
public:
    enum class Status { ok, timeout, closed };
    /// Called with the bytes of one item (valid only during the call).
    using Consume = void (*)(void* context, const unsigned char* data, std::size_t size);

    QueueCore() = default;
    MPSERVICE_API static QueueCore create(QueueKind kind, std::uint64_t type_tag, std::size_t maxsize,
                                          std::size_t capacity_bytes);
    /// Attaches to a queue that arrived from another process; checks that it is a
    /// queue of this kind and item type.
    MPSERVICE_API static QueueCore attach(SharedMemory memory, QueueKind kind, std::uint64_t type_tag);

    /// Puts one item's bytes: ok, timeout (no room before `deadline`) or closed.
    MPSERVICE_API Status put(const void* data, std::size_t size, os::Deadline deadline);
    /// Takes one item and hands its bytes to `consume`: ok, timeout (nothing
    /// before `deadline`) or closed (closed and drained).  An exception from
    /// `consume` propagates; the item is consumed all the same.
    Status get(Consume consume, void* context, os::Deadline deadline) {
        std::size_t taken = 0;
        return get_many(consume, context, 1, taken, deadline);
    }

    /// Gives the bytes of item `index` of a batch being put: sets *data and
    /// *size, valid until the next call.  May throw (the batch stops there).
    using Source = void (*)(void* context, std::size_t index, const void** data, std::size_t* size);
    /// Puts items [0, count) of a batch in order, holding the put lock once and
    /// publishing them with one commit - more only where it must: before waiting
    /// for room (so consumers can make it) and around an item streamed in chunks.
    /// `done` is the number put, always a prefix of the batch: ok (all),
    /// timeout or closed (the rest was not put).  An exception from `source`
    /// propagates after the items before it are published.
    MPSERVICE_API Status put_many(Source source, void* context, std::size_t count, std::size_t& done,
                                  os::Deadline deadline);
    /// Takes up to `max_items` items (at least 1 unless it returns timeout or
    /// closed), waiting for the first until `deadline` but not for the others:
    /// it takes whole items that are already there, in order, hands each to
    /// `consume`, and takes them off the ring with one commit.  A streamed item
    /// (larger than half the ring) comes alone.  `taken` is the number handed
    /// over.  An exception from `consume` propagates; that item and the ones
    /// before it are consumed.
    MPSERVICE_API Status get_many(Consume consume, void* context, std::size_t max_items, std::size_t& taken,
                                  os::Deadline deadline);

    MPSERVICE_API std::size_t qsize() const noexcept;
    MPSERVICE_API bool full() const noexcept;
    std::size_t maxsize() const noexcept { return static_cast<std::size_t>(h_->maxsize); }
    std::size_t capacity() const noexcept { return static_cast<std::size_t>(h_->capacity); }
    /// The byte bound the queue was made with, 0 for none.
    std::size_t byte_bound() const noexcept { return h_->hot_bytes ? 0 : static_cast<std::size_t>(h_->capacity); }
    MPSERVICE_API void close() noexcept;
    bool closed() const noexcept { return h_->closed.load(std::memory_order_acquire) != 0; }

    /// JoinableQueue: marks one taken item done; throws std::invalid_argument
    /// when called more often than items were put.
    MPSERVICE_API void task_done();
    /// JoinableQueue: true once every item put has been marked done.
    MPSERVICE_API bool join(os::Deadline deadline);

    const SharedMemory& memory() const noexcept { return mem_; }
    explicit operator bool() const noexcept { return h_ != nullptr; }

    /// A per-thread buffer reused for encoding items (no allocation per put).
    MPSERVICE_API static std::string& encode_buffer();
    /// A stable tag for a type name (FNV-1a).
    static std::uint64_t tag_of(const char* name) noexcept {
        std::uint64_t h = 1469598103934665603ull;
        for (; *name; ++name) h = (h ^ static_cast<unsigned char>(*name)) * 1099511628211ull;
        return h;
    }

private:
    enum class Taken { delivered, discarded, parked };

    /// Pads the ring's end if a record of `bytes` would cross it (advancing
    /// `tail`), then waits until the record fits.
    Status make_room(std::uint64_t& tail, std::uint64_t bytes, os::Deadline deadline);
    Status put_chunked(const void* data, std::size_t size, os::Deadline deadline);
    /// Waits (holding the put lock) until the item bound leaves room for one more
    /// than `pending` uncommitted items: ok, timeout or closed.
    Status wait_below_maxsize(std::uint64_t pending, os::Deadline deadline);
    /// Takes, after the whole record just consumed at `head` (ending at `next`),
    /// the whole records that follow, up to `max_items` in all; commits once.
    std::size_t take_following(std::uint64_t next, std::uint64_t taken, std::size_t max_items, Consume consume,
                               void* context);
    bool wait_for_room(std::uint64_t tail, std::uint64_t bytes, os::Deadline deadline, bool give_up_on_close);
    void write_pad(std::uint64_t tail, std::uint64_t bytes);
    void commit_put(std::uint64_t tail, std::uint64_t completed) noexcept;
    void commit_get(std::uint64_t head, std::uint64_t taken) noexcept;
    void recover_put() noexcept;
    void recover_get() noexcept;
    void probe_producers() noexcept;
    void probe_consumers() noexcept;
    /// Unbounded in bytes: true if a producer at `tail` should start the ring's
    /// next cycle now (past the hot part, queue empty - or emptied by
    /// consumers that were taking the items, see wait_for_drain).
    bool should_wrap_early(std::uint64_t tail, os::Deadline deadline) noexcept;
    /// Past the hot part with items queued (`head` < `tail`): waits, spinning
    /// and yielding, while the consumers keep taking items, for the ring to
    /// empty (true), so that the next cycle reuses the warm pages at the
    /// ring's start.  Running on instead writes fresh pages - an allocation,
    /// zeroing and a later release per 4 KiB, about 5 us on the VMs measured,
    /// more than the copy of the four 1 KiB items a page holds - and a
    /// consumer slower than its producer would keep it doing so.  Consumers
    /// that stall (stopped, dead, or this very thread) end the wait within
    /// drain_stall, and this handle waits again only drain_retry_bytes later;
    /// the wait never exceeds drain_wait_limit nor the put's deadline.  Put lock held.
    bool wait_for_drain(std::uint64_t tail, std::uint64_t head, os::Deadline deadline) noexcept;
    /// Starts the next cycle at `tail` (a pad to the ring's end; the pages past
    /// the hot part given back); advances `tail`.  Put lock held.
    void wrap_early(std::uint64_t& tail) noexcept;
    /// Whether a producer at `tail` is due to look at should_wrap_early (put lock held).
    bool wrap_check_due(std::uint64_t tail) const noexcept {
        return offset(tail) >= wrap_from_ && tail >= h_->wrap_check_at;
    }
    /// Whether a consumer whose head moved to `head` is due to call release_consumed (get lock held).
    bool release_check_due(std::uint64_t head) const noexcept {
        return offset(head) >= release_from_ && head >= h_->release_check_at;
    }
    /// Gives back the pages of this cycle, past the hot part, below `below`
    /// (a position no process reads or writes any more); needs the put lock.
    void release_pages_below(std::uint64_t below) noexcept;
    /// A consumer's chance to give back what it consumed: with the put lock if free.
    void release_consumed() noexcept;
    /// Unbounded in bytes: maps, in this process, the pages from `tail` on
    /// that a producer is about to write - a batch per system call.  A
    /// producer running ahead of its consumers writes fresh pages all the
    /// time, and a fault per 4 KiB cost more than the copy of a 1 KiB item.
    void map_ahead_for_write(std::uint64_t tail, std::uint64_t bytes) noexcept;
    /// The same for a consumer at `head`: the committed pages it is about to read.
    void map_ahead_for_read(std::uint64_t head) noexcept;
    bool read_map_due(std::uint64_t head) const noexcept { return head + 64 > read_mapped_to_; }
    Taken read_chunked(std::uint64_t head, std::string& out, os::Deadline deadline);
    /// Receives the rest of item `id` (`received` of `total` bytes in `out`).
    Taken continue_chunked(std::uint64_t head, std::uint64_t id, std::uint64_t received, std::uint64_t total,
                           std::string& out, os::Deadline deadline);
    /// A parked item at the head: resumes it (ours), waits for its process
    /// (someone else's), or drops it (its process ended).  Holding the get lock.
    enum class ParkedAction { none, resumed, dropped, wait };
    ParkedAction handle_parked(std::string& out, std::uint64_t& total, os::Deadline deadline, Taken& result);
    /// Where `position` falls in the ring.  A 64-bit division costs ~25-40 cycles,
    /// as much as the rest of an uncontended put: a ring whose capacity is a power
    /// of two (the default) takes a mask instead.
    std::uint64_t offset(std::uint64_t position) const noexcept {
        return mask_ ? position & mask_ : position % h_->capacity;
    }
    unsigned char* at(std::uint64_t position) const noexcept { return ring_ + offset(position); }
    /// The per-handle copies of the header's limits (see set_limits).
    void set_limits() noexcept;

    SharedMemory mem_;
    QueueHeader* h_ = nullptr;
    unsigned char* ring_ = nullptr;
    std::uint64_t mask_ = 0;  // capacity - 1 when the capacity is a power of two, else 0
    std::uint64_t whole_limit_ = 0;   // larger records are streamed in chunks...
    std::uint64_t chunk_bytes_ = 0;   // ...of this size
    std::uint64_t wrap_from_ = ~std::uint64_t(0);     // unbounded: offset past which a producer may wrap early
    std::uint64_t release_from_ = ~std::uint64_t(0);  // unbounded: offset past which consumers give pages back
    // Unbounded: positions up to which this process has mapped the ring's pages
    // ahead of its writes / reads (bounded rings are mapped whole at attach).
    std::uint64_t write_mapped_to_ = ~std::uint64_t(0);
    std::uint64_t read_mapped_to_ = ~std::uint64_t(0);
    bool kept_mapped_for_write_ = false;  // this process has mapped the kept pages (see map_ahead_for_write)
    bool kept_mapped_for_read_ = false;
    std::uint64_t drain_retry_at_ = 0;  // wait_for_drain gave up: not before this position again
};

}  // namespace mpservice::detail
// ---- end part: mpservice/detail/queue_ring.hpp

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
// ---- end part: mpservice/public/queues.hpp
// ---- begin part: mpservice/public/connection.hpp ----------------------------
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

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

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
// ---- end part: mpservice/public/connection.hpp
// ---- begin part: mpservice/public/pool.hpp ----------------------------------
// pool: Pool, a pool of worker processes, and AsyncResult<R>, the future of
// one submission to it.
//
//     mp::Pool pool(4);                                   // or mp::Pool pool(ctx, 4, options)
//     std::vector<double> a = pool.map(work, inputs);     // input order; optional chunksize
//     for (double r : pool.imap(work, inputs)) ...        // input order, lazy, bounded
//     for (double r : pool.imap_unordered(work, inputs)) ...
//     auto b = pool.starmap(add, std::vector<std::tuple<int, int>>{{1, 2}, {3, 4}});
//     double c = pool.apply(work, 21);
//     mp::AsyncResult<double> d = pool.apply_async(work, 21);
//     pool.close(); pool.join();                          // or pool.terminate()
//
// Workers are the library's processes (spawned by default): their log records
// reach the parent's handler, a task's exception comes back typed with the
// worker's throw-site stack, and library handles (Lock, Queue, Value, ...) can
// be task arguments.  Targets are what Process accepts in the spawn context -
// free functions, static member functions, capture-less lambdas - under every
// context (a lambda with captures is refused at compile time... or at run time).
//
// The data path of a task: the caller encodes a chunk of arguments (codec),
// the pool puts it on one worker's own task ring (shared memory, so the pool
// knows which worker holds which task), the worker runs the items one by one,
// recording each outcome in its own shared progress slot, and sends the
// chunk's outcomes on the pool's result ring; in the parent, the caller that
// waits reads that ring itself (PoolCore::serve_until: one reader at a time)
// and decodes what it finds into the AsyncResults / imap buffers, running the
// callbacks; the pool's result thread takes what nobody waits for, on a tick.
//
// A worker that dies in a task (signal, exit(n)) fails exactly that task with
// ProcessError naming the signal or code: the outcomes of the items of its
// chunk that had finished are read from its progress slot, the items after the
// fatal one are sent to another worker, nothing runs twice.  The worker is
// replaced and the pool keeps serving.
//
// Lifetime: destroying a Pool terminates it (as Python's `with Pool() as p:`
// does); call close() and join() first to wait for the queued work.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace mpservice {

template <class R>
class AsyncResult;
class Pool;

namespace detail {

// ---------------------------------------------------------------- result records

/// A record of a result message: [PoolRecordHeader | payload].  Its kind is
/// record_value (one encoded value), record_error (one encoded exception) or
/// dense_record_kind(e): the values of consecutive items, e bytes each, back to
/// back - the form of bitwise results (numbers, trivially copyable structs),
/// which a worker appends in place with no header per item.
struct PoolRecordHeader {
    std::uint32_t size;
    std::uint32_t kind;
};
constexpr std::uint32_t record_value = 0;
constexpr std::uint32_t record_error = 1;
constexpr std::uint32_t record_dense = 2;  // the low byte of a dense record's kind
/// Results of at most this size travel densely.
constexpr std::uint32_t dense_max_elem = 4096;
constexpr std::uint32_t dense_record_kind(std::uint32_t elem) { return record_dense | (elem << 8); }

/// Walks the records of a result message's body (records of items first,
/// first + 1, ...): item(index, kind, data, size) for each encoded one,
/// run(index, count, elem, data) for the `count` values of a dense record.
/// Stops at a torn record; a dense record longer than the bytes there (a
/// dead worker's slot: it had grown the record's size, not yet the slot's
/// length) gives the whole values it holds.  Returns the index after the last.
template <class Item, class Run>
std::uint32_t walk_record_runs(const unsigned char* p, std::size_t n, std::uint32_t first, Item&& item, Run&& run) {
    std::size_t at = 0;
    std::uint32_t index = first;
    while (at + sizeof(PoolRecordHeader) <= n) {
        PoolRecordHeader rh;
        std::memcpy(&rh, p + at, sizeof rh);
        at += sizeof rh;
        const std::size_t avail = n - at;
        if ((rh.kind & 0xFFu) == record_dense) {
            const std::size_t elem = rh.kind >> 8;
            if (elem == 0) break;
            const auto count = static_cast<std::uint32_t>(std::min<std::size_t>(rh.size, avail) / elem);
            if (count) run(index, count, elem, p + at);
            index += count;
            if (rh.size > avail) break;
        } else {
            if (rh.size > avail) break;  // torn: cannot happen with a committed length
            item(index++, rh.kind, p + at, static_cast<std::size_t>(rh.size));
        }
        at += rh.size;
    }
    return index;
}
/// As walk_record_runs, with a dense record's values given one by one:
/// fn(index, kind, data, size) for every item.
template <class F>
std::uint32_t walk_records(const unsigned char* p, std::size_t n, std::uint32_t first, F&& fn) {
    return walk_record_runs(p, n, first, fn,
                            [&](std::uint32_t index, std::uint32_t count, std::size_t elem, const unsigned char* d) {
                                for (std::uint32_t k = 0; k < count; ++k) fn(index + k, record_value, d + k * elem, elem);
                            });
}

// ---------------------------------------------------------------- worker side

/// A worker's write position in its progress slot (impl/pool.cpp), shared
/// with the inline fast path of bitwise results (ItemSink::commit_bitwise).
struct SlotCursor {
    static constexpr std::uint32_t no_dense = 0xFFFFFFFFu;
    std::atomic<std::uint32_t>* index = nullptr;  // the slot's "item being run"
    std::atomic<std::uint32_t>* used = nullptr;   // the slot's committed record bytes
    unsigned char* records = nullptr;             // the slot's records
    std::uint32_t base = 0;             // the message's first item (in the chunk)
    std::uint32_t next_local = 0;       // items of the message with an outcome
    std::uint32_t in_slot = 0;          // items with a record in the slot now
    std::uint32_t end = 0;              // == *used (this worker is its only writer)
    std::uint32_t dense_at = no_dense;  // the open dense record's header, or none
    std::uint32_t dense_elem = 0;
};
/// A worker sends its slot's records once they fill this much of it: small
/// messages stay in the caches of both ends (a 256 KiB one is a cache miss
/// per line on each side, and a fresh allocation in the parent).
constexpr std::uint32_t pool_slot_flush_bytes = 16u << 10;

/// Where a worker records the outcome of each item of the chunk it runs
/// (impl/pool.cpp): in its shared progress slot first, so that a crash loses
/// only the item in progress, then on the pool's result ring.
class ItemSink {
public:
    /// Item `local` of the chunk (0-based) is about to run.
    MPSERVICE_API void begin(std::uint32_t local);
    /// The encoder for the item's result (empty at begin()).
    Encoder& out() noexcept { return out_; }
    /// The item returned (its value, if any, is in out()).
    MPSERVICE_API void commit_value();
    /// The item threw.
    MPSERVICE_API void commit_error(const std::exception_ptr& e);
    /// The item returned a bitwise value of `size` bytes (<= dense_max_elem):
    /// appended to the slot's dense record (opened, or the slot sent, first if need be).
    MPSERVICE_API void commit_dense(const void* value, std::uint32_t size);

    /// begin() for an item whose result is bitwise (out() is not used).
    void begin_bitwise(std::uint32_t local) { cur->index->store(cur->base + local, std::memory_order_release); }
    /// commit_dense() of a value, inline while the open dense record has room:
    /// the value's bytes, the record's size, then the slot's length are
    /// stored, in that order, so a parent reading a dead worker's slot sees
    /// every value the length covers.
    template <class R>
    void commit_bitwise(const R& v) {
        SlotCursor& c = *cur;
        if (c.dense_elem == sizeof(R) && c.dense_at != SlotCursor::no_dense &&
            c.end + sizeof(R) < pool_slot_flush_bytes) {
            std::memcpy(c.records + c.end, &v, sizeof(R));
            c.end += static_cast<std::uint32_t>(sizeof(R));
            const std::uint32_t size = c.end - c.dense_at - static_cast<std::uint32_t>(sizeof(PoolRecordHeader));
            std::memcpy(c.records + c.dense_at, &size, sizeof size);
            c.used->store(c.end, std::memory_order_release);
            ++c.in_slot;
            ++c.next_local;
        } else {
            commit_dense(&v, static_cast<std::uint32_t>(sizeof(R)));
        }
    }

    void* link = nullptr;         // the worker's slot and rings (impl/pool.cpp)
    SlotCursor* cur = nullptr;    // its write position (in *link)

private:
    Encoder out_;
};

/// Runs `count` items whose arguments are in `in`; `state` is a ProcessRunner's object.
using ChunkRunner = void (*)(const void* fn, void* state, Decoder& in, std::uint32_t count, ItemSink& sink);

/// Results that travel densely (dense_record_kind): the codec copies them byte for byte.
template <class R, class = void>
struct dense_result_t : std::false_type {};
template <class R>
struct dense_result_t<R, std::enable_if_t<!std::is_void_v<R>>>
    : std::bool_constant<is_bitwise_v<R> && sizeof(R) <= dense_max_elem> {};
template <class R>
inline constexpr bool dense_result = dense_result_t<R>::value;

template <class R, class... A, class Call>
void run_items(Decoder& in, std::uint32_t count, ItemSink& sink, Call& call) {
    for (std::uint32_t i = 0; i < count; ++i) {
        std::tuple<A...> args{in.read<A>()...};  // braced: decoded left to right
        if constexpr (dense_result<R>) {
            sink.begin_bitwise(i);
        } else {
            sink.begin(i);
        }
        try {
            if constexpr (std::is_void_v<R>) {
                std::apply(call, std::move(args));
            } else if constexpr (dense_result<R>) {
                sink.commit_bitwise(static_cast<const R&>(std::apply(call, std::move(args))));
                continue;
            } else {
                sink.out().write(std::apply(call, std::move(args)));
            }
        } catch (...) {
            sink.commit_error(std::current_exception());
            continue;
        }
        sink.commit_value();
    }
}

/// The runner of a pool task: a plain function of arguments A...
template <class Fn, class... A>
void run_function_chunk(const void* fn, void*, Decoder& in, std::uint32_t count, ItemSink& sink) {
    Fn f = reinterpret_cast<Fn>(reinterpret_cast<std::uintptr_t>(fn));
    using R = std::invoke_result_t<Fn, A...>;
    run_items<R, A...>(in, count, sink, f);
}

/// The runner of a ProcessRunner call: T::operator()(A...) on the worker's object.
template <class T, class... A>
void run_method_chunk(const void*, void* state, Decoder& in, std::uint32_t count, ItemSink& sink) {
    T& obj = *static_cast<T*>(state);
    using R = std::invoke_result_t<T&, A...>;
    auto call = [&obj](A&&... a) -> R { return obj(std::move(a)...); };
    run_items<R, A...>(in, count, sink, call);
}

/// What a worker process is handed at start: its task ring, the pool's result
/// ring, its progress slot, its side channel for OS handles, the initializer.
struct PoolWorkerParts {
    QueueCore tasks;
    QueueCore results;
    SharedMemory slot;
    os::handle_t lane = os::invalid_handle;  // owned; handles of task arguments travel here
    os::CodeRef initializer;
    std::uint64_t maxtasks = 0;  // 0: no limit

    PoolWorkerParts() = default;
    PoolWorkerParts(const PoolWorkerParts&) = delete;
    PoolWorkerParts& operator=(const PoolWorkerParts&) = delete;
    MPSERVICE_API ~PoolWorkerParts();
};
/// The worker's Process argument.  Copies share the parts, so that the parent
/// can let go of them (release()) as soon as the worker has started, instead
/// of when its Process is destroyed.
struct PoolWorkerBoot {
    MPSERVICE_API PoolWorkerBoot();  // fresh parts (defined in the implementation)
    Shared<PoolWorkerParts> p;
    /// Closes the parent's copies of the worker's descriptors and mappings.
    void release() { p->~PoolWorkerParts(), new (p.get()) PoolWorkerParts(); }
};

/// The worker's loop: takes chunks off its ring and runs them until the ring
/// is closed or maxtasks chunks are done.  `state`: a ProcessRunner's object.
MPSERVICE_API void serve_pool_tasks(const PoolWorkerBoot& boot, void* state);
/// The initializer named in `boot` (throws if it cannot be found).
MPSERVICE_API const void* resolve_initializer(const PoolWorkerBoot& boot);

/// A pool worker's process target: runs the initializer, then serves.
template <class Fn, class... A>
void pool_worker_entry(PoolWorkerBoot boot, A... args) {
    if (!boot.p->initializer.empty()) {
        Fn init = reinterpret_cast<Fn>(reinterpret_cast<std::uintptr_t>(resolve_initializer(boot)));
        init(std::move(args)...);
    }
    serve_pool_tasks(boot, nullptr);
}
inline void pool_no_initializer() {}

/// A ProcessRunner's process target: constructs the T, then serves its calls.
template <class T, class... A>
void runner_entry(PoolWorkerBoot boot, A... args) {
    T obj(std::move(args)...);
    serve_pool_tasks(boot, &obj);
}

// ---------------------------------------------------------------- parent side

/// The outcome of one item: its encoded value or exception (kind 0 / 1), or
/// an error made in the parent (a dead worker, terminate()).
struct JobItem {
    std::size_t index;
    std::uint32_t kind;
    const unsigned char* data;
    std::size_t size;
    std::exception_ptr error;
};

/// The records of one result message, as its worker sent them: record k is
/// the outcome of item first + k of a chunk whose item 0 is the job's item
/// `job_first`; only items in [from, to) are new (the others are known).
struct JobRecords {
    std::size_t job_first;
    std::uint32_t first, from, to;
    const unsigned char* data;
    std::size_t size;

    /// fn(job index, kind, data, size) for each new record.
    template <class F>
    void for_each(F&& fn) const {
        walk_records(data, size, first, [&](std::uint32_t i, std::uint32_t kind, const unsigned char* p, std::size_t n) {
            if (i >= from && i < to) fn(job_first + i, kind, p, n);
        });
    }
    /// As for_each, with the new values of a dense record as runs:
    /// run(job index, count, elem, data).
    template <class Item, class Run>
    void for_each_run(Item&& item, Run&& run) const {
        walk_record_runs(
            data, size, first,
            [&](std::uint32_t i, std::uint32_t kind, const unsigned char* p, std::size_t n) {
                if (i >= from && i < to) item(job_first + i, kind, p, n);
            },
            [&](std::uint32_t i, std::uint32_t count, std::size_t elem, const unsigned char* p) {
                const std::uint32_t lo = std::max(i, from), hi = std::min(i + count, to);
                if (lo < hi) run(job_first + lo, hi - lo, elem, p + (lo - i) * elem);
            });
    }
};

/// One submission (map, apply_async, imap, ...): receives the outcome of each
/// of its items, by index, from whoever reads the pool's results (or from terminate()).
class JobBase {
public:
    virtual ~JobBase() = default;
    virtual void on_value(std::size_t index, Decoder& value) = 0;
    virtual void on_error(std::size_t index, std::exception_ptr error) = 0;
    /// A batch of outcomes made in the parent; a job may take it at once.
    virtual void on_items(const JobItem* items, std::size_t n) {
        for (std::size_t i = 0; i < n; ++i) deliver_one(items[i]);
    }
    /// The new outcomes of one result message; a job may take them at once.
    virtual void on_records(const JobRecords& r) {
        r.for_each([&](std::size_t index, std::uint32_t kind, const unsigned char* data, std::size_t size) {
            deliver_one(JobItem{index, kind, data, size, nullptr});
        });
    }

protected:
    void deliver_one(const JobItem& x) {
        try {
            if (x.error) {
                on_error(x.index, x.error);
                return;
            }
            Decoder d(x.data, x.size);
            if (x.kind == 0) {
                on_value(x.index, d);
            } else {
                on_error(x.index, decode_exception(d));
            }
        } catch (...) {
            on_error(x.index, std::current_exception());  // a result that does not decode fails its item
        }
    }
};

/// The size of a task message's header (impl/pool.cpp: PoolTaskHeader).
constexpr std::size_t pool_task_room = 56;

/// A chunk on its way to a worker: the encoded task message and where each
/// item's arguments start in it (so that the rest of a chunk can be sent again
/// when its worker dies in the middle).
struct ChunkDraft {
    Shared<JobBase> job;
    std::size_t job_first = 0;
    std::uint32_t count = 0;
    /// pool_task_room bytes for the task header (so that a chunk's first
    /// sending needs no copy), then the items' arguments, back to back.
    Encoder args;
    std::vector<std::uint32_t> offsets;  // offsets[i]: start of item i in args
    std::uint32_t stride = 0;            // nonzero: item i starts at pool_task_room + i * stride (no offsets)
};

struct PoolTarget {
    os::CodeRef fn;      // the user's function (empty for a ProcessRunner call)
    os::CodeRef runner;  // the ChunkRunner instance that decodes and calls it
};

/// Starts one worker process for a boot (made by Pool / ProcessRunner, which
/// know the initializer's types); returns its Process.
using WorkerFactory = std::function<std::unique_ptr<Process<void>>(const PoolWorkerBoot& boot)>;

/// PoolSettings::kind of a ProcessRunner (a pointer, not a literal: each
/// length of literal assigned to a std::string costs an includer its checks).
inline constexpr const char* runner_kind = "runner";

struct PoolSettings {
    int processes = 1;
    std::uint64_t maxtasks = 0;
    os::CodeRef initializer;
    bool replace_dead_workers = true;  // false: a ProcessRunner (one death ends it)
    std::string kind = "pool";         // for messages: "pool" or runner_kind
};

struct PoolDeliveries;

/// The non-template part of a Pool: workers, dispatch, reading results, the result thread.
class PoolCore : public std::enable_shared_from_this<PoolCore> {
public:
    MPSERVICE_API static std::shared_ptr<PoolCore> create(PoolSettings settings, WorkerFactory factory);
    MPSERVICE_API ~PoolCore();

    /// Queues chunks of `target`; InvalidStateError after close()/terminate(),
    /// the worker's error once a ProcessRunner has died.
    MPSERVICE_API void submit(const PoolTarget& target, std::vector<ChunkDraft>& chunks);
    MPSERVICE_API void close();
    MPSERVICE_API void terminate();
    /// Waits for the workers to end (after close or terminate).
    MPSERVICE_API void join();
    /// Throws what submit() would throw now (closed, terminated, broken).
    MPSERVICE_API void check_accepting() const;
    /// Pids of the live workers (for tests and diagnostics).
    MPSERVICE_API std::vector<long> worker_pids() const;
    int processes() const noexcept { return settings_.processes; }

    /// Waits until done() or the deadline (false then) by reading the pool's
    /// results in the calling thread: a waiting caller takes its own result
    /// off the result ring, with no hand-off through the result thread.
    /// While another thread holds the reader role (and delivers to everyone),
    /// it sleeps in sleep(until) slices instead.  Safe from any thread.
    MPSERVICE_API bool serve_until(const std::function<bool()>& done, os::Deadline deadline,
                                   const std::function<void(os::Deadline)>& sleep);

    /// Items per chunk when the caller gives none (Python's rule for map).
    static std::size_t default_chunksize(std::size_t n, int processes) {
        std::size_t per = static_cast<std::size_t>(processes) * 4;
        std::size_t c = n / per + (n % per ? 1 : 0);
        return c ? c : 1;
    }

    struct State;
    using Deliveries = PoolDeliveries;
    MPSERVICE_API PoolCore(PoolSettings settings, WorkerFactory factory);

private:
    /// `replacement`: a worker that takes the place of one that ended
    /// (maxtasksperchild, a crash) - started from a warm child under spawn.
    void start_worker(std::size_t i, bool replacement = false);
    bool send_locked(std::size_t worker, std::uint64_t chunk, bool may_block);
    void dispatch_locked();
    void maybe_finish_locked();
    void complete_locked(std::uint64_t chunk);
    void book_results(const unsigned char* p, std::size_t n, Deliveries& out);
    bool read_results(os::Deadline deadline, Deliveries& out);
    bool wait_workers_ended(os::Deadline deadline);
    std::vector<const void*> dead_workers() const;
    void handle_deaths(const std::vector<const void*>& dead, Deliveries& out);
    void reconcile_locked(std::size_t worker, Deliveries& out);
    void fail_all_locked(const std::exception_ptr& e, Deliveries& out);
    void result_loop();

    Owned<State> s_;
    PoolSettings settings_;
};

/// The code reference of a function pointer (cached per function).
MPSERVICE_API os::CodeRef pool_code_ref(const void* fn);
template <class Fn>
const void* fn_address(Fn fn) {
    return reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(fn));
}

/// Appends one item's arguments to a chunk.  An item carrying OS handles
/// (a Queue, a Lock, ...) travels alone in its chunk, since the handles go to
/// the worker beside the chunk rather than inside it.
class ChunkBuilder {
public:
    MPSERVICE_API ChunkBuilder(std::shared_ptr<JobBase> job, std::size_t chunksize);

    template <class... A>
    void add(const A&... args) {
        if (chunks_.empty() || chunks_.back().count >= chunksize_ || carries_handles(chunks_.back()) ||
            chunks_.back().stride)
            open();
        ChunkDraft* c = &chunks_.back();
        std::size_t at = c->args.bytes().size();
        c->offsets.push_back(static_cast<std::uint32_t>(at));
        (c->args.write(args), ...);
        if (!c->args.handles().empty() && c->count > 0) {
            // Handles in an item that has neighbours: move it to a chunk of its own.
            c->args.bytes().resize(at);
            c->offsets.pop_back();
            c->args = rebuild_without_handles(*c);
            open();
            c = &chunks_.back();
            c->offsets.push_back(static_cast<std::uint32_t>(c->args.bytes().size()));
            (c->args.write(args), ...);
        }
        check_size(*c);
        ++c->count;
        ++items_;
    }
    /// Appends the `n` items at `p`, one bitwise argument each, a block per
    /// chunk (the fast path of map over a contiguous range of numbers).
    template <class T>
    void add_bitwise(const T* p, std::size_t n) {
        static_assert(is_bitwise_v<T>, "add_bitwise: the codec must copy T byte for byte");
        while (n) {
            if (chunks_.empty() || chunks_.back().count >= chunksize_ || carries_handles(chunks_.back()) ||
                (chunks_.back().count && chunks_.back().stride != sizeof(T)))
                open();
            ChunkDraft& c = chunks_.back();
            c.stride = static_cast<std::uint32_t>(sizeof(T));  // items side by side: no offsets kept
            const std::size_t k = std::min<std::size_t>(n, chunksize_ - c.count);
            if (c.args.bytes().size() + k * sizeof(T) > 0xFFFFFFF0u) throw_too_big();
            c.args.write_bytes(p, k * sizeof(T));
            c.count += static_cast<std::uint32_t>(k);
            items_ += k;
            p += k;
            n -= k;
        }
    }
    std::size_t items() const noexcept { return items_; }
    std::size_t chunksize() const noexcept { return chunksize_; }
    std::vector<ChunkDraft>& chunks() noexcept { return chunks_; }
    /// Whether a chunk is complete (a later one has been opened).
    bool has_full() const noexcept { return chunks_.size() > 1; }
    /// Takes the complete chunks, leaving the one being filled.
    MPSERVICE_API std::vector<ChunkDraft> take_full();

private:
    // The non-template parts are defined in the implementation (impl/pool.cpp):
    // what an includer compiles stays small, and none of them runs per item.
    static bool carries_handles(const ChunkDraft& c) { return !c.args.handles().empty(); }
    MPSERVICE_API static Encoder rebuild_without_handles(ChunkDraft& c);
    [[noreturn]] MPSERVICE_API static void throw_too_big();
    static void check_size(const ChunkDraft& c) {
        if (c.args.bytes().size() > 0xFFFFFFF0u) throw_too_big();
    }
    /// Opens the next chunk (once per chunk, not per item).
    MPSERVICE_API void open();

    Shared<JobBase> job_;
    std::size_t chunksize_;
    std::size_t items_ = 0;
    std::vector<ChunkDraft> chunks_;
};

/// Whether `Range` is contiguous storage of T (std::vector<T>, std::array, a
/// C array, ...): map then encodes a chunk's arguments as one block.
template <class Range, class T, class = void>
struct contiguous_range_of : std::false_type {};
template <class Range, class T>
struct contiguous_range_of<Range, T,
                           std::void_t<decltype(std::data(std::declval<const Range&>())),
                                       decltype(std::size(std::declval<const Range&>()))>>
    : std::is_same<std::remove_cv_t<std::remove_pointer_t<decltype(std::data(std::declval<const Range&>()))>>, T> {};

template <class A>
struct tuple_args;
template <class... A>
struct tuple_args<std::tuple<A...>> {
    template <class Fn>
    static constexpr ChunkRunner runner() {
        return &run_function_chunk<Fn, A...>;
    }
};

/// A callback threw: logged (as Python's pool does not stop for it either).
MPSERVICE_API void log_callback_error(const std::exception_ptr& e);

/// What an AsyncState's waiter does, whatever its R (in the implementation):
/// it serves the results of the pool or runner that resolves it itself.
class PoolResultState : public FutureCore {
public:
    MPSERVICE_API PoolResultState();
    /// The pool or runner whose results resolve it: a waiter reads them itself.
    MPSERVICE_API void read_from(const Shared<PoolCore>& pool);
    MPSERVICE_API bool wait_until(os::Deadline deadline) const override;

private:
    std::weak_ptr<PoolCore> pool_;
};

/// The outcome state of an AsyncResult: the value, and the callbacks that run
/// (in whichever thread read the result) before it resolves.
template <class R>
class AsyncState : public PoolResultState {
public:
    using Holder = std::conditional_t<std::is_void_v<R>, bool, R>;
    using Success = std::function<void(const Holder&)>;
    using Failure = std::function<void(const std::exception_ptr&)>;

    AsyncState(Success s, Failure f) : on_success_(std::move(s)), on_failure_(std::move(f)) { mark_started(); }

    void succeed(Holder v) {
        value_.emplace(std::move(v));
        if (on_success_) run_callback([&] { on_success_(*value_); });
        resolve(nullptr);
    }
    void fail(std::exception_ptr e) {
        if (on_failure_) run_callback([&] { on_failure_(e); });
        resolve(e);
    }
    const Holder& value() const { return *value_; }
    /// Moves the value out (for the pool's blocking calls, which own their AsyncResult).
    Holder take_value() { return std::move(*value_); }

private:
    template <class F>
    void run_callback(F&& f) {
        try {
            f();
        } catch (...) {
            log_callback_error(std::current_exception());
        }
    }
    std::optional<Holder> value_;
    Success on_success_;
    Failure on_failure_;
};

/// map / map_async / starmap: every item's outcome in input order; the
/// first failure by position once all have finished.
template <class R>
class MapJob final : public JobBase {
    using Slot = std::conditional_t<std::is_void_v<R>, bool, R>;
    // Values in place when a Slot can be made empty, so that the finished
    // vector is handed over without a copy; else each in an optional.
    static constexpr bool in_place = std::is_default_constructible_v<Slot>;
    using Stored = std::conditional_t<in_place, Slot, std::optional<Slot>>;
    enum : unsigned char { empty = 0, value = 1, failed = 2 };

public:
    explicit MapJob(std::shared_ptr<AsyncState<std::conditional_t<std::is_void_v<R>, void, std::vector<Slot>>>> st)
        : state_(std::move(st)) {}

    void expect(std::size_t n) {
        slots_.resize(n);
        have_.assign(n, empty);
        remaining_ = n;
        if (n == 0) finish();
    }
    void on_value(std::size_t index, Decoder& d) override {
        std::unique_lock<std::mutex> lk(mutex_);
        if (!take_value(index, d)) return;
        settle(lk, 1);
    }
    void on_error(std::size_t index, std::exception_ptr e) override {
        std::unique_lock<std::mutex> lk(mutex_);
        if (!take_error(index, std::move(e))) return;
        settle(lk, 1);
    }
    /// A batch under one lock.
    void on_items(const JobItem* items, std::size_t n) override {
        std::unique_lock<std::mutex> lk(mutex_);
        std::size_t settled = 0;
        for (std::size_t i = 0; i < n; ++i) {
            const JobItem& x = items[i];
            settled += x.error ? take_error(x.index, x.error) : take_record(x.index, x.kind, x.data, x.size);
        }
        if (settled) settle(lk, settled);
    }
    /// A whole result message under one lock, decoded in place: the fast path of map.
    void on_records(const JobRecords& r) override {
        std::unique_lock<std::mutex> lk(mutex_);
        std::size_t settled = 0;
        auto item = [&](std::size_t index, std::uint32_t kind, const unsigned char* data, std::size_t size) {
            settled += take_record(index, kind, data, size);
        };
        if constexpr (dense_result<R> && in_place) {
            r.for_each_run(item, [&](std::size_t index, std::uint32_t count, std::size_t elem, const unsigned char* data) {
                if (elem != sizeof(R) || index + count > slots_.size()) {
                    for (std::uint32_t k = 0; k < count; ++k) item(index + k, record_value, data + k * elem, elem);
                    return;
                }
                for (std::uint32_t k = 0; k < count; ++k) {
                    if (have_[index + k] != empty) continue;
                    std::memcpy(static_cast<void*>(&slots_[index + k]), data + k * sizeof(R), sizeof(R));
                    have_[index + k] = value;
                    ++settled;
                }
            });
        } else {
            r.for_each(item);
        }
        if (settled) settle(lk, settled);
    }

private:
    bool take_record(std::size_t index, std::uint32_t kind, const unsigned char* data, std::size_t size) {
        try {
            Decoder d(data, size);
            return kind == 0 ? take_value(index, d) : take_error(index, decode_exception(d));
        } catch (...) {
            return take_error(index, std::current_exception());  // a result that does not decode fails its item
        }
    }
    bool take_value(std::size_t index, Decoder& d) {
        if (index >= slots_.size() || have_[index] != empty) return false;
        if constexpr (std::is_void_v<R>) {
            slots_[index] = true;
        } else if constexpr (in_place) {
            slots_[index] = d.read<R>();
        } else {
            slots_[index].emplace(d.read<R>());
        }
        have_[index] = value;
        return true;
    }
    bool take_error(std::size_t index, std::exception_ptr e) {
        if (index >= slots_.size() || have_[index] != empty) return false;
        have_[index] = failed;
        if (index < first_error_index_) {  // the failure at the lowest position is the one reported
            first_error_index_ = index;
            first_error_ = std::move(e);
        }
        return true;
    }
    void settle(std::unique_lock<std::mutex>& lk, std::size_t n) {
        remaining_ -= n;
        if (remaining_ != 0) return;
        lk.unlock();
        finish();
    }
    void finish() {
        if (first_error_index_ != no_error) {
            state_->fail(first_error_);
            return;
        }
        if constexpr (std::is_void_v<R>) {
            state_->succeed(true);
        } else if constexpr (in_place) {
            state_->succeed(std::move(slots_));
        } else {
            std::vector<Slot> out;
            out.reserve(slots_.size());
            for (auto& s : slots_) out.push_back(std::move(*s));
            slots_.clear();
            state_->succeed(std::move(out));
        }
    }

    std::mutex mutex_;
    std::vector<Stored> slots_;
    std::vector<unsigned char> have_;
    static constexpr std::size_t no_error = ~std::size_t(0);
    std::size_t first_error_index_ = no_error;  // the lowest position that failed (no_error: none)
    std::exception_ptr first_error_;
    std::size_t remaining_ = 0;
    std::shared_ptr<AsyncState<std::conditional_t<std::is_void_v<R>, void, std::vector<Slot>>>> state_;
};

/// apply / apply_async: one item.
template <class R>
class SingleJob final : public JobBase {
public:
    explicit SingleJob(std::shared_ptr<AsyncState<R>> st) : state_(std::move(st)) {}
    void on_value(std::size_t, Decoder& d) override {
        if (settled_.exchange(true)) return;
        if constexpr (std::is_void_v<R>) {
            (void)d;
            state_->succeed(true);
        } else {
            state_->succeed(d.read<R>());
        }
    }
    void on_error(std::size_t, std::exception_ptr e) override {
        if (settled_.exchange(true)) return;
        state_->fail(std::move(e));
    }

private:
    std::atomic<bool> settled_{false};
    std::shared_ptr<AsyncState<R>> state_;
};

/// Pulls items from the caller's input range, lazily, into chunks.
class InputFeed {
public:
    virtual ~InputFeed() = default;
    /// Adds up to `n` items to `b`; false once the input is exhausted.  An
    /// exception from the input range propagates.
    virtual bool pull(ChunkBuilder& b, std::size_t n) = 0;
};
template <class Range, class Arg, bool Star>
class InputFeedOf final : public InputFeed {
public:
    explicit InputFeedOf(Range&& r) : range_(std::forward<Range>(r)), it_(std::begin(range_)), end_(std::end(range_)) {}
    bool pull(ChunkBuilder& b, std::size_t n) override {
        for (std::size_t i = 0; i < n; ++i) {
            if (!(it_ != end_)) return false;
            if constexpr (Star) {
                std::apply([&](const auto&... a) { b.add(a...); }, Arg(*it_));
            } else {
                b.add(Arg(*it_));
            }
            ++it_;
        }
        return true;
    }

private:
    Range range_;  // a reference for an lvalue range, a copy of an rvalue one
    decltype(std::begin(std::declval<std::remove_reference_t<Range>&>())) it_;
    decltype(std::end(std::declval<std::remove_reference_t<Range>&>())) end_;
};

/// imap / imap_unordered: outcomes buffered until the consumer takes them.
/// The buffer holds at most the pool's window of items (ImapResult bounds
/// what is in flight), kept in deques: no allocation per item.
template <class R>
class StreamJob final : public JobBase {
public:
    using Slot = std::conditional_t<std::is_void_v<R>, bool, R>;
    struct Outcome {
        std::optional<Slot> value;
        std::exception_ptr error;
    };
    explicit StreamJob(bool ordered) : ordered_(ordered) {}

    void on_value(std::size_t index, Decoder& d) override {
        std::lock_guard<std::mutex> lk(mutex);
        put(index, decode_value(d));
        cv.notify_all();
    }
    void on_error(std::size_t index, std::exception_ptr e) override {
        Outcome o;
        o.error = std::move(e);
        std::lock_guard<std::mutex> lk(mutex);
        put(index, std::move(o));
        cv.notify_all();
    }
    /// A whole result message under one lock, one wake-up.
    void on_records(const JobRecords& r) override {
        std::lock_guard<std::mutex> lk(mutex);
        r.for_each([&](std::size_t index, std::uint32_t kind, const unsigned char* data, std::size_t size) {
            Outcome o;
            try {
                Decoder d(data, size);
                if (kind == 0) {
                    o = decode_value(d);
                } else {
                    o.error = decode_exception(d);
                }
            } catch (...) {
                o.value.reset();
                o.error = std::current_exception();  // a result that does not decode fails its item
            }
            put(index, std::move(o));
        });
        cv.notify_all();
    }
    /// The next outcome in the consumer's order if one is there.
    std::optional<Outcome> take() {
        if (!has_next()) return std::nullopt;
        Outcome o;
        if (ordered_) {
            o = std::move(*window_.front());
            window_.pop_front();
        } else {
            o = std::move(arrived_.front());
            arrived_.pop_front();
        }
        ++next_;
        return o;
    }
    std::size_t taken() const noexcept { return next_; }
    /// Whether take() would give an outcome.
    bool has_next() const {
        return ordered_ ? !window_.empty() && window_.front().has_value() : !arrived_.empty();
    }

    std::mutex mutex;
    std::condition_variable cv;

private:
    static Outcome decode_value(Decoder& d) {
        Outcome o;
        if constexpr (std::is_void_v<R>) {
            (void)d;
            o.value.emplace(true);
        } else {
            o.value.emplace(d.read<R>());
        }
        return o;
    }
    void put(std::size_t index, Outcome o) {
        if (!ordered_) {
            arrived_.push_back(std::move(o));
            return;
        }
        if (index < next_) return;  // cannot happen: every item has one outcome
        std::size_t at = index - next_;
        if (window_.size() <= at) window_.resize(at + 1);
        window_[at].emplace(std::move(o));
    }
    bool ordered_;
    std::deque<std::optional<Outcome>> window_;  // ordered: item next_ + i at i
    std::deque<Outcome> arrived_;                // unordered: as they came
    std::size_t next_ = 0;
};

}  // namespace detail

template <>
struct Codec<detail::PoolWorkerBoot> {
    MPSERVICE_API static void encode(Encoder& e, const detail::PoolWorkerBoot& b);
    MPSERVICE_API static detail::PoolWorkerBoot decode(Decoder& d);
};

/// The future of one submission to a Pool (apply_async, map_async) or a
/// ProcessRunner (submit).  It is a Worker, so mp::wait / mp::as_completed
/// take it among Processes and Threads.  Movable, not copyable.
template <class R>
class AsyncResult : public Worker {
    using State = detail::AsyncState<R>;

public:
    explicit AsyncResult(std::shared_ptr<State> st) : Worker(st) {}  // named "AsyncResult" by PoolResultState
    AsyncResult(AsyncResult&&) noexcept = default;
    AsyncResult& operator=(AsyncResult&&) noexcept = default;

    /// The value (waits); re-throws the task's exception (typed, as from Process).
    detail::result_ref_t<R> get() { return get_at(detail::os::no_deadline); }
    /// As get(), but TimeoutError if the result is not there within `timeout`.
    template <class Rep, class Period>
    detail::result_ref_t<R> get(std::chrono::duration<Rep, Period> timeout) {
        return get_at(detail::os::deadline_after(timeout));
    }
    /// Waits for the result; the callbacks have run when it returns.
    void wait() { core_->wait_until(detail::os::no_deadline); }
    /// Waits at most `timeout`; true if the result is there.
    template <class Rep, class Period>
    bool wait(std::chrono::duration<Rep, Period> timeout) {
        return core_->wait_until(detail::os::deadline_after(timeout));
    }
    /// Whether the result is there (its callbacks have run).
    bool ready() const { return core_->done(); }
    /// Whether it ended with a value; InvalidStateError while not ready (Python: ValueError).
    bool successful() const {
        if (!ready()) throw InvalidStateError("mpservice: successful() called on an AsyncResult that is not ready");
        return core_->error() == nullptr;
    }

    /// As get(), moving the value out of the (temporary) AsyncResult: what
    /// the blocking calls (Pool::map, apply, ProcessRunner's call) return, so
    /// that a map's vector is handed over, not copied.
    R take() && {
        get_at(detail::os::no_deadline);
        if constexpr (!std::is_void_v<R>) return state().take_value();
    }

private:
    State& state() const { return static_cast<State&>(*core_); }
    detail::result_ref_t<R> get_at(detail::os::Deadline deadline) {
        if (!core_->wait_until(deadline)) throw TimeoutError("mpservice: the result was not ready within the timeout");
        if (auto e = core_->error()) detail::rethrow_exception(e);
        if constexpr (!std::is_void_v<R>) return state().value();
    }
};

/// The lazy result of imap / imap_unordered: a single-pass input range.
/// Iterating yields each result; a failed task throws its exception from
/// next() (or the iterator's ++), and next() may be called again to go on.
/// At most a bounded number of chunks are in flight or buffered, so an input
/// of any length (read only as the results are consumed) uses bounded memory.
template <class R>
class ImapResult {
    using Job = detail::StreamJob<R>;
    using Slot = typename Job::Slot;

public:
    /// The next result in order (imap) or as it finished (imap_unordered);
    /// std::nullopt at the end.  Re-throws the task's exception, or - after
    /// every earlier result - the exception the input range threw.
    std::optional<Slot> next() { return next_at(detail::os::no_deadline); }
    /// As next(), but TimeoutError if no result comes within `timeout`.
    template <class Rep, class Period>
    std::optional<Slot> next(std::chrono::duration<Rep, Period> timeout) {
        return next_at(detail::os::deadline_after(timeout));
    }

    class iterator {
    public:
        using value_type = Slot;
        using reference = const Slot&;
        using difference_type = std::ptrdiff_t;
        using iterator_category = std::input_iterator_tag;
        const Slot& operator*() const { return *current_; }
        iterator& operator++() {
            current_ = owner_->next();
            return *this;
        }
        bool operator==(const iterator& o) const noexcept { return current_.has_value() == o.current_.has_value(); }
        bool operator!=(const iterator& o) const noexcept { return !(*this == o); }

    private:
        friend class ImapResult;
        iterator(ImapResult* owner, std::optional<Slot> c) : owner_(owner), current_(std::move(c)) {}
        ImapResult* owner_;
        std::optional<Slot> current_;
    };
    iterator begin() { return iterator(this, next()); }
    iterator end() { return iterator(this, std::nullopt); }

    ImapResult(detail::Shared<detail::PoolCore> pool, detail::PoolTarget target, detail::Owned<detail::InputFeed> feed,
               std::size_t chunksize, bool ordered)
        : pool_(std::move(pool)),
          target_(target),
          feed_(std::move(feed)),
          job_(std::make_shared<Job>(ordered)),
          chunksize_(chunksize ? chunksize : 1),
          window_chunks_(static_cast<std::size_t>(pool_->processes()) * 4) {
        top_up();
    }

private:
    /// Submits chunks until `window_chunks_` worth of items are outstanding.
    void top_up() {
        while (!exhausted_ && submitted_ - consumed() < window_chunks_ * chunksize_) {
            detail::ChunkBuilder b(job_, chunksize_);
            b.chunks().reserve(1);
            bool more;
            try {
                more = feed_->pull(b, chunksize_);
            } catch (...) {
                input_error_ = std::current_exception();
                more = false;
            }
            // A builder's items are numbered from 0: shift them to this job's positions.
            for (auto& c : b.chunks()) c.job_first += submitted_;
            if (b.items()) pool_->submit(target_, b.chunks());
            submitted_ += b.items();
            if (!more) exhausted_ = true;
        }
    }
    /// Items the consumer has taken (only this thread takes them: no lock).
    std::size_t consumed() const noexcept { return consumed_; }
    /// Moves every outcome that is ready into taken_ (the job's lock held).
    void take_ready() {
        while (auto o = job_->take()) taken_.push_back(std::move(*o));
    }
    std::optional<Slot> pop_taken() {
        typename Job::Outcome o = std::move(taken_.front());
        taken_.pop_front();
        ++consumed_;
        if (o.error) detail::rethrow_exception(o.error);
        return std::move(o.value);
    }
    std::optional<Slot> next_at(detail::os::Deadline deadline) {
        for (;;) {
            if (!taken_.empty()) return pop_taken();
            top_up();
            {
                // Everything that is ready at once, under one lock.
                std::lock_guard<std::mutex> lk(job_->mutex);
                take_ready();
            }
            if (!taken_.empty()) return pop_taken();
            if (exhausted_ && consumed_ == submitted_) {
                if (input_error_) {
                    auto e = input_error_;
                    input_error_ = nullptr;
                    std::rethrow_exception(e);
                }
                return std::nullopt;
            }
            // Read the pool's results here (no hand-off through its thread)
            // until the next one of ours is there.
            bool got = pool_->serve_until(
                [this] {
                    std::lock_guard<std::mutex> g(job_->mutex);
                    return job_->has_next();
                },
                deadline,
                [this](detail::os::Deadline d) {
                    std::unique_lock<std::mutex> g(job_->mutex);
                    job_->cv.wait_until(g, d, [this] { return job_->has_next(); });
                });
            if (!got) {
                {
                    std::lock_guard<std::mutex> lk(job_->mutex);
                    take_ready();
                }
                if (!taken_.empty()) return pop_taken();
                throw TimeoutError("mpservice: no imap result within the timeout");
            }
        }
    }

    detail::Shared<detail::PoolCore> pool_;
    detail::PoolTarget target_;
    detail::Owned<detail::InputFeed> feed_;
    std::shared_ptr<Job> job_;
    std::size_t chunksize_;
    std::size_t window_chunks_;
    std::size_t submitted_ = 0;
    std::size_t consumed_ = 0;
    std::deque<typename Job::Outcome> taken_;  // taken from the job, not yet returned
    bool exhausted_ = false;
    std::exception_ptr input_error_;
};

/// Options of a Pool beyond the number of processes.
struct PoolOptions {
    /// A worker is replaced after this many tasks (a chunk counts as one, as
    /// in Python); 0 = never.  Negative is std::invalid_argument.
    long maxtasksperchild = 0;
};

/// A pool of worker processes (see the top of this part).
class Pool {
public:
    // The constructors without initializer are templates only so that the
    // worker start they instantiate (a Process over the pool's entry) is
    // compiled, and linked, only where such a Pool is made - not in every
    // translation unit that includes the header.

    /// cpu_count() workers in the default context (spawn unless set_start_method chose another).
    template <class NoInitializer = void>
    Pool() : Pool(default_context(), cpu_count()) {}
    /// `processes` workers (≤ 0 is std::invalid_argument) in the default context.
    template <class NoInitializer = void>
    explicit Pool(int processes, PoolOptions options = {}) : Pool(default_context(), processes, options) {}
    /// Workers made by `ctx`.
    template <class NoInitializer = void>
    Pool(const Context& ctx, int processes, PoolOptions options = {})
        : Pool(ctx, processes, options, &detail::pool_no_initializer) {}
    /// Workers that each run initializer(initargs...) once before any task.
    /// The initializer's arguments may be library handles (they travel with
    /// the worker's start, as Process arguments do).
    template <class Init, class... A>
    Pool(const Context& ctx, int processes, PoolOptions options, Init initializer, A&&... initargs) {
        if (processes <= 0)
            throw std::invalid_argument("mpservice: Pool needs at least one process (got " +
                                        std::to_string(processes) + ")");
        if (options.maxtasksperchild < 0)
            throw std::invalid_argument("mpservice: maxtasksperchild must be positive (or 0 for no limit)");
        static_assert(detail::function_pointer_of<Init>::value,
                      "mpservice: a Pool initializer must be a function, a static member function or a "
                      "capture-less lambda");
        auto fp = detail::function_pointer_of<Init>::get(initializer);
        using Fp = decltype(fp);
        detail::PoolSettings s;
        s.processes = processes;
        s.maxtasks = static_cast<std::uint64_t>(options.maxtasksperchild);
        if (detail::fn_address(fp) != detail::fn_address(&detail::pool_no_initializer))
            s.initializer = detail::pool_code_ref(detail::fn_address(fp));
        Context c = ctx;  // a copy: the caller's context may be a temporary
        auto entry = &detail::pool_worker_entry<Fp, std::decay_t<A>...>;
        detail::WorkerFactory factory =
            [c, entry, args = std::make_tuple(std::decay_t<A>(std::forward<A>(initargs))...)](
                const detail::PoolWorkerBoot& boot) {
                return std::apply(
                    [&](const auto&... a) { return std::make_unique<Process<void>>(c, entry, boot, a...); }, args);
            };
        core_ = detail::PoolCore::create(std::move(s), std::move(factory));
    }
    Pool(const Pool&) = delete;
    Pool& operator=(const Pool&) = delete;
    /// Terminates the pool (as Python's context manager does): running tasks
    /// are stopped and unfinished results fail with InvalidStateError.
    ~Pool() {
        try {
            core_->terminate();
            core_->join();
        } catch (...) {
        }
    }

    /// f(args...) in a worker; waits for the value, re-throws its exception.
    template <class F, class... A>
    auto apply(F f, A&&... args) {
        return apply_async(f, std::forward<A>(args)...).take();
    }
    /// f(args...) in a worker, without waiting.
    template <class F, class... A>
    auto apply_async(F f, A&&... args) {
        using R = detail::process_result_t<F, A...>;
        return apply_async_with(typename detail::AsyncState<R>::Success(), typename detail::AsyncState<R>::Failure(), f,
                                std::forward<A>(args)...);
    }
    /// As apply_async, with callbacks run in the parent (on the thread that
    /// read the result) before the result becomes ready: on_success(value) or on_error(e).
    template <class F, class S, class E, class... A>
    auto apply_async_with(S on_success, E on_error, F f, A&&... args) {
        using Fp = decltype(detail::function_pointer_of<F>::get(f));
        using R = detail::process_result_t<F, A...>;
        auto st = std::make_shared<detail::AsyncState<R>>(std::move(on_success), std::move(on_error));
        st->read_from(core_);
        auto job = std::make_shared<detail::SingleJob<R>>(st);
        detail::ChunkBuilder b(job, 1);
        b.add(std::decay_t<A>(args)...);
        submit<Fp, std::decay_t<A>...>(f, b.chunks());
        return AsyncResult<R>(st);
    }

    /// f(x) for each x of `inputs`, in input order.  Waits until every task has
    /// finished, then re-throws the first failure by input position.
    template <class F, class Range>
    auto map(F f, const Range& inputs, std::size_t chunksize = 0) {
        return map_async(f, inputs, chunksize).take();
    }
    template <class F, class Range>
    auto map_async(F f, const Range& inputs, std::size_t chunksize = 0) {
        using Arg = std::decay_t<decltype(*std::begin(inputs))>;
        using R = detail::process_result_t<F, Arg>;
        using V = std::conditional_t<std::is_void_v<R>, void, std::vector<R>>;
        return map_async_with(typename detail::AsyncState<V>::Success(), typename detail::AsyncState<V>::Failure(), f,
                              inputs, chunksize);
    }
    /// As map_async; on_success gets the whole vector once, on_error the first
    /// failure once (and on_success is then never called).
    template <class F, class Range, class S, class E>
    auto map_async_with(S on_success, E on_error, F f, const Range& inputs, std::size_t chunksize = 0) {
        using Arg = std::decay_t<decltype(*std::begin(inputs))>;
        return map_like<F, std::tuple<Arg>>(std::move(on_success), std::move(on_error), f, inputs, chunksize,
                                            [](ChunkAdder& add, const Arg& a) { add(a); });
    }
    /// f(a, b, ...) for each tuple of `inputs`, in input order.
    template <class F, class Range>
    auto starmap(F f, const Range& inputs, std::size_t chunksize = 0) {
        return starmap_async(f, inputs, chunksize).take();
    }
    template <class F, class Range>
    auto starmap_async(F f, const Range& inputs, std::size_t chunksize = 0) {
        using Tuple = std::decay_t<decltype(*std::begin(inputs))>;
        using R = decltype(std::apply(f, std::declval<Tuple>()));
        using V = std::conditional_t<std::is_void_v<R>, void, std::vector<R>>;
        return map_like<F, Tuple>(typename detail::AsyncState<V>::Success(), typename detail::AsyncState<V>::Failure(),
                                  f, inputs, chunksize,
                                  [](ChunkAdder& add, const Tuple& t) { std::apply(add, t); });
    }

    /// f(x) for each x, yielded in input order as a lazy range (chunksize 1 by
    /// default, as in Python).  Range is held by reference if an lvalue.
    template <class F, class Range>
    auto imap(F f, Range&& inputs, std::size_t chunksize = 1) {
        return imap_impl<false>(f, std::forward<Range>(inputs), chunksize, true);
    }
    /// As imap, in the order the tasks finish.
    template <class F, class Range>
    auto imap_unordered(F f, Range&& inputs, std::size_t chunksize = 1) {
        return imap_impl<false>(f, std::forward<Range>(inputs), chunksize, false);
    }

    /// No more submissions; the workers exit once the queued work is done.
    void close() { core_->close(); }
    /// Stops the workers now (SIGTERM); unfinished results fail with InvalidStateError.
    void terminate() { core_->terminate(); }
    /// Waits for the workers to exit; InvalidStateError before close()/terminate().
    void join() { core_->join(); }

    /// The pids of the live workers (a snapshot).
    MPSERVICE_API std::vector<long> worker_pids() const;
    int processes() const noexcept { return core_->processes(); }

private:
    struct ChunkAdder {
        detail::ChunkBuilder& b;
        template <class... A>
        void operator()(const A&... a) {
            b.add(a...);
        }
    };

    template <class Fp, class... A, class F>
    void submit(F f, std::vector<detail::ChunkDraft>& chunks) {
        static_assert(detail::function_pointer_of<F>::value,
                      "mpservice: a pool task must be a function, a static member function or a capture-less "
                      "lambda (a lambda with captures cannot be named in another process)");
        Fp fp = detail::function_pointer_of<F>::get(f);
        detail::PoolTarget t{detail::pool_code_ref(detail::fn_address(fp)),
                             detail::pool_code_ref(detail::fn_address(&detail::run_function_chunk<Fp, A...>))};
        core_->submit(t, chunks);
    }

    template <class F, class Tuple, class S, class E, class Range, class Add>
    auto map_like(S on_success, E on_error, F f, const Range& inputs, std::size_t chunksize, Add add_item) {
        using Fp = decltype(detail::function_pointer_of<F>::get(f));
        using R = decltype(std::apply(f, std::declval<Tuple>()));
        using V = std::conditional_t<std::is_void_v<R>, void, std::vector<R>>;
        auto st = std::make_shared<detail::AsyncState<V>>(std::move(on_success), std::move(on_error));
        st->read_from(core_);
        auto job = std::make_shared<detail::MapJob<R>>(st);
        std::size_t n = 0;
        if constexpr (std::is_base_of_v<std::forward_iterator_tag,
                                        typename std::iterator_traits<decltype(std::begin(inputs))>::iterator_category>)
            n = static_cast<std::size_t>(std::distance(std::begin(inputs), std::end(inputs)));
        std::vector<Tuple> buffered;  // an input range of unknown length is read first
        if (!n) {
            for (const auto& x : inputs) buffered.emplace_back(x);
            n = buffered.size();
        }
        core_->check_accepting();
        detail::ChunkBuilder b(job, chunksize ? chunksize : detail::PoolCore::default_chunksize(n, processes()));
        ChunkAdder adder{b};
        job->expect(n);
        // Each chunk leaves as soon as it is complete: the workers start while
        // the rest of the input is encoded.
        auto flush = [&](bool all) {
            if (all) {
                apply_tuple_submit<Fp>(f, b.chunks(), static_cast<Tuple*>(nullptr));
                b.chunks().clear();
            } else if (b.has_full()) {
                auto full = b.take_full();
                apply_tuple_submit<Fp>(f, full, static_cast<Tuple*>(nullptr));
            }
        };
        using First = std::tuple_element_t<0, Tuple>;
        if constexpr (std::tuple_size_v<Tuple> == 1 && detail::is_bitwise_v<First> &&
                      detail::contiguous_range_of<Range, First>::value) {
            // Numbers (or trivially copyable structs) side by side: a block per chunk.
            const First* p = std::data(inputs);
            for (std::size_t left = n, step = b.chunksize(); left;) {
                const std::size_t k = std::min(left, step);
                b.add_bitwise(p, k);
                flush(false);
                p += k;
                left -= k;
            }
        } else if (buffered.empty()) {
            for (const auto& x : inputs) {
                add_item(adder, x);
                flush(false);
            }
        } else {
            for (const auto& t : buffered) {
                std::apply(adder, t);
                flush(false);
            }
        }
        flush(true);
        return AsyncResult<V>(st);
    }
    template <class Fp, class F, class... A>
    void apply_tuple_submit(F f, std::vector<detail::ChunkDraft>& chunks, std::tuple<A...>*) {
        if (chunks.empty()) return;
        submit<Fp, A...>(f, chunks);
    }

    template <bool, class F, class Range>
    auto imap_impl(F f, Range&& inputs, std::size_t chunksize, bool ordered) {
        using Arg = std::decay_t<decltype(*std::begin(inputs))>;
        using R = detail::process_result_t<F, Arg>;
        using Fp = decltype(detail::function_pointer_of<F>::get(f));
        static_assert(detail::function_pointer_of<F>::value,
                      "mpservice: a pool task must be a function, a static member function or a capture-less "
                      "lambda");
        core_->check_accepting();
        Fp fp = detail::function_pointer_of<F>::get(f);
        detail::PoolTarget t{detail::pool_code_ref(detail::fn_address(fp)),
                             detail::pool_code_ref(detail::fn_address(&detail::run_function_chunk<Fp, Arg>))};
        detail::Owned<detail::InputFeed> feed(new detail::InputFeedOf<Range, Arg, false>(std::forward<Range>(inputs)));
        return ImapResult<R>(core_, t, std::move(feed), chunksize, ordered);
    }

    detail::Shared<detail::PoolCore> core_;
};

}  // namespace mpservice
// ---- end part: mpservice/public/pool.hpp
// ---- begin part: mpservice/public/runner.hpp --------------------------------
// runner: ProcessRunner<T>, one persistent process holding a T that is built
// once and then called any number of times.
//
//     struct Scaler {
//         Scaler(mp::Queue<int> out, int factor);          // runs once, in the child
//         int operator()(int x);                           // each call runs in the child
//     };
//     mp::ProcessRunner<Scaler> r(out_queue, 3);           // starts the process
//     int y = r(14);                                       // blocks for the result
//     mp::AsyncResult<int> f = r.submit(15);               // or later: f.get()
//     r.join();                                            // or let the destructor do it
//
// The constructor's arguments travel when the process starts, as Process
// arguments do, so they may be library handles (Queue, Lock, Value, ...).
// Calls run one at a time, in the order they were made.  An exception thrown
// by a call comes back typed (as from a Process) and the runner keeps serving.
// If the process dies (a signal, exit(n)), the call it was running fails with
// ProcessError naming the signal or code, every queued call fails the same
// way, and later calls fail at once: a runner is not restarted behind your
// back, since its T's state is gone.
//
// It is a one-process Pool whose tasks are calls of T::operator(), so a call
// takes the pool's fast path (shared-memory rings, no system call when both
// sides are awake).

#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

namespace mpservice {

template <class T>
class ProcessRunner {
public:
    /// Starts the process (spawn context) and constructs T(args...) there.
    template <class... A, std::enable_if_t<(sizeof...(A) == 0) ||
                                               !std::is_base_of_v<Context, std::decay_t<std::tuple_element_t<
                                                                                0, std::tuple<A..., int>>>>,
                                           int> = 0>
    explicit ProcessRunner(A&&... args) : ProcessRunner(default_context(), std::forward<A>(args)...) {}

    /// Starts the process in `ctx` and constructs T(args...) there.
    template <class... A>
    explicit ProcessRunner(const Context& ctx, A&&... args) {
        detail::PoolSettings s;
        s.processes = 1;
        s.replace_dead_workers = false;
        s.kind = detail::runner_kind;
        Context c = ctx;
        auto entry = &detail::runner_entry<T, std::decay_t<A>...>;
        detail::WorkerFactory factory = [c, entry, tup = std::make_tuple(std::decay_t<A>(std::forward<A>(args))...)](
                                            const detail::PoolWorkerBoot& boot) {
            return std::apply(
                [&](const auto&... a) { return std::make_unique<Process<void>>(c, entry, boot, a...); }, tup);
        };
        core_ = detail::PoolCore::create(std::move(s), std::move(factory));
    }

    ProcessRunner(const ProcessRunner&) = delete;
    ProcessRunner& operator=(const ProcessRunner&) = delete;

    /// Waits for the calls already made, then stops the process (join()).
    ~ProcessRunner() {
        try {
            join();
        } catch (...) {
        }
    }

    /// Calls T::operator()(args...) in the process and waits for its result;
    /// re-throws its exception, or ProcessError if the process died.
    template <class... A>
    auto operator()(A&&... args) {
        return submit(std::forward<A>(args)...).take();
    }

    /// Sends the call and returns at once; the future is ready when it has run.
    template <class... A>
    auto submit(A&&... args) {
        using R = std::invoke_result_t<T&, std::decay_t<A>...>;
        auto st = std::make_shared<detail::AsyncState<R>>(typename detail::AsyncState<R>::Success(),
                                                          typename detail::AsyncState<R>::Failure());
        st->read_from(core_);
        auto job = std::make_shared<detail::SingleJob<R>>(st);
        detail::ChunkBuilder b(job, 1);
        b.add(std::decay_t<A>(args)...);
        detail::PoolTarget t{detail::os::CodeRef{},
                             detail::pool_code_ref(detail::fn_address(&detail::run_method_chunk<T, std::decay_t<A>...>))};
        core_->submit(t, b.chunks());
        return AsyncResult<R>(st);
    }

    /// Lets the calls already made finish, then stops the process; further
    /// calls are an InvalidStateError.  Returns quietly if the process died.
    void join() {
        if (joined_) return;
        core_->close();
        core_->join();
        joined_ = true;
    }
    /// Stops the process now (SIGTERM); pending calls fail with InvalidStateError.
    void terminate() {
        core_->terminate();
        core_->join();
        joined_ = true;
    }

    /// The process's pid (0 once it has ended).
    long pid() const {
        auto p = core_->worker_pids();
        return p.empty() ? 0 : p.front();
    }

private:
    detail::Shared<detail::PoolCore> core_;
    bool joined_ = false;
};

}  // namespace mpservice
// ---- end part: mpservice/public/runner.hpp
// ---- begin part: mpservice/public/server_process.hpp ------------------------
// server_process: a server process that hosts C++ objects for other processes
// (Python's managers, as mpservice reworked them), and shared memory blocks.
//
//     mp::ServerProcess server;                           // a child process, started
//     mp::Proxy<Counter> c = server.create<Counter>(10);  // Counter(10) lives in the server
//     c.call<&Counter::add>(5);                           // runs there; its result comes back
//     int v = c.call<&Counter::get>();
//     auto block = server.MemoryBlock(1 << 20);           // shared memory, zero-copy everywhere
//     block.data()[0] = 42;
//
// Nothing is registered.  As a Process target is identified by its place in
// the program, a constructor and a method are identified by the place of a
// small function the templates here instantiate for them (their "invoker"):
// the client sends the invoker's module offset, and the server - a run of the
// same build, which refuses clients of another build - checks it against the
// invokers its own static initializers announced, so a garbled request can
// never make it jump somewhere else.
//
// Proxies are handles with reference counts: copy them freely (a copy costs no
// message); pass them as Process arguments, inside Queue items or as method
// arguments and results, nested in any data the codec carries.  An encoded
// proxy is plain bytes - server address, object id, a one-use ticket - with no
// OS handle, so every channel carries it.  The object lives while a proxy in
// any process, or an encoded proxy not yet decoded, refers to it, and is
// destroyed in the server when the last one goes.  A client process that dies,
// even by SIGKILL, loses its references (the server sees its connection end).
// A ticket that is never decoded keeps its object alive until the server shuts
// down (as in Python); each encoding costs one such ticket, so the leak is
// bounded by the encodings you make and drop unread.
//
// Concurrency: each client thread has its own connection, served by its own
// server thread.  Calls from different threads or processes run concurrently in
// the server - on the same object too - so a hosted class needs its own
// locking (the hosted containers here have it).  One thread's calls run in
// order.  A call from a thread of a *forked* child opens a connection of its own.
//
// Fast path: a thread's connection also has a small shared-memory slot for
// requests and replies that carry no OS handle; both sides spin briefly on it
// before they sleep on a futex in it, so back-to-back calls cost no system
// call, and a client whose calls keep finding the server asleep asks for one
// long spin on both sides to get out of paying two wake-ups per call.
//
// The server dying makes every call fail at once with mp::ServerError naming
// it - never a hang.  A method's exception arrives as it does from a Process:
// as Remote<E>, with the server's stack at the throw.

#include <any>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace mpservice {

/// A server process is gone, refused a request, or does not know an object.
class ServerError : public Error {
public:
    using Error::Error;
};

template <class T>
class Proxy;
class ServerProcess;

// ---------------------------------------------------------------- internals shared by the templates

namespace detail::server {

/// Runs a method in the server: checks that `object` is of the invoker's class
/// (`type` is the object's type tag), decodes the arguments, writes the result.
using MethodFn = void (*)(const void* type, void* object, Decoder& args, Encoder& result);

/// A newly constructed hosted object.
struct NewObject {
    void* object = nullptr;
    void (*destroy)(void*) noexcept = nullptr;
    const void* type = nullptr;   // the class's type tag (an address in this process)
    const char* type_name = "";   // typeid name (mangled)
};
/// Runs a constructor in the server.
using CreateFn = NewObject (*)(Decoder& args);

/// One address per class in each process: the identity hosted objects are checked against.
template <class T>
struct TypeTag {
    static constexpr char tag = 0;
};

/// Announces an invoker of this build with its identity (the type that
/// instantiated it); the server runs only announced invokers, and only when
/// the identity the client sent matches.
MPSERVICE_API bool announce_invoker(const void* fn, const std::type_info& identity) noexcept;
/// FNV-1a hash of a type's name: the type check of a decoded proxy.
MPSERVICE_API std::uint64_t type_hash(const char* mangled) noexcept;

class Link;

/// What every Proxy copy in one process shares for one object: the link to its
/// server, the object id and, for memory blocks, the mapping (made once).
struct Ref {
    Shared<Link> link;
    std::uint64_t id = 0;
    std::uint64_t type = 0;  // type_hash of the class
    std::mutex mapping_mutex;
    SharedMemory mapping;
    Ref() = default;
    Ref(const Ref&) = delete;
    Ref& operator=(const Ref&) = delete;
    MPSERVICE_API ~Ref();  // drops this process's reference (one message)
};
using RefPtr = Shared<Ref>;

/// The client side of a server, as ServerProcess and ServerClient hold it.
MPSERVICE_API RefPtr create_object(const Shared<Link>& link, const void* creator, std::uint64_t type,
                                   const Encoder& args);
/// Calls `method` on the object; returns the encoded result (and its handles).
MPSERVICE_API std::string call_method(const Ref& ref, const void* method, const Encoder& args,
                                      std::vector<os::handle_t>& handles);
MPSERVICE_API void encode_ref(Encoder& e, const RefPtr& ref);
MPSERVICE_API RefPtr decode_ref(Decoder& d, std::uint64_t type, const char* type_name);
/// The memory block behind a MemoryBlock proxy, mapped in this process (once).
MPSERVICE_API const SharedMemory& block_mapping(Ref& ref);
/// In a server process: a new object hosted by this server, with a reference
/// held by the returned Ref.  InvalidStateError in any other process.
MPSERVICE_API RefPtr host_here(NewObject obj, std::uint64_t type);
MPSERVICE_API bool in_server_process() noexcept;
/// Benchmark hook: whether new thread connections use the shared-memory slot
/// (default true; false measures the socket-only path).
MPSERVICE_API void set_fast_path(bool enabled) noexcept;
/// Benchmark hook: what this process's calls through a slot did so far.
struct SlotCounters {
    std::uint64_t calls = 0;        ///< requests through a slot
    std::uint64_t spun = 0;         ///< answered while the caller spun
    std::uint64_t slept = 0;        ///< the caller slept for the answer
    std::uint64_t slow = 0;         ///< ... and it came after more than 20 us (a cross-CPU wake-up)
    std::uint64_t woke_server = 0;  ///< the request found the server's thread asleep
    std::uint64_t resyncs = 0;      ///< long spins tried to leave the sleep-sleep pattern
    std::uint64_t resynced = 0;     ///< ... after which both sides spun again
};
MPSERVICE_API SlotCounters slot_counters() noexcept;

// ---- method traits: R (C::*)(P...) [const] [noexcept]
template <class M>
struct method_traits;
#define MPSERVICE_METHOD_TRAITS(QUAL)                                 \
    template <class R, class C, class... P>                           \
    struct method_traits<R (C::*)(P...) QUAL> {                       \
        using result = R;                                             \
        using cls = C;                                                \
        using params = std::tuple<P...>;                              \
        static constexpr std::size_t arity = sizeof...(P);            \
    };
MPSERVICE_METHOD_TRAITS()
MPSERVICE_METHOD_TRAITS(const)
MPSERVICE_METHOD_TRAITS(noexcept)
MPSERVICE_METHOD_TRAITS(const noexcept)
MPSERVICE_METHOD_TRAITS(&)
MPSERVICE_METHOD_TRAITS(const&)
#undef MPSERVICE_METHOD_TRAITS

[[noreturn]] MPSERVICE_API void throw_wrong_type(const char* expected_mangled);

/// The invoker of method M of class C.
template <class C, auto M>
struct Method {
    using Traits = method_traits<decltype(M)>;
    using R = typename Traits::result;
    using Params = typename Traits::params;

    static void invoke(const void* type, void* object, Decoder& in, Encoder& out) {
        if (type != &TypeTag<C>::tag) throw_wrong_type(typeid(C).name());
        run(*static_cast<C*>(object), in, out, std::make_index_sequence<Traits::arity>{});
    }
    template <std::size_t... I>
    static void run(C& obj, Decoder& in, Encoder& out, std::index_sequence<I...>) {
        std::tuple<std::decay_t<std::tuple_element_t<I, Params>>...> args{
            in.read<std::decay_t<std::tuple_element_t<I, Params>>>()...};  // braced: left to right
        in.expect_end("method arguments");
        if constexpr (std::is_void_v<R>) {
            (obj.*M)(static_cast<std::tuple_element_t<I, Params>&&>(std::get<I>(args))...);
            (void)out;
        } else {
            out.write<std::decay_t<R>>((obj.*M)(static_cast<std::tuple_element_t<I, Params>&&>(std::get<I>(args))...));
        }
    }
    static inline const bool announced = announce_invoker(reinterpret_cast<const void*>(&invoke), typeid(Method*));
    static const void* address() {
        (void)announced;
        return reinterpret_cast<const void*>(&invoke);
    }
};

template <class T>
void destroy_object(void* p) noexcept {
    delete static_cast<T*>(p);
}
template <class T>
NewObject new_object(T* p) {
    return NewObject{p, &destroy_object<T>, &TypeTag<T>::tag, typeid(T).name()};
}

/// The invoker of constructor T(A...).
template <class T, class... A>
struct Creator {
    static NewObject invoke(Decoder& in) {
        std::tuple<A...> args{in.read<A>()...};
        in.expect_end("constructor arguments");
        return new_object(std::apply([](A&... a) { return new T(std::move(a)...); }, args));
    }
    static inline const bool announced = announce_invoker(reinterpret_cast<const void*>(&invoke), typeid(Creator*));
    static const void* address() {
        (void)announced;
        return reinterpret_cast<const void*>(&invoke);
    }
};

template <class T>
std::uint64_t type_hash_of() {
    static const std::uint64_t h = type_hash(typeid(T).name());
    return h;
}

/// What an argument of create<T>() travels as: its decayed type, except that a
/// C string travels as std::string (a pointer means nothing in the server).
template <class A>
using arg_t = std::conditional_t<std::is_same_v<std::decay_t<A>, const char*> || std::is_same_v<std::decay_t<A>, char*>,
                                 std::string, std::decay_t<A>>;

template <class P, class A>
void write_param(Encoder& e, A&& a) {
    using D = std::decay_t<P>;
    if constexpr (std::is_same_v<std::decay_t<A>, D>)
        e.write<D>(a);
    else
        e.write<D>(D(std::forward<A>(a)));
}

}  // namespace detail::server

// ---------------------------------------------------------------- proxies

/// The common part of every Proxy<T>: the reference and call<>().
template <class T>
class ProxyBase {
public:
    ProxyBase() = default;

    /// Runs method M (a member function of T) on the object in the server with
    /// `args` (converted to M's parameter types, carried by the codec) and
    /// returns its result, decoded.  Re-throws the method's exception as
    /// Remote<E>; ServerError if the server is gone or the proxy is empty.
    template <auto M, class... A>
    auto call(A&&... args) const {
        using Inv = detail::server::Method<T, M>;
        using R = std::decay_t<typename Inv::R>;
        static_assert(std::is_base_of_v<typename Inv::Traits::cls, T>,
                      "mpservice: call<&C::method>: C must be the proxy's class (or its base)");
        static_assert(sizeof...(A) == Inv::Traits::arity, "mpservice: call<&C::method>: wrong number of arguments");
        Encoder e;
        write_all<typename Inv::Params>(e, std::index_sequence_for<A...>{}, std::forward<A>(args)...);
        std::vector<detail::os::handle_t> handles;
        std::string bytes = detail::server::call_method(ref(), Inv::address(), e, handles);
        struct Closer {
            std::vector<detail::os::handle_t>& hs;
            ~Closer() {
                for (auto h : hs) detail::os::close_handle(h);
            }
        } closer{handles};
        if constexpr (std::is_void_v<R>) {
            return;
        } else {
            Decoder d(bytes.data(), bytes.size(), &handles);
            R r = d.read<R>();
            d.expect_end("method result");
            return r;
        }
    }

    /// Whether this proxy refers to an object.
    explicit operator bool() const noexcept { return static_cast<bool>(ref_); }
    /// The object's id in its server.
    std::uint64_t id() const noexcept { return ref_ ? ref_->id : 0; }
    /// Drops this handle's reference now (as destroying it would).
    void reset() noexcept { ref_.reset(); }

    /// (internal)
    const detail::server::RefPtr& ref_ptr() const noexcept { return ref_; }
    explicit ProxyBase(detail::server::RefPtr r) : ref_(std::move(r)) {}

protected:
    detail::server::Ref& ref() const {
        if (!ref_) throw ServerError("mpservice: call on an empty proxy (released or default-constructed)");
        return *ref_;
    }

private:
    template <class Params, std::size_t... I, class... A>
    static void write_all(Encoder& e, std::index_sequence<I...>, A&&... a) {
        (detail::server::write_param<std::tuple_element_t<I, Params>>(e, std::forward<A>(a)), ...);
    }
    detail::server::RefPtr ref_;
};

/// A handle to an object of class T hosted by a server process.
template <class T>
class Proxy : public ProxyBase<T> {
public:
    using ProxyBase<T>::ProxyBase;
};

/// Proxies travel through the codec as plain bytes (see the top of this file).
template <class T>
struct Codec<Proxy<T>> {
    static void encode(Encoder& e, const Proxy<T>& p) { detail::server::encode_ref(e, p.ref_ptr()); }
    static Proxy<T> decode(Decoder& d) {
        return Proxy<T>(detail::server::decode_ref(d, detail::server::type_hash_of<T>(), typeid(T).name()));
    }
};

// ---------------------------------------------------------------- objects made inside the server

/// Inside a server process (in a hosted object's method or constructor): hosts
/// a new T(args...) in this server and returns a proxy to it, which the method
/// can return - alone or nested in other data - to its caller (SPEC §4.4
/// `managed`).  InvalidStateError in any other process.
template <class T, class... A>
Proxy<T> managed(A&&... args) {
    if (!detail::server::in_server_process())
        throw InvalidStateError("mpservice: managed<T>() works only inside a server process (in a hosted method)");
    T* p = new T(std::forward<A>(args)...);
    detail::server::NewObject obj;
    try {
        obj = detail::server::new_object(p);
    } catch (...) {
        delete p;
        throw;
    }
    return Proxy<T>(detail::server::host_here(obj, detail::server::type_hash_of<T>()));
}

// ---------------------------------------------------------------- shared memory blocks

/// A block of shared memory hosted by a server (anonymous memory: no name in
/// /dev/shm, freed by the kernel when the server object and every mapping of
/// it are gone, whoever dies).  Made by server.MemoryBlock(n) or, in a hosted
/// method, by managed<MemoryBlock>(n); used through Proxy<MemoryBlock>.
class MemoryBlock {
public:
    /// size > 0, else std::invalid_argument.
    explicit MemoryBlock(std::size_t size) : mem_(detail::SharedMemory::create(checked(size))) {}
    std::size_t size() const noexcept { return mem_.size(); }
    unsigned char* data() const noexcept { return static_cast<unsigned char*>(mem_.data()); }
    /// (internal) the memory, for the proxies' mapping.
    const detail::SharedMemory& memory() const noexcept { return mem_; }

private:
    static std::size_t checked(std::size_t size) {
        if (size == 0) throw std::invalid_argument("mpservice: MemoryBlock of size 0");
        return size;
    }
    detail::SharedMemory mem_;
};

/// A view of bytes (C++17 has no std::span).
struct ByteSpan {
    unsigned char* ptr = nullptr;
    std::size_t len = 0;
    unsigned char* data() const noexcept { return ptr; }
    std::size_t size() const noexcept { return len; }
    unsigned char* begin() const noexcept { return ptr; }
    unsigned char* end() const noexcept { return ptr + len; }
    unsigned char& operator[](std::size_t i) const noexcept { return ptr[i]; }
};

/// A memory block, mapped in this process at first use (once per process,
/// whatever the number of proxies); writes are visible to every process at once.
template <>
class Proxy<MemoryBlock> : public ProxyBase<MemoryBlock> {
public:
    using ProxyBase<MemoryBlock>::ProxyBase;
    unsigned char* data() const { return static_cast<unsigned char*>(mapping().data()); }
    std::size_t size() const { return mapping().size(); }
    ByteSpan bytes() const { return ByteSpan{data(), size()}; }
    unsigned char& operator[](std::size_t i) const { return data()[i]; }

private:
    const detail::SharedMemory& mapping() const { return detail::server::block_mapping(ref()); }
};

// ---------------------------------------------------------------- hosted standard containers

/// A std::vector<T> hosted by a server, with its own lock (server.list<T>()).
template <class T>
class List {
public:
    List() = default;
    explicit List(std::vector<T> items) : items_(std::move(items)) {}
    void append(T v) {
        std::lock_guard<std::mutex> g(m_);
        items_.push_back(std::move(v));
    }
    void extend(std::vector<T> vs) {
        std::lock_guard<std::mutex> g(m_);
        for (auto& v : vs) items_.push_back(std::move(v));
    }
    void insert(std::int64_t i, T v) {
        std::lock_guard<std::mutex> g(m_);
        auto n = static_cast<std::int64_t>(items_.size());
        if (i < 0) i = std::max<std::int64_t>(0, i + n);
        if (i > n) i = n;
        items_.insert(items_.begin() + i, std::move(v));
    }
    T get(std::int64_t i) const {
        std::lock_guard<std::mutex> g(m_);
        return items_[index(i)];
    }
    void set(std::int64_t i, T v) {
        std::lock_guard<std::mutex> g(m_);
        items_[index(i)] = std::move(v);
    }
    T pop(std::int64_t i) {
        std::lock_guard<std::mutex> g(m_);
        std::size_t k = index(i);
        T v = std::move(items_[k]);
        items_.erase(items_.begin() + static_cast<std::ptrdiff_t>(k));
        return v;
    }
    std::size_t len() const {
        std::lock_guard<std::mutex> g(m_);
        return items_.size();
    }
    void clear() {
        std::lock_guard<std::mutex> g(m_);
        items_.clear();
    }
    std::vector<T> copy() const {
        std::lock_guard<std::mutex> g(m_);
        return items_;
    }

private:
    std::size_t index(std::int64_t i) const {
        auto n = static_cast<std::int64_t>(items_.size());
        if (i < 0) i += n;
        if (i < 0 || i >= n)
            throw std::out_of_range("list index " + std::to_string(i) + " out of range (size " + std::to_string(n) + ")");
        return static_cast<std::size_t>(i);
    }
    mutable std::mutex m_;
    std::vector<T> items_;
};

/// A std::map<K, V> hosted by a server, with its own lock (server.dict<K, V>()).
/// get() of a missing key throws std::out_of_range (Python's KeyError).
template <class K, class V>
class Dict {
public:
    Dict() = default;
    explicit Dict(std::map<K, V> items) : items_(std::move(items)) {}
    void set(K k, V v) {
        std::lock_guard<std::mutex> g(m_);
        items_[std::move(k)] = std::move(v);
    }
    V get(const K& k) const {
        std::lock_guard<std::mutex> g(m_);
        auto it = items_.find(k);
        if (it == items_.end()) throw std::out_of_range("dict: key not found");
        return it->second;
    }
    std::optional<V> find(const K& k) const {
        std::lock_guard<std::mutex> g(m_);
        auto it = items_.find(k);
        if (it == items_.end()) return std::nullopt;
        return it->second;
    }
    V get_or(const K& k, V fallback) const {
        std::lock_guard<std::mutex> g(m_);
        auto it = items_.find(k);
        return it == items_.end() ? fallback : it->second;
    }
    bool contains(const K& k) const {
        std::lock_guard<std::mutex> g(m_);
        return items_.count(k) != 0;
    }
    V pop(const K& k) {
        std::lock_guard<std::mutex> g(m_);
        auto it = items_.find(k);
        if (it == items_.end()) throw std::out_of_range("dict: key not found");
        V v = std::move(it->second);
        items_.erase(it);
        return v;
    }
    V setdefault(K k, V v) {
        std::lock_guard<std::mutex> g(m_);
        return items_.emplace(std::move(k), std::move(v)).first->second;
    }
    void update(std::map<K, V> more) {
        std::lock_guard<std::mutex> g(m_);
        for (auto& kv : more) items_[kv.first] = std::move(kv.second);
    }
    std::size_t len() const {
        std::lock_guard<std::mutex> g(m_);
        return items_.size();
    }
    void clear() {
        std::lock_guard<std::mutex> g(m_);
        items_.clear();
    }
    std::vector<K> keys() const {
        std::lock_guard<std::mutex> g(m_);
        std::vector<K> out;
        for (auto& kv : items_) out.push_back(kv.first);
        return out;
    }
    std::vector<V> values() const {
        std::lock_guard<std::mutex> g(m_);
        std::vector<V> out;
        for (auto& kv : items_) out.push_back(kv.second);
        return out;
    }
    std::vector<std::pair<K, V>> items() const {
        std::lock_guard<std::mutex> g(m_);
        return std::vector<std::pair<K, V>>(items_.begin(), items_.end());
    }
    std::map<K, V> copy() const {
        std::lock_guard<std::mutex> g(m_);
        return items_;
    }

private:
    mutable std::mutex m_;
    std::map<K, V> items_;
};

/// One value hosted by a server, with its own lock (server.value<T>(v)).
template <class T>
class ValueBox {
public:
    ValueBox() = default;
    explicit ValueBox(T v) : v_(std::move(v)) {}
    T get() const {
        std::lock_guard<std::mutex> g(m_);
        return v_;
    }
    void set(T v) {
        std::lock_guard<std::mutex> g(m_);
        v_ = std::move(v);
    }
    /// Stores v and returns the previous value (one round trip).
    T exchange(T v) {
        std::lock_guard<std::mutex> g(m_);
        std::swap(v, v_);
        return v;
    }

private:
    mutable std::mutex m_;
    T v_{};
};

/// Named values of any types the codec carries, hosted by a server, with its
/// own lock (server.Namespace(); Python's Manager().Namespace()).  Python's
/// NamespaceProxy forwards attribute get, set and delete; here they are typed:
/// Proxy<Namespace>::set(name, v), get<T>(name), erase(name).  Values live in
/// the server as the T that was set (decoded there: a stored proxy keeps its
/// object alive, as one in a hosted list does); get<T> of another type than
/// the one stored is std::invalid_argument naming both, a missing name
/// std::out_of_range (Python's AttributeError).
class Namespace {
public:
    MPSERVICE_API Namespace();
    MPSERVICE_API ~Namespace();
    Namespace(const Namespace&) = delete;
    Namespace& operator=(const Namespace&) = delete;

    template <class T>
    void store(std::string name, T value) {
        Held old;  // a replaced value is destroyed unlocked (it may hold proxies)
        std::lock_guard<std::mutex> g(m_);
        Held& slot = slot_for(std::move(name));
        old = std::move(slot);
        slot.value = std::move(value);
        slot.type_name = typeid(T).name();
    }
    template <class T>
    T load(const std::string& name) const {
        std::lock_guard<std::mutex> g(m_);
        const Held& h = find(name);
        const T* v = std::any_cast<T>(&h.value);
        if (!v) throw_mismatch(name, h.type_name, typeid(T).name());
        return *v;
    }
    MPSERVICE_API bool contains(const std::string& name) const;
    /// Python's `del ns.name`: std::out_of_range if it is not there.
    MPSERVICE_API void erase(const std::string& name);
    MPSERVICE_API std::vector<std::string> names() const;
    /// The (readable) type of the value stored under `name`.
    MPSERVICE_API std::string type_of(const std::string& name) const;
    MPSERVICE_API std::size_t len() const;

private:
    struct Held {
        std::any value;
        const char* type_name = "";
    };
    MPSERVICE_API const Held& find(const std::string& name) const;
    /// The slot of `name`, made empty if there is none (under m_).
    MPSERVICE_API Held& slot_for(std::string name);
    [[noreturn]] MPSERVICE_API static void throw_mismatch(const std::string& name, const char* held, const char* asked);
    mutable std::mutex m_;
    struct Values;  // the implementation's std::map<std::string, Held>
    detail::Owned<Values> values_;
};

template <class T>
class Proxy<List<T>> : public ProxyBase<List<T>> {
    using L = List<T>;

public:
    using ProxyBase<L>::ProxyBase;
    void append(const T& v) const { this->template call<&L::append>(v); }
    void extend(const std::vector<T>& vs) const { this->template call<&L::extend>(vs); }
    void insert(std::int64_t i, const T& v) const { this->template call<&L::insert>(i, v); }
    /// Negative indices count from the end; std::out_of_range past it.
    T get(std::int64_t i) const { return this->template call<&L::get>(i); }
    T operator[](std::int64_t i) const { return get(i); }
    void set(std::int64_t i, const T& v) const { this->template call<&L::set>(i, v); }
    T pop(std::int64_t i = -1) const { return this->template call<&L::pop>(i); }
    std::size_t len() const { return this->template call<&L::len>(); }
    std::size_t size() const { return len(); }
    void clear() const { this->template call<&L::clear>(); }
    /// The whole list, copied here.
    std::vector<T> copy() const { return this->template call<&L::copy>(); }
};

template <class K, class V>
class Proxy<Dict<K, V>> : public ProxyBase<Dict<K, V>> {
    using D = Dict<K, V>;

public:
    using ProxyBase<D>::ProxyBase;
    void set(const K& k, const V& v) const { this->template call<&D::set>(k, v); }
    /// std::out_of_range if the key is missing.
    V get(const K& k) const { return this->template call<&D::get>(k); }
    std::optional<V> find(const K& k) const { return this->template call<&D::find>(k); }
    V get_or(const K& k, const V& fallback) const { return this->template call<&D::get_or>(k, fallback); }
    bool contains(const K& k) const { return this->template call<&D::contains>(k); }
    V pop(const K& k) const { return this->template call<&D::pop>(k); }
    V setdefault(const K& k, const V& v) const { return this->template call<&D::setdefault>(k, v); }
    void update(const std::map<K, V>& more) const { this->template call<&D::update>(more); }
    std::size_t len() const { return this->template call<&D::len>(); }
    std::size_t size() const { return len(); }
    void clear() const { this->template call<&D::clear>(); }
    std::vector<K> keys() const { return this->template call<&D::keys>(); }
    std::vector<V> values() const { return this->template call<&D::values>(); }
    std::vector<std::pair<K, V>> items() const { return this->template call<&D::items>(); }
    std::map<K, V> copy() const { return this->template call<&D::copy>(); }
};

template <class T>
class Proxy<ValueBox<T>> : public ProxyBase<ValueBox<T>> {
    using B = ValueBox<T>;

public:
    using ProxyBase<B>::ProxyBase;
    T get() const { return this->template call<&B::get>(); }
    void set(const T& v) const { this->template call<&B::set>(v); }
    T exchange(const T& v) const { return this->template call<&B::exchange>(v); }
};

/// A hosted Namespace.  Names starting with '_' are refused: Python keeps
/// those on the proxy object itself, and a C++ proxy has no attributes of its own.
template <>
class Proxy<Namespace> : public ProxyBase<Namespace> {
    using N = Namespace;

public:
    using ProxyBase<N>::ProxyBase;
    /// ns.name = v (a C string is stored as std::string).
    template <class T>
    void set(const std::string& name, T&& v) const {
        using V = detail::server::arg_t<T>;
        this->template call<&N::template store<V>>(checked(name), V(std::forward<T>(v)));
    }
    /// ns.name, as the type it was stored as: std::invalid_argument if it is
    /// another, std::out_of_range if there is no such name.
    template <class T>
    T get(const std::string& name) const {
        return this->template call<&N::template load<T>>(checked(name));
    }
    /// ns.name, or `fallback` if there is no such name (one round trip).
    template <class T>
    T get_or(const std::string& name, T fallback) const {
        try {
            return get<T>(name);
        } catch (const std::out_of_range&) {
            return fallback;
        }
    }
    MPSERVICE_API bool contains(const std::string& name) const;
    /// del ns.name: std::out_of_range if there is no such name.
    MPSERVICE_API void erase(const std::string& name) const;
    MPSERVICE_API std::vector<std::string> names() const;
    MPSERVICE_API std::string type_of(const std::string& name) const;
    MPSERVICE_API std::size_t len() const;

private:
    /// `name`, or std::invalid_argument if it is empty or starts with '_'.
    MPSERVICE_API static const std::string& checked(const std::string& name);
};

// ---------------------------------------------------------------- the server process

/// How a ServerProcess is made (all optional).
struct ServerOptions {
    std::string name;                     ///< default "ServerProcess-N"
    const Context* context = nullptr;     ///< default: the spawn context
    bool start = true;                    ///< start in the constructor
    std::chrono::milliseconds shutdown_timeout{1000};  ///< per step of shutdown()
};

/// Creation of hosted objects, for a ServerProcess and for a ServerClient
/// passed on to other processes.
class ServerAccess {
public:
    /// Constructs T(args...) in the server; the arguments travel by the codec.
    template <class T, class... A>
    Proxy<T> create(A&&... args) const {
        using C = detail::server::Creator<T, detail::server::arg_t<A>...>;
        Encoder e;
        (detail::server::write_param<detail::server::arg_t<A>>(e, std::forward<A>(args)), ...);
        return Proxy<T>(detail::server::create_object(link(), C::address(), detail::server::type_hash_of<T>(), e));
    }
    /// A hosted std::vector<T>.
    template <class T>
    Proxy<List<T>> list(std::vector<T> items = {}) const {
        return create<List<T>>(std::move(items));
    }
    /// A hosted std::map<K, V>.
    template <class K, class V>
    Proxy<Dict<K, V>> dict(std::map<K, V> items = {}) const {
        return create<Dict<K, V>>(std::move(items));
    }
    /// A hosted value.
    template <class T>
    Proxy<ValueBox<T>> value(T v = T{}) const {
        return create<ValueBox<T>>(std::move(v));
    }
    /// A hosted Namespace (Python's Manager().Namespace()).
    /// (Templates only so that their invokers are compiled, announced and
    /// linked only where they are called, not in every includer.)
    template <class N = mpservice::Namespace>
    Proxy<N> Namespace() const {
        return create<N>();
    }
    /// A shared memory block of `size` bytes (> 0), zero-filled.
    template <class B = mpservice::MemoryBlock>
    Proxy<B> MemoryBlock(std::size_t size) const {
        if (size == 0) throw std::invalid_argument("mpservice: MemoryBlock of size 0");
        return create<B>(size);
    }
    /// Objects alive in the server (diagnostics; includes objects kept by tickets in flight).
    MPSERVICE_API std::size_t object_count() const;
    /// Open descriptors and memory mappings of the server process (diagnostics).
    MPSERVICE_API std::pair<long, long> resource_counts() const;
    /// The server's address (an abstract-namespace socket name).
    MPSERVICE_API const std::string& address() const;

    /// (internal)
    MPSERVICE_API const detail::Shared<detail::server::Link>& link() const;

protected:
    ServerAccess() = default;
    detail::Shared<detail::server::Link> link_;
};

/// A handle to a running server that can be passed to other processes (as a
/// Process argument, in a queue item) to create objects there; it holds no
/// process and must not outlive its ServerProcess's use.
class ServerClient : public ServerAccess {
public:
    ServerClient() = default;
    MPSERVICE_API explicit ServerClient(detail::Shared<detail::server::Link> link);
};

/// A server process hosting objects (see the top of this file).  Started by
/// its constructor unless options.start is false; destroyed -> shut down.
class ServerProcess : public ServerAccess {
public:
    MPSERVICE_API ServerProcess();
    MPSERVICE_API explicit ServerProcess(const Context& ctx);
    MPSERVICE_API explicit ServerProcess(ServerOptions options);
    ServerProcess(const ServerProcess&) = delete;
    ServerProcess& operator=(const ServerProcess&) = delete;
    /// shutdown().
    MPSERVICE_API ~ServerProcess();

    /// Starts the server; InvalidStateError if it was started already.
    MPSERVICE_API void start();
    /// Asks the server to end, waits up to shutdown_timeout, then terminates
    /// it, waits again, then kills it.  Proxies fail with ServerError after it.
    /// Idempotent.
    MPSERVICE_API void shutdown() noexcept;
    MPSERVICE_API bool is_alive() const;
    MPSERVICE_API long pid() const;
    MPSERVICE_API const std::string& name() const;
    MPSERVICE_API std::optional<int> exitcode() const;
    /// The server's process (to join, kill, or watch it).
    Process<void>& process() { return *process_; }
    /// A handle for other processes to create objects on this server.
    ServerClient client() const { return ServerClient(link()); }

private:
    ServerOptions options_;
    detail::Owned<Process<void>> process_;  // empty until start()
};

/// The seed's name for it.
using Manager = ServerProcess;

template <>
struct Codec<ServerClient> {
    MPSERVICE_API static void encode(Encoder& e, const ServerClient& c);
    MPSERVICE_API static ServerClient decode(Decoder& d);
};

}  // namespace mpservice
// ---- end part: mpservice/public/server_process.hpp

#endif  // MPSERVICE_HPP_INCLUDED

// The implementation is outside the include guard so that a second inclusion
// with MPSERVICE_IMPLEMENTATION defined still emits it, and its own guard makes
// sure it is emitted only once per translation unit.
//
// It comes whole (MPSERVICE_IMPLEMENTATION) or in parts: a translation unit
// that defines MPSERVICE_IMPLEMENTATION_PART=n (1 <= n <= MPSERVICE_IMPLEMENTATION_PARTS)
// compiles part n only.  A static library of the parts gives the same program,
// and its link keeps only the parts a program uses (and each part compiles
// alone, in parallel with the others):
//    1 the platform layer, the codec,     8 server process: the host, and
//      shared memory                        the server's own link
//    2 remote exceptions
//    3 logging, threads                   9 server process: the clients' links
//    4 locks, queues (shared state)      10 connections (Pipe, connection_wait)
//    5 processes: the runtime, the       11 Pool: reading results, dead
//      child's side, the fork server,       workers
//      the warm spawner                  12 server process: references,
//    6 processes: the parent's side         ServerProcess, Namespace
//      (output capture, the reactor,     13 throw-site stacks and their
//      Process objects)                     symbols (POSIX; empty on Windows,
//    7 Pool: the workers' loop, starting    where part 1 has them)
//      and feeding the workers
// Parts are cut so that each compiles in a few seconds.  The count is here,
// once: the CMake build, the tools and the benches read it.
#define MPSERVICE_IMPLEMENTATION_PARTS 13
#if defined(MPSERVICE_IMPLEMENTATION) && !defined(MPSERVICE_IMPLEMENTATION_PART)
#define MPSERVICE_IMPLEMENTATION_PART 0  // 0: every part
#endif
#if defined(MPSERVICE_IMPLEMENTATION_PART) && !defined(MPSERVICE_IMPLEMENTATION_INCLUDED)
#define MPSERVICE_IMPLEMENTATION_INCLUDED
#if MPSERVICE_IMPLEMENTATION_PART < 0 || MPSERVICE_IMPLEMENTATION_PART > MPSERVICE_IMPLEMENTATION_PARTS
#error "MPSERVICE_IMPLEMENTATION_PART must be 1..MPSERVICE_IMPLEMENTATION_PARTS (or undefined, with MPSERVICE_IMPLEMENTATION: every part)"
#endif
#define MPSERVICE_PART_(n) (MPSERVICE_IMPLEMENTATION_PART == 0 || MPSERVICE_IMPLEMENTATION_PART == n)

// ---- begin part: mpservice/impl/parts.hpp -----------------------------------
// parts: what one part of the implementation uses of another.
//
// The implementation is compiled either whole (MPSERVICE_IMPLEMENTATION, one
// translation unit) or part by part (MPSERVICE_IMPLEMENTATION_PART=1..N, one
// translation unit each, see mpservice.hpp).  Within a part, its files share
// unnamed-namespace helpers freely; what crosses a part's border is declared
// here, with external linkage, so that both ways build the same program.  This
// file comes first in every part.

#include <cstddef>
#include <mutex>
#include <string>

// ---- begin part: mpservice/impl/process_wire.cpp ----------------------------
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
// ---- end part: mpservice/impl/process_wire.cpp

namespace mpservice {
namespace detail {

/// The build fingerprint of `module` ("" = the main program), cached (process_runtime.cpp).
std::string fingerprint_of(const std::string& module);
/// Builds the table of standard exception types before a fork (remote_exception.cpp).
void prepare_exception_types_for_fork();

}  // namespace detail
}  // namespace mpservice

#if defined(MPSERVICE_POSIX)
struct dl_phdr_info;  // <link.h>
namespace mpservice::detail::os {
/// The lock of the library's loader calls, taken around fork (os_posix.cpp).
std::recursive_mutex& loader_calls_mutex();
/// dl_iterate_phdr under that lock (os_posix.cpp).
int walk_loaded_modules(int (*visit)(dl_phdr_info*, std::size_t, void*), void* data);
}  // namespace mpservice::detail::os
#endif
// ---- end part: mpservice/impl/parts.hpp

#if MPSERVICE_PART_(1)
// ---- begin part: mpservice/impl/os_posix.cpp --------------------------------
// os_posix: the POSIX (Linux first) back-end of detail/os.hpp.  This file is
// the only place that includes POSIX headers or makes system calls.
#if !defined(_WIN32)

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <mutex>
#include <system_error>

#include <dirent.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__linux__)
#include <linux/falloc.h>
#include <linux/futex.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/auxv.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#endif
// synchronization section
#include <cstdio>
#include <cstring>
#include <link.h>
#include <stdexcept>

extern char** environ;
// LeakSanitizer's interface, when it is linked in (weak: absent otherwise).
extern "C" void __lsan_register_root_region(const void* p, std::size_t size) __attribute__((weak));

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

bool handle_valid(handle_t h) noexcept { return h >= 0 && ::fcntl(h, F_GETFD) != -1; }

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

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MPSERVICE_TSAN 1
#endif
#if __has_feature(address_sanitizer)
#define MPSERVICE_DETAIL_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define MPSERVICE_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#define MPSERVICE_DETAIL_ASAN 1
#endif
// Both compilers ship the annotation interface with their TSan runtime.
#if defined(MPSERVICE_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

namespace {
/// One bounded sleep for the mutex, until `until` (steady clock).
int lock_until_once(RobustMutex* m, Deadline until) {
#if defined(MPSERVICE_TSAN)
    // ThreadSanitizer (LLVM 14) does not intercept pthread_mutex_clocklock and
    // then loses track of the mutex; under it, use timedlock, whose deadline is
    // on the wall clock (a clock step shifts the timeout - acceptable in tests).
    auto left = until - Clock::now();
    auto wall = std::chrono::system_clock::now() + std::chrono::duration_cast<std::chrono::system_clock::duration>(left);
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(wall.time_since_epoch()).count();
    timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    const int rc = pthread_mutex_timedlock(native(m), &ts);
    // Its timedlock interceptor records only a plain success as taking the
    // lock; a dead owner's lock is ours too (its pthread_mutex_lock knows).
    if (rc == EOWNERDEAD) {
        __tsan_mutex_pre_lock(native(m), __tsan_mutex_try_lock);
        __tsan_mutex_post_lock(native(m), __tsan_mutex_try_lock, 1);
    }
    return rc;
#else
    // An absolute deadline on the monotonic clock: immune to wall-clock steps.
    timespec ts = to_timespec(until);
    return pthread_mutex_clocklock(native(m), CLOCK_MONOTONIC, &ts);
#endif
}

/// How long one kernel sleep for a robust mutex lasts at most.  The robust
/// futex protocol can lose a wake-up: the unlocker clears the word (and its
/// waiters bit) and wakes one sleeper; if that sleeper is killed before it
/// takes the lock and a third thread takes it first (a trylock, which does
/// not set the waiters bit), the kernel's death handling sees an owner and
/// wakes nobody, and the new owner's unlock sees no waiters.  The remaining
/// sleepers would sleep forever (seen under ThreadSanitizer's timing).  A
/// sleeper that wakes at the end of its slice re-marks the word as contended,
/// so the next unlock wakes it: the cost of the race is one slice of latency,
/// the cost of a long wait is a few wake-ups a second.
constexpr auto kLockSleepSlice = std::chrono::milliseconds(200);

/// Blocks for the mutex until `deadline` (steady clock), in bounded slices.
LockResult lock_until(RobustMutex* m, Deadline deadline) {
    for (;;) {
        const Deadline until = sleep_slice_end(deadline, kLockSleepSlice);
        const int rc = lock_until_once(m, until);
        if (rc == ETIMEDOUT && until != deadline) continue;  // a slice ended, not the wait
        return lock_result(rc, "mpservice: mutex lock");
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
    return lock_until(m, deadline);
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

// ---------------------------------------------------------------- process/channel section

namespace {
void socket_pair(int type, handle_t& a, handle_t& b) {
    int sv[2];
    if (::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) != 0) throw_errno("mpservice: socketpair");
    a = sv[0];
    b = sv[1];
}
// Linux passes at most this many descriptors in one message (SCM_MAX_FD).
constexpr std::size_t max_handles_per_message = 253;
}  // namespace

void channel_pair(handle_t& a, handle_t& b) { socket_pair(SOCK_STREAM, a, b); }
void packet_pair(handle_t& a, handle_t& b) { socket_pair(SOCK_SEQPACKET, a, b); }

namespace {
/// Writes all of the bytes in `iov` (advancing it), with `handles` (at most
/// max_handles_per_message) attached to the first byte sent.
bool send_all(handle_t ch, iovec*& cur, int& niov, const handle_t* handles, std::size_t nhandles, std::size_t limit) {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_handles_per_message)];
    bool handles_pending = nhandles > 0;
    for (;;) {
        while (niov > 0 && cur->iov_len == 0) ++cur, --niov;
        if (niov == 0 || limit == 0) return true;
        // Send at most `limit` bytes: the next batch of handles rides on the byte after them.
        iovec part[2];
        int nparts = 0;
        std::size_t room = limit;
        for (int i = 0; i < niov && i < 2 && room > 0; ++i) {
            std::size_t take = std::min(room, cur[i].iov_len);
            part[nparts++] = iovec{cur[i].iov_base, take};
            room -= take;
        }
        msghdr msg{};
        msg.msg_iov = part;
        msg.msg_iovlen = static_cast<std::size_t>(nparts);
        if (handles_pending) {
            std::memset(control, 0, sizeof control);
            msg.msg_control = control;
            msg.msg_controllen = CMSG_SPACE(sizeof(int) * nhandles);
            cmsghdr* c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * nhandles);
            std::memcpy(CMSG_DATA(c), handles, sizeof(int) * nhandles);
        }
        ssize_t n = ::sendmsg(ch, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {  // a non-blocking end: wait until there is room
                pollfd p{ch, POLLOUT, 0};
                ::poll(&p, 1, -1);
                continue;
            }
            if (errno == EPIPE || errno == ECONNRESET) return false;
            throw_errno("mpservice: sendmsg");
        }
        handles_pending = false;
        auto left = static_cast<std::size_t>(n);
        limit -= left;
        while (niov > 0 && left >= cur->iov_len) left -= cur->iov_len, ++cur, --niov;
        if (niov > 0) {
            cur->iov_base = static_cast<char*>(cur->iov_base) + left;
            cur->iov_len -= left;
        }
    }
}
}  // namespace

bool channel_write(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                   const handle_t* handles, std::size_t nhandles) {
    std::size_t batches = (nhandles + max_handles_per_message - 1) / max_handles_per_message;
    if (batches > na + nb)
        throw std::invalid_argument("mpservice: " + std::to_string(nhandles) + " OS handles need at least " +
                                    std::to_string(batches) + " bytes to ride on");
    iovec iov[2] = {{const_cast<void*>(a), na}, {const_cast<void*>(b), nb}};
    int niov = 2;
    iovec* cur = iov;
    // Every batch but the last rides alone on one byte (the receiver gets the
    // batches one per read, in order); the last one carries the rest.
    for (std::size_t i = 0; i + 1 < batches; ++i)
        if (!send_all(ch, cur, niov, handles + i * max_handles_per_message, max_handles_per_message, 1)) return false;
    std::size_t done = batches ? (batches - 1) * max_handles_per_message : 0;
    return send_all(ch, cur, niov, handles + done, nhandles - done, static_cast<std::size_t>(-1));
}

long channel_read(handle_t ch, void* buf, std::size_t cap, std::vector<handle_t>* handles, bool nonblocking) {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_handles_per_message)];
    for (;;) {
        iovec iov{buf, cap};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        ssize_t n = ::recvmsg(ch, &msg, MSG_CMSG_CLOEXEC | (nonblocking ? MSG_DONTWAIT : 0));
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return -1;
            if (errno == ECONNRESET) return 0;
            throw_errno("mpservice: recvmsg");
        }
        bool lost_handles = (msg.msg_flags & MSG_CTRUNC) != 0;
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < count; ++i) {
                int fd;
                std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (handles) handles->push_back(fd);
                else ::close(fd);
            }
        }
        if (lost_handles) {
            // The kernel dropped handles it had no room for (descriptor limit):
            // the message cannot be used; say so rather than decode it wrongly.
            errno = EMFILE;
            throw_errno("mpservice: handles sent with a message were lost (too many open files: raise ulimit -n)");
        }
        return static_cast<long>(n);
    }
}

unsigned wait_readable(const handle_t* hs, int n, int timeout_ms) {
    pollfd p[8];
    if (n > 8) n = 8;
    for (int i = 0; i < n; ++i) p[i] = pollfd{hs[i], POLLIN, 0};
    int rc;
    do rc = ::poll(p, static_cast<nfds_t>(n), timeout_ms);
    while (rc < 0 && errno == EINTR);
    unsigned mask = 0;
    for (int i = 0; i < n; ++i)
        if (p[i].revents) mask |= 1u << i;
    return mask;
}

handle_t poller_create() {
    int fd = ::epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) throw_errno("mpservice: epoll_create1");
    return fd;
}

void poller_add(handle_t poller, handle_t h, std::uint64_t token) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = token;
    if (::epoll_ctl(poller, EPOLL_CTL_ADD, h, &ev) != 0) throw_errno("mpservice: epoll_ctl");
}

void poller_remove(handle_t poller, handle_t h) noexcept { ::epoll_ctl(poller, EPOLL_CTL_DEL, h, nullptr); }

int poller_wait(handle_t poller, std::uint64_t* tokens, int max, int timeout_ms) {
    epoll_event evs[64];
    if (max > 64) max = 64;
    int n;
    do n = ::epoll_wait(poller, evs, max, timeout_ms);
    while (n < 0 && errno == EINTR);
    if (n < 0) throw_errno("mpservice: epoll_wait");
    for (int i = 0; i < n; ++i) tokens[i] = evs[i].data.u64;
    return n;
}

handle_t wake_event_create() {
    int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0) throw_errno("mpservice: eventfd");
    return fd;
}

void wake_event_signal(handle_t ev) noexcept {
    std::uint64_t one = 1;
    ssize_t rc = ::write(ev, &one, sizeof one);
    (void)rc;
}

void wake_event_drain(handle_t ev) noexcept {
    std::uint64_t v;
    ssize_t rc = ::read(ev, &v, sizeof v);
    (void)rc;
}

long spawn_self(const std::string& argv0, const std::string& marker, handle_t inherit,
                const std::vector<std::string>* environment) {
    std::vector<char*> envp;
    if (environment) {
        envp.reserve(environment->size() + 1);
        for (const std::string& e : *environment) envp.push_back(const_cast<char*>(e.c_str()));
        envp.push_back(nullptr);
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    // dup2 onto itself clears close-on-exec for this one descriptor in the
    // child only (glibc >= 2.29), so no other thread's spawn can inherit it.
    posix_spawn_file_actions_adddup2(&fa, inherit, inherit);
    posix_spawnattr_t at;
    posix_spawnattr_init(&at);
    sigset_t none;
    sigemptyset(&none);
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK);
    char* argv[] = {const_cast<char*>(argv0.c_str()), const_cast<char*>(marker.c_str()), nullptr};
    pid_t pid = 0;
    int rc = ::posix_spawn(&pid, "/proc/self/exe", &fa, &at, argv, environment ? envp.data() : environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "mpservice: posix_spawn of /proc/self/exe");
    return static_cast<long>(pid);
}

namespace {
/// Calls, once, with harmless arguments, the C library functions that only a
/// forked child calls.  With lazy binding (the default without -z now) the
/// first call of each resolves its PLT slot; made in the parent, that happens
/// once, instead of in every child, where each resolution touches a dozen
/// pages of symbol tables and writes the GOT: copy-on-write faults of ~3 us
/// each in a VM (bench/PERFORMANCE-process.md).
void bind_child_calls() noexcept {
    struct sigaction old;
    ::sigaction(SIGKILL, nullptr, &old);
    sigset_t empty;
    sigemptyset(&empty);
#if defined(__linux__)
    int sig = 0;
    ::prctl(PR_GET_PDEATHSIG, &sig);
#endif
    (void)::getppid();
    msghdr none{};
    (void)::sendmsg(-1, &none, MSG_NOSIGNAL);
    (void)::dup2(-1, -1);
    (void)::fcntl(-1, F_GETFD);
    (void)::close(-1);
    (void)::syscall(SYS_getppid);
}
}  // namespace

long fork_process() {
    static const bool bound = (bind_child_calls(), true);
    (void)bound;
    // Signals are blocked across the fork, so none can reach the child while it
    // still has the parent's handlers (a parent's crash handler running in a
    // half-made child deadlocks it); the child resets them, then unblocks.
    sigset_t all, old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = ::fork();
    if (pid == 0) {
        reset_signal_handlers();  // also unblocks everything
        return 0;
    }
    int err = errno;
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    errno = err;
    if (pid < 0) throw_errno("mpservice: fork");
    return static_cast<long>(pid);
}

handle_t process_handle(long pid) noexcept {
#if defined(SYS_pidfd_open)
    long fd = ::syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0);
    if (fd >= 0) {
        ::fcntl(static_cast<int>(fd), F_SETFD, FD_CLOEXEC);  // pidfds are close-on-exec already; be sure
        return static_cast<handle_t>(fd);
    }
#endif
    (void)pid;
    return invalid_handle;
}

namespace {
int python_exitcode(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return -WTERMSIG(status);
    return 255;
}
}  // namespace

#ifndef P_PIDFD
#define P_PIDFD 3  // Linux 5.4; older headers lack the constant
#endif

ReapResult reap_child(long pid, handle_t process_handle, bool block, int* exitcode) {
    for (;;) {
        siginfo_t info{};
        int flags = WEXITED | (block ? 0 : WNOHANG);
        int rc = process_handle >= 0 ? ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(process_handle), &info, flags)
                                     : ::waitid(P_PID, static_cast<id_t>(pid), &info, flags);
        if (rc < 0 && errno == EINTR) continue;
        if (rc < 0 && errno == EINVAL && process_handle >= 0) {
            process_handle = -1;  // a kernel without P_PIDFD: by pid
            continue;
        }
        if (rc < 0 && errno == ECHILD) return ReapResult::reaped_elsewhere;
        if (rc < 0) throw_errno("mpservice: waitid");
        if (info.si_pid == 0) return ReapResult::running;  // WNOHANG, still running
        switch (info.si_code) {
            case CLD_EXITED: *exitcode = info.si_status; break;
            case CLD_KILLED:
            case CLD_DUMPED: *exitcode = -info.si_status; break;
            default: *exitcode = 255; break;
        }
        return ReapResult::reaped;
    }
}

bool reap_any_child(long* pid, int* exitcode) {
    int status = 0;
    pid_t r;
    do r = ::waitpid(-1, &status, WNOHANG);
    while (r < 0 && errno == EINTR);
    if (r <= 0) return false;
    *pid = r;
    *exitcode = python_exitcode(status);
    return true;
}

bool send_signal(long pid, handle_t process_handle, int sig) noexcept {
#if defined(SYS_pidfd_send_signal)
    if (process_handle >= 0) return ::syscall(SYS_pidfd_send_signal, process_handle, sig, nullptr, 0) == 0;
#endif
    (void)process_handle;
    return ::kill(static_cast<pid_t>(pid), sig) == 0;
}

int signal_terminate() noexcept { return SIGTERM; }
int signal_kill() noexcept { return SIGKILL; }

std::string signal_name(int sig) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
    if (const char* abbrev = ::sigabbrev_np(sig)) return std::string("SIG") + abbrev;
#endif
    return "signal " + std::to_string(sig);
}

long parent_pid() noexcept { return static_cast<long>(::getppid()); }

bool secure_execution() noexcept {
#if defined(__linux__)
    return ::getauxval(AT_SECURE) != 0;
#else
    return ::issetugid() != 0;
#endif
}

bool channel_peer(handle_t h, long* pid, long* uid) noexcept {
#if defined(SO_PEERCRED)
    int domain = 0, type = 0;
    socklen_t len = sizeof domain;
    if (::getsockopt(h, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || domain != AF_UNIX) return false;
    len = sizeof type;
    if (::getsockopt(h, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) return false;
    ucred cred{};
    len = sizeof cred;
    if (::getsockopt(h, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return false;
    *pid = static_cast<long>(cred.pid);
    *uid = static_cast<long>(cred.uid);
    return true;
#else
    (void)h, (void)pid, (void)uid;
    return false;
#endif
}

handle_t adopt_channel(handle_t marked, long) noexcept { return marked; }

bool is_own_user(long uid) noexcept {
    return uid == static_cast<long>(::getuid()) && uid == static_cast<long>(::geteuid());
}

bool die_with_parent(long expected_parent) noexcept {
#if defined(__linux__)
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
    // The parent may have died before prctl took effect: then we were re-parented.
    return static_cast<long>(::getppid()) == expected_parent;
}

// Not under a sanitizer: their runtimes intercept clone(), and ThreadSanitizer's
// makes the new process wait, spinning, for a handshake that a process
// sharing the address space without being a thread never gives (seen with
// clang 14).  Warm children then exit the ordinary way.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define MPSERVICE_HOLDER_UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer) || __has_feature(memory_sanitizer)
#define MPSERVICE_HOLDER_UNDER_SANITIZER 1
#endif
#endif

#if defined(__linux__) && defined(SYS_pidfd_open) && (defined(__x86_64__) || defined(__aarch64__)) && \
    !defined(MPSERVICE_HOLDER_UNDER_SANITIZER)
namespace {
// The holder shares the address space and - no CLONE_SETTLS - the thread
// pointer of the thread that made it, so it must not touch the C library's
// per-thread state (errno: even syscall() writes it on failure) nor any
// sanitizer's: system calls made directly, on a stack of its own.
alignas(64) unsigned char g_holder_stack[16 * 1024];
int g_holder_watch = -1;  // a pidfd of the process whose address space it holds
long g_holder_owner = 0;  // that process's pid

#if defined(__clang__) || defined(__GNUC__)
#define MPSERVICE_HOLDER_CODE __attribute__((no_sanitize("undefined"), noinline))
#else
#define MPSERVICE_HOLDER_CODE
#endif

MPSERVICE_HOLDER_CODE long direct_syscall(long n, long a, long b, long c, long d) {
#if defined(__x86_64__)
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return ret;
#else
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory");
    return x0;
#endif
}

MPSERVICE_HOLDER_CODE int hold_until_exit(void*) {
    const int watch = g_holder_watch;
    // Its parent is the maker's (CLONE_PARENT): it dies with that one too.
    direct_syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0);
    // Its copy of the maker's descriptors goes (the channel to the parent
    // among them: the parent must see it close when the maker ends).
#if defined(SYS_close_range)
    long a = watch > 0 ? direct_syscall(SYS_close_range, 0, watch - 1, 0, 0) : 0;
    long b = direct_syscall(SYS_close_range, watch + 1, ~0u, 0, 0);
#else
    long a = -1, b = -1;
#endif
    if (a < 0 || b < 0)  // before Linux 5.9: the maker has closed all but a few
        for (int fd = 0; fd < watch + 64; ++fd)
            if (fd != watch) direct_syscall(SYS_close, fd, 0, 0, 0);
    // The teardown it is there for waits for an idle CPU: the parent, which
    // is busy with the child's result just then, comes first (SCHED_IDLE).
    struct sched_param idle{};
    direct_syscall(SYS_sched_setscheduler, 0, SCHED_IDLE, reinterpret_cast<long>(&idle), 0);
    // Every signal is blocked (the maker blocked them around clone): only
    // SIGKILL ends it early, which is harmless (the teardown happens then).
    // It also goes if the maker exec()s (its old address space, the one held,
    // is then no one's): looked at every few seconds (kcmp; where that is
    // not allowed, it stays until the maker ends).
    struct pollfd ready{watch, POLLIN, 0};
    const long self = direct_syscall(SYS_getpid, 0, 0, 0, 0);
    for (;;) {
        struct timespec look_again{2, 0};  // (the system call counts it down)
        long n = direct_syscall(SYS_ppoll, reinterpret_cast<long>(&ready), 1, reinterpret_cast<long>(&look_again), 0);
        if (n == 1) break;
#if defined(SYS_kcmp)
        constexpr long kcmp_vm = 1;  // <linux/kcmp.h> KCMP_VM
        if (n == 0 && direct_syscall(SYS_kcmp, self, g_holder_owner, kcmp_vm, 0) > 0) break;
#endif
    }
    direct_syscall(SYS_exit, 0, 0, 0, 0);
    return 0;
}
}  // namespace

long hold_address_space_past_exit() noexcept {
    long self = ::syscall(SYS_pidfd_open, static_cast<pid_t>(::getpid()), 0);
    if (self < 0) return 0;
    g_holder_watch = static_cast<int>(self);
    g_holder_owner = static_cast<long>(::getpid());
    sigset_t all, old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);
    // CLONE_PARENT: the parent reaps the holder, as it reaps this process (an
    // orphan would be left to init, which a container may not have).  No
    // CLONE_FILES: the holder has its own copy of the pidfd.
    int pid = ::clone(&hold_until_exit, g_holder_stack + sizeof g_holder_stack, CLONE_VM | CLONE_PARENT | SIGCHLD,
                      nullptr);
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    ::close(g_holder_watch);
    return pid > 0 ? pid : 0;
}
#else
long hold_address_space_past_exit() noexcept { return 0; }
#endif

void reset_signal_handlers() noexcept {
    for (int sig = 1; sig < NSIG; ++sig) {
        if (sig == SIGKILL || sig == SIGSTOP) continue;
        struct sigaction old;
        if (::sigaction(sig, nullptr, &old) != 0) continue;
        bool caught = (old.sa_flags & SA_SIGINFO) ? true : (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN);
        if (!caught) continue;
        struct sigaction dfl{};
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        ::sigaction(sig, &dfl, nullptr);
    }
    sigset_t none;
    sigemptyset(&none);
    ::pthread_sigmask(SIG_SETMASK, &none, nullptr);
}

bool current_thread_stack(void** low, std::size_t* size) noexcept {
    pthread_attr_t attr;
    if (::pthread_getattr_np(::pthread_self(), &attr) != 0) return false;
    bool ok = ::pthread_attr_getstack(&attr, low, size) == 0;
    ::pthread_attr_destroy(&attr);
    return ok;
}

void leak_checker_root(const void* p, std::size_t size) noexcept {
    if (__lsan_register_root_region && p && size) __lsan_register_root_region(p, size);
}

void close_handles_except(handle_t keep) noexcept {
#if defined(SYS_close_range)
    bool ok = true;
    if (keep > 3) ok = ::syscall(SYS_close_range, 3u, static_cast<unsigned>(keep - 1), 0u) == 0;
    if (ok && ::syscall(SYS_close_range, static_cast<unsigned>(keep < 3 ? 3 : keep + 1), ~0u, 0u) == 0) return;
#endif
    // Fallback: walk the descriptor table.
    long max = ::sysconf(_SC_OPEN_MAX);
    for (long fd = 3; fd < max && fd < 65536; ++fd)
        if (fd != keep) ::close(static_cast<int>(fd));
}

namespace {
// Called through a pointer the loader filled in at start-up (a GOT slot), not
// through a lazily bound PLT slot: a forked child's first _exit() would
// otherwise resolve the symbol, in every child (see bind_child_calls).
void (*volatile g_exit_now)(int) = &::_exit;
}  // namespace

void exit_now(int code) noexcept {
    g_exit_now(code);
    __builtin_unreachable();
}

namespace {
void (*g_exit_status_hook)(int) noexcept = nullptr;
#if defined(__GLIBC__)
void run_exit_status_hook(int status, void*) {
    if (g_exit_status_hook) g_exit_status_hook(status);
}
#endif
}  // namespace

bool on_exit_status(void (*hook)(int status) noexcept) noexcept {
#if defined(__GLIBC__)
    // on_exit (glibc) is atexit with the status exit() was given: the one way
    // to learn it inside the process.  Registered once; the hook can change.
    static bool registered = ::on_exit(run_exit_status_hook, nullptr) == 0;
    g_exit_status_hook = hook;
    return registered;
#else
    (void)hook;
    return false;
#endif
}

bool is_main_thread() noexcept { return static_cast<long>(::syscall(SYS_gettid)) == static_cast<long>(::getpid()); }

handle_t child_exit_events() {
    // An ignored SIGCHLD (inherited from a program that ignores it) would make
    // the kernel discard the exit statuses this process has to collect.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGCHLD, &dfl, nullptr);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    ::sigprocmask(SIG_BLOCK, &set, nullptr);
    int fd = ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (fd < 0) throw_errno("mpservice: signalfd");
    return fd;
}

void child_exit_events_drain(handle_t h) noexcept {
    signalfd_siginfo info[8];
    while (::read(h, info, sizeof info) > 0) {
    }
}

void child_exit_events_release(handle_t h) noexcept {
    ::close(h);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    ::sigprocmask(SIG_UNBLOCK, &set, nullptr);
}

// glibc's loader locks (taken by dl_iterate_phdr, dladdr and dlopen) are not
// made afresh in a fork child: a child forked while another thread of the
// parent is inside one of these calls waits for that lock forever.  So the
// library makes its own loader calls under one fork lock: fork() waits for a
// call in progress to finish, and none starts until the child has its copy
// (issue 8, defect 12 - a symbolizing thread beside a ForkContext start; seen
// in CI under ThreadSanitizer, whose interceptors widen the window).  The
// lock is recursive because dlopen runs constructors, which may symbolize.
// Highest rank: nothing is taken while it is held.  A user's own thread that
// unwinds an exception at the instant of a fork still holds glibc's lock -
// the README's caveat for the fork context in threaded programs.
std::recursive_mutex& loader_calls_mutex() {
    static auto* m = new std::recursive_mutex;  // never destroyed: used in static destruction too
    return *m;
}
[[maybe_unused]] const bool g_loader_calls_fork_safe = (at_fork_protect(&loader_calls_mutex(), 40), true);

int walk_loaded_modules(int (*visit)(dl_phdr_info*, std::size_t, void*), void* data) {
    std::lock_guard<std::recursive_mutex> lock(loader_calls_mutex());
    return ::dl_iterate_phdr(visit, data);
}

namespace {
struct ModuleSearch {
    // in
    std::uintptr_t addr = 0;          // find the module containing addr, or
    const std::string* name = nullptr;  // the module with this name
    // out
    bool found = false;
    bool first = true;
    std::string module;
    std::uintptr_t base = 0;
    std::string build_id;
};

std::string note_build_id(const dl_phdr_info* info) {
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const auto& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_NOTE) continue;
        auto p = reinterpret_cast<const unsigned char*>(info->dlpi_addr + ph.p_vaddr);
        auto end = p + ph.p_memsz;
        while (p + sizeof(ElfW(Nhdr)) <= end) {
            ElfW(Nhdr) nh;
            std::memcpy(&nh, p, sizeof nh);
            const unsigned char* name = p + sizeof nh;
            const unsigned char* desc = name + ((nh.n_namesz + 3u) & ~3u);
            const unsigned char* next = desc + ((nh.n_descsz + 3u) & ~3u);
            if (next > end) break;
            if (nh.n_type == NT_GNU_BUILD_ID && nh.n_namesz == 4 && std::memcmp(name, "GNU", 4) == 0)
                return std::string(reinterpret_cast<const char*>(desc), nh.n_descsz);
            p = next;
        }
    }
    return {};
}

int module_search_cb(dl_phdr_info* info, std::size_t, void* data) {
    auto* s = static_cast<ModuleSearch*>(data);
    // The first object is the main program; its name is "" (or argv[0] on some loaders).
    std::string name = s->first ? std::string() : std::string(info->dlpi_name ? info->dlpi_name : "");
    s->first = false;
    bool match = false;
    if (s->name) {
        match = name == *s->name;
    } else {
        for (int i = 0; i < info->dlpi_phnum && !match; ++i) {
            const auto& ph = info->dlpi_phdr[i];
            if (ph.p_type != PT_LOAD) continue;
            std::uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
            match = s->addr >= lo && s->addr < lo + ph.p_memsz;
        }
    }
    if (!match) return 0;
    s->found = true;
    s->module = name;
    s->base = info->dlpi_addr;
    s->build_id = note_build_id(info);
    return 1;
}
}  // namespace

bool module_address(const void* addr, ModuleAddress& out) {
    ModuleSearch s;
    s.addr = reinterpret_cast<std::uintptr_t>(addr);
    walk_loaded_modules(module_search_cb, &s);
    if (!s.found) return false;
    out.module = s.module;
    out.offset = s.addr - s.base;
    return true;
}

const void* module_resolve(const ModuleAddress& where) {
    ModuleSearch s;
    s.name = &where.module;
    walk_loaded_modules(module_search_cb, &s);
    if (!s.found && !where.module.empty()) {
        // Not loaded yet in this process: load it (and keep it loaded).
        {
            std::lock_guard<std::recursive_mutex> lock(loader_calls_mutex());
            if (!::dlopen(where.module.c_str(), RTLD_NOW | RTLD_GLOBAL)) return nullptr;
        }
        s = ModuleSearch{};
        s.name = &where.module;
        walk_loaded_modules(module_search_cb, &s);
    }
    if (!s.found) return nullptr;
    return reinterpret_cast<const void*>(s.base + where.offset);
}

std::string module_fingerprint(const std::string& module) {
    ModuleSearch s;
    s.name = &module;
    walk_loaded_modules(module_search_cb, &s);
    if (s.found && !s.build_id.empty()) return "build-id:" + s.build_id;
    // No build-id: the file's identity stands in for it (cheap, unlike hashing).
    struct stat st;
    const char* path = module.empty() ? "/proc/self/exe" : module.c_str();
    if (::stat(path, &st) != 0) return "unknown";
    return "file:" + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + ":" +
           std::to_string(st.st_size) + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
           std::to_string(st.st_mtim.tv_nsec);
}

int affinity_cpu_count() noexcept {
    cpu_set_t set;
    if (::sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    long n = ::sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? static_cast<int>(n) : 1;
}

namespace {
std::string first_line(const std::string& path) {
    std::ifstream f(path);
    std::string line;
    std::getline(f, line);
    return line;
}
}  // namespace

double cgroup_cpu_quota() noexcept {
    try {
        // cgroup v2: "0::/path" in /proc/self/cgroup, limit in <path>/cpu.max as "quota period" or "max period".
        std::ifstream cg("/proc/self/cgroup");
        std::string line, v2path, v1path;
        while (std::getline(cg, line)) {
            if (line.rfind("0::", 0) == 0) v2path = line.substr(3);
            auto c1 = line.find(':'), c2 = line.find(':', c1 + 1);
            if (c1 != std::string::npos && c2 != std::string::npos) {
                std::string ctrls = line.substr(c1 + 1, c2 - c1 - 1);
                if (ctrls.find("cpu") != std::string::npos && ctrls.find("cpuset") != 0) v1path = line.substr(c2 + 1);
            }
        }
        double best = 0;
        auto consider = [&](double q) {
            if (q > 0 && (best == 0 || q < best)) best = q;
        };
        if (!v2path.empty()) {
            // The limit of any ancestor applies too: walk up to the root.
            std::string p = v2path;
            for (;;) {
                std::string l = first_line("/sys/fs/cgroup" + (p == "/" ? std::string() : p) + "/cpu.max");
                long long quota = 0, period = 0;
                if (std::sscanf(l.c_str(), "%lld %lld", &quota, &period) == 2 && period > 0)
                    consider(static_cast<double>(quota) / static_cast<double>(period));
                if (p.empty() || p == "/") break;
                auto slash = p.rfind('/');
                p = slash == 0 ? "/" : p.substr(0, slash);
            }
        }
        if (!v1path.empty() || best == 0) {
            for (const char* dir : {"/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"}) {
                std::string q = first_line(std::string(dir) + "/cpu.cfs_quota_us");
                std::string per = first_line(std::string(dir) + "/cpu.cfs_period_us");
                long long quota = std::atoll(q.c_str()), period = std::atoll(per.c_str());
                if (quota > 0 && period > 0) consider(static_cast<double>(quota) / static_cast<double>(period));
            }
        }
        return best;
    } catch (...) {
        return 0;
    }
}

// ---------------------------------------------------------------- (synchronization section)

LockResult robust_mutex_lock_blocking(RobustMutex* m, Deadline deadline) {
    return lock_until(m, deadline);
}

int robust_mutex_trylock_status(RobustMutex* m) noexcept { return pthread_mutex_trylock(native(m)); }

int robust_mutex_unlock_status(RobustMutex* m) noexcept { return pthread_mutex_unlock(native(m)); }

LockResult robust_mutex_trylock_result(int status) {
    if (status == EDEADLK) return LockResult::busy;  // held by the caller itself
    return lock_result(status, "mpservice: mutex trylock");
}

void robust_mutex_unlock_failed(int status) {
    throw std::system_error(status, std::generic_category(), "mpservice: mutex unlock");
}

long current_tid() noexcept { return static_cast<long>(::syscall(SYS_gettid)); }

void at_fork_child(void (*fn)()) {
    int rc = ::pthread_atfork(nullptr, nullptr, fn);
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "mpservice: pthread_atfork");
}

namespace {
/// A thread's at_thread_exit functions, run newest first when its
/// thread_local objects are destroyed (native TLS: the storage is still there).
struct ThreadExitList {
    std::vector<std::pair<void (*)(void*), void*>> fns;
    ~ThreadExitList() {
        while (!fns.empty()) {
            auto f = fns.back();
            fns.pop_back();
            f.first(f.second);
        }
    }
};
}  // namespace

void at_thread_exit(void (*fn)(void*), void* arg) {
    thread_local ThreadExitList list;
    list.fns.emplace_back(fn, arg);
}

namespace {
// The registered fork locks.  Plain data, constant-initialized: usable from
// any static initializer.  `g_fork_locks_busy` guards the table (and is held
// across a fork, so a registration cannot slip in between).
constexpr int kMaxForkLocks = 32;
ForkLock g_fork_locks[kMaxForkLocks];
bool g_fork_lock_taken[kMaxForkLocks];
int g_fork_lock_count = 0;
std::atomic_flag g_fork_locks_busy = ATOMIC_FLAG_INIT;

void fork_locks_acquire_table() noexcept {
    while (g_fork_locks_busy.test_and_set(std::memory_order_acquire)) ::sched_yield();
}
void fork_locks_release_table() noexcept { g_fork_locks_busy.clear(std::memory_order_release); }

void fork_prepare() noexcept {
    fork_locks_acquire_table();
    // A holder normally lets go within microseconds; one that does not within
    // the bound waits for something the fork blocks (or runs a slow log
    // handler): the child then gets that lock afresh.
    const auto give_up = Clock::now() + std::chrono::milliseconds(200);
    for (int i = 0; i < g_fork_lock_count; ++i) {
        const ForkLock& l = g_fork_locks[i];
        bool taken = l.try_lock(l.lock);
        while (!taken && Clock::now() < give_up) {
            ::sched_yield();
            taken = l.try_lock(l.lock);
        }
        g_fork_lock_taken[i] = taken;
    }
}
void fork_parent() noexcept {
    for (int i = g_fork_lock_count - 1; i >= 0; --i)
        if (g_fork_lock_taken[i]) g_fork_locks[i].unlock(g_fork_locks[i].lock);
    fork_locks_release_table();
}
void fork_child() noexcept {
    // Made afresh rather than unlocked: the child's thread has a new id, and a
    // recursive or error-checking mutex refuses an unlock by another id (the
    // lock would stay held for good).  What they guard is consistent: held
    // (taken in fork_prepare) by the thread that forked.
    // The unlock first keeps a thread checker's view right (and releases a
    // plain mutex); the re-initialization makes any kind free for certain.
    for (int i = g_fork_lock_count - 1; i >= 0; --i) {
        const ForkLock& l = g_fork_locks[i];
        if (g_fork_lock_taken[i]) l.unlock(l.lock);
        l.reinit(l.lock);
    }
    fork_locks_release_table();
}
}  // namespace

// ---- AddressSanitizer's allocator across fork()
// AddressSanitizer before LLVM 18 takes none of its own locks around fork(): a
// child forked while another thread of the parent was inside malloc (refilling
// its cache of one size class) finds that size class's lock copied held, and
// its own first malloc of that size waits for ever (llvm-project issue 63224,
// fixed by the runtime's own fork handlers in LLVM 18).  A parent with a
// reactor thread hits it.  Where clang linked the runtime into the program
// (its default), the runtime's lock functions are reachable, and a fork is
// bracketed with them as LLVM 18's handlers do: the thread registry (a child
// makes threads) and the allocator.  (Not the stack depot's million bucket
// locks, which LLVM 18 takes too: 5 ms a fork, for a lock a child meets only if
// its first new stack lands in the one bucket a parent thread was filling.)
// With a shared runtime the weak references stay null and nothing changes.
// Registered before the fork locks' handlers, so its prepare runs last
// (nothing allocates after it) and its parent and child handlers first.
#if defined(MPSERVICE_DETAIL_ASAN) && defined(__clang__) && defined(__linux__) && __clang_major__ < 18
}  // namespace mpservice::detail::os
namespace __lsan {  // the runtime's own names (hidden: reachable only from a static link)
[[gnu::weak]] void LockThreadRegistry();
[[gnu::weak]] void UnlockThreadRegistry();
[[gnu::weak]] void LockAllocator();
[[gnu::weak]] void UnlockAllocator();
}  // namespace __lsan
namespace mpservice::detail::os {
namespace {
bool sanitizer_fork_locks_reachable() noexcept {
    return &__lsan::LockThreadRegistry && &__lsan::UnlockThreadRegistry && &__lsan::LockAllocator &&
           &__lsan::UnlockAllocator;
}
void sanitizer_before_fork() noexcept {
    __lsan::LockThreadRegistry();
    __lsan::LockAllocator();
}
void sanitizer_after_fork() noexcept {
    __lsan::UnlockAllocator();
    __lsan::UnlockThreadRegistry();
}
void register_sanitizer_fork_handlers() noexcept {
    if (sanitizer_fork_locks_reachable())
        ::pthread_atfork(&sanitizer_before_fork, &sanitizer_after_fork, &sanitizer_after_fork);
}
}  // namespace
bool allocator_fork_safe() noexcept { return sanitizer_fork_locks_reachable(); }
#else
namespace {
void register_sanitizer_fork_handlers() noexcept {}
}  // namespace
#if defined(MPSERVICE_DETAIL_ASAN) && (!defined(__clang__) || __clang_major__ < 18)
// Another runtime without the fix, whose locks are out of reach: g++'s libasan
// (a shared library, the locks hidden in it), clang's before 18 off Linux.
bool allocator_fork_safe() noexcept { return false; }
#else
bool allocator_fork_safe() noexcept { return true; }
#endif
#endif

void at_fork_protect(const ForkLock& lock) noexcept {
    fork_locks_acquire_table();
    if (g_fork_lock_count == 0) {
        register_sanitizer_fork_handlers();
        ::pthread_atfork(&fork_prepare, &fork_parent, &fork_child);
    }
    if (g_fork_lock_count < kMaxForkLocks) {
        // Kept sorted by rank: the outer locks are taken first.
        int i = g_fork_lock_count++;
        while (i > 0 && g_fork_locks[i - 1].rank > lock.rank) {
            g_fork_locks[i] = g_fork_locks[i - 1];
            --i;
        }
        g_fork_locks[i] = lock;
    }
    fork_locks_release_table();
}

bool process_running(long pid) noexcept {
    if (!pid_alive(pid)) return false;
    // /proc/<pid>/stat: "pid (comm) S ..." - comm may hold ')' so look for the last one.
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno != ENOENT && errno != ESRCH;  // no /proc: trust pid_alive
    char buf[512];
    ssize_t n = ::read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n <= 0) return false;  // the process went away between open and read
    buf[n] = '\0';
    const char* close_paren = std::strrchr(buf, ')');
    if (!close_paren || close_paren[1] != ' ') return true;
    char state = close_paren[2];
    return state != 'Z' && state != 'X' && state != 'x';
}

namespace {
std::uint64_t code_ref_module_hash(const char* name) noexcept {
    std::uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (const char* p = name ? name : ""; *p; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 1099511628211ull;
    return h ? h : 1;
}

struct CodeRefSearch {
    std::uintptr_t address = 0;  // code_ref_of: the address to find
    CodeRef ref{};               // code_ref_resolve: the module to find
    bool found = false;
    CodeRef result{};
    const void* resolved = nullptr;
};

int code_ref_find_address(dl_phdr_info* info, std::size_t, void* data) {
    auto* s = static_cast<CodeRefSearch*>(data);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD) continue;
        std::uintptr_t start = info->dlpi_addr + ph.p_vaddr;
        if (s->address >= start && s->address < start + ph.p_memsz) {
            s->found = true;
            s->result.module = code_ref_module_hash(info->dlpi_name);
            s->result.offset = s->address - info->dlpi_addr;
            return 1;
        }
    }
    return 0;
}

int code_ref_find_module(dl_phdr_info* info, std::size_t, void* data) {
    auto* s = static_cast<CodeRefSearch*>(data);
    if (code_ref_module_hash(info->dlpi_name) != s->ref.module) return 0;
    std::uintptr_t address = info->dlpi_addr + s->ref.offset;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        std::uintptr_t start = info->dlpi_addr + ph.p_vaddr;
        if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X) && address >= start && address < start + ph.p_memsz) {
            s->resolved = reinterpret_cast<const void*>(address);
            break;
        }
    }
    return 1;  // the module was found; stop either way
}
}  // namespace

CodeRef code_ref_of(const void* address) {
    CodeRefSearch s;
    s.address = reinterpret_cast<std::uintptr_t>(address);
    walk_loaded_modules(&code_ref_find_address, &s);
    if (!s.found) throw std::invalid_argument("mpservice: the address is not inside any loaded module");
    return s.result;
}

const void* code_ref_resolve(const CodeRef& ref) noexcept {
    if (ref.empty()) return nullptr;
    CodeRefSearch s;
    s.ref = ref;
    walk_loaded_modules(&code_ref_find_module, &s);
    return s.resolved;
}

// ---------------------------------------------------------------- (synchronization fixes: fix-sync)

void sleep_until(Deadline deadline) noexcept {
    if (deadline == no_deadline) deadline = Clock::now() + std::chrono::hours(24 * 365);
    timespec ts = to_timespec(deadline);
    // steady_clock is CLOCK_MONOTONIC on Linux; an absolute deadline survives EINTR.
    while (::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
    }
}

bool robust_mutex_held_in_this_process(const RobustMutex* m) noexcept {
#if defined(__linux__) && defined(__GLIBC__)
    // A robust mutex's futex word holds its owner's thread id (FUTEX_TID_MASK
    // bits): the kernel's robust-list protocol depends on it.
    auto* mutex = reinterpret_cast<const pthread_mutex_t*>(m->storage);
    const int word = __atomic_load_n(&mutex->__data.__lock, __ATOMIC_ACQUIRE);
    const long tid = static_cast<long>(static_cast<unsigned>(word) & FUTEX_TID_MASK);
    if (tid == 0) return false;
    // tgkill with signal 0 only checks that `tid` is a thread of this process.
    return ::syscall(SYS_tgkill, static_cast<long>(::getpid()), tid, 0) == 0;
#else
    (void)m;
    return false;
#endif
}

bool robust_mutex_has_sleepers(const RobustMutex* m) noexcept {
#if defined(__linux__) && defined(__GLIBC__)
    // glibc's robust mutex sets FUTEX_WAITERS in its word before a waiter sleeps
    // and an unlock that finds it set makes a FUTEX_WAKE (the kernel's protocol).
    auto* mutex = reinterpret_cast<const pthread_mutex_t*>(m->storage);
    return (static_cast<unsigned>(__atomic_load_n(&mutex->__data.__lock, __ATOMIC_RELAXED)) & FUTEX_WAITERS) != 0;
#else
    (void)m;
    return false;
#endif
}

void shm_release(handle_t h, std::size_t offset, std::size_t size) noexcept {
    if (size == 0) return;
#if defined(__linux__)
    // A memfd is a tmpfs file: punching a hole frees its pages for every mapping.
    ::fallocate(h, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(size));
#else
    (void)h;
    (void)offset;
#endif
}

std::size_t page_size() noexcept {
    static const std::size_t size = [] {
        long n = ::sysconf(_SC_PAGESIZE);
        return n > 0 ? static_cast<std::size_t>(n) : std::size_t(4096);
    }();
    return size;
}

// ---------------------------------------------------------------- (queue section)

void shm_prefault(void* addr, std::size_t size, bool for_write) noexcept {
#if defined(__linux__)
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older kernels answer EINVAL and we skip it
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
    // Never touch the bytes ourselves: another process may be writing them.
    ::madvise(addr, size, for_write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
#else
    (void)addr;
    (void)size;
    (void)for_write;
#endif
}

// ---------------------------------------------------------------- (connection section)

long channel_write_some(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                        const handle_t* handles, std::size_t nhandles) {
    if (nhandles > max_handles_per_message)
        throw std::invalid_argument("mpservice: more than 253 OS handles in one message");
    if (na + nb == 0) return 0;
    iovec iov[2] = {{const_cast<void*>(a), na}, {const_cast<void*>(b), nb}};
    msghdr msg{};
    msg.msg_iov = na ? iov : iov + 1;
    msg.msg_iovlen = na ? 2 : 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_handles_per_message)];
    if (nhandles > 0) {
        std::memset(control, 0, sizeof control);
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nhandles);
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nhandles);
        std::memcpy(CMSG_DATA(c), handles, sizeof(int) * nhandles);
    }
    for (;;) {
        ssize_t n = ::sendmsg(ch, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0) return static_cast<long>(n);
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        if (errno == EPIPE || errno == ECONNRESET) return -1;
        throw_errno("mpservice: sendmsg");
    }
}

unsigned wait_io(handle_t h, unsigned want, int timeout_ms) {
    pollfd p{h, 0, 0};
    if (want & io_readable) p.events |= POLLIN;
    if (want & io_writable) p.events |= POLLOUT;
    int rc;
    do rc = ::poll(&p, 1, timeout_ms);
    while (rc < 0 && errno == EINTR);
    if (rc <= 0) return 0;
    unsigned got = 0;
    // An error or hang-up makes both a read and a write return at once.
    bool failed = (p.revents & (POLLERR | POLLHUP | POLLNVAL)) != 0;
    if ((want & io_readable) && ((p.revents & POLLIN) || failed)) got |= io_readable;
    if ((want & io_writable) && ((p.revents & POLLOUT) || failed)) got |= io_writable;
    return got;
}

std::size_t wait_readable_any(const handle_t* hs, std::size_t n, int timeout_ms, unsigned char* ready) {
    std::vector<pollfd> p(n);
    for (std::size_t i = 0; i < n; ++i) p[i] = pollfd{hs[i], POLLIN, 0};
    int rc;
    do rc = ::poll(p.data(), static_cast<nfds_t>(n), timeout_ms);
    while (rc < 0 && errno == EINTR);
    std::size_t count = 0;
    for (std::size_t i = 0; i < n; ++i) {
        ready[i] = rc > 0 && p[i].revents != 0;
        count += ready[i];
    }
    return count;
}

// ---------------------------------------------------------------- (output forwarding section)

void output_pipe(handle_t& read_end, handle_t& write_end) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw_errno("mpservice: pipe2");
    ::fcntl(fds[0], F_SETFL, ::fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    read_end = fds[0];
    write_end = fds[1];
}

long pipe_read(handle_t h, void* buf, std::size_t cap) noexcept {
    for (;;) {
        ssize_t n = ::read(h, buf, cap);
        if (n >= 0) return static_cast<long>(n);
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return -1;
        return 0;  // a broken pipe reads as its end
    }
}

void redirect_standard_output(handle_t out, handle_t err) {
    std::fflush(stdout);
    std::fflush(stderr);
    // dup2 clears close-on-exec on the new descriptors: programs this process
    // execs write into the same pipes.
    if (::dup2(out, STDOUT_FILENO) < 0 || ::dup2(err, STDERR_FILENO) < 0) throw_errno("mpservice: dup2");
    // A pipe would make stdout fully buffered: lines would reach the parent
    // late, and be lost if the process is killed.  The buffer is given
    // explicitly: glibc ignores a mode change without one on a stream that was
    // used already (a forked child's stdout).
    static char line_buffer[BUFSIZ];
    std::setvbuf(stdout, line_buffer, _IOLBF, sizeof line_buffer);
}

// ---------------------------------------------------------------- (server process section)

namespace {
sockaddr_un abstract_address(const std::string& name, socklen_t& len) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    if (name.size() + 1 > sizeof a.sun_path) throw std::invalid_argument("mpservice: server address too long");
    a.sun_path[0] = '\0';  // the abstract namespace: no file, gone with the last socket
    std::memcpy(a.sun_path + 1, name.data(), name.size());
    len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    return a;
}
long count_dir_entries(const char* path) noexcept {
    DIR* d = ::opendir(path);
    if (!d) return -1;
    long n = 0;
    while (dirent* e = ::readdir(d))
        if (e->d_name[0] != '.') ++n;
    ::closedir(d);
    return n - 1;  // the descriptor opendir itself holds
}
}  // namespace

handle_t listener_create(std::string& address) {
    unsigned char token[12];
    random_bytes(token, sizeof token);
    char name[64];
    int k = std::snprintf(name, sizeof name, "mpservice-%ld-", static_cast<long>(::getpid()));
    for (unsigned char b : token) k += std::snprintf(name + k, sizeof name - static_cast<std::size_t>(k), "%02x", b);
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw_errno("mpservice: socket");
    socklen_t len;
    sockaddr_un a = abstract_address(name, len);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), len) != 0 || ::listen(fd, 128) != 0) {
        int e = errno;
        ::close(fd);
        throw std::system_error(e, std::generic_category(), "mpservice: bind/listen of the server socket");
    }
    address = name;
    return fd;
}

handle_t listener_accept(handle_t listener) {
    for (;;) {
        int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) return fd;
        if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            ::poll(nullptr, 0, 10);  // out of descriptors: let others close some, keep serving
            continue;
        }
        return invalid_handle;  // EINVAL after shutdown(), EBADF
    }
}

void listener_shutdown(handle_t listener) noexcept { ::shutdown(listener, SHUT_RDWR); }

handle_t unix_connect(const std::string& address) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw_errno("mpservice: socket");
    socklen_t len;
    sockaddr_un a = abstract_address(address, len);
    int rc;
    do rc = ::connect(fd, reinterpret_cast<sockaddr*>(&a), len);
    while (rc != 0 && errno == EINTR);
    if (rc != 0) {
        int e = errno;
        ::close(fd);
        throw std::system_error(e, std::generic_category(), "mpservice: connect to the server process");
    }
    return fd;
}

long peer_user(handle_t socket) noexcept {
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(socket, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
    return static_cast<long>(cred.uid);
}

long current_user() noexcept { return static_cast<long>(::getuid()); }

void socket_shutdown(handle_t socket) noexcept {
    if (socket >= 0) ::shutdown(socket, SHUT_RDWR);
}

void random_bytes(void* out, std::size_t n) {
    auto* p = static_cast<unsigned char*>(out);
    while (n > 0) {
        long k = ::syscall(SYS_getrandom, p, n, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            throw_errno("mpservice: getrandom");
        }
        p += k;
        n -= static_cast<std::size_t>(k);
    }
}

long open_handle_count() noexcept { return count_dir_entries("/proc/self/fd"); }

long mapping_count() noexcept {
    int fd = ::open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    long lines = 0;
    char buf[4096];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; ++i) lines += buf[i] == '\n';
    ::close(fd);
    return lines;
}

// ---------------------------------------------------------------- working directory and environment

std::string current_directory() {
    std::vector<char> buf(256);
    for (;;) {
        if (::getcwd(buf.data(), buf.size())) return std::string(buf.data());
        if (errno != ERANGE || buf.size() > (1u << 20)) return std::string();
        buf.resize(buf.size() * 2);
    }
}

bool change_directory(const std::string& path) noexcept { return !path.empty() && ::chdir(path.c_str()) == 0; }

std::vector<std::string> environment_entries() {
    std::vector<std::string> out;
    for (char** e = environ; e && *e; ++e) out.emplace_back(*e);
    return out;
}

void replace_environment(const std::vector<std::string>& entries) {
    ::clearenv();
    for (const std::string& entry : entries) {
        auto eq = entry.find('=');
        if (eq == std::string::npos || eq == 0) continue;
        ::setenv(entry.substr(0, eq).c_str(), entry.c_str() + eq + 1, 1);
    }
}

}  // namespace mpservice::detail::os

#endif  // !_WIN32
// ---- end part: mpservice/impl/os_posix.cpp
// ---- begin part: mpservice/impl/os_win32.cpp --------------------------------
// os_win32: the Win32 back-end of detail/os.hpp (Windows 10 and later; built
// and tested with MinGW-w64, posix thread model, under Wine).  This file is
// the only place that includes <windows.h> or makes Win32 calls.
//
// How the POSIX ideas of the seam map to Win32:
//   * Channels are connected loopback TCP socket pairs (Winsock): the only
//     Win32 byte stream that a poll (WSAPoll) can watch for readability, the
//     way the reactor watches Unix sockets.  Handles that ride on a channel
//     (SCM_RIGHTS on POSIX) travel in-band: every write is a frame - a header
//     naming the sender's pid and its handle values, then the bytes - and the
//     reader pulls each handle out of the sender with DuplicateHandle
//     (DUPLICATE_CLOSE_SOURCE), as Python's multiprocessing does on Windows.
//   * Shared memory is a pagefile-backed, unnamed section with one extra page
//     at its end holding its random identity and futex waiter counts; waiting
//     on a word of it uses a named semaphore derived from that identity
//     (kernel object names disappear with their last handle: nothing can be
//     left behind).  Words outside shared memory use WaitOnAddress.
//   * A robust mutex is a named Win32 mutex (WAIT_ABANDONED tells that its
//     owner died) plus an owner record in the shared storage, which also
//     catches the case where the dead owner's handle was the last one.
//   * A process handle that "becomes readable when the process exits" is a
//     socket whose peer a thread-pool wait (RegisterWaitForSingleObject: one
//     pool for every child) closes when the process ends.
//   * Children are started suspended by CreateProcessW of this executable,
//     inherit only the handles listed in PROC_THREAD_ATTRIBUTE_HANDLE_LIST,
//     and are put into a kill-on-close job object before they run: they die
//     with their parent, even when it is ended by TerminateProcess.
#if defined(_WIN32)

#ifndef NOMINMAX
#define NOMINMAX
#endif
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <winsock2.h>
#include <ws2tcpip.h>
#include <windows.h>
#include <bcrypt.h>
#include <psapi.h>
#include <winternl.h>

#include <fcntl.h>
#include <io.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <system_error>
#include <unordered_map>
#include <vector>

#if defined(__GNUC__)
#include <cxxabi.h>
#endif

#if defined(_MSC_VER)
#pragma comment(lib, "ws2_32.lib")
#pragma comment(lib, "synchronization.lib")
#pragma comment(lib, "bcrypt.lib")
#pragma comment(lib, "ntdll.lib")
#endif

namespace mpservice::detail::os {

namespace {
[[noreturn]] void throw_win32(const char* what, DWORD err = GetLastError()) {
    throw std::system_error(static_cast<int>(err), std::system_category(), what);
}
[[noreturn]] void throw_wsa(const char* what) { throw_win32(what, static_cast<DWORD>(WSAGetLastError())); }

HANDLE as_handle(handle_t h) noexcept { return reinterpret_cast<HANDLE>(h); }
handle_t from_handle(HANDLE h) noexcept { return reinterpret_cast<handle_t>(h); }
SOCKET as_socket(handle_t h) noexcept { return static_cast<SOCKET>(h); }

/// Milliseconds until `d` for a Win32 wait (INFINITE for no_deadline).
DWORD wait_ms(Deadline d) noexcept {
    if (d == no_deadline) return INFINITE;
    auto now = Clock::now();
    if (d <= now) return 0;
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(d - now).count() + 1;  // round up
    return ms >= static_cast<long long>(INFINITE) ? INFINITE - 1 : static_cast<DWORD>(ms);
}

std::string narrow(const wchar_t* w, int n = -1) {
    if (!w) return {};
    int len = WideCharToMultiByte(CP_UTF8, 0, w, n, nullptr, 0, nullptr, nullptr);
    if (len <= 0) return {};
    std::string s(static_cast<std::size_t>(len), '\0');
    WideCharToMultiByte(CP_UTF8, 0, w, n, &s[0], len, nullptr, nullptr);
    if (n < 0 && !s.empty() && s.back() == '\0') s.pop_back();
    return s;
}

std::wstring widen(const std::string& s) {
    if (s.empty()) return {};
    int len = MultiByteToWideChar(CP_UTF8, 0, s.data(), static_cast<int>(s.size()), nullptr, 0);
    std::wstring w(static_cast<std::size_t>(len), L'\0');
    MultiByteToWideChar(CP_UTF8, 0, s.data(), static_cast<int>(s.size()), &w[0], len);
    return w;
}

/// Winsock must be started in each process before any socket call, even one
/// on an inherited socket.
bool winsock_start() noexcept {
    static const bool started = [] {
        WSADATA data;
        return WSAStartup(MAKEWORD(2, 2), &data) == 0;
    }();
    return started;
}

bool is_socket(handle_t h) noexcept {
    if (h < 0 || !winsock_start()) return false;
    int type = 0;
    int len = sizeof type;
    return getsockopt(as_socket(h), SOL_SOCKET, SO_TYPE, reinterpret_cast<char*>(&type), &len) == 0;
}

// ---- handle-side state: what Win32 does not keep for us

/// A poller: the registered handles and a socket pair whose read end wakes a
/// poller_wait so that it sees registrations made while it waits.
struct Poller {
    std::mutex mu;
    std::vector<std::pair<handle_t, std::uint64_t>> items;
    handle_t wake_read = invalid_handle, wake_write = invalid_handle;
};

/// The reading and writing state of one channel end (frames; see the top).
struct ChannelState {
    std::uint64_t payload_left = 0;  // bytes of the current frame not yet read
    std::string pending;             // bytes of a frame the socket did not take yet
    handle_t partner = invalid_handle;  // the other end, while both are in this process
    DWORD peer_pid = 0;              // the process at the other end, when known (spawn)
    bool peer_is_child = false;      // peer_pid is a child we spawned with this channel (its only reader)
};

/// What a thread-pool wait needs to announce a child's end.
struct ExitNotice {
    HANDLE wait = nullptr;
    handle_t write_end = invalid_handle;
    std::atomic<bool> closed{false};  // write_end closed (by the callback, or by reap_child after unregistering)
    void close_write_end() noexcept {
        if (!closed.exchange(true)) closesocket(as_socket(write_end));
    }
};

/// What the parent holds for a child it started, until the child is reaped:
/// its process handle (from CreateProcess), the section that carried its
/// channel (the keeper), and the thread-pool waits that announce its end
/// (process_handle).  The process handle is used only under the registry's
/// lock or through a duplicate (child_process), so it is never used after
/// reap_child closed it; the waits are unregistered before it is closed.
struct Child {
    HANDLE process = nullptr;
    HANDLE keeper = nullptr;
    std::vector<ExitNotice*> notices;
};

struct Registry {
    std::mutex mu;
    std::map<handle_t, std::shared_ptr<Poller>> pollers;
    std::map<handle_t, handle_t> paired_write_ends;  // wake events, exit notifiers: read end -> write end
    std::map<handle_t, ChannelState> channels;
    std::map<handle_t, handle_t> listener_wakes;      // listener -> its shutdown wake event
    std::map<long, struct Child> children;            // pid -> what we hold for it until it is reaped
};
Registry& reg() {
    static Registry* r = new Registry;  // never destroyed: used by threads until the very end
    return *r;
}

void close_raw(handle_t h) noexcept {
    if (h < 0) return;
    if (is_socket(h)) closesocket(as_socket(h));
    else CloseHandle(as_handle(h));
}

void set_nonblocking(SOCKET s) noexcept {
    u_long on = 1;
    ioctlsocket(s, FIONBIO, &on);
}

SOCKET new_tcp_socket() {
    if (!winsock_start()) throw_wsa("mpservice: WSAStartup");
    SOCKET s = WSASocketW(AF_INET, SOCK_STREAM, IPPROTO_TCP, nullptr, 0, WSA_FLAG_NO_HANDLE_INHERIT);
    if (s == INVALID_SOCKET) throw_wsa("mpservice: WSASocket");
    return s;
}

/// A connected pair of loopback TCP sockets, checked to be each other's peer
/// (another process cannot slip its own connection in between).
void tcp_pair(handle_t& a, handle_t& b) {
    SOCKET lst = new_tcp_socket();
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int len = sizeof addr;
    SOCKET c = INVALID_SOCKET, s = INVALID_SOCKET;
    auto fail = [&](const char* what) {
        int err = WSAGetLastError();
        if (c != INVALID_SOCKET) closesocket(c);
        if (s != INVALID_SOCKET) closesocket(s);
        closesocket(lst);
        throw_win32(what, static_cast<DWORD>(err));
    };
    if (bind(lst, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) fail("mpservice: bind");
    if (getsockname(lst, reinterpret_cast<sockaddr*>(&addr), &len) != 0) fail("mpservice: getsockname");
    if (listen(lst, 4) != 0) fail("mpservice: listen");
    c = new_tcp_socket();
    if (connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) fail("mpservice: connect");
    sockaddr_in mine{};
    int mlen = sizeof mine;
    getsockname(c, reinterpret_cast<sockaddr*>(&mine), &mlen);
    for (int tries = 0; tries < 8; ++tries) {
        sockaddr_in peer{};
        int plen = sizeof peer;
        s = accept(lst, reinterpret_cast<sockaddr*>(&peer), &plen);
        if (s == INVALID_SOCKET) fail("mpservice: accept");
        if (peer.sin_port == mine.sin_port && peer.sin_addr.s_addr == mine.sin_addr.s_addr) break;
        closesocket(s);  // someone else's connection
        s = INVALID_SOCKET;
    }
    if (s == INVALID_SOCKET) fail("mpservice: socket pair");
    closesocket(lst);
    SetHandleInformation(reinterpret_cast<HANDLE>(c), HANDLE_FLAG_INHERIT, 0);
    SetHandleInformation(reinterpret_cast<HANDLE>(s), HANDLE_FLAG_INHERIT, 0);
    BOOL one = TRUE;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one), sizeof one);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one), sizeof one);
    set_nonblocking(c);
    set_nonblocking(s);
    a = static_cast<handle_t>(c);
    b = static_cast<handle_t>(s);
}

/// WSAPoll over sockets; returns the revents per entry (retrying on EINTR-like errors).
int poll_sockets(std::vector<WSAPOLLFD>& p, int timeout_ms) {
    if (p.empty()) {
        if (timeout_ms < 0) timeout_ms = INT_MAX;
        Sleep(static_cast<DWORD>(timeout_ms));  // nothing to watch: only the timeout can end it
        return 0;
    }
    int rc = WSAPoll(p.data(), static_cast<ULONG>(p.size()), timeout_ms);
    return rc < 0 ? 0 : rc;
}

bool readable_revents(short revents) noexcept { return (revents & (POLLRDNORM | POLLHUP | POLLERR | POLLNVAL)) != 0; }

unsigned long g_main_thread = GetCurrentThreadId();  // static initialization runs on the initial thread
}  // namespace

// ---------------------------------------------------------------- handles

void close_handle(handle_t h) noexcept {
    if (h < 0) return;
    handle_t partner = invalid_handle, listener_wake = invalid_handle;
    std::shared_ptr<Poller> poller;
    std::string unsent;
    {
        auto& r = reg();
        std::lock_guard<std::mutex> g(r.mu);
        if (auto it = r.pollers.find(h); it != r.pollers.end()) poller = it->second, r.pollers.erase(it);
        if (auto it = r.paired_write_ends.find(h); it != r.paired_write_ends.end())
            partner = it->second, r.paired_write_ends.erase(it);
        if (auto it = r.channels.find(h); it != r.channels.end()) unsent.swap(it->second.pending), r.channels.erase(it);
        if (auto it = r.listener_wakes.find(h); it != r.listener_wakes.end())
            listener_wake = it->second, r.listener_wakes.erase(it);
    }
    if (!unsent.empty()) {
        // A frame the socket had no room for when it was written: deliver it
        // before the end of stream, as a Unix socket would (bounded wait).
        const char* p = unsent.data();
        std::size_t left = unsent.size();
        auto until = deadline_after(std::chrono::seconds(5));
        while (left > 0 && Clock::now() < until) {
            int n = send(as_socket(h), p, static_cast<int>(std::min<std::size_t>(left, 1 << 20)), 0);
            if (n > 0) p += n, left -= static_cast<std::size_t>(n);
            else if (WSAGetLastError() == WSAEWOULDBLOCK) {
                WSAPOLLFD q{as_socket(h), POLLWRNORM, 0};
                WSAPoll(&q, 1, 100);
            } else break;
        }
    }
    if (poller) {
        close_raw(poller->wake_read);
        close_raw(poller->wake_write);
    }
    close_raw(partner);
    close_handle(listener_wake);
    close_raw(h);
}

handle_t socket_from_info(WSAPROTOCOL_INFOW& info);

handle_t duplicate_handle(handle_t h) {
    if (is_socket(h)) {
        // Winsock's own copy (a DuplicateHandle copy is no socket to Wine's ws2_32).
        WSAPROTOCOL_INFOW info{};
        if (WSADuplicateSocketW(as_socket(h), GetCurrentProcessId(), &info) != 0)
            throw_wsa("mpservice: WSADuplicateSocket");
        handle_t copy = socket_from_info(info);
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[copy];
        return copy;
    }
    HANDLE out = nullptr;
    if (!DuplicateHandle(GetCurrentProcess(), as_handle(h), GetCurrentProcess(), &out, 0, FALSE, DUPLICATE_SAME_ACCESS))
        throw_win32("mpservice: DuplicateHandle");
    if (is_socket(from_handle(out))) {
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[from_handle(out)];  // a socket copy reads frames too
    }
    return from_handle(out);
}

bool handle_valid(handle_t h) noexcept {
    DWORD flags = 0;
    return h >= 0 && GetHandleInformation(as_handle(h), &flags) != 0;
}

// ---------------------------------------------------------------- shared memory

namespace {
// The last page of every section: who it is, and how many threads wait on
// its words (so futex_wake can skip the kernel when nobody waits).
constexpr std::uint32_t kShmMagic = 0x6d707368;  // "mpsh"
constexpr std::size_t kTailPage = 4096;
constexpr std::size_t kWaiterSlots = 960;
struct ShmTail {
    std::uint32_t magic;
    std::uint32_t reserved;
    std::uint64_t size;      // what the caller asked for
    std::uint64_t id[2];     // random: names the section's wait objects
    std::atomic<std::uint32_t> waiters[kWaiterSlots];  // by word offset (hash), any process
};
static_assert(sizeof(ShmTail) <= kTailPage, "the shared memory tail does not fit its page");

std::size_t round_page(std::size_t n) { return (n + kTailPage - 1) / kTailPage * kTailPage; }

struct View {
    std::uintptr_t base;
    std::size_t length;  // the whole view, tail page included
    ShmTail* tail;
};
/// A named kernel object that lives in a section (a word's wait semaphore, a
/// robust mutex), opened on first use and kept while a view of ours holds it:
/// the views (by base) it was used through.  The last of them unmapped closes
/// it (shm_unmap), so a program that makes and drops many Queues or Locks does
/// not keep their objects.  One used from memory that is not a view of ours
/// (base 0) is kept until the process ends.
struct CachedObject {
    HANDLE handle = nullptr;
    std::set<std::uintptr_t> bases;
};
struct Views {
    std::mutex mu;
    std::map<std::uintptr_t, View> by_base;
    std::map<std::string, CachedObject> objects;  // wait semaphores and mutexes, by name
};
Views& views() {
    static Views* v = new Views;
    return *v;
}

/// The view holding `a` (the lock held), or null.
const View* view_at(Views& v, std::uintptr_t a) {
    auto it = v.by_base.upper_bound(a);
    if (it == v.by_base.begin()) return nullptr;
    --it;
    if (a >= it->second.base + it->second.length) return nullptr;
    return &it->second;
}

/// The view holding `addr`, if it is one of ours.
bool find_view(const void* addr, View& out) {
    auto& v = views();
    std::lock_guard<std::mutex> g(v.mu);
    const View* found = view_at(v, reinterpret_cast<std::uintptr_t>(addr));
    if (!found) return false;
    out = *found;
    return true;
}

/// The object named `name`, used from `addr` (see CachedObject); `create` opens it.
template <class Create>
HANDLE cached_object(const std::string& name, const void* addr, Create create) {
    auto& v = views();
    std::lock_guard<std::mutex> g(v.mu);
    const View* view = view_at(v, reinterpret_cast<std::uintptr_t>(addr));
    CachedObject& o = v.objects[name];
    if (!o.handle) {
        o.handle = create(name.c_str());
        if (!o.handle) {
            const DWORD err = GetLastError();
            v.objects.erase(name);
            SetLastError(err);
            return nullptr;
        }
    }
    o.bases.insert(view ? view->base : 0);
    return o.handle;
}

/// Maps the whole section and tells its length (the view's region size).
void* map_whole(HANDLE h, std::size_t& length) {
    void* p = MapViewOfFile(h, FILE_MAP_READ | FILE_MAP_WRITE, 0, 0, 0);
    if (!p) throw_win32("mpservice: MapViewOfFile");
    MEMORY_BASIC_INFORMATION mbi{};
    VirtualQuery(p, &mbi, sizeof mbi);
    length = mbi.RegionSize;
    return p;
}
}  // namespace

handle_t shm_create(std::size_t size) {
    const std::uint64_t total = static_cast<std::uint64_t>(round_page(size)) + kTailPage;
    // No name and no security attributes: only handles (ours, and the copies
    // made for children) reach it; pagefile-backed, zero-filled.
    HANDLE h = CreateFileMappingW(INVALID_HANDLE_VALUE, nullptr, PAGE_READWRITE, static_cast<DWORD>(total >> 32),
                                  static_cast<DWORD>(total), nullptr);
    if (!h) throw_win32("mpservice: CreateFileMapping");
    std::size_t length = 0;
    void* p = nullptr;
    try {
        p = map_whole(h, length);
    } catch (...) {
        CloseHandle(h);
        throw;
    }
    auto* tail = reinterpret_cast<ShmTail*>(static_cast<char*>(p) + length - kTailPage);
    tail->size = size;
    random_bytes(tail->id, sizeof tail->id);
    tail->magic = kShmMagic;
    UnmapViewOfFile(p);
    return from_handle(h);
}

std::size_t shm_size(handle_t h) {
    std::size_t length = 0;
    void* p = map_whole(as_handle(h), length);
    auto* tail = reinterpret_cast<const ShmTail*>(static_cast<char*>(p) + length - kTailPage);
    std::size_t size = tail->magic == kShmMagic ? static_cast<std::size_t>(tail->size) : length;
    UnmapViewOfFile(p);
    return size;
}

void* shm_map(handle_t h, std::size_t size) {
    std::size_t length = 0;
    void* p = map_whole(as_handle(h), length);
    auto* tail = reinterpret_cast<ShmTail*>(static_cast<char*>(p) + length - kTailPage);
    if (tail->magic != kShmMagic || size > tail->size) {
        UnmapViewOfFile(p);
        throw std::system_error(EINVAL, std::generic_category(), "mpservice: not mpservice shared memory of that size");
    }
    auto& v = views();
    std::lock_guard<std::mutex> g(v.mu);
    v.by_base[reinterpret_cast<std::uintptr_t>(p)] = View{reinterpret_cast<std::uintptr_t>(p), length, tail};
    return p;
}

void shm_unmap(void* addr, std::size_t) noexcept {
    if (!addr) return;
    std::vector<HANDLE> unused;  // the objects no other view of ours holds
    {
        auto& v = views();
        const auto base = reinterpret_cast<std::uintptr_t>(addr);
        std::lock_guard<std::mutex> g(v.mu);
        v.by_base.erase(base);
        for (auto it = v.objects.begin(); it != v.objects.end();) {
            if (it->second.bases.erase(base) && it->second.bases.empty()) {
                unused.push_back(it->second.handle);
                it = v.objects.erase(it);
            } else {
                ++it;
            }
        }
    }
    for (HANDLE h : unused) CloseHandle(h);
    UnmapViewOfFile(addr);
}

void shm_release(handle_t, std::size_t, std::size_t) noexcept {
    // Best effort, and Win32 has no way to drop the pages of a pagefile section
    // while it stays mapped elsewhere: the memory stays committed.
}

std::size_t page_size() noexcept {
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return si.dwPageSize ? si.dwPageSize : 4096;
}

void shm_prefault(void* addr, std::size_t size, bool) noexcept {
    WIN32_MEMORY_RANGE_ENTRY range{addr, size};
    PrefetchVirtualMemory(GetCurrentProcess(), 1, &range, 0);
}

// ---------------------------------------------------------------- waiting on a word

namespace {
/// The semaphore that waiters on word `offset` of the section `tail` sleep on
/// (named after the section's random identity: any process mapping it finds it).
HANDLE word_semaphore(const ShmTail* tail, std::size_t offset) {
    char name[96];
    std::snprintf(name, sizeof name, "Local\\mpservice-w-%016llx%016llx-%llx", (unsigned long long)tail->id[0],
                  (unsigned long long)tail->id[1], (unsigned long long)offset);
    HANDLE s = cached_object(name, tail, [](const char* n) { return CreateSemaphoreA(nullptr, 0, LONG_MAX, n); });
    if (!s) throw_win32("mpservice: CreateSemaphore");
    return s;
}

std::atomic<std::uint32_t>& waiter_slot(ShmTail* tail, std::size_t offset) {
    return tail->waiters[(offset / 4) % kWaiterSlots];
}
}  // namespace

bool futex_wait(const std::atomic<std::uint32_t>* word, std::uint32_t expected, Deadline deadline) {
    View view{};
    if (!find_view(word, view)) {
        // Memory of this process only: the system's address wait.
        DWORD ms = wait_ms(deadline);
        std::uint32_t cmp = expected;
        if (WaitOnAddress(const_cast<std::atomic<std::uint32_t>*>(word), &cmp, sizeof cmp, ms)) return true;
        return GetLastError() != ERROR_TIMEOUT;
    }
    const std::size_t offset = reinterpret_cast<std::uintptr_t>(word) - view.base;
    HANDLE sem = word_semaphore(view.tail, offset);
    auto& waiters = waiter_slot(view.tail, offset);
    // Announce the wait before the last look at the word: a waker that changes
    // the word afterwards sees us counted and releases the semaphore, whose
    // count keeps the wake-up even if we are not asleep yet.
    waiters.fetch_add(1, std::memory_order_seq_cst);
    if (word->load(std::memory_order_seq_cst) != expected) {
        waiters.fetch_sub(1, std::memory_order_seq_cst);
        return true;
    }
    DWORD rc = WaitForSingleObject(sem, wait_ms(deadline));
    waiters.fetch_sub(1, std::memory_order_seq_cst);
    return rc != WAIT_TIMEOUT;
}

void futex_wake(const std::atomic<std::uint32_t>* word, int count) {
    View view{};
    if (!find_view(word, view)) {
        if (count == 1) WakeByAddressSingle(const_cast<std::atomic<std::uint32_t>*>(word));
        else WakeByAddressAll(const_cast<std::atomic<std::uint32_t>*>(word));
        return;
    }
    const std::size_t offset = reinterpret_cast<std::uintptr_t>(word) - view.base;
    std::uint32_t n = waiter_slot(view.tail, offset).load(std::memory_order_seq_cst);
    if (n == 0) return;
    // The count is shared by the words of one slot: releasing more than the
    // word's own waiters costs spurious wake-ups (allowed), never a lost one.
    LONG release = static_cast<LONG>(count > 0 && static_cast<std::uint32_t>(count) < n ? count : n);
    ReleaseSemaphore(word_semaphore(view.tail, offset), release, nullptr);
}

// ---------------------------------------------------------------- robust mutex
//
// A word in the shared memory, taken and given back by compare-exchange: an
// uncontended acquire+release is two atomic instructions, no system call (a
// Win32 mutex object costs a kernel call for each, a wineserver round trip
// under Wine).  The kernel is met only by a thread that must wait: it sleeps
// on the word's semaphore *and* on the owner thread's handle, so it wakes when
// the lock is given back or when its owner ends - a dead owner is found at
// once, with no polling.  The word holds the owner's process and thread ids
// together: a waiter that finds that thread gone (or its id reused by a thread
// of another process) takes the word over by one compare-exchange from exactly
// the value it judged dead, and is told owner_died - the story of a robust
// pthread mutex, and of WAIT_ABANDONED.

namespace {
struct WinMutex {
    std::atomic<std::uint64_t> owner;     // 0 free, else owner process id << 32 | owner thread id
    std::atomic<std::uint32_t> sleepers;  // threads in (or entering) the kernel wait for it
};
static_assert(sizeof(WinMutex) <= sizeof(RobustMutex::storage), "RobustMutex storage too small");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free, "the lock word must be a plain atomic in shared memory");
WinMutex* win(RobustMutex* m) noexcept { return reinterpret_cast<WinMutex*>(m->storage); }
const WinMutex* win(const RobustMutex* m) noexcept { return reinterpret_cast<const WinMutex*>(m->storage); }

constexpr int kStatusBusy = 1, kStatusOwnerDied = 2, kStatusNotOwner = 3, kStatusTimedOut = 4, kStatusDeadlock = 5;
// A sleeper that has no owner handle to wait on (memory of this process only,
// or an owner it may not open) looks at the owner again this often.
constexpr DWORD kOwnerRecheckMs = 100;

std::uint64_t caller_token() noexcept {
    return (static_cast<std::uint64_t>(GetCurrentProcessId()) << 32) | GetCurrentThreadId();
}

/// Whether the owner `token` has ended.  If it runs, *thread is a handle to
/// wait on for its end (null if it may not be opened: then it counts as running).
bool owner_ended(std::uint64_t token, HANDLE* thread) noexcept {
    *thread = nullptr;
    const DWORD tid = static_cast<DWORD>(token), pid = static_cast<DWORD>(token >> 32);
    HANDLE t = OpenThread(SYNCHRONIZE | THREAD_QUERY_LIMITED_INFORMATION, FALSE, tid);
    if (!t) return GetLastError() != ERROR_ACCESS_DENIED;  // no such thread any more
    if (WaitForSingleObject(t, 0) == WAIT_OBJECT_0 || GetProcessIdOfThread(t) != pid) {
        CloseHandle(t);  // ended (a handle kept it), or its id now names another process's thread
        return true;
    }
    *thread = t;
    return false;
}

/// Counts the caller among the sleepers for its scope.
struct Sleeping {
    explicit Sleeping(WinMutex* w) : w_(w) { w_->sleepers.fetch_add(1, std::memory_order_seq_cst); }
    ~Sleeping() { w_->sleepers.fetch_sub(1, std::memory_order_seq_cst); }
    WinMutex* w_;
};

/// Sleeps (at most `ms`) while `token` holds the lock and its thread runs.
void sleep_while_held(WinMutex* w, std::uint64_t token, HANDLE owner_thread, DWORD ms) {
    View view{};
    const bool shared = find_view(w, view);
    // Counted before the last look at the word: a release after it sees us
    // and wakes us (the semaphore keeps the wake-up if we are not asleep yet).
    Sleeping counted(w);
    if (w->owner.load(std::memory_order_seq_cst) != token) return;
    if (!shared) {
        // Memory of this process: the system's address wait (which cannot also
        // wait for a thread, hence the bounded sleep).
        std::uint64_t seen = token;
        WaitOnAddress(&w->owner, &seen, sizeof seen, std::min(ms, kOwnerRecheckMs));
        return;
    }
    const std::size_t offset = reinterpret_cast<std::uintptr_t>(&w->owner) - view.base;
    HANDLE objects[2] = {word_semaphore(view.tail, offset), owner_thread};
    WaitForMultipleObjects(owner_thread ? 2 : 1, objects, FALSE, owner_thread ? ms : std::min(ms, kOwnerRecheckMs));
}

/// Wakes one sleeper of a lock just given back.
void wake_one(WinMutex* w) noexcept {
    try {
        View view{};
        if (!find_view(w, view)) {
            WakeByAddressAll(&w->owner);
            return;
        }
        const std::size_t offset = reinterpret_cast<std::uintptr_t>(&w->owner) - view.base;
        ReleaseSemaphore(word_semaphore(view.tail, offset), 1, nullptr);
    } catch (...) {
        // (A sleeper also looks again when its owner's thread ends.)
    }
}

/// Takes the lock: 0, or a kStatus code.  `try_only`: never waits.
int acquire(WinMutex* w, Deadline deadline, bool try_only) {
    const std::uint64_t me = caller_token();
    for (;;) {
        std::uint64_t seen = 0;
        if (w->owner.compare_exchange_strong(seen, me, std::memory_order_acquire, std::memory_order_relaxed)) return 0;
        if (seen == me) return try_only ? kStatusBusy : kStatusDeadlock;  // not recursive
        HANDLE owner_thread = nullptr;
        if (owner_ended(seen, &owner_thread)) {
            if (w->owner.compare_exchange_strong(seen, me, std::memory_order_acquire, std::memory_order_relaxed))
                return kStatusOwnerDied;
            continue;  // another waiter took it over first: look again
        }
        const DWORD ms = try_only ? 0 : wait_ms(deadline);
        if (ms != 0) {
            try {
                sleep_while_held(w, seen, owner_thread, ms);
            } catch (...) {
                if (owner_thread) CloseHandle(owner_thread);
                throw;
            }
        }
        if (owner_thread) CloseHandle(owner_thread);
        if (ms == 0) return try_only ? kStatusBusy : kStatusTimedOut;
    }
}

LockResult lock_result(int status) {
    switch (status) {
        case 0: return LockResult::acquired;
        case kStatusOwnerDied: return LockResult::owner_died;
        case kStatusTimedOut: return LockResult::timed_out;
        case kStatusBusy: return LockResult::busy;
        default:
            throw std::system_error(status == kStatusDeadlock ? EDEADLK : EPERM, std::generic_category(),
                                    "mpservice: mutex lock");
    }
}
}  // namespace

void robust_mutex_init(RobustMutex* m) { std::memset(m->storage, 0, sizeof m->storage); }

LockResult robust_mutex_trylock(RobustMutex* m) { return lock_result(acquire(win(m), no_deadline, true)); }

LockResult robust_mutex_lock(RobustMutex* m, Deadline deadline) { return robust_mutex_lock_blocking(m, deadline); }

LockResult robust_mutex_lock_blocking(RobustMutex* m, Deadline deadline) {
    return lock_result(acquire(win(m), deadline, false));
}

void robust_mutex_unlock(RobustMutex* m) {
    int status = robust_mutex_unlock_status(m);
    if (status != 0) robust_mutex_unlock_failed(status);
}

void robust_mutex_consistent(RobustMutex*) {}

bool robust_mutex_has_sleepers(const RobustMutex* m) noexcept {
    return win(m)->sleepers.load(std::memory_order_relaxed) != 0;
}

int robust_mutex_trylock_status(RobustMutex* m) noexcept {
    // The free word only: judging a holder costs three kernel calls (under
    // Wine, three wineserver round trips), and a contended acquire judges it
    // once where it waits.  So busy here does not say the holder lives; a
    // caller that gives up on busy asks robust_mutex_trylock (os.hpp).
    std::uint64_t expected = 0;
    if (win(m)->owner.compare_exchange_strong(expected, caller_token(), std::memory_order_acquire,
                                              std::memory_order_relaxed))
        return 0;
    return kStatusBusy;
}

int robust_mutex_unlock_status(RobustMutex* m) noexcept {
    WinMutex* w = win(m);
    std::uint64_t me = caller_token();
    if (!w->owner.compare_exchange_strong(me, 0, std::memory_order_seq_cst, std::memory_order_relaxed))
        return kStatusNotOwner;
    if (w->sleepers.load(std::memory_order_seq_cst) != 0) wake_one(w);
    return 0;
}

LockResult robust_mutex_trylock_result(int status) { return lock_result(status); }

void robust_mutex_unlock_failed(int) {
    throw std::system_error(EPERM, std::generic_category(), "mpservice: mutex unlock");
}

bool robust_mutex_held_in_this_process(const RobustMutex* m) noexcept {
    return static_cast<DWORD>(win(m)->owner.load(std::memory_order_acquire) >> 32) == GetCurrentProcessId();
}

// ---------------------------------------------------------------- processes

long current_pid() noexcept { return static_cast<long>(GetCurrentProcessId()); }

bool pid_alive(long pid) noexcept {
    HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, FALSE, static_cast<DWORD>(pid));
    if (!h) return GetLastError() == ERROR_ACCESS_DENIED;
    CloseHandle(h);
    return true;
}

bool process_running(long pid) noexcept {
    // SYNCHRONIZE: the wait below needs it (without it the wait fails, and
    // every process looked ended - a Barrier with parties in other processes broke).
    HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | SYNCHRONIZE, FALSE, static_cast<DWORD>(pid));
    if (!h) return GetLastError() == ERROR_ACCESS_DENIED;
    DWORD code = 0;
    bool running = GetExitCodeProcess(h, &code) && code == STILL_ACTIVE &&
                   WaitForSingleObject(h, 0) == WAIT_TIMEOUT;  // STILL_ACTIVE may be a real exit code
    CloseHandle(h);
    return running;
}

long current_tid() noexcept { return static_cast<long>(GetCurrentThreadId()); }

bool is_main_thread() noexcept { return GetCurrentThreadId() == g_main_thread; }

long parent_pid() noexcept {
    static const long parent = [] {
        // The layout of PROCESS_BASIC_INFORMATION, spelled out: MinGW's and
        // the Windows SDK's headers name its fields differently.
        struct BasicInformation {
            LONG exit_status;
            void* peb;
            ULONG_PTR affinity;
            LONG base_priority;
            ULONG_PTR pid;
            ULONG_PTR parent_pid;
        } info{};
        ULONG len = 0;
        if (NtQueryInformationProcess(GetCurrentProcess(), ProcessBasicInformation, &info, sizeof info, &len) != 0)
            return -1L;
        return static_cast<long>(info.parent_pid);
    }();
    return parent;
}

// ---------------------------------------------------------------- logging

void write_stderr(const char* data, std::size_t n) noexcept {
    HANDLE h = GetStdHandle(STD_ERROR_HANDLE);
    while (n > 0 && h && h != INVALID_HANDLE_VALUE) {
        DWORD done = 0;
        DWORD chunk = static_cast<DWORD>(std::min<std::size_t>(n, 1u << 30));
        if (is_socket(from_handle(h))) {
            int k = send(reinterpret_cast<SOCKET>(h), data, static_cast<int>(chunk), 0);
            if (k <= 0) {
                if (WSAGetLastError() != WSAEWOULDBLOCK) return;
                WSAPOLLFD q{reinterpret_cast<SOCKET>(h), POLLWRNORM, 0};
                WSAPoll(&q, 1, 100);
                continue;
            }
            done = static_cast<DWORD>(k);
        } else if (!WriteFile(h, data, chunk, &done, nullptr) || done == 0) {
            return;
        }
        data += done;
        n -= done;
    }
}

void local_time(long long seconds, int fields[6]) noexcept {
    std::time_t t = static_cast<std::time_t>(seconds);
    std::tm tm{};
    localtime_s(&tm, &t);
    fields[0] = tm.tm_year + 1900;
    fields[1] = tm.tm_mon + 1;
    fields[2] = tm.tm_mday;
    fields[3] = tm.tm_hour;
    fields[4] = tm.tm_min;
    fields[5] = tm.tm_sec;
}

// ---------------------------------------------------------------- channels

namespace {
// The frame header before the bytes of every channel write.
struct FrameHeader {
    std::uint32_t payload;   // bytes after the handle values
    std::uint32_t handles;   // handle values that follow this header
    std::uint32_t sender;    // pid of the process the handle values belong to
    std::uint32_t check;     // kFrameCheck ^ payload: a stream that is not ours is refused
};
constexpr std::uint32_t kFrameCheck = 0x4d505346;  // "MPSF"
constexpr std::size_t kMaxFrameHandles = 253;      // as on Linux, so callers batch alike
constexpr std::size_t kMaxFramePayload = 1u << 20;
// A handle value that says "a WSAPROTOCOL_INFOW record follows the values".
constexpr std::uint64_t kSocketRecord = ~std::uint64_t(0);

}  // namespace

/// A socket that WSADuplicateSocket prepared for this process.
handle_t socket_from_info(WSAPROTOCOL_INFOW& info) {
    if (!winsock_start()) throw_wsa("mpservice: WSAStartup");
    SOCKET s = WSASocketW(FROM_PROTOCOL_INFO, FROM_PROTOCOL_INFO, FROM_PROTOCOL_INFO, &info, 0,
                          WSA_FLAG_NO_HANDLE_INHERIT);
    if (s == INVALID_SOCKET) throw_wsa("mpservice: WSASocket from a duplicated socket");
    set_nonblocking(s);
    return static_cast<handle_t>(s);
}

namespace {

/// This process's parent, opened to put handles into its table (once: a
/// child dies with its parent, so the pid cannot be another process's).
HANDLE parent_for_handles() {
    static const HANDLE parent = [] {
        const long pid = parent_pid();
        return pid > 0 ? OpenProcess(PROCESS_DUP_HANDLE, FALSE, static_cast<DWORD>(pid)) : nullptr;
    }();
    return parent;
}

/// Puts copies of `handles` into `target`'s table; false (and nothing left
/// there) if one cannot be copied.  Sockets are skipped (nullptr): they travel
/// by their WSADuplicateSocket record.
bool push_handles(HANDLE target, const handle_t* handles, std::size_t nhandles, std::vector<HANDLE>& pushed) {
    for (std::size_t i = 0; i < nhandles; ++i) {
        HANDLE remote = nullptr;
        if (is_socket(handles[i])) {
            pushed.push_back(nullptr);
        } else if (DuplicateHandle(GetCurrentProcess(), as_handle(handles[i]), target, &remote, 0, FALSE,
                                   DUPLICATE_SAME_ACCESS)) {
            pushed.push_back(remote);
        } else {
            for (HANDLE r : pushed)
                if (r) DuplicateHandle(target, r, nullptr, nullptr, 0, FALSE, DUPLICATE_CLOSE_SOURCE);
            pushed.clear();
            return false;
        }
    }
    return true;
}

/// The frame carrying `a`, `b` and `handles`.  The handles are put straight
/// into the reader's table when the reader is a child of ours or our parent;
/// otherwise copies stay valid in this process until the reader takes them.
std::string frame_bytes(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                        const handle_t* handles, std::size_t nhandles) {
    DWORD peer = 0;
    bool to_child = false;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto it = reg().channels.find(ch);
        if (it != reg().channels.end()) peer = it->second.peer_pid, to_child = it->second.peer_is_child;
    }
    // To a child of ours, the handles are put straight into its handle table
    // (the values are its own): a frame it never reads - it was killed first -
    // leaves nothing behind here.  To our parent too: a child ends right after
    // it has sent its outcome, and its own table goes with it - copies left
    // there for the parent to pull would be gone before the parent read the
    // frame.  Otherwise copies of ours wait for the reader to take them
    // (pull_handle, DUPLICATE_CLOSE_SOURCE).
    std::vector<HANDLE> pushed;
    bool pushed_to_peer = false;
    if (to_child && nhandles > 0) {
        std::lock_guard<std::mutex> g(reg().mu);
        auto child = reg().children.find(static_cast<long>(peer));
        // (Not found, or a copy refused: it has ended, nobody will read the frame.)
        pushed_to_peer = child != reg().children.end() && push_handles(child->second.process, handles, nhandles, pushed);
    } else if (nhandles > 0 && peer != 0 && static_cast<long>(peer) == parent_pid() && parent_for_handles()) {
        pushed_to_peer = push_handles(parent_for_handles(), handles, nhandles, pushed);
    }
    FrameHeader hdr{static_cast<std::uint32_t>(na + nb), static_cast<std::uint32_t>(nhandles),
                    static_cast<std::uint32_t>(pushed_to_peer ? peer : GetCurrentProcessId()), 0};
    hdr.check = kFrameCheck ^ hdr.payload;
    std::string out(sizeof hdr + nhandles * sizeof(std::uint64_t) + na + nb, '\0');
    char* p = &out[0];
    std::memcpy(p, &hdr, sizeof hdr);
    p += sizeof hdr;
    std::string socket_infos;
    for (std::size_t i = 0; i < nhandles; ++i) {
        // A socket for a known peer travels as Winsock wants (and Wine needs):
        // WSADuplicateSocket for that process, whose record follows the values.
        WSAPROTOCOL_INFOW info{};
        if (peer && is_socket(handles[i]) && WSADuplicateSocketW(as_socket(handles[i]), peer, &info) == 0) {
            std::uint64_t v = kSocketRecord;
            std::memcpy(p, &v, sizeof v);
            p += sizeof v;
            socket_infos.append(reinterpret_cast<const char*>(&info), sizeof info);
            // That end now lives in `peer`: the end paired with it here talks to
            // `peer`, so sockets sent over it later travel the same way (a Pipe
            // made here, one end sent to a child, then an end sent over the
            // other: without this it went as a plain handle, unusable as a
            // socket there, and nothing arrived).
            std::lock_guard<std::mutex> g(reg().mu);
            auto it = reg().channels.find(handles[i]);
            if (it != reg().channels.end() && it->second.partner >= 0) {
                auto other = reg().channels.find(it->second.partner);
                if (other != reg().channels.end() && other->second.peer_pid == 0) other->second.peer_pid = peer;
            }
            continue;
        }
        HANDLE copy = nullptr;
        if (pushed_to_peer) {
            copy = pushed[i];
            if (!copy)  // a socket WSADuplicateSocket refused for the peer
                throw std::system_error(EIO, std::generic_category(), "mpservice: a socket for a peer could not be prepared");
        } else if (!DuplicateHandle(GetCurrentProcess(), as_handle(handles[i]), GetCurrentProcess(), &copy, 0, FALSE,
                                    DUPLICATE_SAME_ACCESS)) {
            throw_win32("mpservice: DuplicateHandle for a channel");
        }
        std::uint64_t v = reinterpret_cast<std::uintptr_t>(copy);
        std::memcpy(p, &v, sizeof v);
        p += sizeof v;
    }
    out.insert(sizeof hdr + nhandles * sizeof(std::uint64_t), socket_infos);
    p = &out[0] + sizeof hdr + nhandles * sizeof(std::uint64_t) + socket_infos.size();
    if (na) std::memcpy(p, a, na), p += na;
    if (nb) std::memcpy(p, b, nb);
    return out;
}

/// Sends what the socket takes now; the bytes sent, or -1 if the peer is gone.
long send_now(SOCKET s, const char* p, std::size_t n) {
    long total = 0;
    while (n > 0) {
        int k = send(s, p, static_cast<int>(std::min<std::size_t>(n, 1 << 20)), 0);
        if (k > 0) {
            p += k, n -= static_cast<std::size_t>(k), total += k;
            continue;
        }
        int err = WSAGetLastError();
        if (err == WSAEWOULDBLOCK) break;
        if (err == WSAECONNRESET || err == WSAECONNABORTED || err == WSAESHUTDOWN || err == WSAENOTCONN) return -1;
        throw_win32("mpservice: send", static_cast<DWORD>(err));
    }
    return total;
}

/// Sends all of it, waiting for room; false if the peer is gone.
bool send_blocking(SOCKET s, const char* p, std::size_t n) {
    while (n > 0) {
        long k = send_now(s, p, n);
        if (k < 0) return false;
        p += k, n -= static_cast<std::size_t>(k);
        if (n > 0) {
            WSAPOLLFD q{s, POLLWRNORM, 0};
            WSAPoll(&q, 1, -1);
            if (q.revents & (POLLHUP | POLLERR | POLLNVAL)) return false;
        }
    }
    return true;
}

/// Flushes a frame left over by channel_write_some; true when nothing is left.
bool flush_pending(handle_t ch, bool block) {
    std::string pending;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto it = reg().channels.find(ch);
        if (it == reg().channels.end() || it->second.pending.empty()) return true;
        pending.swap(it->second.pending);
    }
    long k = block ? (send_blocking(as_socket(ch), pending.data(), pending.size()) ? long(pending.size()) : -1)
                   : send_now(as_socket(ch), pending.data(), pending.size());
    if (k < 0) return true;  // the peer is gone: nothing to keep
    if (static_cast<std::size_t>(k) == pending.size()) return true;
    std::lock_guard<std::mutex> g(reg().mu);
    reg().channels[ch].pending = pending.substr(static_cast<std::size_t>(k));
    return false;
}

/// Receives exactly n bytes, waiting; false at end of stream.
bool recv_exact(SOCKET s, char* p, std::size_t n) {
    while (n > 0) {
        int k = recv(s, p, static_cast<int>(std::min<std::size_t>(n, 1 << 20)), 0);
        if (k > 0) {
            p += k, n -= static_cast<std::size_t>(k);
            continue;
        }
        if (k == 0) return false;
        int err = WSAGetLastError();
        if (err != WSAEWOULDBLOCK) return false;
        WSAPOLLFD q{s, POLLRDNORM, 0};
        WSAPoll(&q, 1, -1);
    }
    return true;
}

/// Takes a handle out of the process that sent it (see the top of the file).
handle_t pull_handle(DWORD sender, std::uint64_t value) {
    HANDLE mine = nullptr;
    if (sender == GetCurrentProcessId()) return static_cast<handle_t>(value);
    HANDLE proc = OpenProcess(PROCESS_DUP_HANDLE, FALSE, sender);
    if (!proc) throw_win32("mpservice: OpenProcess of a handle's sender");
    BOOL ok = DuplicateHandle(proc, reinterpret_cast<HANDLE>(static_cast<std::uintptr_t>(value)), GetCurrentProcess(),
                              &mine, 0, FALSE, DUPLICATE_SAME_ACCESS | DUPLICATE_CLOSE_SOURCE);
    DWORD err = GetLastError();
    CloseHandle(proc);
    if (!ok) throw_win32("mpservice: DuplicateHandle from a handle's sender", err);
    return from_handle(mine);
}
}  // namespace

void channel_pair(handle_t& a, handle_t& b) {
    tcp_pair(a, b);
    std::lock_guard<std::mutex> g(reg().mu);
    reg().channels[a].partner = b;
    reg().channels[b].partner = a;
}

void packet_pair(handle_t&, handle_t&) {
    throw std::system_error(ENOSYS, std::generic_category(),
                            "mpservice: packet channels exist only for the fork server, which Windows does not have");
}

bool channel_write(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb, const handle_t* handles,
                   std::size_t nhandles) {
    std::size_t batches = (nhandles + kMaxFrameHandles - 1) / kMaxFrameHandles;
    if (batches > na + nb)
        throw std::invalid_argument("mpservice: " + std::to_string(nhandles) + " OS handles need at least " +
                                    std::to_string(batches) + " bytes to ride on");
    if (!flush_pending(ch, true)) return false;
    // Frames of at most kMaxFramePayload bytes; each batch of handles rides on its own frame.
    const char* pa = static_cast<const char*>(a);
    const char* pb = static_cast<const char*>(b);
    std::size_t hs_done = 0;
    bool first = true;
    while (first || na + nb > 0) {
        first = false;
        std::size_t hs = std::min(nhandles - hs_done, kMaxFrameHandles);
        std::size_t room = (nhandles - hs_done > kMaxFrameHandles) ? 1 : kMaxFramePayload;
        std::size_t ta = std::min(na, room);
        std::size_t tb = std::min(nb, room - ta);
        std::string frame = frame_bytes(ch, pa, ta, pb, tb, handles + hs_done, hs);
        hs_done += hs;
        pa += ta, na -= ta, pb += tb, nb -= tb;
        if (!send_blocking(as_socket(ch), frame.data(), frame.size())) return false;
    }
    return true;
}

long channel_write_some(handle_t ch, const void* a, std::size_t na, const void* b, std::size_t nb,
                        const handle_t* handles, std::size_t nhandles) {
    if (nhandles > kMaxFrameHandles) throw std::invalid_argument("mpservice: more than 253 OS handles in one message");
    if (na + nb == 0) return 0;
    if (!flush_pending(ch, false)) return 0;
    WSAPOLLFD q{as_socket(ch), POLLWRNORM, 0};
    if (WSAPoll(&q, 1, 0) <= 0) return 0;
    if (q.revents & (POLLHUP | POLLERR | POLLNVAL)) return -1;
    // One frame of a bounded size; what the socket does not take now is kept
    // and sent first by the next write on this end (the bytes count as written).
    constexpr std::size_t kChunk = 64 * 1024;
    std::size_t ta = std::min(na, kChunk);
    std::size_t tb = std::min(nb, kChunk - ta);
    std::string frame = frame_bytes(ch, a, ta, b, tb, handles, nhandles);
    long k = send_now(as_socket(ch), frame.data(), frame.size());
    if (k < 0) return -1;
    if (static_cast<std::size_t>(k) < frame.size()) {
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[ch].pending = frame.substr(static_cast<std::size_t>(k));
    }
    return static_cast<long>(ta + tb);
}

long channel_read(handle_t ch, void* buf, std::size_t cap, std::vector<handle_t>* handles, bool nonblocking) {
    SOCKET s = as_socket(ch);
    for (;;) {
        if (nonblocking) {
            WSAPOLLFD q{s, POLLRDNORM, 0};
            if (WSAPoll(&q, 1, 0) <= 0) return -1;
        }
        std::uint64_t left = 0;
        {
            std::lock_guard<std::mutex> g(reg().mu);
            left = reg().channels[ch].payload_left;
        }
        if (left == 0) {
            // A new frame: its header and handles (sent together, so waiting
            // for their last bytes is short).
            FrameHeader hdr{};
            if (!recv_exact(s, reinterpret_cast<char*>(&hdr), sizeof hdr)) return 0;
            if ((hdr.check ^ kFrameCheck) != hdr.payload || hdr.handles > kMaxFrameHandles)
                throw std::system_error(EPROTO, std::generic_category(), "mpservice: a channel frame is malformed");
            std::vector<std::uint64_t> values(hdr.handles);
            if (hdr.handles && !recv_exact(s, reinterpret_cast<char*>(values.data()), values.size() * sizeof values[0]))
                return 0;
            for (std::uint64_t v : values) {
                handle_t h;
                if (v == kSocketRecord) {
                    WSAPROTOCOL_INFOW info{};
                    if (!recv_exact(s, reinterpret_cast<char*>(&info), sizeof info)) return 0;
                    h = socket_from_info(info);
                } else {
                    h = pull_handle(hdr.sender, v);
                }
                if (is_socket(h)) {
                    std::lock_guard<std::mutex> g(reg().mu);
                    reg().channels[h];
                }
                if (handles) handles->push_back(h);
                else close_handle(h);
            }
            if (hdr.payload == 0) {
                if (hdr.handles > 0 && handles) return 0 + 0;  // handles only: nothing to count (callers send bytes)
                continue;
            }
            left = hdr.payload;
        }
        std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(left, cap));
        int k;
        for (;;) {
            k = recv(s, static_cast<char*>(buf), static_cast<int>(std::min<std::size_t>(want, 1 << 30)), 0);
            if (k >= 0) break;
            int err = WSAGetLastError();
            if (err == WSAECONNRESET || err == WSAECONNABORTED) return 0;
            if (err != WSAEWOULDBLOCK) throw_win32("mpservice: recv", static_cast<DWORD>(err));
            WSAPOLLFD q{s, POLLRDNORM, 0};
            WSAPoll(&q, 1, -1);
        }
        if (k == 0) return 0;
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[ch].payload_left = left - static_cast<std::uint64_t>(k);
        return k;
    }
}

unsigned wait_readable(const handle_t* hs, int n, int timeout_ms) {
    std::vector<WSAPOLLFD> p;
    for (int i = 0; i < n && i < 32; ++i) p.push_back(WSAPOLLFD{as_socket(hs[i]), POLLRDNORM, 0});
    poll_sockets(p, timeout_ms);
    unsigned mask = 0;
    for (std::size_t i = 0; i < p.size(); ++i)
        if (readable_revents(p[i].revents)) mask |= 1u << i;
    return mask;
}

unsigned wait_io(handle_t h, unsigned want, int timeout_ms) {
    WSAPOLLFD q{as_socket(h), 0, 0};
    if (want & io_readable) q.events |= POLLRDNORM;
    if (want & io_writable) q.events |= POLLWRNORM;
    if (WSAPoll(&q, 1, timeout_ms) <= 0) return 0;
    bool failed = (q.revents & (POLLERR | POLLHUP | POLLNVAL)) != 0;
    unsigned got = 0;
    if ((want & io_readable) && ((q.revents & POLLRDNORM) || failed)) got |= io_readable;
    if ((want & io_writable) && ((q.revents & POLLWRNORM) || failed)) got |= io_writable;
    return got;
}

std::size_t wait_readable_any(const handle_t* hs, std::size_t n, int timeout_ms, unsigned char* ready) {
    std::vector<WSAPOLLFD> p(n);
    for (std::size_t i = 0; i < n; ++i) p[i] = WSAPOLLFD{as_socket(hs[i]), POLLRDNORM, 0};
    poll_sockets(p, timeout_ms);
    std::size_t count = 0;
    for (std::size_t i = 0; i < n; ++i) {
        ready[i] = readable_revents(p[i].revents);
        count += ready[i];
    }
    return count;
}

// ---- pollers and wake events

namespace {
std::shared_ptr<Poller> find_poller(handle_t h) {
    std::lock_guard<std::mutex> g(reg().mu);
    auto it = reg().pollers.find(h);
    return it == reg().pollers.end() ? nullptr : it->second;
}

/// The sockets a poller watches, nested pollers flattened (with the outer
/// token), each poller's own wake socket included (token: none).
void flatten(const std::shared_ptr<Poller>& p, std::uint64_t token, bool outer, std::vector<WSAPOLLFD>& fds,
             std::vector<std::pair<bool, std::uint64_t>>& tokens, int depth) {
    std::vector<std::pair<handle_t, std::uint64_t>> items;
    {
        std::lock_guard<std::mutex> g(p->mu);
        items = p->items;
    }
    fds.push_back(WSAPOLLFD{as_socket(p->wake_read), POLLRDNORM, 0});
    tokens.emplace_back(false, 0);
    for (auto& [h, t] : items) {
        if (auto nested = depth < 4 ? find_poller(h) : nullptr) {
            flatten(nested, outer ? t : token, false, fds, tokens, depth + 1);
            continue;
        }
        fds.push_back(WSAPOLLFD{as_socket(h), POLLRDNORM, 0});
        tokens.emplace_back(true, outer ? t : token);
    }
}

void drain_socket(handle_t h) noexcept {
    char buf[256];
    while (recv(as_socket(h), buf, sizeof buf, 0) > 0) {
    }
}
}  // namespace

handle_t poller_create() {
    auto p = std::make_shared<Poller>();
    tcp_pair(p->wake_read, p->wake_write);
    // The poller's own handle: an event object, so that its value is unique
    // among this process's handles (nothing waits on it).
    HANDLE id = CreateEventW(nullptr, TRUE, FALSE, nullptr);
    if (!id) throw_win32("mpservice: CreateEvent");
    std::lock_guard<std::mutex> g(reg().mu);
    reg().pollers[from_handle(id)] = p;
    return from_handle(id);
}

void poller_add(handle_t poller, handle_t h, std::uint64_t token) {
    auto p = find_poller(poller);
    if (!p) throw std::system_error(EBADF, std::generic_category(), "mpservice: poller_add");
    {
        std::lock_guard<std::mutex> g(p->mu);
        for (auto& item : p->items)
            if (item.first == h) throw std::system_error(EEXIST, std::generic_category(), "mpservice: poller_add");
        p->items.emplace_back(h, token);
    }
    char one = 1;
    send(as_socket(p->wake_write), &one, 1, 0);  // a waiting poller_wait looks again
}

void poller_remove(handle_t poller, handle_t h) noexcept {
    auto p = find_poller(poller);
    if (!p) return;
    {
        std::lock_guard<std::mutex> g(p->mu);
        p->items.erase(std::remove_if(p->items.begin(), p->items.end(), [&](auto& i) { return i.first == h; }),
                       p->items.end());
    }
    char one = 1;
    send(as_socket(p->wake_write), &one, 1, 0);
}

int poller_wait(handle_t poller, std::uint64_t* tokens, int max, int timeout_ms) {
    auto p = find_poller(poller);
    if (!p) throw std::system_error(EBADF, std::generic_category(), "mpservice: poller_wait");
    const Deadline until = timeout_ms < 0 ? no_deadline : deadline_after(std::chrono::milliseconds(timeout_ms));
    for (;;) {
        std::vector<WSAPOLLFD> fds;
        std::vector<std::pair<bool, std::uint64_t>> toks;
        flatten(p, 0, true, fds, toks, 0);
        DWORD ms = wait_ms(until);
        int rc = WSAPoll(fds.data(), static_cast<ULONG>(fds.size()), ms == INFINITE ? -1 : static_cast<int>(ms));
        if (rc < 0) rc = 0;
        int n = 0;
        bool changed = false;
        for (std::size_t i = 0; i < fds.size(); ++i) {
            if (!readable_revents(fds[i].revents)) continue;
            if (!toks[i].first) {  // a wake socket: the registrations changed
                drain_socket(static_cast<handle_t>(fds[i].fd));
                changed = true;
                continue;
            }
            bool dup = false;
            for (int j = 0; j < n; ++j) dup = dup || tokens[j] == toks[i].second;
            if (!dup && n < max) tokens[n++] = toks[i].second;
        }
        if (n > 0) return n;
        if (!changed && Clock::now() >= until) return 0;
        if (!changed && rc == 0 && until != no_deadline) return 0;
    }
}

handle_t wake_event_create() {
    handle_t r, w;
    tcp_pair(r, w);
    std::lock_guard<std::mutex> g(reg().mu);
    reg().paired_write_ends[r] = w;
    return r;
}

void wake_event_signal(handle_t ev) noexcept {
    handle_t w = invalid_handle;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto it = reg().paired_write_ends.find(ev);
        if (it != reg().paired_write_ends.end()) w = it->second;
    }
    char one = 1;
    if (w >= 0) send(as_socket(w), &one, 1, 0);
}

void wake_event_drain(handle_t ev) noexcept { drain_socket(ev); }

// ---- starting children

namespace {
/// The kill-on-close job every child of this process is put into: when the
/// last handle closes - at our exit however it happens - the system ends them.
HANDLE children_job() {
    static HANDLE job = [] {
        HANDLE j = CreateJobObjectW(nullptr, nullptr);
        if (!j) throw_win32("mpservice: CreateJobObject");
        JOBOBJECT_EXTENDED_LIMIT_INFORMATION info{};
        info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
        if (!SetInformationJobObject(j, JobObjectExtendedLimitInformation, &info, sizeof info))
            throw_win32("mpservice: SetInformationJobObject");
        return j;
    }();
    return job;
}

std::wstring quote_argument(const std::wstring& arg) {
    // The quoting CommandLineToArgvW and the C runtime undo.
    if (!arg.empty() && arg.find_first_of(L" \t\n\v\"") == std::wstring::npos) return arg;
    std::wstring out = L"\"";
    std::size_t backslashes = 0;
    for (wchar_t c : arg) {
        if (c == L'\\') {
            ++backslashes;
            continue;
        }
        if (c == L'"') out.append(backslashes * 2 + 1, L'\\');
        else out.append(backslashes, L'\\');
        backslashes = 0;
        out.push_back(c);
    }
    out.append(backslashes * 2, L'\\');
    out.push_back(L'"');
    return out;
}

std::wstring own_executable() {
    std::wstring path(MAX_PATH, L'\0');
    for (;;) {
        DWORD n = GetModuleFileNameW(nullptr, &path[0], static_cast<DWORD>(path.size()));
        if (n == 0) throw_win32("mpservice: GetModuleFileName");
        if (n < path.size()) {
            path.resize(n);
            return path;
        }
        path.resize(path.size() * 2);
    }
}
}  // namespace

long spawn_self(const std::string& argv0, const std::string& marker, handle_t inherit,
                const std::vector<std::string>* environment) {
    std::wstring exe = own_executable();
    // A given environment becomes the child's block: "NAME=value" entries, each
    // ended by a NUL, the block by one more.
    std::wstring env_block;
    if (environment) {
        for (const std::string& entry : *environment) {
            env_block += widen(entry);
            env_block.push_back(L'\0');
        }
        if (environment->empty()) env_block.push_back(L'\0');  // an empty block is two NULs
        env_block.push_back(L'\0');
    }
    // The child takes its channel from us (adopt_channel): an inherited socket
    // is not usable as one under Wine, and Winsock's own way to hand a socket
    // over is WSADuplicateSocket for a process id - known only once the child
    // exists.  So the marker names a small section of ours that receives the
    // socket's record before the child runs, and stays open until it is
    // reaped; the marker ends "<handle>:<pid>", and the handle is swapped.
    HANDLE keeper = CreateFileMappingW(INVALID_HANDLE_VALUE, nullptr, PAGE_READWRITE, 0, sizeof(WSAPROTOCOL_INFOW), nullptr);
    if (!keeper) throw_win32("mpservice: CreateFileMapping for a child's channel");
    // The "<handle>:<pid>" part may be followed by a suffix (":w" for a warm
    // spawn child): it is found where it is, not only at the very end.
    std::string marked = marker;
    const std::string old_value = std::to_string(inherit) + ":" + std::to_string(current_pid());
    const std::string new_value = std::to_string(reinterpret_cast<std::uintptr_t>(keeper)) + ":" + std::to_string(current_pid());
    const std::size_t at = marked.rfind(old_value);
    if (at != std::string::npos && at > 0 && (marked[at - 1] == '=' || marked[at - 1] == ':') &&
        (at + old_value.size() == marked.size() || marked[at + old_value.size()] == ':'))
        marked.replace(at, old_value.size(), new_value);
    std::wstring cmd = quote_argument(widen(argv0.empty() ? narrow(exe.c_str()) : argv0)) + L" " + quote_argument(widen(marked));
    // Only the standard handles are inherited: the handle list names them,
    // and no other thread's spawn can inherit them unasked (each lists its own).
    std::vector<HANDLE> list;
    auto add = [&](HANDLE h) {
        if (!h || h == INVALID_HANDLE_VALUE) return;
        if (std::find(list.begin(), list.end(), h) != list.end()) return;
        DWORD type = GetFileType(h);
        if (type == FILE_TYPE_UNKNOWN && GetLastError() != NO_ERROR && !is_socket(from_handle(h))) return;
        if (!SetHandleInformation(h, HANDLE_FLAG_INHERIT, HANDLE_FLAG_INHERIT)) return;
        list.push_back(h);
    };
    HANDLE std_in = GetStdHandle(STD_INPUT_HANDLE), std_out = GetStdHandle(STD_OUTPUT_HANDLE),
           std_err = GetStdHandle(STD_ERROR_HANDLE);
    add(std_in), add(std_out), add(std_err);

    SIZE_T size = 0;
    InitializeProcThreadAttributeList(nullptr, 1, 0, &size);
    std::vector<unsigned char> attr_buf(size);
    auto* attrs = reinterpret_cast<LPPROC_THREAD_ATTRIBUTE_LIST>(attr_buf.data());
    if (!InitializeProcThreadAttributeList(attrs, 1, 0, &size)) throw_win32("mpservice: InitializeProcThreadAttributeList");
    if (!UpdateProcThreadAttribute(attrs, 0, PROC_THREAD_ATTRIBUTE_HANDLE_LIST, list.data(), list.size() * sizeof(HANDLE),
                                   nullptr, nullptr)) {
        DeleteProcThreadAttributeList(attrs);
        throw_win32("mpservice: UpdateProcThreadAttribute");
    }
    STARTUPINFOEXW si{};
    si.StartupInfo.cb = sizeof si;
    si.StartupInfo.dwFlags = STARTF_USESTDHANDLES;
    si.StartupInfo.hStdInput = std_in;
    si.StartupInfo.hStdOutput = std_out;
    si.StartupInfo.hStdError = std_err;
    si.lpAttributeList = attrs;
    PROCESS_INFORMATION pi{};
    std::vector<wchar_t> cmdline(cmd.begin(), cmd.end());
    cmdline.push_back(L'\0');
    HANDLE job = children_job();
    BOOL ok = CreateProcessW(exe.c_str(), cmdline.data(), nullptr, nullptr, TRUE,
                             CREATE_SUSPENDED | EXTENDED_STARTUPINFO_PRESENT | CREATE_UNICODE_ENVIRONMENT,
                             environment ? static_cast<void*>(&env_block[0]) : nullptr, nullptr, &si.StartupInfo,
                             &pi);
    DWORD err = GetLastError();
    DeleteProcThreadAttributeList(attrs);
    if (!ok) {
        CloseHandle(keeper);
        throw_win32("mpservice: CreateProcessW of this executable", err);
    }
    // In the job before it runs a single instruction: it cannot outlive us.
    if (!AssignProcessToJobObject(job, pi.hProcess)) {
        err = GetLastError();
        TerminateProcess(pi.hProcess, 1);
        CloseHandle(pi.hThread);
        CloseHandle(pi.hProcess);
        CloseHandle(keeper);
        throw_win32("mpservice: AssignProcessToJobObject", err);
    }
    WSAPROTOCOL_INFOW info{};
    void* view = MapViewOfFile(keeper, FILE_MAP_WRITE, 0, 0, sizeof info);
    if (!view || WSADuplicateSocketW(as_socket(inherit), pi.dwProcessId, &info) != 0) {
        err = view ? static_cast<DWORD>(WSAGetLastError()) : GetLastError();
        if (view) UnmapViewOfFile(view);
        TerminateProcess(pi.hProcess, 1);
        CloseHandle(pi.hThread);
        CloseHandle(pi.hProcess);
        CloseHandle(keeper);
        throw_win32("mpservice: WSADuplicateSocket for a child", err);
    }
    std::memcpy(view, &info, sizeof info);
    UnmapViewOfFile(view);
    ResumeThread(pi.hThread);
    CloseHandle(pi.hThread);
    std::lock_guard<std::mutex> g(reg().mu);
    Child& child = reg().children[static_cast<long>(pi.dwProcessId)];
    child.process = pi.hProcess;
    child.keeper = keeper;
    // Frames on the parent's end may carry sockets: they are prepared for the child.
    if (auto it = reg().channels.find(inherit); it != reg().channels.end() && it->second.partner >= 0)
        reg().channels[it->second.partner].peer_pid = pi.dwProcessId,
        reg().channels[it->second.partner].peer_is_child = true;
    return static_cast<long>(pi.dwProcessId);
}

long fork_process() {
    throw std::system_error(ENOSYS, std::generic_category(),
                            "mpservice: the 'fork' start method does not exist on Windows (as in Python): use 'spawn'");
}

namespace {
void CALLBACK on_child_exit(void* param, BOOLEAN) {
    // The read end becomes readable: end of stream.  The wait ran once
    // (WT_EXECUTEONLYONCE); reap_child unregisters it and frees the notice.
    static_cast<ExitNotice*>(param)->close_write_end();
}

/// A duplicate of child `pid`'s process handle (the caller closes it), or
/// null if it is not one of ours or was reaped: the registry's own handle is
/// closed by reap_child while another thread may still want to use it.
HANDLE child_process(long pid) {
    std::lock_guard<std::mutex> g(reg().mu);
    auto it = reg().children.find(pid);
    if (it == reg().children.end()) return nullptr;
    HANDLE copy = nullptr;
    if (!DuplicateHandle(GetCurrentProcess(), it->second.process, GetCurrentProcess(), &copy, 0, FALSE,
                         DUPLICATE_SAME_ACCESS))
        return nullptr;
    return copy;
}

/// The Python-style exit code of a Win32 exit status (see README, platforms).
int python_exitcode(DWORD status) {
    if (status >= 0x10000 && status < 0x10000 + 64) return -static_cast<int>(status - 0x10000);  // send_signal
    switch (status) {
        case 0xC0000005: return -11;  // access violation: SIGSEGV
        case 0xC000001D: return -4;   // illegal instruction: SIGILL
        case 0xC0000094:
        case 0xC0000095: return -8;   // integer division: SIGFPE
        case 0xC00000FD: return -11;  // stack overflow: SIGSEGV
        case 0xC0000409: return -6;   // fail-fast (abort in the UCRT): SIGABRT
        default: break;
    }
    if (status >= 0xC0000000) return -6;  // another fatal exception: abnormal end
    return static_cast<int>(status & 0x7fffffff);
}
}  // namespace

handle_t process_handle(long pid) noexcept {
    try {
        handle_t r, w;
        tcp_pair(r, w);
        auto* notice = new ExitNotice;
        notice->write_end = w;
        {
            // Under the lock: reap_child cannot close the process handle meanwhile.
            std::lock_guard<std::mutex> g(reg().mu);
            auto it = reg().children.find(pid);
            if (it != reg().children.end() &&
                RegisterWaitForSingleObject(&notice->wait, it->second.process, on_child_exit, notice, INFINITE,
                                            WT_EXECUTEONLYONCE | WT_EXECUTEINWAITTHREAD)) {
                it->second.notices.push_back(notice);  // freed by reap_child
                return r;
            }
        }
        close_raw(r), close_raw(w);
        delete notice;
        return invalid_handle;
    } catch (...) {
        return invalid_handle;
    }
}

ReapResult reap_child(long pid, handle_t, bool block, int* exitcode) {
    HANDLE proc = child_process(pid);  // (our own duplicate: waited on outside the lock)
    if (!proc) {
        // Not one of ours (any more): it was collected already.
        return ReapResult::reaped_elsewhere;
    }
    DWORD rc = WaitForSingleObject(proc, block ? INFINITE : 0);
    if (rc == WAIT_TIMEOUT) {
        CloseHandle(proc);
        return ReapResult::running;
    }
    DWORD status = 0;
    const BOOL got = GetExitCodeProcess(proc, &status);
    const DWORD err = GetLastError();
    CloseHandle(proc);
    if (!got) throw_win32("mpservice: GetExitCodeProcess", err);
    *exitcode = python_exitcode(status);
    // The child's end: what we held for it goes (once, by whichever thread
    // gets here first; another one reaping it at the same time has its status too).
    Child child;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto it = reg().children.find(pid);
        if (it != reg().children.end()) {
            child = std::move(it->second);
            reg().children.erase(it);
        }
    }
    for (ExitNotice* n : child.notices) {
        // Waits until a running callback has returned; a wait that had not
        // fired yet is cancelled, and its end of stream is given here.
        UnregisterWaitEx(n->wait, INVALID_HANDLE_VALUE);
        n->close_write_end();
        delete n;
    }
    if (child.keeper) CloseHandle(child.keeper);
    if (child.process) CloseHandle(child.process);
    return ReapResult::reaped;
}

bool reap_any_child(long*, int*) { return false; }

bool send_signal(long pid, handle_t, int sig) noexcept {
    // Windows has no signals: every signal ends the process (as Python's
    // terminate() and kill() on Windows), with an exit status that names it.
    if (sig == 0) return process_running(pid);
    HANDLE proc = child_process(pid);  // (a duplicate, or a handle of our own)
    if (!proc) proc = OpenProcess(PROCESS_TERMINATE | SYNCHRONIZE, FALSE, static_cast<DWORD>(pid));
    if (!proc) return false;
    BOOL ok = TerminateProcess(proc, 0x10000u + static_cast<unsigned>(sig & 63));
    // A process that has ended already counts as signalled (as kill() on a zombie).
    const bool ended = !ok && WaitForSingleObject(proc, 0) == WAIT_OBJECT_0;
    CloseHandle(proc);  // (only after the wait: it used the handle)
    return ok != 0 || ended;
}

int signal_terminate() noexcept { return 15; }
int signal_kill() noexcept { return 9; }

std::string signal_name(int sig) {
    switch (sig) {
        case 2: return "SIGINT";
        case 4: return "SIGILL";
        case 6: return "SIGABRT";
        case 8: return "SIGFPE";
        case 9: return "SIGKILL";
        case 11: return "SIGSEGV";
        case 15: return "SIGTERM";
        default: return "signal " + std::to_string(sig);
    }
}

bool secure_execution() noexcept { return false; }

bool channel_peer(handle_t h, long* pid, long* uid) noexcept {
    // A handle value in a fresh process's table got there by inheritance from
    // the process that created it (or by someone allowed to duplicate handles
    // into us: our own user); a loopback stream socket is a channel.
    int type = 0;
    int len = sizeof type;
    if (!winsock_start() || getsockopt(as_socket(h), SOL_SOCKET, SO_TYPE, reinterpret_cast<char*>(&type), &len) != 0 ||
        type != SOCK_STREAM)
        return false;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[h];
    }
    *pid = parent_pid();
    *uid = current_user();
    return true;
}

bool is_own_user(long uid) noexcept { return uid == current_user(); }

handle_t adopt_channel(handle_t marked, long parent) noexcept {
    HANDLE proc = OpenProcess(PROCESS_DUP_HANDLE, FALSE, static_cast<DWORD>(parent));
    if (!proc) return invalid_handle;
    HANDLE mine = nullptr;
    // Not DUPLICATE_CLOSE_SOURCE: the parent closes its copy when it reaps us.
    BOOL ok = DuplicateHandle(proc, as_handle(marked), GetCurrentProcess(), &mine, 0, FALSE, DUPLICATE_SAME_ACCESS);
    CloseHandle(proc);
    if (!ok) return invalid_handle;
    WSAPROTOCOL_INFOW info{};
    void* view = MapViewOfFile(mine, FILE_MAP_READ, 0, 0, sizeof info);
    if (view) std::memcpy(&info, view, sizeof info), UnmapViewOfFile(view);
    CloseHandle(mine);
    if (!view) return invalid_handle;
    try {
        handle_t ch = socket_from_info(info);
        std::lock_guard<std::mutex> g(reg().mu);
        reg().channels[ch].peer_pid = static_cast<DWORD>(parent);
        return ch;
    } catch (...) {
        return invalid_handle;
    }
}

namespace {
void CALLBACK on_parent_exit(void*, BOOLEAN) { TerminateProcess(GetCurrentProcess(), 0x10000u + 9); }
}  // namespace

long hold_address_space_past_exit() noexcept { return 0; }  // a Windows exit has no such teardown to skip

bool die_with_parent(long expected_parent) noexcept {
    // The parent's job ends us when it dies; this wait covers a process whose
    // job could not be set (and ends us within the same instant otherwise).
    HANDLE parent = OpenProcess(SYNCHRONIZE, FALSE, static_cast<DWORD>(expected_parent));
    if (!parent) return false;
    HANDLE wait = nullptr;
    RegisterWaitForSingleObject(&wait, parent, on_parent_exit, nullptr, INFINITE, WT_EXECUTEONLYONCE);
    return parent_pid() == expected_parent && WaitForSingleObject(parent, 0) == WAIT_TIMEOUT;
}

void reset_signal_handlers() noexcept {}

bool current_thread_stack(void** low, std::size_t* size) noexcept {
    ULONG_PTR lo = 0, hi = 0;
    GetCurrentThreadStackLimits(&lo, &hi);
    if (!lo || hi <= lo) return false;
    *low = reinterpret_cast<void*>(lo);
    *size = static_cast<std::size_t>(hi - lo);
    return true;
}

void leak_checker_root(const void*, std::size_t) noexcept {}

void close_handles_except(handle_t) noexcept {
    // Nothing to do: a child inherits only the handles its spawn listed.
}

void exit_now(int code) noexcept {
    TerminateProcess(GetCurrentProcess(), static_cast<UINT>(code));
    std::_Exit(code);  // not reached
}

bool on_exit_status(void (*)(int) noexcept) noexcept { return false; }

handle_t child_exit_events() {
    throw std::system_error(ENOSYS, std::generic_category(), "mpservice: child-exit events exist only for the fork server");
}
void child_exit_events_drain(handle_t) noexcept {}
void child_exit_events_release(handle_t) noexcept {}

// ---------------------------------------------------------------- modules and code addresses

namespace {
/// The module holding `addr` and its base; false if none.
bool module_of(const void* addr, HMODULE& mod) noexcept {
    return GetModuleHandleExW(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS | GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
                              static_cast<LPCWSTR>(addr), &mod) != 0;
}

/// "" for the executable, the module's path otherwise (as the loader has it).
std::string module_name(HMODULE mod) {
    if (mod == GetModuleHandleW(nullptr)) return {};
    wchar_t path[MAX_PATH * 2];
    DWORD n = GetModuleFileNameW(mod, path, static_cast<DWORD>(sizeof path / sizeof path[0]));
    return narrow(path, static_cast<int>(n));
}

HMODULE module_named(const std::string& name) {
    if (name.empty()) return GetModuleHandleW(nullptr);
    HMODULE mods[1024];
    DWORD needed = 0;
    if (K32EnumProcessModules(GetCurrentProcess(), mods, sizeof mods, &needed)) {
        for (DWORD i = 0; i < needed / sizeof(HMODULE) && i < 1024; ++i)
            if (module_name(mods[i]) == name) return mods[i];
    }
    return nullptr;
}

const IMAGE_NT_HEADERS* nt_headers(HMODULE mod) noexcept {
    auto base = reinterpret_cast<const unsigned char*>(mod);
    auto dos = reinterpret_cast<const IMAGE_DOS_HEADER*>(base);
    return reinterpret_cast<const IMAGE_NT_HEADERS*>(base + dos->e_lfanew);
}

/// Whether the offset from the module's base lies in an executable section.
bool in_code(HMODULE mod, std::uintptr_t offset) noexcept {
    const IMAGE_NT_HEADERS* nt = nt_headers(mod);
    const IMAGE_SECTION_HEADER* sec = IMAGE_FIRST_SECTION(nt);
    for (unsigned i = 0; i < nt->FileHeader.NumberOfSections; ++i, ++sec)
        if ((sec->Characteristics & IMAGE_SCN_MEM_EXECUTE) && offset >= sec->VirtualAddress &&
            offset < sec->VirtualAddress + std::max(sec->Misc.VirtualSize, sec->SizeOfRawData))
            return true;
    return false;
}

/// module_of, and the address lies inside the module's image (Wine answers
/// for some addresses outside any image too).
bool image_of(const void* addr, HMODULE& mod) noexcept {
    if (!module_of(addr, mod)) return false;
    auto pc = reinterpret_cast<std::uintptr_t>(addr), base = reinterpret_cast<std::uintptr_t>(mod);
    return pc >= base && pc - base < nt_headers(mod)->OptionalHeader.SizeOfImage;
}

std::uint64_t module_hash(const std::string& name) noexcept {
    std::uint64_t h = 1469598103934665603ull;  // FNV-1a, as on POSIX
    for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
    return h ? h : 1;
}
}  // namespace

bool module_address(const void* addr, ModuleAddress& out) {
    HMODULE mod;
    if (!module_of(addr, mod)) return false;
    out.module = module_name(mod);
    out.offset = reinterpret_cast<std::uintptr_t>(addr) - reinterpret_cast<std::uintptr_t>(mod);
    return true;
}

const void* module_resolve(const ModuleAddress& where) {
    HMODULE mod = module_named(where.module);
    if (!mod && !where.module.empty()) mod = LoadLibraryW(widen(where.module).c_str());
    if (!mod) return nullptr;
    return reinterpret_cast<const unsigned char*>(mod) + where.offset;
}

std::string module_fingerprint(const std::string& module) {
    HMODULE mod = module_named(module);
    if (!mod) return "unknown";
    const IMAGE_NT_HEADERS* nt = nt_headers(mod);
    // The link time stamp, image size and checksum the linker wrote: the same
    // build has the same ones.
    return "pe:" + std::to_string(nt->FileHeader.TimeDateStamp) + ":" + std::to_string(nt->OptionalHeader.SizeOfImage) +
           ":" + std::to_string(nt->OptionalHeader.CheckSum) + ":" + std::to_string(nt->OptionalHeader.SizeOfCode);
}

CodeRef code_ref_of(const void* address) {
    HMODULE mod;
    if (!module_of(address, mod)) throw std::invalid_argument("mpservice: the address is not inside any loaded module");
    CodeRef ref;
    ref.module = module_hash(module_name(mod));
    ref.offset = reinterpret_cast<std::uintptr_t>(address) - reinterpret_cast<std::uintptr_t>(mod);
    return ref;
}

const void* code_ref_resolve(const CodeRef& ref) noexcept {
    if (ref.empty()) return nullptr;
    try {
        HMODULE found = nullptr;
        if (ref.module == module_hash(std::string())) {
            found = GetModuleHandleW(nullptr);
        } else {
            HMODULE mods[1024];
            DWORD needed = 0;
            if (K32EnumProcessModules(GetCurrentProcess(), mods, sizeof mods, &needed))
                for (DWORD i = 0; i < needed / sizeof(HMODULE) && i < 1024 && !found; ++i)
                    if (mods[i] != GetModuleHandleW(nullptr) && module_hash(module_name(mods[i])) == ref.module)
                        found = mods[i];
        }
        if (!found || !in_code(found, static_cast<std::uintptr_t>(ref.offset))) return nullptr;
        return reinterpret_cast<const unsigned char*>(found) + ref.offset;
    } catch (...) {
        return nullptr;
    }
}

// ---------------------------------------------------------------- CPUs

int affinity_cpu_count() noexcept {
    DWORD_PTR process = 0, system = 0;
    if (GetProcessAffinityMask(GetCurrentProcess(), &process, &system) && process) {
        int n = 0;
        for (DWORD_PTR m = process; m; m &= m - 1) ++n;
        return n;
    }
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return static_cast<int>(si.dwNumberOfProcessors);
}

double cgroup_cpu_quota() noexcept {
    // The job-object counterpart: a hard CPU rate cap on a job holding us.
    JOBOBJECT_CPU_RATE_CONTROL_INFORMATION info{};
    DWORD len = 0;
    if (!QueryInformationJobObject(nullptr, JobObjectCpuRateControlInformation, &info, sizeof info, &len)) return 0;
    if (!(info.ControlFlags & JOB_OBJECT_CPU_RATE_CONTROL_ENABLE) || !(info.ControlFlags & JOB_OBJECT_CPU_RATE_CONTROL_HARD_CAP))
        return 0;
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return static_cast<double>(info.CpuRate) / 10000.0 * si.dwNumberOfProcessors;
}

// ---------------------------------------------------------------- fork protection: nothing forks here

void at_fork_child(void (*)()) {}

namespace {
/// A thread's at_thread_exit functions, in a fiber-local slot whose callback
/// runs them (newest first) when the thread ends.  Not a thread_local object:
/// with MinGW's emulated TLS, those are destroyed after winpthreads freed
/// their storage.  The FLS callback runs later still (at ExitThread, after
/// winpthreads' key destructors), on the list, which is not TLS storage.
struct ThreadExitList {
    std::vector<std::pair<void (*)(void*), void*>> fns;
};
VOID NTAPI run_thread_exit(PVOID p) {
    auto* list = static_cast<ThreadExitList*>(p);
    if (!list) return;
    while (!list->fns.empty()) {
        auto f = list->fns.back();
        list->fns.pop_back();
        f.first(f.second);
    }
    delete list;
}
DWORD thread_exit_slot() {
    static const DWORD slot = FlsAlloc(&run_thread_exit);
    return slot;
}
}  // namespace

void at_thread_exit(void (*fn)(void*), void* arg) {
    // The initial thread: nothing at exit (whether Windows runs FLS callbacks
    // at process exit, when other threads were ended holding locks, is not
    // something to rely on); the process's end frees what the objects hold.
    if (is_main_thread()) return;
    const DWORD slot = thread_exit_slot();
    if (slot == FLS_OUT_OF_INDEXES) throw std::system_error(static_cast<int>(GetLastError()), std::system_category(), "mpservice: FlsAlloc");
    auto* list = static_cast<ThreadExitList*>(FlsGetValue(slot));
    if (!list) {
        auto fresh = std::make_unique<ThreadExitList>();
        if (!FlsSetValue(slot, fresh.get()))
            throw std::system_error(static_cast<int>(GetLastError()), std::system_category(), "mpservice: FlsSetValue");
        list = fresh.release();
    }
    list->fns.emplace_back(fn, arg);
}
void at_fork_protect(const ForkLock&) noexcept {}

void sleep_until(Deadline deadline) noexcept {
    for (;;) {
        DWORD ms = wait_ms(deadline);
        if (ms == 0) return;
        Sleep(ms == INFINITE ? INFINITE - 1 : ms);
    }
}

// ---------------------------------------------------------------- output forwarding

void output_pipe(handle_t& read_end, handle_t& write_end) {
    // A socket pair, not a pipe: the reactor's poll can watch only sockets.
    tcp_pair(read_end, write_end);
    u_long off = 0;
    ioctlsocket(as_socket(write_end), FIONBIO, &off);  // writers block, as on a pipe
}

long pipe_read(handle_t h, void* buf, std::size_t cap) noexcept {
    int n = recv(as_socket(h), static_cast<char*>(buf), static_cast<int>(std::min<std::size_t>(cap, 1 << 30)), 0);
    if (n >= 0) return n;
    return WSAGetLastError() == WSAEWOULDBLOCK ? -1 : 0;
}

void redirect_standard_output(handle_t out, handle_t err) {
    std::fflush(stdout);
    std::fflush(stderr);
    HANDLE o = nullptr, e = nullptr;
    DuplicateHandle(GetCurrentProcess(), as_handle(out), GetCurrentProcess(), &o, 0, TRUE, DUPLICATE_SAME_ACCESS);
    DuplicateHandle(GetCurrentProcess(), as_handle(err), GetCurrentProcess(), &e, 0, TRUE, DUPLICATE_SAME_ACCESS);
    if (!o || !e) throw_win32("mpservice: DuplicateHandle for standard output");
    SetStdHandle(STD_OUTPUT_HANDLE, o);
    SetStdHandle(STD_ERROR_HANDLE, e);
    int fo = _open_osfhandle(reinterpret_cast<intptr_t>(o), _O_BINARY);
    int fe = _open_osfhandle(reinterpret_cast<intptr_t>(e), _O_BINARY);
    if (fo < 0 || fe < 0 || _dup2(fo, 1) != 0 || _dup2(fe, 2) != 0)
        throw std::system_error(errno, std::generic_category(), "mpservice: _dup2");
    static char line_buffer[BUFSIZ];
    std::setvbuf(stdout, line_buffer, _IOLBF, sizeof line_buffer);
}

// ---------------------------------------------------------------- server process: loopback TCP

handle_t listener_create(std::string& address) {
    SOCKET s = new_tcp_socket();
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int len = sizeof addr;
    if (bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        getsockname(s, reinterpret_cast<sockaddr*>(&addr), &len) != 0 || listen(s, SOMAXCONN) != 0) {
        int e = WSAGetLastError();
        closesocket(s);
        throw_win32("mpservice: listener", static_cast<DWORD>(e));
    }
    address = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
    handle_t wake = wake_event_create();
    std::lock_guard<std::mutex> g(reg().mu);
    reg().listener_wakes[static_cast<handle_t>(s)] = wake;
    return static_cast<handle_t>(s);
}

namespace {
/// The wake event that ends a listener_accept on `listener`, made on first use
/// for a listener this process did not create: one received from the parent
/// (the server process's) has none in this process's registry, so its
/// shutdown woke nobody and the server ran on until it was terminated.
handle_t listener_wake(handle_t listener) noexcept {
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto it = reg().listener_wakes.find(listener);
        if (it != reg().listener_wakes.end()) return it->second;
    }
    handle_t made = invalid_handle;
    try {
        made = wake_event_create();
    } catch (...) {
        return invalid_handle;
    }
    handle_t existing = invalid_handle;
    {
        std::lock_guard<std::mutex> g(reg().mu);
        auto ins = reg().listener_wakes.emplace(listener, made);
        if (ins.second) return made;
        existing = ins.first->second;  // another thread made one meanwhile
    }
    close_handle(made);
    return existing;
}
}  // namespace

handle_t listener_accept(handle_t listener) {
    const handle_t wake = listener_wake(listener);
    for (;;) {
        WSAPOLLFD p[2] = {{as_socket(listener), POLLRDNORM, 0}, {as_socket(wake), POLLRDNORM, 0}};
        int rc = WSAPoll(p, wake >= 0 ? 2 : 1, -1);
        if (rc < 0) return invalid_handle;
        if (wake >= 0 && readable_revents(p[1].revents)) return invalid_handle;  // shut down
        if (!readable_revents(p[0].revents)) continue;
        SOCKET c = accept(as_socket(listener), nullptr, nullptr);
        if (c == INVALID_SOCKET) {
            if (WSAGetLastError() == WSAEWOULDBLOCK || WSAGetLastError() == WSAECONNRESET) continue;
            return invalid_handle;
        }
        SetHandleInformation(reinterpret_cast<HANDLE>(c), HANDLE_FLAG_INHERIT, 0);
        u_long off = 0;
        ioctlsocket(c, FIONBIO, &off);
        BOOL one = TRUE;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one), sizeof one);
        return static_cast<handle_t>(c);
    }
}

void listener_shutdown(handle_t listener) noexcept {
    const handle_t wake = listener_wake(listener);
    if (wake >= 0) wake_event_signal(wake);
}

handle_t unix_connect(const std::string& address) {
    auto colon = address.rfind(':');
    if (colon == std::string::npos) throw std::system_error(EINVAL, std::generic_category(), "mpservice: bad address");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<u_short>(std::atoi(address.c_str() + colon + 1)));
    SOCKET s = new_tcp_socket();
    if (connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        int e = WSAGetLastError();
        closesocket(s);
        throw_win32("mpservice: connect", static_cast<DWORD>(e));
    }
    BOOL one = TRUE;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one), sizeof one);
    return static_cast<handle_t>(s);
}

long peer_user(handle_t socket) noexcept {
    // Loopback TCP does not tell the peer's user (see README, platforms): any
    // local connection is taken as ours, and the server's own checks apply.
    return is_socket(socket) ? current_user() : -1;
}

long current_user() noexcept { return 0; }

void socket_shutdown(handle_t socket) noexcept {
    shutdown(as_socket(socket), SD_BOTH);
    // A thread of ours blocked in WSAPoll on it is not woken by that under
    // Wine (the server's connection threads stayed blocked, so it never
    // ended): its pending poll is cancelled, and its next recv sees the end.
    CancelIoEx(reinterpret_cast<HANDLE>(as_socket(socket)), nullptr);
}

void random_bytes(void* out, std::size_t n) {
    if (BCryptGenRandom(nullptr, static_cast<PUCHAR>(out), static_cast<ULONG>(n), BCRYPT_USE_SYSTEM_PREFERRED_RNG) != 0)
        throw std::system_error(EIO, std::generic_category(), "mpservice: BCryptGenRandom");
}

namespace {
/// This process's entries in the system's handle table (SystemHandleInformation):
/// what Wine gives where its GetProcessHandleCount answers 0 for every process.
long handle_table_count() noexcept {
    struct Entry {
        ULONG pid;
        UCHAR type, flags;
        USHORT value;
        void* object;
        ACCESS_MASK access;
    };
    struct Table {
        ULONG count;
        Entry entries[1];
    };
    constexpr auto system_handle_information = static_cast<SYSTEM_INFORMATION_CLASS>(16);
    constexpr NTSTATUS length_mismatch = static_cast<NTSTATUS>(0xC0000004L);
    try {
        std::vector<ULONG_PTR> buf(1 << 14);  // (pointer-aligned)
        for (int i = 0; i < 12; ++i) {
            ULONG got = 0;
            const auto bytes = static_cast<ULONG>(buf.size() * sizeof(ULONG_PTR));
            NTSTATUS st = NtQuerySystemInformation(system_handle_information, buf.data(), bytes, &got);
            if (st == length_mismatch) {
                buf.resize(buf.size() * 2);
                continue;
            }
            if (st != 0) return -1;
            const auto* table = reinterpret_cast<const Table*>(buf.data());
            const ULONG self = GetCurrentProcessId();
            long n = 0;
            for (ULONG k = 0; k < table->count; ++k)
                if (table->entries[k].pid == self) ++n;
            return n;
        }
    } catch (...) {
    }
    return -1;
}
}  // namespace

long open_handle_count() noexcept {
    DWORD n = 0;
    if (GetProcessHandleCount(GetCurrentProcess(), &n) && n > 0) return static_cast<long>(n);
    return handle_table_count();  // (a live process always has handles: 0 is no answer)
}

long mapping_count() noexcept {
    std::lock_guard<std::mutex> g(views().mu);
    return static_cast<long>(views().by_base.size());
}

std::string current_directory() {
    DWORD n = GetCurrentDirectoryW(0, nullptr);
    std::wstring w(n, L'\0');
    n = GetCurrentDirectoryW(n, &w[0]);
    return narrow(w.c_str(), static_cast<int>(n));
}

bool change_directory(const std::string& path) noexcept {
    return !path.empty() && SetCurrentDirectoryW(widen(path).c_str()) != 0;
}

std::vector<std::string> environment_entries() {
    std::vector<std::string> out;
    wchar_t* block = GetEnvironmentStringsW();
    if (!block) return out;
    for (const wchar_t* p = block; *p; p += wcslen(p) + 1)
        if (*p != L'=') out.push_back(narrow(p));  // "=C:=C:\..." entries are the shell's, not variables
    FreeEnvironmentStringsW(block);
    return out;
}

void replace_environment(const std::vector<std::string>& entries) {
    for (const std::string& e : environment_entries()) {
        auto eq = e.find('=');
        if (eq != std::string::npos) SetEnvironmentVariableW(widen(e.substr(0, eq)).c_str(), nullptr);
    }
    for (const std::string& e : entries) {
        auto eq = e.find('=');
        if (eq != std::string::npos && eq > 0)
            SetEnvironmentVariableW(widen(e.substr(0, eq)).c_str(), widen(e.substr(eq + 1)).c_str());
    }
}

// ---------------------------------------------------------------- remote exception / symbolization

namespace {
// Without a hook on the C++ runtime's throw (MinGW links it statically, so it
// cannot be interposed), the place a stack is recorded at is where the
// exception is sent or re-raised; these tables keep the re-raise sites.
constexpr int kSiteFrames = 48;
struct Site {
    const void* object = nullptr;
    int depth = 0;
    void* pcs[kSiteFrames];
};
thread_local Site t_raise_sites[4];
thread_local unsigned t_raise_next = 0;
std::atomic<bool> g_line_lookup{true};
}  // namespace

bool throw_hook_active() noexcept { return false; }
bool allocator_fork_safe() noexcept { return true; }  // no fork() here
void set_throw_site_capture(bool) noexcept {}
int throw_site_stack(const void*, const std::type_info*, void**, int) noexcept { return 0; }

int capture_stack(void** pcs, int max, int skip, const void* from) noexcept {
    void* buf[kSiteFrames + 16];
    int want = std::min(max + skip + 8, static_cast<int>(sizeof buf / sizeof buf[0]));
    int n = RtlCaptureStackBackTrace(0, static_cast<DWORD>(want), buf, nullptr);
    int first = std::min(n, skip + 1);  // +1: this function's own frame
    if (from)
        for (int i = 0; i < n; ++i)
            if (buf[i] == from) {
                first = i;
                break;
            }
    int count = std::max(0, std::min(n - first, max));
    // The walk runs past the thread's first frame into words that are no
    // return addresses: stop at the first one outside every module.
    HMODULE mod;
    for (int i = 0; i < count; ++i)
        if (!image_of(buf[first + i], mod)) count = i;
    std::copy(buf + first, buf + first + count, pcs);
    return count;
}

void note_raise_site(const void* object, const void* caller) noexcept {
    Site& s = t_raise_sites[t_raise_next++ % 4];
    s.object = object;
    s.depth = capture_stack(s.pcs, kSiteFrames, 1, caller);
}

int raise_site_stack(const void* object, void** pcs, int max) noexcept {
    for (const Site& s : t_raise_sites)
        if (object && s.object == object) {
            int n = std::min(s.depth, max);
            std::copy(s.pcs, s.pcs + n, pcs);
            return n;
        }
    return 0;
}

std::vector<StackFrame> symbolize(void* const* pcs, int n, bool (*)(const std::string&)) {
    // Module and offset for every frame.  MinGW writes DWARF, which the Win32
    // symbol engine (DbgHelp) does not read, and no PDB: function names and
    // lines are not shown here; addr2line on the offsets gives them offline.
    std::vector<StackFrame> out;
    for (int i = 0; i < n; ++i) {
        StackFrame f;
        f.pc = pcs[i];
        HMODULE mod;
        if (image_of(pcs[i], mod)) {
            wchar_t path[MAX_PATH * 2];
            DWORD len = GetModuleFileNameW(mod, path, static_cast<DWORD>(sizeof path / sizeof path[0]));
            f.module = narrow(path, static_cast<int>(len));
            f.offset = reinterpret_cast<std::uintptr_t>(pcs[i]) - reinterpret_cast<std::uintptr_t>(mod);
        }
        out.push_back(std::move(f));
    }
    return out;
}

void set_line_lookup(bool enabled) noexcept { g_line_lookup.store(enabled); }

std::string demangle(const char* mangled) {
    if (!mangled) return std::string();
#if defined(__GNUC__)
    int status = 0;
    char* out = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
    if (status != 0 || !out) return mangled;
    std::string s(out);
    std::free(out);
    return s;
#else
    return mangled;  // MSVC's type names are readable already
#endif
}

const std::type_info* current_exception_type() noexcept {
#if defined(__GNUC__)
    return abi::__cxa_current_exception_type();
#else
    return nullptr;
#endif
}

const void* exception_object(const std::exception_ptr& e) noexcept {
#if defined(__GNUC__)
    // libstdc++ fact (the Itanium C++ ABI, which MinGW's g++ follows): an
    // exception_ptr is one pointer, to the thrown object.
    static_assert(sizeof(std::exception_ptr) == sizeof(void*), "exception_ptr is not a single pointer here");
    const void* p = nullptr;
    std::memcpy(&p, static_cast<const void*>(&e), sizeof p);
    return p;
#else
    (void)e;
    return nullptr;
#endif
}

}  // namespace mpservice::detail::os

#endif  // _WIN32
// ---- end part: mpservice/impl/os_win32.cpp
// ---- begin part: mpservice/impl/codec.cpp -----------------------------------
// codec: the out-of-line part of the encoder (public/codec.hpp).
//
// In the platform part of the implementation: shared memory (shm.cpp) is the
// first user of handle attachment, and a program that encodes values without
// starting a process must not link the process part for it.

#include <cstdint>
#include <string>
#include <vector>

namespace mpservice {

std::uint32_t Encoder::attach(detail::os::handle_t h) {
    handles_.push_back(h);
    return static_cast<std::uint32_t>(handles_.size() - 1);
}

// ---- Decoder's failures

namespace detail {
void throw_duplicate_key(bool is_map) {
    throw DecodeError(std::string("decode: duplicate key in ") + (is_map ? "map" : "set"));
}
}  // namespace detail

void Decoder::throw_truncated(std::size_t n, const char* what) const {
    throw DecodeError(std::string("decode: truncated input: needed ") + std::to_string(n) + " " + what + ", " +
                      std::to_string(remaining()) + " left");
}

void Decoder::throw_bad_length(std::uint64_t n, std::size_t min_bytes_each, const char* what) const {
    if (min_bytes_each == 0)
        throw DecodeError(std::string("decode: ") + what + " length " + std::to_string(n) +
                          " of elements that take no bytes exceeds the limit of " +
                          std::to_string(max_empty_elements));
    throw DecodeError(std::string("decode: ") + what + " length " + std::to_string(n) + " cannot fit in the " +
                      std::to_string(remaining()) + " bytes left (each element takes at least " +
                      std::to_string(min_bytes_each) + ")");
}

void Decoder::throw_bad_handle(std::uint32_t index) const {
    if (!handles_)
        throw DecodeError(
            "decode: this value holds an OS handle (a Lock, Queue, Value, ...) but it arrived over a channel "
            "that carries no handles; pass such objects as Process arguments");
    throw DecodeError("decode: handle index " + std::to_string(index) + " out of range (" +
                      std::to_string(handles_->size()) + " handles arrived)");
}

void Decoder::throw_trailing(const char* what) const {
    throw DecodeError(std::string("decode: ") + std::to_string(remaining()) + " unexpected trailing bytes after " +
                      what);
}

}  // namespace mpservice
// ---- end part: mpservice/impl/codec.cpp
// ---- begin part: mpservice/impl/shm.cpp -------------------------------------
// shm: SharedMemory and its codec.

namespace mpservice::detail {

namespace shm_impl {
/// Mappings whose last handle is gone while a thread of this process held a
/// robust mutex inside (see SharedMemory::keep_mapped_while_held).
struct ParkedMapping {
    void* addr;
    std::size_t size;
    std::vector<os::RobustMutex*> mutexes;
};

bool any_held(const std::vector<os::RobustMutex*>& mutexes) noexcept {
    for (os::RobustMutex* m : mutexes)
        if (os::robust_mutex_held_in_this_process(m)) return true;
    return false;
}

class ParkedMappings {
public:
    /// Keeps the mapping; unmaps the parked ones whose mutexes are all free
    /// now (their holders ended, so the kernel has marked them, or released).
    void park(void* addr, std::size_t size, std::vector<os::RobustMutex*> mutexes) {
        std::lock_guard<std::mutex> g(guard_);
        parked_.push_back(ParkedMapping{addr, size, std::move(mutexes)});
    }
    void sweep() noexcept {
        std::lock_guard<std::mutex> g(guard_);
        for (std::size_t i = 0; i < parked_.size();) {
            if (any_held(parked_[i].mutexes)) {
                ++i;
                continue;
            }
            os::shm_unmap(parked_[i].addr, parked_[i].size);
            parked_[i] = std::move(parked_.back());
            parked_.pop_back();
        }
    }
    bool empty() noexcept {
        std::lock_guard<std::mutex> g(guard_);
        return parked_.empty();
    }

private:
    std::mutex guard_;
    std::vector<ParkedMapping> parked_;
};

/// Never destroyed: a mapping may be released during static destruction.
ParkedMappings& parked_mappings() {
    static ParkedMappings* p = new ParkedMappings();
    return *p;
}
}  // namespace shm_impl

/// The block mapped in this process, unmapped when its last SharedMemory here
/// is gone (or parked, while a thread here holds a robust mutex inside it).
struct SharedMemory::Mapping : SharedMemory::View {
    std::mutex guard;                       // for `mutexes`
    std::vector<os::RobustMutex*> mutexes;  // see keep_mapped_while_held
    Mapping() = default;
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    ~Mapping();
};

SharedMemory::Mapping::~Mapping() {
    os::close_handle(handle);  // the mapping, not the descriptor, keeps the memory
    if (!mutexes.empty() && shm_impl::any_held(mutexes)) {
        try {
            shm_impl::parked_mappings().park(addr, size, std::move(mutexes));
            return;
        } catch (...) {
            // Out of memory: unmapping is all that is left (the old behaviour).
        }
    }
    os::shm_unmap(addr, size);
    if (!mutexes.empty()) shm_impl::parked_mappings().sweep();
}

void SharedMemory::keep_mapped_while_held(os::RobustMutex* m) const {
    if (!m_) return;
    Mapping& mapping = *static_cast<Mapping*>(m_.get());  // every View here is a Mapping
    std::lock_guard<std::mutex> g(mapping.guard);
    for (os::RobustMutex* known : mapping.mutexes)
        if (known == m) return;
    mapping.mutexes.push_back(m);
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
#endif
#if MPSERVICE_PART_(2)
// ---- begin part: mpservice/impl/remote_exception.cpp ------------------------
// remote_exception: implementation.
//
// Wire form of one exception (a "record"), all through the codec:
//   u8   tag 0xE1 (format version 1)
//   str  type name (demangled), what(), process name;  i64 pid
//   str  traceback text (complete, causes first)
//   str  registry key (mangled name of the registered type that rebuilds it; "" = none)
//   str  that type's extra fields (bytes, so an unknown key can be skipped)
//   u8   cause marker: 0 none; 1 an earlier part of the story; 2 the nested
//        exception (std::throw_with_nested); 3 an earlier part whose nested
//        exception is also this one's - then the cause's record
#include <algorithm>
#include <cstdio>
#include <deque>
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
        return make_remote<E>(Make()(ec, info.message), std::move(info));
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
        return make_remote<ProcessError>(ProcessError(info.message, code), std::move(info));
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
        exception_type_of<ServerError>(),
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

/// The standard types' table, built at its first use (an exception encoded or
/// decoded): a program that never sends one - or links with --gc-sections and
/// never starts a process - does not carry the 32 types' codecs.
const std::vector<ExceptionType>& standard_table() {
    static const auto* t = new std::vector<ExceptionType>(standard_types());  // never destroyed
    return *t;
}

struct Registry {
    std::mutex mu;
    std::vector<ExceptionType> user;  // in registration order
    const std::vector<ExceptionType>& standard() const { return standard_table(); }
};

Registry& registry() {
    static Registry* r = [] {
        auto* p = new Registry;  // used by static initializers of other parts; never destroyed
        os::at_fork_protect(&p->mu, 20);
        return p;
    }();
    return *r;
}
[[maybe_unused]] const bool g_registry_fork_safe = (registry(), true);  // before any thread exists

const ExceptionType* find_entry_by_key(const std::string& key) {
    Registry& r = registry();
    {
        std::lock_guard<std::mutex> lock(r.mu);
        for (auto it = r.user.rbegin(); it != r.user.rend(); ++it)
            if (key == it->type->name()) return &*it;
    }
    for (const auto& t : r.standard())
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
    for (const auto& t : r.standard())
        if (*t.type == dynamic) return &t;
    for (const auto& t : r.standard())
        if (t.matches(e)) return &t;
    return nullptr;
}

}  // namespace

void register_exception_type(const ExceptionType& t) {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    r.user.push_back(t);
}

void prepare_exception_types_for_fork() { (void)standard_table(); }

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
    std::uint8_t cause_kind = 1;  // the wire's cause marker when `cause` is set
};

/// The user's type inside the standard library's wrapper for
/// std::throw_with_nested (libstdc++ std::_Nested_exception<T>, libc++
/// std::__nested<T>): remote_type() names T, as the user wrote it.
std::string without_nested_wrapper(const std::string& name) {
    static const char* const wrappers[] = {"std::_Nested_exception<", "std::__1::__nested<", "std::__nested<"};
    for (const char* w : wrappers) {
        std::size_t n = std::char_traits<char>::length(w);
        if (name.size() > n + 1 && name.compare(0, n, w) == 0 && name.back() == '>') {
            std::string inner = name.substr(n, name.size() - n - 1);
            while (!inner.empty() && inner.back() == ' ') inner.pop_back();
            return inner;
        }
    }
    return name;
}

/// The nested exception of a (decoded) exception, or null.
std::exception_ptr nested_of(const std::exception_ptr& p) {
    if (!p) return nullptr;
    try {
        std::rethrow_exception(p);
    } catch (const std::nested_exception& n) {
        return n.nested_ptr();
    } catch (...) {
    }
    return nullptr;
}

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
        r.type_name = r.remote ? r.remote->remote_type() : without_nested_wrapper(os::demangle(r.type->name()));
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

/// Whether a frame is the library calling a Process or Thread target.
bool is_target_runner(const std::string& function) {
    static const char* const runners[] = {"mpservice::detail::trampoline<", "mpservice::detail::call_and_store<",
                                          "mpservice::detail::ChildTaskOf<", "::call_and_store<",
                                          "::make_body<"};
    for (const char* r : runners)
        if (function.find(r) != std::string::npos) return true;
    return false;
}

/// Whether a frame is the standard library forwarding a call (std::apply,
/// std::invoke and their helpers, inlined between a runner and the target).
bool is_call_forwarding(const std::string& function) {
    static const char* const forwarders[] = {"std::__invoke", "std::invoke", "std::__apply_impl", "std::apply",
                                             "std::_Function_handler", "std::function<"};
    for (const char* f : forwarders)
        if (function.find(f) != std::string::npos && function.find("mpservice") == std::string::npos)
            return true;
    return false;
}

/// Whether a frame is the library's own code (or the standard library's
/// re-throw under it).
bool is_library_frame(const std::string& function) {
    return function.rfind("mpservice::", 0) == 0 || function.rfind("std::rethrow_exception", 0) == 0;
}

/// Above the user's code there may be the library's frames that raised the
/// exception again in this process (Process<R>::result_at, ...) or threw it
/// (Queue::get throwing Empty): the user's call is the place to show first.
/// A stack of library frames only is kept as it is.
bool trim_innermost_library_frames(std::vector<os::StackFrame>& frames) {
    std::size_t first_user = 0;
    // An unnamed frame counts as the library's only inside a run of library
    // frames (an inlined helper); alone it may be e.g. libstdc++ throwing.
    auto in_library_run = [&](std::size_t i) {
        if (is_library_frame(frames[i].function)) return true;
        return frames[i].function.empty() && i + 1 < frames.size() && is_library_frame(frames[i + 1].function);
    };
    while (first_user < frames.size() && in_library_run(first_user)) ++first_user;
    if (first_user == 0 || first_user == frames.size()) return false;
    frames.erase(frames.begin(), frames.begin() + static_cast<std::ptrdiff_t>(first_user));
    return true;
}

/// A traceback is about the user's code: below the frame that runs the
/// target there is only the library's child start-up (and main), so cut the
/// stack there, with the std::invoke plumbing just above it.  Returns whether
/// anything was cut.
bool trim_library_frames(std::vector<os::StackFrame>& frames) {
    bool cut = trim_innermost_library_frames(frames);
    std::size_t runner = 0;
    while (runner < frames.size() && !is_target_runner(frames[runner].function)) ++runner;
    if (runner == 0 || runner == frames.size()) return cut;  // not thrown under a target
    std::size_t keep = runner;
    while (keep > 1 && is_call_forwarding(frames[keep - 1].function)) --keep;
    frames.resize(keep);
    return true;
}

/// Whether nothing below a frame is shown: a target's runner (the trim cuts
/// there) or main (the listing stops there).
bool ends_shown_stack(const std::string& function) {
    return is_target_runner(function) || function == "main" || function.rfind("main.", 0) == 0;
}

/// "[name:pid] type: what" then the frames, innermost first, stopping at main.
std::string format_part(const std::string& type_name, const std::string& message, const char* where,
                        void* const* pcs, int n) {
    std::string s = "[" + process_name() + ":" + std::to_string(os::current_pid()) + "] " + type_name + ": " +
                    message + "\n";
    if (n == 0) return s + "  (no stack available)\n";
    s += std::string("  ") + where + " (innermost call first):\n";
    std::vector<os::StackFrame> frames = os::symbolize(pcs, n, ends_shown_stack);
    bool trimmed = trim_library_frames(frames);
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
    if (trimmed) s += "    (the library's own frames are left out)\n";
    return s;
}

Record make_record(const std::exception_ptr& p, bool being_handled, int depth);

// ---- throw sites kept across threads (the hook's table is per thread)

struct KeptSite {
    std::exception_ptr exception;  // keeps the object - and so its address - alive
    int depth = 0;
    void* pcs[kMaxFrames];
};
struct KeptSites {
    std::mutex mutex;
    std::deque<KeptSite> sites;
};
constexpr std::size_t kKeptSites = 16;
KeptSites& kept_sites() {
    static KeptSites* k = [] {
        auto* p = new KeptSites;  // never destroyed: threads may still use it at exit
        // A fork child that sends an exception another thread threw looks here
        // too: the lock must not be copied held by a thread the child lacks.
        os::at_fork_protect(&p->mutex, 21);
        return p;
    }();
    return *k;
}
[[maybe_unused]] const bool g_kept_sites_fork_safe = (kept_sites(), true);  // before any thread exists

int kept_throw_site(const void* object, void** pcs, int max) {
    KeptSites& k = kept_sites();
    std::lock_guard<std::mutex> lk(k.mutex);
    for (auto it = k.sites.rbegin(); it != k.sites.rend(); ++it) {
        if (os::exception_object(it->exception) != object) continue;
        int n = std::min(it->depth, max);
        std::copy(it->pcs, it->pcs + n, pcs);
        return n;
    }
    return 0;
}

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
        if (old.cause && depth < kMaxCauseDepth) {
            rec.cause = std::make_unique<Record>(make_record(old.cause, false, depth + 1));
            rec.cause_kind = old.cause_kind ? old.cause_kind : 1;
        }
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
        if (depth < kMaxCauseDepth) {
            rec.cause = std::make_unique<Record>(make_record(p, false, depth + 1));
            rec.cause_kind = x.nested ? 3 : 1;  // its nested exception stays reachable
        }
    } else {
        n = os::throw_site_stack(object, x.type, pcs, kMaxFrames);
        if (n == 0) n = kept_throw_site(object, pcs, kMaxFrames);  // thrown by another thread
        where = "thrown at";
        if (x.nested && depth < kMaxCauseDepth) {
            rec.cause = std::make_unique<Record>(make_record(x.nested, false, depth + 1));
            rec.cause_kind = 2;
        }
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
    out.write(static_cast<std::uint8_t>(rec.cause ? rec.cause_kind : 0));
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
    if (has_cause > 3) throw DecodeError("decode: bad exception cause marker");
    info.cause_kind = has_cause;
    if (has_cause) info.cause = read_record(in, depth + 1);
    if (has_cause == 2) info.nested = info.cause;
    if (has_cause == 3) info.nested = nested_of(info.cause);

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
    return make_remote<Error>(std::move(base), std::move(info));
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

void keep_throw_site(const std::exception_ptr& e) noexcept {
    if (!e) return;
    try {
        KeptSite site;
        site.depth = os::throw_site_stack(os::exception_object(e), nullptr, site.pcs, kMaxFrames);
        if (site.depth == 0) return;
        site.exception = e;
        KeptSites& k = kept_sites();
        std::lock_guard<std::mutex> lk(k.mutex);
        k.sites.push_back(std::move(site));
        if (k.sites.size() > kKeptSites) k.sites.pop_front();
    } catch (...) {
        // Out of memory: the traceback will show the sending stack instead.
    }
}

}  // namespace mpservice::detail

namespace mpservice {
// (noinline is on the declarations: the definitions come after the Remote<E> that use them.)
RemoteError::~RemoteError() = default;
RemoteError::RemoteError(detail::RemoteInfo info) : info_(std::move(info)) {}
RemoteError::RemoteError(const RemoteError&) = default;
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
#endif
#if MPSERVICE_PART_(3)
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

// The logging locks exist, and are fork locks, from before main() (before any
// thread can hold them); the state they guard is built at its first use, so a
// program that never logs (linked with --gc-sections) does not carry the
// formatter.  The outermost locks of the library (a handler may call
// anything), so they are taken first at a fork.
std::recursive_mutex& log_mutex() {
    static auto* m = new std::recursive_mutex;  // never destroyed: used by exiting threads
    return *m;
}
std::mutex& log_forward_mutex() {
    static auto* m = new std::mutex;
    return *m;
}
[[maybe_unused]] const bool g_logging_fork_safe =
    (detail::os::at_fork_protect(&log_mutex(), 10), detail::os::at_fork_protect(&log_forward_mutex(), 11), true);

struct LogState {
    // Parent side (and a process without a parent).
    std::atomic<int> global_level{static_cast<int>(Level::info)};
    std::atomic<bool> has_overrides{false};
    std::recursive_mutex& mu = log_mutex();  // guards everything below, and serializes handlers
    std::map<std::string, Level> levels;  // per-logger overrides
    std::vector<Token> format = parse_format(kDefaultFormat);
    LogHandler handler;

    // Child side.
    std::mutex& forward_mu = log_forward_mutex();
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
    if (s.forwarding.load(std::memory_order_acquire)) {
        // A record of one of our own children, and we are a child too: it goes
        // up, as it is (its process name and pid stay the originator's), to be
        // filtered, formatted and handled by the top parent alone.
        std::shared_ptr<const std::function<void(const LogRecord&)>> forward;
        {
            std::lock_guard<std::mutex> lock(s.forward_mu);
            forward = s.forward;
        }
        if (forward) {
            (*forward)(record);
            return;
        }
    }
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
    // In a child, the threshold that counts is the top parent's (handed down
    // to us), so that our children send what the top parent wants.
    if (s.forwarding.load(std::memory_order_acquire))
        return static_cast<Level>(s.parent_level.load(std::memory_order_relaxed));
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    int lowest = s.global_level.load(std::memory_order_relaxed);
    for (const auto& [name, level] : s.levels) lowest = std::min(lowest, static_cast<int>(level));
    return static_cast<Level>(lowest);
}

void set_log_level_from_parent(Level level) {
    state().parent_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

}  // namespace detail
// Out of line: LogRecord::serialize is instantiated here, not in every includer.
void Codec<LogRecord>::encode(Encoder& e, const LogRecord& r) { const_cast<LogRecord&>(r).serialize(e); }

LogRecord Codec<LogRecord>::decode(Decoder& d) {
    LogRecord r;
    r.serialize(d);
    return r;
}

}  // namespace mpservice
// ---- end part: mpservice/impl/logging.cpp
// ---- begin part: mpservice/impl/threading.cpp -------------------------------
// threading: implementation - the future core shared by Process and Thread,
// wait() and as_completed().
#include <algorithm>
#include <deque>

namespace mpservice {
namespace detail {

/// Cores that have resolved, in the order they did (wait, as_completed).
class CompletionQueue {
public:
    void push(const FutureCore* core);
    /// The next resolved core, or nullptr if `deadline` passes first.
    const FutureCore* pop_until(os::Deadline deadline);

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    std::deque<const FutureCore*> ready_;
};

struct FutureCore::Listeners {
    std::vector<std::weak_ptr<CompletionQueue>> queues;
    std::vector<Owned<Task>> hooks;
};

FutureCore::FutureCore() = default;
FutureCore::~FutureCore() = default;

void FutureCore::mark_started() {
    std::lock_guard<std::mutex> lk(mutex_);
    started_ = true;
}

bool FutureCore::started() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return started_;
}

bool FutureCore::done() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return done_;
}

void FutureCore::resolve(std::exception_ptr error, std::exception_ptr result_error) {
    Owned<Listeners> listeners;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        if (done_) return;
        done_ = true;
        done_flag_.store(true, std::memory_order_release);
        error_ = std::move(error);
        result_error_ = std::move(result_error);
        listeners = std::move(listeners_);
        cv_.notify_all();
    }
    // Outside our lock: subscribe() takes ours, then the queue's.
    if (!listeners) return;
    for (auto& w : listeners->queues)
        if (auto q = w.lock()) q->push(this);
    for (auto& h : listeners->hooks) h->run();
}

void FutureCore::on_resolve(Owned<Task> hook) {
    {
        std::lock_guard<std::mutex> lk(mutex_);
        if (!done_) {
            if (!listeners_) listeners_ = Owned<Listeners>(new Listeners);
            listeners_->hooks.push_back(std::move(hook));
            return;
        }
    }
    hook->run();
}

bool FutureCore::wait_until(os::Deadline deadline) const {
    std::unique_lock<std::mutex> lk(mutex_);
    if (deadline == os::no_deadline) {
        cv_.wait(lk, [&] { return done_; });
        return true;
    }
    return cv_.wait_until(lk, deadline, [&] { return done_; });
}

std::exception_ptr FutureCore::error() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return error_;
}

std::exception_ptr FutureCore::result_error() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return result_error_;
}

void FutureCore::subscribe(const std::shared_ptr<CompletionQueue>& q) {
    std::lock_guard<std::mutex> lk(mutex_);
    if (done_) {
        q->push(this);
        return;
    }
    if (!listeners_) listeners_ = Owned<Listeners>(new Listeners);
    // Drop queues of finished waits so a long-lived worker's list stays short.
    auto& queues = listeners_->queues;
    queues.erase(std::remove_if(queues.begin(), queues.end(),
                                [](const std::weak_ptr<CompletionQueue>& w) { return w.expired(); }),
                 queues.end());
    queues.push_back(q);
}

void CompletionQueue::push(const FutureCore* core) {
    std::lock_guard<std::mutex> lk(mutex_);
    ready_.push_back(core);
    cv_.notify_all();
}

const FutureCore* CompletionQueue::pop_until(os::Deadline deadline) {
    std::unique_lock<std::mutex> lk(mutex_);
    auto ready = [&] { return !ready_.empty(); };
    if (deadline == os::no_deadline) cv_.wait(lk, ready);
    else if (!cv_.wait_until(lk, deadline, ready)) return nullptr;
    const FutureCore* c = ready_.front();
    ready_.pop_front();
    return c;
}

void throw_not_started(const std::string& what, const std::string& name) {
    throw InvalidStateError("mpservice: " + what + "() on '" + name + "', which was never started; call start() first");
}

void throw_timeout(const std::string& name) {
    throw TimeoutError("mpservice: '" + name + "' is still running after the timeout");
}

void throw_result_taken(const std::string& name) {
    throw InvalidStateError("mpservice: the result of '" + name +
                            "' was moved out by take_result() (or std::move(worker).result()); it is gone");
}

Shared<std::atomic<bool>> make_stop_flag() { return std::make_shared<std::atomic<bool>>(false); }

std::string next_thread_name() {
    static std::atomic<int> counter{1};
    return "Thread-" + std::to_string(counter.fetch_add(1));
}

namespace {
void check_started(const WorkerList& workers) {
    for (Worker* w : workers) {
        if (!w) throw std::invalid_argument("mpservice: null worker given to wait/as_completed");
        if (!w->core().started())
            throw InvalidStateError("mpservice: '" + w->name() + "' was never started; wait() and as_completed() "
                                    "take started workers only");
    }
}

}  // namespace

namespace {
/// Blocks until `return_when` holds for `workers` or `deadline` passes.
void wait_for(const WorkerList& workers, os::Deadline deadline, ReturnWhen return_when) {
    check_started(workers);
    auto queue = std::make_shared<CompletionQueue>();
    for (Worker* w : workers) const_cast<FutureCore&>(w->core()).subscribe(queue);
    std::size_t finished = 0;
    // The same worker may be listed twice: count distinct cores.
    std::vector<const FutureCore*> distinct;
    for (Worker* w : workers)
        if (std::find(distinct.begin(), distinct.end(), &w->core()) == distinct.end()) distinct.push_back(&w->core());
    while (finished < distinct.size()) {
        const FutureCore* c = queue->pop_until(deadline);
        if (!c) break;
        ++finished;
        if (return_when == ReturnWhen::first_completed) break;
        if (return_when == ReturnWhen::first_exception && c->error()) break;
    }
}
}  // namespace

std::pair<WorkerList, WorkerList> wait_until(const WorkerList& workers, os::Deadline deadline, ReturnWhen return_when) {
    wait_for(workers, deadline, return_when);
    std::pair<WorkerList, WorkerList> out;
    for (Worker* w : workers) (w->done() ? out.first : out.second).push_back(w);
    return out;
}

WorkerList wait_until_split(const WorkerList& workers, os::Deadline deadline, ReturnWhen return_when,
                            std::size_t& done_count) {
    wait_for(workers, deadline, return_when);
    WorkerList split = workers;
    auto first_running = std::stable_partition(split.begin(), split.end(), [](Worker* w) { return w->done(); });
    done_count = static_cast<std::size_t>(first_running - split.begin());
    return split;
}

}  // namespace detail

std::pair<WorkerList, WorkerList> wait(const WorkerList& workers, ReturnWhen return_when) {
    return detail::wait_until(workers, detail::os::no_deadline, return_when);
}

AsCompleted as_completed(const WorkerList& workers) { return AsCompleted(workers, detail::os::no_deadline); }

struct AsCompleted::State {
    std::shared_ptr<detail::CompletionQueue> queue = std::make_shared<detail::CompletionQueue>();
    WorkerList workers;
    std::vector<std::size_t> pending;  // positions in workers, one per distinct worker
    detail::os::Deadline deadline;
};

AsCompleted::AsCompleted(const WorkerList& workers, detail::os::Deadline deadline) : state_(new State) {
    State& s = *state_;
    s.workers = workers;
    s.deadline = deadline;
    detail::check_started(s.workers);
    for (std::size_t i = 0; i < s.workers.size(); ++i)
        if (std::find(s.workers.begin(), s.workers.begin() + static_cast<std::ptrdiff_t>(i), s.workers[i]) ==
            s.workers.begin() + static_cast<std::ptrdiff_t>(i))
            s.pending.push_back(i);
    for (std::size_t i : s.pending) const_cast<detail::FutureCore&>(s.workers[i]->core()).subscribe(s.queue);
}

AsCompleted::~AsCompleted() = default;
AsCompleted& AsCompleted::operator=(AsCompleted&&) noexcept = default;

Completed AsCompleted::next_completed() {
    if (!state_) return Completed{};  // moved from
    State& s = *state_;
    while (!s.pending.empty()) {
        const detail::FutureCore* c = s.queue->pop_until(s.deadline);
        if (!c) {
            throw TimeoutError("mpservice: as_completed: " + std::to_string(s.pending.size()) +
                               " worker(s) still running after the timeout");
        }
        auto it = std::find_if(s.pending.begin(), s.pending.end(),
                               [&](std::size_t i) { return &s.workers[i]->core() == c; });
        if (it == s.pending.end()) continue;
        Completed done{s.workers[*it], *it};
        s.pending.erase(it);
        return done;
    }
    return Completed{};
}

}  // namespace mpservice
// ---- end part: mpservice/impl/threading.cpp
#endif
#if MPSERVICE_PART_(4)
// ---- begin part: mpservice/impl/synchronize.cpp -----------------------------
// synchronize: Lock, RLock, Condition, Semaphore, Event, Barrier.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <string>

// Helpers live in detail::sync_impl: every implementation part shares one
// translation unit, so file-local names must not collide with other parts'.
namespace mpservice::detail {

// ---------------------------------------------------------------- thread identity

namespace sync_impl {
// fork() copies the forking thread's cache into the child's only thread, which
// is a different thread: it must not look like the parent's owner of a lock.
void drop_pending_wakes() noexcept;
void forget_thread_token() {
    t_thread_token = 0;
    drop_pending_wakes();
}

std::uint64_t mix64(std::uint64_t x) noexcept {  // splitmix64 finalizer
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

bool expired(os::Deadline deadline) noexcept {
    return deadline != os::no_deadline && os::Clock::now() >= deadline;
}
}  // namespace sync_impl

std::uint64_t new_thread_token() noexcept {
    using namespace sync_impl;
    static const bool fork_hook = [] {
        try {
            os::at_fork_child(&forget_thread_token);
        } catch (...) {
            // Without the hook a forked child could pass for its parent's thread; that
            // needs pthread_atfork to fail (ENOMEM), which leaves bigger problems.
        }
        return true;
    }();
    (void)fork_hook;
    static std::atomic<std::uint64_t> counter{0};
    // The tid is unique among live threads, the time and counter make the token
    // differ from the one of any earlier thread that had the same tid.
    std::uint64_t t = mix64(static_cast<std::uint64_t>(os::current_tid()) ^
                            (static_cast<std::uint64_t>(os::current_pid()) << 32));
    t = mix64(t ^ static_cast<std::uint64_t>(os::Clock::now().time_since_epoch().count()));
    t = mix64(t ^ counter.fetch_add(1, std::memory_order_relaxed));
    return t ? t : 1;
}

// ---------------------------------------------------------------- deferred Condition wakes

namespace sync_impl {
/// Wakes the sleepers of a Condition, if it has any.
void wake_sleepers(ConditionState* cs, int n) noexcept {
    // Pairs with the waiter's sleepers increment before its last look at the
    // counter: either it saw the bump, or we see it sleeping.  A sleeper that
    // left meanwhile (spurious or periodic wake-up) saw the bump on its way out.
    if (cs->sleepers.load(std::memory_order_seq_cst) != 0) {
        os::futex_wake(&cs->sequence, n);
        t_woke_a_sleeper = true;
    }
}

/// The wakes the calling thread owes: Conditions it notified under a lock it
/// still holds.  The lock's release makes them (see condition_notify).
class PendingWakes {
public:
    /// Records n wakes of `c` for the release of `lock`; false if there is no
    /// room (the caller then wakes at once).  Allocates nothing.
    bool add(LockState* lock, const SharedRef<ConditionState>& c, int n) noexcept {
        for (int i = 0; i < size_; ++i) {
            Entry& e = entries_[i];
            if (e.lock == lock && e.condition.get() == c.get()) {
                e.count = e.count > INT_MAX - n ? INT_MAX : e.count + n;
                return true;
            }
        }
        if (size_ == capacity) return false;
        entries_[size_++] = Entry{lock, c, n};
        return true;
    }
    /// Makes the wakes recorded for `lock` (just released).
    void flush(const LockState* lock) noexcept {
        for (int i = 0; i < size_;) {
            Entry& e = entries_[i];
            if (e.lock != lock) {
                ++i;
                continue;
            }
            wake_sleepers(e.condition.get(), e.count);
            if (i != --size_) e = std::move(entries_[size_]);
            entries_[size_] = Entry{};
        }
    }
    /// Forgets everything (a forked child: the wakes are its parent's to make).
    void drop() noexcept {
        for (int i = 0; i < size_; ++i) entries_[i] = Entry{};
        size_ = 0;
    }
    /// A thread that ends holding the lock wakes the sleepers now: the lock
    /// passes to the next acquirer as a dead owner's, which the sleepers can
    /// then take and learn about.
    /// (At thread exit, after the thread's thread_local storage is gone on
    /// some platforms: only the futex wake of wake_sleepers, not its note.)
    ~PendingWakes() {
        for (int i = 0; i < size_; ++i) {
            ConditionState* cs = entries_[i].condition.get();
            if (cs->sleepers.load(std::memory_order_seq_cst) != 0) os::futex_wake(&cs->sequence, entries_[i].count);
        }
    }

private:
    /// A thread rarely holds more than one notified Condition's lock at a time.
    static constexpr int capacity = 4;
    struct Entry {
        LockState* lock = nullptr;
        SharedRef<ConditionState> condition;  // keeps the futex word mapped until the wake
        int count = 0;
    };
    Entry entries_[capacity];
    int size_ = 0;
};

/// The calling thread's (os::thread_object, not thread_local: its destructor
/// must run on live storage, see there).
PendingWakes& pending_wakes() { return os::thread_object<PendingWakes>(); }
void drop_pending_wakes() noexcept {
    try {
        pending_wakes().drop();
    } catch (...) {  // none made: nothing to drop
    }
}
}  // namespace sync_impl

// ---------------------------------------------------------------- Lock and RLock

namespace sync_impl {
const char* lock_name(const LockRef& l) { return l.recursive ? "mpservice::RLock" : "mpservice::Lock"; }

LockStatus took(LockState* s, os::LockResult r, std::uint64_t me) {
    switch (r) {
        case os::LockResult::acquired:
            s->owner.store(me, std::memory_order_relaxed);
            s->depth.store(1, std::memory_order_relaxed);
            return LockStatus::acquired;
        case os::LockResult::owner_died:
            s->owner.store(me, std::memory_order_relaxed);
            s->depth.store(1, std::memory_order_relaxed);
            // Only the repair: a wake the dead holder still owed was in its own
            // memory; the sleepers recheck by themselves (condition_wait).
            s->release_work.store(release_repair, std::memory_order_relaxed);
            return LockStatus::owner_died;
        default:
            return LockStatus::timed_out;
    }
}

void require_owner(const LockRef& l, const char* operation) {
    if (!lock_is_mine(l))
        throw InvalidStateError(std::string(lock_name(l)) + "::" + operation +
                                ": the calling thread does not hold the lock");
}

/// Releases every level of the lock; returns the depth to restore.
std::uint32_t release_all(const LockRef& l) {
    std::uint32_t depth = l.state->depth.load(std::memory_order_relaxed);
    l.state->depth.store(1, std::memory_order_relaxed);
    lock_release(l);
    return depth;
}

/// Waits for a lock that someone else holds.
///
/// Spinning pays only when it replaces a sleep, and only when it does not slow
/// the holder.  When two threads take the lock in a stream (release, re-take),
/// a spinner that looks at the lock at every pause pulls its line away from the
/// holder at each re-take and grabs it at each release, so every acquisition
/// becomes a cross-CPU hand-off (3-4x slower than letting the holder re-take
/// it, measured).  So:
///   - the spin looks at doubling intervals (Looks::backing_off): between looks
///     the holder runs at its uncontended speed; a look that finds the lock
///     free tries it, and a lost try (the holder re-took it) spins on;
///   - no spin while a thread sleeps in the kernel for the lock (the mutex
///     word's waiters bit): the sleepers are first in line - we join them, as
///     the robust pthread mutex itself does for every waiter.
LockStatus lock_contended(LockState* s, std::uint64_t me, os::Deadline deadline) {
    os::LockResult r = os::LockResult::busy;
    if (!os::robust_mutex_has_sleepers(&s->mutex)) {
        auto free_and_taken = [&] {
            if (s->owner.load(std::memory_order_relaxed) != 0) return false;
            r = os::robust_mutex_trylock(&s->mutex);
            return r != os::LockResult::busy;
        };
        spin_until(free_and_taken, s->spin_ns, lock_spin, deadline);
    }
    if (r == os::LockResult::busy) r = os::robust_mutex_lock_blocking(&s->mutex, deadline);
    return took(s, r, me);
}

/// Takes the lock again after release_all, with no deadline (as Python does).
LockStatus reacquire(const LockRef& l, std::uint32_t depth) {
    LockState* s = l.state.get();
    const std::uint64_t me = this_thread_token();
    os::LockResult first = os::robust_mutex_trylock(&s->mutex);
    LockStatus r = first == os::LockResult::busy ? lock_contended(s, me, os::no_deadline) : took(s, first, me);
    s->depth.store(depth, std::memory_order_relaxed);
    return r;
}
}  // namespace sync_impl

LockStatus lock_acquire_slow(const LockRef& l, os::Deadline deadline) {
    using namespace sync_impl;
    LockState* s = l.state.get();
    const std::uint64_t me = this_thread_token();
    if (s->owner.load(std::memory_order_relaxed) == me) {
        if (!l.recursive) {
            // Only a wait without end is a certain deadlock.  A bounded one gives
            // up at its deadline, as Python's acquire(timeout) does: nobody else
            // can release the lock meanwhile, so sleeping out the timeout is exact.
            if (deadline == os::no_deadline)
                throw InvalidStateError(
                    "mpservice::Lock::acquire: the calling thread already holds this lock; a Lock is not "
                    "re-entrant (use an RLock), and waiting for it would wait forever");
            os::sleep_until(deadline);
            return LockStatus::timed_out;
        }
        s->depth.store(s->depth.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
        return LockStatus::acquired;
    }
    os::LockResult first = os::robust_mutex_trylock(&s->mutex);
    if (first != os::LockResult::busy || expired(deadline)) return took(s, first, me);
    return lock_contended(s, me, deadline);
}

LockStatus lock_acquire_after_try(const LockRef& l, os::Deadline deadline, int status) {
    using namespace sync_impl;
    LockState* s = l.state.get();
    const std::uint64_t me = this_thread_token();
    os::LockResult first = os::robust_mutex_trylock_result(status);
    // A try that gives up asks the full trylock, which judges the holder (the
    // status path may not have): a holder that died is owner_died, not busy.
    if (first == os::LockResult::busy && expired(deadline)) first = os::robust_mutex_trylock(&s->mutex);
    if (first != os::LockResult::busy || expired(deadline)) return took(s, first, me);
    return lock_contended(s, me, deadline);
}

void lock_release_slow(const LockRef& l) {
    using namespace sync_impl;
    LockState* s = l.state.get();
    require_owner(l, "release");
    if (l.recursive) {
        std::uint32_t depth = s->depth.load(std::memory_order_relaxed);
        if (depth > 1) {
            s->depth.store(depth - 1, std::memory_order_relaxed);
            return;
        }
    }
    const std::uint16_t work = s->release_work.load(std::memory_order_relaxed);
    s->depth.store(0, std::memory_order_relaxed);
    s->owner.store(0, std::memory_order_relaxed);
    if (work) s->release_work.store(0, std::memory_order_relaxed);
    // Released without make_consistent(): the holder has seen the owner-died
    // report and chose to go on.  Marking the mutex consistent keeps it usable;
    // unlocking an inconsistent robust mutex would make it unusable for good.
    if (work & release_repair) os::robust_mutex_consistent(&s->mutex);
    os::robust_mutex_unlock(&s->mutex);
    // After the unlock: the woken waiters' first move is to take the lock.
    if (work & release_wake) pending_wakes().flush(s);
}

void lock_make_consistent(const LockRef& l) {
    using namespace sync_impl;
    LockState* s = l.state.get();
    require_owner(l, "make_consistent");
    const std::uint16_t work = s->release_work.load(std::memory_order_relaxed);
    if (work & release_repair) {
        s->release_work.store(work & ~release_repair, std::memory_order_relaxed);
        os::robust_mutex_consistent(&s->mutex);
    }
}

void throw_owner_died(const LockRef& l) {
    throw OwnerDiedError(std::string(sync_impl::lock_name(l)) +
                         ": the process that held this lock died while holding it. The calling "
                         "thread now holds the lock: repair the state it protects and call "
                         "make_consistent(), or release() it");
}

// ---------------------------------------------------------------- Condition

namespace sync_impl {
/// Sleeps (after a spin) until the notification counter differs from `seen`
/// or the deadline passes; false on the deadline.  Never longer than the
/// recheck period at a time: a notifier that died before releasing the lock
/// bumped the counter but will not wake us.
bool await_notify(ConditionState* cs, std::uint32_t seen, os::Deadline deadline) {
    auto bumped = [&] { return cs->sequence.load(std::memory_order_acquire) != seen; };
    const bool partner_waking = partner_is_waking();
    if (expired(deadline)) return bumped();
    if (spin_for_answer(partner_waking, bumped, cs->spin_ns, cs->after_wake_spin_ns, deadline)) return true;
    for (;;) {
        if (bumped()) return true;
        const auto step = os::sleep_slice_end(
            deadline, std::chrono::milliseconds(condition_recheck_ms.load(std::memory_order_relaxed)));
        if (!os::futex_wait(&cs->sequence, seen, step) && step == deadline) return bumped();
    }
}
}  // namespace sync_impl

bool condition_wait(const SharedRef<ConditionState>& c, const LockRef& l, os::Deadline deadline) {
    using namespace sync_impl;
    if (!lock_is_mine(l))
        throw InvalidStateError("mpservice::Condition::wait: the calling thread must hold the condition's lock");
    ConditionState* cs = c.get();
    // Registered under the lock: a notify, which needs the lock too, either
    // comes before (and is not ours) or sees us among the waiters.
    const std::uint32_t entry = cs->sequence.load(std::memory_order_relaxed);
    cs->sleepers.fetch_add(1, std::memory_order_seq_cst);
    std::uint32_t seen = entry;
    for (;;) {
        const std::uint32_t depth = release_all(l);
        await_notify(cs, seen, deadline);
        const LockStatus taken = reacquire(l, depth);
        // Decided under the lock.  A token is ours if a notify came after we began
        // to wait (the counter moved since `entry`); any such token will do, since
        // every token stands for one waiter of its notify, and all of its waiters
        // that remain are eligible.  A waiter that times out while a token is there
        // takes it: it was notified before it gave up.
        const bool eligible = cs->sequence.load(std::memory_order_relaxed) != entry;
        const std::uint32_t tokens = cs->tokens.load(std::memory_order_relaxed);
        const bool notified = eligible && tokens > 0;
        if (notified || expired(deadline) || taken == LockStatus::owner_died) {
            if (notified) cs->tokens.store(tokens - 1, std::memory_order_relaxed);
            cs->sleepers.fetch_sub(1, std::memory_order_relaxed);
            if (taken == LockStatus::owner_died) condition_lock_owner_died(c, l);
            return notified;
        }
        // Woken (or a periodic recheck) but the tokens went to other waiters: wait
        // for the next notify, still registered.
        seen = cs->sequence.load(std::memory_order_relaxed);
    }
}

void condition_notify(const SharedRef<ConditionState>& c, const LockRef& l, int n) {
    using namespace sync_impl;
    if (!lock_is_mine(l))
        throw InvalidStateError("mpservice::Condition::notify: the calling thread must hold the condition's lock");
    if (n <= 0) return;
    ConditionState* cs = c.get();
    // Waiters not yet notified.  A waiter that died while waiting stays counted
    // and may be handed a token; its token goes to whichever live waiter wakes
    // first, and the count stays exact for the rest, so a dead waiter costs a
    // live one nothing.
    const std::uint32_t waiters = cs->sleepers.load(std::memory_order_relaxed);
    const std::uint32_t tokens = cs->tokens.load(std::memory_order_relaxed);
    if (waiters <= tokens) return;  // nobody left to notify
    const std::uint32_t k = std::min<std::uint32_t>(static_cast<std::uint32_t>(n), waiters - tokens);
    cs->tokens.store(tokens + k, std::memory_order_relaxed);
    cs->sequence.fetch_add(1, std::memory_order_seq_cst);
    // The wake waits for the lock's release: a sleeper woken now would find
    // the lock held and only go to sleep again, on the lock.
    LockState* ls = l.state.get();
    if (pending_wakes().add(ls, c, static_cast<int>(k))) {
        ls->release_work.fetch_or(release_wake, std::memory_order_relaxed);
        return;
    }
    os::futex_wake(&cs->sequence, static_cast<int>(k));
    t_woke_a_sleeper = true;
}

void condition_lock_owner_died(const SharedRef<ConditionState>& c, const LockRef& l) {
    // Sleepers whose notify came before the death find the counter bumped;
    // the others go back to sleep.
    sync_impl::wake_sleepers(c.get(), INT_MAX);
    throw_owner_died(l);
}

// ---------------------------------------------------------------- Semaphore

namespace sync_impl {
bool semaphore_take(SemaphoreState* s) noexcept {
    std::uint32_t v = s->value.load(std::memory_order_seq_cst);
    while (v > 0)
        if (s->value.compare_exchange_weak(v, v - 1, std::memory_order_acquire, std::memory_order_relaxed))
            return true;
    return false;
}

/// A release wakes as many sleepers as it adds tokens.  A woken sleeper that
/// is stopped (SIGSTOP, a debugger) or killed before it takes its token
/// keeps that wake-up from the others, who would sleep on although a token is
/// free.  So nobody sleeps longer than this at a time before looking again.
constexpr auto semaphore_recheck = std::chrono::milliseconds(200);
}  // namespace sync_impl

bool semaphore_acquire(SemaphoreState* s, os::Deadline deadline) {
    using namespace sync_impl;
    const bool partner_waking = partner_is_waking();
    if (semaphore_take(s)) return true;
    if (expired(deadline)) return false;
    auto taken_now = [s] { return semaphore_take(s); };
    if (spin_for_answer(partner_waking, taken_now, s->spin_ns, s->after_wake_spin_ns, deadline)) return true;
    s->sleepers.fetch_add(1, std::memory_order_seq_cst);
    bool taken = false;
    for (;;) {
        if (semaphore_take(s)) {
            taken = true;
            break;
        }
        const os::Deadline step = os::sleep_slice_end(deadline, semaphore_recheck);
        if (!os::futex_wait(&s->value, 0, step) && step == deadline) {
            taken = semaphore_take(s);
            break;
        }
    }
    s->sleepers.fetch_sub(1, std::memory_order_relaxed);
    return taken;
}

void semaphore_release(SemaphoreState* s, unsigned n) {
    if (n == 0) return;
    std::uint32_t v = s->value.load(std::memory_order_relaxed);
    for (;;) {
        std::uint64_t next = std::uint64_t(v) + n;
        if (s->bounded && next > s->limit)
            throw InvalidStateError("mpservice::BoundedSemaphore::release: released too many times (the value " +
                                    std::to_string(v) + " + " + std::to_string(n) +
                                    " would exceed its initial value " + std::to_string(s->limit) + ")");
        if (next > UINT32_MAX)
            throw InvalidStateError("mpservice::Semaphore::release: the value would overflow");
        if (s->value.compare_exchange_weak(v, static_cast<std::uint32_t>(next), std::memory_order_seq_cst,
                                           std::memory_order_relaxed))
            break;
    }
    if (s->sleepers.load(std::memory_order_seq_cst) != 0) {
        os::futex_wake(&s->value, n > unsigned(INT_MAX) ? INT_MAX : static_cast<int>(n));
        t_woke_a_sleeper = true;
    }
}

// ---------------------------------------------------------------- Event

void event_set(EventState* e) {
    std::uint32_t w = e->word.load(std::memory_order_relaxed);
    do {
        if (w & 1u) return;  // already set: whoever set it woke the sleepers
    } while (!e->word.compare_exchange_weak(w, (w + 2u) | 1u, std::memory_order_seq_cst,
                                            std::memory_order_relaxed));
    if (e->sleepers.load(std::memory_order_seq_cst) != 0) {
        os::futex_wake(&e->word, INT_MAX);
        t_woke_a_sleeper = true;
    }
}

bool event_wait(EventState* e, os::Deadline deadline) {
    using namespace sync_impl;
    const bool partner_waking = partner_is_waking();
    const std::uint32_t seen = e->word.load(std::memory_order_acquire);
    if (seen & 1u) return true;
    // From a cleared state the word changes only by a set() (clearing a clear
    // flag leaves it as it is), so any change means the event was set.
    auto changed = [&] { return e->word.load(std::memory_order_acquire) != seen; };
    if (expired(deadline)) return changed();
    if (spin_for_answer(partner_waking, changed, e->spin_ns, e->after_wake_spin_ns, deadline)) return true;
    e->sleepers.fetch_add(1, std::memory_order_seq_cst);
    bool set = false;
    for (;;) {
        if (e->word.load(std::memory_order_seq_cst) != seen) {
            set = true;
            break;
        }
        if (!os::futex_wait(&e->word, seen, deadline)) {
            set = changed();
            break;
        }
    }
    e->sleepers.fetch_sub(1, std::memory_order_relaxed);
    return set;
}

// ---------------------------------------------------------------- Barrier

namespace sync_impl {
/// How often sleepers at a barrier look for parties that died.
constexpr std::chrono::milliseconds barrier_liveness_period{50};
constexpr std::uint32_t barrier_max_parties = 1u << 20;

void end_cycle_locked(BarrierState* b, bool released) {
    std::uint32_t g = b->generation.load(std::memory_order_relaxed);
    std::uint64_t bit = std::uint64_t(1) << (g % 64);
    std::uint64_t bits = b->released_bits.load(std::memory_order_relaxed);
    b->released_bits.store(released ? (bits | bit) : (bits & ~bit), std::memory_order_relaxed);
    b->count.store(0, std::memory_order_relaxed);
    b->generation.store(g + 1, std::memory_order_release);
    os::futex_wake(&b->generation, INT_MAX);
}

void break_locked(BarrierState* b) {
    b->broken.store(1, std::memory_order_release);
    end_cycle_locked(b, false);
}

/// Holds the barrier's own mutex.  Its critical sections are short and ours;
/// if a process died inside one (or inside the action), the state may be half
/// updated, so the barrier is broken - waiters learn of it, reset() repairs it.
class BarrierGuard {
public:
    explicit BarrierGuard(BarrierState* b) : b_(b) {
        if (os::robust_mutex_lock(&b->mutex) == os::LockResult::owner_died) {
            os::robust_mutex_consistent(&b->mutex);
            break_locked(b);
        }
    }
    ~BarrierGuard() { os::robust_mutex_unlock(&b_->mutex); }
    BarrierGuard(const BarrierGuard&) = delete;
    BarrierGuard& operator=(const BarrierGuard&) = delete;

private:
    BarrierState* b_;
};

/// Breaks the barrier if a party that arrived in the current cycle has ended.
void check_parties_locked(BarrierState* b, std::uint32_t generation) {
    if (b->generation.load(std::memory_order_relaxed) != generation) return;
    std::uint32_t n = std::min(b->count.load(std::memory_order_relaxed), b->parties);
    for (std::uint32_t i = 0; i < n; ++i) {
        if (!os::process_running(static_cast<long>(b->pids()[i]))) {
            break_locked(b);
            return;
        }
    }
}

/// Whether one of the first `n` arrivals of the current cycle - another
/// process than ours - has ended.
bool arrived_party_died_locked(BarrierState* b, std::uint32_t n) {
    const std::int64_t me = os::current_pid();
    std::int64_t checked = me;  // parties of one process often arrive in a row
    for (std::uint32_t i = 0; i < n && i < b->parties; ++i) {
        const std::int64_t pid = b->pids()[i];
        if (pid == me || pid == checked) continue;
        if (!os::process_running(static_cast<long>(pid))) return true;
        checked = pid;
    }
    return false;
}

[[noreturn]] void throw_broken() {
    throw BrokenBarrierError(
        "mpservice::Barrier::wait: the barrier is broken (aborted, reset, timed out, its action failed, "
        "or a waiting process died)");
}
}  // namespace sync_impl

}  // namespace mpservice::detail

namespace mpservice {

Lock::Lock() : ref_{detail::SharedRef<detail::LockState>::create_sized(sizeof(detail::LockState)), false} {}

RLock::RLock() : ref_{detail::SharedRef<detail::LockState>::create_sized(sizeof(detail::LockState)), true} {}

namespace detail::sync_impl {
/// A Condition and the RLock it made for itself share one block (one descriptor).
struct ConditionWithLock {
    ConditionState condition;
    LockState lock;
};
}  // namespace detail::sync_impl

Condition::Condition() {
    using Block = detail::sync_impl::ConditionWithLock;
    auto block = detail::SharedRef<Block>::create_sized(sizeof(Block));
    state_ = block.alias(&block->condition);
    lock_ = detail::LockRef{block.alias(&block->lock), true};
}

Condition::Condition(Lock lock)
    : state_(detail::SharedRef<detail::ConditionState>::create_sized(sizeof(detail::ConditionState))),
      lock_(lock.lock_ref()) {}

Condition::Condition(RLock lock)
    : state_(detail::SharedRef<detail::ConditionState>::create_sized(sizeof(detail::ConditionState))),
      lock_(lock.lock_ref()) {}

Semaphore::Semaphore(unsigned value)
    : state_(detail::SharedRef<detail::SemaphoreState>::create_sized(sizeof(detail::SemaphoreState))) {
    state_->value.store(value, std::memory_order_relaxed);
}

Semaphore::Semaphore(unsigned value, unsigned limit) : Semaphore(value) {
    state_->bounded = 1;
    state_->limit = limit;
}

Event::Event() : state_(detail::SharedRef<detail::EventState>::create_sized(sizeof(detail::EventState))) {}

Barrier::Barrier(unsigned parties, Action action, std::int64_t timeout_ns) {
    using namespace detail::sync_impl;
    if (parties == 0) throw std::invalid_argument("mpservice::Barrier: parties must be at least 1");
    if (parties > barrier_max_parties)
        throw std::invalid_argument("mpservice::Barrier: parties must be at most " +
                                    std::to_string(barrier_max_parties));
    detail::os::CodeRef code{};
    // A function's address is the one thing about it that can travel: it is
    // stored as module + offset, valid again after exec.
    if (action) code = detail::os::code_ref_of(reinterpret_cast<const void*>(action));
    state_ = detail::SharedRef<detail::BarrierState>::create_sized(detail::BarrierState::size_for(parties));
    state_->parties = parties;
    state_->default_timeout_ns = timeout_ns;
    state_->action = code;
}

unsigned Barrier::wait() {
    std::int64_t ns = state_->default_timeout_ns;
    return wait_until(ns < 0 ? detail::os::no_deadline : detail::os::deadline_after(std::chrono::nanoseconds(ns)));
}

unsigned Barrier::wait_until(detail::os::Deadline deadline) {
    using namespace detail;
    using namespace detail::sync_impl;
    BarrierState* b = state_.get();
    std::uint32_t generation = 0;
    std::uint32_t index = 0;
    {
        BarrierGuard guard(b);
        if (b->broken.load(std::memory_order_relaxed)) throw_broken();
        generation = b->generation.load(std::memory_order_relaxed);
        index = b->count.load(std::memory_order_relaxed);
        b->pids()[index] = os::current_pid();
        b->count.store(index + 1, std::memory_order_relaxed);
        if (index + 1 == b->parties) {
            // The last arrival completes the cycle only with every party alive: one
            // that died waiting must break it even if nobody slept long enough to
            // notice (Python's barrier breaks when a waiter leaves abnormally).
            if (arrived_party_died_locked(b, index)) {
                break_locked(b);
                throw_broken();
            }
            if (!b->action.empty()) {
                auto fn = reinterpret_cast<Action>(const_cast<void*>(os::code_ref_resolve(b->action)));
                if (!fn) {
                    break_locked(b);
                    throw Error("mpservice::Barrier::wait: the barrier's action is not loaded in this process "
                                "(its module is missing); the barrier is broken");
                }
                try {
                    fn();
                } catch (...) {
                    break_locked(b);
                    throw;
                }
            }
            end_cycle_locked(b, true);
            return index;
        }
    }

    auto ended = [&] { return b->generation.load(std::memory_order_acquire) != generation; };
    if (!spin_until(ended, b->spin_ns)) {
        for (;;) {
            if (ended()) break;
            auto now = os::Clock::now();
            if (now >= deadline) {
                BarrierGuard guard(b);  // a timeout breaks the barrier, as in Python
                if (b->generation.load(std::memory_order_relaxed) == generation) break_locked(b);
                break;
            }
            const auto step = os::sleep_slice_end(deadline, barrier_liveness_period);
            if (!os::futex_wait(&b->generation, generation, step) && step != deadline && !ended()) {
                BarrierGuard guard(b);
                check_parties_locked(b, generation);
            }
        }
    }
    // Cycle `generation` is over: released or broken?  Its bit is only reused
    // 64 cycles later, which cannot complete without this party... unless
    // others keep resetting or breaking it 64 times before we look.
    std::uint64_t bits = b->released_bits.load(std::memory_order_acquire);
    if (bits & (std::uint64_t(1) << (generation % 64))) return index;
    throw_broken();
}

void Barrier::reset() {
    using namespace detail::sync_impl;
    BarrierGuard guard(state_.get());
    end_cycle_locked(state_.get(), false);  // current waiters: BrokenBarrierError
    state_->broken.store(0, std::memory_order_release);
}

void Barrier::abort() {
    using namespace detail::sync_impl;
    BarrierGuard guard(state_.get());
    break_locked(state_.get());
}

// ---------------------------------------------------------------- codecs of the primitives

void Codec<Lock>::encode(Encoder& e, const Lock& l) { detail::encode_ref(e, l.lock_ref().state); }
Lock Codec<Lock>::decode(Decoder& d) { return Lock(detail::decode_ref<detail::LockState>(d)); }

void Codec<RLock>::encode(Encoder& e, const RLock& l) { detail::encode_ref(e, l.lock_ref().state); }
RLock Codec<RLock>::decode(Decoder& d) { return RLock(detail::decode_ref<detail::LockState>(d)); }

void Codec<Condition>::encode(Encoder& e, const Condition& c) {
    detail::encode_ref(e, c.state_ref());
    detail::encode_lock_beside(e, c.state_ref().memory(), c.lock_ref());
}
Condition Codec<Condition>::decode(Decoder& d) {
    auto state = detail::decode_ref<detail::ConditionState>(d);
    auto lock = detail::decode_lock_beside(d, state.memory());
    return Condition(std::move(state), std::move(lock));
}

void Codec<Semaphore>::encode(Encoder& e, const Semaphore& s) { detail::encode_ref(e, s.state_ref()); }
Semaphore Codec<Semaphore>::decode(Decoder& d) { return Semaphore(detail::decode_ref<detail::SemaphoreState>(d)); }

void Codec<BoundedSemaphore>::encode(Encoder& e, const BoundedSemaphore& s) { detail::encode_ref(e, s.state_ref()); }
BoundedSemaphore Codec<BoundedSemaphore>::decode(Decoder& d) {
    return BoundedSemaphore(detail::decode_ref<detail::SemaphoreState>(d));
}

void Codec<Event>::encode(Encoder& e, const Event& ev) { detail::encode_ref(e, ev.state_ref()); }
Event Codec<Event>::decode(Decoder& d) { return Event(detail::decode_ref<detail::EventState>(d)); }

void Codec<Barrier>::encode(Encoder& e, const Barrier& b) { detail::encode_ref(e, b.state_ref()); }
Barrier Codec<Barrier>::decode(Decoder& d) {
    auto ref = detail::decode_ref<detail::BarrierState>(d);
    std::uint32_t parties = ref->parties;
    if (parties == 0 || ref.bytes_available() < detail::BarrierState::size_for(parties))
        throw DecodeError("decode: barrier state does not fit its shared memory block");
    return Barrier(std::move(ref));
}

}  // namespace mpservice
// ---- end part: mpservice/impl/synchronize.cpp
// ---- begin part: mpservice/impl/queues.cpp ----------------------------------
// queues: the shared byte ring under Queue<T> (layout and protocol in detail/queue_ring.hpp).
#include <algorithm>
#include <climits>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace mpservice::detail {

namespace {

constexpr std::uint32_t queue_magic = 0x5155455Au;  // "QUEZ"
constexpr std::uint32_t rec_whole = 1, rec_first = 2, rec_cont = 3, rec_last = 4, rec_pad = 5;
constexpr std::uint64_t small_header = 8;   // len u32 + kind u32
constexpr std::uint64_t first_header = 16;  // + total u64
constexpr std::uint64_t min_capacity = 256;
constexpr std::uint64_t max_capacity = std::uint64_t(1) << 40;
constexpr std::uint64_t ring_offset = 4096;  // the ring starts on its own page
// Unbounded in bytes (see queue_ring.hpp): the sparse reservation, the part of it
// reused cycle after cycle, how far past that part pages may stay, and how many
// consumed bytes a consumer lets pile up before it gives their pages back.  The
// reservation costs address space only (4 GiB per queue per process that maps it).
constexpr std::uint64_t unbounded_reserve = std::uint64_t(4) << 30;
constexpr std::uint64_t hot_default = std::uint64_t(1) << 20;
constexpr std::uint64_t keep_past_hot = std::uint64_t(256) << 10;
constexpr std::uint64_t release_batch = std::uint64_t(1) << 20;
// How far ahead a producer or consumer of an unbounded ring maps its pages, in
// one system call (see map_ahead_for_write): pages mapped ahead of the tail
// stay committed until written, so this is also what a queue may hold past its backlog.
constexpr std::uint64_t map_ahead_bytes = std::uint64_t(256) << 10;
// A producer past the hot part with items queued waits for the consumers to
// drain them while they keep taking them (see wait_for_drain): at most this
// long without one being taken (a consumer asleep takes 30-60 us to wake on
// the VMs measured), this long in all, and again only after this many bytes.
constexpr auto drain_stall = std::chrono::microseconds(100);
constexpr auto drain_wait_limit = std::chrono::milliseconds(1);
constexpr std::uint64_t drain_retry_bytes = std::uint64_t(1) << 20;
// A reassembly or encoding buffer larger than this is given back after use.
constexpr std::size_t keep_buffer_bytes = std::size_t(64) << 20;

// A cross-CPU futex wake-up costs ~30 us on the machines we measured, a spin
// hand-off ~0.1 us: spin for a while before sleeping.
constexpr auto spin_budget = std::chrono::microseconds(20);
// A spinning waiter looks at the other side's line once per this many pauses
// (~25 ns each on the machines we measured).  Each look pulls the line from the
// writer's cache, and the writer's next locked instruction then waits for the
// line to come back: polling that line every pause made a 1P1C stream of 8-byte
// items ~25% slower than polling every 8 pauses, which lets the producer publish
// several items per look.
constexpr int spin_pauses = 8;
// How often a sleeper looks whether the other side's lock holder died.
constexpr auto probe_interval = std::chrono::milliseconds(20);

std::uint64_t align8(std::uint64_t n) noexcept { return (n + 7) & ~std::uint64_t(7); }

std::uint64_t power_of_two_mask(std::uint64_t capacity) noexcept {
    return (capacity & (capacity - 1)) == 0 ? capacity - 1 : 0;
}

struct RecordHeader {
    std::uint32_t len;
    std::uint32_t kind;
};

/// A record's bytes in the ring, `to_end` bytes before the ring's end: a pad
/// runs to the end.
std::uint64_t record_size(const RecordHeader& hdr, std::uint64_t to_end) noexcept {
    if (hdr.kind == rec_pad) return to_end;
    return (hdr.kind == rec_first ? first_header : small_header) + align8(hdr.len);
}

[[noreturn]] void corrupt(const char* what) {
    throw Error(std::string("mpservice: queue memory is corrupt (") + what +
                "); was it written by something other than this library?");
}

/// Wakes sleepers on `w` if there may be any, right after a commit: the commit's
/// position store is seq_cst, and so is our load of the flag, which pairs with the
/// fence a waiter issues between raising the flag and re-checking its condition
/// (Dekker): either the waiter sees the new position or we see its flag.
void notify_after_commit(QueueWaitWord& w) noexcept {
    if (w.sleepers.load(std::memory_order_seq_cst) == 0) return;
    w.sleepers.store(0, std::memory_order_relaxed);  // sleepers that stay asleep raise it again
    w.seq.fetch_add(1, std::memory_order_release);
    os::futex_wake(&w.seq, INT_MAX);
}

/// The same after any other change of state.
void notify(QueueWaitWord& w) noexcept {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    notify_after_commit(w);
}

void notify_always(QueueWaitWord& w) noexcept {
    w.sleepers.store(0, std::memory_order_relaxed);
    w.seq.fetch_add(1, std::memory_order_seq_cst);
    os::futex_wake(&w.seq, INT_MAX);
}

/// Waits until pred() or the deadline: spins first, then sleeps on `w` in
/// slices, calling probe() between slices (to notice a dead lock holder).
/// Returns pred() as last seen.
template <class Pred, class Probe>
bool wait_until(QueueWaitWord& w, os::Deadline deadline, Pred&& pred, Probe&& probe) {
    if (pred()) return true;
    const auto spin_start = os::Clock::now();
    for (unsigned i = 1;; ++i) {
        for (int k = 0; k < spin_pauses; ++k) os::cpu_relax();
        if (pred()) return true;
        if ((i & 7) == 0) {
            auto now = os::Clock::now();
            if (now >= deadline) return false;
            if (now - spin_start >= spin_budget) break;
        }
    }
    for (;;) {
        auto now = os::Clock::now();
        if (now >= deadline) return pred();
        // Read the sequence before raising the flag and re-checking: a notify
        // after this read changes it, so futex_wait then returns at once.
        std::uint32_t seq = w.seq.load(std::memory_order_acquire);
        w.sleepers.store(1, std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        if (pred()) return true;
        os::Deadline slice = (deadline - now > probe_interval) ? now + probe_interval : deadline;
        os::futex_wait(&w.seq, seq, slice);
        if (pred()) return true;
        probe();
    }
}

/// Takes a side's lock.  The uncontended case is one call straight into the
/// system: robust_mutex_lock's extra frame and result mapping cost ~10% of an
/// uncontended put.  A busy lock (another producer, or consumer, on this side)
/// is waited for as a busy Lock is (lock_contended): tried at doubling
/// intervals, so that the holder's stream of puts keeps the line in its own
/// cache, and not at all while someone sleeps for it - then we sleep too.
os::LockResult take_lock(os::RobustMutex* m, os::Deadline deadline) {
    int status = os::robust_mutex_trylock_status(m);
    if (status == 0) return os::LockResult::acquired;
    os::LockResult r = os::robust_mutex_trylock_result(status);
    if (r == os::LockResult::owner_died) return r;
    if (!os::robust_mutex_has_sleepers(m)) {
        auto taken = [&] {
            r = os::robust_mutex_trylock(m);
            return r != os::LockResult::busy;
        };
        if (spin_backing_off_for(taken, spin_budget_within(std::chrono::nanoseconds(spin_max_ns), deadline))) return r;
    }
    return os::robust_mutex_lock_blocking(m, deadline);
}

/// Unlocks a robust mutex at scope exit.
class Held {
public:
    explicit Held(os::RobustMutex* m) noexcept : m_(m) {}
    Held(const Held&) = delete;
    Held& operator=(const Held&) = delete;
    ~Held() { release(); }
    void release() noexcept {
        if (!m_) return;
        // Fails only if we do not hold it, which this scope guarantees we do.
        (void)os::robust_mutex_unlock_status(m_);
        m_ = nullptr;
    }

private:
    os::RobustMutex* m_;
};

/// Per-thread buffers (os::thread_object, not thread_local: see there).
struct ReassemblyBuffer {
    std::string bytes;
};
struct EncodeBuffer {
    std::string bytes;
};
std::string& reassembly_buffer() { return os::thread_object<ReassemblyBuffer>().bytes; }

/// The parts of streamed items that gets of this process left half-received at
/// their timeout (see "Parked items" in queue_ring.hpp).
struct ParkedPart {
    std::uint64_t queue = 0;  // QueueHeader::uid
    std::uint64_t item = 0;
    std::uint64_t received = 0;
    std::uint64_t total = 0;
    std::string data;
};
class ParkedParts {
public:
    void put(ParkedPart part) {
        std::lock_guard<std::mutex> g(guard_);
        parts_.push_back(std::move(part));
    }
    bool take(std::uint64_t queue, std::uint64_t item, ParkedPart& out) {
        std::lock_guard<std::mutex> g(guard_);
        for (std::size_t i = 0; i < parts_.size(); ++i) {
            if (parts_[i].queue != queue || parts_[i].item != item) continue;
            out = std::move(parts_[i]);
            parts_.erase(parts_.begin() + static_cast<std::ptrdiff_t>(i));
            return true;
        }
        return false;
    }

private:
    std::mutex guard_;
    std::vector<ParkedPart> parts_;
};
ParkedParts& parked_parts() {
    static ParkedParts* parts = new ParkedParts();  // never destroyed: gets may run at exit
    return *parts;
}

std::uint64_t new_queue_uid() noexcept {
    static std::atomic<std::uint64_t> counter{0};
    std::uint64_t x = static_cast<std::uint64_t>(os::current_pid()) << 40;
    x ^= static_cast<std::uint64_t>(os::Clock::now().time_since_epoch().count());
    x ^= counter.fetch_add(1, std::memory_order_relaxed) * 0x9e3779b97f4a7c15ull;
    return x ? x : 1;
}

bool kind_accepts(QueueKind wanted, std::uint32_t actual) noexcept {
    // A JoinableQueue is a Queue: a function taking Queue<T> may receive one.
    return actual == static_cast<std::uint32_t>(wanted) ||
           (wanted == QueueKind::queue && actual == static_cast<std::uint32_t>(QueueKind::joinable));
}

}  // namespace

// ---------------------------------------------------------------- creation

QueueCore QueueCore::create(QueueKind kind, std::uint64_t type_tag, std::size_t maxsize,
                            std::size_t capacity_bytes) {
    if (capacity_bytes > max_capacity)
        throw std::invalid_argument("mpservice: queue capacity " + std::to_string(capacity_bytes) +
                                    " bytes is more than the 1 TiB supported");
    const bool unbounded = capacity_bytes == 0;  // no byte bound: a sparse reservation
    std::uint64_t capacity = unbounded ? unbounded_reserve : std::max<std::uint64_t>(capacity_bytes, min_capacity);
    capacity = (capacity + 63) & ~std::uint64_t(63);
    static_assert(sizeof(QueueHeader) <= ring_offset, "queue header outgrew its page");
    static_assert(std::atomic<std::uint64_t>::is_always_lock_free, "queues need lock-free 64-bit atomics");

    QueueCore q;
    q.mem_ = SharedMemory::create(static_cast<std::size_t>(ring_offset + capacity));
    auto* h = ::new (q.mem_.data()) QueueHeader();
    h->kind = static_cast<std::uint32_t>(kind);
    h->type_tag = type_tag;
    h->capacity = capacity;
    h->maxsize = maxsize;
    h->ring_offset = ring_offset;
    h->hot_bytes = unbounded ? hot_default : 0;
    h->uid = new_queue_uid();
    h->released.store(unbounded ? hot_default + keep_past_hot : 0, std::memory_order_relaxed);
    os::robust_mutex_init(&h->put_lock);
    os::robust_mutex_init(&h->get_lock);
    std::atomic_thread_fence(std::memory_order_release);
    h->magic = queue_magic;
    q.h_ = h;
    q.ring_ = static_cast<unsigned char*>(q.mem_.data()) + ring_offset;
    q.set_limits();
    // A bounded ring is all used soon: map its pages now.  An unbounded one
    // commits memory only as items fill it.
    if (!unbounded) os::shm_prefault(q.ring_, static_cast<std::size_t>(capacity));
    return q;
}

QueueCore QueueCore::attach(SharedMemory memory, QueueKind kind, std::uint64_t type_tag) {
    if (!memory || memory.size() < ring_offset) throw DecodeError("decode: shared block is too small to be a queue");
    auto* h = static_cast<QueueHeader*>(memory.data());
    if (h->magic != queue_magic) throw DecodeError("decode: shared block is not a queue");
    if (!kind_accepts(kind, h->kind))
        throw DecodeError("decode: the queue is of another kind (Queue, SimpleQueue or JoinableQueue) than expected");
    if (h->type_tag != type_tag) throw DecodeError("decode: the queue carries items of another type than expected");
    if (h->ring_offset != ring_offset || h->capacity < min_capacity || h->capacity % 64 != 0 ||
        h->capacity > memory.size() - ring_offset || h->hot_bytes > h->capacity / 2 || h->hot_bytes % 64 != 0)
        throw DecodeError("decode: queue header does not match its shared block");
    QueueCore q;
    q.mem_ = std::move(memory);
    q.h_ = h;
    q.ring_ = static_cast<unsigned char*>(q.mem_.data()) + ring_offset;
    q.set_limits();
    if (!h->hot_bytes) os::shm_prefault(q.ring_, static_cast<std::size_t>(h->capacity));
    return q;
}

std::string& QueueCore::encode_buffer() {
    std::string& buffer = os::thread_object<EncodeBuffer>().bytes;
    if (buffer.capacity() > keep_buffer_bytes) std::string().swap(buffer);
    return buffer;
}

// ---------------------------------------------------------------- commits and recovery
//
// Each side publishes a position and a counter.  A process can die between the
// two stores, so the new values go to a journal first; whoever takes the lock
// next and is told the owner died finishes the commit (both stores are
// idempotent).  A record's bytes are always complete before its commit starts.

void QueueCore::commit_put(std::uint64_t tail, std::uint64_t completed) noexcept {
    h_->j_tail = tail;
    h_->j_completed = completed;
    h_->j_put_active.store(1, std::memory_order_release);
    h_->completed.store(completed, std::memory_order_relaxed);
    h_->tail.store(tail, std::memory_order_seq_cst);  // publishes the record (and `completed`)
    h_->j_put_active.store(0, std::memory_order_release);
}

void QueueCore::commit_get(std::uint64_t head, std::uint64_t taken) noexcept {
    h_->j_head = head;
    h_->j_taken = taken;
    h_->j_get_active.store(1, std::memory_order_release);
    h_->taken.store(taken, std::memory_order_relaxed);
    h_->head.store(head, std::memory_order_seq_cst);  // hands the bytes back to producers
    h_->j_get_active.store(0, std::memory_order_release);
}

void QueueCore::recover_put() noexcept {
    if (h_->j_put_active.load(std::memory_order_acquire)) {
        h_->completed.store(h_->j_completed, std::memory_order_relaxed);
        h_->tail.store(h_->j_tail, std::memory_order_release);
        h_->j_put_active.store(0, std::memory_order_release);
    }
    // A chunked item its producer did not finish is abandoned: the consumer
    // reading it sees `streaming` change and discards what it has.
    h_->streaming.store(0, std::memory_order_release);
    os::robust_mutex_consistent(&h_->put_lock);
    notify(h_->data);
}

void QueueCore::recover_get() noexcept {
    if (h_->j_get_active.load(std::memory_order_acquire)) {
        h_->taken.store(h_->j_taken, std::memory_order_relaxed);
        h_->head.store(h_->j_head, std::memory_order_release);
        h_->j_get_active.store(0, std::memory_order_release);
    }
    // A chunked item the dead consumer was reading: its remaining chunks are
    // discarded by the next consumer (they arrive as orphan `cont` records).
    os::robust_mutex_consistent(&h_->get_lock);
    notify(h_->space);
}

void QueueCore::probe_producers() noexcept {
    try {
        auto r = os::robust_mutex_trylock(&h_->put_lock);
        if (r == os::LockResult::busy) return;
        Held held(&h_->put_lock);
        if (r == os::LockResult::owner_died) recover_put();
    } catch (...) {
    }
}

void QueueCore::probe_consumers() noexcept {
    try {
        auto r = os::robust_mutex_trylock(&h_->get_lock);
        if (r == os::LockResult::busy) return;
        Held held(&h_->get_lock);
        if (r == os::LockResult::owner_died) recover_get();
    } catch (...) {
    }
}

// ---------------------------------------------------------------- put

QueueCore::Status QueueCore::put(const void* data, std::size_t size, os::Deadline deadline) {
    if (closed()) return Status::closed;
    auto r = take_lock(&h_->put_lock, deadline);
    if (r == os::LockResult::timed_out) return Status::timeout;
    Held held(&h_->put_lock);
    if (r == os::LockResult::owner_died) recover_put();
    if (closed()) return Status::closed;

    if (h_->maxsize) {
        const Status s = wait_below_maxsize(0, deadline);
        if (s != Status::ok) return s;
    }
    const std::uint64_t bytes = small_header + align8(size);
    if (bytes > whole_limit_) return put_chunked(data, size, deadline);

    // A whole record.  Padding the ring's end, starting the next cycle early
    // and waiting for room are out of line: most puts need none of them, and an
    // extra call costs ~10% of a put.
    std::uint64_t tail = h_->tail.load(std::memory_order_relaxed);
    if (offset(tail) + bytes > h_->capacity || tail + bytes > h_->head_cache + h_->capacity ||
        wrap_check_due(tail) || tail + bytes > write_mapped_to_) {
        Status s = make_room(tail, bytes, deadline);
        if (s != Status::ok) return s;
    }
    unsigned char* rec = at(tail);
    RecordHeader hdr{static_cast<std::uint32_t>(size), rec_whole};
    std::memcpy(rec, &hdr, sizeof hdr);
    if (size) std::memcpy(rec + small_header, data, size);
    commit_put(tail + bytes, h_->completed.load(std::memory_order_relaxed) + 1);
    notify_after_commit(h_->data);
    return Status::ok;
}

QueueCore::Status QueueCore::wait_below_maxsize(std::uint64_t pending, os::Deadline deadline) {
    auto below_maxsize = [&] {
        return h_->completed.load(std::memory_order_relaxed) + pending - h_->taken.load(std::memory_order_acquire) <
                   h_->maxsize ||
               closed();
    };
    if (!wait_until(h_->space, deadline, below_maxsize, [&] { probe_consumers(); })) return Status::timeout;
    return closed() ? Status::closed : Status::ok;
}

QueueCore::Status QueueCore::put_many(Source source, void* context, std::size_t count, std::size_t& done,
                                      os::Deadline deadline) {
    done = 0;
    if (closed()) return Status::closed;
    if (count == 0) return Status::ok;
    auto r = take_lock(&h_->put_lock, deadline);
    if (r == os::LockResult::timed_out) return Status::timeout;
    Held held(&h_->put_lock);
    if (r == os::LockResult::owner_died) recover_put();
    if (closed()) return Status::closed;

    // Records written but not yet published: [published, tail), `pending` items.
    // A producer killed before the commit leaves them unpublished (the next put
    // writes over them); the batch's items before them were published whole.
    std::uint64_t tail = h_->tail.load(std::memory_order_relaxed);
    std::uint64_t pending = 0;
    auto publish = [&] {
        if (!pending) return;
        commit_put(tail, h_->completed.load(std::memory_order_relaxed) + pending);
        notify_after_commit(h_->data);
        done += static_cast<std::size_t>(pending);
        pending = 0;
    };
    // What stops the batch early: the rest is not put.
    auto stop = [&](Status s) {
        publish();
        return s;
    };
    try {
        for (std::size_t i = 0; i < count; ++i) {
            const void* data = nullptr;
            std::size_t size = 0;
            source(context, i, &data, &size);
            if (h_->maxsize &&
                h_->completed.load(std::memory_order_relaxed) + pending - h_->taken.load(std::memory_order_acquire) >=
                    h_->maxsize) {
                publish();  // consumers can only take what is published
                const Status s = wait_below_maxsize(0, deadline);
                if (s != Status::ok) return s;
            }
            const std::uint64_t bytes = small_header + align8(size);
            if (bytes > whole_limit_) {  // streamed in chunks, published as it goes
                publish();
                const Status s = put_chunked(data, size, deadline);
                if (s != Status::ok) return s;
                ++done;
                tail = h_->tail.load(std::memory_order_relaxed);
                continue;
            }
            if (offset(tail) + bytes > h_->capacity || tail + bytes > h_->head_cache + h_->capacity ||
                wrap_check_due(tail)) {
                publish();  // make_room pads and waits on published positions only
                const Status s = make_room(tail, bytes, deadline);
                if (s != Status::ok) return s;
            }
            if (tail + bytes > write_mapped_to_) map_ahead_for_write(tail, bytes);
            unsigned char* rec = at(tail);
            RecordHeader hdr{static_cast<std::uint32_t>(size), rec_whole};
            std::memcpy(rec, &hdr, sizeof hdr);
            if (size) std::memcpy(rec + small_header, data, size);
            tail += bytes;
            ++pending;
        }
    } catch (...) {
        publish();
        throw;
    }
    return stop(Status::ok);
}

bool QueueCore::wait_for_room(std::uint64_t tail, std::uint64_t bytes, os::Deadline deadline,
                              bool give_up_on_close) {
    const std::uint64_t cap = h_->capacity;
    if (tail + bytes <= h_->head_cache + cap) return true;
    h_->head_cache = h_->head.load(std::memory_order_acquire);
    if (tail + bytes <= h_->head_cache + cap) return true;
    auto room = [&] {
        return tail + bytes <= h_->head.load(std::memory_order_acquire) + cap || (give_up_on_close && closed());
    };
    wait_until(h_->space, deadline, room, [&] { probe_consumers(); });
    h_->head_cache = h_->head.load(std::memory_order_acquire);
    return tail + bytes <= h_->head_cache + cap;
}

void QueueCore::write_pad(std::uint64_t tail, std::uint64_t bytes) {
    // A pad always runs to the ring's end; readers take its length from there
    // (an unbounded ring's pad can be longer than 32 bits can say).
    RecordHeader hdr{static_cast<std::uint32_t>(std::min<std::uint64_t>(bytes - small_header, UINT32_MAX)), rec_pad};
    std::memcpy(at(tail), &hdr, sizeof hdr);
    commit_put(tail + bytes, h_->completed.load(std::memory_order_relaxed));
    notify_after_commit(h_->data);
}

bool QueueCore::should_wrap_early(std::uint64_t tail, os::Deadline deadline) noexcept {
    if (offset(tail) < wrap_from_) return false;
    const std::uint64_t head = h_->head.load(std::memory_order_acquire);
    if (head == tail) return true;
    if (tail >= drain_retry_at_ && wait_for_drain(tail, head, deadline)) return true;
    // Not empty: look again on the next page (the wrap comes at most a page
    // later, within the pages kept past the hot part).
    const std::uint64_t page = os::page_size();
    h_->wrap_check_at = (tail + page) & ~(page - 1);
    return false;
}

bool QueueCore::wait_for_drain(std::uint64_t tail, std::uint64_t head, os::Deadline deadline) noexcept {
    const auto give_up_at = std::min(deadline, os::Clock::now() + drain_wait_limit);
    if (os::Clock::now() >= give_up_at) return false;  // put_nowait and friends do not wait
    for (;;) {
        const std::uint64_t seen = head;
        const bool moved = spin_for(
            [&] {
                head = h_->head.load(std::memory_order_acquire);
                return head != seen;
            },
            drain_stall, BetweenLooks::yield);
        if (head == tail) return true;
        if (!moved || os::Clock::now() >= give_up_at) break;
    }
    drain_retry_at_ = tail + drain_retry_bytes;  // the consumers stalled: run on for a while
    return false;
}

void QueueCore::release_pages_below(std::uint64_t below) noexcept {
    if (!h_->hot_bytes) return;
    const std::uint64_t page = os::page_size();
    const std::uint64_t cycle = below - offset(below);
    // Pages past the hot part (and a margin, so that a cycle that runs a little
    // past it does not fault the same pages in again every time).
    const std::uint64_t first = cycle + h_->hot_bytes + keep_past_hot;
    std::uint64_t from = h_->released.load(std::memory_order_relaxed);
    if (from < first) from = first;  // an earlier cycle's mark: this cycle starts afresh
    const std::uint64_t to = below & ~(page - 1);
    if (to > from) {
        os::shm_release(mem_.handle(), static_cast<std::size_t>(ring_offset + offset(from)),
                        static_cast<std::size_t>(to - from));
        from = to;
    }
    h_->released.store(from, std::memory_order_relaxed);
}

void QueueCore::release_consumed() noexcept {
    const std::uint64_t head = h_->head.load(std::memory_order_relaxed);
    const std::uint64_t page = os::page_size();
    h_->release_check_at = (head + page) & ~(page - 1);  // the next look, unless it gives back now
    const std::uint64_t released = h_->released.load(std::memory_order_relaxed);
    if (head < released + release_batch && (head <= released || head != h_->tail.load(std::memory_order_acquire)))
        return;
    // The pages below the committed head are read by nobody; holding the put
    // lock too, nobody writes them either while they are given back.
    try {
        auto r = os::robust_mutex_trylock(&h_->put_lock);
        if (r == os::LockResult::busy) return;  // a producer is at work: next time
        Held held(&h_->put_lock);
        if (r == os::LockResult::owner_died) recover_put();
        release_pages_below(head);
    } catch (...) {
    }
}

void QueueCore::set_limits() noexcept {
    mask_ = power_of_two_mask(h_->capacity);
    const std::uint64_t span = h_->hot_bytes ? h_->hot_bytes : h_->capacity;
    whole_limit_ = span / 2;
    chunk_bytes_ = span / 4;
    wrap_from_ = h_->hot_bytes ? h_->hot_bytes : ~std::uint64_t(0);
    release_from_ = h_->hot_bytes ? h_->hot_bytes + keep_past_hot : ~std::uint64_t(0);
    write_mapped_to_ = read_mapped_to_ = h_->hot_bytes ? 0 : ~std::uint64_t(0);
}

void QueueCore::map_ahead_for_write(std::uint64_t tail, std::uint64_t bytes) noexcept {
    if (tail + bytes <= write_mapped_to_) return;
    const std::uint64_t page = os::page_size();
    const std::uint64_t cycle = tail - offset(tail);
    const std::uint64_t kept_end = cycle + release_from_;  // the hot part and the pages kept past it
    if (tail + bytes <= kept_end && kept_mapped_for_write_) {
        write_mapped_to_ = kept_end;  // mapped in an earlier cycle, and never given back
        return;
    }
    // Within the kept pages, no further than their end: the next cycle usually
    // starts there, and pages mapped past it would be fresh ones, given back
    // at the wrap.
    const std::uint64_t want = (std::max(tail + bytes, tail + map_ahead_bytes) + page - 1) & ~(page - 1);
    const std::uint64_t to = std::min(want, tail + bytes <= kept_end ? kept_end : cycle + h_->capacity);
    const std::uint64_t from = std::max(write_mapped_to_, tail & ~(page - 1));
    if (to > from) os::shm_prefault(at(from), static_cast<std::size_t>(to - from), true);
    if (to == kept_end) kept_mapped_for_write_ = true;
    write_mapped_to_ = to;
}

void QueueCore::map_ahead_for_read(std::uint64_t head) noexcept {
    if (!h_->hot_bytes) return;
    const std::uint64_t page = os::page_size();
    const std::uint64_t cycle = head - offset(head);
    const std::uint64_t kept_end = cycle + release_from_;
    if (head + 64 <= kept_end && kept_mapped_for_read_) {
        read_mapped_to_ = kept_end;
        return;
    }
    // Only committed bytes: mapping the holes past the tail would allocate them.
    const std::uint64_t written = (h_->tail.load(std::memory_order_acquire) + page - 1) & ~(page - 1);
    const std::uint64_t bound = head + 64 <= kept_end ? kept_end : cycle + h_->capacity;
    const std::uint64_t from = std::max(read_mapped_to_, head & ~(page - 1));
    const std::uint64_t to = std::min({bound, written, (head + map_ahead_bytes) & ~(page - 1)});
    if (to >= from + 16 * page || (to == kept_end && to > from)) {
        os::shm_prefault(at(from), static_cast<std::size_t>(to - from), false);
        if (to == kept_end) kept_mapped_for_read_ = true;
        read_mapped_to_ = to;
    } else {
        // Close behind the producers: a fault per page costs what a call would;
        // look again on the next page.
        read_mapped_to_ = std::max(read_mapped_to_, (head & ~(page - 1)) + page);
    }
}

QueueCore::Status QueueCore::make_room(std::uint64_t& tail, std::uint64_t bytes, os::Deadline deadline) {
    if (should_wrap_early(tail, deadline)) wrap_early(tail);
    const std::uint64_t to_end = h_->capacity - offset(tail);
    if (to_end < bytes) {  // records never wrap: skip the ring's end
        if (!wait_for_room(tail, to_end, deadline, true)) return closed() ? Status::closed : Status::timeout;
        write_pad(tail, to_end);
        tail += to_end;
    }
    if (!wait_for_room(tail, bytes, deadline, true)) return closed() ? Status::closed : Status::timeout;
    map_ahead_for_write(tail, bytes);
    return Status::ok;
}

void QueueCore::wrap_early(std::uint64_t& tail) noexcept {
    // Past the hot part and nothing queued: the next cycle starts at the
    // ring's start, on warm pages; the ones written past them go back, and so
    // do the ones mapped ahead past the pad (nobody reads under a pad).
    release_pages_below(tail);
    write_pad(tail, h_->capacity - offset(tail));
    const std::uint64_t page = os::page_size();
    const std::uint64_t cycle = tail - offset(tail);
    // (Only past the pages kept past the hot part: those stay, warm, for the next cycles.)
    const std::uint64_t above = std::max((tail + small_header + page - 1) & ~(page - 1), cycle + release_from_);
    const std::uint64_t cycle_end = cycle + h_->capacity;
    const std::uint64_t mapped = std::min(write_mapped_to_, cycle_end);
    if (mapped > above)
        os::shm_release(mem_.handle(), static_cast<std::size_t>(ring_offset + offset(above)),
                        static_cast<std::size_t>(mapped - above));
    tail = cycle_end;
}

QueueCore::Status QueueCore::put_chunked(const void* data, std::size_t size, os::Deadline deadline) {
    const std::uint64_t cap = h_->capacity;
    // Chunks of a quarter ring (of its hot part when unbounded): the consumer
    // copies one out while we write the next.
    const std::uint64_t chunk_bytes = chunk_bytes_;
    const auto* src = static_cast<const unsigned char*>(data);
    std::uint64_t remaining = size;
    std::uint64_t tail = h_->tail.load(std::memory_order_relaxed);
    bool first = true;

    auto give_up = [&] {
        if (first) return closed() ? Status::closed : Status::timeout;
        // Mid-item: tell the consumer reading it to discard what it has.
        h_->streaming.store(0, std::memory_order_release);
        notify(h_->data);
        return Status::timeout;
    };

    while (remaining) {
        const std::uint64_t header = first ? first_header : small_header;
        std::uint64_t piece = std::min<std::uint64_t>(remaining, chunk_bytes - header);
        if (should_wrap_early(tail, deadline)) {
            wrap_early(tail);
            continue;
        }
        const std::uint64_t to_end = cap - offset(tail);
        if (to_end < header + std::min<std::uint64_t>(align8(piece), 64)) {
            if (!wait_for_room(tail, to_end, deadline, first)) return give_up();
            write_pad(tail, to_end);
            tail += to_end;
            continue;
        }
        piece = std::min(piece, to_end - header);
        const std::uint64_t bytes = header + align8(piece);
        if (!wait_for_room(tail, bytes, deadline, first)) return give_up();
        map_ahead_for_write(tail, bytes);

        unsigned char* rec = at(tail);
        const bool done = piece == remaining;
        RecordHeader hdr{static_cast<std::uint32_t>(piece), first ? rec_first : done ? rec_last : rec_cont};
        std::memcpy(rec, &hdr, sizeof hdr);
        if (first) {
            std::uint64_t total = size;
            std::memcpy(rec + small_header, &total, sizeof total);
            // The item's id is its position; the consumer reading it watches this.
            h_->streaming.store(tail + 1, std::memory_order_relaxed);
        }
        std::memcpy(rec + header, src, piece);
        src += piece;
        remaining -= piece;
        commit_put(tail + bytes, h_->completed.load(std::memory_order_relaxed) + (done ? 1 : 0));
        tail += bytes;
        first = false;
        notify_after_commit(h_->data);
    }
    h_->streaming.store(0, std::memory_order_release);
    return Status::ok;
}

// ---------------------------------------------------------------- get

QueueCore::Status QueueCore::get_many(Consume consume, void* context, std::size_t max_items, std::size_t& got,
                                      os::Deadline deadline) {
    got = 0;
    if (max_items == 0) return Status::ok;
    auto something = [&] {
        return h_->tail.load(std::memory_order_acquire) != h_->head.load(std::memory_order_acquire) || closed();
    };
    // Look under the lock first: while items stream, a get then reads no line the
    // producers write, except the ring and (when its cached copy runs out) `tail`.
    for (bool look_now = true;; ) {
        if (!look_now && !wait_until(h_->data, deadline, something, [&] { probe_producers(); })) return Status::timeout;
        look_now = false;
        auto r = take_lock(&h_->get_lock, deadline);
        if (r == os::LockResult::timed_out) return Status::timeout;
        Held held(&h_->get_lock);
        if (r == os::LockResult::owner_died) recover_get();

        // Hands a reassembled streamed item to `consume`, outside the lock.
        auto deliver = [&](std::string& buffer, std::uint64_t total) {
            release_consumed();
            held.release();
            struct Shrink {
                std::string& b;
                ~Shrink() {
                    if (b.size() > keep_buffer_bytes) std::string().swap(b);
                }
            } shrink{buffer};
            got = 1;
            consume(context, reinterpret_cast<const unsigned char*>(buffer.data()), static_cast<std::size_t>(total));
            return Status::ok;
        };
        bool wait_for_parker = false;
        for (;;) {
            const std::uint64_t head = h_->head.load(std::memory_order_relaxed);
            if (head == h_->tail_cache) h_->tail_cache = h_->tail.load(std::memory_order_acquire);
            if (head != h_->tail_cache && h_->parked_item.load(std::memory_order_relaxed)) {
                std::string& buffer = reassembly_buffer();
                std::uint64_t total = 0;
                Taken taken = Taken::discarded;
                const ParkedAction action = handle_parked(buffer, total, deadline, taken);
                if (action == ParkedAction::wait) {
                    wait_for_parker = true;
                    break;
                }
                if (action == ParkedAction::resumed) {
                    if (taken == Taken::parked) return Status::timeout;
                    if (taken == Taken::delivered) return deliver(buffer, total);
                }
                continue;  // dropped or discarded: what follows is read as usual
            }
            if (head == h_->tail_cache) {
                // Empty.  Reading `closed` first makes every put that finished
                // before close() visible to the second look at the tail.
                bool was_closed = closed();
                h_->tail_cache = h_->tail.load(std::memory_order_acquire);
                if (head != h_->tail_cache) continue;
                if (was_closed) return Status::closed;
                break;  // unlock and wait again
            }
            const std::uint64_t cap = h_->capacity;
            if (read_map_due(head)) map_ahead_for_read(head);
            unsigned char* rec = at(head);
            RecordHeader hdr;
            std::memcpy(&hdr, rec, sizeof hdr);
            if (hdr.kind < rec_whole || hdr.kind > rec_pad) corrupt("record kind");
            const std::uint64_t bytes = record_size(hdr, cap - offset(head));
            if (offset(head) + bytes > cap || head + bytes > h_->tail_cache) corrupt("record length");
            const std::uint64_t taken = h_->taken.load(std::memory_order_relaxed);

            switch (hdr.kind) {
                case rec_pad:
                    commit_get(head + bytes, taken);
                    notify(h_->space);
                    continue;
                case rec_cont:
                case rec_last: {
                    // The rest of an item whose consumer died after taking its
                    // first chunk: that item is lost; drop the rest.  A complete
                    // item counts as taken and (for join) as done.
                    const bool last = hdr.kind == rec_last;
                    commit_get(head + bytes, taken + (last ? 1 : 0));
                    if (last) {
                        h_->tasks_done.fetch_add(1, std::memory_order_acq_rel);
                        notify(h_->joined);
                    }
                    notify(h_->space);
                    continue;
                }
                case rec_whole: {
                    // Decoded in place, under the lock: one copy, and a consumer
                    // killed while decoding leaves the item for the next one.
                    try {
                        consume(context, rec + small_header, hdr.len);
                    } catch (...) {
                        commit_get(head + bytes, taken + 1);
                        notify(h_->space);
                        throw;
                    }
                    if (max_items > 1) {
                        got = take_following(head + bytes, taken, max_items, consume, context);
                        return Status::ok;
                    }
                    got = 1;
                    commit_get(head + bytes, taken + 1);
                    notify_after_commit(h_->space);
                    if (release_check_due(head + bytes)) release_consumed();
                    return Status::ok;
                }
                default: {  // rec_first
                    std::string& buffer = reassembly_buffer();
                    std::uint64_t total = 0;
                    std::memcpy(&total, rec + small_header, sizeof total);
                    const Taken taken = read_chunked(head, buffer, deadline);
                    if (taken == Taken::discarded) continue;
                    if (taken == Taken::parked) return Status::timeout;
                    return deliver(buffer, total);
                }
            }
        }
        if (wait_for_parker) {
            // The rest of another process's parked item is at the head: wait until
            // that process has taken it (or ended), within our own deadline.
            const std::uint64_t item = h_->parked_item.load(std::memory_order_relaxed);
            const long parker = static_cast<long>(h_->parked_pid.load(std::memory_order_relaxed));
            held.release();
            bool parker_ended = false;
            auto moved_on = [&] {
                return parker_ended || h_->parked_item.load(std::memory_order_acquire) != item;
            };
            if (!wait_until(h_->data, deadline, moved_on, [&] { parker_ended = !os::process_running(parker); }))
                return Status::timeout;
            look_now = true;  // look again at once, under the lock
        }
    }
}

std::size_t QueueCore::take_following(std::uint64_t next, std::uint64_t taken, std::size_t max_items,
                                      Consume consume, void* context) {
    // Nothing is committed until the end: a consumer killed before it leaves
    // every item of the batch on the ring for the next one.
    const std::uint64_t cap = h_->capacity;
    std::size_t n = 1;
    auto commit = [&] {
        commit_get(next, taken + n);
        notify_after_commit(h_->space);
        if (release_check_due(next)) release_consumed();
    };
    try {
        while (n < max_items) {
            if (next == h_->tail_cache) {
                h_->tail_cache = h_->tail.load(std::memory_order_acquire);
                if (next == h_->tail_cache) break;
            }
            if (read_map_due(next)) map_ahead_for_read(next);
            unsigned char* rec = at(next);
            RecordHeader hdr;
            std::memcpy(&hdr, rec, sizeof hdr);
            if (hdr.kind < rec_whole || hdr.kind > rec_pad) corrupt("record kind");
            const std::uint64_t bytes = record_size(hdr, cap - offset(next));
            if (offset(next) + bytes > cap || next + bytes > h_->tail_cache) corrupt("record length");
            if (hdr.kind == rec_pad) {
                next += bytes;
                continue;
            }
            if (hdr.kind != rec_whole) break;  // a streamed item (or the rest of one): the next get's
            next += bytes;
            ++n;  // counted before the call: an item whose decoding throws is consumed
            consume(context, rec + small_header, hdr.len);
        }
    } catch (...) {
        commit();
        throw;
    }
    commit();
    return n;
}

QueueCore::ParkedAction QueueCore::handle_parked(std::string& out, std::uint64_t& total, os::Deadline deadline,
                                                 Taken& result) {
    const std::uint64_t item = h_->parked_item.load(std::memory_order_relaxed);
    const long parker = static_cast<long>(h_->parked_pid.load(std::memory_order_relaxed));
    if (parker == os::current_pid()) {
        ParkedPart part;
        h_->parked_item.store(0, std::memory_order_release);
        if (!parked_parts().take(h_->uid, item, part)) return ParkedAction::dropped;  // not ours after all
        out = std::move(part.data);
        total = part.total;
        result = continue_chunked(h_->head.load(std::memory_order_relaxed), item, part.received, part.total, out,
                                  deadline);
        if (result != Taken::parked) notify(h_->data);  // gets of other processes wait for this
        return ParkedAction::resumed;
    }
    if (os::process_running(parker)) return ParkedAction::wait;
    // Its process ended with the part it had: the item is lost (as for a
    // consumer killed mid-item); the rest is dropped as it comes.
    h_->parked_item.store(0, std::memory_order_release);
    notify(h_->data);
    return ParkedAction::dropped;
}

QueueCore::Taken QueueCore::read_chunked(std::uint64_t head, std::string& out, os::Deadline deadline) {
    RecordHeader hdr;
    std::memcpy(&hdr, at(head), sizeof hdr);
    std::uint64_t total = 0;
    std::memcpy(&total, at(head) + small_header, sizeof total);
    if (hdr.len > total) corrupt("first chunk longer than its item");
    if (out.size() < total) out.resize(static_cast<std::size_t>(total));
    std::memcpy(&out[0], at(head) + first_header, hdr.len);
    const std::uint64_t received = hdr.len;
    const std::uint64_t id = head + 1;
    head += first_header + align8(hdr.len);
    std::uint64_t taken = h_->taken.load(std::memory_order_relaxed);
    if (received == total) ++taken;
    commit_get(head, taken);
    notify(h_->space);
    return continue_chunked(head, id, received, total, out, deadline);
}

QueueCore::Taken QueueCore::continue_chunked(std::uint64_t head, std::uint64_t id, std::uint64_t received,
                                             std::uint64_t total, std::string& out, os::Deadline deadline) {
    const std::uint64_t cap = h_->capacity;
    RecordHeader hdr;
    std::uint64_t taken = h_->taken.load(std::memory_order_relaxed);
    // The producer holds the put lock until the item is complete, so its chunks
    // follow one another.  It gives up (timeout) or dies: `streaming` changes.
    auto next_or_abandoned = [&] {
        return h_->streaming.load(std::memory_order_acquire) != id ||
               h_->tail.load(std::memory_order_acquire) != head;
    };
    while (received < total) {
        if (!wait_until(h_->data, deadline, next_or_abandoned, [&] { probe_producers(); })) {
            // Our timeout, with the producer stopped or slow mid-item: keep what
            // we have for the next get of this process (see "Parked items").
            try {
                parked_parts().put(ParkedPart{h_->uid, id, received, total, std::move(out)});
            } catch (...) {
                return Taken::discarded;  // no memory to keep it: the item is lost
            }
            h_->parked_pid.store(os::current_pid(), std::memory_order_relaxed);
            h_->parked_item.store(id, std::memory_order_release);
            return Taken::parked;
        }
        const std::uint64_t streaming = h_->streaming.load(std::memory_order_acquire);
        const std::uint64_t tail = h_->tail.load(std::memory_order_acquire);
        if (tail == head) {
            if (streaming != id) return Taken::discarded;
            continue;
        }
        h_->tail_cache = tail;
        if (read_map_due(head)) map_ahead_for_read(head);
        unsigned char* rec = at(head);
        std::memcpy(&hdr, rec, sizeof hdr);
        if (hdr.kind < rec_whole || hdr.kind > rec_pad) corrupt("record kind");
        const std::uint64_t bytes = record_size(hdr, cap - offset(head));
        if (offset(head) + bytes > cap || head + bytes > tail) corrupt("record length");
        if (hdr.kind == rec_pad) {
            head += bytes;
            commit_get(head, taken);
            notify(h_->space);
            continue;
        }
        // A new item where our next chunk should be: ours was given up.
        if (hdr.kind != rec_cont && hdr.kind != rec_last) return Taken::discarded;
        if (received + hdr.len > total) corrupt("chunks longer than their item");
        std::memcpy(&out[static_cast<std::size_t>(received)], rec + small_header, hdr.len);
        received += hdr.len;
        if (received == total) ++taken;
        head += bytes;
        commit_get(head, taken);
        notify(h_->space);
    }
    return Taken::delivered;
}

// ---------------------------------------------------------------- state, close, join

std::size_t QueueCore::qsize() const noexcept {
    const std::uint64_t taken = h_->taken.load(std::memory_order_acquire);
    const std::uint64_t completed = h_->completed.load(std::memory_order_acquire);
    return completed > taken ? static_cast<std::size_t>(completed - taken) : 0;
}

bool QueueCore::full() const noexcept {
    if (h_->maxsize && qsize() >= h_->maxsize) return true;
    const std::uint64_t head = h_->head.load(std::memory_order_acquire);
    const std::uint64_t tail = h_->tail.load(std::memory_order_acquire);
    return tail - head + small_header > h_->capacity;
}

void QueueCore::close() noexcept {
    h_->closed.store(1, std::memory_order_seq_cst);
    notify_always(h_->data);
    notify_always(h_->space);
}

void QueueCore::task_done() {
    std::uint64_t done = h_->tasks_done.load(std::memory_order_acquire);
    for (;;) {
        if (done >= h_->completed.load(std::memory_order_acquire))
            throw std::invalid_argument("mpservice: JoinableQueue::task_done() called more times than items were put");
        if (h_->tasks_done.compare_exchange_weak(done, done + 1, std::memory_order_acq_rel)) break;
    }
    notify(h_->joined);
}

bool QueueCore::join(os::Deadline deadline) {
    auto all_done = [&] {
        return h_->tasks_done.load(std::memory_order_acquire) >= h_->completed.load(std::memory_order_acquire);
    };
    return wait_until(h_->joined, deadline, all_done, [&] { probe_producers(); });
}

}  // namespace mpservice::detail
// ---- end part: mpservice/impl/queues.cpp
#endif
#if MPSERVICE_PART_(5) || MPSERVICE_PART_(6) || MPSERVICE_PART_(10)
// ---- begin part: mpservice/impl/process_internal.hpp ------------------------
// process_internal.hpp: what the two process parts share.
//
//   part 5 - the process-wide runtime (process_runtime.cpp), the child's side
//            (process_child.cpp), the fork server and the after-fork reset
//            (process_fork.cpp), the warm spawner (process_warm.cpp);
//   part 6 - the parent's side: output capture (process_output.cpp), the
//            reactor (process_reactor.cpp), ProcessCore::start and the public
//            process functions (process_core.cpp), connections (connection.cpp).
//
// Everything else the files of a part share stays in their unnamed namespace.

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace mpservice {
namespace detail {

// ---------------------------------------------------------------- process-wide state (process_runtime.cpp)

/// The fork server as seen from its parent.
struct ForkServerLink {
    os::handle_t control = os::invalid_handle;
    long pid = 0;
};

/// The lock of the build-fingerprint cache: a fork lock, made before main().
std::mutex& fingerprints_mutex();

struct Runtime {
    bool initialized = false;
    bool is_child = false;
    std::string argv0 = "/proc/self/exe";
    std::string identity;  // "" in the main process, "2" or "2:1" in children
    std::atomic<int> next_child{1};
    std::optional<ProcessInfo> parent;
    // Made afresh in every forked child: the thread that starts a fork server
    // forks while holding it.
    std::mutex* forkserver_mutex = new std::mutex;
    ForkServerLink forkserver;
    std::mutex* fingerprint_mutex = &fingerprints_mutex();  // a fork lock (os::at_fork_protect)
    std::map<std::string, std::string> fingerprints;
    std::atomic<bool> corrupt_next_fingerprint{false};
    // How long start() waits for the fork server to make a worker: a stopped
    // or wedged server must not block start() for ever.
    std::atomic<long long> forkserver_timeout_ms{30000};
};

/// The runtime of this process, made on first use and never destroyed (the
/// reactor thread outlives static destruction).
Runtime& rt();

/// Registers, once, the at-fork hook that makes a forked child forget its
/// parent's reactor, fork server and child link (process_fork.cpp).
void register_after_fork_reset();

/// Flushes C++ and C standard streams (before a fork, before an exit).
void flush_stdio() noexcept;

/// "process 'name' (pid 12)", for messages.
std::string describe_process(const std::string& name, long pid);

/// Where trace_phase writes, when a bench asked for it (test_trace_start_phases).
inline std::atomic<std::int64_t*> g_phase_slots{nullptr};

/// Records `phase` when a bench asked for it.
inline void trace_phase(StartPhase phase) noexcept {
    if (std::int64_t* slots = g_phase_slots.load(std::memory_order_relaxed))
        slots[static_cast<int>(phase)] =
            std::chrono::duration_cast<std::chrono::nanoseconds>(os::Clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------- the child's side (process_child.cpp)

enum class ChildKind {
    spawned,            ///< exec'd for one start: BOOT is on its way
    warm_spawned,       ///< exec'd ahead of demand (process_warm.cpp): says HELLO, then waits for BOOT
    forkserver_worker,  ///< forked by the fork server
};

/// Makes the child's link to its parent now, in the parent before a fork:
/// made at its first use in the child, it would allocate there (page faults
/// on the child's way to running the task).
void prepare_child_link();

/// Writes what a child needs to know of its parent being alive (part of BOOT).
void encode_parent_present(Encoder& e, StartMethod child_method);

/// Makes a normal exit of this process announce its status to its parent.
void register_exit_announcement() noexcept;

/// A spawned child or a fork-server worker: reads BOOT, runs the target, reports, exits.
[[noreturn]] void run_bootstrapped_child(os::handle_t channel, long expected_parent, ChildKind kind,
                                         std::uint64_t serial = 0);

/// A forked child, right after fork (process_fork.cpp): runs the task, reports, exits.
[[noreturn]] void run_forked_child(os::handle_t channel, os::handle_t parent_end, ChildTask& task,
                                   const std::string& name, const std::string& identity,
                                   const std::string& parent_name, long parent, Level parent_log_level);

/// Starts this process's fork server (process_fork.cpp); caller holds rt().forkserver_mutex.
void start_fork_server();

/// In a spawn or fork-server child, reading BOOT (process_output.cpp): the
/// counterpart of OutputCapture::encode.
void adopt_forwarded_output(Decoder& d);

// ---------------------------------------------------------------- the warm spawner (process_warm.cpp)

/// A child exec'd ahead of demand, waiting for its BOOT.
struct WarmChild {
    long pid = 0;
    os::handle_t pidfd = os::invalid_handle;
    os::handle_t channel = os::invalid_handle;  // the parent's end
    std::string cwd;                            // what it was made with
    std::vector<std::string> environment;
    bool ready = false;  // its HELLO has arrived: bootstrapped, blocked on the channel
};

/// The warm child, if there is one that sees what a fresh spawn would see
/// now; asks for the next one either way.
std::optional<WarmChild> take_warm_child();
/// A warm child has ended before its HELLO was read: reads it from `channel`
/// and kills and reaps the address-space holder it names (process_warm.cpp).
void end_holder_named_on(os::handle_t channel) noexcept;

// ---------------------------------------------------------------- the parent's side (process_reactor.cpp, process_core.cpp)

/// In a forked child: the parent's reactor is not ours.
void forget_reactor_after_fork() noexcept;

/// What a normal exit does for this process's own children (daemons are
/// terminated, the others waited for).
void at_exit_handler();

/// The handle that becomes readable when the process ends, or invalid.
os::handle_t exit_handle_of(const ProcessCore& p);

}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/process_internal.hpp
#endif
#if MPSERVICE_PART_(5)
// ---- begin part: mpservice/impl/process_runtime.cpp -------------------------
// process_runtime: process-wide state of the process machinery (who we are,
// the fork server link, build fingerprints) and small shared helpers.

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

// ---------------------------------------------------------------- process-wide state

std::mutex& fingerprints_mutex() {
    static auto* m = new std::mutex;  // never destroyed, like the runtime
    return *m;
}

namespace {

void reset_after_fork_in_child();  // process_fork.cpp

// Before main(), before any thread exists: a fork while another thread fills
// the fingerprint cache must not copy its lock held.  (Only the lock: the
// runtime itself is made at first use, by a program that uses processes.)
[[maybe_unused]] const bool g_fingerprints_fork_safe = (os::at_fork_protect(&fingerprints_mutex(), 25), true);

}  // namespace

// Called by whatever makes one of the things the hook resets: a program that
// never does (a codec-only program, linked with --gc-sections) then carries
// none of that code.  Registered at any time, the hook still runs after the
// fork locks' own (registered before main).
void register_after_fork_reset() {
    static const bool registered = (os::at_fork_child(&reset_after_fork_in_child), true);
    (void)registered;
}

Runtime& rt() {
    static Runtime* r = [] {
        register_after_fork_reset();
        return new Runtime;  // never destroyed: the reactor thread outlives static destruction
    }();
    return *r;
}

void flush_stdio() noexcept {
    try {
        std::cout.flush();
        std::cerr.flush();
        std::clog.flush();
    } catch (...) {
    }
    std::fflush(nullptr);
}

std::string describe_process(const std::string& name, long pid) {
    return "process '" + name + "' (pid " + std::to_string(pid) + ")";
}

std::string fingerprint_of(const std::string& module) {
    Runtime& r = rt();
    std::lock_guard<std::mutex> lk(*r.fingerprint_mutex);
    auto it = r.fingerprints.find(module);
    if (it != r.fingerprints.end()) return it->second;
    return r.fingerprints[module] = os::module_fingerprint(module);
}

void test_trace_start_phases(std::int64_t* slots) noexcept { g_phase_slots.store(slots, std::memory_order_relaxed); }

}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/process_runtime.cpp
// ---- begin part: mpservice/impl/process_child.cpp ---------------------------
// process_child: the child side - reads its BOOT frame, runs the target,
// reports the outcome (VALUE or EXCEPTION, then END) and exits.

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
namespace {
using namespace wire;

// ---------------------------------------------------------------- the child side

/// The child's end of its channel; frames from several threads are serialized.
struct ChildLink {
    os::handle_t channel = os::invalid_handle;
    std::mutex mutex;
    bool send(std::uint32_t kind, const std::string& payload, const std::vector<os::handle_t>& handles = {}) {
        std::lock_guard<std::mutex> lk(mutex);
        try {
            return write_frame(channel, kind, payload, handles);
        } catch (const std::exception& e) {
            // Not swallowed: the parent cannot hear of it, so this process's stderr does.
            std::string text = "mpservice: " + process_name() + " could not send a frame to its parent: " + e.what() + "\n";
            os::write_stderr(text.data(), text.size());
            return false;
        }
    }
};

ChildLink& child_link() {
    static ChildLink* l = [] {
        register_after_fork_reset();  // its mutex is made afresh in a forked child
        return new ChildLink;
    }();
    return *l;
}

void install_log_forwarding() {
    set_log_forwarder([](const LogRecord& record) {
        Encoder e;
        e.write(record);
        child_link().send(frame_log, e.bytes());
    });
}

// ---- a child that ends by exit(n) itself announces n
// When SIGCHLD is ignored, or another waitpid() takes the status, the kernel
// cannot tell the parent how a child ended.  A child that returns or throws
// sends END with its code; one that calls exit(n) in its target sends END with
// n on its way out, so the parent reports "exited with code n" all the same.

std::atomic<bool> g_outcome_sent{false};
std::atomic<long> g_link_owner{0};  // the process whose channel child_link() is

void announce_exit_status(int status) noexcept {
    if (g_outcome_sent.exchange(true) || os::current_pid() != g_link_owner.load()) return;
    try {
        Encoder end;
        end.write(static_cast<std::int32_t>(status & 0xff));
        FrameHeader h{frame_end, 0, end.bytes().size()};
        std::string frame(reinterpret_cast<const char*>(&h), sizeof h);
        frame.append(end.bytes());
        ChildLink& link = child_link();
        std::lock_guard<std::mutex> lk(link.mutex);
        if (link.channel != os::invalid_handle) os::channel_write(link.channel, frame.data(), frame.size(), nullptr, 0);
    } catch (...) {
    }
}

}  // namespace

// Registers announce_exit_status with the C library (once per program).  The
// parent calls it before it forks: registering takes the C library's exit
// lock, which a forked child of a threaded parent must never need.
void register_exit_announcement() noexcept { os::on_exit_status(&announce_exit_status); }

namespace {

/// Called once the channel to the parent is set up in this process.
void watch_own_exit() noexcept {
    g_outcome_sent = false;
    g_link_owner = os::current_pid();
    os::on_exit_status(&announce_exit_status);
}

enum class SendOutcome { sent, parent_gone, failed };

/// Sends `kind` (VALUE or EXCEPTION) with `payload` and `handles`, then END
/// carrying `code`, in one write: one system call, one wake-up of the parent.
/// On failure `why` says what went wrong.
SendOutcome send_outcome(std::uint32_t kind, const Encoder& payload, int code, std::string& why) {
    g_outcome_sent = true;  // END goes now (or never): exit() need not announce one
    const auto& hs = payload.handles();
    // A closed descriptor would fail the write half-way through the frames;
    // find it first, while a clear report can still be sent instead.
    for (auto h : hs) {
        if (!os::handle_valid(h)) {
            why = "the result holds OS handle " + std::to_string(h) +
                  ", which is not open (a shared object destroyed before the result was sent?)";
            return SendOutcome::failed;
        }
    }
    std::string frames;
    auto append = [&](std::uint32_t k, const std::string& bytes, std::size_t nhandles) {
        FrameHeader h{k, static_cast<std::uint32_t>(nhandles), bytes.size()};
        frames.append(reinterpret_cast<const char*>(&h), sizeof h);
        frames.append(bytes);
    };
    append(kind, payload.bytes(), hs.size());
    Encoder end;
    end.write(static_cast<std::int32_t>(code));
    append(frame_end, end.bytes(), 0);
    ChildLink& link = child_link();
    std::lock_guard<std::mutex> lk(link.mutex);
    try {
        if (os::channel_write(link.channel, frames.data(), frames.size(), nullptr, 0, hs.data(), hs.size()))
            return SendOutcome::sent;
        return SendOutcome::parent_gone;
    } catch (const std::exception& e) {
        why = e.what();
        return SendOutcome::failed;
    }
}

/// Sends the outcome of `run` (VALUE or EXCEPTION), then END; returns the exit
/// code.  Before reporting, the child's own children are finished as a normal
/// exit would (the child then ends with exit_now: see run_bootstrapped_child).
template <class Run>
int run_and_report(Run&& run) {
    int code = 0;
    Encoder out;
    std::shared_ptr<void> keep;  // the result: its handles must stay open until it is sent
    std::uint32_t kind = frame_value;
    auto encode_error = [&](std::exception_ptr e) {
        out = Encoder();
        kind = frame_exception;
        code = 1;
        try {
            encode_exception(out, e);
        } catch (...) {
            out = Encoder();
            encode_exception(out, std::make_exception_ptr(Error("mpservice: the child's exception could not be encoded")));
        }
    };
    try {
        run(out, keep);
    } catch (...) {
        encode_error(std::current_exception());
    }
    try {
        at_exit_handler();  // grandchildren's log records still travel up through us
    } catch (...) {
    }
    set_log_forwarder({});  // later records stay here: END is the last frame
    std::string why;
    SendOutcome sent = send_outcome(kind, out, code, why);
    trace_phase(StartPhase::outcome_sent);
    if (sent == SendOutcome::failed) {
        // Never swallowed: the parent learns why it gets no result.
        encode_error(std::make_exception_ptr(
            Error("mpservice: " + process_name() + " could not deliver its " +
                  (kind == frame_value ? std::string("result") : std::string("exception")) + ": " + why)));
        std::string ignored;
        sent = send_outcome(kind, out, code, ignored);
        if (sent != SendOutcome::sent) {
            std::string text = "mpservice: " + process_name() + " could not deliver its outcome: " + why + "\n";
            os::write_stderr(text.data(), text.size());
        }
    }
    keep.reset();
    return code;
}

void adopt_child_identity(const std::string& name, const std::string& identity, const std::string& parent_name,
                          long parent_pid) {
    Runtime& r = rt();
    r.is_child = true;
    r.initialized = true;
    r.identity = identity;
    r.next_child = 1;
    r.parent = ProcessInfo{parent_name, parent_pid};
    set_process_name(name);
}

// ---- the parent's present: what a child adopts that a fork-server worker,
// forked from a server made at init(), would otherwise have from init() time

/// The parent's state at start() that its child adopts: the default start
/// method (every child) and - for a fork-server worker - the working directory
/// and environment, which a spawned child has already (exec inherits them).
struct ParentPresent {
    std::int8_t start_method = -1;  // StartMethod, or -1: not chosen in the parent
    bool has_environment = false;
    std::string cwd;
    std::vector<std::string> environment;
};

}  // namespace

void encode_parent_present(Encoder& e, StartMethod child_method) {
    ParentPresent p;
    std::string method = get_start_method(true);
    if (!method.empty()) p.start_method = static_cast<std::int8_t>(get_context(method).start_method());
    p.has_environment = child_method == StartMethod::forkserver;
    if (p.has_environment) {
        p.cwd = os::current_directory();
        p.environment = os::environment_entries();
    }
    e(p.start_method, p.has_environment);
    if (p.has_environment) e(p.cwd, p.environment);
}

namespace {

ParentPresent decode_parent_present(Decoder& d) {
    ParentPresent p;
    d(p.start_method, p.has_environment);
    if (p.has_environment) d(p.cwd, p.environment);
    return p;
}

/// In the child, before the target runs (after the module checks, which may
/// use paths relative to the old working directory).
void adopt_parent_present(const ParentPresent& p) {
    if (p.start_method >= 0)
        set_start_method(Context(static_cast<StartMethod>(p.start_method)).name(), true);
    if (!p.has_environment) return;
    os::replace_environment(p.environment);
    if (!p.cwd.empty() && !os::change_directory(p.cwd))
        throw Error("mpservice: the fork-server worker cannot enter the parent's working directory '" + p.cwd + "'");
}

}  // namespace

void prepare_child_link() { (void)child_link(); }

[[noreturn]] void run_bootstrapped_child(os::handle_t channel, long expected_parent, ChildKind kind,
                                         std::uint64_t serial) {
    if (!os::die_with_parent(expected_parent)) os::exit_now(1);
    if (kind != ChildKind::forkserver_worker) os::close_handles_except(channel);
    child_link().channel = channel;
    watch_own_exit();
    if (kind == ChildKind::warm_spawned) {
        // The part of the task's checks that does not depend on the task: the
        // build fingerprint of this executable (read from its file), cached
        // for the comparison with the one BOOT carries.
        try {
            (void)fingerprint_of(std::string());
        } catch (...) {
        }
        // Its exit then skips the teardown of its address space (the parent
        // waits for that exit before the task's result is final); the holder
        // goes right after it, reaped by the parent's reactor, which learns
        // of it here.
        const long holder = os::hold_address_space_past_exit();
        Encoder hello;
        hello(static_cast<std::int64_t>(os::current_pid()), std::uint64_t(0), static_cast<std::int64_t>(holder));
        if (!write_frame(channel, frame_hello, hello.bytes())) os::exit_now(1);
    }
    if (kind == ChildKind::forkserver_worker) {
        Encoder hello;
        hello(static_cast<std::int64_t>(os::current_pid()), serial);
        if (!write_frame(channel, frame_hello, hello.bytes())) os::exit_now(1);
    }
    Frame boot;
    FrameReader reader;
    bool got = false;
    try {
        got = reader.read_blocking(channel, boot) && boot.kind == frame_boot;
    } catch (...) {
    }
    if (!got) os::exit_now(1);  // the parent went away before telling us what to run

    int code = run_and_report([&](Encoder& out, std::shared_ptr<void>& keep) {
        Decoder d(boot.payload.data(), boot.payload.size(), &boot.handles);
        auto version = d.read<std::uint32_t>();
        if (version != protocol_version)
            throw Error("mpservice: the parent speaks protocol " + std::to_string(version) + ", this child " +
                        std::to_string(protocol_version) + ": it is a different build of the program");
        os::ModuleAddress target, tramp;
        std::string target_fp, tramp_fp, name, identity, parent_name;
        std::uint64_t target_off, tramp_off;
        std::int64_t parent_pid;
        bool daemon;
        std::int32_t log_level;
        d(target.module, target_off, target_fp, tramp.module, tramp_off, tramp_fp, name, identity, parent_name,
          parent_pid, daemon, log_level);
        ParentPresent present = decode_parent_present(d);
        (void)daemon;
        set_log_level_from_parent(static_cast<Level>(log_level));
        adopt_forwarded_output(d);
        target.offset = static_cast<std::uintptr_t>(target_off);
        tramp.offset = static_cast<std::uintptr_t>(tramp_off);
        adopt_child_identity(name, identity, parent_name, static_cast<long>(parent_pid));
        install_log_forwarding();
        for (auto* m : {&target, &tramp}) {
            const std::string& want = m == &target ? target_fp : tramp_fp;
            std::string have = fingerprint_of(m->module);
            if (have != want)
                throw Error("mpservice: refusing to run the task: this child runs a different build of " +
                            (m->module.empty() ? std::string("the program") : m->module) +
                            " than its parent (build fingerprints differ); rebuild and restart the parent");
        }
        const void* fn = os::module_resolve(target);
        const void* tr = os::module_resolve(tramp);
        if (!fn || !tr)
            throw Error("mpservice: the child cannot find the target's module '" + target.module + "'");
        auto trampoline = reinterpret_cast<Trampoline>(reinterpret_cast<std::uintptr_t>(tr));
        adopt_parent_present(present);
        trampoline(fn, d, out, keep);
    });
    close_all(boot.handles);
    // Every context ends its child the same way once the outcome is reported:
    // streams flushed, no static destructors or atexit handlers.  A forked
    // child must not run them (they are its parent's), and a spawned child
    // follows suit so that the contexts agree: a crash in teardown after the
    // answer was sent cannot happen, and exitcode() is the code reported
    // (README, "How a child ends").
    flush_stdio();
    os::exit_now(code);
}

}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/process_child.cpp
// ---- begin part: mpservice/impl/process_fork.cpp ----------------------------
// process_fork: the fork server (a clean process forked at init() that forks
// the fork-server workers) and the start-up of fork-context children.

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
namespace {
using namespace wire;

// ---------------------------------------------------------------- the fork server

[[noreturn]] void fork_server_main(os::handle_t control, long parent) {
    if (!os::die_with_parent(parent)) os::exit_now(0);
    os::close_handles_except(control);
    const long self = os::current_pid();
    os::handle_t exits = os::child_exit_events();
    ServerStatus st{};
    std::uint64_t next_serial = 1;
    std::unordered_map<long, std::uint64_t> serial_of;  // worker pid -> serial
    const os::handle_t watch[2] = {control, exits};
    for (;;) {
        unsigned ready = os::wait_readable(watch, 2, -1);
        if (ready & 2u) {
            os::child_exit_events_drain(exits);
            long pid;
            int code;
            while (os::reap_any_child(&pid, &code)) {
                auto it = serial_of.find(pid);
                if (it == serial_of.end()) continue;
                st.serial = it->second;
                st.code = code;
                serial_of.erase(it);
                if (!os::channel_write(control, &st, sizeof st, nullptr, 0)) os::exit_now(0);
            }
        }
        if (ready & 1u) {
            std::vector<os::handle_t> fds;
            char request = 0;
            long n = 0;
            try {
                n = os::channel_read(control, &request, 1, &fds, false);
            } catch (...) {
                n = 0;
            }
            if (n <= 0) os::exit_now(0);  // the parent is gone: so are we (and our workers with us)
            for (auto fd : fds) {
                long pid = -1;
                std::uint64_t serial = next_serial++;
                try {
                    pid = os::fork_process();
                } catch (...) {
                }
                if (pid == 0) {
                    os::close_handle(control);
                    os::child_exit_events_release(exits);
                    run_bootstrapped_child(fd, self, ChildKind::forkserver_worker, serial);
                }
                if (pid > 0) serial_of[pid] = serial;
                os::close_handle(fd);  // the worker has it (or, if the fork failed, the parent sees EOF)
            }
        }
    }
}

}  // namespace

void start_fork_server() {
    Runtime& r = rt();
    os::handle_t mine, theirs;
    os::packet_pair(mine, theirs);
    flush_stdio();
    long parent = os::current_pid();
    long pid;
    try {
        pid = os::fork_process();
    } catch (...) {
        os::close_handle(mine);
        os::close_handle(theirs);
        throw;
    }
    if (pid == 0) {
        os::close_handle(mine);
        fork_server_main(theirs, parent);
    }
    os::close_handle(theirs);
    r.forkserver.control = mine;
    r.forkserver.pid = pid;
}

namespace {

/// In the child of every fork() of this process (ours, the fork server's, the
/// user's): the parent's helpers are not ours, and the locks of per-process
/// state may have been copied held by threads that do not exist here.
void reset_after_fork_in_child() {
    Runtime& r = rt();
    forget_reactor_after_fork();
    ::new (r.forkserver_mutex) std::mutex();  // the forking thread may hold it (it starts fork servers)
    os::close_handle(r.forkserver.control);
    r.forkserver = ForkServerLink{};
    ::new (&child_link().mutex) std::mutex();  // the channel is replaced by whoever uses it next
}

}  // namespace

[[noreturn]] void run_forked_child(os::handle_t channel, os::handle_t parent_end, ChildTask& task,
                                   const std::string& name, const std::string& identity,
                                   const std::string& parent_name, long parent, Level parent_log_level) {
    os::close_handle(parent_end);
    if (!os::die_with_parent(parent)) os::exit_now(1);
    adopt_child_identity(name, identity, parent_name, parent);
    child_link().channel = channel;
    watch_own_exit();
    set_log_level_from_parent(parent_log_level);
    install_log_forwarding();
    int code = run_and_report([&](Encoder& out, std::shared_ptr<void>& keep) {
        trace_phase(StartPhase::task_begins);
        task.run_here(out, keep);
    });
    flush_stdio();
    trace_phase(StartPhase::child_exiting);
    os::exit_now(code);
}

}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/process_fork.cpp
// ---- begin part: mpservice/impl/process_warm.cpp ----------------------------
// process_warm: warm spawn - the spawn context keeps one child exec'd ahead
// of demand, so that a start pays for handing over the task instead of an exec.
//
// A warm child is a spawned child whose BOOT has not been written yet: it is
// made exactly as a cold one (posix_spawn of /proc/self/exe, the marker, the
// one inherited channel, PR_SET_PDEATHSIG tied to a thread that never ends),
// runs the library's bootstrap only - the marker checks in init(), the
// parent-death signal, every other descriptor closed, its own build
// fingerprint read - says HELLO and blocks reading its channel.  What it is
// to run arrives with BOOT like any spawned child's task, and goes through the
// same checks (protocol version, build fingerprints of the target's module).
//
// It is used only when it would see what a fresh spawn sees now: the parent's
// working directory and environment at start() are compared with those it
// was made with; any difference (a setenv, a chdir since) discards it and the
// start spawns afresh.  The "warm spawner" thread makes the children (it is
// their parent thread: it never ends, so their parent-death signal fires only
// when the process dies) and reaps a warm child that died unused (no zombie
// stays behind).  A taken child is replaced once it has ended, or after
// replace_after at the latest: an exec (about a millisecond of CPU) made at
// the moment of the start would compete with the child just given its task,
// and with the parent waiting for it, on a machine with few CPUs.  Three children in a row
// that die before saying HELLO stop it (the starts are then cold).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <optional>
#include <thread>

namespace mpservice {

namespace {
std::atomic<bool> g_warm_spawn{false};
}  // namespace

namespace detail {
namespace {
using namespace wire;

class WarmSpawner {
public:
    /// The spawner of this process, made (with its thread) on first use.
    static WarmSpawner& get();
    static WarmSpawner* existing() noexcept { return g_spawner.load(std::memory_order_acquire); }
    /// In a forked child: the parent's warm child is not ours.
    static void forget_after_fork() noexcept;

    /// The warm child, if there is one that sees what a fresh spawn would
    /// see now; asks for the next one either way.
    std::optional<WarmChild> take();
    /// Discards the warm child and makes no more until the next take().
    void stop();
    /// The warm child's pid once it is ready, waiting up to `timeout`; 0 if none.
    long wait_ready(std::chrono::milliseconds timeout);

private:
    WarmSpawner();
    void loop();
    /// Spawns a warm child (outside the lock); false if it could not be made.
    bool make_one(WarmChild& c);
    /// Kills and reaps children that will not be used (spawner thread).
    static void finish(std::vector<WarmChild>& dying) noexcept;

    static constexpr int max_failures = 3;
    static constexpr std::chrono::milliseconds replace_after{20};
    static std::atomic<WarmSpawner*> g_spawner;

    os::handle_t wake_ = os::invalid_handle;
    std::mutex mutex_;
    std::condition_variable ready_cv_;
    std::optional<WarmChild> child_;
    std::vector<WarmChild> dying_;  // taken off, to be killed and reaped
    bool wanted_ = false;
    int failures_ = 0;
    // The last child taken (a duplicate of its pidfd): the replacement is
    // made when it ends or at replace_at_, whichever comes first.
    os::handle_t taken_ = os::invalid_handle;
    os::Deadline replace_at_{};  // children in a row that died before HELLO, or spawns that failed
};

std::atomic<WarmSpawner*> WarmSpawner::g_spawner{nullptr};
std::mutex* g_spawner_mutex = new std::mutex;
void* volatile g_abandoned_spawner = nullptr;  // a forked child's copy: kept reachable for leak checkers

WarmSpawner& WarmSpawner::get() {
    if (WarmSpawner* s = existing()) return *s;
    std::lock_guard<std::mutex> lk(*g_spawner_mutex);
    WarmSpawner* s = g_spawner.load(std::memory_order_relaxed);
    if (!s) {
        static const bool fork_hook = (os::at_fork_child(&WarmSpawner::forget_after_fork), true);
        (void)fork_hook;
        s = new WarmSpawner;  // never deleted: its thread runs until the process ends
        g_spawner.store(s, std::memory_order_release);
    }
    return *s;
}

void WarmSpawner::forget_after_fork() noexcept {
    WarmSpawner* s = g_spawner.exchange(nullptr);
    ::new (g_spawner_mutex) std::mutex();  // the forking thread may have held it
    if (!s) return;
    // Single-threaded here: the spawner thread does not exist in this copy.
    // Its descriptors are closed; the children themselves are the parent's.
    os::close_handle(s->wake_);
    os::close_handle(s->taken_);
    if (s->child_) {
        os::close_handle(s->child_->pidfd);
        os::close_handle(s->child_->channel);
    }
    for (auto& d : s->dying_) {
        os::close_handle(d.pidfd);
        os::close_handle(d.channel);
    }
    g_abandoned_spawner = s;
}

WarmSpawner::WarmSpawner() : wake_(os::wake_event_create()) {
    // A thread that lives as long as the process: a child's parent-death
    // signal fires when the thread that made it ends.
    std::thread([this] { loop(); }).detach();
}

std::optional<WarmChild> WarmSpawner::take() {
    std::optional<WarmChild> c;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        wanted_ = true;
        c.swap(child_);
        if (c && taken_ == os::invalid_handle) {
            try {
                taken_ = os::duplicate_handle(c->pidfd);
                replace_at_ = os::Clock::now() + replace_after;
            } catch (...) {
                // No descriptor to spare: the replacement is made at once.
            }
        }
    }
    os::wake_event_signal(wake_);
    if (!c) return std::nullopt;
    const bool alive = os::wait_readable(&c->pidfd, 1, 0) == 0;
    // The same working directory and environment as a fresh spawn would get
    // (an unnameable directory - deleted - never matches).
    const bool current = alive && !c->cwd.empty() && c->cwd == os::current_directory() &&
                         c->environment == os::environment_entries();
    if (current) return c;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        dying_.push_back(std::move(*c));
    }
    os::wake_event_signal(wake_);
    return std::nullopt;
}

void WarmSpawner::stop() {
    {
        std::lock_guard<std::mutex> lk(mutex_);
        wanted_ = false;
        failures_ = 0;
        os::close_handle(taken_);
        taken_ = os::invalid_handle;
        if (child_) dying_.push_back(std::move(*child_));
        child_.reset();
    }
    os::wake_event_signal(wake_);
}

long WarmSpawner::wait_ready(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lk(mutex_);
    ready_cv_.wait_for(lk, timeout, [&] { return child_ && child_->ready; });
    return child_ && child_->ready ? child_->pid : 0;
}

bool WarmSpawner::make_one(WarmChild& c) {
    c.cwd = os::current_directory();
    c.environment = os::environment_entries();  // given to the child as they are here
    os::handle_t mine, theirs;
    try {
        os::channel_pair(mine, theirs);
    } catch (...) {
        return false;
    }
    try {
        std::string marker = child_marker + std::to_string(theirs) + ":" + std::to_string(os::current_pid()) +
                             warm_marker_suffix;
        c.pid = os::spawn_self(rt().argv0, marker, theirs, &c.environment);
    } catch (...) {
        os::close_handle(mine);
        os::close_handle(theirs);
        return false;
    }
    os::close_handle(theirs);
    c.channel = mine;
    c.pidfd = os::process_handle(c.pid);
    if (c.pidfd == os::invalid_handle) {
        // No pidfd (an old kernel): a warm child could not be watched while it waits.
        std::vector<WarmChild> one;
        one.push_back(std::move(c));
        finish(one);
        return false;
    }
    return true;
}

void WarmSpawner::finish(std::vector<WarmChild>& dying) noexcept {
    for (auto& d : dying) {
        // A child killed before its HELLO could leave a holder no one knows
        // of: one still booting is given the time to say HELLO (or to die).
        if (!d.ready) {
            os::handle_t either[2] = {d.channel, d.pidfd};
            (void)os::wait_readable(either, 2, 5000);
        }
        os::send_signal(d.pid, d.pidfd, os::signal_kill());
        int code;
        try {
            os::reap_child(d.pid, d.pidfd, true, &code);  // SIGKILLed: short; ECHILD if SIGCHLD is ignored
        } catch (...) {
        }
        end_holder_named_on(d.channel);
        os::close_handle(d.pidfd);
        os::close_handle(d.channel);
    }
    dying.clear();
}

void WarmSpawner::loop() {
    for (;;) {
        try {
            os::handle_t watch[4] = {wake_, os::invalid_handle, os::invalid_handle, os::invalid_handle};
            int n = 1;
            long watched = 0;
            bool watching_hello = false;
            int timeout_ms = -1;
            os::handle_t taken = os::invalid_handle;
            {
                std::lock_guard<std::mutex> lk(mutex_);
                if (taken_ != os::invalid_handle) {
                    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(replace_at_ - os::Clock::now());
                    if (left.count() > 0 && wanted_) {
                        taken = taken_;
                        timeout_ms = static_cast<int>(left.count()) + 1;
                    } else {
                        os::close_handle(taken_);  // due: the replacement is made below
                        taken_ = os::invalid_handle;
                    }
                }
                if (child_) {
                    watched = child_->pid;
                    watch[n++] = child_->pidfd;
                    if (!child_->ready) {
                        watch[n++] = child_->channel;
                        watching_hello = true;
                    }
                }
            }
            const int taken_slot = taken != os::invalid_handle ? n : -1;
            if (taken_slot >= 0) watch[n++] = taken;
            const unsigned ready = os::wait_readable(watch, n, timeout_ms);
            os::wake_event_drain(wake_);
            std::vector<WarmChild> dying;
            bool make = false;
            {
                std::lock_guard<std::mutex> lk(mutex_);
                const bool same = child_ && child_->pid == watched;
                if (same && (ready & 2u)) {  // died unused
                    if (!child_->ready) ++failures_;
                    dying_.push_back(std::move(*child_));
                    child_.reset();
                } else if (same && watching_hello && (ready & 4u)) {
                    // HELLO is there (left unread: the reactor reads and skips it).
                    child_->ready = true;
                    failures_ = 0;
                    ready_cv_.notify_all();
                }
                if (taken_slot >= 0 && taken_ == taken && (ready & (1u << taken_slot))) {
                    os::close_handle(taken_);  // it has ended: replace it now
                    taken_ = os::invalid_handle;
                }
                if (taken_ != os::invalid_handle && os::Clock::now() >= replace_at_) {
                    os::close_handle(taken_);
                    taken_ = os::invalid_handle;
                }
                dying.swap(dying_);
                make = wanted_ && !child_ && taken_ == os::invalid_handle && failures_ < max_failures;
            }
            finish(dying);
            if (!make) continue;
            WarmChild c;
            const bool made = make_one(c);
            std::lock_guard<std::mutex> lk(mutex_);
            if (!made) {
                ++failures_;
            } else if (wanted_ && !child_) {
                child_ = std::move(c);
            } else {
                dying_.push_back(std::move(c));  // stopped meanwhile
                os::wake_event_signal(wake_);
            }
        } catch (...) {
            // Out of memory or descriptors: the starts are cold meanwhile.
        }
    }
}

}  // namespace

std::optional<WarmChild> take_warm_child() { return WarmSpawner::get().take(); }

void end_holder_named_on(os::handle_t channel) noexcept {
    long holder = 0;
    try {
        // The child has ended: its HELLO is there, or the channel's end comes.
        if (os::wait_readable(&channel, 1, 5000) == 0) return;
        FrameReader reader;
        Frame hello;
        if (!reader.read_blocking(channel, hello) || hello.kind != frame_hello) return;
        close_all(hello.handles);
        holder = holder_named_in_hello(hello.payload);
    } catch (...) {
        return;
    }
    if (holder <= 0) return;
    // It ends by itself now that the child has; SIGKILL makes that certain.
    // Unreaped, its pid cannot have been reused.
    os::handle_t h = os::process_handle(holder);
    if (h == os::invalid_handle) return;  // reaped already (SIGCHLD ignored, a foreign waitpid)
    os::send_signal(holder, h, os::signal_kill());
    int code;
    try {
        os::reap_child(holder, h, true, &code);
    } catch (...) {
    }
    os::close_handle(h);
}

long test_warm_child(std::chrono::milliseconds timeout) {
    WarmSpawner* s = WarmSpawner::existing();
    return s ? s->wait_ready(timeout) : 0;
}

void discard_unwanted_warm_child() noexcept {
    if (g_warm_spawn.load(std::memory_order_relaxed)) return;  // the program keeps one anyway
    if (WarmSpawner* s = WarmSpawner::existing()) s->stop();
}

}  // namespace detail

void set_warm_spawn(bool keep_warm) {
    g_warm_spawn.store(keep_warm, std::memory_order_relaxed);
    if (!keep_warm)
        if (detail::WarmSpawner* s = detail::WarmSpawner::existing()) s->stop();
}

bool warm_spawn() noexcept { return g_warm_spawn.load(std::memory_order_relaxed); }

}  // namespace mpservice
// ---- end part: mpservice/impl/process_warm.cpp
#endif
#if MPSERVICE_PART_(6)
// ---- begin part: mpservice/impl/process_output.cpp --------------------------
// process_output: a child's standard output and error forwarded through the
// parent's log path (Process::set_forward_output, set_output_forwarding).
//
// The parent makes two pipes per forwarding child.  The child's descriptors 1
// and 2 become their write ends (a spawn or fork-server child receives them
// with BOOT, a forked child dup2s them right after fork), so the programs the
// child execs write into them too.  The parent's reactor thread reads the read
// ends - they sit in one epoll set of their own, which the reactor's poller
// watches - splits the bytes into lines and hands each line to
// handle_log_record as a record of logger "stdout" or "stderr" carrying the
// child's name and pid.  One pipe per child and stream: lines of different
// children cannot mix, and a line becomes a record only once its '\n' has
// arrived (or its stream has ended); a '\r' before the '\n' is dropped.
//
// Nothing is lost at exit: when the child has ended, the reactor reads both
// pipes dry before it resolves the Process (everything the child wrote is in
// them by then), so join() returns after its lines were handled.  The read
// ends stay watched until every writer is gone - a grandchild that inherited
// descriptor 1 may write after the child has ended; its lines carry the
// child's name - and are closed at end of stream.

#include <atomic>
#include <map>
#include <mutex>

namespace mpservice {

namespace {
std::atomic<bool> g_output_forwarding{false};
}  // namespace

void set_output_forwarding(bool forward) noexcept { g_output_forwarding.store(forward, std::memory_order_relaxed); }
bool output_forwarding() noexcept { return g_output_forwarding.load(std::memory_order_relaxed); }

namespace detail {
namespace {

/// The parent's readers of forwarded output (owned by the reactor).
class OutputPump {
public:
    /// A line longer than this is passed on in pieces of this size.
    static constexpr std::size_t max_line = std::size_t(1) << 20;

    OutputPump() : poller_(os::poller_create()), buf_(1 << 16) {}
    OutputPump(const OutputPump&) = delete;
    OutputPump& operator=(const OutputPump&) = delete;
    /// Readable when a pipe has data (the reactor's poller watches it).
    os::handle_t poller() const noexcept { return poller_; }

    /// Takes the read ends of a child about to start (not read until arm);
    /// `key` names the child for drain_for.
    std::uint64_t open(const void* key, const std::string& name, os::handle_t out_read, os::handle_t err_read) {
        std::lock_guard<std::mutex> lk(mutex_);
        std::uint64_t id = next_id_++;
        Entry& e = entries_[id];
        e.key = key;
        e.name = name;
        e.streams[0].fd = out_read;
        e.streams[1].fd = err_read;
        return id;
    }
    /// The child runs as `pid` and the parent has closed its write ends:
    /// start reading the pipes.
    void arm(std::uint64_t id, long pid) {
        std::vector<Line> lines;
        {
            std::lock_guard<std::mutex> lk(mutex_);
            auto it = entries_.find(id);
            if (it == entries_.end()) return;
            Entry& e = it->second;
            if (!e.pid) e.pid = pid;
            if (!e.key) {
                // The child has ended already (drain_for ran before this): its
                // pipes end now unless a grandchild holds them; close them here
                // rather than later on the reactor thread.
                for (int s = 0; s < 2; ++s) read_stream(e, s, lines);
                if (e.streams[0].eof && e.streams[1].eof) {
                    entries_.erase(it);
                    it = entries_.end();
                }
            }
            if (it != entries_.end()) {
                for (int s = 0; s < 2; ++s)
                    if (!e.streams[s].eof) os::poller_add(poller_, e.streams[s].fd, id << 1 | static_cast<unsigned>(s));
                e.armed = true;
            }
        }
        emit(lines);
    }
    /// The start failed: close the read ends, forget the child.
    void cancel(std::uint64_t id) noexcept {
        std::lock_guard<std::mutex> lk(mutex_);
        auto it = entries_.find(id);
        if (it == entries_.end()) return;
        close_entry(it->second);
        entries_.erase(it);
    }

    /// On the reactor thread, when the child `key` has ended: hands on every
    /// line it wrote (they are all in the pipes now).  Later writes (a
    /// grandchild's) still come through on_ready.
    void drain_for(const void* key, long pid) {
        std::vector<Line> lines;
        {
            std::lock_guard<std::mutex> lk(mutex_);
            for (auto it = entries_.begin(); it != entries_.end(); ++it) {
                Entry& e = it->second;
                if (e.key != key) continue;
                if (!e.pid) e.pid = pid;
                for (int s = 0; s < 2; ++s) {
                    read_stream(e, s, lines);
                    // The child has ended: a last line without '\n' is complete too.
                    Stream& st = e.streams[s];
                    if (!st.partial.empty()) lines.push_back(Line{s, std::move(st.partial), e.name, e.pid});
                    st.partial.clear();
                }
                e.key = nullptr;
                if (e.streams[0].eof && e.streams[1].eof) entries_.erase(it);
                break;
            }
        }
        emit(lines);
    }

    /// On the reactor thread: some pipe is readable.
    void on_ready() {
        std::uint64_t tokens[64];
        int n = os::poller_wait(poller_, tokens, 64, 0);
        std::vector<Line> lines;
        {
            std::lock_guard<std::mutex> lk(mutex_);
            for (int i = 0; i < n; ++i) {
                std::uint64_t id = tokens[i] >> 1;
                auto it = entries_.find(id);
                if (it == entries_.end()) continue;
                Entry& e = it->second;
                read_stream(e, static_cast<int>(tokens[i] & 1), lines);
                // Ended on both streams, and the child's own end was seen (or
                // it will not be: drain_for finds no entry and has nothing to do).
                if (e.streams[0].eof && e.streams[1].eof && !e.key) entries_.erase(it);
            }
        }
        emit(lines);
    }

private:
    struct Stream {
        os::handle_t fd = os::invalid_handle;
        std::string partial;       // bytes after the last '\n'
        bool eof = false;
    };
    struct Entry {
        const void* key = nullptr;  // the child's core until it has ended
        std::string name;
        long pid = 0;
        bool armed = false;
        Stream streams[2];  // stdout, stderr
    };
    struct Line {
        int stream;
        std::string text;
        std::string name;
        long pid;
    };

    void close_entry(Entry& e) noexcept {
        for (auto& s : e.streams) {
            if (e.armed && !s.eof) os::poller_remove(poller_, s.fd);
            os::close_handle(s.fd);
            s.fd = os::invalid_handle;
            s.eof = true;
        }
    }

    /// Reads stream `which` of `e` dry, appending its complete lines to `out`.
    void read_stream(Entry& e, int which, std::vector<Line>& out) {
        Stream& s = e.streams[which];
        while (!s.eof) {
            long n = os::pipe_read(s.fd, buf_.data(), buf_.size());
            if (n < 0) return;  // nothing more now
            if (n == 0) {
                s.eof = true;
                if (!s.partial.empty()) out.push_back(Line{which, std::move(s.partial), e.name, e.pid});
                s.partial.clear();
                if (e.armed) os::poller_remove(poller_, s.fd);
                os::close_handle(s.fd);
                s.fd = os::invalid_handle;
                return;
            }
            split_lines(e, which, buf_.data(), static_cast<std::size_t>(n), out);
        }
    }

    static void split_lines(Entry& e, int which, const char* data, std::size_t n, std::vector<Line>& out) {
        std::string& partial = e.streams[which].partial;
        std::size_t start = 0;
        for (std::size_t i = 0; i < n; ++i) {
            if (data[i] != '\n') continue;
            std::string text = std::move(partial);
            partial.clear();
            text.append(data + start, i - start);
            // "\r\n" ends a line too (as Python's universal newlines read it):
            // Windows programs a child runs (cmd's echo) write it.
            if (!text.empty() && text.back() == '\r') text.pop_back();
            out.push_back(Line{which, std::move(text), e.name, e.pid});
            start = i + 1;
        }
        partial.append(data + start, n - start);
        while (partial.size() >= max_line) {
            out.push_back(Line{which, partial.substr(0, max_line), e.name, e.pid});
            partial.erase(0, max_line);
        }
    }

    /// Hands lines on as records (outside the lock: a handler may start processes).
    static void emit(std::vector<Line>& lines) {
        for (Line& l : lines) {
            LogRecord r;
            r.level = l.stream == 0 ? Level::info : Level::warning;
            r.logger = l.stream == 0 ? "stdout" : "stderr";
            r.message = std::move(l.text);
            r.time = std::chrono::system_clock::now();
            r.pid = l.pid;
            r.process_name = std::move(l.name);
            try {
                handle_log_record(r);
            } catch (...) {
                // A failing handler must not cost the other lines or the child's outcome.
            }
        }
    }

    os::handle_t poller_;
    std::vector<char> buf_;  // read into under mutex_
    std::mutex mutex_;
    std::uint64_t next_id_ = 1;
    std::map<std::uint64_t, Entry> entries_;
};

/// The output pipes of one start(): made before the child, given to it, and
/// handed to the pump once the child has them.  Destroyed uncommitted (the
/// start failed), it closes everything.
class OutputCapture {
public:
    OutputCapture(OutputPump& pump, const ProcessCore& core, bool forward) : pump_(pump) {
        if (!forward) return;
        try {
            os::output_pipe(read_[0], write_[0]);
            os::output_pipe(read_[1], write_[1]);
        } catch (...) {
            close_all_ends();
            throw;
        }
        try {
            id_ = pump_.open(&core, core.name, read_[0], read_[1]);  // the pump owns the read ends now
        } catch (...) {
            close_all_ends();
            throw;
        }
    }
    ~OutputCapture() {
        if (!id_) return;
        for (auto& w : write_) os::close_handle(w);
        if (!committed_) pump_.cancel(id_);
    }
    OutputCapture(const OutputCapture&) = delete;
    OutputCapture& operator=(const OutputCapture&) = delete;

    /// BOOT's part: whether output is forwarded, and the two write ends.
    void encode(Encoder& e) const {
        e.write(id_ != 0);
        if (id_) e(e.attach(write_[0]), e.attach(write_[1]));
    }
    /// In a forked child, right after fork: descriptors 1 and 2 become the pipes.
    void redirect_in_forked_child() noexcept {
        if (!id_) return;
        try {
            os::redirect_standard_output(write_[0], write_[1]);
        } catch (...) {
            os::exit_now(1);  // cannot happen short of a descriptor table in ruins
        }
        for (int s = 0; s < 2; ++s) {
            os::close_handle(write_[s]);
            os::close_handle(read_[s]);  // the parent's
        }
    }
    /// The child holds the write ends (inherited, or sent with BOOT): close
    /// ours, so the pipes end when the child's writers do; start reading.
    void commit(long pid) {
        if (!id_) return;
        for (auto& w : write_) {
            os::close_handle(w);
            w = os::invalid_handle;
        }
        committed_ = true;
        pump_.arm(id_, pid);
    }

private:
    void close_all_ends() noexcept {
        for (int s = 0; s < 2; ++s) {
            os::close_handle(read_[s]);
            os::close_handle(write_[s]);
            read_[s] = write_[s] = os::invalid_handle;
        }
    }
    OutputPump& pump_;
    std::uint64_t id_ = 0;
    os::handle_t read_[2] = {os::invalid_handle, os::invalid_handle};
    os::handle_t write_[2] = {os::invalid_handle, os::invalid_handle};
    bool committed_ = false;
};

}  // namespace

// The handles belong to BOOT (closed with it).
void adopt_forwarded_output(Decoder& d) {
    bool forward = d.read<bool>();
    if (!forward) return;
    std::uint32_t out = 0, err = 0;
    d(out, err);
    os::redirect_standard_output(d.handle(out), d.handle(err));
}

}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/process_output.cpp
// ---- begin part: mpservice/impl/process_reactor.cpp -------------------------
// process_reactor: the parent's reactor thread - one thread watches every
// child's channel and pidfd (and the fork server's control socket) and
// resolves each ProcessCore when its child has ended.

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

// ---------------------------------------------------------------- the reactor

struct ProcessCore::Io {
    os::handle_t channel = os::invalid_handle;
    os::handle_t pidfd = os::invalid_handle;  // guarded by the core's mutex once registered
    wire::FrameReader reader;
    std::uint64_t id = 0;
    bool via_server = false;
    std::uint64_t server_generation = 0;  // which fork server made it (fork-server workers)
    std::uint64_t serial = 0;            // fork-server workers: the server's number for it
    std::optional<int> end_code;         // the exit code the child announced in END
    int signal_sent = 0;                 // the last signal the parent sent (guarded by the core's mutex)
    bool warm = false;                   // a warm child (its HELLO is read by the reactor)
    long holder = 0;                     // a warm child's address-space holder (its HELLO names it),
    os::handle_t holder_pidfd = os::invalid_handle;  // opened at HELLO, while it is certainly ours
    bool eof = false;
    bool finished = false;
    std::exception_ptr exception;
    Owned<ChildTask> task;  // a forked child's arguments, kept until it ends
};

namespace {
using namespace wire;

class Reactor {
public:
    /// The reactor of this process (started on first use).
    static Reactor& get();
    /// Called in a forked child: the parent's reactor thread does not exist here.
    static void forget_after_fork() noexcept;

    /// Starts watching a started child; on failure (std::system_error) nothing is registered.
    void add(const std::shared_ptr<ProcessCore>& core);
    /// A fork-server worker that will not be registered: drop its status when it comes.
    void discard_worker(std::uint64_t serial);
    void watch_fork_server(os::handle_t control);
    /// The fork server behind `control` was killed: stop watching it, close
    /// `control` (on the reactor thread, which may be reading it) and resolve
    /// its workers that have ended.
    void retire_fork_server(os::handle_t control);
    /// Returns once the reactor thread has run a task posted now: every event
    /// it was handling before (and the references it held for it) is done.
    void barrier();
    /// Runs `fn` on a thread that lives as long as the process: the initial
    /// thread, or else the reactor's.  A child's parent-death signal fires when
    /// the *thread* that made it ends, so children are never made on a
    /// short-lived thread.
    template <class Fn>
    auto on_long_lived_thread(Fn&& fn) -> decltype(fn());
    std::vector<std::shared_ptr<ProcessCore>> live();
    bool on_reactor_thread() const { return std::this_thread::get_id() == thread_id_; }
    bool owned_by_this_process() const { return owner_pid_ == os::current_pid(); }
    int unreaped_holders() const noexcept { return unreaped_holders_.load(); }
    /// The readers of children's forwarded output (process_output.cpp).
    OutputPump& output() { return output_; }

private:
    Reactor();
    /// Posts `task` (which must not throw) to the reactor thread and returns
    /// once it has run there; never called on the reactor thread itself.
    void run_posted_and_wait(std::function<void()> task);
    void loop();
    void on_channel(const std::shared_ptr<ProcessCore>& core);
    void on_pidfd(const std::shared_ptr<ProcessCore>& core);
    void drain(ProcessCore& core);
    void on_frame(ProcessCore& core, Frame& f);
    /// The child has ended; `status` is its exit code, or empty when its
    /// status was collected by someone else (SIGCHLD ignored, a foreign waitpid).
    void on_exit(const std::shared_ptr<ProcessCore>& core, std::optional<int> status);
    void on_fork_server();
    void fork_server_gone(os::handle_t control, std::uint64_t generation, bool close);
    void finish(const std::shared_ptr<ProcessCore>& core, std::optional<int> status);
    /// Collects the exit status of a direct child (not a fork-server worker).
    void reap(const std::shared_ptr<ProcessCore>& core, bool block);
    /// A warm child's address-space holder (os::hold_address_space_past_exit),
    /// which ends right after the child: reaped when its pidfd says so.
    void watch_holder(long pid, os::handle_t pidfd) noexcept;
    void on_holder(std::uint64_t key) noexcept;
    std::shared_ptr<ProcessCore> find(std::uint64_t id);

    static constexpr std::uint64_t tag_channel = 0, tag_pidfd = 1, tag_wake = 2, tag_server = 3;
    static constexpr std::uint64_t token_output = 1 << 2 | tag_wake;  // output_'s poller (id 1 of tag_wake)
    static constexpr std::uint64_t first_holder_id = 2;                // holders: ids 2, 3, ... of tag_wake
    OutputPump output_;

    os::handle_t poller_ = os::invalid_handle;
    os::handle_t wake_ = os::invalid_handle;
    os::handle_t server_ = os::invalid_handle;
    std::uint64_t server_generation_ = 0;                  // counts the fork servers watched
    std::unordered_set<std::uint64_t> dead_generations_;   // fork servers that are gone (reactor thread)
    std::mutex mutex_;
    std::uint64_t next_id_ = 1;
    std::unordered_map<std::uint64_t, std::shared_ptr<ProcessCore>> children_;
    std::unordered_map<std::uint64_t, std::uint64_t> server_serials_;  // fork-server serial -> id
    std::unordered_map<std::uint64_t, int> early_exits_;               // statuses before registration
    std::unordered_set<std::uint64_t> finished_serials_;               // ended before their status came
    struct Holder {
        long pid;
        os::handle_t pidfd;
    };
    std::unordered_map<std::uint64_t, Holder> holders_;  // reactor thread only
    std::atomic<int> unreaped_holders_{0};               // its size, for test_unreaped_holders
    std::uint64_t next_holder_ = first_holder_id;
    std::deque<std::function<void()>> tasks_;
    // What the reactor works on lives here rather than on its stack: a child
    // forked meanwhile has no reactor thread, and its leak checker scans
    // reachable memory only (this object stays reachable there).
    std::deque<std::function<void()>> running_tasks_;
    std::shared_ptr<ProcessCore> current_;
    void* stack_low_ = nullptr;  // the reactor thread's stack: a forked child's leak checker must scan it
    std::size_t stack_size_ = 0;
    std::thread::id thread_id_;
    long owner_pid_ = 0;
};

std::atomic<Reactor*> g_reactor{nullptr};
std::mutex* g_reactor_mutex = new std::mutex;

Reactor& Reactor::get() {
    Reactor* r = g_reactor.load(std::memory_order_acquire);
    if (r) return *r;
    std::lock_guard<std::mutex> lk(*g_reactor_mutex);
    r = g_reactor.load(std::memory_order_relaxed);
    if (!r) {
        register_after_fork_reset();  // a forked child must not take our reactor for its own
        r = new Reactor;  // never deleted: its thread runs until the process ends
        g_reactor.store(r, std::memory_order_release);
        std::atexit(at_exit_handler);
    }
    return *r;
}

// The reactors of the ancestors a forked child stops using (one per fork
// generation that had one); kept reachable so that a leak checker in a child
// that calls exit() does not report them.
void* volatile g_abandoned_reactors[16];
int g_abandoned_reactor_count = 0;

void Reactor::forget_after_fork() noexcept {
    Reactor* r = g_reactor.exchange(nullptr);
    if (r) {
        os::leak_checker_root(r->stack_low_, r->stack_size_);
        if (g_abandoned_reactor_count < 16) g_abandoned_reactors[g_abandoned_reactor_count++] = r;
    }
    ::new (g_reactor_mutex) std::mutex();  // may have been copied held by another thread
}

Reactor::Reactor() : owner_pid_(os::current_pid()) {
    poller_ = os::poller_create();
    wake_ = os::wake_event_create();
    os::poller_add(poller_, wake_, tag_wake);
    os::poller_add(poller_, output_.poller(), token_output);
    std::thread t([this] {
        os::current_thread_stack(&stack_low_, &stack_size_);
        loop();
    });
    thread_id_ = t.get_id();
    t.detach();
}

void Reactor::run_posted_and_wait(std::function<void()> task) {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        tasks_.push_back([&] {
            task();
            std::lock_guard<std::mutex> l2(m);
            done = true;
            cv.notify_one();
        });
    }
    os::wake_event_signal(wake_);
    std::unique_lock<std::mutex> lk(m);
    cv.wait(lk, [&] { return done; });
}

template <class Fn>
auto Reactor::on_long_lived_thread(Fn&& fn) -> decltype(fn()) {
    if (os::is_main_thread() || on_reactor_thread()) return fn();
    std::optional<decltype(fn())> value;
    std::exception_ptr error;
    run_posted_and_wait([&] {
        try {
            value.emplace(fn());
        } catch (...) {
            error = std::current_exception();
        }
    });
    if (error) std::rethrow_exception(error);
    return std::move(*value);
}

void Reactor::barrier() {
    if (!on_reactor_thread()) run_posted_and_wait([] {});
}

void Reactor::add(const std::shared_ptr<ProcessCore>& core) {
    auto& io = *core->io_;
    std::optional<int> early;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        io.id = next_id_++;
        io.server_generation = server_generation_;
        children_[io.id] = core;
        if (io.via_server) {
            auto it = early_exits_.find(io.serial);
            if (it != early_exits_.end()) {
                early = it->second;
                early_exits_.erase(it);
            } else {
                server_serials_[io.serial] = io.id;
            }
        }
        try {
            os::poller_add(poller_, io.channel, io.id << 2 | tag_channel);
            if (io.pidfd != os::invalid_handle) os::poller_add(poller_, io.pidfd, io.id << 2 | tag_pidfd);
        } catch (...) {
            os::poller_remove(poller_, io.channel);
            children_.erase(io.id);
            if (io.via_server) {
                server_serials_.erase(io.serial);
                if (early) early_exits_[io.serial] = *early;
            }
            throw;
        }
        if (early) {
            int code = *early;
            tasks_.push_back([this, core, code] { on_exit(core, code); });
        }
    }
    if (early) os::wake_event_signal(wake_);
}

void Reactor::retire_fork_server(os::handle_t control) {
    {
        std::lock_guard<std::mutex> lk(mutex_);
        std::uint64_t generation = server_generation_;
        tasks_.push_back([this, control, generation] { fork_server_gone(control, generation, true); });
    }
    os::wake_event_signal(wake_);
}

void Reactor::fork_server_gone(os::handle_t control, std::uint64_t generation, bool close) {
    // Its workers die with it (parent-death signal); those whose channel has
    // ended already will hear no status from it.
    std::vector<std::shared_ptr<ProcessCore>> eof_workers;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        os::poller_remove(poller_, control);
        if (server_ == control) server_ = os::invalid_handle;
        dead_generations_.insert(generation);
        for (auto& kv : children_) {
            auto& io = *kv.second->io_;
            if (io.via_server && io.server_generation == generation && io.eof) eof_workers.push_back(kv.second);
        }
    }
    if (close) os::close_handle(control);
    for (auto& c : eof_workers) on_exit(c, std::optional<int>(-os::signal_kill()));
}

void Reactor::discard_worker(std::uint64_t serial) {
    std::lock_guard<std::mutex> lk(mutex_);
    if (!early_exits_.erase(serial)) finished_serials_.insert(serial);
}

void Reactor::watch_fork_server(os::handle_t control) {
    std::lock_guard<std::mutex> lk(mutex_);
    if (server_ == control) return;
    server_ = control;
    ++server_generation_;
    os::poller_add(poller_, control, tag_server);
}

std::vector<std::shared_ptr<ProcessCore>> Reactor::live() {
    std::lock_guard<std::mutex> lk(mutex_);
    std::vector<std::shared_ptr<ProcessCore>> out;
    for (auto& kv : children_) out.push_back(kv.second);
    return out;
}

std::shared_ptr<ProcessCore> Reactor::find(std::uint64_t id) {
    std::lock_guard<std::mutex> lk(mutex_);
    auto it = children_.find(id);
    return it == children_.end() ? nullptr : it->second;
}

void Reactor::loop() {
    std::uint64_t tokens[64];
    for (;;) {
        int n;
        try {
            n = os::poller_wait(poller_, tokens, 64, -1);
        } catch (...) {
            continue;
        }
        for (int i = 0; i < n; ++i) {
            std::uint64_t tag = tokens[i] & 3, id = tokens[i] >> 2;
            try {
                if (tokens[i] == token_output) {
                    output_.on_ready();
                } else if (tag == tag_wake && id >= first_holder_id) {
                    on_holder(id);
                } else if (tag == tag_wake) {
                    os::wake_event_drain(wake_);
                    {
                        std::lock_guard<std::mutex> lk(mutex_);
                        running_tasks_.swap(tasks_);
                    }
                    for (auto& t : running_tasks_) t();
                    running_tasks_.clear();
                } else if (tag == tag_server) {
                    on_fork_server();
                } else if ((current_ = find(id))) {
                    if (tag == tag_channel) on_channel(current_);
                    else on_pidfd(current_);
                }
            } catch (...) {
                // The reactor must survive anything; a broken child resolves at
                // its exit.  An exit event that could not be handled would stay
                // ready and spin this loop: resolve that child with the error.
                if (current_ && tag == tag_pidfd && !current_->io_->finished) {
                    if (!current_->io_->exception) current_->io_->exception = std::current_exception();
                    try {
                        finish(current_, std::nullopt);
                    } catch (...) {
                        std::lock_guard<std::mutex> lk(current_->io_mutex());
                        os::poller_remove(poller_, current_->io_->pidfd);
                    }
                }
            }
            running_tasks_.clear();
            current_.reset();
        }
    }
}

void Reactor::reap(const std::shared_ptr<ProcessCore>& core, bool block) {
    int code = 0;
    switch (os::reap_child(core->pid_, core->io_->pidfd, block, &code)) {
        case os::ReapResult::running: return;  // not ended (a spurious wake-up)
        case os::ReapResult::reaped: on_exit(core, code); return;
        case os::ReapResult::reaped_elsewhere: on_exit(core, std::nullopt); return;
    }
}

void Reactor::watch_holder(long pid, os::handle_t pidfd) noexcept {
    if (pidfd == os::invalid_handle) return;  // reaped already (SIGCHLD ignored, a foreign waitpid)
    const std::uint64_t key = next_holder_++;
    try {
        holders_.emplace(key, Holder{pid, pidfd});
        os::poller_add(poller_, pidfd, key << 2 | tag_wake);
        ++unreaped_holders_;
    } catch (...) {
        holders_.erase(key);
        int code;
        os::send_signal(pid, pidfd, os::signal_kill());  // out of memory: reap it here instead
        try {
            os::reap_child(pid, pidfd, true, &code);
        } catch (...) {
        }
        os::close_handle(pidfd);
    }
}

void Reactor::on_holder(std::uint64_t key) noexcept {
    auto it = holders_.find(key);
    if (it == holders_.end()) return;
    int code;
    try {
        if (os::reap_child(it->second.pid, it->second.pidfd, false, &code) == os::ReapResult::running) return;
    } catch (...) {
    }
    try {
        os::poller_remove(poller_, it->second.pidfd);
    } catch (...) {
    }
    os::close_handle(it->second.pidfd);
    holders_.erase(it);
    --unreaped_holders_;
}

void Reactor::on_pidfd(const std::shared_ptr<ProcessCore>& core) {
    trace_phase(StartPhase::reactor_exit);
    auto& io = *core->io_;
    if (!io.via_server) {
        reap(core, false);
        return;
    }
    // A fork-server worker has ended (the server reaps it).  If it said how it
    // would exit (END), we know all there is: finish now, without waiting for
    // the server's report.  Otherwise the server's status tells.
    {
        std::lock_guard<std::mutex> lk(core->io_mutex());
        os::poller_remove(poller_, io.pidfd);
    }
    drain(*core);
    if (io.end_code) {
        {
            std::lock_guard<std::mutex> lk(mutex_);
            if (server_serials_.erase(io.serial)) finished_serials_.insert(io.serial);
        }
        finish(core, *io.end_code);
    }
}

void Reactor::on_channel(const std::shared_ptr<ProcessCore>& core) {
    auto& io = *core->io_;
    drain(*core);
    if (!io.eof || io.finished) return;
    // No pidfd (old kernel): the end of the channel means the child is exiting.
    if (!io.via_server && io.pidfd == os::invalid_handle) {
        reap(core, true);
    } else if (io.via_server && dead_generations_.count(io.server_generation)) {
        on_exit(core, std::optional<int>(-os::signal_kill()));
    }
}

void Reactor::drain(ProcessCore& core) {
    auto& io = *core.io_;
    if (io.eof) return;
    Frame f;
    for (;;) {
        long n = io.reader.fill(io.channel, true);
        while (io.reader.next(f)) on_frame(core, f);
        if (n == 0) {
            io.eof = true;
            os::poller_remove(poller_, io.channel);
            return;
        }
        if (n < 0) return;
    }
}

void Reactor::on_frame(ProcessCore& core, Frame& f) {
    auto& io = *core.io_;
    switch (f.kind) {
        case frame_log: {
            close_all(f.handles);
            try {
                Decoder d(f.payload);
                LogRecord record = d.read<LogRecord>();
                handle_log_record(record);
            } catch (...) {
                // A failing handler or a torn record must not lose the child's outcome.
            }
            break;
        }
        case frame_value:
            core.value_bytes_ = std::move(f.payload);
            core.value_handles_ = std::move(f.handles);
            core.has_value_ = true;
            break;
        case frame_exception:
            close_all(f.handles);
            try {
                Decoder d(f.payload);
                io.exception = decode_exception(d);
            } catch (...) {
                io.exception = std::current_exception();
            }
            break;
        case frame_end:
            close_all(f.handles);
            try {
                Decoder d(f.payload);
                io.end_code = d.read<std::int32_t>();
                trace_phase(StartPhase::reactor_outcome);
            } catch (...) {
            }
            break;
        default:  // HELLO: a warm child's names its address-space holder
            close_all(f.handles);
            if (f.kind == frame_hello && io.holder == 0 && (io.holder = holder_named_in_hello(f.payload)) > 0)
                io.holder_pidfd = os::process_handle(io.holder);
            break;
    }
}

void Reactor::on_fork_server() {
    ServerStatus st;
    for (;;) {
        long n = os::channel_read(server_, &st, sizeof st, nullptr, true);
        if (n < 0) return;
        if (n == 0) {  // the server died (the runtime still owns `server_`: not closed here)
            std::uint64_t generation;
            {
                std::lock_guard<std::mutex> lk(mutex_);
                generation = server_generation_;
            }
            fork_server_gone(server_, generation, false);
            return;
        }
        if (n != static_cast<long>(sizeof st)) continue;
        std::shared_ptr<ProcessCore>& core = current_;
        core.reset();
        {
            std::lock_guard<std::mutex> lk(mutex_);
            auto it = server_serials_.find(st.serial);
            if (it == server_serials_.end()) {
                // Finished already (through its pidfd), or not registered yet.
                if (!finished_serials_.erase(st.serial)) early_exits_[st.serial] = st.code;
                continue;
            }
            auto c = children_.find(it->second);
            server_serials_.erase(it);
            if (c != children_.end()) core = c->second;
        }
        if (core) on_exit(core, st.code);
        core.reset();
    }
}

void Reactor::on_exit(const std::shared_ptr<ProcessCore>& core, std::optional<int> status) {
    if (core->io_->finished) return;
    drain(*core);  // the child is gone: everything it wrote is already queued
    finish(core, status);
}

void Reactor::finish(const std::shared_ptr<ProcessCore>& core, std::optional<int> status) {
    auto& io = *core->io_;
    output_.drain_for(core.get(), core->pid_);  // the child's last lines before its outcome
    int signal_sent;
    {
        std::lock_guard<std::mutex> lk(core->io_mutex());
        signal_sent = io.signal_sent;
    }
    // Without the exit status, say what is known: the code the child announced
    // in END (it exits with exactly that code once END is sent), else the
    // signal we sent it, else nothing - an error that says so.
    bool status_lost = false;
    if (!status) {
        if (io.end_code) status = io.end_code;
        else if (signal_sent) status = -signal_sent;
        else status_lost = true;
    }
    const int code = status.value_or(255);
    io.finished = true;
    if (!io.eof) os::poller_remove(poller_, io.channel);
    {
        std::lock_guard<std::mutex> lk(mutex_);
        children_.erase(io.id);
        if (io.via_server) server_serials_.erase(io.serial);
    }
    std::exception_ptr error = io.exception, result_error;
    std::string who = describe_process(core->name, core->pid_);
    if (status_lost && !error && !core->has_value_) {
        error = std::make_exception_ptr(ProcessError(
            who + " ended without reporting an outcome, and its exit status was collected by someone else "
                  "(SIGCHLD is ignored, or another waitpid() took it): how it ended is unknown",
            code));
    } else if (!error && !core->has_value_) {
        if (code == 0) {
            result_error = std::make_exception_ptr(ProcessError(who + " exited with code 0 before returning a value", 0));
        } else if (code == -os::signal_terminate()) {
            result_error = std::make_exception_ptr(ProcessError(who + " was terminated by SIGTERM", code));
        } else if (code > 0) {
            error = std::make_exception_ptr(ProcessError(who + " exited with code " + std::to_string(code), code));
        } else {
            std::string text = who + " was killed by signal " + os::signal_name(-code) + " (" +
                               std::to_string(-code) + ")";
            if (-code == os::signal_kill()) text += " - possibly out of memory";
            error = std::make_exception_ptr(ProcessError(text, code));
        }
    }
    Owned<ChildTask> task;
    {
        std::lock_guard<std::mutex> lk(core->io_mutex());
        core->exitcode_ = code;
        core->exited_ = true;
        os::poller_remove(poller_, io.pidfd);  // kept open for waiters; closed with the core
        os::close_handle(io.channel);
        io.channel = os::invalid_handle;
        task = std::move(io.task);
    }
    task.reset();  // a forked child's argument copies: released before anyone learns it ended
    if (io.holder_pidfd != os::invalid_handle) {
        watch_holder(io.holder, io.holder_pidfd);
        io.holder_pidfd = os::invalid_handle;
    }
    core->resolve(error, result_error);
    trace_phase(StartPhase::resolved);
}

}  // namespace

void at_exit_handler() {
    Reactor* r = g_reactor.load();
    if (!r || !r->owned_by_this_process()) return;
    // Like Python: daemon children are terminated, the others are waited for.
    auto children = r->live();
    for (auto& c : children)
        if (c->daemon()) c->send_signal(os::signal_terminate());
    for (auto& c : children) c->wait_until(os::no_deadline);
}

void forget_reactor_after_fork() noexcept { Reactor::forget_after_fork(); }

void test_reactor_barrier() {
    if (g_reactor.load(std::memory_order_acquire)) Reactor::get().barrier();
}

int test_unreaped_holders() noexcept {
    Reactor* r = g_reactor.load(std::memory_order_acquire);
    return r ? r->unreaped_holders() : 0;
}

}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/process_reactor.cpp
// ---- begin part: mpservice/impl/process_core.cpp ----------------------------
// process_core: ProcessCore (start, wait, signals) and the public process
// functions (init, contexts, cpu_count, current/parent/active processes).

#include <algorithm>
#include <cerrno>
#include <cstdint>
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

// ---------------------------------------------------------------- ProcessCore

ProcessCore::ProcessCore(const Context& ctx) : method_(ctx.start_method()), io_(new Io()) {
    Runtime& r = rt();
    int n = r.next_child.fetch_add(1);
    identity_ = r.identity.empty() ? std::to_string(n) : r.identity + ":" + std::to_string(n);
    name = "Process-" + identity_;
}

ProcessCore::~ProcessCore() {
    for (auto h : value_handles_) os::close_handle(h);
    if (io_) {
        os::close_handle(io_->channel);
        os::close_handle(io_->pidfd);
        os::close_handle(io_->holder_pidfd);  // (not moved to the reactor's watch: it is gone already)
    }
}

void test_corrupt_next_fingerprint() noexcept { rt().corrupt_next_fingerprint = true; }
void test_set_initialized(bool initialized) noexcept { rt().initialized = initialized; }
long test_fork_server_pid() noexcept {
    std::lock_guard<std::mutex> lk(*rt().forkserver_mutex);
    return rt().forkserver.pid;
}
void test_set_fork_server_timeout(std::chrono::milliseconds timeout) noexcept {
    rt().forkserver_timeout_ms = timeout.count();
}

namespace {
using namespace wire;

/// Calls, once in the parent before its first fork, the std::string members a
/// forked child calls only there (adopting its name and identity, building
/// its outcome): the C++ library's functions are bound lazily, so each one
/// would otherwise be looked up anew in every child - a walk of the
/// libraries' symbol tables and a write to the child's copy of the GOT, page
/// faults costing ~3 us each (LD_DEBUG=bindings showed the move constructor,
/// _M_assign, append and _M_append resolved in every forked child).
void bind_forked_child_string_calls() {
    static volatile std::size_t sink = 0;
    std::string source(sink + 40, 'x');  // longer than the in-place buffer: the heap paths
    std::string copy;
    copy = source;
    copy.append(source.data(), 3);
    copy.append(source);
    std::string moved(std::move(copy));
    copy = moved;
    sink = moved.size() + copy.size();
}

std::string boot_payload(const ProcessCore& core, const ChildTask& task, const OutputCapture& output,
                         std::vector<os::handle_t>& handles) {
    os::ModuleAddress target, tramp;
    if (!os::module_address(task.target, target) ||
        !os::module_address(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(task.trampoline)), tramp))
        throw std::invalid_argument("mpservice: the target is not in any loaded module");
    std::string target_fp = fingerprint_of(target.module), tramp_fp = fingerprint_of(tramp.module);
    if (rt().corrupt_next_fingerprint.exchange(false)) target_fp += "-corrupted";
    Encoder e;
    e(protocol_version, target.module, static_cast<std::uint64_t>(target.offset), target_fp, tramp.module,
      static_cast<std::uint64_t>(tramp.offset), tramp_fp, core.name, core.identity_, process_name(),
      static_cast<std::int64_t>(os::current_pid()), core.daemon(), static_cast<std::int32_t>(log_level()));
    encode_parent_present(e, core.method_);
    output.encode(e);
    task.encode_args(e);
    handles = e.handles();
    return std::move(e.bytes());
}
/// Kills and reaps a fork server that is gone or does not answer, so that the
/// next fork-server start makes a new one.  Caller holds forkserver_mutex.
void drop_fork_server(Runtime& r, Reactor& reactor) noexcept {
    if (r.forkserver.pid > 0) {
        os::send_signal(r.forkserver.pid, os::invalid_handle, os::signal_kill());  // its workers die with it
        int code;
        try {
            os::reap_child(r.forkserver.pid, os::invalid_handle, true, &code);
        } catch (...) {
        }
    }
    if (r.forkserver.control != os::invalid_handle) {
        try {
            reactor.retire_fork_server(r.forkserver.control);  // closes it
        } catch (...) {
            // Out of memory for the task: keep the descriptor rather than race the reactor.
        }
    }
    r.forkserver = ForkServerLink{};
}

/// Reads the worker's HELLO, waiting at most the fork-server timeout.
bool read_hello(wire::FrameReader& reader, os::handle_t channel, Frame& hello, long long timeout_ms) {
    const auto until = os::Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!reader.next(hello)) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - os::Clock::now()).count();
        if (left <= 0 || !os::wait_readable(&channel, 1, static_cast<int>(std::min<long long>(left + 1, 1 << 30))))
            return false;
        if (reader.fill(channel, true) == 0) throw Error("mpservice: the fork server failed to start a worker");
    }
    return true;
}

/// Undoes a start that failed after the child was made: kills and reaps the
/// child (a fork-server worker is reaped by the server) and forgets it, so that
/// nothing is left behind and start() can be tried again.
void abandon_child(ProcessCore& core, Reactor& reactor) noexcept {
    auto& io = *core.io_;
    os::send_signal(core.pid_, io.pidfd, os::signal_kill());
    if (io.via_server) {
        reactor.discard_worker(io.serial);  // its status, when the server reports it, is not wanted
    } else {
        int code;
        try {
            os::reap_child(core.pid_, io.pidfd, true, &code);  // SIGKILLed: the wait is short
        } catch (...) {
        }
        if (io.warm) end_holder_named_on(io.channel);  // never registered: its HELLO is unread
    }
    os::close_handle(io.channel);
    os::close_handle(io.pidfd);
    io.channel = io.pidfd = os::invalid_handle;
    io.via_server = false;
    io.reader.reset();
    std::lock_guard<std::mutex> lk(core.io_mutex());
    core.pid_ = 0;
}
}  // namespace

void ProcessCore::start(Owned<ChildTask>& task) {
    if (started() || !task) throw InvalidStateError("mpservice: " + describe_process(name, pid_) + " was already started");
    trace_phase(StartPhase::start_entered);
    register_exit_announcement();  // inherited by forked children (see process_child)
    Runtime& r = rt();
    if (method_ != StartMethod::fork) {
        if (!r.initialized)
            throw InvalidStateError(
                "mpservice: call mpservice::init(argc, argv) as the first line of main() before starting a "
                "process with the spawn or forkserver context (the child runs its task inside init)");
        if (!task->target)
            throw std::invalid_argument(
                "mpservice: this target has no plain-function form (a lambda with captures, a functor?); use "
                "a free function, a static member function or a capture-less lambda - or the fork context");
    }
    Reactor& reactor = Reactor::get();
    auto& io = *io_;

    std::vector<os::handle_t> boot_handles;
    std::string boot;
    OutputCapture output(reactor.output(), *this, forward_output_);
    if (method_ != StartMethod::fork) boot = boot_payload(*this, *task, output, boot_handles);  // encode errors throw here

    // A warm child (process_warm.cpp) comes with its channel; any other start makes one.
    std::optional<WarmChild> warm;
    if (method_ == StartMethod::spawn && warm_start_) warm = take_warm_child();
    os::handle_t parent_end, child_end = os::invalid_handle;
    if (warm) parent_end = warm->channel;
    else os::channel_pair(parent_end, child_end);
    io.channel = parent_end;
    long pid = 0;
    bool boot_sent = false;
    try {
        switch (method_) {
            case StartMethod::spawn: {
                if (warm) {
                    pid = warm->pid;
                    io.pidfd = warm->pidfd;
                    io.warm = true;
                    break;
                }
                std::string marker = child_marker + std::to_string(child_end) + ":" + std::to_string(os::current_pid());
                pid = reactor.on_long_lived_thread([&] { return os::spawn_self(r.argv0, marker, child_end); });
                os::close_handle(child_end);
                child_end = os::invalid_handle;
                io.pidfd = os::process_handle(pid);
                break;
            }
            case StartMethod::forkserver: {
                std::lock_guard<std::mutex> lk(*r.forkserver_mutex);
                if (r.forkserver.control == os::invalid_handle)
                    reactor.on_long_lived_thread([] {
                        start_fork_server();  // not made at init (we are a child): make one now
                        return 0;
                    });
                reactor.watch_fork_server(r.forkserver.control);
                // A small BOOT waits in the socket, so the worker starts at once;
                // a big one would block us before the worker exists: it goes later.
                if (boot.size() <= boot_early_limit) {
                    write_frame(parent_end, frame_boot, boot, boot_handles);
                    boot_sent = true;
                }
                char request = 'S';
                if (!os::channel_write(r.forkserver.control, &request, 1, nullptr, 0, &child_end, 1)) {
                    drop_fork_server(r, reactor);  // the next start makes a new one
                    throw Error("mpservice: the fork server is gone (it is replaced at the next start)");
                }
                os::close_handle(child_end);
                child_end = os::invalid_handle;
                Frame hello;
                if (!read_hello(io.reader, parent_end, hello, r.forkserver_timeout_ms.load())) {
                    long server = r.forkserver.pid;
                    drop_fork_server(r, reactor);
                    throw Error("mpservice: the fork server (pid " + std::to_string(server) +
                                ") did not start a worker in time (stopped?); it was killed and is replaced at "
                                "the next start");
                }
                if (hello.kind != frame_hello) throw Error("mpservice: the fork server failed to start a worker");
                Decoder d(hello.payload);
                std::int64_t worker_pid;
                d(worker_pid, io.serial);
                pid = static_cast<long>(worker_pid);
                io.pidfd = os::process_handle(pid);  // for signals; the exit status comes from the server
                io.via_server = true;
                break;
            }
            case StartMethod::fork: {
                static const bool bound = (bind_forked_child_string_calls(), true);
                (void)bound;
                // Built here, not in the child: a table another thread was
                // building at the fork would stay locked in the child.
                prepare_exception_types_for_fork();
                flush_stdio();  // or the child would write the parent's buffered output again
                prepare_child_link();  // made here, once: in the child its first use would allocate (page faults)
                long parent = os::current_pid();
                Level level = log_level();  // read here: the child must not take the logging lock
                std::string parent_name = process_name();  // read here: in the child its first use allocates
                ChildTask& t = *task;
                pid = reactor.on_long_lived_thread([&] {
                    long p = os::fork_process();
                    if (p == 0) {
                        trace_phase(StartPhase::child_running);
                        output.redirect_in_forked_child();
                        run_forked_child(child_end, parent_end, t, name, identity_, parent_name, parent, level);
                    }
                    return p;
                });
                os::close_handle(child_end);
                child_end = os::invalid_handle;
                io.pidfd = os::process_handle(pid);
                break;
            }
        }
    } catch (...) {
        os::close_handle(child_end);
        os::close_handle(parent_end);
        io.channel = os::invalid_handle;
        throw;
    }
    trace_phase(StartPhase::child_made);
    // A forked child runs on its copy of the arguments; ours stay until it
    // ends (the reactor drops them then), which covers the child taking its
    // own references to the proxies it inherited.
    if (method_ == StartMethod::fork) io.task = std::move(task);
    {
        std::lock_guard<std::mutex> lk(mutex_);
        pid_ = pid;
    }
    try {
        // A child that died before reading BOOT shows up as its exit status
        // (the write returns false); any other failure means the child cannot
        // run: it is killed and reaped here, so no child is left behind.
        if (method_ != StartMethod::fork && !boot_sent) write_frame(parent_end, frame_boot, boot, boot_handles);
        reactor.add(shared_from_this());
    } catch (const std::system_error& e) {
        abandon_child(*this, reactor);
        throw std::system_error(e.code(), "mpservice: could not start " + describe_process(name, pid) +
                                              " (sending its task failed; the child was killed): " + e.what());
    } catch (...) {
        abandon_child(*this, reactor);
        throw;
    }
    mark_started();
    output.commit(pid);  // the child has the pipes' write ends now (BOOT was sent)
    // Spawn and fork-server children got the arguments encoded: drop our copies
    // now (a proxy argument must not keep its object alive after the child took
    // it over).  (A forked child's task was kept above, until the child ends.)
    task.reset();
    trace_phase(StartPhase::start_returned);
}

bool ProcessCore::wait_until(os::Deadline deadline) const {
    if (done_relaxed()) return true;
    os::handle_t exit_handle;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        exit_handle = io_->pidfd;  // stays open until this core is destroyed
    }
    if (exit_handle != os::invalid_handle) {
        int timeout_ms = -1;
        if (deadline != os::no_deadline) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - os::Clock::now()).count();
            timeout_ms = left <= 0 ? 0 : static_cast<int>(std::min<long long>(left + 1, 1 << 30));
        }
        if (os::wait_readable(&exit_handle, 1, timeout_ms)) {
            trace_phase(StartPhase::waiter_woke);
            // The child has ended; the reactor, woken by the same event, is
            // draining and resolving right now: wait for it briefly, awake.
            auto until = os::Clock::now() + std::chrono::microseconds(500);
            while (!done_relaxed() && os::Clock::now() < until) std::this_thread::yield();
        }
    }
    return FutureCore::wait_until(deadline);
}

long ProcessCore::pid() const {
    std::lock_guard<std::mutex> lk(mutex_);
    return pid_;
}

std::optional<int> ProcessCore::exitcode() const {
    std::lock_guard<std::mutex> lk(mutex_);
    if (!exited_) return std::nullopt;
    return exitcode_;
}

std::optional<int> ProcessBase::exitcode() const { return static_cast<const ProcessCore&>(core()).exitcode(); }

bool ProcessCore::is_alive() const { return started() && !exitcode().has_value(); }

bool ProcessCore::has_value() const { return has_value_; }

void ProcessCore::send_signal(int sig) {
    std::lock_guard<std::mutex> lk(mutex_);
    if (pid_ == 0 || exited_) return;
    // Remembered: if someone else collects the exit status, this is what is known of the end.
    if (os::send_signal(pid_, io_->pidfd, sig)) io_->signal_sent = sig;
}

void ProcessCore::set_daemon(bool daemon) {
    if (started()) throw InvalidStateError("mpservice: set_daemon() after start()");
    daemon_ = daemon;
}

void ProcessCore::release() noexcept {
    try {
        if (!started() || done()) return;
        if (daemon_) send_signal(os::signal_terminate());
        wait_until(os::no_deadline);
    } catch (...) {
    }
}

os::handle_t exit_handle_of(const ProcessCore& p) {
    std::lock_guard<std::mutex> lk(p.io_mutex());
    return p.io_ ? p.io_->pidfd : os::invalid_handle;  // open until the core is destroyed
}

}  // namespace detail

// ---------------------------------------------------------------- public functions

namespace detail {
namespace {
/// The exit code of a program that refuses to act as a child (a forged or
/// misplaced marker): EX_NOPERM of <sysexits.h>.
constexpr int child_refused_exit_code = 77;

[[noreturn]] void refuse_child_mode(const std::string& why) {
    std::string text = "mpservice: refusing to run as a child process: " + why +
                       " (the child marker is meant only for processes started by mpservice)\n";
    os::write_stderr(text.data(), text.size());
    os::exit_now(child_refused_exit_code);
}

/// Parses "<digits>" into `out`; false on anything else.
bool parse_number(const char*& p, long& out) {
    if (*p < '0' || *p > '9') return false;
    char* end = nullptr;
    errno = 0;
    out = std::strtol(p, &end, 10);
    if (errno != 0 || end == p) return false;
    p = end;
    return true;
}

/// Child mode, if this process was started by mpservice as a spawn child:
/// the marker is argv[1], the process is not in secure-execution mode (a
/// caller of a set-user-ID program must not make it run code of its choice),
/// and the channel named by the marker was made by our parent, of our user.
/// Anything else carrying the marker is refused with a message and exit code
/// 77 - never a silent run of main() or of the frame.
void enter_child_mode_if_marked(int argc, char** argv) {
    if (argc <= 0 || !argv) return;
    const std::size_t marker_len = sizeof child_marker - 1;
    for (int i = 2; i < argc && argv[i]; ++i)
        if (std::strncmp(argv[i], child_marker, marker_len) == 0)
            refuse_child_mode("the marker argument is accepted only as the first argument (found at argv[" +
                              std::to_string(i) + "])");
    if (argc < 2 || !argv[1] || std::strncmp(argv[1], child_marker, marker_len) != 0) return;
    const char* p = argv[1] + marker_len;
    long fd = -1, parent = -1;
    bool warm = false;  // ":w": exec'd ahead of demand (a warm spawn child)
    if (!parse_number(p, fd) || *p++ != ':' || !parse_number(p, parent))
        refuse_child_mode("malformed marker '" + std::string(argv[1]) + "'");
    if (std::strcmp(p, warm_marker_suffix) == 0) {
        warm = true;
        p += sizeof warm_marker_suffix - 1;
    }
    if (*p != '\0') refuse_child_mode("malformed marker '" + std::string(argv[1]) + "'");
    if (os::secure_execution())
        refuse_child_mode("the program runs in secure-execution mode (set-user-ID, set-group-ID or capabilities)");
    // Our parent died before we got here (we were re-parented): nobody is left
    // to serve, and nothing runs; leave quietly, as a child whose parent dies.
    if (parent != os::parent_pid() && !os::pid_alive(parent)) os::exit_now(1);
    if (parent != os::parent_pid())
        refuse_child_mode("the marker names process " + std::to_string(parent) + " as the parent, but the parent is " +
                          std::to_string(os::parent_pid()));
    long peer_pid = 0, peer_uid = 0;
    if (fd <= INT32_MAX) fd = static_cast<long>(os::adopt_channel(static_cast<os::handle_t>(fd), parent));
    if (fd < 0 || fd > INT32_MAX || !os::channel_peer(static_cast<os::handle_t>(fd), &peer_pid, &peer_uid))
        refuse_child_mode("descriptor " + std::to_string(fd) + " is not a local stream channel");
    if (peer_pid != parent)
        refuse_child_mode("the channel was made by process " + std::to_string(peer_pid) + ", not by the parent (" +
                          std::to_string(parent) + ")");
    if (!os::is_own_user(peer_uid))
        refuse_child_mode("the channel was made by user " + std::to_string(peer_uid) + ", not by this process's user");
    run_bootstrapped_child(static_cast<os::handle_t>(fd), parent, warm ? ChildKind::warm_spawned : ChildKind::spawned);
}
}  // namespace
}  // namespace detail

void init(int argc, char** argv) {
    auto& r = detail::rt();
    detail::enter_child_mode_if_marked(argc, argv);  // a child never returns from here
    if (r.initialized) return;
    r.initialized = true;
    if (argc > 0 && argv && argv[0]) r.argv0 = argv[0];
    try {
        detail::start_fork_server();
    } catch (...) {
        // No fork server now; the fork-server context makes one at first use.
    }
}

const char* Context::name() const noexcept {
    switch (method_) {
        case StartMethod::spawn: return "spawn";
        case StartMethod::fork: return "fork";
        case StartMethod::forkserver: return "forkserver";
    }
    return "spawn";
}

const Context& get_context(const std::string& method) {
    static const SpawnContext spawn;
    static const ForkContext fork;
    static const ForkServerContext forkserver;
    if (method.empty()) return default_context();
    if (method == "spawn") return spawn;
    if (method == "fork") return fork;
    if (method == "forkserver") return forkserver;
    throw std::invalid_argument("mpservice: unknown start method '" + method +
                                "' (expected \"spawn\", \"fork\" or \"forkserver\")");
}

namespace {
/// The default start method: kUnset until set_start_method or its first use.
/// An atomic rather than a lock: a fork child may read it while another
/// thread of its parent was setting it at the moment of the fork.
constexpr int kUnset = -1;
std::atomic<int> g_start_method{kUnset};
}  // namespace

void set_start_method(const std::string& method, bool force) {
    if (method.empty() && force) {  // as Python's set_start_method(None, force=True): not chosen again
        g_start_method.store(kUnset);
        return;
    }
    int wanted = static_cast<int>(get_context(method).start_method());  // std::invalid_argument if unknown
    if (force) {
        g_start_method.store(wanted);
        return;
    }
    int expected = kUnset;
    if (!g_start_method.compare_exchange_strong(expected, wanted))
        throw InvalidStateError("mpservice: the start method was already set (to \"" +
                                std::string(Context(static_cast<StartMethod>(expected)).name()) +
                                "\"); pass force = true to replace it");
}

std::string get_start_method(bool allow_none) {
    int m = g_start_method.load();
    if (m == kUnset) {
        if (allow_none) return std::string();
        int expected = kUnset;
        m = g_start_method.compare_exchange_strong(expected, static_cast<int>(StartMethod::spawn))
                ? static_cast<int>(StartMethod::spawn)
                : expected;
    }
    return Context(static_cast<StartMethod>(m)).name();
}

std::vector<std::string> get_all_start_methods() { return {"spawn", "fork", "forkserver"}; }

const Context& default_context() { return get_context(get_start_method()); }

int cpu_count() {
    int n = detail::os::affinity_cpu_count();
    double quota = detail::os::cgroup_cpu_quota();
    if (quota > 0) n = std::min(n, static_cast<int>(std::ceil(quota)));
    return std::max(n, 1);
}

ProcessInfo current_process() { return ProcessInfo{detail::process_name(), detail::os::current_pid()}; }

std::optional<ProcessInfo> parent_process() { return detail::rt().parent; }

std::vector<ProcessInfo> active_children() {
    std::vector<ProcessInfo> out;
    if (!detail::g_reactor.load()) return out;
    for (auto& c : detail::Reactor::get().live()) out.push_back(ProcessInfo{c->name, c->pid()});
    return out;
}

}  // namespace mpservice
// ---- end part: mpservice/impl/process_core.cpp
#endif
#if MPSERVICE_PART_(7) || MPSERVICE_PART_(11)
// ---- begin part: mpservice/impl/pool_internal.hpp ---------------------------
// pool_internal: what the Pool's parts share - the layout of the shared memory
// between a pool and its workers, and the parent's state of a pool.
//
// Shared memory of one worker:
//   - its task ring (parent -> this worker): one message per chunk,
//     [PoolTaskHeader | the items' arguments];
//   - its progress slot: the chunk and item it runs, and the outcomes of the
//     chunk's finished items not yet sent, laid out as a result message;
// and of the pool: the result ring (every worker -> parent), messages
// [PoolResultHeader | records], a record being [PoolRecordHeader | encoded value or exception].
//
// The parent keeps every chunk until all of its items have an outcome, so when
// a worker dies it can tell, from the worker's slot, which item was running
// (it fails, with ProcessError), which had finished (their outcomes are read
// from the slot) and which had not started (they go to another worker).
//
// pool_worker.cpp is the worker loop (child side); pool.cpp starts, feeds and
// stops the workers; pool_results.cpp reads the results and reckons with dead
// workers.

#include <algorithm>
#include <cstring>
#include <thread>
#include <unordered_map>

namespace mpservice {
namespace detail {
namespace {

constexpr std::uint32_t pool_task_chunk = 1;
constexpr std::uint32_t pool_result_records = 1;
constexpr std::uint32_t pool_result_wake = 2;
constexpr std::uint32_t no_item = 0xFFFFFFFFu;

constexpr std::size_t task_ring_bytes = std::size_t(4) << 20;
constexpr std::size_t result_ring_bytes = std::size_t(4) << 20;
constexpr std::uint32_t slot_record_bytes = 256u << 10;
constexpr std::uint32_t slot_flush_bytes = pool_slot_flush_bytes;  // see there
/// Chunks a worker holds at once: the one it runs and the next, so that it
/// never waits for the parent between two chunks.
constexpr std::size_t chunks_per_worker = 2;
/// A reading caller looks up from the ring this often (its result may come
/// from terminate() in another thread); one that found the reader role taken
/// looks again this often; the result thread looks at the ring this often
/// while results are due and nobody waits, and when idle.
constexpr auto reader_slice = std::chrono::milliseconds(20);
constexpr auto follower_slice = std::chrono::milliseconds(2);
constexpr auto busy_tick = std::chrono::milliseconds(1);
constexpr auto idle_tick = std::chrono::milliseconds(20);

struct PoolTaskHeader {
    std::uint32_t kind;
    std::uint32_t count;  // items in this message
    std::uint64_t chunk;
    std::uint32_t base;  // index (in the chunk) of the message's first item
    std::uint32_t nhandles;
    std::uint64_t fn_module, fn_offset, runner_module, runner_offset;
};
static_assert(sizeof(PoolTaskHeader) == 56 && sizeof(PoolTaskHeader) == pool_task_room,
              "task header layout (ChunkDraft leaves room for it)");

struct PoolResultHeader {
    std::uint32_t kind;
    std::uint32_t first;  // index (in the chunk) of the first record
    std::uint64_t chunk;
};

/// A worker's progress, in shared memory.  `header` and the records after it
/// form a result message that the worker sends as is.
struct PoolSlot {
    std::atomic<std::uint32_t> ready{0};        // the initializer has run
    std::atomic<std::uint32_t> index{no_item};  // item (in the chunk) being run
    std::atomic<std::uint64_t> chunk{0};        // chunk being run
    std::atomic<std::uint32_t> used{0};         // record bytes committed after header
    std::uint32_t pad = 0;
    PoolResultHeader header{};
    unsigned char* records() { return reinterpret_cast<unsigned char*>(this + 1); }
};
static_assert(sizeof(PoolSlot) == 40, "slot layout: records follow the header directly");

const std::uint64_t task_tag = QueueCore::tag_of("mpservice.pool.tasks");
const std::uint64_t result_tag = QueueCore::tag_of("mpservice.pool.results");

/// Polls `ring` for up to `budget` until it holds an item or stop().  A
/// blocking get spins only briefly before it sleeps, and waking a sleeper on
/// another CPU costs tens of microseconds on a VM - more than a whole task
/// round trip - so both ends of a task look a little longer, yielding between
/// looks: the other end may be waiting for this very CPU (the scheduler put
/// both on it).
template <class Stop>
void spin_for_item(const QueueCore& ring, std::chrono::microseconds budget, Stop&& stop) {
    spin_for([&] { return ring.qsize() != 0 || stop(); }, budget, BetweenLooks::yield);
}
/// How long a worker looks for its next task, and a waiting caller for its
/// result, before the blocking get (see spin_for_item).
constexpr auto worker_spin = std::chrono::microseconds(50);
constexpr auto caller_spin = std::chrono::microseconds(100);

inline void copy_item(void* context, const unsigned char* data, std::size_t size) {
    static_cast<std::string*>(context)->assign(reinterpret_cast<const char*>(data), size);
}

}  // namespace

// ---------------------------------------------------------------- the parent's state of a pool

/// What a worker's exit hook needs: no pointer to the pool itself (the hook
/// runs on the reactor thread, which must never end up destroying a pool).
struct PoolDoorbell {
    QueueCore results;
    std::atomic<int> deaths{0};
    // The result thread's tick: a death or stop() wakes it before its timeout.
    std::mutex tick_mutex;
    std::condition_variable tick;
    /// Wakes a reader blocked on the ring (a waiting caller) and the result thread.
    void ring() noexcept {
        {
            std::lock_guard<std::mutex> lk(tick_mutex);
        }
        tick.notify_all();
        PoolResultHeader h{pool_result_wake, 0, 0};
        try {
            results.put(&h, sizeof h, os::Clock::now());  // a full ring wakes the thread anyway
        } catch (...) {
        }
    }
};

/// Outcomes to hand to jobs outside the pool's lock, in batches per job.
/// The bytes are the result message's (valid until delivered) or, for outcomes
/// read from a dead worker's slot, copies kept here.
struct PoolDeliveries {
    std::deque<std::string> keep;  // a deque: strings never move (their data must not)
    std::vector<std::pair<std::shared_ptr<JobBase>, std::vector<JobItem>>> batches;
    std::vector<std::pair<std::shared_ptr<JobBase>, JobRecords>> runs;  // records in place, per message

    void add(const std::shared_ptr<JobBase>& job, JobItem item) {
        if (batches.empty() || batches.back().first != job) batches.emplace_back(job, std::vector<JobItem>());
        batches.back().second.push_back(std::move(item));
    }
};

struct PoolCore::State {
    enum class Phase { running, closing, terminated };

    struct Chunk {
        std::shared_ptr<JobBase> job;
        std::size_t job_first = 0;
        std::uint32_t count = 0;
        std::uint32_t next = 0;  // the items before it have an outcome
        PoolTarget target;
        std::string args;
        std::vector<std::uint32_t> offsets;
        std::uint32_t stride = 0;
        /// Where item i's arguments start in args (see ChunkDraft).
        std::size_t item_offset(std::uint32_t i) const noexcept {
            if (i >= count) return args.size();
            return stride ? pool_task_room + std::size_t(i) * stride : offsets[i];
        }
        std::vector<os::handle_t> handles;  // owned copies
        int worker = -1;
        ~Chunk() { wire::close_all(handles); }
        Chunk() = default;
        Chunk(const Chunk&) = delete;
        Chunk& operator=(const Chunk&) = delete;
    };

    struct WorkerRec {
        std::unique_ptr<Process<void>> proc;
        QueueCore tasks;
        SharedMemory slot;
        os::handle_t lane = os::invalid_handle;
        std::deque<std::uint64_t> outstanding;
        std::uint64_t sent = 0;
        bool ended = true;
        bool ring_closed = false;
        std::shared_ptr<std::atomic<bool>> dead;
        ~WorkerRec() { os::close_handle(lane); }
    };

    WorkerFactory factory;
    std::shared_ptr<PoolDoorbell> bell;
    mutable std::mutex mutex;
    std::condition_variable changed;
    Phase phase = Phase::running;
    std::exception_ptr broken;
    int failed_starts = 0;
    std::unordered_map<std::uint64_t, std::unique_ptr<Chunk>> chunks;
    std::deque<std::uint64_t> pending;
    std::deque<WorkerRec> workers;  // a deque: records never move
    std::uint64_t next_chunk = 1;
    std::thread thread;
    std::atomic<bool> stop{false};
    // The reader role: who holds it takes result messages off the ring and
    // books them (in ring order, so a chunk's messages are booked in the order
    // its worker sent them); deliveries happen after it is released.
    std::mutex reader;
    std::atomic<int> waiting{0};  // callers in serve_until
    std::atomic<bool> warm_starts{false};  // a replacement took a warm start (its spawner keeps a child)
};

/// Hands the collected outcomes to their jobs (outside the pool's lock).
inline void deliver(PoolCore::Deliveries& out) {
    for (auto& [job, run] : out.runs) job->on_records(run);
    out.runs.clear();
    for (auto& [job, items] : out.batches) job->on_items(items.data(), items.size());
    out.batches.clear();
    out.keep.clear();
}

}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/pool_internal.hpp
#endif
#if MPSERVICE_PART_(7)
// ---- begin part: mpservice/impl/pool_worker.cpp -----------------------------
// pool_worker: the worker loop (child side) - takes chunks off its task ring,
// runs their items and writes the outcomes to its slot and the result ring.

namespace mpservice {
namespace detail {
namespace {

/// The worker's end of its slot and of the result ring.  `cur` is the write
/// position (ItemSink's inline path appends bitwise values through it too).
struct WorkerLink {
    QueueCore results;
    PoolSlot* slot = nullptr;
    SlotCursor cur;

    void attach(PoolSlot* s) {
        slot = s;
        cur.index = &s->index;
        cur.used = &s->used;
        cur.records = s->records();
    }
    /// A new message (chunk part) whose first item is `base`; the slot is empty.
    void start_message(std::uint32_t base) {
        cur.base = base;
        cur.next_local = 0;
        cur.in_slot = 0;
        cur.end = 0;
        cur.dense_at = SlotCursor::no_dense;
    }
    void commit_length() { slot->used.store(cur.end, std::memory_order_release); }

    /// One bitwise value, appended to the dense record at the end of the slot
    /// (opened if there is none of this size; the slot sent first if it is
    /// full).  Order of stores as in ItemSink::commit_bitwise.
    void append_dense(const void* value, std::uint32_t elem) {
        unsigned char* records = cur.records;
        if (cur.dense_at != SlotCursor::no_dense && cur.dense_elem == elem && cur.end + elem <= slot_record_bytes) {
            std::memcpy(records + cur.end, value, elem);
            PoolRecordHeader rh;
            std::memcpy(&rh, records + cur.dense_at, sizeof rh);
            rh.size += elem;
            std::memcpy(records + cur.dense_at, &rh, sizeof rh);
            cur.end += elem;
        } else {
            if (cur.end + sizeof(PoolRecordHeader) + elem > slot_record_bytes) flush();
            PoolRecordHeader rh{elem, dense_record_kind(elem)};
            std::memcpy(records + cur.end + sizeof rh, value, elem);
            std::memcpy(records + cur.end, &rh, sizeof rh);
            cur.dense_at = cur.end;
            cur.dense_elem = elem;
            cur.end += static_cast<std::uint32_t>(sizeof rh) + elem;
        }
        commit_length();
        ++cur.in_slot;
        if (cur.end >= slot_flush_bytes) flush();
    }

    void append(std::uint32_t kind, const std::string& payload) {
        cur.dense_at = SlotCursor::no_dense;  // a dense record after this one is a new one
        auto size = static_cast<std::uint32_t>(sizeof(PoolRecordHeader) + payload.size());
        if (cur.end + size > slot_record_bytes) flush();
        PoolRecordHeader rh{static_cast<std::uint32_t>(payload.size()), kind};
        if (size > slot_record_bytes) {
            // Too big for the slot: it travels alone (a crash while it is sent loses it).
            std::string msg;
            PoolResultHeader h{pool_result_records, slot->header.first, slot->header.chunk};
            msg.append(reinterpret_cast<const char*>(&h), sizeof h);
            msg.append(reinterpret_cast<const char*>(&rh), sizeof rh);
            msg.append(payload);
            results.put(msg.data(), msg.size(), os::no_deadline);
            slot->header.first += 1;
            return;
        }
        unsigned char* at = cur.records + cur.end;
        std::memcpy(at, &rh, sizeof rh);
        if (!payload.empty()) std::memcpy(at + sizeof rh, payload.data(), payload.size());
        cur.end += size;
        commit_length();
        ++cur.in_slot;
        if (cur.end >= slot_flush_bytes) flush();
    }
    /// Sends the slot's records, then empties it.
    void flush() {
        if (!cur.end) return;
        slot->header.kind = pool_result_records;
        results.put(&slot->header, sizeof(PoolResultHeader) + cur.end, os::no_deadline);
        cur.end = 0;
        commit_length();
        slot->header.first += cur.in_slot;
        cur.in_slot = 0;
        cur.dense_at = SlotCursor::no_dense;
    }
};

const void* resolve_code(const os::CodeRef& ref) {
    static std::map<std::pair<std::uint64_t, std::uint64_t>, const void*> cache;
    auto key = std::make_pair(ref.module, ref.offset);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    const void* p = os::code_ref_resolve(ref);
    if (!p)
        throw Error("mpservice: the pool worker cannot find the task's function in its program (a different "
                    "build, or a library loaded only in the parent?)");
    cache.emplace(key, p);
    return p;
}

void read_lane_handles(os::handle_t lane, std::uint32_t n, std::vector<os::handle_t>& out) {
    while (out.size() < n) {
        char byte;
        long got = os::channel_read(lane, &byte, 1, &out, false);
        if (got <= 0) throw Error("mpservice: the pool's handle channel closed");
    }
}

}  // namespace

void ItemSink::begin(std::uint32_t local) {
    auto* l = static_cast<WorkerLink*>(link);
    l->slot->index.store(l->cur.base + local, std::memory_order_release);
    if (!out_.handles().empty()) out_ = Encoder();
    out_.bytes().clear();
}

void ItemSink::commit_value() {
    auto* l = static_cast<WorkerLink*>(link);
    if (!out_.handles().empty()) {
        commit_error(std::make_exception_ptr(std::invalid_argument(
            "mpservice: a pool task's result cannot hold OS handles (a Queue, Lock, Value, ...)")));
        return;
    }
    l->append(record_value, out_.bytes());
    ++l->cur.next_local;
}

void ItemSink::commit_dense(const void* value, std::uint32_t size) {
    auto* l = static_cast<WorkerLink*>(link);
    l->append_dense(value, size);
    ++l->cur.next_local;
}

void ItemSink::commit_error(const std::exception_ptr& e) {
    auto* l = static_cast<WorkerLink*>(link);
    Encoder enc;
    try {
        encode_exception(enc, e);
    } catch (...) {
        enc = Encoder();
        encode_exception(enc, std::make_exception_ptr(Error("mpservice: the task's exception could not be encoded")));
    }
    l->append(record_error, enc.bytes());
    ++l->cur.next_local;
}

PoolWorkerParts::~PoolWorkerParts() { os::close_handle(lane); }

const void* resolve_initializer(const PoolWorkerBoot& b) { return resolve_code(b.p->initializer); }

void serve_pool_tasks(const PoolWorkerBoot& b, void* state) {
    const PoolWorkerParts& boot = *b.p;
    WorkerLink link;
    link.results = boot.results;
    link.attach(static_cast<PoolSlot*>(boot.slot.data()));
    PoolSlot& slot = *link.slot;
    slot.ready.store(1, std::memory_order_release);
    QueueCore tasks = boot.tasks;
    std::string msg;
    for (std::uint64_t done = 0; boot.maxtasks == 0 || done < boot.maxtasks; ++done) {
        spin_for_item(tasks, worker_spin, [&] { return tasks.closed(); });
        if (tasks.get(&copy_item, &msg, os::no_deadline) != QueueCore::Status::ok) break;  // closed: the pool is done
        if (msg.size() < sizeof(PoolTaskHeader)) throw Error("mpservice: a torn pool task");
        PoolTaskHeader th;
        std::memcpy(&th, msg.data(), sizeof th);
        std::vector<os::handle_t> handles;
        if (th.nhandles) read_lane_handles(boot.lane, th.nhandles, handles);

        // Start of the chunk: the slot says which one, and that no item runs yet.
        slot.used.store(0, std::memory_order_relaxed);
        slot.header.chunk = th.chunk;
        slot.header.first = th.base;
        slot.index.store(no_item, std::memory_order_relaxed);
        slot.chunk.store(th.chunk, std::memory_order_release);
        link.start_message(th.base);

        ItemSink sink;
        sink.link = &link;
        sink.cur = &link.cur;
        try {
            const void* fn = th.fn_module ? resolve_code(os::CodeRef{th.fn_module, th.fn_offset}) : nullptr;
            auto runner = reinterpret_cast<ChunkRunner>(
                reinterpret_cast<std::uintptr_t>(resolve_code(os::CodeRef{th.runner_module, th.runner_offset})));
            Decoder d(msg.data() + sizeof th, msg.size() - sizeof th, &handles);
            runner(fn, state, d, th.count, sink);
        } catch (...) {
            // The arguments could not be decoded (or the function found): the
            // items without an outcome fail with that error.
            auto e = std::current_exception();
            for (std::uint32_t i = link.cur.next_local; i < th.count; ++i) {
                sink.begin(i);
                sink.commit_error(e);
            }
        }
        link.flush();
        wire::close_all(handles);
    }
}

}  // namespace detail

void Codec<detail::PoolWorkerBoot>::encode(Encoder& e, const detail::PoolWorkerBoot& boot) {
    const detail::PoolWorkerParts& b = *boot.p;
    e.write(b.tasks.memory());
    e.write(b.results.memory());
    e.write(b.slot);
    e.write(e.attach(b.lane));
    e(b.initializer.module, b.initializer.offset, b.maxtasks);
}

detail::PoolWorkerBoot Codec<detail::PoolWorkerBoot>::decode(Decoder& d) {
    detail::PoolWorkerBoot boot;
    detail::PoolWorkerParts& b = *boot.p;
    b.tasks = detail::QueueCore::attach(d.read<detail::SharedMemory>(), detail::QueueKind::simple, detail::task_tag);
    b.results =
        detail::QueueCore::attach(d.read<detail::SharedMemory>(), detail::QueueKind::simple, detail::result_tag);
    b.slot = d.read<detail::SharedMemory>();
    if (b.slot.size() < sizeof(detail::PoolSlot)) throw DecodeError("decode: pool slot too small");
    b.lane = detail::os::duplicate_handle(d.handle(d.read<std::uint32_t>()));
    d(b.initializer.module, b.initializer.offset, b.maxtasks);
    return boot;
}

}  // namespace mpservice
// ---- end part: mpservice/impl/pool_worker.cpp
// ---- begin part: mpservice/impl/pool.cpp ------------------------------------
// pool: PoolCore's life - starting its workers (and their replacements),
// chunking and dispatching tasks to them, closing and stopping them.

namespace mpservice {
namespace detail {

os::CodeRef pool_code_ref(const void* fn) {
    static std::mutex m;
    static std::unordered_map<const void*, os::CodeRef> cache;
    std::lock_guard<std::mutex> lk(m);
    auto it = cache.find(fn);
    if (it != cache.end()) return it->second;
    os::CodeRef r = os::code_ref_of(fn);
    cache.emplace(fn, r);
    return r;
}

PoolWorkerBoot::PoolWorkerBoot() : p(std::make_shared<PoolWorkerParts>()) {}

ChunkBuilder::ChunkBuilder(std::shared_ptr<JobBase> job, std::size_t chunksize) : job_(std::move(job)), chunksize_(chunksize) {}

std::vector<ChunkDraft> ChunkBuilder::take_full() {
    std::vector<ChunkDraft> full;
    if (chunks_.size() < 2) return full;
    full.reserve(chunks_.size() - 1);
    for (std::size_t i = 0; i + 1 < chunks_.size(); ++i) full.push_back(std::move(chunks_[i]));
    chunks_.erase(chunks_.begin(), chunks_.end() - 1);
    return full;
}

Encoder ChunkBuilder::rebuild_without_handles(ChunkDraft& c) {
    Encoder e;
    e.write_bytes(c.args.bytes().data(), c.args.bytes().size());
    return e;
}

void ChunkBuilder::throw_too_big() {
    throw std::length_error("mpservice: a pool chunk's arguments exceed 4 GiB; use a smaller chunksize");
}

void ChunkBuilder::open() {
    // Room for a chunk like the last one, so that filling it never reallocates.
    std::size_t last_bytes = chunks_.empty() ? 0 : chunks_.back().args.bytes().size();
    chunks_.emplace_back();
    ChunkDraft& c = chunks_.back();
    c.job = job_;
    c.job_first = items_;
    c.offsets.reserve(std::min<std::size_t>(chunksize_, std::size_t(1) << 20));
    if (last_bytes) c.args.bytes().reserve(last_bytes);
    c.args.bytes().resize(pool_task_room);  // the task header goes here
}

std::shared_ptr<PoolCore> PoolCore::create(PoolSettings settings, WorkerFactory factory) {
    auto core = std::make_shared<PoolCore>(std::move(settings), std::move(factory));
    return core;
}

PoolCore::PoolCore(PoolSettings settings, WorkerFactory factory) : s_(new State()), settings_(std::move(settings)) {
    State& s = *s_;
    s.factory = std::move(factory);
    s.bell = std::make_shared<PoolDoorbell>();
    s.bell->results = QueueCore::create(QueueKind::simple, result_tag, 0, result_ring_bytes);
    for (int i = 0; i < settings_.processes; ++i) s.workers.emplace_back();
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        try {
            for (std::size_t i = 0; i < s.workers.size(); ++i) start_worker(i);
        } catch (...) {
            s.phase = State::Phase::terminated;
            for (auto& w : s.workers)
                if (w.proc && !w.ended) w.proc->kill();
            throw;  // ~State waits for the ones that started
        }
    }
    s.thread = std::thread([this] { result_loop(); });
}

PoolCore::~PoolCore() {
    try {
        terminate();
        join();
    } catch (...) {
    }
}

void PoolCore::start_worker(std::size_t i, bool replacement) {
    State& s = *s_;
    State::WorkerRec& w = s.workers[i];
    w.tasks = QueueCore::create(QueueKind::simple, task_tag, 0, task_ring_bytes);
    w.slot = SharedMemory::create(sizeof(PoolSlot) + slot_record_bytes);
    ::new (w.slot.data()) PoolSlot();
    os::handle_t mine, theirs;
    os::channel_pair(mine, theirs);
    os::close_handle(w.lane);
    w.lane = mine;
    PoolWorkerBoot boot;
    boot.p->tasks = w.tasks;
    boot.p->results = s.bell->results;
    boot.p->slot = w.slot;
    boot.p->lane = theirs;
    boot.p->initializer = settings_.initializer;
    boot.p->maxtasks = settings_.maxtasks;
    w.outstanding.clear();
    w.sent = 0;
    w.ring_closed = false;
    w.proc = s.factory(boot);
    w.proc->set_name((settings_.kind == runner_kind ? "ProcessRunner-" : "PoolWorker-") + std::to_string(i + 1));
    w.proc->set_daemon(true);
    // A pool that replaces workers keeps doing so: the replacements come from a
    // child exec'd ahead of demand (spawn context; others ignore it), so a
    // worker's end does not stall the pool for a whole re-exec.  The first
    // workers start cold: a pool that never loses one keeps no idle child.
    // When the pool ends, join() discards the warm child kept for the next replacement.
    if (replacement) {
        w.proc->set_warm_start(true);
        s.warm_starts.store(true);
    }
    w.proc->start();
    // Sent (or, under fork, copied into the child): the parent needs none of it.
    boot.release();
    w.ended = false;
    auto dead = std::make_shared<std::atomic<bool>>(false);
    w.dead = dead;
    auto bell = s.bell;
    const_cast<FutureCore&>(w.proc->core()).on_resolve(make_task([dead, bell] {
        dead->store(true, std::memory_order_release);
        bell->deaths.fetch_add(1, std::memory_order_acq_rel);
        bell->ring();
    }));
}

void PoolCore::check_accepting() const {
    State& s = *s_;
    std::lock_guard<std::mutex> lk(s.mutex);
    if (s.broken) std::rethrow_exception(s.broken);
    if (s.phase == State::Phase::closing)
        throw InvalidStateError("mpservice: the " + settings_.kind + " is closed (close() was called)");
    if (s.phase == State::Phase::terminated)
        throw InvalidStateError("mpservice: the " + settings_.kind + " was terminated");
}

void PoolCore::submit(const PoolTarget& target, std::vector<ChunkDraft>& drafts) {
    State& s = *s_;
    // Copy the handles first (outside the lock): the arguments' owners may go
    // away before a chunk is sent again to a replacement worker.
    std::vector<std::unique_ptr<State::Chunk>> made;
    made.reserve(drafts.size());
    for (auto& d : drafts) {
        auto c = std::make_unique<State::Chunk>();
        c->job = d.job.shared();
        c->job_first = d.job_first;
        c->count = d.count;
        c->target = target;
        c->args = std::move(d.args.bytes());
        c->offsets = std::move(d.offsets);
        c->stride = d.stride;
        for (auto h : d.args.handles()) c->handles.push_back(os::duplicate_handle(h));
        made.push_back(std::move(c));
    }
    check_accepting();
    std::lock_guard<std::mutex> lk(s.mutex);
    if (s.broken) std::rethrow_exception(s.broken);
    if (s.phase != State::Phase::running)
        throw InvalidStateError("mpservice: the " + settings_.kind + " is closed or terminated");
    for (auto& c : made) {
        std::uint64_t id = s.next_chunk++;
        s.chunks.emplace(id, std::move(c));
        s.pending.push_back(id);
    }
    dispatch_locked();
}

bool PoolCore::send_locked(std::size_t wi, std::uint64_t id, bool may_block) {
    State& s = *s_;
    State::WorkerRec& w = s.workers[wi];
    State::Chunk& c = *s.chunks.at(id);
    PoolTaskHeader th{pool_task_chunk,
                  c.count - c.next,
                  id,
                  c.next,
                  static_cast<std::uint32_t>(c.handles.size()),
                  c.target.fn.module,
                  c.target.fn.offset,
                  c.target.runner.module,
                  c.target.runner.offset};
    // The whole chunk goes as it is, its header in the room left for it; the
    // rest of one whose worker died is copied behind a new header.
    std::string rest;
    const char* msg = c.args.data();
    std::size_t size = c.args.size();
    if (c.next == 0) {
        std::memcpy(&c.args[0], &th, sizeof th);
    } else {
        std::size_t from = c.item_offset(c.next);
        rest.reserve(sizeof th + c.args.size() - from);
        rest.append(reinterpret_cast<const char*>(&th), sizeof th);
        rest.append(c.args, from, std::string::npos);
        msg = rest.data();
        size = rest.size();
    }
    QueueCore::Status st;
    if (!may_block) {
        st = w.tasks.put(msg, size, os::Clock::now());
    } else {
        // A chunk bigger than half the ring streams through it while the (idle)
        // worker reads; give up only if the worker dies meanwhile.
        while ((st = w.tasks.put(msg, size, os::Clock::now() + std::chrono::milliseconds(200))) ==
                   QueueCore::Status::timeout &&
               !w.dead->load(std::memory_order_acquire)) {
        }
    }
    if (st != QueueCore::Status::ok) return false;
    if (!c.handles.empty()) {
        char byte = 'h';
        os::channel_write(w.lane, &byte, 1, nullptr, 0, c.handles.data(), c.handles.size());
    }
    c.worker = static_cast<int>(wi);
    w.outstanding.push_back(id);
    ++w.sent;
    return true;
}

void PoolCore::dispatch_locked() {
    State& s = *s_;
    std::vector<bool> full(s.workers.size(), false);
    while (!s.pending.empty()) {
        std::uint64_t id = s.pending.front();
        State::Chunk& c = *s.chunks.at(id);
        std::size_t bytes = c.args.size();  // the header's room included
        int best = -1;
        for (std::size_t i = 0; i < s.workers.size(); ++i) {
            State::WorkerRec& w = s.workers[i];
            if (full[i] || !w.proc || w.ended || w.ring_closed || w.dead->load(std::memory_order_acquire)) continue;
            if (w.outstanding.size() >= chunks_per_worker) continue;
            if (settings_.maxtasks && w.sent >= settings_.maxtasks) continue;
            if (best < 0 || w.outstanding.size() < s.workers[static_cast<std::size_t>(best)].outstanding.size())
                best = static_cast<int>(i);
        }
        if (best < 0) return;
        auto bi = static_cast<std::size_t>(best);
        bool big = bytes > s.workers[bi].tasks.capacity() / 2;
        if (big && !s.workers[bi].outstanding.empty()) {
            full[bi] = true;  // a big chunk goes only to an idle worker
            continue;
        }
        if (!send_locked(bi, id, big)) {
            full[bi] = true;
            continue;
        }
        s.pending.pop_front();
    }
}

void PoolCore::close() {
    State& s = *s_;
    std::lock_guard<std::mutex> lk(s.mutex);
    if (s.phase == State::Phase::running) s.phase = State::Phase::closing;
    maybe_finish_locked();
}

void PoolCore::terminate() {
    State& s = *s_;
    Deliveries out;
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        if (s.phase != State::Phase::terminated) {
            s.phase = State::Phase::terminated;
            fail_all_locked(std::make_exception_ptr(InvalidStateError(
                                "mpservice: the " + settings_.kind + " was terminated before this task finished")),
                            out);
        }
        for (auto& w : s.workers)
            if (w.proc && !w.ended) w.proc->terminate();
    }
    deliver(out);
    s.bell->ring();  // a caller blocked on the ring looks at its (now failed) result
    if (!wait_workers_ended(os::deadline_after(std::chrono::seconds(2)))) {
        // A worker that ignores SIGTERM is killed.
        std::lock_guard<std::mutex> lk(s.mutex);
        for (auto& w : s.workers)
            if (w.proc && !w.ended) w.proc->kill();
    }
}

bool PoolCore::wait_workers_ended(os::Deadline deadline) {
    State& s = *s_;
    auto all_ended = [&] {
        for (auto& w : s.workers)
            if (w.proc && !w.ended) return false;
        return true;
    };
    // Deaths are handled by whoever reads the ring: read it here too.
    return serve_until(
        [&] {
            std::lock_guard<std::mutex> lk(s.mutex);
            return all_ended();
        },
        deadline,
        [&](os::Deadline d) {
            std::unique_lock<std::mutex> lk(s.mutex);
            s.changed.wait_until(lk, d, all_ended);
        });
}

void PoolCore::join() {
    State& s = *s_;
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        if (s.phase == State::Phase::running)
            throw InvalidStateError("mpservice: join() on a " + settings_.kind + " that is neither closed nor terminated");
    }
    wait_workers_ended(os::no_deadline);
    if (s.thread.joinable()) {
        s.stop.store(true, std::memory_order_release);
        s.bell->ring();
        s.thread.join();
    }
    // The warm child made for this pool's next replacement is nobody's now:
    // it goes with the pool (unless the program keeps warm children anyway).
    if (s.warm_starts.exchange(false)) discard_unwanted_warm_child();
}

std::vector<long> PoolCore::worker_pids() const {
    State& s = *s_;
    std::lock_guard<std::mutex> lk(s.mutex);
    std::vector<long> pids;
    for (auto& w : s.workers)
        if (w.proc && !w.ended) pids.push_back(w.proc->pid());
    return pids;
}
}  // namespace detail

std::vector<long> Pool::worker_pids() const { return core_->worker_pids(); }

}  // namespace mpservice
// ---- end part: mpservice/impl/pool.cpp
#endif
#if MPSERVICE_PART_(8) || MPSERVICE_PART_(9) || MPSERVICE_PART_(12)
// ---- begin part: mpservice/impl/server_wire.hpp -----------------------------
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
// ---- end part: mpservice/impl/server_wire.hpp
// ---- begin part: mpservice/impl/server_link.hpp -----------------------------
// server_link: a process's link to one server, as the client side's two
// parts see it - server_client.cpp (the links themselves: the server's own,
// and over sockets) and server_process.cpp (the templates' entry points,
// references, ServerProcess).

namespace mpservice {
namespace detail {
namespace server {

/// Closes the handles a reply brought, whatever happens to the reply.
struct HandleCloser {
    std::vector<os::handle_t>& hs;
    ~HandleCloser() { wire::close_all(hs); }
};

/// A memory block attached to a reply (server_host's attach_block), mapped.
SharedMemory read_block(Decoder& d);

/// One process's side of one server: how requests reach it, and the table of
/// this process's live references (one Ref per object, shared by its proxies).
class Link : public std::enable_shared_from_this<Link> {
public:
    std::string address, authkey, server_name, fingerprint;
    long server_pid = 0;

    virtual ~Link() = default;
    /// Sends a request and waits for its reply; re-throws the server's error.
    virtual std::string request(std::uint32_t op, const std::string& payload, const std::vector<os::handle_t>& handles,
                                std::vector<os::handle_t>& reply_handles) = 0;
    /// Sends a message that has no reply (decref, drop ticket); never throws.
    virtual void post(std::uint32_t op, const std::string& payload) noexcept = 0;
    /// Sends a message that has no reply, in order with this process's releases;
    /// ServerError if the server is known to be gone.
    virtual void send_ordered(std::uint32_t op, const std::string& payload) {
        post(op, payload);
    }
    /// After this, every request fails with ServerError at once.
    virtual void mark_gone(const std::string& why) noexcept = 0;
    /// A request on the process's main connection, answered after every
    /// release this process posted before it (object_count uses it).
    virtual std::string ordered_request(std::uint32_t op, const std::string& payload) { return request(op, payload); }

    std::string request(std::uint32_t op, const std::string& payload) {
        std::vector<os::handle_t> hs;
        std::string r = request(op, payload, {}, hs);
        wire::close_all(hs);
        return r;
    }
    std::string describe() const {
        return "server process '" + server_name + "' (pid " + std::to_string(server_pid) + ")";
    }

    /// The Ref of a new reference this process now holds on `id`.
    RefPtr make_ref(std::uint64_t id, std::uint64_t type);
    /// The live Ref of `id` in this process, if there is one.
    RefPtr existing(std::uint64_t id);
    /// A decoded proxy: takes over its ticket's reference (or gives the ticket
    /// back when this process holds the object already).  One round trip; a
    /// memory block's memfd comes with the reply and is mapped at once.
    RefPtr adopt(std::uint64_t id, std::uint64_t ticket, std::uint64_t type);
    /// A Ref's destructor: this process holds one reference less.
    void release(std::uint64_t id) noexcept;
    std::vector<std::uint64_t> live_ids();

    static std::string bytes_of(std::uint64_t v) { return std::string(reinterpret_cast<const char*>(&v), sizeof v); }
    static std::string decref_bytes(std::uint64_t id) {
        Encoder e;
        e(id, std::int64_t(1));
        return std::move(e.bytes());
    }

private:
    std::mutex refs_mutex_;
    std::unordered_map<std::uint64_t, std::weak_ptr<Ref>> refs_;
};

/// Re-throws the server's error carried by a reply.
[[noreturn]] void throw_reply_error(const std::string& payload);

/// What a link to a server is made from: a proxy's or a server handle's encoding.
struct LinkInfo {
    std::string address, authkey, name, fingerprint;
    long pid = 0;
};
/// The link of this process to the server at `info.address`: the open one, or a new one.
std::shared_ptr<Link> link_for(const LinkInfo& info);
/// The server process's own link (LocalLink, server_host.cpp), kept in the
/// registry of links (server_client.cpp) beside those over sockets.
void set_local_link(std::shared_ptr<Link> link);
std::shared_ptr<Link> local_link();
/// An invoker as the server is told of it (cached per thread).
InvokerRef invoker_of(const void* fn);

}  // namespace server
}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/server_link.hpp
#endif
#if MPSERVICE_PART_(8) || MPSERVICE_PART_(12)
// ---- begin part: mpservice/impl/server_host.hpp -----------------------------
// server_host.hpp: the server side's state - the boot argument, the object
// table, sessions and tickets - which the server part (server_host.cpp) and the
// client part (server_client.cpp: the server's own proxies call it directly)
// both use.

namespace mpservice {
namespace detail {
namespace server {

// ---------------------------------------------------------------- the boot argument

/// What the parent hands the server process: its listening socket (made by the
/// parent, so clients can connect before the server runs), address, key, name.
struct ServerBoot {
    struct Owned {
        os::handle_t fd = os::invalid_handle;
        ~Owned() { os::close_handle(fd); }
    };
    std::shared_ptr<Owned> listener = std::make_shared<Owned>();
    std::string address, authkey, name;
    /// Closes this process's copy of the listener (every copy of this boot shares it).
    void close() {
        os::close_handle(listener->fd);
        listener->fd = os::invalid_handle;
    }
};

}  // namespace server
}  // namespace detail

template <>
struct Codec<detail::server::ServerBoot> {
    static void encode(Encoder& e, const detail::server::ServerBoot& b) {
        e.write(e.attach(b.listener->fd));
        e(b.address, b.authkey, b.name);
    }
    static detail::server::ServerBoot decode(Decoder& d) {
        detail::server::ServerBoot b;
        auto index = d.read<std::uint32_t>();
        b.listener->fd = detail::os::duplicate_handle(d.handle(index));
        d(b.address, b.authkey, b.name);
        return b;
    }
};

namespace detail {
namespace server {

// ---------------------------------------------------------------- the object table

struct HostedObject {
    NewObject obj;
    std::uint64_t id = 0;
    std::uint64_t type = 0;
    HostedObject() = default;
    HostedObject(const HostedObject&) = delete;
    HostedObject& operator=(const HostedObject&) = delete;
    ~HostedObject() {
        if (obj.object) obj.destroy(obj.object);
    }
};
using ObjectPtr = std::shared_ptr<HostedObject>;

/// The references one client process holds (count per object).
struct Session {
    std::unordered_map<std::uint64_t, long> refs;
    /// Objects this session took over from tickets and has neither called nor
    /// released yet (object id -> ticket).  A consumer dies inside a Queue's
    /// get after it decoded the item but before the queue took it out: the
    /// item is delivered again, and its ticket must still be good.  So a
    /// session that ends holding such a reference gives the ticket back
    /// instead of dropping it.  (A process killed after it received a proxy
    /// but before it used or dropped it thereby leaves the object in flight
    /// until the server shuts down, as an encoding never decoded does.)
    std::unordered_map<std::uint64_t, std::uint64_t> unused_adopted;
    /// The session ended (its process's main connection did).  A request that
    /// its other connections still deliver - a killed process's last request,
    /// read from its slot after the end - must not take references nobody
    /// would release.
    bool ended = false;
};
using SessionPtr = std::shared_ptr<Session>;

class Host {
public:
    std::string address, authkey, name, fingerprint;
    os::handle_t listener = os::invalid_handle;
    std::atomic<bool> stopping{false};
    SessionPtr local = std::make_shared<Session>();  // proxies inside the server itself

    // ---- objects and references; every function takes the lock itself.
    // Objects whose last reference went are handed back, so the caller drops
    // them (runs their destructors) with no lock held: a destructor may hold
    // proxies and release them in turn.
    std::uint64_t add(NewObject obj, std::uint64_t type, Session& s) {
        auto h = std::make_shared<HostedObject>();
        h->obj = obj;
        h->type = type;
        std::lock_guard<std::mutex> lk(mutex_);
        check_open(s);  // (h, declared first, destroys the object after the lock)
        h->id = next_id_++;
        objects_[h->id] = Entry{h, 1};
        s.refs[h->id] += 1;
        return h->id;
    }
    ObjectPtr get(std::uint64_t id) {
        std::lock_guard<std::mutex> lk(mutex_);
        return find(id).object;
    }
    /// The object of a call by session `s` (which has now used it).
    ObjectPtr get_for_call(Session& s, std::uint64_t id) {
        std::lock_guard<std::mutex> lk(mutex_);
        if (!s.unused_adopted.empty()) s.unused_adopted.erase(id);
        return find(id).object;
    }
    void incref(Session& s, std::uint64_t id) {
        std::lock_guard<std::mutex> lk(mutex_);
        check_open(s);
        find(id).refs += 1;
        s.refs[id] += 1;
    }
    ObjectPtr decref(Session& s, std::uint64_t id, long n = 1) {
        std::lock_guard<std::mutex> lk(mutex_);
        auto it = s.refs.find(id);
        if (it == s.refs.end()) return nullptr;  // not this session's: ignored, as Python ignores decref errors
        if (!s.unused_adopted.empty()) s.unused_adopted.erase(id);
        n = std::min(n, it->second);
        if ((it->second -= n) == 0) s.refs.erase(it);
        return drop(id, n);
    }
    /// An encoded proxy's ticket: a reference in flight.  The ticket is the
    /// encoding client's choice, and the MINT that announces it is a message
    /// without a reply on that client's main connection - ahead of its
    /// releases, so the object is alive when it arrives.  A decoder in another
    /// process may be quicker than the MINT: its ADOPT (or DROP) then leaves a
    /// mark that cancels the MINT when it comes.
    void mint(std::uint64_t id, std::uint64_t ticket) {
        std::lock_guard<std::mutex> lk(mutex_);
        if (early_.erase(ticket) != 0) return;
        auto it = objects_.find(id);
        if (it == objects_.end() || tickets_.count(ticket) != 0) return;  // garbage: ignored
        it->second.refs += 1;
        tickets_[ticket] = id;
    }
    /// The ticket's reference becomes the session's.  A ticket already used
    /// (the same bytes decoded twice), or not minted yet, takes a new reference
    /// if the object lives.  Returns the object (a memory block's memfd goes back).
    ObjectPtr adopt(Session& s, std::uint64_t ticket, std::uint64_t id) {
        std::lock_guard<std::mutex> lk(mutex_);
        check_open(s);
        auto t = tickets_.find(ticket);
        Entry& entry = find(id);
        if (t != tickets_.end() && t->second == id) {
            tickets_.erase(t);
        } else {
            entry.refs += 1;
            mark_early(ticket);
        }
        s.refs[id] += 1;
        s.unused_adopted[id] = ticket;
        return entry.object;
    }
    ObjectPtr drop_ticket(std::uint64_t ticket) {
        std::lock_guard<std::mutex> lk(mutex_);
        auto t = tickets_.find(ticket);
        if (t == tickets_.end()) {
            mark_early(ticket);
            return nullptr;
        }
        std::uint64_t id = t->second;
        tickets_.erase(t);
        return drop(id, 1);
    }
    std::vector<ObjectPtr> end_session(Session& s) {
        std::vector<ObjectPtr> gone;
        std::lock_guard<std::mutex> lk(mutex_);
        for (auto& u : s.unused_adopted) {  // back in flight (see Session)
            auto r = s.refs.find(u.first);
            if (r == s.refs.end() || r->second <= 0 || tickets_.count(u.second) != 0) continue;
            if (early_.erase(u.second) != 0) continue;  // decoded again meanwhile: that took a reference of its own
            r->second -= 1;
            tickets_[u.second] = u.first;
        }
        s.unused_adopted.clear();
        s.ended = true;
        for (auto& r : s.refs)
            if (r.second > 0)
                if (auto o = drop(r.first, r.second)) gone.push_back(std::move(o));
        s.refs.clear();
        return gone;
    }
    std::size_t count() {
        std::lock_guard<std::mutex> lk(mutex_);
        return objects_.size();
    }
    std::vector<ObjectPtr> take_all() {
        std::vector<ObjectPtr> all;
        std::lock_guard<std::mutex> lk(mutex_);
        for (auto& o : objects_) all.push_back(std::move(o.second.object));
        objects_.clear();
        tickets_.clear();
        early_.clear();
        return all;
    }

    // ---- sessions
    SessionPtr open_session(const std::string& key) {
        std::lock_guard<std::mutex> lk(mutex_);
        auto& s = sessions_[key];
        if (!s) s = std::make_shared<Session>();
        return s;
    }
    SessionPtr find_session(const std::string& key) {
        std::lock_guard<std::mutex> lk(mutex_);
        auto it = sessions_.find(key);
        return it == sessions_.end() ? nullptr : it->second;
    }
    void close_session(const std::string& key) {
        SessionPtr s;
        {
            std::lock_guard<std::mutex> lk(mutex_);
            auto it = sessions_.find(key);
            if (it == sessions_.end()) return;
            s = it->second;
            sessions_.erase(it);
        }
        auto gone = end_session(*s);
        gone.clear();  // destructors run here, unlocked
    }

    // ---- connections (for shutdown)
    void add_connection(os::handle_t fd) {
        std::lock_guard<std::mutex> lk(mutex_);
        connections_.insert(fd);
    }
    void remove_connection(os::handle_t fd) {
        std::lock_guard<std::mutex> lk(mutex_);
        connections_.erase(fd);
    }
    void shut_connections() {
        std::lock_guard<std::mutex> lk(mutex_);
        for (auto fd : connections_) os::socket_shutdown(fd);
    }

private:
    struct Entry {
        ObjectPtr object;
        long refs = 0;
    };
    Entry& find(std::uint64_t id) {
        auto it = objects_.find(id);
        if (it == objects_.end())
            throw ServerError("mpservice: server '" + name + "' has no object " + std::to_string(id) +
                              " (it was released, or the id is not one of this server's)");
        return it->second;
    }
    void check_open(const Session& s) const {
        if (s.ended) throw ServerError("mpservice: the client's session with server '" + name + "' has ended");
    }
    /// A ticket used before its MINT arrived.  A mark that is never cancelled
    /// (bytes decoded twice, a forged ticket) costs 8 bytes; the set is bounded
    /// so garbage cannot grow it for ever.
    void mark_early(std::uint64_t ticket) {
        if (early_.size() >= (1u << 16)) early_.clear();
        early_.insert(ticket);
    }
    ObjectPtr drop(std::uint64_t id, long n) {
        auto it = objects_.find(id);
        if (it == objects_.end()) return nullptr;
        if ((it->second.refs -= n) > 0) return nullptr;
        ObjectPtr o = std::move(it->second.object);
        objects_.erase(it);
        return o;
    }
    std::mutex mutex_;
    std::unordered_map<std::uint64_t, Entry> objects_;
    std::unordered_map<std::uint64_t, std::uint64_t> tickets_;
    std::unordered_set<std::uint64_t> early_;  // tickets adopted or dropped before their MINT
    std::map<std::string, SessionPtr> sessions_;
    std::set<os::handle_t> connections_;
    std::uint64_t next_id_ = 1;
};

/// The server of this process, if it is one.
inline std::atomic<Host*> g_host{nullptr};

// ---------------------------------------------------------------- requests

/// A request's outcome: reply kind, bytes, handles to send (closed after).
struct Outcome {
    std::uint32_t kind = reply_ok;
    std::string bytes;
    std::vector<os::handle_t> handles;       // sent, not owned
    std::vector<SharedMemory> keep;          // keeps sent handles open until sent
    bool close_after = false;                // the stream is not trustworthy any more
    bool shutdown_after = false;
};

/// Resolves invokers sent as code references, once per connection.
class CodeCache {
public:
    const void* resolve(const InvokerRef& r) {
        auto key = std::make_tuple(r.code.module, r.code.offset, r.identity);
        auto it = cache_.find(key);
        if (it != cache_.end()) return it->second;
        const void* fn = os::code_ref_resolve(r.code);
        if (!fn || r.identity == 0 || invoker_identity(fn) != r.identity)
            throw ServerError(
                "mpservice: the server does not know this constructor or method (not one of this build's "
                "invokers: a different build, or a corrupt request)");
        if (cache_.size() > 4096) cache_.clear();  // garbage should not grow it forever
        cache_[key] = fn;
        return fn;
    }

private:
    std::map<std::tuple<std::uint64_t, std::uint64_t, std::uint64_t>, const void*> cache_;
};

/// Whether this process is a server process, with its host running (server_host.cpp).
bool host_running() noexcept;
/// Runs a request; any exception becomes an error reply (server_host.cpp).
void serve_one(Host& host, Session& session, CodeCache& codes, std::uint32_t op, const std::string& payload,
               const std::vector<os::handle_t>& handles, Outcome& out);
/// The target of the server process (server_host.cpp).
void server_main(ServerBoot boot);
/// Lets the server's own proxies call it directly (server_client.cpp).
void install_local_link(Host& host);

}  // namespace server
}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/server_host.hpp
#endif
#if MPSERVICE_PART_(8)
// ---- begin part: mpservice/impl/server_wire.cpp -----------------------------
// server_wire: the out-of-line helpers the proxy templates call (announcing
// invokers, type hashes, the wrong-type error, slot counters); the protocol
// itself is in server_wire.hpp.

namespace mpservice {

// ---------------------------------------------------------------- public helpers of the templates

namespace detail::server {

bool announce_invoker(const void* fn, const std::type_info& identity) noexcept {
    try {
        std::uint64_t h = type_hash(identity.name());
        InvokerSet& s = invokers();
        std::lock_guard<std::mutex> lk(s.mutex);
        s.fns[fn] = h;
    } catch (...) {
    }
    return true;
}

/// The identity hash of an announced invoker; 0 if `fn` is not one.
std::uint64_t invoker_identity(const void* fn) {
    InvokerSet& s = invokers();
    std::lock_guard<std::mutex> lk(s.mutex);
    auto it = s.fns.find(fn);
    return it == s.fns.end() ? 0 : it->second;
}

std::uint64_t type_hash(const char* mangled) noexcept {
    std::uint64_t h = 1469598103934665603ull;
    for (const char* p = mangled; p && *p; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 1099511628211ull;
    return h;
}

void throw_wrong_type(const char* expected_mangled) {
    throw ServerError("mpservice: the object is not a " + os::demangle(expected_mangled) +
                      " (the proxy's class does not match the hosted object)");
}

SlotCounters slot_counters() noexcept {
    SlotStats& s = slot_stats();
    auto get = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
    return SlotCounters{get(s.calls), get(s.spun), get(s.slept), get(s.slow), get(s.woke_server), get(s.resyncs),
                        get(s.resynced)};
}

}  // namespace detail::server

// (ServerError is one of the library's own types: in remote_exception.cpp's standard table.)

}  // namespace mpservice
// ---- end part: mpservice/impl/server_wire.cpp
// ---- begin part: mpservice/impl/server_host.cpp -----------------------------
// server_host: the server side - the object table, sessions and tickets, one
// thread per connection, the slot fast path, shutdown.

namespace mpservice {
namespace detail {
namespace server {

bool host_running() noexcept { return g_host.load() != nullptr; }

/// A memory block's size and memfd, attached to a reply (create, adopt,
/// block): whoever receives a block's proxy maps it without another round trip.
void attach_block(Encoder& e, const HostedObject& o, Outcome& out) {
    const auto& mem = static_cast<MemoryBlock*>(o.obj.object)->memory();
    e.write(static_cast<std::uint64_t>(mem.size()));
    e.write(e.attach(mem.handle()));
    out.keep.push_back(mem);
}

/// The current thread serves a request: proxies made while encoding its
/// result are minted by the host directly.
void run_request(Host& host, Session& session, CodeCache& codes, std::uint32_t op, const std::string& payload,
                 const std::vector<os::handle_t>& handles, Outcome& out) {
    Decoder d(payload.data(), payload.size(), &handles);
    Encoder e;
    switch (op) {
        case op_create: {
            InvokerRef c = read_invoker(d);
            auto type = d.read<std::uint64_t>();
            auto fn = reinterpret_cast<CreateFn>(reinterpret_cast<std::uintptr_t>(codes.resolve(c)));
            NewObject obj = fn(d);
            std::uint64_t id = host.add(obj, type, session);
            e.write(id);
            if (obj.type == &TypeTag<MemoryBlock>::tag) attach_block(e, *host.get(id), out);
            break;
        }
        case op_call: {
            auto id = d.read<std::uint64_t>();
            InvokerRef c = read_invoker(d);
            auto fn = reinterpret_cast<MethodFn>(reinterpret_cast<std::uintptr_t>(codes.resolve(c)));
            ObjectPtr o = host.get_for_call(session, id);  // keeps it alive through the call
            fn(o->obj.type, o->obj.object, d, e);
            break;
        }
        case op_adopt: {
            auto ticket = d.read<std::uint64_t>();
            ObjectPtr o = host.adopt(session, ticket, d.read<std::uint64_t>());
            if (o->obj.type == &TypeTag<MemoryBlock>::tag) attach_block(e, *o, out);
            break;
        }
        case op_incref: host.incref(session, d.read<std::uint64_t>()); break;
        case op_block: {
            ObjectPtr o = host.get(d.read<std::uint64_t>());
            if (o->obj.type != &TypeTag<MemoryBlock>::tag) throw_wrong_type(typeid(MemoryBlock).name());
            attach_block(e, *o, out);
            break;
        }
        case op_count:
            e(static_cast<std::uint64_t>(host.count()), static_cast<std::int64_t>(os::open_handle_count()),
              static_cast<std::int64_t>(os::mapping_count()));
            break;
        case op_shutdown: out.shutdown_after = true; break;
        default: throw ServerError("mpservice: unknown request " + std::to_string(op) + " (a corrupt message?)");
    }
    out.bytes = std::move(e.bytes());
    out.handles = e.handles();
}

/// Runs a request; any exception becomes an error reply.
void serve_one(Host& host, Session& session, CodeCache& codes, std::uint32_t op, const std::string& payload,
               const std::vector<os::handle_t>& handles, Outcome& out) {
    try {
        run_request(host, session, codes, op, payload, handles, out);
    } catch (...) {
        out = Outcome();
        out.kind = reply_error;
        Encoder e;
        try {
            encode_exception(e, std::current_exception());
        } catch (...) {
            e = Encoder();
            encode_exception(e, std::make_exception_ptr(ServerError("mpservice: the server's exception could not be encoded")));
        }
        out.bytes = std::move(e.bytes());
    }
}

// ---------------------------------------------------------------- one connection

class Connection {
public:
    Connection(Host& host, os::handle_t fd) : host_(host), fd_(fd) {}

    void run() {
        try {
            if (hello()) loop();
        } catch (...) {
            // A broken connection ends; the others go on.
        }
        if (main_) host_.close_session(session_key_);
        host_.remove_connection(fd_);
        os::close_handle(fd_);
    }

private:
    bool refuse(const std::string& why) {
        Encoder e;
        encode_exception(e, std::make_exception_ptr(ServerError(why)));
        send_frame(fd_, reply_error, e.bytes());
        return false;
    }

    bool hello() {
        if (os::peer_user(fd_) != os::current_user()) return false;  // another user: not a word
        wire::Frame f;
        if (reader_.read(fd_, f, 4096) != BoundedReader::got || f.kind != op_hello)
            return refuse("mpservice: the server expected a HELLO first");
        wire::close_all(f.handles);
        try {
            Decoder d(f.payload);
            auto version = d.read<std::uint32_t>();
            auto key = d.read<std::string>();
            auto session = d.read<std::string>();
            auto pid = d.read<std::int64_t>();
            auto fingerprint = d.read<std::string>();
            main_ = d.read<bool>();
            (void)pid;
            if (version != server_protocol)
                return refuse("mpservice: the client speaks server protocol " + std::to_string(version) +
                              ", this server " + std::to_string(server_protocol));
            if (key != host_.authkey) return refuse("mpservice: authentication with the server failed");
            if (fingerprint != host_.fingerprint)
                return refuse("mpservice: server '" + host_.name +
                              "' runs a different build of the program than this client (build fingerprints differ)");
            session_key_ = session;
            session_ = main_ ? host_.open_session(session) : host_.find_session(session);
            if (!session_) return refuse("mpservice: the client's session with the server has ended");
        } catch (const DecodeError& e) {
            return refuse(std::string("mpservice: malformed HELLO: ") + e.what());
        }
        return send_frame(fd_, reply_ok, std::string());
    }

    void loop() {
        wire::Frame f;
        for (;;) {
            BoundedReader::Status status;
            if (!slot_) {
                status = reader_.read(fd_, f, max_request);
            } else {
                serve_slot();
                // Nothing in the slot for a while: look at the socket, then sleep
                // on the doorbell.  The bell is read first, so a request made
                // after that rings a value we do not wait on.
                SlotHeader* h = slot_header(slot_.data());
                std::uint32_t bell = h->doorbell.load(std::memory_order_seq_cst);
                status = reader_.read(fd_, f, max_request, true);
                if (status == BoundedReader::nothing) {
                    if (host_.stopping.load()) return;
                    h->server_sleeping.store(1, std::memory_order_seq_cst);
                    if (h->request_seq.load(std::memory_order_seq_cst) == last_seq_)
                        os::futex_wait(&h->doorbell, bell, os::Clock::now() + server_check);
                    h->server_sleeping.store(0, std::memory_order_relaxed);
                    continue;
                }
            }
            if (status == BoundedReader::eof) return;
            if (status == BoundedReader::too_big) {
                refuse("mpservice: the server refused a request larger than 1 GiB (a corrupt message?)");
                return;
            }
            if (!on_frame(f)) return;
        }
    }

    /// A frame from the socket; false ends the connection.
    bool on_frame(wire::Frame& f) {
        struct Closer {
            std::vector<os::handle_t>& hs;
            ~Closer() { wire::close_all(hs); }
        } closer{f.handles};
        switch (f.kind) {
            case op_wake: return true;
            case op_decref: {
                Decoder d(f.payload);
                while (!d.at_end()) {
                    auto id = d.read<std::uint64_t>();
                    auto n = d.read<std::int64_t>();
                    ObjectPtr gone = host_.decref(*session_, id, static_cast<long>(n));
                }
                return true;
            }
            case op_drop_ticket: {
                Decoder d(f.payload);
                ObjectPtr gone = host_.drop_ticket(d.read<std::uint64_t>());
                return true;
            }
            case op_mint: {
                Decoder d(f.payload);
                auto id = d.read<std::uint64_t>();
                host_.mint(id, d.read<std::uint64_t>());
                return true;
            }
            case op_slot: {
                Outcome out;
                try {
                    if (f.handles.size() != 1) throw ServerError("mpservice: SLOT without its memory");
                    SharedMemory m = SharedMemory::adopt(os::duplicate_handle(f.handles[0]));
                    if (m.size() != slot_bytes) throw ServerError("mpservice: SLOT of the wrong size");
                    slot_ = m;
                    last_seq_ = slot_header(slot_.data())->request_seq.load(std::memory_order_acquire);
                } catch (...) {
                    out.kind = reply_error;
                    Encoder e;
                    encode_exception(e, std::current_exception());
                    out.bytes = e.bytes();
                }
                return send_frame(fd_, out.kind, out.bytes);
            }
            default: break;
        }
        if (f.kind < op_hello || f.kind >= op_last || f.kind == op_hello) {
            refuse("mpservice: the server received garbage (unknown frame " + std::to_string(f.kind) + ")");
            return false;
        }
        Outcome out;
        serve_one(host_, *session_, codes_, f.kind, f.payload, f.handles, out);
        if (!send_frame(fd_, out.kind, out.bytes, out.handles)) return false;
        if (out.shutdown_after) request_shutdown();
        return true;
    }

    /// Serves requests arriving in the slot while they keep coming; false once
    /// none came for the spin budget.
    bool serve_slot() {
        SlotHeader* h = slot_header(slot_.data());
        bool any = false;
        std::uint32_t hold_ns = 0;  // a client's resync: stay awake this long for its next request
        for (;;) {
            auto requested = [&] { return h->request_seq.load(std::memory_order_acquire) != last_seq_; };
            const bool got = hold_ns ? spin_for(requested, std::chrono::nanoseconds(hold_ns)) : spin_until(requested, spin_ns_);
            if (hold_ns && got) spin_ns_.store(spin_max_ns, std::memory_order_relaxed);  // we meet again
            if (!got) break;
            if (host_.stopping.load()) return false;
            any = true;
            std::uint32_t seq = h->request_seq.load(std::memory_order_acquire);
            last_seq_ = seq;
            hold_ns = std::min(h->resync_ns.exchange(0, std::memory_order_relaxed), resync_ns);
            std::uint32_t size = h->request_size;
            std::uint32_t op = h->request_op;
            Outcome out;
            if (size > slot_capacity || op == op_hello || op == op_slot || op == op_decref || op == op_drop_ticket ||
                op == op_mint) {
                out.kind = reply_error;
                Encoder e;
                encode_exception(e, std::make_exception_ptr(ServerError("mpservice: the server received a garbled slot request")));
                out.bytes = e.bytes();
            } else {
                std::string payload(slot_data(slot_.data()), size);
                serve_one(host_, *session_, codes_, op, payload, {}, out);
            }
            if (out.handles.empty() && out.bytes.size() <= slot_capacity) {
                std::memcpy(slot_data(slot_.data()), out.bytes.data(), out.bytes.size());
                h->reply_size = static_cast<std::uint32_t>(out.bytes.size());
                h->reply_kind = out.kind;
            } else {
                h->reply_kind = 0;  // on the socket, which is written first
                if (!send_frame(fd_, out.kind, out.bytes, out.handles)) return false;
            }
            h->reply_seq.store(seq, std::memory_order_seq_cst);
            if (h->client_sleeping.load(std::memory_order_seq_cst)) os::futex_wake(&h->reply_seq, 1);
            if (out.shutdown_after) {
                request_shutdown();
                return false;
            }
        }
        (void)any;
        return false;
    }

    void request_shutdown() {
        host_.stopping.store(true);
        os::listener_shutdown(host_.listener);
    }

    Host& host_;
    os::handle_t fd_;
    BoundedReader reader_;
    CodeCache codes_;
    bool main_ = false;
    std::string session_key_;
    SessionPtr session_;
    SharedMemory slot_;
    std::uint32_t last_seq_ = 0;
    std::atomic<std::uint32_t> spin_ns_{0};  // how long to wait, awake, for the next request
};

// ---------------------------------------------------------------- the server's main loop

/// The target of the server process.
void server_main(ServerBoot boot) {
    auto* host = new Host;  // never destroyed: connection threads may outlive this function's return
    host->address = boot.address;
    host->authkey = boot.authkey;
    host->name = boot.name;
    host->fingerprint = fingerprint_of("");
    host->listener = boot.listener->fd;
    install_local_link(*host);
    g_host.store(host);

    struct Worker {
        std::thread thread;
        std::shared_ptr<std::atomic<bool>> done;
    };
    std::vector<Worker> workers;
    for (;;) {
        os::handle_t fd = os::listener_accept(host->listener);
        if (fd == os::invalid_handle || host->stopping.load()) {
            os::close_handle(fd);
            break;
        }
        // Reap the threads of connections that ended.
        workers.erase(std::remove_if(workers.begin(), workers.end(),
                                     [](Worker& w) {
                                         if (!w.done->load()) return false;
                                         w.thread.join();
                                         return true;
                                     }),
                      workers.end());
        host->add_connection(fd);
        auto done = std::make_shared<std::atomic<bool>>(false);
        try {
            workers.push_back(Worker{std::thread([host, fd, done] {
                                         Connection(*host, fd).run();
                                         done->store(true);
                                     }),
                                     done});
        } catch (...) {
            host->remove_connection(fd);
            os::close_handle(fd);
        }
    }
    // Shutting down: end every connection, wait for their threads, then destroy
    // what is left (its destructors run; memory blocks go with the process).
    host->stopping.store(true);
    host->shut_connections();
    for (auto& w : workers) w.thread.join();
    auto rest = host->take_all();
    rest.clear();
    host->local->refs.clear();
}

// ---------------------------------------------------------------- the server's own link (server_link.hpp)

/// Proxies inside the server process reach the host directly: no socket.
class LocalLink final : public Link {
public:
    using Link::request;
    explicit LocalLink(Host& host) : host_(host) {}
    std::string request(std::uint32_t op, const std::string& payload, const std::vector<os::handle_t>& handles,
                        std::vector<os::handle_t>& reply_handles) override {
        Outcome out;
        serve_one(host_, *host_.local, codes(), op, payload, handles, out);
        if (out.kind == reply_error) throw_reply_error(out.bytes);
        for (auto h : out.handles) reply_handles.push_back(os::duplicate_handle(h));
        return std::move(out.bytes);
    }
    void post(std::uint32_t op, const std::string& payload) noexcept override {
        try {
            Decoder d(payload);
            ObjectPtr gone;
            if (op == op_decref) {
                auto id = d.read<std::uint64_t>();
                gone = host_.decref(*host_.local, id, static_cast<long>(d.read<std::int64_t>()));
            } else if (op == op_drop_ticket) {
                gone = host_.drop_ticket(d.read<std::uint64_t>());
            } else if (op == op_mint) {
                auto id = d.read<std::uint64_t>();
                host_.mint(id, d.read<std::uint64_t>());
            }
        } catch (...) {
        }
    }
    void mark_gone(const std::string&) noexcept override {}

private:
    /// Per thread (a server's threads each have one).
    struct ThreadCodes {
        CodeCache cache;
    };
    CodeCache& codes() { return os::thread_object<ThreadCodes>().cache; }
    Host& host_;
};

void install_local_link(Host& host) {
    auto l = std::make_shared<LocalLink>(host);
    l->address = host.address;
    l->authkey = host.authkey;
    l->server_name = host.name;
    l->server_pid = os::current_pid();
    l->fingerprint = host.fingerprint;
    set_local_link(std::move(l));
}

bool in_server_process() noexcept { return host_running(); }

RefPtr host_here(NewObject obj, std::uint64_t type) {
    Host* host = g_host.load();
    if (!host) {
        obj.destroy(obj.object);
        throw InvalidStateError("mpservice: managed<T>() works only inside a server process (in a hosted method)");
    }
    std::shared_ptr<Link> local = local_link();
    std::uint64_t id = host->add(obj, type, *host->local);
    return local->make_ref(id, type);
}

}  // namespace server
}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/server_host.cpp
#endif
#if MPSERVICE_PART_(9)
// ---- begin part: mpservice/impl/server_client.cpp ---------------------------
// server_client: the client side's links to servers (one per server per
// process: the server's own, in the server process, and over sockets), the
// per-thread connections with their slots, and the registry of links.  What
// uses the links - references, ServerProcess - is in server_process.cpp.

namespace mpservice {
namespace detail {
namespace server {

// ---------------------------------------------------------------- links

SharedMemory read_block(Decoder& d) {
    auto size = d.read<std::uint64_t>();
    auto index = d.read<std::uint32_t>();
    SharedMemory m = SharedMemory::adopt(os::duplicate_handle(d.handle(index)));
    if (m.size() != size) throw ServerError("mpservice: the memory block's size does not match");
    return m;
}

[[noreturn]] void throw_reply_error(const std::string& payload) {
    Decoder d(payload);
    std::exception_ptr e = decode_exception(d);
    detail::rethrow_exception(e);
}

RefPtr Link::make_ref(std::uint64_t id, std::uint64_t type) {
    std::lock_guard<std::mutex> lk(refs_mutex_);
    auto r = std::make_shared<Ref>();
    r->link = shared_from_this();
    r->id = id;
    r->type = type;
    refs_[id] = r;
    return r;
}

RefPtr Link::existing(std::uint64_t id) {
    std::lock_guard<std::mutex> lk(refs_mutex_);
    auto it = refs_.find(id);
    return it == refs_.end() ? nullptr : it->second.lock();
}

RefPtr Link::adopt(std::uint64_t id, std::uint64_t ticket, std::uint64_t type) {
    if (RefPtr r = existing(id)) {
        post(op_drop_ticket, bytes_of(ticket));
        return r;
    }
    Encoder e;
    e(ticket, id);
    std::vector<os::handle_t> hs;
    std::string reply = request(op_adopt, e.bytes(), {}, hs);
    HandleCloser closer{hs};
    std::lock_guard<std::mutex> lk(refs_mutex_);
    auto it = refs_.find(id);
    if (it != refs_.end())
        if (RefPtr r = it->second.lock()) {  // another thread decoded it meanwhile
            post(op_decref, decref_bytes(id));
            return r;
        }
    auto r = std::make_shared<Ref>();
    r->link = shared_from_this();
    r->id = id;
    r->type = type;
    Decoder d(reply.data(), reply.size(), &hs);
    if (!d.at_end()) r->mapping = read_block(d);
    refs_[id] = r;
    return r;
}

void Link::release(std::uint64_t id) noexcept {
    try {
        {
            std::lock_guard<std::mutex> lk(refs_mutex_);
            auto it = refs_.find(id);
            if (it != refs_.end() && it->second.expired()) refs_.erase(it);
        }
        post(op_decref, decref_bytes(id));
    } catch (...) {
    }
}

std::vector<std::uint64_t> Link::live_ids() {
    std::vector<std::uint64_t> ids;
    std::lock_guard<std::mutex> lk(refs_mutex_);
    for (auto& r : refs_)
        if (!r.second.expired()) ids.push_back(r.first);
    return ids;
}

// ---------------------------------------------------------------- links over sockets

/// This process's id without a system call per request (glibc no longer
/// caches getpid); forgotten in a forked child, which must notice that it is
/// not its parent.
std::atomic<long> g_cached_pid{0};
void forget_cached_pid() { g_cached_pid.store(0, std::memory_order_relaxed); }
long cached_pid() {
    long p = g_cached_pid.load(std::memory_order_relaxed);
    if (p != 0) return p;
    static const bool hooked = [] {
        os::at_fork_child(&forget_cached_pid);
        return true;
    }();
    (void)hooked;
    p = os::current_pid();
    g_cached_pid.store(p, std::memory_order_relaxed);
    return p;
}

std::atomic<bool>& fast_path_enabled() {
    static std::atomic<bool> on{true};
    return on;
}
void set_fast_path(bool enabled) noexcept { fast_path_enabled().store(enabled); }

/// A thread's connection to one server.
struct ThreadConn {
    std::weak_ptr<Link> link;  // entries of links gone are pruned
    os::handle_t fd = os::invalid_handle;
    long pid = 0;  // the process that made it (a forked child must not use its parent's)
    wire::FrameReader reader;
    SharedMemory slot;
    std::uint32_t seq = 0;
    std::atomic<std::uint32_t> spin_ns{0};  // how long to wait, awake, for a reply
    // Resynchronization (server_wire.cpp, slow_call_ns): the next call asks
    // for one; the call after a resync tells whether it met; slow calls still
    // to wait before the next attempt; that wait after a miss.
    bool resync_next = false, resync_check = false;
    std::uint32_t resync_wait = 0, resync_backoff = 1;
    bool slot_refused = false;
    std::mutex close_mutex;
    /// Closes the connection; by its thread at exit, or by its link when the
    /// link goes first (no request can be running on it then).
    void close() noexcept {
        std::lock_guard<std::mutex> lk(close_mutex);
        os::close_handle(fd);
        fd = os::invalid_handle;
        slot = SharedMemory();
    }
    ~ThreadConn() { close(); }
};

void forget_link(const std::string& address, const Link* link) noexcept;  // below

class RemoteLink final : public Link {
public:
    using Link::request;
    RemoteLink() : serial_(next_serial().fetch_add(1)) {}
    ~RemoteLink() override {
        os::close_handle(main_);
        // Other threads' connections to this server: closed now, not at their exit.
        std::lock_guard<std::mutex> lk(conns_mutex_);
        for (auto& w : conns_)
            if (auto c = w.lock()) c->close();
    }

    /// Connects the process's main connection (opens the session).
    void open() {
        std::lock_guard<std::mutex> lk(main_mutex_);
        open_locked();
    }

    std::string request(std::uint32_t op, const std::string& payload, const std::vector<os::handle_t>& handles,
                        std::vector<os::handle_t>& reply_handles) override {
        ensure_this_process();
        check_alive();
        ThreadConn& c = conn();
        if (c.slot && handles.empty() && payload.size() <= slot_capacity) return slot_call(c, op, payload, reply_handles);
        if (!send_frame(c.fd, op, payload, handles)) gone(c);
        if (c.slot) ring(slot_header(c.slot.data()));  // a server thread asleep on the slot looks at the socket
        return await_socket_reply(c, reply_handles);
    }

    void post(std::uint32_t op, const std::string& payload) noexcept override {
        try {
            ensure_this_process();
            std::lock_guard<std::mutex> lk(main_mutex_);
            if (main_ == os::invalid_handle || dead_.load()) return;
            send_frame(main_, op, payload);
        } catch (...) {
        }
    }

    void send_ordered(std::uint32_t op, const std::string& payload) override {
        ensure_this_process();
        check_alive();
        std::lock_guard<std::mutex> lk(main_mutex_);
        if (main_ == os::invalid_handle || !send_frame(main_, op, payload)) {
            dead_.store(true);
            throw ServerError("mpservice: the " + describe() + " is gone; the request did not complete");
        }
    }

    std::string ordered_request(std::uint32_t op, const std::string& payload) override {
        ensure_this_process();
        check_alive();
        std::lock_guard<std::mutex> lk(main_mutex_);
        if (!send_frame(main_, op, payload)) {
            dead_.store(true);
            throw ServerError("mpservice: the " + describe() + " is gone; the request did not complete");
        }
        wire::Frame f;
        if (!read_frame_while_server_lives(main_reader_, main_, f)) {
            dead_.store(true);
            throw ServerError("mpservice: the " + describe() + " is gone; the request did not complete");
        }
        wire::close_all(f.handles);
        if (f.kind == reply_error) throw_reply_error(f.payload);
        return std::move(f.payload);
    }

    void mark_gone(const std::string& why) noexcept override {
        try {
            std::lock_guard<std::mutex> lk(why_mutex_);
            why_ = why;
        } catch (...) {
        }
        dead_.store(true);
        forget_link(address, this);  // the caller holds the link: it is not destroyed here
    }

private:
    static std::atomic<std::uint64_t>& next_serial() {
        static std::atomic<std::uint64_t> n{1};
        return n;
    }

    [[noreturn]] void throw_gone() {
        std::string why;
        {
            std::lock_guard<std::mutex> lk(why_mutex_);
            why = why_;
        }
        throw ServerError("mpservice: the " + describe() + " is gone" + (why.empty() ? std::string() : " (" + why + ")") +
                          "; the request did not complete");
    }
    void check_alive() {
        if (dead_.load()) throw_gone();
    }
    bool server_exited() const { return server_pid > 0 && !os::process_running(server_pid); }

    /// Reads the next frame from the server on `fd`; false when the stream
    /// ended or the server process is gone.  It waits in slices, and between
    /// them asks whether the server process is still there: its death closes
    /// its end of a socket only when no other process holds a copy (a process
    /// it forked inherits every descriptor, its listener too, which then
    /// queues new connections that no one accepts), and under Wine a killed
    /// server's socket was seen never to report its end.
    bool read_frame_while_server_lives(wire::FrameReader& reader, os::handle_t fd, wire::Frame& f) {
        const int slice_ms = static_cast<int>(client_check.count());
        while (!reader.next(f)) {
            if (os::wait_io(fd, os::io_readable, slice_ms) == 0) {
                if (server_exited()) return false;
                continue;
            }
            if (reader.fill(fd, true) == 0) return false;  // the end of the stream
        }
        return true;
    }
    [[noreturn]] void gone(ThreadConn& c) {
        (void)c;
        mark_gone("it exited or was killed");
        throw_gone();
    }

    /// Opens a connection and says HELLO; the server's refusal is thrown.
    os::handle_t connect_and_hello(bool main) {
        os::handle_t fd;
        try {
            fd = os::unix_connect(address);
        } catch (const std::system_error& e) {
            mark_gone(std::string("cannot connect: ") + e.what());
            throw_gone();
        }
        Encoder e;
        e(server_protocol, authkey, session_, static_cast<std::int64_t>(os::current_pid()), fingerprint_of(""), main);
        wire::FrameReader reader;
        wire::Frame f;
        if (!send_frame(fd, op_hello, e.bytes()) || !read_frame_while_server_lives(reader, fd, f)) {
            os::close_handle(fd);
            mark_gone("it closed the connection");
            throw_gone();
        }
        wire::close_all(f.handles);
        if (f.kind != reply_ok) {
            os::close_handle(fd);
            if (f.kind == reply_error) throw_reply_error(f.payload);
            throw ServerError("mpservice: the " + describe() + " answered HELLO with garbage");
        }
        return fd;
    }

    void open_locked() {
        unsigned char token[16];
        os::random_bytes(token, sizeof token);
        session_.assign(reinterpret_cast<const char*>(token), sizeof token);
        pid_ = cached_pid();
        main_ = connect_and_hello(true);
    }

    /// In a forked child: the inherited connections are the parent's.  Open a
    /// session of our own and take a reference for each proxy we inherited.
    void ensure_this_process() {
        if (pid_.load() == cached_pid()) return;
        std::vector<std::uint64_t> ids;
        {
            std::lock_guard<std::mutex> lk(main_mutex_);
            if (pid_.load() == cached_pid()) return;
            os::close_handle(main_);  // our copy only; the parent's connection stays
            main_ = os::invalid_handle;
            dead_.store(false);
            open_locked();
        }
        for (auto id : live_ids()) {
            try {
                Encoder e;
                e.write(id);
                request(op_incref, e.bytes());
            } catch (...) {
            }
        }
    }

    /// This thread's connections, by link serial: closed when the thread ends.
    struct ThreadConns {
        std::unordered_map<std::uint64_t, std::shared_ptr<ThreadConn>> by_serial;
    };
    ThreadConn& conn() {
        auto& conns = os::thread_object<ThreadConns>().by_serial;
        auto& c = conns[serial_];
        long me = cached_pid();
        if (c && c->pid != me) {
            c->slot = SharedMemory();  // the parent's slot: never touched again here
            c.reset();
        }
        if (!c) {
            // A new connection: first drop this thread's connections to links that are gone.
            for (auto it = conns.begin(); it != conns.end();)
                if (it->second && it->second->link.expired() && it->first != serial_)
                    it = conns.erase(it);
                else
                    ++it;
            auto fresh = std::make_shared<ThreadConn>();
            fresh->link = weak_from_this();
            fresh->pid = me;
            fresh->fd = connect_and_hello(false);
            {
                std::lock_guard<std::mutex> lk(conns_mutex_);
                conns_.erase(std::remove_if(conns_.begin(), conns_.end(),
                                            [](const std::weak_ptr<ThreadConn>& w) { return w.expired(); }),
                             conns_.end());
                conns_.push_back(fresh);
            }
            c = std::move(fresh);
            offer_slot(*c);
        }
        return *c;
    }

    void offer_slot(ThreadConn& c) {
        if (!fast_path_enabled().load(std::memory_order_relaxed)) return;
        try {
            SharedMemory m = SharedMemory::create(slot_bytes);
            new (m.data()) SlotHeader();
            if (!send_frame(c.fd, op_slot, std::string(), {m.handle()})) gone(c);
            std::vector<os::handle_t> hs;
            await_socket_reply(c, hs);
            wire::close_all(hs);
            c.slot = m;
        } catch (const ServerError&) {
            throw;
        } catch (...) {
            c.slot_refused = true;  // the socket alone still works
        }
    }

    /// The next reply frame on the socket (wake-ups skipped).
    std::string await_socket_reply(ThreadConn& c, std::vector<os::handle_t>& reply_handles) {
        wire::Frame f;
        for (;;) {
            if (!read_frame_while_server_lives(c.reader, c.fd, f)) gone(c);
            if (f.kind == op_wake) continue;
            break;
        }
        if (f.kind == reply_ok) {
            for (auto h : f.handles) reply_handles.push_back(h);
            return std::move(f.payload);
        }
        wire::close_all(f.handles);
        if (f.kind == reply_error) throw_reply_error(f.payload);
        throw ServerError("mpservice: the " + describe() + " sent a reply of unknown kind");
    }

    static void ring(SlotHeader* h) {
        h->doorbell.fetch_add(1, std::memory_order_seq_cst);
        if (h->server_sleeping.load(std::memory_order_seq_cst)) {
            slot_stats().woke_server.fetch_add(1, std::memory_order_relaxed);
            os::futex_wake(&h->doorbell, 1);
        }
    }

    std::string slot_call(ThreadConn& c, std::uint32_t op, const std::string& payload,
                          std::vector<os::handle_t>& reply_handles) {
        SlotHeader* h = slot_header(c.slot.data());
        SlotStats& stats = slot_stats();
        stats.calls.fetch_add(1, std::memory_order_relaxed);
        std::memcpy(slot_data(c.slot.data()), payload.data(), payload.size());
        h->request_op = op;
        h->request_size = static_cast<std::uint32_t>(payload.size());
        const bool resync = c.resync_next;
        c.resync_next = false;
        if (resync) {
            stats.resyncs.fetch_add(1, std::memory_order_relaxed);
            h->resync_ns.store(resync_ns, std::memory_order_relaxed);  // published by request_seq
        }
        const std::uint32_t seq = ++c.seq;
        h->request_seq.store(seq, std::memory_order_seq_cst);
        ring(h);
        auto answered = [&] { return h->reply_seq.load(std::memory_order_acquire) == seq; };
        const bool spun = resync ? spin_for(answered, std::chrono::nanoseconds(resync_ns)) : spin_until(answered, c.spin_ns);
        if (spun) {
            stats.spun.fetch_add(1, std::memory_order_relaxed);
            if (resync) c.spin_ns.store(spin_max_ns, std::memory_order_relaxed);  // and see the next call
            if (c.resync_check) {
                stats.resynced.fetch_add(1, std::memory_order_relaxed);
                c.resync_backoff = 1;
            }
        } else {
            // Asleep on the reply word, in slices: between them, the socket
            // tells whether the server is still there.
            const auto asleep = os::Clock::now();
            h->client_sleeping.store(1, std::memory_order_seq_cst);
            while (!answered()) {
                std::uint32_t now = h->reply_seq.load(std::memory_order_seq_cst);
                if (now != seq) os::futex_wait(&h->reply_seq, now, os::Clock::now() + client_check);
                if (answered()) break;
                long n = c.reader.fill(c.fd, true);  // a reply on the socket stays buffered for below
                // The socket's end is the usual sign of the server's death; the
                // process itself is the sure one (under Wine a killed server's
                // socket was seen never to report its end: the call slept on).
                if (n == 0 || server_exited()) {
                    h->client_sleeping.store(0, std::memory_order_relaxed);
                    if (answered()) break;  // it replied just before it went
                    gone(c);
                }
            }
            h->client_sleeping.store(0, std::memory_order_relaxed);
            stats.slept.fetch_add(1, std::memory_order_relaxed);
            if (os::Clock::now() - asleep > std::chrono::nanoseconds(slow_call_ns)) note_slow_call(c);
        }
        c.resync_check = resync;
        std::uint32_t kind = h->reply_kind;
        if (kind == 0) return await_socket_reply(c, reply_handles);  // written before reply_seq
        std::uint32_t size = h->reply_size;
        if (size > slot_capacity) throw ServerError("mpservice: garbled reply in the slot");
        std::string reply(slot_data(c.slot.data()), size);
        if (kind == reply_error) throw_reply_error(reply);
        return reply;
    }

    /// A call answered only after a long sleep: maybe the sleep-sleep pattern
    /// of two CPUs; try a resync now and then (exponential backoff on misses).
    static void note_slow_call(ThreadConn& c) {
        slot_stats().slow.fetch_add(1, std::memory_order_relaxed);
        if (c.resync_check) c.resync_backoff = std::min(c.resync_backoff * 2, resync_backoff_max);  // it missed
        if (c.resync_wait > 0) {
            --c.resync_wait;
            return;
        }
        c.resync_next = true;
        c.resync_wait = c.resync_backoff;
    }

    const std::uint64_t serial_;
    std::mutex conns_mutex_;
    std::vector<std::weak_ptr<ThreadConn>> conns_;  // every thread's connection to this server
    std::mutex main_mutex_;
    os::handle_t main_ = os::invalid_handle;
    wire::FrameReader main_reader_;
    std::string session_;
    std::atomic<long> pid_{0};
    std::atomic<bool> dead_{false};
    // Why the server is gone; its own lock, because opening the main
    // connection (under main_mutex_) marks the link gone when it fails.
    std::mutex why_mutex_;
    std::string why_;
};

// ---------------------------------------------------------------- the registry of links

struct Registry {
    std::mutex mutex;
    std::map<std::string, std::weak_ptr<Link>> links;
    /// Links kept open after their last proxy went, until their server is
    /// found gone or shut down: a process that receives proxies one at a time
    /// (from a Queue, say) would otherwise connect, say HELLO and hand over a
    /// slot for each.  An idle link costs two sockets and a 64 KiB slot.
    std::map<std::string, std::shared_ptr<Link>> kept;
    std::shared_ptr<Link> local;  // in a server process: its own
};
Registry& registry() {
    static Registry* r = new Registry;  // never destroyed: proxies may be released during exit
    return *r;
}

/// Set while this thread holds the registry's lock in link_for (a link that
/// fails to open marks itself gone, and must not take the lock again).
thread_local bool t_in_link_for = false;

std::shared_ptr<Link> link_for(const LinkInfo& info) {
    Registry& reg = registry();
    std::lock_guard<std::mutex> lk(reg.mutex);
    if (reg.local && reg.local->address == info.address) return reg.local;
    auto& slot = reg.links[info.address];
    if (auto l = slot.lock()) return l;
    for (auto it = reg.links.begin(); it != reg.links.end();)  // forget links that are gone
        if (it->second.expired() && it->first != info.address)
            it = reg.links.erase(it);
        else
            ++it;
    auto l = std::make_shared<RemoteLink>();
    l->address = info.address;
    l->authkey = info.authkey;
    l->server_name = info.name;
    l->server_pid = info.pid;
    l->fingerprint = info.fingerprint;
    struct Opening {
        Opening() { t_in_link_for = true; }
        ~Opening() { t_in_link_for = false; }
    } opening;
    l->open();
    slot = l;
    reg.kept[info.address] = l;
    return l;
}

void forget_link(const std::string& address, const Link* link) noexcept {
    if (t_in_link_for) return;  // not kept yet
    std::shared_ptr<Link> last;  // released after the registry's lock
    try {
        Registry& reg = registry();
        std::lock_guard<std::mutex> lk(reg.mutex);
        auto it = reg.kept.find(address);
        if (it != reg.kept.end() && it->second.get() == link) {
            last = std::move(it->second);
            reg.kept.erase(it);
        }
    } catch (...) {
    }
}

void set_local_link(std::shared_ptr<Link> link) {
    Registry& reg = registry();
    std::lock_guard<std::mutex> lk(reg.mutex);
    reg.local = std::move(link);
}

std::shared_ptr<Link> local_link() {
    Registry& reg = registry();
    std::lock_guard<std::mutex> lk(reg.mutex);
    return reg.local;
}

/// An invoker as the server is told of it, cached per thread (finding the
/// module is a walk of the loaded modules).
struct ThreadInvokers {
    std::unordered_map<const void*, InvokerRef> by_function;
};
InvokerRef invoker_of(const void* fn) {
    auto& cache = os::thread_object<ThreadInvokers>().by_function;
    auto it = cache.find(fn);
    if (it != cache.end()) return it->second;
    InvokerRef r;
    r.code = os::code_ref_of(fn);
    r.identity = invoker_identity(fn);
    return cache[fn] = r;
}

Ref::~Ref() {
    if (link) link->release(id);
}

}  // namespace server
}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/server_client.cpp
#endif
#if MPSERVICE_PART_(10)
// ---- begin part: mpservice/impl/connection.cpp ------------------------------
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
// ---- end part: mpservice/impl/connection.cpp
#endif
#if MPSERVICE_PART_(11)
// ---- begin part: mpservice/impl/pool_results.cpp ----------------------------
// pool_results: reading a pool's results - by a waiting caller or the result
// thread - and what a dead worker costs (from its slot: which item failed,
// which finished, which go to another worker).

namespace mpservice {
namespace detail {

PoolResultState::PoolResultState() { name = "AsyncResult"; }

void PoolResultState::read_from(const Shared<PoolCore>& pool) { pool_ = pool.shared(); }

bool PoolResultState::wait_until(os::Deadline deadline) const {
    if (done_relaxed()) return true;
    if (auto pool = pool_.lock())
        return pool->serve_until([this] { return done_relaxed(); }, deadline,
                                 [this](os::Deadline d) { FutureCore::wait_until(d); });
    return FutureCore::wait_until(deadline);  // the pool is gone: it resolved every result first
}

void log_callback_error(const std::exception_ptr& e) {
    std::string what = "unknown exception";
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        what = x.what();
    } catch (...) {
    }
    get_logger("mpservice.pool").error("a result callback threw: " + what);
}

namespace {
using State = PoolCore::State;

bool is_remote_error(const std::exception_ptr& e) {
    try {
        std::rethrow_exception(e);
    } catch (const RemoteError&) {
        return true;
    } catch (...) {
    }
    return false;
}

std::string error_text(const std::exception_ptr& e) {
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        return x.what();
    } catch (...) {
    }
    return "unknown error";
}

/// Deliveries for items [from, to) of `c`, all failing with `e`.
void fail_items(State::Chunk& c, std::uint32_t from, std::uint32_t to, const std::exception_ptr& e,
                PoolCore::Deliveries& out) {
    for (std::uint32_t i = from; i < to; ++i) out.add(c.job, JobItem{c.job_first + i, record_error, nullptr, 0, e});
}

}  // namespace

void PoolCore::maybe_finish_locked() {
    State& s = *s_;
    if (s.phase != State::Phase::closing || !s.pending.empty()) return;
    for (auto& w : s.workers)
        if (!w.outstanding.empty()) return;
    for (auto& w : s.workers)
        if (w.proc && !w.ended && !w.ring_closed) {
            w.tasks.close();  // the worker drains its ring, finds it closed and exits
            w.ring_closed = true;
        }
}

void PoolCore::complete_locked(std::uint64_t id) {
    State& s = *s_;
    auto it = s.chunks.find(id);
    if (it == s.chunks.end()) return;
    int wi = it->second->worker;
    if (wi >= 0) {
        auto& out = s.workers[static_cast<std::size_t>(wi)].outstanding;
        out.erase(std::remove(out.begin(), out.end(), id), out.end());
    }
    s.chunks.erase(it);
}

void PoolCore::book_results(const unsigned char* p, std::size_t n, Deliveries& out) {
    State& s = *s_;
    if (n < sizeof(PoolResultHeader)) return;
    PoolResultHeader h;
    std::memcpy(&h, p, sizeof h);
    if (h.kind != pool_result_records) return;
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        auto it = s.chunks.find(h.chunk);
        if (it == s.chunks.end()) return;  // terminated meanwhile
        State::Chunk& c = *it->second;
        // Count the records (their headers only); the job decodes them later,
        // outside every lock, straight from the message.
        std::uint32_t after = walk_records(p + sizeof h, n - sizeof h, h.first,
                                           [](std::uint32_t, std::uint32_t, const unsigned char*, std::size_t) {});
        std::uint32_t end = std::min<std::uint32_t>(after, c.count);
        if (end > c.next) {
            out.runs.emplace_back(c.job, JobRecords{c.job_first, h.first, c.next, end, p + sizeof h, n - sizeof h});
            c.next = end;
        }
        if (c.next >= c.count) {
            complete_locked(h.chunk);
            dispatch_locked();
            maybe_finish_locked();
            s.changed.notify_all();
        }
    }
}

std::vector<const void*> PoolCore::dead_workers() const {
    State& s = *s_;
    std::lock_guard<std::mutex> lk(s.mutex);
    std::vector<const void*> dead;
    for (auto& w : s.workers)
        if (w.proc && !w.ended && w.dead->load(std::memory_order_acquire)) dead.push_back(w.dead.get());
    return dead;
}

void PoolCore::handle_deaths(const std::vector<const void*>& dead, Deliveries& out) {
    State& s = *s_;
    {
        std::lock_guard<std::mutex> lk(s.mutex);
        for (std::size_t i = 0; i < s.workers.size(); ++i) {
            State::WorkerRec& w = s.workers[i];
            // Only deaths seen before the ring was drained: a worker that died
            // since may have sent outcomes that are not taken yet (its death
            // rang the bell again, so it is handled next round).
            if (!w.proc || w.ended || std::find(dead.begin(), dead.end(), w.dead.get()) == dead.end()) continue;
            w.ended = true;
            reconcile_locked(i, out);
        }
        dispatch_locked();
        maybe_finish_locked();
        s.changed.notify_all();
    }
}

void PoolCore::reconcile_locked(std::size_t wi, Deliveries& out) {
    State& s = *s_;
    State::WorkerRec& w = s.workers[wi];
    int code = w.proc->exitcode().value_or(0);
    std::exception_ptr werr = w.proc->core().error();
    auto* slot = static_cast<PoolSlot*>(w.slot.data());
    bool was_ready = slot->ready.load(std::memory_order_acquire) != 0;
    std::uint64_t running = slot->chunk.load(std::memory_order_acquire);
    std::uint32_t index = slot->index.load(std::memory_order_acquire);
    std::uint32_t used = std::min(slot->used.load(std::memory_order_acquire), slot_record_bytes);

    std::string how = werr ? error_text(werr)
                           : (w.proc->name() + " (pid " + std::to_string(w.proc->pid()) + ") exited with code " +
                              std::to_string(code));
    auto task_error = std::make_exception_ptr(
        ProcessError("mpservice: the " + settings_.kind + " worker died while running this task: " + how, code));

    std::vector<std::uint64_t> resend;
    for (std::uint64_t id : w.outstanding) {
        auto it = s.chunks.find(id);
        if (it == s.chunks.end()) continue;
        State::Chunk& c = *it->second;
        c.worker = -1;
        if (id == running) {
            // The outcomes of the finished items still in the slot...
            const std::string& kept =
                out.keep.emplace_back(reinterpret_cast<const char*>(slot->records()), used);
            walk_records(reinterpret_cast<const unsigned char*>(kept.data()), kept.size(), slot->header.first,
                         [&](std::uint32_t i, std::uint32_t kind, const unsigned char* data, std::size_t size) {
                                if (i < c.next || i >= c.count) return;
                                out.add(c.job, JobItem{c.job_first + i, kind, data, size, nullptr});
                                c.next = i + 1;
                            });
            // ...and the one that was running when the worker died fails, once.
            if (index != no_item && index == c.next && c.next < c.count) {
                fail_items(c, c.next, c.next + 1, task_error, out);
                ++c.next;
            }
        }
        if (c.next < c.count) {
            resend.push_back(id);
        } else {
            s.chunks.erase(it);
        }
    }
    w.outstanding.clear();
    s.pending.insert(s.pending.begin(), resend.begin(), resend.end());

    // Should the worker be replaced?
    bool init_failed = !was_ready && werr != nullptr;
    s.failed_starts = init_failed ? s.failed_starts + 1 : 0;
    if (!s.broken && s.phase != State::Phase::terminated) {
        if (init_failed && is_remote_error(werr)) {
            // The initializer (a runner's constructor) threw: every new
            // worker would fail the same way.
            s.broken = werr;
        } else if (!settings_.replace_dead_workers && !(s.phase == State::Phase::closing && code == 0 && !werr)) {
            s.broken = std::make_exception_ptr(ProcessError(
                "mpservice: the " + settings_.kind + "'s process has died (" + how + "); it serves no more calls",
                code));
        } else if (init_failed && s.failed_starts >= 3) {
            s.broken = werr;  // the workers keep dying before they are ready
        }
    }
    if (s.broken) {
        fail_all_locked(s.broken, out);
        return;
    }
    if (s.phase == State::Phase::terminated || !settings_.replace_dead_workers) return;
    if (s.phase == State::Phase::closing && s.pending.empty()) return;
    try {
        start_worker(wi, true);
    } catch (...) {
        s.broken = std::current_exception();
        fail_all_locked(s.broken, out);
    }
}

void PoolCore::fail_all_locked(const std::exception_ptr& e,
                               Deliveries& out) {
    State& s = *s_;
    for (auto& [id, c] : s.chunks) fail_items(*c, c->next, c->count, e, out);
    s.chunks.clear();
    s.pending.clear();
    for (auto& w : s.workers) w.outstanding.clear();
}

bool PoolCore::read_results(os::Deadline deadline, Deliveries& out) {
    State& s = *s_;
    PoolDoorbell& bell = *s.bell;
    auto take = [&](os::Deadline d) {
        // Read into a string the deliveries keep: their items point into it.
        std::string& msg = out.keep.emplace_back();
        if (bell.results.get(&copy_item, &msg, d) != QueueCore::Status::ok) {
            out.keep.pop_back();
            return false;
        }
        book_results(reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), out);
        return true;
    };
    auto deaths = [&] {
        if (!bell.deaths.exchange(0, std::memory_order_acq_rel)) return;
        // Whatever the dead workers sent before they died is in the ring: book it first.
        auto dead = dead_workers();
        while (take(os::Clock::now())) {
        }
        handle_deaths(dead, out);
    };
    deaths();
    bool got = take(deadline);
    deaths();  // a death's bell may be what woke the get
    return got;
}

bool PoolCore::serve_until(const std::function<bool()>& done, os::Deadline deadline,
                           const std::function<void(os::Deadline)>& sleep) {
    State& s = *s_;
    struct Waiting {
        std::atomic<int>& n;
        explicit Waiting(std::atomic<int>& c) : n(c) { n.fetch_add(1, std::memory_order_acq_rel); }
        ~Waiting() { n.fetch_sub(1, std::memory_order_acq_rel); }
    } waiting{s.waiting};
    while (!done()) {
        auto now = os::Clock::now();
        if (now >= deadline) return done();
        if (s.reader.try_lock()) {
            Deliveries out;
            {
                std::lock_guard<std::mutex> role(s.reader, std::adopt_lock);
                try {
                    spin_for_item(s.bell->results, caller_spin, [&] {
                        return done() || s.bell->deaths.load(std::memory_order_relaxed) != 0;
                    });
                    // In slices: what we wait for may also be resolved by
                    // terminate() in another thread.
                    read_results(std::min(deadline, now + reader_slice), out);
                } catch (...) {
                    log_callback_error(std::current_exception());
                }
            }
            deliver(out);
        } else {
            // Another thread reads and delivers (to us as well); look again soon.
            sleep(std::min(deadline, now + follower_slice));
        }
    }
    return true;
}

void PoolCore::result_loop() {
    State& s = *s_;
    PoolDoorbell& bell = *s.bell;
    for (;;) {
        // Callers that wait read their own results; this thread takes what
        // nobody waits for (callbacks, imap buffers, deaths) on a tick.
        bool busy;
        {
            std::lock_guard<std::mutex> lk(s.mutex);
            busy = !s.chunks.empty();
        }
        auto tick = busy && s.waiting.load(std::memory_order_acquire) == 0 ? busy_tick : idle_tick;
        {
            std::unique_lock<std::mutex> lk(bell.tick_mutex);
            bell.tick.wait_for(lk, tick, [&] {
                return s.stop.load(std::memory_order_acquire) || bell.deaths.load(std::memory_order_acquire) != 0;
            });
        }
        if (s.stop.load(std::memory_order_acquire)) return;
        if (!s.reader.try_lock()) continue;  // a caller reads
        Deliveries out;
        {
            std::lock_guard<std::mutex> role(s.reader, std::adopt_lock);
            try {
                for (int i = 0; i < 256 && read_results(os::Clock::now(), out); ++i) {
                }
            } catch (...) {
                log_callback_error(std::current_exception());
            }
        }
        try {
            deliver(out);
        } catch (...) {
            log_callback_error(std::current_exception());
        }
    }
}

}  // namespace detail
}  // namespace mpservice
// ---- end part: mpservice/impl/pool_results.cpp
#endif
#if MPSERVICE_PART_(12)
// ---- begin part: mpservice/impl/server_process.cpp --------------------------
// server_process: the client side's entry points for the public templates
// (create an object, call a method, encode and decode a reference, map a
// memory block) and the ServerProcess, ServerClient and Namespace objects.

namespace mpservice {
namespace detail {
namespace server {

RefPtr create_object(const Shared<Link>& link, const void* creator, std::uint64_t type, const Encoder& args) {
    if (!link) throw InvalidStateError("mpservice: the server process was not started");
    Encoder e;
    write_invoker(e, invoker_of(creator));
    e.write(type);
    e.write_bytes(args.bytes().data(), args.bytes().size());
    std::vector<os::handle_t> hs;
    std::string reply = link->request(op_create, e.bytes(), args.handles(), hs);
    HandleCloser closer{hs};
    Decoder d(reply.data(), reply.size(), &hs);
    RefPtr r = link->make_ref(d.read<std::uint64_t>(), type);
    if (!d.at_end()) r->mapping = read_block(d);  // a memory block: mapped here at once
    return r;
}

std::string call_method(const Ref& ref, const void* method, const Encoder& args, std::vector<os::handle_t>& handles) {
    Encoder e;
    e.reserve(32 + args.bytes().size());
    e.write(ref.id);
    write_invoker(e, invoker_of(method));
    e.write_bytes(args.bytes().data(), args.bytes().size());
    return ref.link->request(op_call, e.bytes(), args.handles(), handles);
}

/// A ticket no other encoding, in any process, has: a per-process random
/// start (drawn again in a forked child) and a counter.
std::atomic<std::uint64_t> g_ticket{0};
void forget_ticket_seed() { g_ticket.store(0, std::memory_order_relaxed); }
std::uint64_t new_ticket() {
    static const bool hooked = [] {
        os::at_fork_child(&forget_ticket_seed);
        return true;
    }();
    (void)hooked;
    for (;;) {
        std::uint64_t t = g_ticket.load(std::memory_order_relaxed);
        if (t == 0) {
            std::uint64_t seed = 0;
            os::random_bytes(reinterpret_cast<unsigned char*>(&seed), sizeof seed);
            seed |= 1;
            if (!g_ticket.compare_exchange_strong(t, seed, std::memory_order_relaxed)) continue;
            t = seed;
        }
        if (g_ticket.compare_exchange_weak(t, t + 2, std::memory_order_relaxed)) return t;
    }
}

void encode_ref(Encoder& e, const RefPtr& ref) {
    if (!ref) {
        e.write(std::uint8_t(0));
        return;
    }
    const std::uint64_t ticket = new_ticket();
    Encoder m;
    m(ref->id, ticket);
    ref->link->send_ordered(op_mint, m.bytes());  // no reply: before this process's release of it
    const Link& l = *ref->link;
    e.write(std::uint8_t(1));
    e(proxy_magic, server_protocol, l.address, l.authkey, l.server_name, static_cast<std::int64_t>(l.server_pid),
      l.fingerprint, ref->id, ticket, ref->type);
}

RefPtr decode_ref(Decoder& d, std::uint64_t type, const char* type_name) {
    auto present = d.read<std::uint8_t>();
    if (present == 0) return nullptr;
    if (present != 1) throw DecodeError("decode: bad proxy marker");
    auto magic = d.read<std::uint32_t>();
    auto version = d.read<std::uint32_t>();
    if (magic != proxy_magic || version != server_protocol)
        throw DecodeError("decode: not an encoded proxy (or one of another server protocol)");
    LinkInfo info;
    std::int64_t pid;
    std::uint64_t id, ticket, sent_type;
    d(info.address, info.authkey, info.name, pid, info.fingerprint, id, ticket, sent_type);
    info.pid = static_cast<long>(pid);
    if (info.fingerprint != fingerprint_of(""))
        throw ServerError("mpservice: this proxy comes from a different build of the program than this process (build "
                          "fingerprints differ); its server '" + info.name + "' would refuse it");
    if (sent_type != type)
        throw DecodeError("decode: the proxy refers to an object of another class than " + os::demangle(type_name));
    if (info.address.empty() || info.address.size() > 100) throw DecodeError("decode: bad server address in a proxy");
    return link_for(info)->adopt(id, ticket, type);
}

const SharedMemory& block_mapping(Ref& ref) {
    std::lock_guard<std::mutex> lk(ref.mapping_mutex);
    if (!ref.mapping) {  // a Ref made by create/adopt has it already; this is the fallback
        Encoder e;
        e.write(ref.id);
        std::vector<os::handle_t> hs;
        std::string reply = ref.link->request(op_block, e.bytes(), {}, hs);
        HandleCloser closer{hs};
        Decoder d(reply.data(), reply.size(), &hs);
        ref.mapping = read_block(d);
    }
    return ref.mapping;
}

}  // namespace server
}  // namespace detail

// ---------------------------------------------------------------- ServerAccess, ServerProcess

namespace {
std::atomic<int>& server_counter() {
    static std::atomic<int> n{1};
    return n;
}
std::tuple<std::uint64_t, std::int64_t, std::int64_t> server_counts(const std::shared_ptr<detail::server::Link>& l) {
    if (!l) throw InvalidStateError("mpservice: the server process was not started");
    std::string reply = l->ordered_request(detail::server::op_count, std::string());
    Decoder d(reply);
    std::uint64_t n;
    std::int64_t fds, maps;
    d(n, fds, maps);
    return {n, fds, maps};
}
}  // namespace

struct Namespace::Values {
    std::map<std::string, Held> map;
};

Namespace::Namespace() : values_(new Values) {}
Namespace::~Namespace() = default;

Namespace::Held& Namespace::slot_for(std::string name) { return values_->map[std::move(name)]; }

// Out of line, here: the Method<Namespace, ...> invokers they use are
// instantiated and announced once, in the implementation, instead of by a
// static initializer in every includer.
bool Namespace::contains(const std::string& name) const {
    std::lock_guard<std::mutex> g(m_);
    return values_->map.count(name) != 0;
}

void Namespace::erase(const std::string& name) {
    Held old;
    std::lock_guard<std::mutex> g(m_);
    auto it = values_->map.find(name);
    if (it == values_->map.end()) throw std::out_of_range("namespace has no attribute '" + name + "'");
    old = std::move(it->second);
    values_->map.erase(it);
}

std::vector<std::string> Namespace::names() const {
    std::lock_guard<std::mutex> g(m_);
    std::vector<std::string> out;
    for (auto& kv : values_->map) out.push_back(kv.first);
    return out;
}

std::string Namespace::type_of(const std::string& name) const {
    std::lock_guard<std::mutex> g(m_);
    return detail::os::demangle(find(name).type_name);
}

std::size_t Namespace::len() const {
    std::lock_guard<std::mutex> g(m_);
    return values_->map.size();
}

const Namespace::Held& Namespace::find(const std::string& name) const {
    auto it = values_->map.find(name);
    if (it == values_->map.end()) throw std::out_of_range("namespace has no attribute '" + name + "'");
    return it->second;
}

void Namespace::throw_mismatch(const std::string& name, const char* held, const char* asked) {
    throw std::invalid_argument("namespace attribute '" + name + "' holds a " + detail::os::demangle(held) +
                                ", not a " + detail::os::demangle(asked));
}

bool Proxy<Namespace>::contains(const std::string& name) const { return call<&N::contains>(checked(name)); }
void Proxy<Namespace>::erase(const std::string& name) const { call<&N::erase>(checked(name)); }
std::vector<std::string> Proxy<Namespace>::names() const { return call<&N::names>(); }
std::string Proxy<Namespace>::type_of(const std::string& name) const { return call<&N::type_of>(checked(name)); }
std::size_t Proxy<Namespace>::len() const { return call<&N::len>(); }

const std::string& Proxy<Namespace>::checked(const std::string& name) {
    if (name.empty() || name[0] == '_')
        throw std::invalid_argument("mpservice: namespace attribute names must not be empty or start with '_' ('" +
                                    name + "')");
    return name;
}

ServerClient::ServerClient(detail::Shared<detail::server::Link> link) { link_ = std::move(link); }

std::size_t ServerAccess::object_count() const { return static_cast<std::size_t>(std::get<0>(server_counts(link_.shared()))); }

std::pair<long, long> ServerAccess::resource_counts() const {
    auto c = server_counts(link_.shared());
    return {static_cast<long>(std::get<1>(c)), static_cast<long>(std::get<2>(c))};
}

const std::string& ServerAccess::address() const {
    static const std::string none;
    return link_ ? link_->address : none;
}

const detail::Shared<detail::server::Link>& ServerAccess::link() const {
    if (!link_) throw InvalidStateError("mpservice: the server process was not started");
    return link_;
}

ServerProcess::ServerProcess() : ServerProcess(ServerOptions{}) {}
ServerProcess::ServerProcess(const Context& ctx) : ServerProcess([&] {
        ServerOptions o;
        o.context = &ctx;
        return o;
    }()) {}
ServerProcess::ServerProcess(ServerOptions options) : options_(std::move(options)) {
    if (options_.name.empty()) options_.name = "ServerProcess-" + std::to_string(server_counter().fetch_add(1));
    if (options_.start) start();
}

ServerProcess::~ServerProcess() { shutdown(); }

void ServerProcess::start() {
    using namespace detail::server;
    if (process_) throw InvalidStateError("mpservice: " + options_.name + " was already started");
    ServerBoot boot;
    boot.listener->fd = detail::os::listener_create(boot.address);
    unsigned char key[authkey_size];
    detail::os::random_bytes(key, sizeof key);
    boot.authkey.assign(reinterpret_cast<const char*>(key), sizeof key);
    boot.name = options_.name;
    const Context& ctx = options_.context ? *options_.context : default_context();
    process_ = detail::Owned<Process<void>>(new Process<void>(ctx, &server_main, boot));
    process_->set_name(options_.name);
    try {
        process_->start();
    } catch (...) {
        process_.reset();
        throw;
    }
    // Only the server may hold the listener now: if it dies, connecting fails
    // at once instead of waiting in the backlog of a socket nobody serves.
    boot.close();
    LinkInfo info;
    info.address = boot.address;
    info.authkey = boot.authkey;
    info.name = options_.name;
    info.pid = process_->pid();
    info.fingerprint = detail::fingerprint_of("");
    link_ = link_for(info);
}

void ServerProcess::shutdown() noexcept {
    try {
        if (!process_ || !process_->is_alive()) {
            if (link_) link_->mark_gone("it was shut down");
            return;
        }
        if (link_) link_->post(detail::server::op_shutdown, std::string());
        auto wait = [&] {
            try {
                process_->join(options_.shutdown_timeout);
            } catch (...) {
            }
            return !process_->is_alive();
        };
        if (!wait()) {
            process_->terminate();
            if (!wait()) {
                process_->kill();
                try {
                    process_->join();
                } catch (...) {
                }
            }
        }
        if (link_) link_->mark_gone("it was shut down");
    } catch (...) {
    }
}

bool ServerProcess::is_alive() const { return process_ && process_->is_alive(); }
long ServerProcess::pid() const { return process_ ? process_->pid() : 0; }
const std::string& ServerProcess::name() const { return options_.name; }
std::optional<int> ServerProcess::exitcode() const { return process_ ? process_->exitcode() : std::nullopt; }

void Codec<ServerClient>::encode(Encoder& e, const ServerClient& c) {
    const auto& l = c.link();
    e(l->address, l->authkey, l->server_name, static_cast<std::int64_t>(l->server_pid), l->fingerprint);
}

ServerClient Codec<ServerClient>::decode(Decoder& d) {
    detail::server::LinkInfo info;
    std::int64_t pid;
    d(info.address, info.authkey, info.name, pid, info.fingerprint);
    info.pid = static_cast<long>(pid);
    if (info.fingerprint != detail::fingerprint_of(""))
        throw ServerError("mpservice: this server handle comes from a different build of the program");
    return ServerClient(detail::server::link_for(info));
}

}  // namespace mpservice
// ---- end part: mpservice/impl/server_process.cpp
#endif
#if MPSERVICE_PART_(13) && defined(MPSERVICE_POSIX)
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
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

extern char** environ;

// MPSERVICE_DETAIL_ASAN: defined by os_posix.cpp, which comes first.
#if defined(__has_feature)
#if __has_feature(memory_sanitizer)
#define MPSERVICE_DETAIL_MSAN 1
#endif
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

// The symbolizer's caches.  Their locks are never destroyed (exceptions are
// symbolized during static destruction too) and are registered as fork locks
// before main(): a thread symbolizing while another forks must not leave the
// child with a held lock (issue 8, defect 12).
std::mutex& symbols_mutex() {
    static auto* m = new std::mutex;
    return *m;
}
std::mutex& line_cache_mutex() {
    static auto* m = new std::mutex;
    return *m;
}
[[maybe_unused]] const bool g_symbolizer_fork_safe =
    (at_fork_protect(&symbols_mutex(), 30), at_fork_protect(&line_cache_mutex(), 31), true);

const ModuleSymbols& module_symbols(const std::string& path) {
    static auto* cache = new std::map<std::string, std::unique_ptr<ModuleSymbols>>;  // lives to the end
    std::lock_guard<std::mutex> lock(symbols_mutex());
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

/// Starts `tool` with `argv`, its stdout on `out` (stdin and stderr on
/// /dev/null), killed by the kernel if the calling thread ends first: the
/// tool must not outlive a process that is SIGKILLed while symbolizing (a
/// parent SIGKILLed with its children gone in 1 s left addr2line running).
/// posix_spawn cannot ask for PR_SET_PDEATHSIG, so this is its vfork form:
/// signals blocked around it; in the child, only system calls, default signal
/// dispositions, then exec.  -1 on failure.
pid_t spawn_dying_with_caller(const char* tool, char* const* argv, int out) {
    const pid_t caller = ::getpid();
    const int devnull = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0) return -1;
    sigset_t all, old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);
    const pid_t pid = ::vfork();
    if (pid == 0) {
#if defined(__linux__)
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
        if (::getppid() != caller) ::_exit(127);  // the caller died already
        struct sigaction dfl {};
        dfl.sa_handler = SIG_DFL;
        for (int sig = 1; sig < NSIG; ++sig)
            if (sig != SIGKILL && sig != SIGSTOP) ::sigaction(sig, &dfl, nullptr);
        ::sigprocmask(SIG_SETMASK, &old, nullptr);
        if (::dup2(out, STDOUT_FILENO) < 0 || ::dup2(devnull, STDIN_FILENO) < 0 ||
            ::dup2(devnull, STDERR_FILENO) < 0)
            ::_exit(127);
        ::execve(tool, argv, environ);
        ::_exit(127);
    }
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    ::close(devnull);
    return pid;
}

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
    pid_t pid = spawn_dying_with_caller(tool, argv.data(), out[1]);
    ::close(out[1]);
    if (pid < 0) {
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

std::vector<StackFrame> symbolize(void* const* pcs, int n, bool (*last_line_frame)(const std::string& function)) {
    std::vector<StackFrame> frames(static_cast<std::size_t>(std::max(n, 0)));
    std::map<std::string, std::vector<int>> want_lines;  // module -> frames to ask addr2line about
    bool past_last_line_frame = false;
    for (int i = 0; i < n; ++i) {
        StackFrame& f = frames[i];
        f.pc = pcs[i];
        // A return address points after the call; look up the call itself.
        auto lookup = reinterpret_cast<std::uintptr_t>(pcs[i]) - 1;
        ModuleOf m;
        m.pc = lookup;
        walk_loaded_modules(find_module, &m);
        bool has_line_info = false;
        if (m.found) {
            f.module = m.path;
            f.offset = lookup + 1 - m.bias;
            const ModuleSymbols& syms = module_symbols(m.path);
            std::uintptr_t start = 0;
            if (const char* name = syms.find(lookup - m.bias, &start)) f.function = demangle(name);
            has_line_info = syms.has_line_info;
        }
        if (f.function.empty()) {
            Dl_info info;
            bool named;
            {
                std::lock_guard<std::recursive_mutex> lock(loader_calls_mutex());  // dladdr takes the loader's lock
                named = ::dladdr(reinterpret_cast<void*>(lookup), &info) && info.dli_sname;
            }
            if (named) f.function = demangle(info.dli_sname);
        }
        // addr2line's time grows with the compile units it reads: frames the
        // caller will not show (below the target's runner, below main) cost
        // most of it (the library's own big unit) and are not asked about.
        if (has_line_info && !past_last_line_frame) want_lines[f.module].push_back(i);
        if (last_line_frame && last_line_frame(f.function)) past_last_line_frame = true;
    }
    if (want_lines.empty() || !line_lookup_enabled()) return frames;

    // Add file:line, and the functions inlined at each address as frames of
    // their own (marked inlined), innermost first.  Answers are cached, so an
    // exception thrown again from the same place costs no second addr2line run.
    std::mutex& cache_mu = line_cache_mutex();
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

#undef MPSERVICE_PART_
#endif  // MPSERVICE_IMPLEMENTATION
