"""The one timing rule of the benchmarks and of the placement cost model: the best wall time of several
calls, after a warm-up call (which also compiles what JAX needs to)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_time(fn: Callable[[], Any], repeats: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of the fastest of `repeats` calls of `fn` after one untimed call, read off `clock` (wall
    time by default; `time.process_time` for CPU time). JAX results are waited for, so asynchronous
    dispatch is not mistaken for speed (other results pass through unchanged)."""
    import jax

    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        jax.block_until_ready(fn())
        best = min(best, clock() - t0)
    return best
