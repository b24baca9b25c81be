"""The device indexer: FP8 pages on the device, scores and chunked top-k in JAX (dsa.md §4, §5), against the
FP8 oracle and the host `IndexerKeyCache.select` on the same pages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from indexer_problems import Problem, oracle_scores, problems, tie_atol

import dsa_hybrid as dh
from dsa_hybrid import reference as ref
from dsa_hybrid.ops.indexer import IndexerPages, hadamard, quantize_rows, select_topk_device
from dsa_hybrid.testing import assert_topk_equal

_select = jax.jit(select_topk_device, static_argnames=("k", "quantize_queries", "key_chunk"))


def _tables(p: Problem) -> np.ndarray:
    tabs = [p.cache.block_table(int(s)) for s in p.seq_ids]
    out = np.full((len(tabs), max(t.size for t in tabs)), -1, np.int32)
    for i, t in enumerate(tabs):
        out[i, : t.size] = t
    return out


def test_hadamard_and_quantization_follow_the_reference() -> None:
    x = np.random.default_rng(0).standard_normal((50, 128)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(hadamard(jnp.asarray(x))), ref.hadamard(x), rtol=1e-5, atol=1e-6)
    rotated = ref.hadamard(x).astype(np.float32)
    codes, scales = quantize_rows(jnp.asarray(rotated))
    want_codes, want_scales = ref.quantize_fp8(rotated)
    np.testing.assert_array_equal(np.asarray(codes).view(np.uint8), want_codes)
    np.testing.assert_array_equal(np.asarray(scales), want_scales)


def test_pages_move_between_host_and_device_unchanged() -> None:
    rng = np.random.default_rng(1)
    cache = dh.IndexerKeyCache(num_blocks=6, block_size=16, head_dim=32)
    cache.add_sequence(0)
    keys = rng.standard_normal((70, 32)).astype(np.float32)
    cache.append(0, keys)
    dev = IndexerPages.from_host_pages(cache.pages(), page_size=16, head_dim=32)
    np.testing.assert_array_equal(dev.to_host_pages(), cache.pages())
    # Writing on the device gives the host's bytes, but for codes on an f32-vs-f64 rounding boundary.
    table = cache.block_table(0)
    slots = table[np.arange(70) // 16] * 16 + np.arange(70) % 16
    written = IndexerPages.create(6, 16, 32).write(jnp.asarray(slots), jnp.asarray(keys)).to_host_pages()
    host = cache.pages()
    assert np.mean(written == host) > 0.999
    codes_w = written[:, : 16 * 32].reshape(-1).view(np.int8).astype(int)
    codes_h = host[:, : 16 * 32].reshape(-1).view(np.int8).astype(int)
    assert np.abs(codes_w - codes_h).max() <= 1  # one e4m3 step at most (same sign and exponent run)


@settings(max_examples=20)
@given(problems())
def test_device_selection_matches_the_oracle_and_the_host(p: Problem) -> None:
    dev = IndexerPages.from_host_pages(p.cache.pages(), p.cache.block_size, p.cache.head_dim)
    want_scores = oracle_scores(p, quantized=True)
    got = np.asarray(
        _select(
            jnp.asarray(p.q),
            jnp.asarray(p.w),
            dev,
            jnp.asarray(_tables(p)),
            jnp.asarray(p.positions.astype(np.int32)),
            p.k,
            key_chunk=64,
        )
    )
    want = ref.select_topk(np.where(np.isfinite(want_scores), want_scores, -1e300), p.positions, p.k)
    assert_topk_equal(got, want, want_scores, tie_atol=tie_atol(want_scores))
    host = p.cache.select(p.seq_ids, p.q, p.w, p.positions, p.k)
    assert_topk_equal(got, host, want_scores, tie_atol=tie_atol(want_scores))
    # Ascending positions, then −1 padding.
    for row in got:
        sel = row[row >= 0]
        assert np.all(np.diff(sel) > 0) and np.all(row[sel.size :] == -1)


@pytest.mark.parametrize("key_chunk", [16, 100, 4096])
def test_chunking_changes_nothing(key_chunk: int) -> None:
    rng = np.random.default_rng(2)
    cache = dh.IndexerKeyCache(num_blocks=40, block_size=16, head_dim=64)
    cache.add_sequence(3)
    cache.append(3, rng.standard_normal((600, 64)).astype(np.float32))
    dev = IndexerPages.from_host_pages(cache.pages(), 16, 64)
    q = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 8)) / 3, jnp.float32)
    pos = jnp.array([599, 30, 0, 300], jnp.int32)
    tables = jnp.asarray(np.tile(cache.block_table(3), (4, 1)))
    got = _select(q, w, dev, tables, pos, 32, key_chunk=key_chunk)
    base = _select(q, w, dev, tables, pos, 32, key_chunk=600)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base))
    np.testing.assert_array_equal(np.asarray(got)[2], [0] + [-1] * 31)  # a row at position 0 sees one key
    exact = _select(q, w, dev, tables, pos, 32, quantize_queries=False, key_chunk=key_chunk)
    host_exact = cache.select([3] * 4, np.asarray(q), np.asarray(w), np.asarray(pos), 32, quantize_queries=False)
    codes, scales = cache.gather(3, np.arange(600))
    keys = ref.fp8_decode(codes) * scales[:, None]
    scores = ref.indexer_scores(ref.hadamard(np.asarray(q)), np.asarray(w), keys)
    assert_topk_equal(np.asarray(exact), host_exact, scores, tie_atol=1e-5 * np.abs(scores).max())


def test_bad_host_pages() -> None:
    with pytest.raises(ValueError, match=r"pages: expected uint8 \[num_pages, 8448\]"):
        IndexerPages.from_host_pages(np.zeros((2, 100), np.uint8))
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        IndexerPages.create(1, 16, 100)


def test_bad_shapes_get_named_errors() -> None:
    """Wrong shapes and dtypes name the argument, at trace time (so under jit as well)."""
    from dsa_hybrid.ops.indexer import ExactIndexerKeys

    pages = IndexerPages.create(4, 16, 32)
    keys = jnp.zeros((3, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"keys: expected shape \['n', 32\]"):
        pages.write(jnp.arange(3), jnp.zeros((3, 16)))
    with pytest.raises(ValueError, match=r"slots: expected shape \[3\]"):
        pages.write(jnp.arange(4), keys)
    with pytest.raises(TypeError, match="slots: expected integers"):
        ExactIndexerKeys.create(4, 16, 32).write(jnp.zeros(3), keys)
    q, w = jnp.zeros((2, 4, 32)), jnp.zeros((2, 4))
    tables, pos = jnp.zeros((2, 4), jnp.int32), jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match=r"q: expected shape \[T, H, 32\]"):
        select_topk_device(jnp.zeros((2, 4, 16)), w, pages, tables, pos, 8)
    with pytest.raises(ValueError, match=r"weights: expected shape \[2, 4\]"):
        jax.jit(lambda w: select_topk_device(q, w, pages, tables, pos, 8))(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="block_tables"):
        select_topk_device(q, w, pages, jnp.zeros((3, 4), jnp.int32), pos, 8)
    with pytest.raises(TypeError, match="positions: expected integers"):
        select_topk_device(q, w, pages, tables, jnp.zeros(2), 8)
