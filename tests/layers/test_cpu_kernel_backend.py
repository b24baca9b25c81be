"""`dsa_attention(..., backend=...)` on a CPU with a float32 latent cache: "cpu_kernel" (the Rust kernels as
XLA custom calls) and "auto" (which picks them there) give the XLA path's output and the same top-k (the
indexer's Rust kernel sums in another order than XLA's einsum; on this problem no near-tie tells them
apart, `tests/ops/test_xla_ffi_indexer.py` checks it against the host bit for bit)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention

S = 16


@pytest.mark.parametrize("backend", ["cpu_kernel", "auto"])
def test_the_layer_attends_with_the_cpu_kernel_like_xla(backend: str) -> None:
    cfg = DSAConfig.tiny()
    p = DSAParams.random(cfg, seed=1)
    L = 2 * cfg.index_topk + 3  # rows past index_topk select a strict subset
    x = jnp.asarray(np.random.default_rng(2).standard_normal((L, cfg.hidden_size)), jnp.float32)
    pos = jnp.arange(L, dtype=jnp.int32)
    tables = jnp.tile(jnp.arange(-(-L // S), dtype=jnp.int32), (L, 1))
    run = jax.jit(lambda x, c, b=backend: dsa_attention(p, cfg, x, pos, pos, tables, c, backend=b))
    ref = jax.jit(lambda x, c: dsa_attention(p, cfg, x, pos, pos, tables, c, backend="xla"))
    out, _, topk = run(x, DSACaches.create(cfg, -(-L // S), S, latent_kind="f32"))
    want, _, want_topk = ref(x, DSACaches.create(cfg, -(-L // S), S, latent_kind="f32"))
    np.testing.assert_array_equal(np.asarray(topk), np.asarray(want_topk))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=2e-5, atol=2e-6)
    hlo = run.lower(x, DSACaches.create(cfg, -(-L // S), S, latent_kind="f32")).as_text()
    assert "dsa_hybrid_sparse_mla_f32" in hlo  # the custom call, not the gather + einsum
