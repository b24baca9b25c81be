"""`LatentCache`: writes, reads and the dsa.md §6 byte formats, against `reference`'s pack/unpack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsa_hybrid import reference as ref
from dsa_hybrid.ops.latent_cache import LatentCache, quantize_tiles


def _latents(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Rows of very different magnitudes, and one all-zero row (the 1e-4 amax floor).
    c = (rng.standard_normal((n, 512)) * rng.choice([1e-6, 1e-2, 1.0, 300.0], (n, 1))).astype(np.float32)
    c[0] = 0.0
    return c, rng.standard_normal((n, 64)).astype(np.float32)


_quantize = jax.jit(quantize_tiles)


@given(st.integers(0, 2**32 - 1))
def test_quantize_tiles_is_bit_identical_to_the_reference(seed: int) -> None:
    c, _ = _latents(np.random.default_rng(seed), 150)
    codes, scales = _quantize(jnp.asarray(c))
    want_codes, want_scales = ref.quantize_fp8(c, tile=128)
    np.testing.assert_array_equal(np.asarray(codes).view(np.uint8), want_codes)
    np.testing.assert_array_equal(np.asarray(scales), want_scales)


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_write_then_export_equals_the_reference_packing(kind: str) -> None:
    rng = np.random.default_rng(1)
    c, k_pe = _latents(rng, 100)
    cache = LatentCache.create(num_pages=3, page_size=48, kind=kind)
    slots = rng.permutation(cache.num_slots)[:100]
    cache = jax.jit(LatentCache.write)(cache, jnp.asarray(slots), jnp.asarray(c), jnp.asarray(k_pe))
    fp8_rows, bf16_rows = cache.to_flashmla_fp8(), cache.to_bf16_rows()
    if kind == "fp8":
        np.testing.assert_array_equal(fp8_rows[slots], ref.pack_mla_fp8(c, k_pe))
        want = np.concatenate(ref.unpack_mla_fp8(ref.pack_mla_fp8(c, k_pe)), axis=1)
    else:
        np.testing.assert_array_equal(bf16_rows[slots], ref.pack_mla_bf16(c, k_pe))
        want = np.concatenate(ref.unpack_mla_bf16(ref.pack_mla_bf16(c, k_pe)), axis=1)
    np.testing.assert_array_equal(np.asarray(cache.rows(jnp.asarray(slots))), want.astype(np.float32))
    assert cache.bytes_per_token == {"bf16": 1152, "fp8": 656}[kind]


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_byte_formats_round_trip(kind: str) -> None:
    rng = np.random.default_rng(2)
    c, k_pe = _latents(rng, 128)
    fp8_rows, bf16_rows = ref.pack_mla_fp8(c, k_pe), ref.pack_mla_bf16(c, k_pe)
    from_fp8 = LatentCache.from_flashmla_fp8(fp8_rows, page_size=64, kind=kind)
    from_bf16 = LatentCache.from_bf16_rows(bf16_rows, page_size=32, kind=kind)
    assert from_fp8.kind == kind and from_fp8.num_slots == 128 and from_bf16.page_size == 32
    # FP8 rows survive both caches exactly as values (e4m3 × 2^k is exact in bf16). Through a bf16 cache
    # the bytes may differ: a tile whose largest code rounded down to 224 re-encodes at half the scale.
    if kind == "fp8":
        np.testing.assert_array_equal(from_fp8.to_flashmla_fp8(), fp8_rows)
    for got, want in zip(ref.unpack_mla_fp8(from_fp8.to_flashmla_fp8()), ref.unpack_mla_fp8(fp8_rows), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(from_fp8.to_bf16_rows(), ref.pack_mla_bf16(*ref.unpack_mla_fp8(fp8_rows)))
    if kind == "bf16":
        np.testing.assert_array_equal(from_bf16.to_bf16_rows(), bf16_rows)
    else:
        np.testing.assert_array_equal(from_bf16.to_flashmla_fp8(), ref.pack_mla_fp8(*ref.unpack_mla_bf16(bf16_rows)))


def test_invalid_slots_are_skipped_and_the_cache_is_a_pytree() -> None:
    cache = LatentCache.create(2, 16, kind="fp8")
    ones = jnp.ones((3, 512)), jnp.ones((3, 64))
    new = cache.write(jnp.array([-1, 5, 32]), *ones)
    rows = np.asarray(new.rows(jnp.arange(32)))
    assert np.all(rows[5] == 1) and np.all(np.delete(rows, 5, axis=0) == 0)
    leaves, tree = jax.tree_util.tree_flatten(new)
    assert len(leaves) == 3 and jax.tree_util.tree_unflatten(tree, leaves).kind == "fp8"  # c_kv, rope, scales


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: LatentCache.create(0), "num_pages: must be >= 1"),
        (lambda: LatentCache.create(1, kind="int8"), "kind must be"),
        (lambda: LatentCache.create(1, kind="fp8", latent_dim=100), "multiple of 128"),
        (lambda: LatentCache.create(1).write(jnp.arange(2), jnp.ones((2, 500)), jnp.ones((2, 64))), "c_kv, k_pe"),
        (lambda: LatentCache.from_flashmla_fp8(np.zeros((10, 656), np.uint8)), "multiple of page_size"),
        (lambda: LatentCache.from_flashmla_fp8(np.zeros((64, 655), np.uint8)), r"uint8 \[n, 656\]"),
        (lambda: LatentCache.from_flashmla_fp8(np.zeros((64, 656), np.uint8)), "finite positive"),
        (lambda: LatentCache.create(1, latent_dim=16, rope_dim=8).to_bf16_rows(), "512 \\+ 64"),
    ],
)
def test_bad_arguments(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("kind", "shapes"),
    [
        ("bf16", [(2, 64, 256), (2, 16, 128)]),
        ("fp8", [(2, 64, 128), (2, 16, 128), (2, 2, 128)]),
        ("f32", [(2, 64, 576)]),
    ],
)
def test_exact_size_parts(kind: str, shapes: list) -> None:
    """The device layout (ops/latent_cache.py): 32-bit parts whose rows are 128-word multiples (c_kv one
    row per token, k_pe 4 and FP8 scales 32 tokens to a row), allocating exactly the format's bytes per
    token; a fresh FP8 cache exports scale 1."""
    cache = LatentCache.create(2, 64, kind=kind)
    leaves = jax.tree_util.tree_leaves(cache)
    assert [a.shape for a in leaves] == [tuple(s) for s in shapes] and all(a.dtype.itemsize == 4 for a in leaves)
    assert sum(a.nbytes for a in leaves) == cache.allocated_bytes_per_token * cache.num_slots
    assert cache.allocated_bytes_per_token == cache.bytes_per_token == {"bf16": 1152, "fp8": 656, "f32": 2304}[kind]
    if kind == "fp8":
        rows = cache.to_flashmla_fp8()
        assert np.all(rows[:, 512:528].view("<f4") == 1.0) and not rows[:, :512].any() and not rows[:, 528:].any()
        np.testing.assert_array_equal(LatentCache.from_flashmla_fp8(rows, 64).to_flashmla_fp8(), rows)


@pytest.mark.parametrize(
    ("kind", "latent", "rope"), [("bf16", 64, 16), ("bf16", 1024, 64), ("fp8", 128, 32), ("fp8", 1024, 64)]
)
def test_rows_round_trip_at_other_widths(kind: str, latent: int, rope: int) -> None:
    rng = np.random.default_rng(3)
    c, k = rng.standard_normal((20, latent)).astype(np.float32), rng.standard_normal((20, rope)).astype(np.float32)
    cache = LatentCache.create(2, 16, kind=kind, latent_dim=latent, rope_dim=rope).write(
        jnp.arange(20), jnp.asarray(c), jnp.asarray(k)
    )
    got = np.asarray(cache.rows(jnp.arange(20)))
    if kind == "bf16":
        want = np.concatenate([c, k], axis=1).astype(ml_dtypes.bfloat16).astype(np.float32)
    else:
        codes, scales = ref.quantize_fp8(c, tile=128)
        want_c = ref.dequantize_fp8(codes, scales, tile=128)
        want = np.concatenate([want_c, k.astype(ml_dtypes.bfloat16).astype(np.float64)], axis=1).astype(np.float32)
    np.testing.assert_array_equal(got, want)
