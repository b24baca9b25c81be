"""The benchmarks' one timing rule, shared with `dsa-hybrid bench` and the placement cost model: best
wall time of several calls, after a warm-up call (see `dsa_hybrid._timing.best_time`)."""

from dsa_hybrid._timing import best_time

__all__ = ["best_time"]
