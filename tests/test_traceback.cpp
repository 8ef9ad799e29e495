// The traceback of an exception thrown in a child tells the user's story: the
// throwing function and its callers, not the library's start-up machinery.
#include <doctest/doctest.h>

#include <stdexcept>
#include <string>

#include "mpservice.hpp"

namespace mp = mpservice;

namespace {
[[gnu::noinline]] int parse_setting(int n) {
    if (n > 0) throw std::out_of_range("setting " + std::to_string(n) + " is not known");
    return n;
}
[[gnu::noinline]] int load_settings(int n) { return parse_setting(n) + 1; }
}  // namespace

TEST_CASE("a child's traceback shows the target's frames and leaves out the library's") {
    for (const char* method : {"spawn", "forkserver", "fork"}) {
        CAPTURE(method);
        mp::Process p(mp::get_context(method), load_settings, 7);
        p.start();
        try {
            p.join();
            FAIL("join() should have thrown");
        } catch (const std::out_of_range& e) {
            std::string tb = mp::remote_traceback(e);
            CAPTURE(tb);
            CHECK(tb.find("std::out_of_range: setting 7 is not known") != std::string::npos);
            CHECK(tb.find("parse_setting") != std::string::npos);
            CHECK(tb.find("load_settings") != std::string::npos);
            CHECK(tb.find("left out") != std::string::npos);
            CHECK(tb.find("mpservice::detail::") == std::string::npos);
            CHECK(tb.find("mpservice::init") == std::string::npos);
            // Where line information exists (a -g build with addr2line: the
            // CI's), the user's frames carry it, however far below them the
            // symbolizer stops asking (it skips what the trim cuts).
            if (tb.find(" at ") != std::string::npos) {
                std::size_t frame = tb.find("parse_setting");
                std::string line = tb.substr(frame, tb.find('\n', frame) - frame);
                CAPTURE(line);
                CHECK(line.find("test_traceback.cpp:") != std::string::npos);
                frame = tb.find("load_settings");
                line = tb.substr(frame, tb.find('\n', frame) - frame);
                CHECK(line.find("test_traceback.cpp:") != std::string::npos);
            }
        }
    }
}
