// stb conventions, checked by building a whole program from this one file:
// the header may be included any number of times, before and after
// MPSERVICE_IMPLEMENTATION is defined, and the implementation is emitted once.
#include "mpservice.hpp"
#define MPSERVICE_IMPLEMENTATION
#include "mpservice.hpp"
#include "mpservice.hpp"

#include <cstdio>

int main() {
    auto bytes = mpservice::encode(std::string("twice"));
    if (mpservice::decode<std::string>(bytes) != "twice") return 1;
    std::puts("double include: ok");
    return 0;
}
