#!/usr/bin/env python3
"""Anchor for bench/bench_server.cpp: Python's managers and shared memory under the same case names.

  server: proxy call round trip       SyncManager dict proxy: d.get(k) back to back, per call
  server: calls/s, 2 clients          two processes calling d.get(k) at once, total calls/s
  server: MemoryBlock 1 MiB create + first use in another process
                                      SharedMemory(create=True, 1 MiB), its name through a Queue,
                                      the waiting child attaches by name and writes a byte, answers
"""
import multiprocessing as mp
import os
import sys
import time
from multiprocessing import shared_memory

from bench_common import report, reps

PYV = "py%d.%d" % sys.version_info[:2]


def wanted(case):
    return os.environ.get("BENCH_FILTER", "") in case


def call_loop(d, go, out, calls):
    go.wait()
    t0 = time.perf_counter()
    for i in range(calls):
        d.get(i & 7)
    out.put(time.perf_counter() - t0)


def block_user(names, answers):
    while True:
        name = names.get()
        if name is None:
            return
        shm = shared_memory.SharedMemory(name=name)
        shm.buf[0] = 1
        answers.put(shm.size)
        shm.close()


def main():
    n = reps(15)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as m:
        d = m.dict({i: i for i in range(8)})
        case = "server: proxy call round trip"
        if wanted(case):
            calls = 2000
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                for i in range(calls):
                    d.get(i & 7)
                samples.append((time.perf_counter() - t0) * 1e6 / calls)
            report(case, "anchor", "%s SyncManager dict proxy" % PYV, "us", samples)
        case = "server: calls/s, 2 clients"
        if wanted(case):
            calls = 2000
            rates = []
            for _ in range(max(5, n // 3)):
                go, out = ctx.Event(), ctx.Queue()
                ps = [ctx.Process(target=call_loop, args=(d, go, out, calls)) for _ in range(2)]
                for p in ps:
                    p.start()
                go.set()
                slowest = max(out.get(), out.get())
                for p in ps:
                    p.join()
                rates.append(2 * calls / slowest)
            report(case, "anchor", "%s SyncManager, 2 processes" % PYV, "calls/s", rates)
    case = "server: MemoryBlock 1 MiB create + first use in another process"
    if wanted(case):
        names, answers = ctx.Queue(), ctx.Queue()
        user = ctx.Process(target=block_user, args=(names, answers))
        user.start()
        samples = []
        for i in range(max(20, n * 4) + 3):
            t0 = time.perf_counter()
            shm = shared_memory.SharedMemory(create=True, size=1 << 20)
            names.put(shm.name)
            assert answers.get() == 1 << 20
            dt = time.perf_counter() - t0
            shm.close()
            shm.unlink()
            if i >= 3:
                samples.append(dt * 1e6)
        names.put(None)
        user.join()
        report(case, "anchor", "%s SharedMemory create + attach" % PYV, "us", samples)


if __name__ == "__main__":
    main()
