#!/usr/bin/env python3
"""Anchor for bench/bench_sync.cpp: Python's multiprocessing locks, values and events.

Prints FIG lines (see bench/run) under the same case names and units as the C++ side:

  sync: Lock acquire+release, uncontended          mp.Lock, ns per acquire()+release()
  sync: 2 procs x 1M increments under the lock     2 procs x 100k `with v.get_lock(): v.value += 1`,
                                                   ns per increment (Python does 10x fewer)
  sync: Event ping-pong round trip, 2 procs        two mp.Events, set/wait/clear, us per round trip
  sync: Condition ping-pong round trip, 2 procs    mp.Condition + shared turn Value, us per round trip

The workers are forked (the 3.11 Linux default); start-up is outside the timed part
where possible (the increments include two fork()s, ~3 ms against ~100 ms of work).
"""
import multiprocessing as mp
import os
import sys
import time

from bench_common import report, reps




def wanted(case):
    return os.environ.get("BENCH_FILTER", "") in case


PY = "py%d.%d" % sys.version_info[:2]


def uncontended(ctx, n_reps):
    case = "sync: Lock acquire+release, uncontended"
    if not wanted(case):
        return
    lock = ctx.Lock()
    n = 500_000
    out = []
    for _ in range(n_reps):
        acquire, release = lock.acquire, lock.release
        t0 = time.perf_counter()
        for _ in range(n):
            acquire()
            release()
        out.append((time.perf_counter() - t0) * 1e9 / n)
    report(case, "anchor", PY + " mp.Lock", "ns", out)


def _increment(value, n):
    lock = value.get_lock()
    for _ in range(n):
        with lock:
            value.value += 1


def increments(ctx, n_reps):
    case = "sync: 2 procs x 1M increments under the lock"
    if not wanted(case):
        return
    per_child = 100_000
    out = []
    for _ in range(n_reps):
        value = ctx.Value("l", 0)
        workers = [ctx.Process(target=_increment, args=(value, per_child)) for _ in range(2)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out.append((time.perf_counter() - t0) * 1e9 / (2 * per_child))
        assert value.value == 2 * per_child, value.value
    report(case, "anchor", PY + " mp.Value + get_lock(), 2 x 100k", "ns", out)


def _event_pong(ping, pong, rounds):
    for _ in range(rounds):
        ping.wait()
        ping.clear()
        pong.set()


def _cond_pong(cond, turn, rounds):
    for _ in range(rounds):
        with cond:
            cond.wait_for(lambda: turn.value == 1)
            turn.value = 0
            cond.notify()


def pingpong(ctx, n_reps):
    rounds, warm = 2000, 200
    case = "sync: Event ping-pong round trip, 2 procs"
    if wanted(case):
        out = []
        for _ in range(n_reps):
            ping, pong = ctx.Event(), ctx.Event()
            child = ctx.Process(target=_event_pong, args=(ping, pong, warm + rounds))
            child.start()
            for i in range(warm + rounds):
                if i == warm:
                    t0 = time.perf_counter()
                ping.set()
                pong.wait()
                pong.clear()
            out.append((time.perf_counter() - t0) * 1e6 / rounds)
            child.join()
        report(case, "anchor", PY + " mp.Event x2 set/wait/clear", "us", out)
    case = "sync: Condition ping-pong round trip, 2 procs"
    if wanted(case):
        out = []
        for _ in range(n_reps):
            cond, turn = ctx.Condition(), ctx.Value("i", 0, lock=False)
            child = ctx.Process(target=_cond_pong, args=(cond, turn, warm + rounds))
            child.start()
            for i in range(warm + rounds):
                if i == warm:
                    t0 = time.perf_counter()
                with cond:
                    turn.value = 1
                    cond.notify()
                    cond.wait_for(lambda: turn.value == 0)
            out.append((time.perf_counter() - t0) * 1e6 / rounds)
            child.join()
        report(case, "anchor", PY + " mp.Condition + turn Value", "us", out)


def main():
    ctx = mp.get_context("fork")
    uncontended(ctx, reps(7))
    increments(ctx, reps(5))
    pingpong(ctx, reps(7))


if __name__ == "__main__":
    main()
