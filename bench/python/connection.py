"""Python multiprocessing.Pipe, the same workloads as bench/bench_connection.cpp
(fork start method, as the C++ side)."""
import multiprocessing as mp
import time

from bench_common import report, reps

STOP = -1


def _echo(conn):
    while True:
        x = conn.recv()
        if x == STOP:
            return
        conn.send(x)


def ping_pong(ctx, n):
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_echo, args=(theirs,))
    p.start()
    theirs.close()
    out = []
    for _ in range(reps(7)):
        t0 = time.perf_counter()
        for i in range(n):
            mine.send(i)
            mine.recv()
        out.append((time.perf_counter() - t0) * 1e6 / n)
    mine.send(STOP)
    p.join()
    return out


def _sink(conn, n):
    total = 0
    for _ in range(n):
        total += len(conn.recv_bytes())
    conn.send(total)


def big_messages(ctx, n):
    item = b"x" * (4 << 20)
    out = []
    for _ in range(reps(7)):
        t0 = time.perf_counter()
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=_sink, args=(theirs, n))
        p.start()
        theirs.close()
        for _ in range(n):
            mine.send_bytes(item)
        mine.recv()
        p.join()
        out.append(n * 4.194304 / (time.perf_counter() - t0))
    return out


if __name__ == "__main__":
    ctx = mp.get_context("fork")
    label = "Python Pipe py%d.%d" % __import__("sys").version_info[:2]
    report("pipe: round trip, 8 B items, 2 processes", "anchor", label, "us", ping_pong(ctx, 5000))
    report("pipe: 4 MiB items one way, 2 processes", "anchor", label, "MB/s", big_messages(ctx, 32))
