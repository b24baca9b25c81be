"""`ops.target`: backend "auto" follows the target device (the arguments' devices when concrete, else the
mesh / default device), not the process's backend. TPU targets are covered ahead of time in
tests/tpu/test_aot_compile.py (every kernel there is compiled through "auto")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dsa_hybrid import ops
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import sparse_mla


def test_a_cpu_target_resolves_to_xla() -> None:
    cpu = jax.devices("cpu")[0]
    assert not ops.target_is_tpu() and ops.tpu_chip() is None
    assert not ops.target_is_tpu(jax.device_put(jnp.ones(2), cpu))
    with jax.default_device(cpu):
        assert ops.target_device() == cpu and ops.resolve_backend("auto") == "xla"
    assert ops.resolve_backend("xla") == "xla"
    assert ops.resolve_backend("pallas_tpu", interpret=True) == "pallas_tpu"
    with pytest.raises(RuntimeError, match="needs a TPU"):
        ops.resolve_backend("pallas_tpu")
    with pytest.raises(ValueError, match="backend: expected"):
        ops.resolve_backend("gpu")


def test_auto_under_jit_on_cpu_takes_the_xla_path() -> None:
    cache = LatentCache.create(2, 16, kind="fp8")
    q = jnp.ones((1, 2, 576), jnp.float32) / 24
    slots = jnp.arange(8, dtype=jnp.int32)[None]
    text = jax.jit(lambda q, c, s: sparse_mla(q, c, s, scale=0.1)).lower(q, cache, slots).as_text()
    assert "tpu_custom_call" not in text and "pallas" not in text
