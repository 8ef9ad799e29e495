// A child cannot write into the parent's object: a T& parameter is refused
// with one static_assert that says why and what to do instead.
// EXPECT-ASSERT: non-const lvalue reference parameter.*cannot write into the parent's object.*Return the value.*mp::Value<T> / mp::Array<T>
#include "mpservice.hpp"

void bump(int& x) { ++x; }

int main() {
    int x = 0;
    mpservice::Process p(bump, x);
}
