"""Host top-k selection (dsa.md §5) on the Rust core's SIMD kernels.

`topk(scores, k)` is the stand-alone selection; `IndexerKeyCache.select` fuses it with the indexer's
scoring straight from the FP8 pages. Both release the GIL and run rows on several threads.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt

from dsa_hybrid import _core

SIMD_PATHS = ("scalar", "avx2", "avx512", "neon")


def check_simd_env() -> str | None:
    """Warn (`RuntimeWarning`, naming the value) when `DSA_HYBRID_SIMD` is set to a path that is unknown or
    that this CPU cannot run: the Rust core then ignores it and uses the widest path. Runs once at import;
    returns the warning's text (None when the variable is unset or honoured)."""
    value = os.environ.get("DSA_HYBRID_SIMD", "").strip()
    if not value:
        return None
    active = str(_core.cpu_features()["simd_path"])
    if value == active:
        return None
    why = "is not a SIMD path" if value not in SIMD_PATHS else "names a path this CPU cannot run"
    text = (
        f"DSA_HYBRID_SIMD={value!r} {why} (one of {', '.join(SIMD_PATHS)}; "
        f"available here: see cpu_features()); ignored, using {active!r}"
    )
    warnings.warn(text, RuntimeWarning, stacklevel=2)
    return text


QUERY_DTYPES = ("auto", "float32", "bfloat16")


def check_query_dtype_env() -> str | None:
    """Warn (`RuntimeWarning`, naming the value) when `DSA_HYBRID_QUERY_DTYPE` is set to anything but
    "auto", "float32" or "bfloat16": the Rust core then ignores it and "auto" decides by the CPU. Runs once
    at import; returns the warning's text (None when the variable is unset or valid)."""
    value = os.environ.get("DSA_HYBRID_QUERY_DTYPE", "").strip()
    if not value or value in QUERY_DTYPES:
        return None
    auto = _core.cpu_features()["indexer_query_dtype"]
    text = (
        f"DSA_HYBRID_QUERY_DTYPE={value!r} is not one of {', '.join(QUERY_DTYPES)}; ignored, "
        f'query_dtype="auto" scores FP8 queries as {auto!r} on this CPU'
    )
    warnings.warn(text, RuntimeWarning, stacklevel=2)
    return text


check_simd_env()
check_query_dtype_env()


def topk(
    scores: npt.ArrayLike,
    k: int,
    lengths: Any = None,
    *,
    sorted: bool = False,
    threads: int | None = None,
) -> npt.NDArray[np.int32]:
    """The `k` largest visible scores of each row, as positions (dsa.md §5).

    Args:
        scores: float32 `[T, L]` (other float dtypes are converted); column = key position.
        k: entries per output row (≥ 1); rows with fewer visible positions are padded with −1.
        lengths: optional int `[T]`, each in `[0, L]`: row `t` sees positions `0 .. lengths[t] − 1`
            (for a query at absolute position `p`, `p + 1`). Default: every row sees all `L`.
        sorted: False (default) lists each row's positions in ascending order, as `reference.select_topk`;
            True lists them by descending score (ties: lower position first), like `torch.topk`.
        threads: worker threads (default: one per core; small inputs use one).

    Returns int32 `[T, k]`. Ties at the boundary go to the lowest position; −0.0 equals 0.0. The work is
    bounded by the rows' lengths however large `k` is, but the output is `[T, k]`.
    Raises ValueError for NaN among a row's visible scores, `k` outside `[1, 2**31 - 1]`, bad `lengths`,
    `threads` outside `[1, 1024]`; TypeError for a `k` or `threads` that is not an int (a float is not
    truncated); MemoryError (naming `k`) for an output past 2**40 bytes (refused before any work) or one
    that cannot be allocated.
    """
    a = np.asarray(scores)
    if a.ndim != 2:
        raise ValueError(f"scores: expected shape [T, L], got {list(a.shape)}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"scores: expected a float array, got {a.dtype}")
    lens = None
    if lengths is not None:
        lens = np.asarray(lengths)
        if lens.ndim != 1 or (lens.size and not np.issubdtype(lens.dtype, np.integer)):
            raise ValueError(f"lengths: expected integers of shape [{a.shape[0]}], got {lens.dtype} {list(lens.shape)}")
        if lens.size and (lens.min() < 0 or lens.max() > a.shape[1]):
            # Checked before the cast: a uint64 2**64 - 1 must not arrive as −1.
            i = int(np.argmax((lens < 0) | (lens > a.shape[1])))
            raise ValueError(f"lengths: entry {i} is {lens[i]}, outside [0, {a.shape[1]}]")
        lens = np.require(lens.astype(np.int64, copy=False), requirements=("C", "A"))
    a = np.require(a.astype(np.float32, copy=False), requirements=("C", "A"))
    return _core.topk(a, k, lens, sorted=sorted, threads=threads)


def set_simd_path(name: str | None = None) -> str:
    """Pin the Rust kernels to one SIMD path: "scalar", "avx2", "avx512" (x86-64) or "neon" (aarch64);
    `None` restores the widest the CPU has. Returns the path now in use; ValueError naming the path if it
    is unknown or this CPU cannot run it, TypeError for a name that is not a str. The variable
    `DSA_HYBRID_SIMD` sets the starting choice. Results are identical on every path (tested)."""
    return _core.set_simd_path(name)
