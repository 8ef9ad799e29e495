// A generic lambda is not one function a child could be told to run.
// EXPECT-ASSERT: generic lambda.*concrete types.*mp::ForkContext\{\}
#include "mpservice.hpp"

int main() { mpservice::Process p(mpservice::SpawnContext{}, [](auto x) { return x * 2; }, 5); }
