// A member function needs its object, which lives in the parent.
// EXPECT-ASSERT: member function needs its object.*mp::ForkContext\{\}
#include "mpservice.hpp"

struct Counter {
    int n = 0;
    int next() { return ++n; }
};

int main() {
    Counter c;
    mpservice::Process p(mpservice::ForkServerContext{}, &Counter::next, c);
}
