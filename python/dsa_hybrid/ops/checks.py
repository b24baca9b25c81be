"""Argument checks shared by the JAX entry points (docs/errors.md): each raises an ordinary exception whose
message starts with the argument's name, at trace time (shapes, dtypes and static arguments are known
then), so under `jit` too. Values inside traced arrays (slot ids, positions) cannot be checked here: the
entry points document what they do with out-of-range entries (skipped or masked)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

# The most bytes one cache array may take: beyond it a size is refused as MemoryError before JAX is asked
# (JAX would fail with a RESOURCE_EXHAUSTED runtime error, or silently take most of the device).
MAX_ARRAY_BYTES = 2**40


def check_array(name: str, x: Any) -> Any:
    """`x` must be an array (a jax.Array, a tracer, a numpy array): TypeError naming `name` otherwise (a
    list, None, a scalar). Returns `x`."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    return x


def check_int(name: str, value: Any, lo: int, hi: int = 2**31 - 1) -> int:
    """`value` as an int in `[lo, hi]`: TypeError for a bool, a float or a string, ValueError out of range."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {value}")
    if value > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {value}")
    return value


def check_scale(name: str, value: Any) -> float:
    """A softmax scale: a finite real number > 0 (TypeError for a non-number, ValueError for NaN, inf, <= 0)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    scale = float(value)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: must be finite and > 0, got {value}")
    return scale


def check_alloc(name: str, shape: tuple[int, ...], itemsize: int) -> None:
    """MemoryError naming `name` when an array of `shape` would pass `MAX_ARRAY_BYTES`."""
    nbytes = math.prod(shape) * itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise MemoryError(f"{name}: {shape} would take {nbytes} bytes, over the limit of 2**40 (refused)")


def check_real(name: str, value: Any, lo: float | None = None, *, open_low: bool = False) -> float:
    """`value` as a finite float (>= `lo`, or > `lo` with `open_low`): TypeError for a bool or a
    non-number, ValueError for NaN, inf or a value out of range."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name}: must be finite, got {value}")
    if lo is not None and (x <= lo if open_low else x < lo):
        raise ValueError(f"{name}: must be {'>' if open_low else '>='} {lo}, got {value}")
    return x


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """`value` if it is one of `choices` (compared with `==`, types kept): ValueError naming `name` otherwise."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_int_array(name: str, x: Any, ndim: int, *, dtype_error: type[Exception] = ValueError) -> Any:
    """`x` must be an integer array (not bool) of `ndim` dimensions: TypeError if it is no array,
    `dtype_error` (ValueError by default) for a non-integer dtype, ValueError for the wrong rank."""
    check_array(name, x)
    if not np.issubdtype(np.dtype(x.dtype), np.integer):
        raise dtype_error(f"{name}: expected integers, got {x.dtype} {list(x.shape)}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {x.dtype} {list(x.shape)}")
    return x


def is_concrete(x: Any) -> bool:
    """Whether `x`'s values can be read now (a numpy array or a committed jax.Array; not a tracer under
    `jit`, `grad` or `vmap`)."""
    import jax

    return not isinstance(x, jax.core.Tracer)
