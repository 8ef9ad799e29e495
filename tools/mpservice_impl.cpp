// The one translation unit that compiles the library's implementation for the
// project's own tests, examples and benchmarks - what a user writes in one .cpp.
#define MPSERVICE_IMPLEMENTATION
#include "mpservice.hpp"
