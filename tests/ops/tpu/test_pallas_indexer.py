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
