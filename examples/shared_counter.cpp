// shared_counter: four processes add to one counter in shared memory.
// A Value<long> carries its own lock; passing it to a Process gives the child
// the very same counter (its memory travels as a descriptor, nothing is named).
#define MPSERVICE_IMPLEMENTATION
#include "mpservice.hpp"

#include <cstdio>
#include <mutex>
#include <vector>

namespace mp = mpservice;

constexpr long increments = 100000;

void add_many(mp::Value<long> counter, mp::Event go) {
    go.wait();  // start together, so that the lock is really contended
    for (long i = 0; i < increments; ++i) {
        std::lock_guard<mp::RLock> hold(counter.get_lock());
        counter.get_obj() += 1;
    }
}

int main(int argc, char** argv) {
    mp::init(argc, argv);
    mp::Value<long> counter(0);
    mp::Event go;
    std::vector<mp::Process<void>> workers;
    for (int i = 0; i < 4; ++i) workers.emplace_back(add_many, counter, go);
    for (auto& w : workers) w.start();
    go.set();
    for (auto& w : workers) w.join();
    std::printf("4 processes x %ld increments = %ld\n", increments, counter.get());
    return counter.get() == 4 * increments ? 0 : 1;
}
