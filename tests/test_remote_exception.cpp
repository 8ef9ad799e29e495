// Remote exceptions: in-process round trips through the codec (encode in the
// role of one process, decode in the role of another).  The cross-process
// tests come with the process part.
#include <doctest/doctest.h>

#include <cerrno>
#include <functional>
#include <future>
#include <ios>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <typeinfo>
#include <variant>
#include <vector>

#include "mpservice.hpp"

namespace mp = mpservice;

namespace {

std::exception_ptr capture(const std::function<void()>& f) {
    try {
        f();
    } catch (...) {
        return std::current_exception();
    }
    return nullptr;
}

std::string encode_ep(const std::exception_ptr& p) {
    mp::Encoder e;
    mp::detail::encode_exception(e, p);
    return e.bytes();
}

std::exception_ptr decode_ep(const std::string& bytes) {
    mp::Decoder d(bytes);
    std::exception_ptr p = mp::detail::decode_exception(d);
    d.expect_end();
    return p;
}

std::exception_ptr roundtrip(const std::exception_ptr& p) { return decode_ep(encode_ep(p)); }

/// Restores the process name when a test that plays several processes ends.
struct ProcessRole {
    explicit ProcessRole(const std::string& name) { mp::detail::set_process_name(name); }
    ~ProcessRole() { mp::detail::set_process_name("MainProcess"); }
};

std::string traceback_of(const std::exception_ptr& p) {
    try {
        std::rethrow_exception(p);
    } catch (const std::exception& e) {
        return mp::remote_traceback(e);
    } catch (...) {
    }
    return std::string();
}

const mp::RemoteError& remote_of(const std::exception& e) {
    auto* r = dynamic_cast<const mp::RemoteError*>(&e);
    REQUIRE(r != nullptr);
    return *r;
}

// Throwers with internal linkage in this executable, which is linked without
// -rdynamic: only the .symtab reader can name them.
[[gnu::noinline]] void mpservice_test_static_thrower() { throw std::invalid_argument("thrown by a static function"); }

[[gnu::noinline]] int mpservice_test_vector_at_caller(std::size_t i) {
    std::vector<int> v{1, 2, 3};
    return v.at(i);  // throws std::out_of_range from inside libstdc++
}

/// Catches the decoded exception as E, checks it is remote and keeps what().
template <class E>
void check_standard_type(const E& original, const char* expected_type) {
    CAPTURE(expected_type);
    std::exception_ptr p = roundtrip(std::make_exception_ptr(original));
    bool caught = false;
    try {
        std::rethrow_exception(p);
    } catch (const E& e) {
        caught = true;
        CHECK(mp::is_remote(e));
        CHECK(std::string(e.what()) == original.what());
        CHECK(remote_of(e).remote_type() == expected_type);
        CHECK(remote_of(e).remote_process_name() == "MainProcess");
        CHECK(remote_of(e).remote_pid() == mp::detail::os::current_pid());
        CHECK(typeid(e) == typeid(mp::Remote<E>));
    } catch (...) {
    }
    CHECK(caught);
    // ... and by RemoteError, and by std::exception without ambiguity.
    CHECK_THROWS_AS(std::rethrow_exception(p), mp::RemoteError);
    CHECK_THROWS_AS(std::rethrow_exception(p), std::exception);
}

}  // namespace

// ---------------------------------------------------------------- user types

namespace user {
struct MyError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
struct SubError : MyError {  // not registered: arrives as MyError
    using MyError::MyError;
};
struct FieldError : std::exception {
    int code = 0;
    std::string detail;
    FieldError() = default;
    FieldError(int c, std::string d) : code(c), detail(std::move(d)) {}
    const char* what() const noexcept override { return detail.c_str(); }
    template <class Ar>
    void serialize(Ar& ar) {
        ar(code, detail);
    }
};
struct Unregistered : std::invalid_argument {  // arrives as std::invalid_argument
    using std::invalid_argument::invalid_argument;
};
struct PlainException : std::exception {  // unknown family: arrives as mp::Error
    const char* what() const noexcept override { return "plain exception"; }
};
struct NotAnException {};
}  // namespace user

MPSERVICE_REGISTER_EXCEPTION(user::MyError);
MPSERVICE_REGISTER_EXCEPTION(user::FieldError);

TEST_CASE("every standard exception type keeps its catch clause and becomes RemoteError") {
    check_standard_type(std::logic_error("logic"), "std::logic_error");
    check_standard_type(std::domain_error("domain"), "std::domain_error");
    check_standard_type(std::invalid_argument("invalid"), "std::invalid_argument");
    check_standard_type(std::length_error("length"), "std::length_error");
    check_standard_type(std::out_of_range("range"), "std::out_of_range");
    check_standard_type(std::runtime_error("runtime"), "std::runtime_error");
    check_standard_type(std::range_error("range"), "std::range_error");
    check_standard_type(std::overflow_error("overflow"), "std::overflow_error");
    check_standard_type(std::underflow_error("underflow"), "std::underflow_error");
    check_standard_type(std::bad_alloc(), "std::bad_alloc");
    check_standard_type(std::bad_array_new_length(), "std::bad_array_new_length");
    check_standard_type(std::bad_cast(), "std::bad_cast");
    check_standard_type(std::bad_typeid(), "std::bad_typeid");
    check_standard_type(std::bad_optional_access(), "std::bad_optional_access");
    check_standard_type(std::bad_variant_access(), "std::bad_variant_access");
    check_standard_type(std::bad_function_call(), "std::bad_function_call");
    check_standard_type(std::bad_weak_ptr(), "std::bad_weak_ptr");
    check_standard_type(std::bad_exception(), "std::bad_exception");
    // Derived standard types also land in their bases' catch clauses.
    CHECK_THROWS_AS(std::rethrow_exception(roundtrip(std::make_exception_ptr(std::out_of_range("x")))),
                    std::logic_error);
    CHECK_THROWS_AS(std::rethrow_exception(roundtrip(std::make_exception_ptr(std::bad_array_new_length()))),
                    std::bad_alloc);
}

TEST_CASE("the library's own errors keep their type and fields") {
    check_standard_type(mp::Error("error"), "mpservice::Error");
    check_standard_type(mp::DecodeError("decode"), "mpservice::DecodeError");
    check_standard_type(mp::TimeoutError("timeout"), "mpservice::TimeoutError");
    check_standard_type(mp::InvalidStateError("state"), "mpservice::InvalidStateError");
    check_standard_type(mp::BrokenBarrierError("barrier"), "mpservice::BrokenBarrierError");
    check_standard_type(mp::OwnerDiedError("owner"), "mpservice::OwnerDiedError");
    check_standard_type(mp::Empty(), "mpservice::Empty");
    check_standard_type(mp::Full(), "mpservice::Full");
    check_standard_type(mp::QueueClosed(), "mpservice::QueueClosed");
    check_standard_type(mp::ProcessError("killed by SIGKILL", -9), "mpservice::ProcessError");
    try {
        std::rethrow_exception(roundtrip(std::make_exception_ptr(mp::ProcessError("exit 3", 3))));
    } catch (const mp::ProcessError& e) {
        CHECK(e.exitcode() == 3);
        CHECK(std::string(e.what()) == "exit 3");
    }
    CHECK_THROWS_AS(std::rethrow_exception(roundtrip(std::make_exception_ptr(mp::TimeoutError("t")))), mp::Error);
}

TEST_CASE("error codes keep their value and category") {
    std::system_error generic(ENOENT, std::generic_category(), "open /nowhere");
    check_standard_type(generic, "std::system_error");
    try {
        std::rethrow_exception(roundtrip(std::make_exception_ptr(generic)));
    } catch (const std::system_error& e) {
        CHECK((e.code() == std::errc::no_such_file_or_directory));
        CHECK((e.code().category() == std::generic_category()));
        CHECK(std::string(e.what()) == generic.what());
    }
    std::system_error sys(EACCES, std::system_category(), "mmap");
    try {
        std::rethrow_exception(roundtrip(std::make_exception_ptr(sys)));
    } catch (const std::system_error& e) {
        CHECK((e.code().value() == EACCES));
        CHECK((e.code().category() == std::system_category()));
    }
    std::future_error fut(std::future_errc::no_state);
    check_standard_type(fut, "std::future_error");
    try {
        std::rethrow_exception(roundtrip(std::make_exception_ptr(fut)));
    } catch (const std::future_error& e) {
        CHECK((e.code() == std::future_errc::no_state));
    }
    std::ios_base::failure io("stream broke");
    check_standard_type(io, mp::detail::os::demangle(typeid(std::ios_base::failure).name()).c_str());
    try {
        std::rethrow_exception(roundtrip(std::make_exception_ptr(io)));
    } catch (const std::ios_base::failure& e) {
        CHECK((e.code() == io.code()));
        CHECK((e.code().category() == std::iostream_category()));
    }
}

TEST_CASE("registered user types, their subclasses, unknown types and non-exceptions") {
    SUBCASE("registered, constructible from a string") {
        check_standard_type(user::MyError("mine"), "user::MyError");
        CHECK_THROWS_AS(std::rethrow_exception(roundtrip(std::make_exception_ptr(user::MyError("m")))),
                        std::runtime_error);
    }
    SUBCASE("registered with serialize(): the fields travel") {
        try {
            std::rethrow_exception(roundtrip(std::make_exception_ptr(user::FieldError(42, "field detail"))));
            FAIL("no throw");
        } catch (const user::FieldError& e) {
            CHECK(e.code == 42);
            CHECK(e.detail == "field detail");
            CHECK(std::string(e.what()) == "field detail");
            CHECK(remote_of(e).remote_type() == "user::FieldError");
        }
    }
    SUBCASE("an unregistered subclass arrives as its nearest registered base, with its own name") {
        try {
            std::rethrow_exception(roundtrip(capture([] { throw user::SubError("sub"); })));
            FAIL("no throw");
        } catch (const user::MyError& e) {
            CHECK(typeid(e) == typeid(mp::Remote<user::MyError>));
            CHECK(remote_of(e).remote_type() == "user::SubError");
            CHECK(std::string(e.what()) == "sub");
        }
        try {
            std::rethrow_exception(roundtrip(capture([] { throw user::Unregistered("unreg"); })));
            FAIL("no throw");
        } catch (const std::invalid_argument& e) {
            CHECK(remote_of(e).remote_type() == "user::Unregistered");
            CHECK(std::string(e.what()) == "unreg");
        }
    }
    SUBCASE("an unknown family arrives as mpservice::Error with the original name") {
        try {
            std::rethrow_exception(roundtrip(capture([] { throw user::PlainException(); })));
            FAIL("no throw");
        } catch (const mp::Error& e) {
            CHECK(remote_of(e).remote_type() == "user::PlainException");
            CHECK(std::string(e.what()) == "plain exception");
            CHECK(mp::remote_traceback(e).find("user::PlainException: plain exception") != std::string::npos);
        }
    }
    SUBCASE("non-exceptions arrive as RemoteError saying what was thrown") {
        try {
            std::rethrow_exception(roundtrip(capture([] { throw 42; })));
            FAIL("no throw");
        } catch (const mp::RemoteError& r) {
            CHECK(r.remote_type() == "int");
            CHECK(r.remote_what() == "non-exception thrown: int 42");
        }
        try {
            std::rethrow_exception(roundtrip(capture([] { throw "a C string"; })));
            FAIL("no throw");
        } catch (const std::exception& e) {
            CHECK(std::string(e.what()) == "non-exception thrown: char const* a C string");
        }
        try {
            std::rethrow_exception(roundtrip(capture([] { throw user::NotAnException(); })));
            FAIL("no throw");
        } catch (const mp::Error& e) {
            CHECK(remote_of(e).remote_type() == "user::NotAnException");
            CHECK(std::string(e.what()) == "non-exception thrown: user::NotAnException");
        }
    }
}

TEST_CASE("local exceptions are not remote") {
    std::invalid_argument local("local");
    CHECK_FALSE(mp::is_remote(local));
    CHECK(mp::remote_traceback(local).empty());
}

TEST_CASE("the traceback names the process, pid, type, what() and the throw site") {
    ProcessRole role("Worker-7");
    std::exception_ptr p = roundtrip(capture(mpservice_test_static_thrower));
    try {
        std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
        std::string tb = mp::remote_traceback(e);
        CAPTURE(tb);
        std::string header = "[Worker-7:" + std::to_string(mp::detail::os::current_pid()) +
                             "] std::invalid_argument: thrown by a static function\n";
        CHECK(tb.rfind(header, 0) == 0);
        CHECK(remote_of(e).remote_process_name() == "Worker-7");
        if (mp::detail::os::throw_hook_active()) {
            CHECK(tb.find("thrown at") != std::string::npos);
            // The static function of this executable (linked without -rdynamic) is named.
            CHECK(tb.find("mpservice_test_static_thrower()") != std::string::npos);
            // ... as the innermost frame: the hook's own frames are not shown.
            CHECK(tb.find("#0 (anonymous namespace)::mpservice_test_static_thrower()") != std::string::npos);
        } else {
            CHECK(tb.find("sent from (throw sites are not being recorded)") != std::string::npos);
        }
    }
}

TEST_CASE("the traceback of a throw inside libstdc++ (vector::at) shows the caller") {
    std::exception_ptr p = roundtrip(capture([] { mpservice_test_vector_at_caller(7); }));
    try {
        std::rethrow_exception(p);
    } catch (const std::out_of_range& e) {
        std::string tb = mp::remote_traceback(e);
        CAPTURE(tb);
        CHECK(tb.find("std::out_of_range: vector::_M_range_check") != std::string::npos);
        if (mp::detail::os::throw_hook_active()) {
            // The throwing frame is inside libstdc++ (a cold clone of
            // __throw_out_of_range_fmt with no symbol of its own: shown as
            // module+offset), and comes before its callers (innermost first).
            CHECK(tb.find("#0 ") < tb.find("libstdc++"));
            CHECK(tb.find("libstdc++") < tb.find("vector<int, std::allocator<int> >::at(unsigned long)"));
            CHECK(tb.find("mpservice_test_vector_at_caller(unsigned long)") != std::string::npos);
        }
    }
}

TEST_CASE("an exception passed A -> B -> C keeps C's story as the cause") {
    // C throws; its exception travels to B.
    std::string from_c;
    {
        ProcessRole role("C");
        from_c = encode_ep(capture(mpservice_test_static_thrower));
    }
    std::string c_text = traceback_of(decode_ep(from_c));
    REQUIRE(c_text.rfind("[C:", 0) == 0);

    // B re-raises it (as a Process's result() does) and lets it propagate; it
    // is encoded while being handled, so B's part is added to the story.
    std::string from_b;
    {
        ProcessRole role("B");
        std::exception_ptr received = decode_ep(from_c);
        try {
            mp::detail::rethrow_exception(received);
        } catch (...) {
            from_b = encode_ep(std::current_exception());
        }
    }

    // A catches it with the original catch clause and reads both parts.
    try {
        std::rethrow_exception(decode_ep(from_b));
        FAIL("no throw");
    } catch (const std::invalid_argument& e) {
        std::string tb = mp::remote_traceback(e);
        CAPTURE(tb);
        CHECK(std::string(e.what()) == "thrown by a static function");
        CHECK(remote_of(e).remote_process_name() == "B");
        CHECK(tb != c_text);
        CHECK(tb.rfind(c_text, 0) == 0);  // C's traceback first, ...
        std::size_t sep = tb.find("The above exception was the direct cause of the following exception:");
        REQUIRE(sep != std::string::npos);
        CHECK(tb.find("[B:", sep) != std::string::npos);  // ... then B's
        CHECK(tb.find("re-raised at", sep) != std::string::npos);
        // The cause is C's exception, with C's text.
        REQUIRE(remote_of(e).cause());
        CHECK(traceback_of(remote_of(e).cause()) == c_text);
        CHECK_THROWS_AS(std::rethrow_exception(remote_of(e).cause()), std::invalid_argument);
    }
}

TEST_CASE("a remote exception re-raised with `throw;` gets the re-raise site") {
    std::string from_c = encode_ep(capture(mpservice_test_static_thrower));
    std::string from_b;
    try {
        try {
            std::rethrow_exception(decode_ep(from_c));
        } catch (const std::invalid_argument&) {
            throw;
        }
    } catch (...) {
        from_b = encode_ep(std::current_exception());
    }
    std::string tb = traceback_of(decode_ep(from_b));
    CAPTURE(tb);
    CHECK(tb.find("The above exception was the direct cause") != std::string::npos);
    if (mp::detail::os::throw_hook_active()) CHECK(tb.find("re-raised at") != std::string::npos);
}

TEST_CASE("re-encoding a remote exception that was not raised again keeps its text identical") {
    std::string first;
    {
        ProcessRole role("C");
        first = encode_ep(capture(mpservice_test_static_thrower));
    }
    std::exception_ptr received = decode_ep(first);
    std::string text = traceback_of(received);
    // Passed on without being raised (e.g. put on a queue), twice.
    std::exception_ptr again = roundtrip(roundtrip(received));
    CHECK(traceback_of(again) == text);
    CHECK_THROWS_AS(std::rethrow_exception(again), std::invalid_argument);
    try {
        std::rethrow_exception(again);
    } catch (const std::invalid_argument& e) {
        CHECK(remote_of(e).remote_process_name() == "C");
        CHECK_FALSE(remote_of(e).cause());
    }
}

TEST_CASE("std::throw_with_nested travels with its nested exception as the cause") {
    std::exception_ptr p = capture([] {
        try {
            throw std::invalid_argument("inner problem");
        } catch (...) {
            std::throw_with_nested(std::runtime_error("outer problem"));
        }
    });
    try {
        std::rethrow_exception(roundtrip(p));
        FAIL("no throw");
    } catch (const std::runtime_error& e) {
        std::string tb = mp::remote_traceback(e);
        CAPTURE(tb);
        CHECK(std::string(e.what()) == "outer problem");
        std::size_t inner = tb.find("std::invalid_argument: inner problem");
        std::size_t sep = tb.find("The above exception was the direct cause");
        std::size_t outer = tb.find(": outer problem");
        CHECK(inner < sep);
        CHECK(sep < outer);
        CHECK(outer != std::string::npos);
        REQUIRE(remote_of(e).cause());
        CHECK_THROWS_AS(std::rethrow_exception(remote_of(e).cause()), std::invalid_argument);
    }
}

TEST_CASE("Codec<std::exception_ptr> round trip, null included") {
    std::exception_ptr p = capture([] { throw std::overflow_error("too big"); });
    std::string bytes = mp::encode(p);
    std::exception_ptr back = mp::decode<std::exception_ptr>(bytes);
    CHECK_THROWS_AS(std::rethrow_exception(back), std::overflow_error);
    // Sent on again through the codec: still remote, same text.
    std::exception_ptr twice = mp::decode<std::exception_ptr>(mp::encode(back));
    CHECK(traceback_of(twice) == traceback_of(back));
    CHECK_THROWS_AS(std::rethrow_exception(twice), mp::RemoteError);

    CHECK_FALSE(mp::decode<std::exception_ptr>(mp::encode(std::exception_ptr())));
    CHECK_THROWS_AS(mp::decode<std::exception_ptr>(std::string("\x02", 1)), mp::DecodeError);
}

TEST_CASE("malformed exception bytes throw DecodeError") {
    std::string good = encode_ep(capture([] {
        try {
            throw user::FieldError(7, "seven");
        } catch (...) {
            std::throw_with_nested(std::system_error(EPIPE, std::generic_category(), "write"));
        }
    }));
    REQUIRE_NOTHROW(decode_ep(good));
    // Every truncation.
    for (std::size_t n = 0; n < good.size(); ++n) {
        CAPTURE(n);
        CHECK_THROWS_AS(decode_ep(good.substr(0, n)), mp::DecodeError);
    }
    // Trailing garbage, a wrong tag, a huge length.
    CHECK_THROWS_AS(decode_ep(good + "x"), mp::DecodeError);
    std::string bad_tag = good;
    bad_tag[0] = 'Z';
    CHECK_THROWS_AS(decode_ep(bad_tag), mp::DecodeError);
    std::string huge = good;
    huge[1] = '\xff';  // low byte of the type name's length
    huge[8] = '\x7f';  // high byte
    CHECK_THROWS_AS(decode_ep(huge), mp::DecodeError);
    // Every single-byte corruption either decodes or throws DecodeError.
    for (std::size_t i = 0; i < good.size(); ++i) {
        std::string bad = good;
        bad[i] = static_cast<char>(bad[i] ^ 0x5a);
        CAPTURE(i);
        try {
            decode_ep(bad);
        } catch (const mp::DecodeError&) {
        } catch (const mp::RemoteError&) {
            FAIL("a decoded exception was thrown instead of returned");
        }
    }
    // A cause chain deeper than the limit.
    mp::Encoder deep;
    for (int i = 0; i < 40; ++i) {
        deep.write(static_cast<std::uint8_t>(0xE1));
        for (int k = 0; k < 3; ++k) deep.write(std::string("x"));
        deep.write(std::int64_t(1));
        for (int k = 0; k < 3; ++k) deep.write(std::string());
        deep.write(static_cast<std::uint8_t>(1));
    }
    CHECK_THROWS_AS(decode_ep(deep.bytes()), mp::DecodeError);
}

TEST_CASE("file:line lookup can be switched off; function names remain") {
    mp::set_traceback_source_lines(false);
    std::string tb = traceback_of(roundtrip(capture([] { mpservice_test_vector_at_caller(9); })));
    mp::set_traceback_source_lines(true);
    CAPTURE(tb);
    CHECK(tb.find(" at /") == std::string::npos);  // no file names ...
    if (mp::detail::os::throw_hook_active())       // ... but the functions are there
        CHECK(tb.find("mpservice_test_vector_at_caller(unsigned long)") != std::string::npos);
}

TEST_CASE("an exception thrown in another thread still travels; its stack is the sender's") {
    std::exception_ptr p;
    std::thread t([&] { p = capture(mpservice_test_static_thrower); });
    t.join();
    std::string tb = traceback_of(roundtrip(p));
    CAPTURE(tb);
    CHECK(tb.find("std::invalid_argument: thrown by a static function") != std::string::npos);
    CHECK(tb.find("sent from") != std::string::npos);
}

TEST_CASE("throw-site capture can be switched off at run time") {
    mp::set_throw_site_capture(false);
    CHECK_FALSE(mp::detail::os::throw_hook_active());
    std::exception_ptr p = capture(mpservice_test_static_thrower);
    mp::set_throw_site_capture(true);
    std::string tb = traceback_of(roundtrip(p));
    CAPTURE(tb);
    CHECK(tb.find("std::invalid_argument: thrown by a static function") != std::string::npos);
    CHECK(tb.find("sent from") != std::string::npos);
    CHECK(tb.find("thrown at") == std::string::npos);
}
