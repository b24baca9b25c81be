"""The one timing rule of the benchmarks and of the placement cost model: the best wall time of several
calls, after a warm-up call (which also compiles what JAX needs to)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of `fn` after one untimed call. JAX results are waited
    for, so asynchronous dispatch is not mistaken for speed (other results pass through unchanged)."""
    import jax

    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best
