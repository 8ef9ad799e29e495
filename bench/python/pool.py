#!/usr/bin/env python3
"""Anchor for bench/bench_pool.cpp: Python's multiprocessing.Pool under the same case names.

  pool: map 1M ints, Pool(2)                  Pool(2).map(inc, range(1M)), default chunksize
  pool: apply_async().get() round trip        one small task on an idle Pool(2), per call
  pool: CPU-bound map 2k x ~1 ms, Pool(2)     2,000 tasks of ~1 ms of Python arithmetic
                                              (calibrated at start, so the work lasts as
                                              long as the C++ one, not the same instructions)
  pool: imap 10M lazy ints (chunksize 1000)   items/s, and the parent's peak RSS, in a
                                              fresh interpreter (Python's imap reads its
                                              whole input into its task queue first)
"""
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time

from bench_common import report, reps

PYV = "py%d.%d" % sys.version_info[:2]
LABEL = "multiprocessing.Pool(2) " + PYV


def inc(x):
    return x + 1


ITERS = 1


def burn(seed):
    x = seed * 1e-9
    for _ in range(ITERS):
        x = x * 1.0000001 + 1e-9
    return x


def _set_iters(n):
    global ITERS
    ITERS = n


def calibrate_ms(target_ms=1.0):
    global ITERS
    ITERS = 10000
    t0 = time.perf_counter()
    burn(1)
    dt = time.perf_counter() - t0
    ITERS = max(1, int(10000 * (target_ms / 1e3) / dt))
    return ITERS


def peak_rss_kib():
    """This interpreter's peak RSS since its exec (VmHWM: ru_maxrss would also count the
    bench process that forked it, as the C++ side's comment explains)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def imap_child():
    n = 10_000_000
    with mp.get_context("spawn").Pool(2) as pool:
        t0 = time.perf_counter()
        total = 0
        for r in pool.imap(inc, range(n), 1000):
            total += r
        dt = time.perf_counter() - t0
    assert total == n * (n + 1) // 2
    print("%.6f %d" % (dt, peak_rss_kib()))


def main():
    n = reps(5)
    filt = os.environ.get("BENCH_FILTER", "")
    ctx = mp.get_context("spawn")  # what mpservice uses by default
    map_case = "pool: map 1M ints, Pool(2)"
    apply_case = "pool: apply_async().get() round trip"
    cpu_case = "pool: CPU-bound map 2k x ~1 ms, Pool(2)"
    with ctx.Pool(2) as pool:
        if filt in map_case:
            data = list(range(1_000_000))
            times = []
            for _ in range(n + 1):
                t0 = time.perf_counter()
                out = pool.map(inc, data)
                times.append((time.perf_counter() - t0) * 1e3)
                assert out[-1] == 1_000_000
            report(map_case, "anchor", LABEL, "ms", times[1:])
        if filt in apply_case:
            calls = 500
            times = []
            for _ in range(n + 1):
                t0 = time.perf_counter()
                for i in range(calls):
                    assert pool.apply_async(inc, (i,)).get() == i + 1
                times.append((time.perf_counter() - t0) * 1e6 / calls)
            report(apply_case, "anchor", LABEL, "us", times[1:])
    if filt in cpu_case:
        iters = calibrate_ms(1.0)
        with ctx.Pool(2, initializer=_set_iters, initargs=(iters,)) as pool:
            times = []
            for _ in range(max(2, n // 2)):
                t0 = time.perf_counter()
                pool.map(burn, range(2000))
                times.append((time.perf_counter() - t0) * 1e3)
            report(cpu_case, "anchor", LABEL + ", ~1 ms of Python per task", "ms", times)
    imap_case = "pool: imap 10M lazy ints (chunksize 1000)"
    rss_case = "pool: imap 10M lazy ints, parent peak RSS"
    if filt in imap_case or filt in rss_case:
        rate, kib = [], []
        for _ in range(max(1, n // 3)):
            out = subprocess.run([sys.executable, __file__, "--imap-child"], capture_output=True, text=True,
                                 check=True).stdout.split()
            rate.append(1e7 / float(out[0]))
            kib.append(float(out[1]))
        report(imap_case, "anchor", LABEL, "items/s", rate)
        report(rss_case, "anchor", LABEL, "KiB", kib)


if __name__ == "__main__":
    if "--imap-child" in sys.argv:
        imap_child()
    else:
        main()
