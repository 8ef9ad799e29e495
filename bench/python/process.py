#!/usr/bin/env python3
"""Anchor for bench/bench_process.cpp: Python multiprocessing under the same case names.

  process: spawn / forkserver (warm) / fork start->result   Process start -> result via Pipe -> join
  process: 10k log records from a child (fork)              child logs through a QueueHandler, the
                                                            parent formats every record (records/s)
"""
import logging
import logging.handlers
import multiprocessing as mp
import os
import sys
import time

from bench_common import report, reps

PYV = "py%d.%d" % sys.version_info[:2]




def _send(conn, x):
    conn.send(x + 1)
    conn.close()


def start_to_result_us(ctx):
    r, w = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    p = ctx.Process(target=_send, args=(w, 41))
    p.start()
    v = r.recv()
    p.join()
    dt = time.perf_counter() - t0
    w.close()
    r.close()
    assert v == 42 and p.exitcode == 0
    return dt * 1e6


def _log_child(q, n):
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(q)]
    root.setLevel(logging.DEBUG)
    log = logging.getLogger("child")
    for i in range(n):
        log.info("%d", i)
    q.put(None)  # end of records


def log_rate(ctx, n):
    q = ctx.Queue()
    fmt = logging.Formatter("[%(asctime)s] [%(levelname)s] [%(processName)s:%(process)d] %(name)s: %(message)s")
    handled = 0
    t0 = time.perf_counter()
    p = ctx.Process(target=_log_child, args=(q, n))
    p.start()
    while True:
        rec = q.get()
        if rec is None:
            break
        fmt.format(rec)
        handled += 1
    p.join()
    dt = time.perf_counter() - t0
    assert handled == n
    return n / dt


def main():
    n = reps(20)
    for method, case in (("spawn", "process: spawn start->result"),
                         ("forkserver", "process: forkserver start->result"),
                         ("fork", "process: fork start->result")):
        if os.environ.get("BENCH_FILTER", "") not in case:
            continue
        ctx = mp.get_context(method)
        start_to_result_us(ctx)  # warm-up (starts the fork server)
        samples = [start_to_result_us(ctx) for _ in range(n)]
        label = "%s mp/%s%s" % (PYV, method, " (warm server)" if method == "forkserver" else "")
        report(case, "anchor", label, "us", samples)
    case = "process: 10k log records from a child (fork)"
    if os.environ.get("BENCH_FILTER", "") in case:
        ctx = mp.get_context("fork")
        log_rate(ctx, 1000)
        report(case, "anchor", "%s QueueHandler -> parent" % PYV, "records/s",
               [log_rate(ctx, 10000) for _ in range(max(5, n // 4))])


if __name__ == "__main__":
    main()
