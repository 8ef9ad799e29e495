// Too many arguments: one message, not a cascade from std::tuple.
// EXPECT-ASSERT: number of arguments does not match
#include "mpservice.hpp"

int twice(int x) { return 2 * x; }

int main() { mpservice::Process p(twice, 1, 2); }
