"""Timing device work for benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn()` (its outputs waited for) over `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_seconds(runs: dict[str, Callable[[], Any]], repeats: int,
                        warmup: bool = True) -> dict[str, list[float]]:
    """Wall times of each run (its outputs waited for) over `repeats` passes, every run once per pass in turn (after
    one warm-up call each unless `warmup` is False: the caller warmed them up): side-by-side timings that drift with
    the machine together. Returns {name: [seconds]}."""
    for run in runs.values() if warmup else ():  # compile and warm up
        jax.block_until_ready(run())
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[k].append(time.perf_counter() - t0)
    return times
