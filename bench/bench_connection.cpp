// bench_connection: Pipe<T> between two processes - small-message round trips
// and 4 MiB messages one way.  The anchors are Python's multiprocessing.Pipe
// (bench/python/connection.py, same workloads) and a raw socketpair ping-pong
// in C (the system's limit for one round trip through a stream socket).  The
// 4 MiB case times a whole run: fork a child, send it 32 items, get its answer.
#include "harness.hpp"

#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#include "mpservice.hpp"

namespace mp = mpservice;

namespace {

constexpr std::uint64_t stop = ~std::uint64_t(0);

/// Sends back every number until `stop`.
void echo(mp::Connection<std::uint64_t> c) {
    for (;;) {
        std::uint64_t x = c.recv();
        if (x == stop) return;
        c.send(x);
    }
}

/// Receives `n` big messages, then answers their total size.
void sink(mp::Connection<std::vector<char>> c, int n) {
    std::uint64_t total = 0;
    for (int i = 0; i < n; ++i) total += c.recv().size();
    c.send(std::vector<char>(8, static_cast<char>(total & 0x7f)));
}

void ping_pong(int reps) {
    const std::string name = "pipe: round trip, 8 B items, 2 processes";
    if (!bench::wanted(name)) return;
    constexpr int n = 20000;
    auto [mine, theirs] = mp::Pipe<std::uint64_t>();
    mp::Process p(mp::ForkContext{}, echo, theirs);
    p.start();
    theirs.close();
    auto ms = bench::time_ms(reps, [&, &mine = mine] {
        for (int i = 0; i < n; ++i) bench::keep((mine.send(static_cast<std::uint64_t>(i)), mine.recv()));
    });
    mine.send(stop);
    p.join();
    std::vector<double> us;
    for (double t : ms) us.push_back(t * 1e3 / n);
    bench::report(name, "ours", "mpservice Pipe", "us", us);

    // The limit: a raw socketpair, 8 bytes each way, blocking read/write.
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return;
    pid_t child = ::fork();
    if (child == 0) {
        ::close(sv[0]);
        std::uint64_t x;
        while (::read(sv[1], &x, sizeof x) == sizeof x && x != stop)
            if (::write(sv[1], &x, sizeof x) != sizeof x) break;
        ::_exit(0);
    }
    ::close(sv[1]);
    auto raw = bench::time_ms(reps, [&] {
        for (int i = 0; i < n; ++i) {
            std::uint64_t x = static_cast<std::uint64_t>(i);
            if (::write(sv[0], &x, sizeof x) != sizeof x || ::read(sv[0], &x, sizeof x) != sizeof x) break;
        }
    });
    std::uint64_t s = stop;
    if (::write(sv[0], &s, sizeof s) != sizeof s) {
    }
    ::close(sv[0]);
    ::waitpid(child, nullptr, 0);
    std::vector<double> raw_us;
    for (double t : raw) raw_us.push_back(t * 1e3 / n);
    bench::report(name, "anchor", "raw socketpair read/write", "us", raw_us);
}

void big_messages(int reps) {
    const std::string name = "pipe: 4 MiB items one way, 2 processes";
    if (!bench::wanted(name)) return;
    constexpr int n = 32;
    std::vector<char> item(std::size_t(4) << 20, 'x');
    auto ms = bench::time_ms(reps, [&] {
        auto [mine, theirs] = mp::Pipe<std::vector<char>>();
        mp::Process p(mp::ForkContext{}, sink, theirs, n);
        p.start();
        theirs.close();
        for (int i = 0; i < n; ++i) mine.send(item);
        bench::keep(mine.recv());
        p.join();
    });
    bench::report(name, "ours", "mpservice Pipe", "MB/s", bench::per_second(ms, n * 4.194304));
}

}  // namespace

int main(int argc, char** argv) {
    mp::init(argc, argv);
    int reps = bench::reps(7);
    ping_pong(reps);
    big_messages(reps);
}
