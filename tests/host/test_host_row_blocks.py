"""Issue 17, row blocking: a prefill chunk's rows read the same pages (one block table, rising positions) and
are scored together, each page decoded once for a block of rows. On every SIMD path and thread count,
`select_paged` / `scores_paged` / `select` of such a batch (mixed with rows of other requests) equal what each
row gets alone, one call per row."""

from __future__ import annotations

import numpy as np
import pytest
from test_host_topk import SIMD_PATHS

import dsa_hybrid as dh


def _batch(seed: int, heads: int, d: int) -> tuple[dh.IndexerKeyCache, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A cache of two requests (one forked from the other) and a prefill-like batch over them: `seq_ids`,
    `positions`, queries `[T, heads, d]` and weights `[T, heads]`."""
    rng = np.random.default_rng(seed)
    cache = dh.IndexerKeyCache(num_blocks=64, block_size=16, head_dim=d)
    cache.add_sequence(0)
    cache.append(0, rng.standard_normal((200, d)).astype(np.float32))
    cache.fork(0, 1)
    cache.append(1, rng.standard_normal((37, d)).astype(np.float32))
    chunk = list(range(150, 200))  # a prefill chunk of request 0
    other = [236, 5, 199, 120]  # request 1: past the fork, before it, at its edge
    seq_ids = np.array([0] * len(chunk) + [1] * len(other) + [0, 0], np.int64)
    positions = np.array(chunk + other + [3, 199], np.int64)
    t = len(seq_ids)
    q = rng.standard_normal((t, heads, d)).astype(np.float32)
    w = rng.standard_normal((t, heads)).astype(np.float32)
    return cache, seq_ids, positions, q, w


def _tables(cache: dh.IndexerKeyCache, seq_ids: np.ndarray) -> np.ndarray:
    tabs = [cache.block_table(int(s)) for s in seq_ids]
    out = np.full((len(tabs), max(len(x) for x in tabs)), -1, np.int32)
    for row, tab in zip(out, tabs, strict=True):
        row[: len(tab)] = tab
    return out


@pytest.mark.parametrize("simd_path", SIMD_PATHS)
@pytest.mark.parametrize("heads,d", [(16, 64), (5, 32)])
def test_rows_sharing_pages_select_and_score_as_each_row_alone(simd_path: str, heads: int, d: int) -> None:
    dh.set_simd_path(simd_path)
    try:
        _check(heads, d, simd_path)
    finally:
        dh.set_simd_path(None)


def _check(heads: int, d: int, simd_path: str) -> None:
    cache, seq_ids, positions, q, w = _batch(heads * d, heads, d)
    tables = _tables(cache, seq_ids)
    k = 24
    alone = [
        cache.scores_paged(tables[r : r + 1], positions[r : r + 1], q[r : r + 1], w[r : r + 1], threads=1)[0]
        for r in range(len(seq_ids))
    ]
    alone_sel = np.concatenate(
        [
            cache.select_paged(tables[r : r + 1], positions[r : r + 1], q[r : r + 1], w[r : r + 1], k, threads=1)
            for r in range(len(seq_ids))
        ]
    )
    for threads in (1, 2):
        got = cache.scores_paged(tables, positions, q, w, threads=threads)
        for r, a in enumerate(alone):
            np.testing.assert_array_equal(got[r, : len(a)], a, err_msg=f"{simd_path} threads={threads} row {r}")
            assert np.all(got[r, len(a) :] == -np.inf)
        sel = cache.select_paged(tables, positions, q, w, k, threads=threads)
        np.testing.assert_array_equal(sel, alone_sel, err_msg=f"{simd_path} threads={threads}")
        np.testing.assert_array_equal(cache.select(seq_ids, q, w, positions, k, threads=threads), alone_sel)
    # Each chunk row selects k of the keys it sees.
    assert (alone_sel[:50] >= 0).all() and (alone_sel[:50] <= positions[:50, None]).all()
