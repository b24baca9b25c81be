"""The Pallas TPU indexer path in TPU interpret mode: the scoring kernel (`ops.tpu.indexer`) and the running
top-k merged by the `ops.tpu.topk.topk_select` kernel, against the XLA path and the host
`IndexerKeyCache.select` on the same FP8 pages (the kernel's own oracle tests: `test_pallas_topk.py`)."""

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


def test_pallas_chunk_scan_pads_short_rows_last_without_a_sort() -> None:
    """Rows with fewer visible keys than k across several chunks: the running top-k's unfilled (−inf)
    entries stay leftmost in every `topk_select` merge and end up as the −1 padding after the
    positions; filled rows stay ascending. Against the XLA path and the host, bit for bit."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(2)
    cache = dh.IndexerKeyCache(num_blocks=40, block_size=16, head_dim=32)
    cache.add_sequence(3)
    cache.append(3, rng.standard_normal((600, 32)).astype(np.float32))
    dev = IndexerPages.from_host_pages(cache.pages(), 16, 32)
    q = jnp.asarray(rng.standard_normal((4, 4, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 4)) / 2, jnp.float32)
    pos = jnp.array([599, 30, 0, 300], jnp.int32)
    tables = jnp.asarray(np.tile(cache.block_table(3), (4, 1)))
    try:
        got = np.asarray(
            select_topk_device(
                q, w, dev, tables, pos, 32, key_chunk=128, backend="pallas_tpu", interpret=pltpu.InterpretParams()
            )
        )
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    np.testing.assert_array_equal(got[1], list(range(31)) + [-1])  # 31 visible keys, k = 32
    np.testing.assert_array_equal(got[2], [0] + [-1] * 31)  # a row at position 0 sees one key
    np.testing.assert_array_equal(got, np.asarray(select_topk_device(q, w, dev, tables, pos, 32, key_chunk=128)))
    host = cache.select([3] * 4, np.asarray(q), np.asarray(w), np.asarray(pos), 32)
    np.testing.assert_array_equal(got, host)
    for row in got:
        sel = row[row >= 0]
        assert np.all(np.diff(sel) > 0) and np.all(row[sel.size :] == -1)


def test_pallas_indexer_under_hypothesis_matches_host_and_oracle() -> None:
    """Random caches (forks, truncations, duplicated keys: exact ties) through the Pallas scoring and the
    Pallas top-k: the same sets as the host `IndexerKeyCache.select` and the FP8 oracle, up to
    accumulation-order near-ties; positions ascending, −1 last."""
    from hypothesis import given, settings
    from indexer_problems import oracle_scores, problems, tie_atol
    from jax.experimental.pallas import tpu as pltpu

    from dsa_hybrid import reference as ref
    from dsa_hybrid.testing import assert_topk_equal

    # 4 random caches (was 6): the deterministic tests above pin ragged rows, padded tables, several chunks
    # and short rows; these add forks, truncations and exact ties through both Pallas kernels.
    @settings(max_examples=4, deadline=None)
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
