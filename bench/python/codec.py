#!/usr/bin/env python3
"""Anchor for bench/bench_codec.cpp: Python's pickle on the same values.

Prints FIG lines (see bench/run) under the same case names as the C++ side:
a list of 1M ints and a dict of 100k str -> int with the same keys.
"""
import os
import pickle
import sys
import time

from bench_common import report, reps



def time_ms(n, fn, warmup=1):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out



def case(what, value, n):
    label = "pickle py%d.%d protocol %d" % (sys.version_info[0], sys.version_info[1], pickle.HIGHEST_PROTOCOL)
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    report("codec: encode " + what, "anchor", label, "ms",
           time_ms(n, lambda: pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)))
    report("codec: decode " + what, "anchor", label, "ms", time_ms(n, lambda: pickle.loads(data)))


def main():
    case("vector<int> 1M", list(range(1_000_000)), reps(11))
    case("map<string,int> 100k", {"key-%d-value" % (i * 7919): i for i in range(100_000)}, reps(7))


if __name__ == "__main__":
    main()
