"""The host core's bad-input catalogue (issue 16): every entry point of `dsa_hybrid._core` and of its Python
face `dsa_hybrid.host`, attacked the way users and buggy callers do.

- `CORE_CASES` / `HOST_CASES`: one row per case — (entry point, the call, the exception type, a fragment of
  the message naming the argument). After each refused call the state is checked unchanged: the page
  bytes, every sequence's length and block table, every block's refcount, the free count (and a pool's
  refcounts and free list).
- `CRASH_CASES`: the cases that once killed or hung the process (an aborting allocation, a segfault
  through a resized `pages()` view, a thread count that spawns threads until the OS gives up) run in a
  child process under an address-space limit, so a regression is a failed test, not a dead pytest.
- `test_every_binding_runs_inside_the_panic_guard` reads the binding sources: no entry point can let a
  panic out as pyo3's `PanicException` (a `BaseException`); `_core._test_panic` shows the guard working.
- `CoreFuzz`: a bounded hypothesis state machine of random operations, malformed arguments mixed in, on
  a cache, a paged cache and a pool, against a plain Python model of all three (blocks, refcounts, free
  order, page bytes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import dsa_hybrid.host as host
from dsa_hybrid import _core

REPO = Path(__file__).resolve().parents[2]
BS, D = 16, 16  # the caches of the catalogue: 4 blocks of 16 tokens of 16 codes (64 slots)


# ----- array makers ---------------------------------------------------------------------------------------
def f32(*shape: int, value: float = 1.0) -> np.ndarray:
    return np.full(shape, value, np.float32)


def noncontig(a: np.ndarray) -> np.ndarray:
    """The same values, same shape, not C-contiguous."""
    return np.repeat(a, 2, axis=-1)[..., ::2]


def misaligned(a: np.ndarray) -> np.ndarray:
    """The same values, same shape and dtype, C-contiguous, at an address off the element alignment."""
    raw = np.zeros(a.nbytes + 1, np.uint8)[1:]
    out = raw.view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


def swapped(a: np.ndarray) -> np.ndarray:
    """The same values in the other byte order."""
    return a.astype(a.dtype.newbyteorder())


def keys(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


# ----- state snapshots ------------------------------------------------------------------------------------
def cache_state(c: Any) -> tuple:
    """Everything a call could change: page bytes, sequences (length, block table), refcounts, free count."""
    seqs = {s: (c.length(s), c.block_table(s).tolist()) for s in c.sequence_ids()}
    refs = [c.block_refcount(b) for b in range(c.num_blocks)]
    return (c.pages().tobytes(), seqs, refs, c.num_free_blocks)


def pool_state(p: Any) -> tuple:
    return (p.refcounts().tolist(), p.free_blocks().tolist(), p.num_free)


def make_cache(api: Any) -> Any:
    """A cache with sequence 1 (20 tokens: a full page and a partial one), its fork 2, and an empty 3."""
    c = api.IndexerKeyCache(4, BS, D)
    c.add_sequence(1)
    c.append(1, keys(20))
    c.fork(1, 2)
    c.add_sequence(3)
    return c


def make_pool(api: Any) -> Any:
    """A pool of 5 blocks: 0 held twice, 1 held once, 2..4 free."""
    p = api.BlockPool(5)
    p.allocate(2)
    p.retain([0])
    return p


# ----- the catalogue --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    entry: str  # the entry point, e.g. "IndexerKeyCache.append"
    call: Callable[[Any], Any]  # called with the object (a cache, a pool, or the module)
    error: type[BaseException]
    match: str  # a regex fragment of the message; it names the argument at fault
    target: str = "cache"  # "cache", "pool" or "module"

    def id(self) -> str:
        return f"{self.entry}:{self.match[:40]}"


Q1 = f32(1, 1, D)  # one query row, one head
W1 = f32(1, 1)
NAN_CODES = np.full((1, D), 0x7F, np.uint8)
GOOD_CODES = np.full((1, D), 0x38, np.uint8)
NAN_SCORE_Q = f32(1, 2, D, value=100.0)  # with weights (MAX, -MAX): one head's term +inf, the other's −inf
NAN_SCORE_W = np.array([[np.finfo(np.float32).max, -np.finfo(np.float32).max]], np.float32)


def _int_cases(entry: str, call: Callable[[Any, Any], Any], arg: str, target: str = "cache") -> list[Case]:
    """An int argument given a float, a bool, None and a str: TypeError naming it (never truncated)."""
    return [
        Case(entry, lambda o, v=v: call(o, v), TypeError, f"{arg}: expected an int", target)
        for v in (1.5, True, None, "3")
    ]


def _array_cases(entry: str, call: Callable[[Any, Any], Any], arg: str, good: np.ndarray) -> list[Case]:
    """An array argument as a list, another dtype, byte-swapped, an object array, non-contiguous,
    misaligned, 0-d, with a dimension too many: each refused, naming it."""
    other = np.float64 if good.dtype != np.float64 else np.float32
    cases = [
        Case(entry, lambda o: call(o, good.tolist()), TypeError, f"{arg}: expected a numpy array"),
        Case(entry, lambda o: call(o, good.astype(other)), TypeError, f"{arg}: expected {good.dtype}"),
        Case(entry, lambda o: call(o, good.astype(object)), TypeError, f"{arg}: expected {good.dtype}, got object"),
        Case(entry, lambda o: call(o, np.asarray(good).ravel()[:1].reshape(())), ValueError, f"{arg}: expected"),
        Case(entry, lambda o: call(o, good[None]), ValueError, f"{arg}: expected {good.ndim} dimension"),
    ]
    if good.dtype.itemsize > 1:
        cases.append(Case(entry, lambda o: call(o, swapped(good)), TypeError, f"{arg}: .*byte order"))
        cases.append(Case(entry, lambda o: call(o, misaligned(good)), ValueError, f"{arg}: must be aligned"))
    if good.shape[-1] >= 2:
        cases.append(Case(entry, lambda o: call(o, noncontig(good)), ValueError, f"{arg}: must be a C-contiguous"))
    return cases


def _core_cases() -> list[Case]:
    c: list[Case] = []
    # --- module functions
    x = f32(3, 10)
    c += [
        Case("topk", lambda m: m.topk(x, 0), ValueError, "k: must be at least 1", "module"),
        Case("topk", lambda m: m.topk(x, -1), ValueError, "k: must be at least 1", "module"),
        Case("topk", lambda m: m.topk(x, -(2**70)), ValueError, "k: must be at least 1", "module"),
        Case("topk", lambda m: m.topk(x, 2**31), ValueError, r"k: must be at most 2147483647", "module"),
        Case("topk", lambda m: m.topk(x, 2**40), ValueError, r"k: must be at most", "module"),
        Case("topk", lambda m: m.topk(x, 2**70), ValueError, r"k: must be at most", "module"),
        Case("topk", lambda m: m.topk(f32(1024, 1), 2**31 - 1), MemoryError, r"k: .*2\^40", "module"),
        Case("topk", lambda m: m.topk(x, 2, threads=0), ValueError, "threads: must be at least 1", "module"),
        Case("topk", lambda m: m.topk(x, 2, threads=-5), ValueError, "threads: must be at least 1", "module"),
        Case("topk", lambda m: m.topk(x, 2, threads=1025), ValueError, "threads: must be at most 1024", "module"),
        Case("topk", lambda m: m.topk(x, 2, threads=2.0), TypeError, "threads: expected an int", "module"),
        Case("topk", lambda m: m.topk(x, 2, sorted="yes"), TypeError, "sorted: expected a bool", "module"),
        Case("topk", lambda m: m.topk(f32(3, 10, value=np.nan), 2), ValueError, "scores: NaN in row 0", "module"),
        Case(
            "topk", lambda m: m.topk(np.zeros((0, 2**31 + 1), np.float32), 1), ValueError, "scores: rows of", "module"
        ),
        Case("topk", lambda m: m.topk(np.float32(1), 1), TypeError, "scores: expected a numpy array", "module"),
        Case("topk", lambda m: m.topk(x, 2, np.array([1, 2])), ValueError, "lengths: 2 entries for 3 rows", "module"),
        Case("topk", lambda m: m.topk(x, 2, np.array([1, -1, 2])), ValueError, "lengths: entry 1 is -1", "module"),
        Case("topk", lambda m: m.topk(x, 2, np.array([1, 11, 2])), ValueError, "lengths: entry 1 is 11", "module"),
        Case(
            "topk",
            lambda m: m.topk(x, 2, np.array([1, 1, 2], np.int32)),
            TypeError,
            "lengths: expected int64",
            "module",
        ),
        Case("topk", lambda m: m.topk(x, 2, [1, 1, 2]), TypeError, "lengths: expected a numpy array", "module"),
    ]
    c += [
        Case(e.entry, e.call, e.error, e.match, "module")
        for e in _int_cases("topk", lambda m, v: m.topk(x, v), "k")
        + _array_cases("topk", lambda m, v: m.topk(v, 2), "scores", x)
    ]
    wide = np.ones((1, 1 << 16), np.float32)
    wide[0, :] = 3.0e38
    c += [
        Case("fp8_quantize_rows", lambda m: m.fp8_quantize_rows(f32(2, 96)), ValueError, "x: .*power-of-two", "module"),
        Case("fp8_quantize_rows", lambda m: m.fp8_quantize_rows(f32(2, 0)), ValueError, "x: rows must have", "module"),
        Case(
            "fp8_quantize_rows",
            lambda m: m.fp8_quantize_rows(f32(2, 8, value=np.inf)),
            ValueError,
            "x: non-finite",
            "module",
        ),
        Case("fp8_quantize_rows", lambda m: m.fp8_quantize_rows(wide), ValueError, "x: row 0 is too large", "module"),
        Case(
            "fp8_quantize_rows",
            lambda m: m.fp8_quantize_rows(f32(3, 2, value=np.finfo(np.float32).max), hadamard=False),
            ValueError,
            "x: row 0 is too large to quantize: its FP8 values times its scale would overflow float32",
            "module",
        ),
        Case(
            "fp8_quantize_rows",
            lambda m: m.fp8_quantize_rows(f32(2, 8), hadamard=1),
            TypeError,
            "hadamard: expected a bool",
            "module",
        ),
    ]
    c += [
        Case(e.entry, e.call, e.error, e.match, "module")
        for e in _array_cases("fp8_quantize_rows", lambda m, v: m.fp8_quantize_rows(v), "x", f32(2, 8))
    ]
    c += [
        Case(
            "set_simd_path", lambda m: m.set_simd_path("sse9"), ValueError, 'name: unknown SIMD path "sse9"', "module"
        ),
        Case("set_simd_path", lambda m: m.set_simd_path("SCALAR"), ValueError, '"SCALAR"', "module"),
        Case("set_simd_path", lambda m: m.set_simd_path(3), TypeError, "name: expected a str or None", "module"),
        Case("set_simd_path", lambda m: m.set_simd_path(b"scalar"), TypeError, "name: expected a str", "module"),
    ]
    # --- BlockPool
    for v in (0, -3, 2**31, 2**64, -(2**70)):
        c.append(
            Case(
                "BlockPool",
                lambda m, v=v: m.BlockPool(v),
                ValueError,
                r"num_blocks: must be in \[1, 2147483647\]",
                "module",
            )
        )
    c += [
        Case(e.entry, e.call, e.error, e.match, "module")
        for e in _int_cases("BlockPool", lambda m, v: m.BlockPool(v), "num_blocks")
    ]
    c += [
        Case("BlockPool.allocate", lambda p: p.allocate(-1), ValueError, "n: must be >= 0", "pool"),
        Case("BlockPool.allocate", lambda p: p.allocate(-(2**70)), ValueError, "n: must be >= 0", "pool"),
        Case("BlockPool.allocate", lambda p: p.allocate(4), _core.CacheFullError, "n: 4 blocks wanted, 3 free", "pool"),
        Case(
            "BlockPool.allocate",
            lambda p: p.allocate(2**70),
            _core.CacheFullError,
            "n: 1180591620717411303424 blocks",
            "pool",
        ),
        Case(
            "BlockPool.retain", lambda p: p.retain([5]), IndexError, r"blocks: block 5 \(entry 0\) is outside", "pool"
        ),
        Case("BlockPool.retain", lambda p: p.retain([0, -1]), IndexError, r"blocks: block -1 \(entry 1\)", "pool"),
        Case("BlockPool.retain", lambda p: p.retain([2**70]), IndexError, "blocks: block .* is outside", "pool"),
        Case(
            "BlockPool.retain",
            lambda p: p.retain(np.array([2**64 - 1], np.uint64)),
            IndexError,
            "blocks: block",
            "pool",
        ),
        Case(
            "BlockPool.retain", lambda p: p.retain([0, 2]), ValueError, r"blocks: block 2 \(entry 1\) is free", "pool"
        ),
        Case("BlockPool.release", lambda p: p.release([1, 1]), ValueError, "blocks: block 1 .* is free", "pool"),
        Case("BlockPool.release", lambda p: p.release([0, 1, 9]), IndexError, "blocks: block 9", "pool"),
        Case("BlockPool.refcount", lambda p: p.refcount(5), IndexError, r"block: 5 is outside \[0, 5\)", "pool"),
        Case(
            "BlockPool.refcount", lambda p: p.refcount(-(2**70)), IndexError, "block: -1180591620717411303424", "pool"
        ),
    ]
    for bad in (
        [0.0],
        [True],
        np.array([True]),
        np.array([0.0]),
        "01",
        None,
        [[0]],
        np.zeros((1, 1), np.int64),
        np.int64(0),
    ):
        for name in ("retain", "release"):
            c.append(
                Case(
                    f"BlockPool.{name}",
                    lambda p, b=bad, n=name: getattr(p, n)(b),
                    TypeError,
                    "blocks: expected",
                    "pool",
                )
            )
    c += _int_cases("BlockPool.allocate", lambda p, v: p.allocate(v), "n", "pool")
    c += _int_cases("BlockPool.refcount", lambda p, v: p.refcount(v), "block", "pool")
    # --- IndexerKeyCache construction
    for args, err, match in [
        ((-1, BS, D), ValueError, "num_blocks: must be in"),
        ((2, 24, D), ValueError, "block_size must be a positive multiple of 16"),
        ((2, 0, D), ValueError, "block_size must be a positive multiple of 16"),
        ((2, BS, 96), ValueError, "head_dim must be a power of two"),
        ((2, BS, 0), ValueError, "head_dim must be a power of two"),
        ((2**27 + 1, BS, 128), ValueError, "num_blocks .* too large"),
        ((0, BS, 2**62), ValueError, "too large"),
        ((2, 2**62, D), ValueError, "too large"),
        ((2**70, BS, D), ValueError, "num_blocks: must be in"),
        ((2, BS, -(2**70)), ValueError, "head_dim: must be in"),
        ((2.0, BS, D), TypeError, "num_blocks: expected an int"),
        ((2, True, D), TypeError, "block_size: expected an int"),
        ((2, BS, "16"), TypeError, "head_dim: expected an int"),
    ]:
        c.append(Case("IndexerKeyCache", lambda m, a=args: m.IndexerKeyCache(*a), err, match, "module"))
    # --- IndexerKeyCache sequences
    c += [
        Case(
            "IndexerKeyCache.add_sequence",
            lambda o: o.add_sequence(1),
            ValueError,
            "seq_id: sequence id 1 already exists",
        ),
        Case(
            "IndexerKeyCache.add_sequence",
            lambda o: o.add_sequence(2**63),
            ValueError,
            "seq_id: sequence ids must fit in int64",
        ),
        Case("IndexerKeyCache.length", lambda o: o.length(9), KeyError, "seq_id: unknown sequence id 9"),
        Case(
            "IndexerKeyCache.length",
            lambda o: o.length(2**70),
            KeyError,
            "seq_id: unknown sequence id 1180591620717411303424",
        ),
        Case("IndexerKeyCache.block_table", lambda o: o.block_table(-(2**64)), KeyError, "seq_id: unknown"),
        Case("IndexerKeyCache.can_append", lambda o: o.can_append(9, 1), KeyError, "seq_id: unknown"),
        Case("IndexerKeyCache.can_append", lambda o: o.can_append(1, -1), ValueError, "n: must be >= 0"),
        Case("IndexerKeyCache.fork", lambda o: o.fork(9, 10), KeyError, "parent: unknown sequence id 9"),
        Case("IndexerKeyCache.fork", lambda o: o.fork(1, 2), ValueError, "child: sequence id 2 already exists"),
        Case("IndexerKeyCache.fork", lambda o: o.fork(1, 2**64), ValueError, "child: sequence ids must fit in int64"),
        Case("IndexerKeyCache.fork", lambda o: o.fork(2**64, 7), KeyError, "parent: unknown"),
        Case("IndexerKeyCache.truncate", lambda o: o.truncate(1, 21), ValueError, "n: cannot truncate to 21 tokens"),
        Case(
            "IndexerKeyCache.truncate",
            lambda o: o.truncate(1, 2**70),
            ValueError,
            "n: cannot truncate to 1180591620717411303424",
        ),
        Case("IndexerKeyCache.truncate", lambda o: o.truncate(1, -1), ValueError, "n: must be >= 0"),
        Case("IndexerKeyCache.truncate", lambda o: o.truncate(9, 0), KeyError, "seq_id: unknown"),
        Case("IndexerKeyCache.free", lambda o: o.free(9), KeyError, "seq_id: unknown"),
        Case("IndexerKeyCache.free", lambda o: o.free(2**64), KeyError, "seq_id: unknown"),
        Case(
            "IndexerKeyCache.block_refcount",
            lambda o: o.block_refcount(4),
            IndexError,
            r"block: block 4 is outside \[0, 4\)",
        ),
        Case(
            "IndexerKeyCache.block_refcount",
            lambda o: o.block_refcount(-(2**70)),
            IndexError,
            "block: block -1180591620717411303424",
        ),
    ]
    for entry, call, arg in [
        ("IndexerKeyCache.add_sequence", lambda o, v: o.add_sequence(v), "seq_id"),
        ("IndexerKeyCache.length", lambda o, v: o.length(v), "seq_id"),
        ("IndexerKeyCache.free", lambda o, v: o.free(v), "seq_id"),
        ("IndexerKeyCache.can_append", lambda o, v: o.can_append(1, v), "n"),
        ("IndexerKeyCache.truncate", lambda o, v: o.truncate(1, v), "n"),
        ("IndexerKeyCache.fork", lambda o, v: o.fork(1, v), "child"),
        ("IndexerKeyCache.block_refcount", lambda o, v: o.block_refcount(v), "block"),
        ("IndexerKeyCache.copy_block", lambda o, v: o.copy_block(v, 0), "src"),
        ("IndexerKeyCache.copy_block", lambda o, v: o.copy_block(0, v), "dst"),
        ("IndexerKeyCache.dequantize", lambda o, v: o.dequantize(v), "seq_id"),
    ]:
        c += _int_cases(entry, call, arg)
    # --- writes
    c += [
        Case("IndexerKeyCache.append", lambda o: o.append(9, keys(1)), KeyError, "seq_id: unknown sequence id 9"),
        Case("IndexerKeyCache.append", lambda o: o.append(1, f32(2, 32)), ValueError, r"keys: expected \[n, 16\]"),
        Case("IndexerKeyCache.append", lambda o: o.append(1, f32(2, D, value=np.nan)), ValueError, "keys: non-finite"),
        Case("IndexerKeyCache.append", lambda o: o.append(1, f32(2, D, value=-np.inf)), ValueError, "keys: non-finite"),
        Case(
            "IndexerKeyCache.append",
            lambda o: o.append(1, f32(2, D, value=1e38)),
            ValueError,
            "keys: row 0 is too large",
        ),
        Case(
            "IndexerKeyCache.append",
            lambda o: o.append(3, keys(64)),
            _core.CacheFullError,
            "keys: block pool exhausted: 4 blocks needed, 2 free",
        ),
        Case(
            "IndexerKeyCache.append",
            lambda o: o.append(2, keys(29)),
            _core.CacheFullError,
            "keys: block pool exhausted: 3 blocks needed, 2 free",
        ),
        Case(
            "IndexerKeyCache.append_quantized",
            lambda o: o.append_quantized(1, NAN_CODES, f32(1)),
            ValueError,
            "fp8: row 0 holds the e4m3fn NaN code",
        ),
        Case(
            "IndexerKeyCache.append_quantized",
            lambda o: o.append_quantized(1, GOOD_CODES, f32(1, value=0.0)),
            ValueError,
            "scales: scale of row 0",
        ),
        Case(
            "IndexerKeyCache.append_quantized",
            lambda o: o.append_quantized(1, GOOD_CODES, f32(1, value=-1.0)),
            ValueError,
            "scales: scale of row 0",
        ),
        Case(
            "IndexerKeyCache.append_quantized",
            lambda o: o.append_quantized(1, GOOD_CODES, f32(1, value=np.nan)),
            ValueError,
            "scales: scale of row 0",
        ),
        Case(
            "IndexerKeyCache.append_quantized",
            lambda o: o.append_quantized(1, GOOD_CODES, f32(2)),
            ValueError,
            r"fp8: expected \[n, 16\] with scales \[n\]",
        ),
        Case(
            "IndexerKeyCache.append_quantized",
            lambda o: o.append_quantized(2**64, GOOD_CODES, f32(1)),
            KeyError,
            "seq_id: unknown",
        ),
        Case(
            "IndexerKeyCache.write_slots",
            lambda o: o.write_slots(np.array([64], np.int32), GOOD_CODES, f32(1)),
            IndexError,
            r"slots: slot 64 \(entry 0\) is outside \[0, 64\)",
        ),
        Case(
            "IndexerKeyCache.write_slots",
            lambda o: o.write_slots(np.array([-2], np.int32), GOOD_CODES, f32(1)),
            IndexError,
            "slots: slot -2",
        ),
        Case(
            "IndexerKeyCache.write_slots",
            lambda o: o.write_slots(np.array([0], np.int32), NAN_CODES, f32(1)),
            ValueError,
            "fp8: row 0 holds",
        ),
        Case(
            "IndexerKeyCache.write_slots",
            lambda o: o.write_slots(np.array([0], np.int32), GOOD_CODES, f32(1, value=np.inf)),
            ValueError,
            "scales: scale of row 0",
        ),
        Case(
            "IndexerKeyCache.write_slots",
            lambda o: o.write_slots(np.array([0, 1], np.int32), GOOD_CODES, f32(1)),
            ValueError,
            r"fp8: expected \[2, 16\]",
        ),
        Case(
            "IndexerKeyCache.copy_block", lambda o: o.copy_block(4, 0), IndexError, r"src: block 4 is outside \[0, 4\)"
        ),
        Case("IndexerKeyCache.copy_block", lambda o: o.copy_block(0, -1), IndexError, "dst: block -1 is outside"),
        Case(
            "IndexerKeyCache.copy_block",
            lambda o: o.copy_block(2**64, 0),
            IndexError,
            "src: block 18446744073709551616",
        ),
    ]
    c += _array_cases("IndexerKeyCache.append", lambda o, v: o.append(1, v), "keys", keys(2))
    c += _array_cases(
        "IndexerKeyCache.append_quantized", lambda o, v: o.append_quantized(1, v, f32(1)), "fp8", GOOD_CODES
    )
    c += _array_cases(
        "IndexerKeyCache.append_quantized", lambda o, v: o.append_quantized(1, GOOD_CODES, v), "scales", f32(1)
    )
    c += _array_cases(
        "IndexerKeyCache.write_slots",
        lambda o, v: o.write_slots(v, np.zeros((2, D), np.uint8), f32(2)),
        "slots",
        np.array([0, 1], np.int32),
    )
    c += _array_cases(
        "IndexerKeyCache.write_slots",
        lambda o, v: o.write_slots(np.array([0], np.int32), GOOD_CODES, v),
        "scales",
        f32(1),
    )
    # --- reads
    c += [
        Case(
            "IndexerKeyCache.gather",
            lambda o: o.gather(1, np.array([0, 20])),
            IndexError,
            r"positions: position 20 \(entry 1\) is outside \[0, 20\)",
        ),
        Case("IndexerKeyCache.gather", lambda o: o.gather(1, np.array([-1])), IndexError, "positions: position -1"),
        Case(
            "IndexerKeyCache.gather",
            lambda o: o.gather(1, np.array([2**62])),
            IndexError,
            "positions: position 4611686018427387904",
        ),
        Case("IndexerKeyCache.gather", lambda o: o.gather(9, np.array([0])), KeyError, "seq_id: unknown"),
        Case("IndexerKeyCache.dequantize", lambda o: o.dequantize(9), KeyError, "seq_id: unknown"),
        Case(
            "IndexerKeyCache.slots",
            lambda o: o.slots(np.array([9]), np.zeros((1, 1), np.int64)),
            KeyError,
            "seq_ids: unknown",
        ),
        Case(
            "IndexerKeyCache.slots",
            lambda o: o.slots(np.array([1, 1]), np.zeros((1, 1), np.int64)),
            ValueError,
            "seq_ids: 2 ids for 1 rows",
        ),
        Case(
            "IndexerKeyCache.slots",
            lambda o: o.slots(np.array([1]), np.array([[-2]])),
            IndexError,
            "positions: position -2",
        ),
    ]
    c += _array_cases("IndexerKeyCache.gather", lambda o, v: o.gather(1, v), "positions", np.array([0, 1]))
    c += _array_cases(
        "IndexerKeyCache.slots", lambda o, v: o.slots(v, np.zeros((2, 1), np.int64)), "seq_ids", np.array([1, 2])
    )
    c += _array_cases(
        "IndexerKeyCache.slots", lambda o, v: o.slots(np.array([1]), v), "positions", np.zeros((1, 2), np.int64)
    )

    # --- select / scores and their paged twins
    def sel(o: Any, **kw: Any) -> Any:
        a = dict(seq_ids=np.array([1]), q=Q1, weights=W1, positions=np.array([19]), k=4)
        a.update(kw)
        extra = {n: a.pop(n) for n in ("threads", "sorted", "as_slots", "quantize_queries") if n in a}
        return o.select(a["seq_ids"], a["q"], a["weights"], a["positions"], a["k"], **extra)

    def scr(o: Any, **kw: Any) -> Any:
        a = dict(seq_ids=np.array([1]), q=Q1, weights=W1, positions=np.array([19]))
        a.update(kw)
        extra = {n: a.pop(n) for n in ("threads", "quantize_queries") if n in a}
        return o.scores(a["seq_ids"], a["q"], a["weights"], a["positions"], **extra)

    def pag(o: Any, **kw: Any) -> Any:
        a = dict(tables=np.array([[0, 1, -1]], np.int32), positions=np.array([19]), q=Q1, weights=W1, k=4)
        a.update(kw)
        extra = {n: a.pop(n) for n in ("threads", "sorted", "as_slots", "quantize_queries") if n in a}
        return o.select_paged(a["tables"], a["positions"], a["q"], a["weights"], a["k"], **extra)

    def pscr(o: Any, **kw: Any) -> Any:
        a = dict(tables=np.array([[0, 1, -1]], np.int32), positions=np.array([19]), q=Q1, weights=W1)
        a.update(kw)
        return o.scores_paged(
            a["tables"], a["positions"], a["q"], a["weights"], **{n: a[n] for n in ("threads",) if n in a}
        )

    for name, f in [("select", sel), ("select_paged", pag)]:
        entry = f"IndexerKeyCache.{name}"
        c += [
            Case(entry, lambda o, f=f: f(o, k=0), ValueError, "k: must be at least 1"),
            Case(entry, lambda o, f=f: f(o, k=2**31), ValueError, "k: must be at most 2147483647"),
            Case(entry, lambda o, f=f: f(o, k=2**70), ValueError, "k: must be at most"),
            Case(entry, lambda o, f=f: f(o, k=1.5), TypeError, "k: expected an int"),
            Case(entry, lambda o, f=f: f(o, sorted=1), TypeError, "sorted: expected a bool"),
            Case(entry, lambda o, f=f: f(o, as_slots="no"), TypeError, "as_slots: expected a bool"),
            Case(entry, lambda o, f=f: f(o, quantize_queries=0), TypeError, "quantize_queries: expected a bool"),
            Case(
                entry,
                lambda o, f=f: f(o, q=NAN_SCORE_Q, weights=NAN_SCORE_W, sorted=True),
                ValueError,
                "q, weights: the scores of query row 0 are not finite",
            ),
        ]
    for name, f in [("select", sel), ("scores", scr), ("select_paged", pag), ("scores_paged", pscr)]:
        entry = f"IndexerKeyCache.{name}"
        c += [
            Case(entry, lambda o, f=f: f(o, threads=0), ValueError, "threads: must be at least 1"),
            Case(entry, lambda o, f=f: f(o, threads=2**40), ValueError, "threads: must be at most 1024"),
            Case(entry, lambda o, f=f: f(o, q=f32(1, 1, D, value=np.nan)), ValueError, "q: non-finite value"),
            Case(entry, lambda o, f=f: f(o, weights=f32(1, 1, value=np.inf)), ValueError, "weights: non-finite value"),
            Case(entry, lambda o, f=f: f(o, weights=f32(1, 2)), ValueError, r"weights: expected \[1, 1\]"),
            Case(
                entry, lambda o, f=f: f(o, q=f32(1, 1, 32)), ValueError, "q: head_dim 32 does not match the cache's 16"
            ),
            Case(
                entry,
                lambda o, f=f: f(o, q=f32(1, 300, D), weights=f32(1, 300)),
                ValueError,
                "q: between 1 and 256 heads",
            ),
            Case(
                entry, lambda o, f=f: f(o, q=f32(1, 0, D), weights=f32(1, 0)), ValueError, "q: between 1 and 256 heads"
            ),
            Case(entry, lambda o, f=f: f(o, positions=np.array([-1])), IndexError, "positions: position -1"),
            Case(entry, lambda o, f=f: f(o, positions=np.array([19, 19])), ValueError, "2 entries for 1 query rows"),
        ]
        c += _array_cases(entry, lambda o, v, f=f: f(o, q=v), "q", Q1)
        c += _array_cases(entry, lambda o, v, f=f: f(o, weights=v), "weights", W1)
        c += _array_cases(entry, lambda o, v, f=f: f(o, positions=v), "positions", np.array([19]))
    for name, f in [("select", sel), ("scores", scr)]:
        entry = f"IndexerKeyCache.{name}"
        c += [
            Case(entry, lambda o, f=f: f(o, seq_ids=np.array([9])), KeyError, "seq_ids: unknown sequence id 9"),
            Case(
                entry,
                lambda o, f=f: f(o, positions=np.array([20])),
                IndexError,
                r"positions: position 20 .* outside \[0, 20\)",
            ),
            Case(
                entry,
                lambda o, f=f: f(o, seq_ids=np.array([3]), positions=np.array([0])),
                IndexError,
                r"outside \[0, 0\)",
            ),
        ]
        c += _array_cases(entry, lambda o, v, f=f: f(o, seq_ids=v), "seq_ids", np.array([1]))
    for name, f in [("select_paged", pag), ("scores_paged", pscr)]:
        entry = f"IndexerKeyCache.{name}"
        c += [
            Case(
                entry,
                lambda o, f=f: f(o, tables=np.array([[0, -1, -1]], np.int32)),
                IndexError,
                "block_tables: row 0 needs page 1 .* −1",
            ),
            Case(
                entry,
                lambda o, f=f: f(o, tables=np.array([[0, 4, -1]], np.int32)),
                IndexError,
                r"block_tables: row 0 needs page 1 .* block 4, outside \[0, 4\)",
            ),
            Case(
                entry,
                lambda o, f=f: f(o, positions=np.array([48])),
                IndexError,
                "block_tables: row 0 at position 48 needs 4 pages",
            ),
            Case(
                entry,
                lambda o, f=f: f(o, positions=np.array([2**31])),
                IndexError,
                "positions: position 2147483648 .* int32",
            ),
            Case(
                entry,
                lambda o, f=f: f(o, positions=np.array([2**63 - 1])),
                IndexError,
                "positions: position 9223372036854775807",
            ),
        ]
        c += _array_cases(entry, lambda o, v, f=f: f(o, tables=v), "block_tables", np.array([[0, 1, -1]], np.int32))
    # --- sparse MLA on the CPU, and the FMA-peak loop
    mq, mkv, mix = f32(1, 2, D), f32(5, D), np.zeros((1, 3), np.int64)

    def mla(m: Any, q: Any = mq, kv: Any = mkv, idx: Any = mix, scale: Any = 0.5, d_v: Any = 8, **kw: Any) -> Any:
        return m.sparse_mla(q, kv, idx, scale, d_v, **kw)

    c += [
        Case("sparse_mla", lambda m: mla(m, d_v=0), ValueError, r"d_v: must be in \[1, 16\]", "module"),
        Case("sparse_mla", lambda m: mla(m, d_v=D + 1), ValueError, r"d_v: must be in \[1, 16\]", "module"),
        Case("sparse_mla", lambda m: mla(m, d_v=-1), ValueError, "d_v: must be in", "module"),
        Case("sparse_mla", lambda m: mla(m, d_v=2.0), TypeError, "d_v: expected an int", "module"),
        Case("sparse_mla", lambda m: mla(m, scale=float("nan")), ValueError, "scale: must be finite", "module"),
        Case("sparse_mla", lambda m: mla(m, scale=float("inf")), ValueError, "scale: must be finite", "module"),
        Case("sparse_mla", lambda m: mla(m, scale="1"), TypeError, "scale: expected a float", "module"),
        Case("sparse_mla", lambda m: mla(m, scale=True), TypeError, "scale: expected a float", "module"),
        Case("sparse_mla", lambda m: mla(m, kv=f32(5, D + 1)), ValueError, r"kv: expected \[N, 16\]", "module"),
        Case("sparse_mla", lambda m: mla(m, kv=np.ones((5, D + 1), np.uint16)), ValueError, "kv: expected", "module"),
        Case(
            "sparse_mla",
            lambda m: mla(m, idx=np.zeros((2, 3), np.int64)),
            ValueError,
            r"indices: expected \[1, K\]",
            "module",
        ),
        Case(
            "sparse_mla",
            lambda m: mla(m, idx=np.zeros((2, 3), np.int32)),
            ValueError,
            r"indices: expected \[1, K\]",
            "module",
        ),
        Case("sparse_mla", lambda m: mla(m, threads=0), ValueError, "threads: must be at least 1", "module"),
        Case("sparse_mla", lambda m: mla(m, threads=2**70), ValueError, "threads: must be at most", "module"),
        Case("fma_loop", lambda m: m.fma_loop(-1), ValueError, "iters: must be in", "module"),
        Case("fma_loop", lambda m: m.fma_loop(2**41), ValueError, "iters: must be in", "module"),
    ]
    c += _int_cases("fma_loop", lambda m, v: m.fma_loop(v), "iters", "module")
    for arg, good in (("q", mq), ("kv", mkv), ("indices", mix), ("indices", mix.astype(np.int32))):
        key = "idx" if arg == "indices" else arg
        c += [
            Case(x.entry, x.call, x.error, x.match, "module")
            for x in _array_cases("sparse_mla", lambda m, v, key=key: mla(m, **{key: v}), arg, good)
            # another dtype than int32 is read as int64, and the message says so (the int64 group has it)
            if not x.match.startswith("indices: expected int32")
        ]
    c.append(
        Case(
            "IndexerKeyCache.select",
            lambda o: sel(
                o,
                q=f32(1024, 1, D),
                weights=f32(1024, 1),
                seq_ids=np.ones(1024, np.int64),
                positions=np.full(1024, 19),
                k=2**31 - 1,
            ),
            MemoryError,
            r"k: the \[1024, 2147483647\] int32 output: .*2\^40",
        )
    )
    c.append(
        Case(
            "IndexerKeyCache.select_paged",
            lambda o: pag(
                o,
                q=f32(1024, 1, D),
                weights=f32(1024, 1),
                tables=np.zeros((1024, 2), np.int32),
                positions=np.full(1024, 19),
                k=2**31 - 1,
            ),
            MemoryError,
            r"k: .*2\^40",
        )
    )
    return c


def _host_cases() -> list[Case]:
    """The wrappers: they convert dtypes (other int widths, lists, bfloat16), so their cases are the values
    a conversion could wrap, truncate or clamp."""
    x = f32(3, 10)
    u64_max = np.array([2**64 - 1], np.uint64)
    return [
        Case("topk", lambda m: m.topk(x, 1.5), TypeError, "k: expected an int", "module"),
        Case("topk", lambda m: m.topk(x, 2**40), ValueError, "k: must be at most", "module"),
        Case(
            "topk",
            lambda m: m.topk(x, 2, np.array([1, 2, 2**64 - 1], np.uint64)),
            ValueError,
            "lengths: entry 2 is 18446744073709551615",
            "module",
        ),
        Case("topk", lambda m: m.topk(x, 2, [1, 2, 1.5]), ValueError, "lengths: expected integers", "module"),
        Case("topk", lambda m: m.topk(x.astype(object), 2), TypeError, "scores: expected a float array", "module"),
        Case("topk", lambda m: m.topk(np.float32(3), 2), ValueError, r"scores: expected shape \[T, L\]", "module"),
        Case("topk", lambda m: m.topk(x, 2, threads=1.0), TypeError, "threads: expected an int", "module"),
        Case("set_simd_path", lambda m: m.set_simd_path("sse9"), ValueError, "sse9", "module"),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(1, 2, D).astype(int), f32(5, D), [[0]], 0.5, 8),
            TypeError,
            "q: expected a float array",
            "module",
        ),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(2, D), f32(5, D), [[0]], 0.5, 8),
            ValueError,
            r"q: expected shape \[T, h, D\]",
            "module",
        ),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(1, 2, D), f32(5, D).astype(np.int16), [[0]], 0.5, 8),
            TypeError,
            "kv: expected a float32 or bfloat16",
            "module",
        ),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(1, 2, D), f32(5, 8), [[0]], 0.5, 8),
            ValueError,
            r"kv: expected shape \[N, 16\]",
            "module",
        ),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(1, 2, D), f32(5, D), [[0.5]], 0.5, 8),
            TypeError,
            "indices: expected an integer array",
            "module",
        ),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(1, 2, D), f32(5, D), [[True]], 0.5, 8),
            TypeError,
            "indices: expected an integer array",
            "module",
        ),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(1, 2, D), f32(5, D), [0], 0.5, 8),
            ValueError,
            r"indices: expected shape \[1, K\]",
            "module",
        ),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(1, 2, D), f32(5, D), [[0]], "0.5", 8),
            TypeError,
            "scale: expected a float",
            "module",
        ),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(1, 2, D), f32(5, D), [[0]], 0.5, 0),
            ValueError,
            "d_v: must be in",
            "module",
        ),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(1, 2, D), f32(5, D), [[0]], 0.5, 8.0),
            TypeError,
            "d_v: expected an int",
            "module",
        ),
        Case(
            "sparse_mla_host",
            lambda m: m.sparse_mla_host(f32(1, 2, D), f32(5, D), [[0]], 0.5, threads=0),
            ValueError,
            "threads: must be at least 1",
            "module",
        ),
        Case("IndexerKeyCache", lambda m: m.IndexerKeyCache(-1), ValueError, "num_blocks: must be in", "module"),
        Case("IndexerKeyCache", lambda m: m.IndexerKeyCache(2.5), TypeError, "num_blocks: expected an int", "module"),
        Case("BlockPool", lambda m: m.BlockPool(True), TypeError, "num_blocks: expected an int", "module"),
        Case(
            "IndexerKeyCache.gather", lambda o: o.gather(1, u64_max), IndexError, "positions: entries must fit in int64"
        ),
        Case(
            "IndexerKeyCache.gather", lambda o: o.gather(1, [2**70]), IndexError, "positions: entries must fit in int64"
        ),
        Case("IndexerKeyCache.gather", lambda o: o.gather(1, [True]), TypeError, "positions: expected integers"),
        Case("IndexerKeyCache.gather", lambda o: o.gather(1, ["0"]), TypeError, "positions: expected integers"),
        Case(
            "IndexerKeyCache.slots",
            lambda o: o.slots([2**64 - 1], [[0]]),
            KeyError,
            "seq_ids: entries must fit in int64",
        ),
        Case(
            "IndexerKeyCache.slots",
            lambda o: o.slots([1], u64_max[None]),
            IndexError,
            "positions: entries must fit in int64",
        ),
        Case(
            "IndexerKeyCache.select",
            lambda o: o.select(u64_max, Q1, W1, [19], 4),
            KeyError,
            "seq_ids: entries must fit",
        ),
        Case("IndexerKeyCache.select", lambda o: o.select([1], Q1, W1, [19], 4.7), TypeError, "k: expected an int"),
        Case("IndexerKeyCache.select", lambda o: o.select([1], Q1, W1, [19], 0), ValueError, "k: must be at least 1"),
        Case(
            "IndexerKeyCache.select",
            lambda o: o.select([1], Q1.tolist(), W1, [19], 4),
            TypeError,
            "q: expected a numpy array",
        ),
        Case(
            "IndexerKeyCache.select_paged",
            lambda o: o.select_paged([[0, 2**32]], [19], Q1, W1, 4),
            IndexError,
            "block_tables: entries must fit in int32",
        ),
        Case(
            "IndexerKeyCache.select_paged",
            lambda o: o.select_paged(np.array([[0, 2**31]], np.int64), [19], Q1, W1, 4),
            IndexError,
            "block_tables: entries must fit in int32",
        ),
        Case(
            "IndexerKeyCache.select_paged",
            lambda o: o.select_paged([[0, 1]], [19], Q1, W1, 2.0),
            TypeError,
            "k: expected an int",
        ),
        Case(
            "IndexerKeyCache.write_slots",
            lambda o: o.write_slots(np.array([2**32], np.int64), GOOD_CODES, f32(1)),
            IndexError,
            "slots: entries must fit in int32",
        ),
        Case(
            "IndexerKeyCache.write_slots",
            lambda o: o.write_slots(np.array([2**64 - 1], np.uint64), GOOD_CODES, f32(1)),
            IndexError,
            "slots: entries must fit in int32",
        ),
        Case("IndexerKeyCache.copy_block", lambda o: o.copy_block(0.0, 1), TypeError, "src: expected an int"),
        Case("IndexerKeyCache.copy_block", lambda o: o.copy_block(0, 2**70), IndexError, "dst: block"),
        Case("IndexerKeyCache.truncate", lambda o: o.truncate(1, -1), ValueError, "n: must be >= 0"),
        Case("IndexerKeyCache.truncate", lambda o: o.truncate(1, 2.0), TypeError, "n: expected an int"),
        Case(
            "IndexerKeyCache.append",
            lambda o: o.append(1, keys(2).astype(np.float64)),
            TypeError,
            "keys: expected float32 or bfloat16",
        ),
        Case(
            "IndexerKeyCache.append",
            lambda o: o.append(1, swapped(keys(2))),
            TypeError,
            "keys: expected float32 or bfloat16",
        ),
        Case("IndexerKeyCache.append", lambda o: o.append(1, misaligned(keys(2))), ValueError, "keys: must be aligned"),
        Case(
            "IndexerKeyCache.append_quantized",
            lambda o: o.append_quantized(1, GOOD_CODES, np.ones(1)),
            ValueError,
            r"scales: expected float32 \[1\]",
        ),
        Case("BlockPool.allocate", lambda p: p.allocate(2.0), TypeError, "n: expected an int", "pool"),
        Case("BlockPool.retain", lambda p: p.retain([True]), TypeError, "blocks: expected", "pool"),
        Case("BlockPool.release", lambda p: p.release(range(5, 7)), IndexError, "blocks: block 5", "pool"),
    ]


CORE_CASES = _core_cases()
HOST_CASES = _host_cases()


def _run_case(api: Any, case: Case) -> None:
    if case.target == "cache":
        obj: Any = make_cache(api)
        state: Callable[[], Any] = lambda: cache_state(obj)  # noqa: E731
    elif case.target == "pool":
        obj = make_pool(api)
        state = lambda: pool_state(obj)  # noqa: E731
    else:
        obj, state = api, lambda: _core.cpu_features()["simd_path"]  # noqa: E731
    before = state()
    with pytest.raises(case.error, match=case.match):
        case.call(obj)
    assert state() == before, "a refused call changed the state"


@pytest.mark.parametrize("case", CORE_CASES, ids=Case.id)
def test_core_refuses_bad_input_with_a_named_error_and_changes_nothing(case: Case) -> None:
    _run_case(_core, case)


@pytest.mark.parametrize("case", HOST_CASES, ids=Case.id)
def test_host_wrappers_refuse_bad_input_with_a_named_error_and_change_nothing(case: Case) -> None:
    _run_case(host, case)


def test_the_catalogue_covers_every_entry_point() -> None:
    """Each public name of `_core` (functions, classes, methods) has a bad-input case in the catalogue (the
    reads without arguments are covered by the state checks and the fuzz)."""
    covered = {c.entry for c in CORE_CASES}
    no_args = {"cpu_features", "fp8_decode_table", "IndexerKeyCache.sequence_ids", "IndexerKeyCache.pages",
               "BlockPool.refcounts", "BlockPool.free_blocks",
               # the XLA FFI handlers' capsules and a diagnostic; the handler's own bad buffers are
               # tests/ops/test_xla_ffi_sparse_mla_bad_input.py's cases
               "ffi_targets", "ffi_last_kv_address"}  # fmt: skip
    names = set()
    for n in dir(_core):
        v = getattr(_core, n)
        if n.startswith("_") or isinstance(v, str) or (isinstance(v, type) and issubclass(v, BaseException)):
            continue
        if isinstance(v, type):
            if n == "PageBuffer":
                continue
            names.add(n)
            names |= {f"{n}.{m}" for m, a in vars(v).items() if not m.startswith("_") and callable(a)}
        else:
            names.add(n)
    missing = sorted(names - covered - no_args)
    assert not missing, f"entry points without a bad-input case: {missing}"


# ----- the pages() view cannot break its cache --------------------------------------------------------------
@pytest.mark.parametrize("api", [_core, host], ids=["core", "host"])
def test_the_pages_view_cannot_be_made_writeable_or_resized(api: Any) -> None:
    c = make_cache(api)
    before = cache_state(c)
    view = c.pages()
    assert not view.flags.writeable and not view.flags.owndata
    assert type(view.base).__name__ == "PageBuffer"
    attacks = [
        (lambda: setattr(view.flags, "writeable", True), ValueError, "WRITEABLE"),
        (lambda: view.setflags(write=True), ValueError, "WRITEABLE"),
        (lambda: view[:1].setflags(write=True), ValueError, "WRITEABLE"),
        (lambda: view.resize((1,), refcheck=False), ValueError, "does not own its data"),
        (lambda: view.__setitem__((0, 0), 1), ValueError, "read-only"),
        (lambda: view.base.resize((1,)), AttributeError, "resize"),
        (lambda: memoryview(view.base), TypeError, "bytes-like"),
        (lambda: np.frombuffer(view.base, np.uint8), TypeError, "bytes-like"),
        (lambda: type(view.base)(), TypeError, "cannot create"),
    ]
    for attack, error, match in attacks:
        with pytest.raises(error, match=match):
            attack()
    assert not np.shares_memory(np.resize(view, (3,)), view)  # a new array: the cache's bytes untouched
    assert cache_state(c) == before
    # The view is live and outlives the cache.
    c.append(1, keys(5, seed=9))
    assert not np.array_equal(view, np.frombuffer(before[0], np.uint8).reshape(view.shape))
    np.testing.assert_array_equal(view, c.pages())
    snapshot = view.copy()
    del c
    np.testing.assert_array_equal(view, snapshot)


# ----- panics become InternalError --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["direct", "detached", "worker"])
def test_a_panic_becomes_internal_error_naming_the_call(mode: str) -> None:
    with pytest.raises(host.InternalError, match="_test_panic: internal error") as e:
        _core._test_panic(mode)
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, Exception)
    assert host.InternalError is _core.InternalError
    # Everything still works afterwards (the worker pools too).
    assert host.topk(np.arange(70_000, dtype=np.float32)[None], 1, threads=2)[0, 0] == 69_999


def _rust_items(src: str) -> list[tuple[str, str, str, str]]:
    """(kind, name, parameters, body) of every `#[pyfunction]` and every fn of a `#[pymethods]` impl in
    `src` (string and char literals and comments stripped first, so their braces do not count)."""
    src = re.sub(r"//[^\n]*", "", src)
    src = re.sub(r'"(?:\\.|[^"\\])*"', '""', src)
    src = re.sub(r"'(?:\\.|[^'\\])'", "' '", src)
    fn = re.compile(r"\bfn\s+(\w+)")

    def block(text: str, start: int) -> tuple[str, str, int]:
        """The text between `start` and the next `{`, and that brace block's inside and end."""
        i = text.index("{", start)
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[start:i], text[i + 1 : j], j
        raise AssertionError("unbalanced braces")

    items = []
    for m in re.finditer(r"#\[pyfunction\]", src):
        f = fn.search(src, m.end())
        assert f is not None
        sig, body, _ = block(src, f.end())
        items.append(("pyfunction", f.group(1), sig, body))
    for m in re.finditer(r"#\[pymethods\]\s*impl\s+(\w+)", src):
        _, impl, _ = block(src, m.end())
        pos = 0
        while (f := fn.search(impl, pos)) is not None:
            sig, body, pos = block(impl, f.end())
            items.append((m.group(1), f.group(1), sig, body))
    return items


def test_every_binding_runs_inside_the_panic_guard() -> None:
    """Each Python-callable Rust function's body is one `guard("<call>", || ...)`, so no panic gets out as
    pyo3's PanicException; and each converts its own arguments (no `usize` / `i64` / `bool` / `&str` /
    numpy array parameter for pyo3 to convert with an OverflowError or a message without the argument's
    name: only `&self`, `py` and plain objects)."""
    items = []
    for path in sorted((REPO / "rust" / "src" / "py").glob("*.rs")):
        items += [(path.name, *it) for it in _rust_items(path.read_text())]
    assert len(items) > 40, items
    for file, kind, name, sig, body in items:
        assert body.strip().startswith("guard("), f"{file}: {kind}::{name} does not start with guard(...)"
        start = sig.index("(")
        depth = 0
        for end in range(start, len(sig)):
            depth += {"(": 1, ")": -1}.get(sig[end], 0)
            if depth == 0:
                break
        params = sig[start + 1 : end]
        for p in filter(None, (x.strip() for x in re.split(r",(?![^<]*>)", params))):
            assert p in ("&self", "py: Python<'_>", "py: Python<'py>") or re.fullmatch(
                r"\w+: (Option<)?&Bound<'(_|py), PyAny>>?", p
            ), f"{file}: {kind}::{name} takes `{p}`: convert it in the body (args.rs), naming it"


# ----- SIMD paths (issue 19): pinning works, an unknown or absent path is refused by name ----------------------
def test_cpu_features_and_simd_paths() -> None:
    feats = host.cpu_features()
    native = feats["simd_path"]
    assert native in {"scalar", "avx2", "avx512", "neon"}
    expected = {"x86_64": ["sse4.2", "avx2", "fma", "f16c", "avx512f", "avx512bw"],
                "aarch64": ["neon", "asimddp", "fp16", "bf16", "i8mm", "sve", "sve2"]}  # fmt: skip
    import platform

    arch = {"AMD64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    for name in expected.get(arch, []):
        assert isinstance(feats[name], bool), name
    try:
        assert host.set_simd_path("scalar") == "scalar"
        assert host.cpu_features()["simd_path"] == "scalar"
        assert host.set_simd_path(native) == native
        for path in ("avx2", "avx512", "neon"):
            try:
                assert host.set_simd_path(path) == path
                host.set_simd_path(native)
            except ValueError as e:
                assert f"the {path} path" in str(e)
                assert host.cpu_features()["simd_path"] == native  # nothing changed
        with pytest.raises(ValueError, match='name: unknown SIMD path "sve"'):
            host.set_simd_path("sve")
    finally:
        host.set_simd_path(None)
    assert host.cpu_features()["simd_path"] == native


# ----- the cases that once crashed or hung the process: in a child --------------------------------------------
CRASH_CASES: dict[str, tuple[str, str]] = {
    # id: (code run in the child, expected "ExceptionType: fragment"); the code raises or returns.
    "topk k=2**40 (aborted on a failed allocation)": (
        "m.topk(np.zeros((2, 3), np.float32), 2**40)",
        "ValueError: k: must be at most",
    ),
    "topk [100, 2**31-1] int32 output: tried, refused by the allocator": (
        "m.topk(np.zeros((100, 1), np.float32), 2**31 - 1)",
        "MemoryError: k: the [T, k] int32 output",
    ),
    "topk [2**20, 2**31-1] output: past 2**40, refused before any allocation": (
        "m.topk(np.zeros((2**20, 0), np.float32), 2**31 - 1)",
        "MemoryError: k: the [1048576, 2147483647] int32 output",
    ),
    "select k=2**40 (aborted)": (
        "c = m.IndexerKeyCache(2, 16, 16); c.add_sequence(0); c.append(0, np.ones((3, 16), np.float32));"
        "c.select(np.array([0]), np.ones((1, 1, 16), np.float32), np.ones((1, 1), np.float32), np.array([2]), 2**40)",
        "ValueError: k: must be at most",
    ),
    "select [100, 2**31-1] output: refused by the allocator": (
        "c = m.IndexerKeyCache(2, 16, 16); c.add_sequence(0); c.append(0, np.ones((3, 16), np.float32));"
        "c.select(np.zeros(100, np.int64), np.ones((100, 1, 16), np.float32), np.ones((100, 1), np.float32),"
        " np.full(100, 2), 2**31 - 1)",
        "MemoryError: k: the [T, k] int32 output",
    ),
    "scores_paged [32, 2**27] scores through one huge page: refused by the allocator": (
        "c = m.IndexerKeyCache(1, 2**27, 1);"
        "c.scores_paged(np.zeros((32, 1), np.int32), np.full(32, 2**27 - 1), np.ones((32, 1, 1), np.float32),"
        " np.ones((32, 1), np.float32))",
        "MemoryError: positions: the [T, max(positions) + 1] float32 scores",
    ),
    "IndexerKeyCache page buffer of 8.8 TB": (
        "m.IndexerKeyCache(1, 2**31, 4096)",
        "MemoryError: num_blocks: the page buffer",
    ),
    "BlockPool of 2**31 - 1 blocks under a 6 GiB limit": (
        "m.BlockPool(2**31 - 1)",
        "MemoryError: num_blocks: the pool's bookkeeping",
    ),
    "pages() resized, then an append (segfaulted)": (
        "c = m.IndexerKeyCache(2, 16, 16); p = c.pages(); c.add_sequence(1)\n"
        "try:\n    p.resize((0,), refcheck=False)\nexcept ValueError:\n    pass\n"
        "c.append(1, np.ones((20, 16), np.float32)); assert c.length(1) == 20 and p.shape == (2, 320)\n"
        "p.resize((0,), refcheck=False)",
        "ValueError: cannot resize this array",
    ),
    "pages() made writeable, then written (corrupted the cache)": (
        "c = m.IndexerKeyCache(2, 16, 16); p = c.pages()\np.flags.writeable = True",
        "ValueError: cannot set WRITEABLE flag",
    ),
    "threads=2**40 (spawned threads until the OS gave up)": (
        "m.topk(np.zeros((300, 300), np.float32), 2, threads=2**40)",
        "ValueError: threads: must be at most 1024",
    ),
    "threads=100000 on a select big enough for the pool": (
        "c = m.IndexerKeyCache(64, 16, 128); c.add_sequence(0); c.append(0, np.ones((1000, 128), np.float32));"
        "c.select(np.zeros(8, np.int64), np.ones((8, 64, 128), np.float32), np.ones((8, 64), np.float32),"
        " np.full(8, 999), 16, threads=100000)",
        "ValueError: threads: must be at most 1024",
    ),
    "an __index__ that calls back into the cache (must not deadlock on the cache's lock)": (
        "c = m.IndexerKeyCache(2, 16, 16); c.add_sequence(1)\n"
        "class Evil:\n    def __index__(self):\n        c.append(1, np.ones((1, 16), np.float32)); return 0\n"
        "c.block_refcount(Evil()); c.copy_block(Evil(), 1); c.can_append(1, Evil()); c.truncate(1, Evil())\n"
        "p = m.BlockPool(2); p.allocate(Evil()); p.refcount(Evil()); assert c.length(1) == 2",
        "returned",
    ),
    "a panic in a worker thread": ("m._test_panic('worker')", "InternalError: _test_panic: internal error"),
    "a panic with the GIL released": ("m._test_panic('detached')", "InternalError: _test_panic: internal error"),
}

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from dsa_hybrid import _core as m
    # Deterministic allocation failures: a 6 GiB address space (glibc arenas and rayon are kept small).
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    cases = json.loads(sys.argv[1])
    for name, code in cases:
        print(json.dumps({"start": name}), flush=True)
        try:
            exec(code, {"m": m, "np": np})
            out = "returned"
        except Exception as e:
            out = f"{type(e).__name__}: {e}"
        except BaseException as e:
            out = f"BaseException {type(e).__name__}: {e}"
        print(json.dumps({"done": name, "result": out}), flush=True)
    """
)


@pytest.fixture(scope="module")
def crash_results() -> dict[str, str]:
    """Run every crash case in child processes; a child that dies or hangs fails its case and a new one goes on."""
    results: dict[str, str] = {}
    pending = list(CRASH_CASES.items())
    env = dict(os.environ, MALLOC_ARENA_MAX="2", RAYON_NUM_THREADS="2", RUST_BACKTRACE="0")
    while pending:
        todo = [(name, code) for name, (code, _) in pending]
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(todo)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=120)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            timed_out = True
        current = None
        for line in out.splitlines():
            msg = json.loads(line)
            if "start" in msg:
                current = msg["start"]
            else:
                results[msg["done"]] = msg["result"]
                current = None
        if current is None and any(n not in results for n, _ in pending):
            raise AssertionError(f"the child stopped between cases (status {proc.returncode}): {err[-2000:]}")
        if current is not None:
            why = "timed out" if timed_out else f"died with status {proc.returncode}"
            results[current] = f"CRASHED: the child {why}; stderr: {err[-1500:]}"
        pending = [(n, c) for n, c in pending if n not in results]
    return results


@pytest.mark.parametrize("name", list(CRASH_CASES))
def test_crash_prone_cases_raise_in_a_child_process(name: str, crash_results: dict[str, str]) -> None:
    expected = CRASH_CASES[name][1]
    got = crash_results[name]
    if expected == "returned":
        assert got == "returned", got
    else:
        assert got.startswith(expected.split(":")[0] + ":") and expected.split(": ", 1)[1] in got, got


# ----- the property fuzz ------------------------------------------------------------------------------------
class Model:
    """The cache's own pool, block tables, lengths and page bytes, in plain Python."""

    def __init__(self, num_blocks: int) -> None:
        self.rc = [0] * num_blocks
        self.free = list(range(num_blocks))[::-1]  # a stack: pop from the end
        self.seqs: dict[int, tuple[list[int], int]] = {}
        self.pages = np.zeros((num_blocks, BS * (D + 4)), np.uint8)

    def alloc(self, n: int) -> list[int]:
        got = self.free[len(self.free) - n :][::-1]
        del self.free[len(self.free) - n :]
        for b in got:
            self.rc[b] = 1
        return got

    def release(self, blocks: list[int]) -> None:  # in reverse order, as the pool does
        for b in reversed(blocks):
            self.rc[b] -= 1
            if self.rc[b] == 0:
                self.free.append(b)

    def write(self, block: int, off: int, codes: np.ndarray, scale: np.float32) -> None:
        self.pages[block, off * D : (off + 1) * D] = codes
        self.pages[block, BS * D + 4 * off : BS * D + 4 * off + 4] = np.frombuffer(
            np.float32(scale).tobytes(), np.uint8
        )

    def append(self, sid: int, codes: np.ndarray, scales: np.ndarray) -> type[Exception] | None:
        if sid not in self.seqs:
            return KeyError
        blocks, n0 = self.seqs[sid]
        n = len(scales)
        new_pages = max(0, -(-(n0 + n) // BS) - len(blocks))
        cow = n > 0 and n0 % BS != 0 and bool(blocks) and self.rc[blocks[-1]] > 1
        if new_pages + cow > len(self.free):
            return _core.CacheFullError
        fresh = self.alloc(new_pages + cow)
        blocks = list(blocks)
        if cow:
            old = blocks.pop()
            new = fresh.pop(0)
            self.pages[new] = self.pages[old]
            self.release([old])
            blocks.append(new)
        blocks += fresh
        for i in range(n):
            p = n0 + i
            self.write(blocks[p // BS], p % BS, codes[i], scales[i])
        self.seqs[sid] = (blocks, n0 + n)
        return None


def _bad_int() -> st.SearchStrategy[Any]:
    return st.sampled_from([1.5, True, None, "1", 2**70, -(2**70), [1]])


def _bad_array(good: np.ndarray) -> st.SearchStrategy[Any]:
    """Variants of `good` that the core must refuse, whatever its size."""
    options: list[Callable[[np.ndarray], Any]] = [
        lambda a: a.tolist(),
        lambda a: a.astype(np.float64 if a.dtype != np.float64 else np.float32),
        lambda a: a.astype(object),
        lambda a: a[None],
        lambda a: np.asarray(0, a.dtype),
        lambda a: swapped(a) if a.dtype.itemsize > 1 else a.astype(np.int64),
    ]
    return st.sampled_from(options).map(lambda f: f(good))


class CoreFuzz(RuleBasedStateMachine):
    """Random operations, malformed arguments mixed in, on the raw `_core` API. Every call succeeds or raises
    an ordinary Exception (never a BaseException-only one); a refused call changes nothing; after each step
    the cache (page bytes, lengths, tables, refcounts, free count), the paged cache's bytes and the pool
    equal the model's."""

    @initialize()
    def setup(self) -> None:
        self.cache = _core.IndexerKeyCache(12, BS, D)
        self.model = Model(12)
        self.paged = _core.IndexerKeyCache(3, BS, D)
        self.paged_bytes = np.zeros((3, BS * (D + 4)), np.uint8)
        self.pool = _core.BlockPool(6)
        self.prc = [0] * 6
        self.pfree = list(range(6))[::-1]
        for sid, n in ((0, 20), (1, 5)):  # a start with sequences (partial pages), so every rule has work
            self.cache.add_sequence(sid)
            self.model.seqs[sid] = ([], 0)
            codes, scales = _core.fp8_quantize_rows(keys(n, seed=sid))
            self.cache.append_quantized(sid, codes, scales)
            assert self.model.append(sid, codes, scales) is None

    def call(self, f: Callable[[], Any], expect: type[Exception] | None | str) -> Any:
        """Run `f`; `expect`: None (must succeed), an Exception type (must raise it), "any" (must raise)."""
        try:
            out = f()
        except Exception as e:
            assert expect is not None, f"unexpected {type(e).__name__}: {e}"
            if isinstance(expect, type):
                assert isinstance(e, expect), f"{type(e).__name__}: {e}, expected {expect.__name__}"
            assert re.match(r"^'?[\w, \[\]]+: ", str(e)), f"message does not name the argument: {e}"
            return e
        except BaseException as e:  # PanicException, say
            raise AssertionError(f"{type(e).__name__} is not an ordinary Exception: {e}") from e
        assert expect is None, f"expected {expect} but the call returned {out!r}"
        return out

    # --- the cache's sequence API
    def sid(self, data: st.DataObject, known: float = 0.8) -> int:
        """A sequence id: mostly a live one (when there is one), else any small id."""
        ids = sorted(self.model.seqs)
        if ids and data.draw(st.floats(0, 1)) < known:
            return data.draw(st.sampled_from(ids))
        return data.draw(st.integers(0, 6))

    @rule(data=st.data(), bad=st.sampled_from([None] * 4 + [1.5, True, None, "1", 2**70, -(2**70), [1]]))
    def add_sequence(self, data: st.DataObject, bad: Any) -> None:
        if bad is not None:
            self.call(lambda: self.cache.add_sequence(bad), "any")
            return
        sid = self.sid(data, known=0.2)
        err = ValueError if sid in self.model.seqs else None
        self.call(lambda: self.cache.add_sequence(sid), err)
        if err is None:
            self.model.seqs[sid] = ([], 0)

    BAD_APPENDS = [None] * 10 + ["nan_code", "zero_scale", "inf_key", "codes", "scales", "sid"]

    @rule(data=st.data(), n=st.integers(0, 24), seed=st.integers(0, 2**16), quantized=st.booleans(),
          bad=st.sampled_from(BAD_APPENDS))  # fmt: skip
    def append(self, data: st.DataObject, n: int, seed: int, quantized: bool, bad: str | None) -> None:
        sid = self.sid(data)
        rng = np.random.default_rng(seed)
        k = rng.standard_normal((n, D)).astype(np.float32)
        codes, scales = _core.fp8_quantize_rows(k)
        if bad is None:
            # The model decides (and, on success, takes the step itself; on refusal it is untouched).
            err = self.model.append(sid, codes, scales)
            if quantized:
                self.call(lambda: self.cache.append_quantized(sid, codes, scales), err)
            else:
                self.call(lambda: self.cache.append(sid, k), err)
            return
        if n == 0 and bad in ("nan_code", "zero_scale", "inf_key"):
            return
        if bad == "nan_code":
            codes = codes.copy()
            codes[n // 2, 3] = 0xFF
            self.call(lambda: self.cache.append_quantized(sid, codes, scales), "any")
        elif bad == "zero_scale":
            scales = scales.copy()
            scales[-1] = 0.0
            self.call(lambda: self.cache.append_quantized(sid, codes, scales), "any")
        elif bad == "inf_key":
            k[-1, 0] = np.inf
            self.call(lambda: self.cache.append(sid, k), "any")
        elif bad == "codes":
            for v in (codes.tolist(), codes.astype(np.int64), codes[None], codes.astype(object)):
                self.call(lambda v=v: self.cache.append_quantized(sid, v, scales), "any")
        elif bad == "scales":
            for v in (scales.tolist(), scales.astype(np.float64), swapped(scales), scales[None]):
                self.call(lambda v=v: self.cache.append_quantized(sid, codes, v), "any")
        else:
            self.call(lambda: self.cache.append(2**70, k), KeyError)

    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        m = self.model
        parent = self.sid(data)
        child = self.sid(data, known=0.1) if data.draw(st.booleans()) else data.draw(st.integers(0, 12))
        err = KeyError if parent not in m.seqs else ValueError if child in m.seqs else None
        self.call(lambda: self.cache.fork(parent, child), err)
        if err is None:
            blocks, n = m.seqs[parent]
            for b in blocks:
                m.rc[b] += 1
            m.seqs[child] = (list(blocks), n)

    @rule(data=st.data(), bad=st.sampled_from([None] * 6 + [1.5, True, None, "1", 2**70, -(2**70), [1], -1]))
    def truncate(self, data: st.DataObject, bad: Any) -> None:
        m = self.model
        sid = self.sid(data)
        length = m.seqs[sid][1] if sid in m.seqs else 0
        n = data.draw(st.integers(0, length + 2)) if bad is None else bad
        if not isinstance(n, int) or isinstance(n, bool):
            self.call(lambda: self.cache.truncate(sid, n), TypeError)
            return
        # `n` is converted (and a negative one refused) before the sequence is looked up.
        err = ValueError if n < 0 else KeyError if sid not in m.seqs else ValueError if n > length else None
        self.call(lambda: self.cache.truncate(sid, n), err)
        if err is None:
            blocks, _ = m.seqs[sid]
            keep = -(-n // BS)
            m.release(blocks[keep:][::-1])
            m.seqs[sid] = (blocks[:keep], n)

    @rule(data=st.data(), huge=st.sampled_from([None] * 8 + [2**64, -(2**70)]))
    def free(self, data: st.DataObject, huge: int | None) -> None:
        m = self.model
        sid = self.sid(data, known=0.6) if huge is None else huge
        err = KeyError if sid not in m.seqs else None
        self.call(lambda: self.cache.free(sid), err)
        if err is None:
            blocks, _ = m.seqs.pop(sid)
            m.release(blocks[::-1])

    @rule(data=st.data())
    def reads(self, data: st.DataObject) -> None:
        """gather / dequantize / select / scores with random, sometimes malformed, arguments."""
        m = self.model
        sid = self.sid(data)
        known = sid in m.seqs and m.seqs[sid][1] > 0
        n = m.seqs[sid][1] if sid in m.seqs else 0
        pos = np.array(data.draw(st.lists(st.integers(-1, max(n, 1)), min_size=0, max_size=5)), np.int64)
        ok = sid in m.seqs and all(0 <= p < n for p in pos)
        out = self.call(
            lambda: self.cache.gather(sid, pos), None if ok else (KeyError if sid not in m.seqs else IndexError)
        )
        if ok:
            codes, scales = out
            blocks = m.seqs[sid][0]
            for i, p in enumerate(pos):
                page = m.pages[blocks[p // BS]]
                np.testing.assert_array_equal(codes[i], page[(p % BS) * D : (p % BS + 1) * D])
        if sid in m.seqs:
            deq = self.call(lambda: self.cache.dequantize(sid), None)
            assert deq.shape == (n, D)
        heads = data.draw(st.integers(1, 3))
        k = data.draw(st.integers(1, 40) | _bad_int())
        q = np.random.default_rng(n).standard_normal((1, heads, D)).astype(np.float32)
        w = np.ones((1, heads), np.float32)
        p = np.array([data.draw(st.integers(-1, n))], np.int64)
        bad = data.draw(st.sampled_from([None] * 4 + ["q", "w", "p", "threads", "flag"]))
        args: dict[str, Any] = dict(q=q, w=w, p=p, threads=None, flag=False)
        if bad == "q":
            args["q"] = data.draw(_bad_array(q))
        elif bad == "w":
            args["w"] = data.draw(_bad_array(w))
        elif bad == "p":
            args["p"] = data.draw(_bad_array(p))
        elif bad == "threads":
            args["threads"] = data.draw(_bad_int().filter(lambda v: v is not None) | st.sampled_from([0, -1, 1025]))
        elif bad == "flag":
            args["flag"] = data.draw(st.sampled_from([1, "yes", None, 0.0]).filter(lambda v: v is not None))
        valid_k = isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 2**31 - 1
        expect: Any = None if bad is None and known and 0 <= p[0] < n and valid_k else "any"
        sel = self.call(lambda: self.cache.select(np.array([sid]), args["q"], args["w"], args["p"], k,
                                                  sorted=args["flag"], threads=args["threads"]), expect)  # fmt: skip
        if expect is None:
            assert sel.shape == (1, k) and sel.dtype == np.int32
            got = sel[0][sel[0] >= 0]
            assert len(got) == min(k, int(p[0]) + 1) and got.max() <= p[0]
        expect = None if bad in (None, "flag") and known and 0 <= p[0] < n else "any"
        sc = self.call(lambda: self.cache.scores(np.array([sid]), args["q"], args["w"], args["p"],
                                                 threads=args["threads"]), expect)  # fmt: skip
        if expect is None:
            assert sc.shape == (1, int(p[0]) + 1)

    # --- the paged cache (no sequences): write_slots and copy_block against a byte model
    @rule(slots=st.lists(st.integers(-3, 50), min_size=0, max_size=6), seed=st.integers(0, 2**16),
          bad=st.sampled_from([None, None, None, "nan", "scale", "slots"]))  # fmt: skip
    def write_slots(self, slots: list[int], seed: int, bad: str | None) -> None:
        rng = np.random.default_rng(seed)
        n = len(slots)
        codes = rng.integers(0, 0x7E, (n, D), dtype=np.uint8)
        scales = rng.uniform(0.1, 2.0, n).astype(np.float32)
        s = np.array(slots, np.int32)
        if bad == "nan" and n:
            codes[0, 0] = 0x7F
        if bad == "scale" and n:
            scales[0] = -np.inf
        if bad == "slots":
            for v in (s.astype(np.int64), s.tolist(), s[None], swapped(s)):
                self.call(lambda v=v: self.paged.write_slots(v, codes, scales), "any")
            return
        live = [(i, v) for i, v in enumerate(slots) if v != -1]
        refused = any(not 0 <= v < 48 for _, v in live) or any(
            (bad == "nan" or bad == "scale") and i == 0 for i, _ in live
        )
        self.call(lambda: self.paged.write_slots(s, codes, scales), "any" if refused else None)
        if not refused:
            for i, v in live:
                b, off = divmod(v, BS)
                self.paged_bytes[b, off * D : (off + 1) * D] = codes[i]
                self.paged_bytes[b, BS * D + 4 * off : BS * D + 4 * off + 4] = np.frombuffer(
                    scales[i].tobytes(), np.uint8
                )

    @rule(src=st.integers(0, 2) | st.integers(-1, 3) | _bad_int(), dst=st.integers(0, 2) | st.integers(-1, 3))
    def copy_block(self, src: Any, dst: int) -> None:
        valid = isinstance(src, int) and not isinstance(src, bool) and 0 <= src < 3 and 0 <= dst < 3
        self.call(lambda: self.paged.copy_block(src, dst), None if valid else "any")
        if valid:
            self.paged_bytes[dst] = self.paged_bytes[src]

    # --- the pool
    @rule(n=st.integers(-1, 7) | _bad_int())
    def pool_allocate(self, n: Any) -> None:
        if not isinstance(n, int) or isinstance(n, bool):
            self.call(lambda: self.pool.allocate(n), TypeError)
            return
        err = ValueError if n < 0 else _core.CacheFullError if n > len(self.pfree) else None
        got = self.call(lambda: self.pool.allocate(n), err)
        if err is None:
            want = self.pfree[len(self.pfree) - n :][::-1]
            del self.pfree[len(self.pfree) - n :]
            for b in want:
                self.prc[b] = 1
            assert got.tolist() == want

    @rule(data=st.data(), release=st.booleans())
    def pool_retain_release(self, data: st.DataObject, release: bool) -> None:
        held = [b for b in range(6) if self.prc[b] > 0]
        kind = data.draw(st.sampled_from(["held"] * 6 + ["any", "bad"]))
        if kind == "held" and held:
            blocks: Any = data.draw(st.lists(st.sampled_from(held), max_size=3))
        elif kind == "bad":
            blocks = data.draw(st.sampled_from([[0.0], [True], "0", None, [[0]], [2**70], np.array([1.5])]))
        else:
            blocks = data.draw(st.lists(st.integers(-1, 6), max_size=4))
        f = self.pool.release if release else self.pool.retain
        if not (isinstance(blocks, list) and all(type(b) is int for b in blocks)):
            self.call(lambda: f(blocks), TypeError)
            return
        if any(abs(b) > 2**63 for b in blocks):
            self.call(lambda: f(blocks), IndexError)
            return
        if any(not 0 <= b < 6 for b in blocks):
            self.call(lambda: f(blocks), IndexError)
            return
        rc, free = list(self.prc), list(self.pfree)
        ok = True
        for b in reversed(blocks) if release else blocks:
            if rc[b] == 0:
                ok = False
                break
            if release:
                rc[b] -= 1
                if rc[b] == 0:
                    free.append(b)
            else:
                pass
        if ok and not release:
            for b in blocks:
                rc[b] += 1
        self.call(lambda: f(blocks), None if ok else ValueError)
        if ok:
            self.prc, self.pfree = rc, free

    @invariant()
    def state_matches_the_model(self) -> None:
        if not hasattr(self, "model"):
            return
        m = self.model
        assert sorted(self.cache.sequence_ids()) == sorted(m.seqs)
        for sid, (blocks, n) in m.seqs.items():
            assert self.cache.length(sid) == n
            assert self.cache.block_table(sid).tolist() == blocks
        assert [self.cache.block_refcount(b) for b in range(self.cache.num_blocks)] == m.rc
        assert self.cache.num_free_blocks == len(m.free)
        # Bytes of pages some sequence holds (freed pages keep stale bytes in both).
        np.testing.assert_array_equal(self.cache.pages(), m.pages)
        np.testing.assert_array_equal(self.paged.pages(), self.paged_bytes)
        assert self.pool.refcounts().tolist() == self.prc
        assert self.pool.free_blocks().tolist() == self.pfree[::-1]


CoreFuzz.TestCase.settings = settings(
    max_examples=int(os.environ.get("DSA_FUZZ_EXAMPLES", "200")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_core_fuzz = CoreFuzz.TestCase
