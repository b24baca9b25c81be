"""The benchmarks' one timing rule: best wall time of several calls, after a warm-up call."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, after one untimed call (which also compiles
    what JAX needs to). JAX results are waited for, so asynchronous dispatch is not mistaken for speed."""

    def run() -> None:
        out = fn()
        jax = sys.modules.get("jax")
        if jax is not None:
            jax.block_until_ready(out)

    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)
