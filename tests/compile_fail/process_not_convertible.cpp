// An argument that does not convert to the parameter type.
// EXPECT-ASSERT: an argument does not convert to the target's parameter type
#include <string>
#include "mpservice.hpp"

int length(std::string s) { return static_cast<int>(s.size()); }

int main() { mpservice::Process p(length, 42); }
