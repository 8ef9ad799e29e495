// As std::thread: a Thread keeps copies of its arguments, so a T& parameter
// needs std::ref.
// EXPECT-ASSERT: mpservice::Thread.*non-const lvalue reference parameter.*std::ref\(x\)
#include "mpservice.hpp"

void bump(int& x) { ++x; }

int main() {
    int x = 0;
    mpservice::Thread t(bump, x);
}
