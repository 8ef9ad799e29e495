// A reference into the child's memory means nothing in the parent.
// EXPECT-ASSERT: the target returns a reference.*return the value
#include "mpservice.hpp"

static int counter = 0;
int& counter_ref() { return counter; }

int main() { mpservice::Process p(mpservice::SpawnContext{}, counter_ref); }
