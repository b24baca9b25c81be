"""The Pallas TPU indexer scoring kernel (`ops.tpu.indexer`) in TPU interpret mode, against the XLA path and
the host `IndexerKeyCache.select` on the same FP8 pages."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import dsa_hybrid as dh
from dsa_hybrid.ops.indexer import IndexerPages, select_topk_device


@pytest.mark.parametrize("quantize_queries", [True, False])
def test_pallas_kernel_in_interpret_mode_matches_the_xla_path(quantize_queries: bool) -> None:
    """The scoring kernel (FP8 pages DMA'd through VMEM) under the TPU interpreter: race detection on,
    uninitialised memory NaN. Ragged rows, a padded block table, several chunks."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpret_state
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(7)
    cache = dh.IndexerKeyCache(num_blocks=14, block_size=16, head_dim=32)
    for sid, n in ((0, 150), (1, 40)):
        cache.add_sequence(sid)
        cache.append(sid, rng.standard_normal((n, 32)).astype(np.float32))
    dev = IndexerPages.from_host_pages(cache.pages(), 16, 32)
    seq = np.array([0, 1, 0])
    tables = np.full((3, 10), -1, np.int32)
    for i, s in enumerate(seq):
        t = cache.block_table(int(s))
        tables[i, : t.size] = t
    pos = jnp.array([149, 39, 70], jnp.int32)
    q = jnp.asarray(rng.standard_normal((3, 4, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 4)) / 2, jnp.float32)
    args = (q, w, dev, jnp.asarray(tables), pos, 24)
    strict = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    try:
        got = select_topk_device(
            *args, quantize_queries=quantize_queries, key_chunk=48, backend="pallas_tpu", interpret=strict
        )
        assert interpret_state.races is not None and not interpret_state.races.races_found
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    want = select_topk_device(*args, quantize_queries=quantize_queries, key_chunk=48)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    host = cache.select(seq, np.asarray(q), np.asarray(w), np.asarray(pos), 24, quantize_queries=quantize_queries)
    np.testing.assert_array_equal(np.asarray(got), host)


def _strict():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")


@pytest.mark.parametrize("k", [1, 7, 64, 200])
def test_radix_threshold_selects_exactly_the_oracle_set_with_ties(k: int) -> None:
    """The Pallas top-k threshold (interpret mode) against `reference.select_topk`: many exact ties
    (scores drawn from a handful of values, ±0.0 mixed), −inf entries, negative scores, k = N."""
    from jax.experimental.pallas import tpu as pltpu

    from dsa_hybrid import reference as ref
    from dsa_hybrid.ops.tpu.topk import select_mask, topk_threshold

    rng = np.random.default_rng(k)
    T, N = 11, 200
    vals = rng.choice(np.array([-3.5, -1.0, -0.0, 0.0, 0.25, 2.0, 1e30, -1e-30], np.float32), (T, N))
    vals[3] = rng.standard_normal(N).astype(np.float32)  # a row without ties
    vals[4, 50:] = -np.inf  # fewer finite entries than k for large k
    vals[5] = -np.inf  # nothing finite
    try:
        thr = topk_threshold(jnp.asarray(vals), k, rows_per_step=8, interpret=_strict())
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    keep = np.asarray(select_mask(jnp.asarray(vals), thr))
    finite = np.isfinite(vals)
    want = ref.select_topk(np.where(finite, vals.astype(np.float64), -1e300), np.full(T, N - 1), k)
    for t in range(T):
        got_set = set(np.nonzero(keep[t])[0].tolist())
        want_set = {int(p) for p in want[t] if p >= 0 and finite[t, p]}
        assert got_set == want_set, t


def test_pallas_indexer_under_hypothesis_matches_host_and_oracle() -> None:
    """Random caches (forks, truncations, duplicated keys: exact ties) through the Pallas scoring and the
    Pallas top-k: the same sets as the host `IndexerKeyCache.select` and the FP8 oracle, up to
    accumulation-order near-ties; positions ascending, −1 last."""
    from hypothesis import given, settings
    from indexer_problems import oracle_scores, problems, tie_atol
    from jax.experimental.pallas import tpu as pltpu

    from dsa_hybrid import reference as ref
    from dsa_hybrid.testing import assert_topk_equal

    @settings(max_examples=6, deadline=None)
    @given(problems())
    def check(p) -> None:
        dev = IndexerPages.from_host_pages(p.cache.pages(), p.cache.block_size, p.cache.head_dim)
        tabs = [p.cache.block_table(int(s)) for s in p.seq_ids]
        tables = np.full((len(tabs), max(t.size for t in tabs)), -1, np.int32)
        for i, t in enumerate(tabs):
            tables[i, : t.size] = t
        try:
            got = np.asarray(
                select_topk_device(
                    jnp.asarray(p.q), jnp.asarray(p.w), dev, jnp.asarray(tables),
                    jnp.asarray(p.positions.astype(np.int32)), p.k, key_chunk=128, backend="pallas_tpu",
                    interpret=pltpu.InterpretParams(),
                )
            )  # fmt: skip
        finally:
            pltpu.reset_tpu_interpret_mode_state()
        scores = oracle_scores(p, quantized=True)
        want = ref.select_topk(np.where(np.isfinite(scores), scores, -1e300), p.positions, p.k)
        assert_topk_equal(got, want, scores, tie_atol=tie_atol(scores))
        assert_topk_equal(got, p.cache.select(p.seq_ids, p.q, p.w, p.positions, p.k), scores, tie_atol=tie_atol(scores))
        for row in got:
            sel = row[row >= 0]
            assert np.all(np.diff(sel) > 0) and np.all(row[sel.size :] == -1)

    check()
