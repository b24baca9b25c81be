"""`LatentCache`: the paged MLA latent cache on the device (dsa.md §3, §6), in bf16, FP8 or float32.

Each cached token holds one latent row `[c_kv (latent_dim) | k_pe (rope_dim)]`, shared by all heads.
Tokens are addressed by *slot* (`page · page_size + offset`, dsa.md §5).

**Layout: one 32-bit row per token.** Every format keeps a single array `data` of shape
`[num_pages, page_size, row_words]` with 32-bit elements, the token's whole record in one row:

- `"bf16"`: uint32 words. Words `0 … A−1` (`A = align(latent_dim / 2, 128)`) hold `c_kv` as bf16
  pairs — word `w` has `c_kv[w]` in its low half and `c_kv[w + latent_dim/2]` in its high half —, then
  `B = align(rope_dim, 128)` words hold `k_pe[i]` as the float32 bit pattern of its bf16 value. At
  512 + 64: 384 words, 1536 bytes per token (the format's own size is 1152).
- `"fp8"`: uint32 words. Words `0 … A−1` (`A = align(latent_dim / 4, 128)`) hold the e4m3fn codes of
  `c_kv` — byte `j` of word `w` is `code[w + j · latent_dim/4]`, so at 512 byte plane `j` is tile `j` —,
  then `B = align(latent_dim/128 + rope_dim, 128)` words: the tile scales (float32, the power of two of
  dsa.md §4) and `k_pe` as float32 bit patterns of its bf16 values. At 512 + 64: 256 words, 1024 bytes per
  token (the format's own size is 656).
- `"f32"`: float32 `[…, latent_dim + rope_dim]`, the row as it is (2304 bytes per token at 576).

Why this shape (docs/dsa.md §6 allows any internal arrangement with exact converters): a TPU DMA moves
whole 32-bit words, and Mosaic accepts a single-row DMA at a dynamic row offset only for 32-bit
arrays, so one token's record is one aligned DMA of its own row: the sparse kernel's gather is token
granular with one descriptor per token. Rows are a multiple of 128 words, so XLA's default TPU layout
of the array is the row-major one the kernel reads (no layout copy, no tile padding; the earlier
`[pages, page, 1, width]` bf16/FP8 arrays were padded 2×/4× on the size-1 dimension and copied to the
kernel's layout on every call). What a row costs beyond the format is the lane alignment of its two
segments; a layout with exactly the format's bytes would have to share 512-byte DMA granules between
tokens and read several tokens' bytes per selected token.

The bf16 halves, the FP8 byte planes and the float32 `k_pe` are chosen so a kernel decodes a row into
lane-aligned column blocks with shifts and masks (no lane shuffles); `kernel_columns` gives that
column order. `write` quantizes exactly as `reference.pack_mla_fp8` does (bit-identical, tested);
`to_flashmla_fp8` / `from_flashmla_fp8` and `to_bf16_rows` / `from_bf16_rows` convert to and from the
byte rows of dsa.md §6 byte for byte, so caches move between this package, FlashMLA, vLLM and SGLang.
The cache is a JAX pytree: pass it through `jit`, and `write` returns a new one (donate the old one to
update in place).
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
LANES = 128
_E4M3_MAX = 448.0
_AMAX_FLOOR = 1e-4
_ONE_F32_BITS = 0x3F800000


def _align(x: int, m: int = LANES) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Where each part of a latent row sits in a cache row of 32-bit words (see the module docstring)."""

    kind: str
    latent_dim: int
    rope_dim: int

    @property
    def main_words(self) -> int:
        """`A`: words of the `c_kv` segment (0 for f32, whose row is the plain float32 row)."""
        if self.kind == "bf16":
            return _align(self.latent_dim // 2)
        if self.kind == "fp8":
            return _align(self.latent_dim // 4)
        return 0

    @property
    def n_scales(self) -> int:
        return self.latent_dim // FP8_TILE if self.kind == "fp8" else 0

    @property
    def tail_words(self) -> int:
        """`B`: words of the second segment (fp8: scales then k_pe; bf16: k_pe)."""
        if self.kind == "f32":
            return 0
        return _align(self.n_scales + self.rope_dim)

    @property
    def row_words(self) -> int:
        if self.kind == "f32":
            return self.latent_dim + self.rope_dim
        return self.main_words + self.tail_words

    @property
    def planes(self) -> int:
        """Values per word in the `c_kv` segment: 2 bf16 halves, 4 FP8 byte planes."""
        return {"bf16": 2, "fp8": 4}.get(self.kind, 1)

    @property
    def dtype(self) -> Any:
        return jnp.float32 if self.kind == "f32" else jnp.uint32

    def kernel_columns(self) -> np.ndarray:
        """int `[latent_dim + rope_dim]`: the column of natural column `i` in a kernel's decoded row
        `[plane 0 (A) | plane 1 (A) | … | tail (B)]` (f32: the identity)."""
        L, R = self.latent_dim, self.rope_dim
        if self.kind == "f32":
            return np.arange(L + R)
        A, per = self.main_words, L // self.planes
        i = np.arange(L)
        latent = (i // per) * A + i % per
        rope = self.planes * A + self.n_scales + np.arange(R)
        return np.concatenate([latent, rope])

    @property
    def kernel_width(self) -> int:
        """Width of the decoded row a kernel builds: `planes · A + B` (f32: the row width)."""
        return self.row_words if self.kind == "f32" else self.planes * self.main_words + self.tail_words


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """Paged latent cache (see the module docstring). Build one with `LatentCache.create`."""

    data: jax.Array  # [num_pages, page_size, row_words]: uint32 ("bf16", "fp8") or float32 ("f32")
    kind: CacheKind = dataclasses.field(metadata=dict(static=True))
    latent_dim: int = dataclasses.field(metadata=dict(static=True))
    rope_dim: int = dataclasses.field(metadata=dict(static=True))

    @staticmethod
    def create(
        num_pages: int, page_size: int = 64, *, kind: CacheKind = "bf16", latent_dim: int = 512, rope_dim: int = 64
    ) -> LatentCache:
        """An all-zero cache of `num_pages · page_size` slots (FP8 tile scales 1)."""
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages} and {page_size}")
        if latent_dim < 1 or rope_dim < 0:
            raise ValueError(f"latent_dim must be >= 1 and rope_dim >= 0, got {latent_dim} and {rope_dim}")
        if kind not in ("bf16", "fp8", "f32"):
            raise ValueError(f"kind must be 'bf16', 'fp8' or 'f32', got {kind!r}")
        if kind == "fp8" and latent_dim % FP8_TILE:
            raise ValueError(f"latent_dim must be a multiple of {FP8_TILE} for the fp8 cache, got {latent_dim}")
        if kind == "bf16" and latent_dim % 2:
            raise ValueError(f"latent_dim must be even for the bf16 cache, got {latent_dim}")
        lay = RowLayout(kind, latent_dim, rope_dim)
        row = np.zeros(lay.row_words, np.uint32 if kind != "f32" else np.float32)
        if kind == "fp8":
            row[lay.main_words : lay.main_words + lay.n_scales] = _ONE_F32_BITS
        data = jnp.broadcast_to(jnp.asarray(row), (num_pages, page_size, lay.row_words))
        return LatentCache(data, kind, latent_dim, rope_dim)

    # ----- sizes ------------------------------------------------------------------------------
    @property
    def layout(self) -> RowLayout:
        return RowLayout(self.kind, self.latent_dim, self.rope_dim)

    @property
    def num_pages(self) -> int:
        return self.data.shape[0]

    @property
    def page_size(self) -> int:
        return self.data.shape[1]

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def width(self) -> int:
        """Width of a latent row, `latent_dim + rope_dim` (576 for DeepSeek-V3.2 and GLM-5)."""
        return self.latent_dim + self.rope_dim

    @property
    def bytes_per_token(self) -> int:
        """The format's own size per token (dsa.md §6: 1152 bf16, 656 FP8, 2304 f32 at 512 + 64)."""
        if self.kind != "fp8":
            return (2 if self.kind == "bf16" else 4) * self.width
        return self.latent_dim + 4 * (self.latent_dim // FP8_TILE) + 2 * self.rope_dim

    @property
    def allocated_bytes_per_token(self) -> int:
        """Bytes the device array holds per token (`4 · row_words`; 1536 bf16, 1024 FP8 at 512 + 64)."""
        return 4 * self.layout.row_words

    # ----- reading ----------------------------------------------------------------------------
    def rows(self, slots: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """The latent rows `[..., width]` of `slots` (any shape), dequantized to `dtype`. Slots outside
        `[0, num_slots)` (including −1) read slot 0; mask them yourself."""
        idx = jnp.clip(jnp.asarray(slots, jnp.int32), 0, self.num_slots - 1)
        words = self.data.reshape(self.num_slots, -1)[idx]
        return decode_rows(self.layout, words).astype(dtype)

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
        # Invalid slots are sent past the end, where mode="drop" discards them. The scatter goes into
        # the paged array itself: a flat reshape around it could make XLA copy the whole cache.
        valid = (slots >= 0) & (slots < self.num_slots)
        page = jnp.where(valid, slots // self.page_size, self.num_pages).astype(jnp.int32)
        off = jnp.where(valid, slots % self.page_size, 0).astype(jnp.int32)
        words = encode_rows(self.layout, c_kv, k_pe)
        return dataclasses.replace(self, data=self.data.at[page, off].set(words, mode="drop"))

    # ----- byte formats (dsa.md §6) ---------------------------------------------------------------
    def to_flashmla_fp8(self) -> np.ndarray:
        """uint8 `[num_slots, 656]` FlashMLA rows (512 e4m3 | 4 f32 scales | 64 bf16), slot-major.
        A bf16 cache is quantized on the way (as `reference.pack_mla_fp8`)."""
        self._check_flashmla_widths()
        if self.kind != "fp8":
            rows = np.asarray(self.rows(jnp.arange(self.num_slots), jnp.float32), dtype=np.float64)
            return reference.pack_mla_fp8(rows[:, : self.latent_dim], rows[:, self.latent_dim :])
        lay = self.layout
        words = np.asarray(self.data).reshape(self.num_slots, -1)
        A, n = lay.main_words, lay.n_scales
        out = np.empty((self.num_slots, reference.MLA_FP8_ROW_BYTES), np.uint8)
        out[:, :512] = _fp8_codes_from_words(words[:, :A], 512)
        out[:, 512:528] = np.ascontiguousarray(words[:, A : A + n]).astype("<u4").view(np.uint8)
        out[:, 528:] = (words[:, A + n : A + n + 64] >> 16).astype("<u2").view(np.uint8)
        return out

    @staticmethod
    def from_flashmla_fp8(rows: np.ndarray, page_size: int = 64, kind: CacheKind = "fp8") -> LatentCache:
        """A cache holding FlashMLA rows uint8 `[n, 656]` in slots `0..n-1` (n a multiple of `page_size`).
        With `kind="bf16"` the rows are dequantized (exactly: e4m3 × power of two fits bf16)."""
        rows = _byte_rows("rows", rows, reference.MLA_FP8_ROW_BYTES, page_size)
        n = rows.shape[0]
        if kind == "fp8":
            scales = np.ascontiguousarray(rows[:, 512:528]).view("<f4")
            if not np.all(np.isfinite(scales) & (scales > 0)):
                raise ValueError("rows: every scale must be a finite positive float32")
            lay = RowLayout("fp8", 512, 64)
            words = np.zeros((n, lay.row_words), np.uint32)
            A = lay.main_words
            words[:, :A] = _fp8_words_from_codes(rows[:, :512])
            words[:, A : A + 4] = scales.view("<u4")
            k_pe_bits = np.ascontiguousarray(rows[:, 528:]).view("<u2").astype(np.uint32)
            words[:, A + 4 : A + 68] = k_pe_bits << 16
            return LatentCache(jnp.asarray(words.reshape(n // page_size, page_size, -1)), "fp8", 512, 64)
        c_kv, k_pe = reference.unpack_mla_fp8(rows)
        return LatentCache.from_bf16_rows(reference.pack_mla_bf16(c_kv, k_pe), page_size, kind)

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


jax.tree_util.register_dataclass(LatentCache, data_fields=["data"], meta_fields=["kind", "latent_dim", "rope_dim"])


# ----- row codec (XLA) ----------------------------------------------------------------------------


def _bf16_bits(x: jax.Array) -> jax.Array:
    """uint32 holding the 16 bits of `x` rounded to bf16."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)


def encode_rows(lay: RowLayout, c_kv: jax.Array, k_pe: jax.Array) -> jax.Array:
    """Cache rows `[n, row_words]` for latents `c_kv` `[n, L]`, `k_pe` `[n, R]` (FP8: quantized here)."""
    n = c_kv.shape[0]
    if lay.kind == "f32":
        return jnp.concatenate([c_kv.astype(jnp.float32), k_pe.astype(jnp.float32)], axis=1)
    A, L = lay.main_words, lay.latent_dim
    per = L // lay.planes
    rope = _bf16_bits(k_pe) << 16  # float32 bit pattern of the bf16 value
    if lay.kind == "bf16":
        bits = _bf16_bits(c_kv).reshape(n, 2, per)
        main = bits[:, 0] | (bits[:, 1] << 16)
        tail = rope
    else:
        codes, scales = quantize_tiles(c_kv)
        b = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.uint32).reshape(n, 4, per)
        main = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
        tail = jnp.concatenate([jax.lax.bitcast_convert_type(scales, jnp.uint32), rope], axis=1)
    main = jnp.pad(main, ((0, 0), (0, A - per)))
    tail = jnp.pad(tail, ((0, 0), (0, lay.tail_words - tail.shape[1])))
    return jnp.concatenate([main, tail], axis=1)


def decode_rows(lay: RowLayout, words: jax.Array) -> jax.Array:
    """float32 latent rows `[..., L + R]` (natural order, FP8 dequantized) of cache rows `[..., row_words]`."""
    if lay.kind == "f32":
        return words
    A, L, R = lay.main_words, lay.latent_dim, lay.rope_dim
    per = L // lay.planes
    main = words[..., :per]
    tail = words[..., A:]
    if lay.kind == "bf16":
        lo = jax.lax.bitcast_convert_type(main << 16, jnp.float32)
        hi = jax.lax.bitcast_convert_type(main & jnp.uint32(0xFFFF0000), jnp.float32)
        c = jnp.concatenate([lo, hi], axis=-1)
        rope = jax.lax.bitcast_convert_type(tail[..., :R], jnp.float32)
        return jnp.concatenate([c, rope], axis=-1)
    n = lay.n_scales
    planes = [((main >> (8 * j)) & 0xFF).astype(jnp.uint8) for j in range(4)]
    codes = jax.lax.bitcast_convert_type(jnp.concatenate(planes, axis=-1), jnp.float8_e4m3fn).astype(jnp.float32)
    scales = jax.lax.bitcast_convert_type(tail[..., :n], jnp.float32)
    c = codes * jnp.repeat(scales, FP8_TILE, axis=-1)
    rope = jax.lax.bitcast_convert_type(tail[..., n : n + R], jnp.float32)
    return jnp.concatenate([c, rope], axis=-1)


def _fp8_words_from_codes(codes: np.ndarray) -> np.ndarray:
    """uint32 `[n, L/4]` byte-plane words of uint8 codes `[n, L]` (numpy, for the byte converters)."""
    n, L = codes.shape
    b = codes.astype(np.uint32).reshape(n, 4, L // 4)
    return b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)


def _fp8_codes_from_words(words: np.ndarray, L: int) -> np.ndarray:
    per = L // 4
    w = words[:, :per]
    return np.concatenate([((w >> (8 * j)) & 0xFF).astype(np.uint8) for j in range(4)], axis=1)


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
