"""What every Python anchor program shares: the repetition count and the FIG
line protocol of bench/run (see the top of bench/run)."""
import os


def reps(default):
    """BENCH_REPS from the environment, or `default`."""
    n = int(os.environ.get("BENCH_REPS", "0") or 0)
    return n if n > 0 else default


def report(case, side, label, unit, values):
    """Prints one FIG line (median/min/max of `values`) unless BENCH_FILTER excludes `case`."""
    if os.environ.get("BENCH_FILTER", "") not in case:
        return
    s = sorted(values)
    n = len(s)
    med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    print("FIG\t%s\t%s\t%s\t%s\t%.6g\t%.6g\t%.6g\t%d" % (case, side, label, unit, med, s[0], s[-1], n), flush=True)
