"""The resident weight formats (`layers.weights`): FP8 128 × 128 block quantization as DeepSeek's
checkpoints make it, its dequantization in JAX (inside jit, ragged edge blocks, stacked experts) equal to
the float64 product `codes · scale`, `linear` on bf16 / FP8 weights equal to float32 math on their values,
and `DSAParams.from_state_dict(weights="checkpoint")` keeping the formats (bad scales named)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid.layers.dsa_attention import HF_NAMES, DSAParams
from dsa_hybrid.layers.weights import (
    Fp8Weight,
    dense,
    dequantize_fp8,
    dequantize_fp8_blocks,
    linear,
    quantize_fp8_blocks,
    tree_nbytes,
)


def test_fp8_blocks_quantize_and_dequantize_exactly() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 200, 300)).astype(np.float32) * np.logspace(-3, 1, 300, dtype=np.float32)
    codes, scale = quantize_fp8_blocks(w)
    assert codes.dtype == ml_dtypes.float8_e4m3fn and scale.shape == (3, 2, 3)  # ragged: 200 = 128 + 72
    # Each block's largest magnitude lands on 448 (the e4m3fn maximum); the rest within e4m3 rounding.
    blocks = np.abs(codes.astype(np.float32)[0, :128, :128])
    assert blocks.max() == 448.0
    exact = codes.astype(np.float64) * np.repeat(np.repeat(scale.astype(np.float64), 128, -2), 128, -1)[..., :200, :300]
    np.testing.assert_array_equal(dequantize_fp8_blocks(codes, scale), exact.astype(np.float32))
    big = np.abs(w) > 0.05 * np.abs(w).max()
    assert np.all(np.abs(exact - w)[big] <= 2.0**-4 * np.abs(w)[big])
    got = jax.jit(dequantize_fp8)(jnp.asarray(codes), jnp.asarray(scale))
    np.testing.assert_array_equal(np.asarray(got), exact.astype(np.float32))


def test_linear_on_bf16_and_fp8_is_float32_math_on_their_values() -> None:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, 260)), jnp.float32)
    w = rng.standard_normal((130, 260)).astype(np.float32)
    codes, scale = quantize_fp8_blocks(w)
    fp8 = Fp8Weight(jnp.asarray(codes), jnp.asarray(scale))
    bf16 = jnp.asarray(w, jnp.bfloat16)
    f = jax.jit(linear)
    np.testing.assert_allclose(np.asarray(f(x, fp8)), np.asarray(f(x, dense(fp8))), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(f(x, bf16)), np.asarray(f(x, bf16.astype(jnp.float32))), rtol=1e-6, atol=1e-6)
    assert fp8.nbytes == 130 * 260 + 2 * 3 * 4 and tree_nbytes({"a": fp8, "b": fp8}) == fp8.nbytes
    # A pytree: maps and jit see two leaves; the constructor checks nothing, `checked` does.
    assert [leaf.shape for leaf in jax.tree.leaves(jax.tree.map(jnp.sum, fp8))] == [(), ()]
    with pytest.raises(ValueError, match=r"scale_inv: expected shape \[2, 3\]"):
        Fp8Weight.checked(fp8.codes, jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="must both be"):
        Fp8Weight.checked(jnp.ones(4), jnp.ones(1))


def test_state_dict_in_checkpoint_format_stays_resident() -> None:
    cfg = DSAConfig.tiny("deepseek_v32")
    ref = DSAParams.random(cfg, 0)
    prefix = "model.layers.0.self_attn."
    tensors: dict = {}
    for name, hf in HF_NAMES.items():
        v = np.asarray(getattr(ref, name))
        if name == "q_b":
            c, s = quantize_fp8_blocks(v)
            tensors[prefix + hf] = Fp8Weight(c, s)  # type: ignore[arg-type]
        else:
            tensors[prefix + hf] = v.astype(ml_dtypes.bfloat16)
    kept = DSAParams.from_state_dict(tensors, cfg, 0, weights="checkpoint")
    assert isinstance(kept.q_b, Fp8Weight) and kept.o.dtype == jnp.bfloat16 and kept.q_a_norm.dtype == jnp.float32
    wide = DSAParams.from_state_dict(tensors, cfg, 0)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(wide))
    np.testing.assert_array_equal(np.asarray(wide.q_b), np.asarray(dense(kept.q_b)))
    bad = dict(tensors)
    bad[prefix + "q_b_proj.weight"] = Fp8Weight(tensors[prefix + "q_b_proj.weight"].codes, np.ones((2, 2), np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale_inv: expected shape"):
        DSAParams.from_state_dict(bad, cfg, 0, weights="checkpoint")
    with pytest.raises(ValueError, match="weights: expected 'float32' or 'checkpoint'"):
        DSAParams.from_state_dict(tensors, cfg, 0, weights="fp16")
