// The single header obeys the stb conventions users rely on.
#include <doctest/doctest.h>

// Including twice, with and without the implementation macro, is harmless:
// main.cpp and tools/mpservice_impl.cpp already include it, and so do we, twice.
#include "mpservice.hpp"
#include "mpservice.hpp"

TEST_CASE("the header carries its version") {
    CHECK(std::string(MPSERVICE_VERSION) == "0.1.0");
    CHECK(MPSERVICE_VERSION_MAJOR == 0);
}
