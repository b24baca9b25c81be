"""Random sparse-MLA problems shared by the XLA-path and Pallas-kernel tests: latent caches (bf16 / FP8) holding
given rows, and `testing.mla_problems` padded to a few fixed sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from dsa_hybrid import testing
from dsa_hybrid.ops.latent_cache import LatentCache

# Problems are padded to these sizes so that jit compiles a handful of shapes, not one per example.
T_MAX, K_MAX, SLOTS = 5, 48, 96


def cache_from_kv(kv: np.ndarray, d_v: int, page_size: int, kind: str) -> tuple[LatentCache, np.ndarray]:
    """A cache holding `kv`'s rows in slots 0..N-1, and the rows as the cache stores them (float64)."""
    N, D = kv.shape
    n = max(N, SLOTS)  # fixed sizes (zero rows past N) keep the compiled shapes few
    kv = np.concatenate([kv, np.zeros((n - N, D), kv.dtype)])
    cache = LatentCache.create(-(-n // page_size), page_size, kind=kind, latent_dim=d_v, rope_dim=D - d_v)
    cache = _write(cache, jnp.arange(n), jnp.asarray(kv[:, :d_v]), jnp.asarray(kv[:, d_v:]))
    return cache, np.asarray(cache.rows(jnp.arange(n)), np.float64)[:N]


_write = jax.jit(LatentCache.write)


@st.composite
def problems(draw: st.DrawFn):
    kind = draw(st.sampled_from(["bf16", "fp8"]))
    widths = ((16, 8), (32, 16), (64, 64)) if kind == "bf16" else ((128, 64), (128, 16))
    p = draw(testing.mla_problems(widths=widths, max_slots=SLOTS, max_tokens=T_MAX, max_topk=K_MAX, heads=(1, 4, 16)))
    page_size = draw(st.sampled_from([8, 32]))
    return p, kind, page_size
