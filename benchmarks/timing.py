"""What the benchmarks share: the median wall time of a call. `python benchmarks/X.py` puts this folder on
sys.path, so a benchmark imports it as `from timing import median_seconds`."""
from __future__ import annotations

import statistics
import time


def median_seconds(fn, runs: int, warmup: int = 1) -> float:
    """Median seconds of `runs` calls of `fn` after `warmup` calls that are not timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
