// first_done: processes and threads side by side, used like futures.
// as_completed() yields them as they finish; wait() can stop at the first
// exception.  A child killed by a signal resolves too - nothing ever hangs.
// (The crash is an abort(): sanitizers would turn a segfault into a report and exit(1).)
#define MPSERVICE_IMPLEMENTATION
#include "mpservice.hpp"

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <stdexcept>
#include <thread>

namespace mp = mpservice;
using namespace std::chrono_literals;

int nap(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    if (ms == 150) throw std::runtime_error("150 ms is bad luck");
    return ms;
}

void crash() { std::abort(); }

int main(int argc, char** argv) {
    mp::init(argc, argv);
    mp::Process slow(nap, 400), quick(nap, 50);
    mp::Thread middle(nap, 200);
    slow.start();
    quick.start();
    middle.start();
    std::printf("finished in this order:");
    for (mp::Worker* w : mp::as_completed({&slow, &quick, &middle}, 30s)) std::printf(" %s", w->name().c_str());
    std::printf("\n");

    mp::Process unlucky(nap, 150), sleepy(nap, 5000);
    unlucky.start();
    sleepy.start();
    auto [done, not_done] = mp::wait({&unlucky, &sleepy}, 30s, mp::FIRST_EXCEPTION);
    std::printf("wait(FIRST_EXCEPTION): %zu done, %zu still running\n", done.size(), not_done.size());
    sleepy.terminate();  // then join() does not throw
    sleepy.join();

    mp::Process crasher(crash);
    crasher.start();
    try {
        crasher.join();
    } catch (const mp::ProcessError& e) {
        std::printf("crasher: %s (exitcode %d)\n", e.what(), *crasher.exitcode());
    }
#if defined(_WIN32)
    const int aborted = 3;  // abort() on Windows exits with status 3 (Python shows the same)
#else
    const int aborted = -SIGABRT;
#endif
    bool ok = quick.result() == 50 && done.size() == 1 && *crasher.exitcode() == aborted &&
              *sleepy.exitcode() == -SIGTERM;
    return ok ? 0 : 1;
}
