// The one translation unit of the consumer that compiles the implementation.
#define MPSERVICE_IMPLEMENTATION
#include "mpservice.hpp"
