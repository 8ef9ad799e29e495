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
#pragma once

#include <exception>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>

#include "codec.hpp"

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
