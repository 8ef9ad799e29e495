"""Python multiprocessing.Queue, the same workloads as bench/bench_queues.cpp.

Prints one line per case:  key<TAB>median<TAB>unit<TAB>min<TAB>max<TAB>n   (median over --reps runs,
after a warm-up).  Steady state uses the fork start method; start-up is not timed.
"""
import argparse
import multiprocessing as mp
import statistics
import time

perf = time.perf_counter


def _producer(q, n, size, ready, go):
    ready.set()
    go.wait()
    if size == 0:
        for i in range(n):
            q.put(i)
    else:
        msg = b"\xab" * size
        for _ in range(n):
            q.put(msg)


def one_to_one(ctx, n, size):
    q = ctx.Queue()
    ready, go = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_producer, args=(q, n, size, ready, go))
    p.start()
    ready.wait()
    t0 = perf()
    go.set()
    get = q.get
    for _ in range(n):
        x = get()
    dt = perf() - t0
    p.join()
    assert (x == n - 1) if size == 0 else (len(x) == size)
    return dt


def _consumer(q, ready, go):
    ready.release()
    go.wait()
    get = q.get
    while get() is not None:
        pass


def _producer_n(q, n, ready, go):
    ready.release()
    go.wait()
    put = q.put
    for i in range(n):
        put(i)


def many_to_many(ctx, producers, consumers, per_producer):
    q = ctx.Queue()
    ready, go = ctx.Semaphore(0), ctx.Event()
    cons = [ctx.Process(target=_consumer, args=(q, ready, go)) for _ in range(consumers)]
    prods = [ctx.Process(target=_producer_n, args=(q, per_producer, ready, go)) for _ in range(producers)]
    for p in cons + prods:
        p.start()
    for _ in cons + prods:
        ready.acquire()
    t0 = perf()
    go.set()
    for p in prods:
        p.join()
    for _ in cons:
        q.put(None)
    for p in cons:
        p.join()
    return perf() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    reps = ap.parse_args().reps
    ctx = mp.get_context("fork")

    def run(key, unit, fn, amount):
        fn()  # warm-up (smaller runs are not used: the figures are rates)
        times = [fn() for _ in range(reps)]
        r = [amount / t for t in times]
        # key, median, unit, then min, max and n (bench_queues.cpp reports the spread)
        print("%s\t%.6g\t%s\t%.6g\t%.6g\t%d" % (key, statistics.median(r), unit, min(r), max(r), len(r)), flush=True)

    # Fewer items than the C++ cases (Python is ~100x slower); rates are comparable.
    run("queue_8b", "msg/s", lambda: one_to_one(ctx, 200000, 0), 200000)
    run("queue_1k", "msg/s", lambda: one_to_one(ctx, 20000, 1024), 20000)
    run("queue_1m", "MB/s", lambda: one_to_one(ctx, 200, 1 << 20), 200 * (1 << 20) / 1e6)
    run("queue_2x2", "items/s", lambda: many_to_many(ctx, 2, 2, 100000), 200000)


if __name__ == "__main__":
    main()
