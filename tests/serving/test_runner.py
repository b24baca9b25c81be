"""`serving.runner.table_width`: the block-table widths a step is padded to (8 per octave, no
power-of-two staircase), and that a wider table changes no selection of the device indexer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid.ops.indexer import IndexerPages, select_topk_device
from dsa_hybrid.serving.runner import WIDTHS_PER_OCTAVE, table_width


def test_widths_pad_little_and_stay_few() -> None:
    widths = [table_width(p, 1 << 20) for p in range(1, 5000)]
    for p, w in zip(range(1, 5000), widths, strict=True):
        assert w >= p and (w - p) / w < 1 / WIDTHS_PER_OCTAVE
    assert widths == sorted(widths)  # a longer table never gets a narrower width
    for n in range(4, 12):  # at most 8 widths in each octave (2^n, 2^(n+1)]
        assert len({w for p, w in zip(range(1, 5000), widths, strict=True) if 2**n < p <= 2 ** (n + 1)}) <= 8
    assert table_width(33 * 16, 1 << 20) == 576  # 33K tokens of 64-token pages: 576 pages, not 1024


def test_widths_respect_the_limit() -> None:
    assert table_width(513, 520) == 520
    assert table_width(512, 512) == 512
    assert table_width(600, 512) == 600  # never below the table itself
    with pytest.raises(ValueError, match="pages: must be >= 1"):
        table_width(0, 10)


def test_a_wider_table_selects_the_same() -> None:
    """The padded columns are −1: the device indexer's selection is identical, bit for bit."""
    rng = np.random.default_rng(0)
    P, S, D = 12, 16, 32
    codes = rng.integers(0, 0x7E, (P, S, D)).astype(np.uint8)  # finite e4m3 codes
    pages = IndexerPages(jnp.asarray(codes), jnp.asarray(np.abs(rng.standard_normal((P, 1, S))), jnp.float32))
    q = jnp.asarray(rng.standard_normal((3, 4, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    table = rng.permutation(P)[:7].astype(np.int32)
    pos = jnp.array([111, 50, 3], jnp.int32)
    base = select_topk_device(q, w, pages, jnp.asarray(np.tile(table, (3, 1))), pos, 20, key_chunk=32)
    wide = np.pad(np.tile(table, (3, 1)), ((0, 0), (0, table_width(7, 64) + 5 - 7)), constant_values=-1)
    got = select_topk_device(q, w, pages, jnp.asarray(wide), pos, 20, key_chunk=32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base))
