"""`LatentCache`: the paged MLA latent cache on the device (dsa.md §3, §6), in bf16 or FP8.

Each cached token holds one latent row `[c_kv (latent_dim) | k_pe (rope_dim)]`, shared by all heads.
Tokens are addressed by *slot* (`page · page_size + offset`, dsa.md §5), and every array is laid out
`[num_pages, page_size, 1, width]`: the token index occupies the two leading dimensions, which a TPU does
not tile, so a kernel can DMA any single token's row (the last two dimensions are the tiled ones, as in
JAX's ragged paged attention with one KV head).

Formats:
- `"f32"`: `kv` float32 `[P, S, 1, latent_dim + rope_dim]` — exact, for parity tests and training.
- `"bf16"`: `kv` bf16 `[P, S, 1, latent_dim + rope_dim]` (1152 bytes per token at 512 + 64).
- `"fp8"` (FlashMLA's DeepSeek-V3.2 format, split by part): `c_kv` float8_e4m3fn `[P, S, 1, latent_dim]`,
  `scales` float32 `[P, S, 1, latent_dim // 128]` (one power-of-two scale per 128-wide tile, dsa.md §4
  rules), `k_pe` bf16 `[P, S, 1, rope_dim]` (not quantized): 656 bytes per token at 512 + 64.

`write` quantizes exactly as `reference.pack_mla_fp8` does (bit-identical, tested); `to_flashmla_fp8` /
`from_flashmla_fp8` and `to_bf16_rows` / `from_bf16_rows` convert to and from the byte rows of dsa.md §6,
so caches move between this package, FlashMLA, vLLM and SGLang. The cache is a JAX pytree: pass it
through `jit`, and `write` returns a new one (donate the old one to update in place).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsa_hybrid import reference

CacheKind = Literal["bf16", "fp8", "f32"]
FP8_TILE = 128
_E4M3_MAX = 448.0
_AMAX_FLOOR = 1e-4


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """Paged latent cache (see the module docstring). Build one with `LatentCache.create`."""

    kv: jax.Array | None  # bf16 / f32 [P, S, 1, latent_dim + rope_dim]   ("bf16", "f32")
    c_kv: jax.Array | None  # float8_e4m3fn [P, S, 1, latent_dim]  ("fp8")
    scales: jax.Array | None  # float32 [P, S, 1, latent_dim // 128] ("fp8")
    k_pe: jax.Array | None  # bf16 [P, S, 1, rope_dim]             ("fp8")
    kind: CacheKind = dataclasses.field(metadata=dict(static=True))
    latent_dim: int = dataclasses.field(metadata=dict(static=True))
    rope_dim: int = dataclasses.field(metadata=dict(static=True))

    @staticmethod
    def create(
        num_pages: int, page_size: int = 64, *, kind: CacheKind = "bf16", latent_dim: int = 512, rope_dim: int = 64
    ) -> LatentCache:
        """An all-zero cache of `num_pages · page_size` slots."""
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages} and {page_size}")
        if latent_dim < 1 or rope_dim < 0:
            raise ValueError(f"latent_dim must be >= 1 and rope_dim >= 0, got {latent_dim} and {rope_dim}")
        lead = (num_pages, page_size, 1)
        if kind in ("bf16", "f32"):
            dtype = jnp.bfloat16 if kind == "bf16" else jnp.float32
            return LatentCache(jnp.zeros((*lead, latent_dim + rope_dim), dtype), None, None, None,
                               kind, latent_dim, rope_dim)  # fmt: skip
        if kind == "fp8":
            if latent_dim % FP8_TILE:
                raise ValueError(f"latent_dim must be a multiple of {FP8_TILE} for the fp8 cache, got {latent_dim}")
            return LatentCache(
                None,
                jnp.zeros((*lead, latent_dim), jnp.float8_e4m3fn),
                jnp.ones((*lead, latent_dim // FP8_TILE), jnp.float32),
                jnp.zeros((*lead, rope_dim), jnp.bfloat16),
                kind,
                latent_dim,
                rope_dim,
            )
        raise ValueError(f"kind must be 'bf16', 'fp8' or 'f32', got {kind!r}")

    # ----- sizes ------------------------------------------------------------------------------
    @property
    def _lead(self) -> tuple[int, ...]:
        arr = self.c_kv if self.kind == "fp8" else self.kv
        assert arr is not None
        return tuple(arr.shape[:2])

    @property
    def num_pages(self) -> int:
        return self._lead[0]

    @property
    def page_size(self) -> int:
        return self._lead[1]

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def width(self) -> int:
        """Width of a latent row, `latent_dim + rope_dim` (576 for DeepSeek-V3.2 and GLM-5)."""
        return self.latent_dim + self.rope_dim

    @property
    def bytes_per_token(self) -> int:
        if self.kind != "fp8":
            return (2 if self.kind == "bf16" else 4) * self.width
        return self.latent_dim + 4 * (self.latent_dim // FP8_TILE) + 2 * self.rope_dim

    # ----- reading ----------------------------------------------------------------------------
    def rows(self, slots: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """The latent rows `[..., width]` of `slots` (any shape), dequantized to `dtype`. Slots outside
        `[0, num_slots)` (including −1) read slot 0; mask them yourself."""
        idx = jnp.clip(jnp.asarray(slots, jnp.int32), 0, self.num_slots - 1)
        if self.kind != "fp8":
            assert self.kv is not None
            return self.kv.reshape(self.num_slots, self.width)[idx].astype(dtype)
        assert self.c_kv is not None and self.scales is not None and self.k_pe is not None
        codes = self.c_kv.reshape(self.num_slots, self.latent_dim)[idx].astype(jnp.float32)
        scales = self.scales.reshape(self.num_slots, -1)[idx]
        c = codes * jnp.repeat(scales, FP8_TILE, axis=-1)
        k_pe = self.k_pe.reshape(self.num_slots, self.rope_dim)[idx].astype(jnp.float32)
        return jnp.concatenate([c, k_pe], axis=-1).astype(dtype)

    # ----- writing ----------------------------------------------------------------------------
    def write(self, slots: jax.Array, c_kv: jax.Array, k_pe: jax.Array) -> LatentCache:
        """A cache with tokens written: `slots` int `[n]`, `c_kv` `[n, latent_dim]`, `k_pe` `[n, rope_dim]`
        (any float dtype; post-RMSNorm latent and post-RoPE rope part). Slots outside `[0, num_slots)`,
        −1 included, are skipped (padding). Jit-able; the FP8 cache quantizes each 128-wide tile with a
        power-of-two scale exactly as `reference.pack_mla_fp8`."""
        slots = jnp.asarray(slots)
        n = slots.shape[0]
        if c_kv.shape != (n, self.latent_dim) or k_pe.shape != (n, self.rope_dim):
            raise ValueError(
                f"c_kv, k_pe: expected [{n}, {self.latent_dim}] and [{n}, {self.rope_dim}], "
                f"got {list(c_kv.shape)} and {list(k_pe.shape)}"
            )
        # Invalid slots are sent past the end, where mode="drop" discards them.
        idx = jnp.where((slots >= 0) & (slots < self.num_slots), slots, self.num_slots).astype(jnp.int32)

        def put(arr: jax.Array, values: jax.Array) -> jax.Array:
            # Scatter into the paged array itself: a flat reshape around the scatter would make XLA
            # copy the whole cache on every call (the size-1 head dim gets a different layout).
            page, off = idx // self.page_size, idx % self.page_size
            return arr.at[page, off, 0].set(values.astype(arr.dtype), mode="drop")

        if self.kind != "fp8":
            assert self.kv is not None
            kv = put(self.kv, jnp.concatenate([c_kv.astype(jnp.float32), k_pe.astype(jnp.float32)], axis=-1))
            return dataclasses.replace(self, kv=kv)
        assert self.c_kv is not None and self.scales is not None and self.k_pe is not None
        codes, scales = quantize_tiles(c_kv)
        return dataclasses.replace(
            self, c_kv=put(self.c_kv, codes), scales=put(self.scales, scales), k_pe=put(self.k_pe, k_pe)
        )

    # ----- byte formats (dsa.md §6) ---------------------------------------------------------------
    def to_flashmla_fp8(self) -> np.ndarray:
        """uint8 `[num_slots, 656]` FlashMLA rows (512 e4m3 | 4 f32 scales | 64 bf16), slot-major.
        A bf16 cache is quantized on the way (as `reference.pack_mla_fp8`)."""
        self._check_flashmla_widths()
        if self.kind != "fp8":
            rows = np.asarray(self.rows(jnp.arange(self.num_slots), jnp.float32), dtype=np.float64)
            return reference.pack_mla_fp8(rows[:, : self.latent_dim], rows[:, self.latent_dim :])
        n = self.num_slots
        out = np.empty((n, reference.MLA_FP8_ROW_BYTES), np.uint8)
        out[:, :512] = np.asarray(self.c_kv).reshape(n, 512).view(np.uint8)
        out[:, 512:528] = np.asarray(self.scales, dtype="<f4").reshape(n, 4).view(np.uint8)
        out[:, 528:] = np.asarray(self.k_pe).reshape(n, 64).view(np.uint8)
        return out

    @staticmethod
    def from_flashmla_fp8(rows: np.ndarray, page_size: int = 64, kind: CacheKind = "fp8") -> LatentCache:
        """A cache holding FlashMLA rows uint8 `[n, 656]` in slots `0..n-1` (n a multiple of `page_size`).
        With `kind="bf16"` the rows are dequantized (exactly: e4m3 × power of two fits bf16)."""
        rows = _byte_rows("rows", rows, reference.MLA_FP8_ROW_BYTES, page_size)
        n = rows.shape[0]
        lead = (n // page_size, page_size, 1)
        if kind == "fp8":
            scales = np.ascontiguousarray(rows[:, 512:528]).view("<f4").reshape(*lead, 4)
            if not np.all(np.isfinite(scales) & (scales > 0)):
                raise ValueError("rows: every scale must be a finite positive float32")
            return LatentCache(
                None,
                jnp.asarray(np.ascontiguousarray(rows[:, :512]).view(ml_dtypes.float8_e4m3fn).reshape(*lead, 512)),
                jnp.asarray(scales.astype(np.float32)),
                jnp.asarray(np.ascontiguousarray(rows[:, 528:]).view(ml_dtypes.bfloat16).reshape(*lead, 64)),
                "fp8",
                512,
                64,
            )
        c_kv, k_pe = reference.unpack_mla_fp8(rows)
        return LatentCache.from_bf16_rows(reference.pack_mla_bf16(c_kv, k_pe), page_size)

    def to_bf16_rows(self) -> np.ndarray:
        """uint8 `[num_slots, 1152]` rows `[c_kv 512 | k_pe 64]` as bf16, slot-major (an FP8 cache is
        dequantized; exact)."""
        self._check_flashmla_widths()
        rows = np.asarray(self.rows(jnp.arange(self.num_slots), jnp.float32), dtype=np.float64)
        return reference.pack_mla_bf16(rows[:, :512], rows[:, 512:])

    @staticmethod
    def from_bf16_rows(rows: np.ndarray, page_size: int = 64, kind: CacheKind = "bf16") -> LatentCache:
        """A cache holding bf16 rows uint8 `[n, 1152]` in slots `0..n-1` (n a multiple of `page_size`);
        with `kind="fp8"` they are quantized as `reference.pack_mla_fp8` does."""
        rows = _byte_rows("rows", rows, reference.MLA_BF16_ROW_BYTES, page_size)
        n = rows.shape[0]
        v = np.ascontiguousarray(rows).view(ml_dtypes.bfloat16).reshape(n, 576)
        cache = LatentCache.create(n // page_size, page_size, kind=kind)
        return cache.write(jnp.arange(n), jnp.asarray(v[:, :512]), jnp.asarray(v[:, 512:]))

    def _check_flashmla_widths(self) -> None:
        if (self.latent_dim, self.rope_dim) != (512, 64):
            raise ValueError(
                f"the dsa.md §6 byte rows are 512 + 64 wide; this cache is {self.latent_dim} + {self.rope_dim}"
            )


jax.tree_util.register_dataclass(
    LatentCache, data_fields=["kv", "c_kv", "scales", "k_pe"], meta_fields=["kind", "latent_dim", "rope_dim"]
)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Spec §4 FP8 quantization of each row of the last dim: `amax = max(max|v|, 1e-4)`,
    `scale = 2^ceil(log2(amax / 448))`, codes `e4m3fn(v / scale)`. Returns `(codes float8_e4m3fn, same
    shape; scales float32 x.shape[:-1])`. The division by a power of two is exact, and XLA rounds to
    nearest even, so codes equal `reference.quantize_fp8` for float32 inputs."""
    x = x.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), _AMAX_FLOOR)
    # frexp gives amax/448 = m·2^e with m in [0.5, 1): ceil(log2) is e, or e−1 when m is exactly 0.5.
    m, e = jnp.frexp(amax / _E4M3_MAX)
    scale = jnp.ldexp(jnp.ones_like(amax), jnp.where(m == 0.5, e - 1, e))
    codes = jnp.clip(x / scale[..., None], -_E4M3_MAX, _E4M3_MAX).astype(jnp.float8_e4m3fn)
    return codes, scale


def quantize_tiles(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`quantize_rows` of each 128-wide tile of the last dim: `(codes, same shape as x; scales float32
    [..., d // 128])`, equal to `reference.quantize_fp8(x, tile=128)` for float32 inputs."""
    tiles = x.reshape(*x.shape[:-1], x.shape[-1] // FP8_TILE, FP8_TILE)
    codes, scale = quantize_rows(tiles)
    return codes.reshape(x.shape), scale


def _byte_rows(name: str, rows: Any, width: int, page_size: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != width:
        raise ValueError(f"{name}: expected uint8 [n, {width}], got {rows.dtype} {list(rows.shape)}")
    if page_size < 1 or rows.shape[0] % page_size or rows.shape[0] == 0:
        raise ValueError(f"{name}: {rows.shape[0]} rows is not a positive multiple of page_size {page_size}")
    return rows
