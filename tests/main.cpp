// The test suites' main.  mpservice::init comes first so that a test binary can
// be its own child: a spawned child runs its task inside init and never returns.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "mpservice.hpp"

int main(int argc, char** argv) {
    mpservice::init(argc, argv);
    doctest::Context context(argc, argv);
    return context.run();
}
