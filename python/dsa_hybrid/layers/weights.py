"""Linear weights kept in their checkpoint format: float32, bfloat16, or FP8 with 128 × 128 block scales.

A weight is either a plain `jax.Array` (float32 or bfloat16, `[..., out, in]` as in the checkpoints) or
an `Fp8Weight`: e4m3fn codes `[..., out, in]` and float32 `scale_inv` `[..., ceil(out/128),
ceil(in/128)]` (DeepSeek's FP8 format, `W[a, b] = codes[a, b] · scale_inv[a // 128, b // 128]`). Leading
dimensions are batch dimensions (stacked experts). Every matmul of the layers goes through `linear` /
`dense`, which widen the weight to float32 inside the jitted computation (FP8 blocks are scaled there),
so the resident copy stays at checkpoint size while the math is exactly that of the float32 values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, TypeAlias

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_BLOCK = 128
_HIGHEST = jax.lax.Precision.HIGHEST
WeightFormat = Literal["float32", "bfloat16", "fp8"]


@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """An FP8 block-quantized weight (a pytree with leaves `codes` and `scale_inv`).

    codes: float8_e4m3fn `[..., out, in]`; scale_inv: float32 `[..., ceil(out/128), ceil(in/128)]`.
    """

    codes: jax.Array
    scale_inv: jax.Array

    @staticmethod
    def checked(codes: Any, scale_inv: Any) -> Fp8Weight:
        """An `Fp8Weight` whose scale shape is checked against its codes (`ValueError` naming both). The
        constructor itself checks nothing, so pytree maps may put anything in the leaves."""
        c, s = codes, scale_inv
        if len(c.shape) < 2 or len(s.shape) != len(c.shape):
            raise ValueError(
                f"Fp8Weight: codes {list(c.shape)} and scale_inv {list(s.shape)} must both be [..., out, in]"
            )
        want = [*c.shape[:-2], -(-c.shape[-2] // FP8_BLOCK), -(-c.shape[-1] // FP8_BLOCK)]
        if list(s.shape) != want:
            raise ValueError(
                f"Fp8Weight.scale_inv: expected shape {want} for codes {list(c.shape)}, got {list(s.shape)}"
            )
        return Fp8Weight(c, s)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(ml_dtypes.float8_e4m3fn)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes) + int(self.scale_inv.nbytes)


jax.tree_util.register_dataclass(Fp8Weight, data_fields=["codes", "scale_inv"], meta_fields=[])

Weight: TypeAlias = jax.Array | Fp8Weight


def dequantize_fp8(codes: jax.Array, scale_inv: jax.Array) -> jax.Array:
    """float32 `codes · scale_inv` per 128 × 128 block (static shapes, jit-able; a ragged last block
    uses the first rows / columns of its scale)."""
    out, inn = codes.shape[-2], codes.shape[-1]
    s = jnp.repeat(jnp.repeat(scale_inv.astype(jnp.float32), FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)
    return codes.astype(jnp.float32) * s[..., :out, :inn]


def dense(w: Weight) -> jax.Array:
    """The float32 values of a weight in any format (FP8 blocks scaled; bf16 widened exactly)."""
    if isinstance(w, Fp8Weight):
        return dequantize_fp8(w.codes, w.scale_inv)
    return w.astype(jnp.float32)


def linear(x: jax.Array, w: Weight) -> jax.Array:
    """`x · Wᵀ`: `x` `[T, in]`, `w` `[out, in]` in any format, float32 `[T, out]` (float32 math)."""
    return jnp.einsum("ti,oi->to", x.astype(jnp.float32), dense(w), precision=_HIGHEST)


def weight_format(w: Weight) -> WeightFormat:
    """ "fp8", "bfloat16" or "float32" (anything else widened is reported as float32)."""
    if isinstance(w, Fp8Weight):
        return "fp8"
    return "bfloat16" if w.dtype == jnp.bfloat16 else "float32"


def tree_nbytes(tree: Any) -> int:
    """Bytes of the distinct arrays of a pytree (an array shared by two leaves, e.g. tied embeddings,
    counted once)."""
    seen: set[int] = set()
    total = 0
    for leaf in jax.tree.leaves(tree):
        if id(leaf) in seen or not hasattr(leaf, "nbytes"):
            continue
        seen.add(id(leaf))
        total += int(leaf.nbytes)
    return total


def quantize_fp8_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FP8-quantize a float weight `[..., out, in]` as DeepSeek's checkpoints are made: per 128 × 128
    block `scale = amax / 448`, `codes = e4m3fn(W / scale)`. Returns `(codes float8_e4m3fn, scale_inv
    float32)`."""
    w = np.asarray(w, np.float32)
    *lead, rows, cols = w.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = np.zeros((*lead, br * FP8_BLOCK, bc * FP8_BLOCK), np.float32)
    padded[..., :rows, :cols] = w
    blocks = padded.reshape(*lead, br, FP8_BLOCK, bc, FP8_BLOCK)
    scale = np.maximum(np.abs(blocks).max(axis=(-3, -1)), 1e-12) / 448.0
    q = (blocks / scale[..., :, None, :, None]).reshape(padded.shape)[..., :rows, :cols]
    return q.astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32)


def dequantize_fp8_blocks(codes: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """numpy twin of `dequantize_fp8` (float32); `ValueError` names a misshapen `weight_scale_inv`."""
    *lead, rows, cols = codes.shape
    want = [*lead, -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)]
    if list(scale_inv.shape) != want:
        raise ValueError(
            f"weight_scale_inv: expected shape {want} for a {[*lead, rows, cols]} weight, got {list(scale_inv.shape)}"
        )
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)
    return codes.astype(np.float32) * s[..., :rows, :cols]
