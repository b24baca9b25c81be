"""The one timing rule of the benchmarks and of the placement cost model: the best wall time of several
calls, after a warm-up call (which also compiles what JAX needs to)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any


def best_time(fn: Callable[[], Any], repeats: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of the fastest of `repeats` calls of `fn` after one untimed call, read off `clock` (wall
    time by default; `time.process_time` for CPU time). JAX results are waited for, so asynchronous
    dispatch is not mistaken for speed (other results pass through unchanged)."""
    return best_times([fn], repeats, clock)[0]


def best_times(
    fns: Sequence[Callable[[], Any]], repeats: int = 3, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    """`best_time` of each of `fns`: one untimed call of each, then `repeats` rounds that call each once
    in turn, so a slow spell of the machine hits every one of them alike."""
    import jax

    for fn in fns:
        jax.block_until_ready(fn())
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = clock()
            jax.block_until_ready(fn())
            best[i] = min(best[i], clock() - t0)
    return best
