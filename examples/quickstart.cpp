// quickstart: the README's first example.  A child process computes a value,
// another throws; the parent gets the value, and the exception with its type
// and the child's stack.  The children's log records are printed by the parent.
#define MPSERVICE_IMPLEMENTATION  // in exactly one .cpp of a program
#include "mpservice.hpp"

#include <iostream>
#include <stdexcept>
#include <string>

namespace mp = mpservice;

double work(int n) {
    mp::get_logger("worker").info("working on " + std::to_string(n));  // printed by the parent
    if (n < 0) throw std::invalid_argument("negative input");
    return n * 0.5;
}

int main(int argc, char** argv) {
    mp::init(argc, argv);     // a spawned child runs its task here and never returns
    mp::Process p(work, 21);  // spawn context by default; CTAD gives Process<double>
    p.start();
    std::cout << "result: " << p.result() << "\n";  // 10.5 - waits, re-throws the child's exception

    mp::Process q(work, -1);
    q.start();
    try {
        q.join();
        return 1;  // not reached: the child threw
    } catch (const std::invalid_argument& e) {  // the type thrown in the child
        std::cout << "caught: " << e.what() << "\n" << mp::remote_traceback(e);
    }
    return p.exitcode() == 0 && q.exitcode() == 1 ? 0 : 1;
}
