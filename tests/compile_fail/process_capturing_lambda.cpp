// A lambda with captures cannot be sent to a spawned child; the message names
// ForkContext (a Process without a context is checked as spawn).
// EXPECT-ASSERT: carries state \(a lambda with captures.*mp::ForkContext\{\}
#include "mpservice.hpp"

int main() {
    int base = 100;
    mpservice::Process p([base](int x) { return base + x; }, 5);
}
