"""`LatentCache`: the paged MLA latent cache on the device (dsa.md §3, §6), in bf16, FP8 or float32.

Each cached token holds one latent row `[c_kv (latent_dim) | k_pe (rope_dim)]`, shared by all heads.
Tokens are addressed by *slot* (`page · page_size + offset`, dsa.md §5).

**Layout: exact-size, lane-dense parts.** A bf16 or FP8 cache keeps its tokens in up to three arrays of
32-bit words, each `[num_pages, rows_per_page, 128·k]` with no padding at DeepSeek-V3.2 / GLM-5 widths,
so the device allocates exactly the format's bytes per token (1152 bf16, 656 FP8 at 512 + 64):

- `data`, the `c_kv` part, one row per token `[num_pages, page_size, A]`:
  - `"bf16"`: `A = align(latent_dim / 2, 128)` uint32 words, bf16 pairs: word `w` has `c_kv[w]` in its
    low half and `c_kv[w + latent_dim/2]` in its high half (1024 B at 512);
  - `"fp8"`: `A = align(latent_dim / 4, 128)` words of e4m3fn codes: byte `j` of word `w` is
    `code[w + j · latent_dim/4]`, so at 512 byte plane `j` is tile `j` (512 B at 512);
  - `"f32"`: float32 `[…, latent_dim + rope_dim]`, the whole row as it is (2304 B at 576; rope and
    scales parts absent).
- `rope`, `k_pe` (bf16, both formats), `g` tokens per 128-word row `[num_pages, page_size / g, 128]`:
  token `j` of a row owns the `rope_dim / 2`-word window starting at word `j · W` (`W` the window,
  `rope_dim / 2` rounded up to a power of two), bf16 pairs `k_pe[i]` low / `k_pe[i + rope_dim/2]` high.
  At 64: 32-word windows, `g` = 4, 128 B per token.
- `scales` (FP8 only), the float32 tile scales (the power of two of dsa.md §4), `latent_dim / 128`
  words per token in windows the same way, `g` = 32 at 512 (`[num_pages, page_size / 32, 128]`, 16 B
  per token).

`g` is lowered to a power of two dividing `page_size` when needed (then the rows are partly empty), and
the `c_kv` part pads to 128 words at widths that are not a multiple of 256 (bf16) / 512 (FP8).

Why this shape (docs/dsa.md §6 allows any internal arrangement with exact converters). A TPU DMA from
HBM moves whole 512-byte granules (Mosaic: "the memory space word size, 4096 bits"), and accepts a
one-row DMA at a dynamic row offset for 32-bit arrays; XLA's default TPU layout of a `[…, rows, 128·k]`
32-bit array is row-major with nothing padded when `rows` is a multiple of 8 (or small: a
`[pages, 2, 128]` array is allocated exactly too, measured). So every part is a 32-bit array whose rows
are whole granules, and a token is gathered with one row DMA per part: its own `c_kv` row, the rope
row it shares with `g − 1` other tokens, and (FP8) the scale row it shares with 31 others. That reads
1536 B per selected token in both formats (bf16: 1024 + 512; FP8: 512 + 512 + 512) against the
format's 1152 / 656 B; the previous one-row-per-token layout allocated 1536 / 1024 B per token and read
the same 1536 / 1024. A layout that reads fewer bytes per token than its allocation has no room to
exist at FP8: 656 B never fit one granule. `docs/tpu.md` has the numbers measured on the compiled
programs.

The bf16 halves, the FP8 byte planes and the rope windows are chosen so a kernel decodes a token into
lane-aligned column blocks with shifts, masks and selects (no lane shuffles); `CacheLayout` gives the
positions. `write` quantizes exactly as `reference.pack_mla_fp8` does (bit-identical, tested);
`to_flashmla_fp8` / `from_flashmla_fp8` and `to_bf16_rows` / `from_bf16_rows` convert to and from the
byte rows of dsa.md §6 byte for byte, so caches move between this package, FlashMLA, vLLM and SGLang.
The cache is a JAX pytree (leaves `data`, `rope`, `scales`; absent parts are `None`): pass it through
`jit`, and `write` returns a new one (donate the old one to update in place).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsa_hybrid import reference
from dsa_hybrid.ops.checks import check_alloc, check_array, check_int

CacheKind = Literal["bf16", "fp8", "f32"]
FP8_TILE = 128
LANES = 128
_E4M3_MAX = 448.0
_AMAX_FLOOR = 1e-4
_ONE_F32_BITS = 0x3F800000
_HIGH_HALF = 0xFFFF0000


def _align(x: int, m: int = LANES) -> int:
    return -(-x // m) * m


def _pow2_at_least(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


@dataclasses.dataclass(frozen=True)
class Windows:
    """Tokens sharing rows of 32-bit words: each token owns `words` words in a `window`-word window,
    `group` windows per `row`-word row (`group` a power of two dividing the page size)."""

    words: int
    window: int
    group: int
    row: int

    @staticmethod
    def plan(words: int, page_size: int) -> Windows:
        window = _pow2_at_least(words) if words <= LANES else _align(words)
        row = max(LANES, window)
        group = row // window
        while page_size % group:
            group //= 2
        return Windows(words, window, group, row)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Where each part of a latent row sits in the cache's arrays (see the module docstring)."""

    kind: str
    latent_dim: int
    rope_dim: int
    page_size: int

    @property
    def main_words(self) -> int:
        """`A`: words of a token's `data` row (f32: the plain float32 row, `latent_dim + rope_dim`)."""
        if self.kind == "bf16":
            return _align(self.latent_dim // 2)
        if self.kind == "fp8":
            return _align(self.latent_dim // 4)
        return self.latent_dim + self.rope_dim

    @property
    def planes(self) -> int:
        """Values per word in the `c_kv` part: 2 bf16 halves, 4 FP8 byte planes (f32: 1)."""
        return {"bf16": 2, "fp8": 4}.get(self.kind, 1)

    @property
    def n_scales(self) -> int:
        return self.latent_dim // FP8_TILE if self.kind == "fp8" else 0

    @property
    def rope_words(self) -> int:
        """Words of a token's `k_pe` (bf16 pairs; 0 for f32, whose rope sits in `data`)."""
        return 0 if self.kind == "f32" else -(-self.rope_dim // 2)

    @property
    def rope(self) -> Windows | None:
        return Windows.plan(self.rope_words, self.page_size) if self.rope_words else None

    @property
    def scales(self) -> Windows | None:
        return Windows.plan(self.n_scales, self.page_size) if self.n_scales else None

    def shapes(self, num_pages: int) -> dict[str, tuple[int, ...] | None]:
        """The array shape of each part (`None` when absent)."""
        out: dict[str, tuple[int, ...] | None] = {"data": (num_pages, self.page_size, self.main_words)}
        for name, win in (("rope", self.rope), ("scales", self.scales)):
            out[name] = None if win is None else (num_pages, self.page_size // win.group, win.row)
        return out

    @property
    def allocated_words(self) -> float:
        """32-bit words the arrays hold per token."""
        total = float(self.main_words)
        for win in (self.rope, self.scales):
            if win is not None:
                total += win.row / win.group
        return total

    def main_columns(self) -> np.ndarray:
        """int `[latent_dim]` (f32: `[latent_dim + rope_dim]`): the column of natural `c_kv` column `i`
        in a kernel's decoded `data` row `[plane 0 (A) | plane 1 (A) | …]`."""
        if self.kind == "f32":
            return np.arange(self.latent_dim + self.rope_dim)
        A, per = self.main_words, self.latent_dim // self.planes
        i = np.arange(self.latent_dim)
        return (i // per) * A + i % per

    @property
    def main_width(self) -> int:
        """Width of the decoded `data` row: `planes · A` (f32: the row width)."""
        return self.planes * self.main_words if self.kind != "f32" else self.main_words


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """Paged latent cache (see the module docstring). Build one with `LatentCache.create`."""

    data: jax.Array  # [num_pages, page_size, A]: uint32 ("bf16", "fp8") or float32 ("f32")
    rope: jax.Array | None  # uint32 [num_pages, page_size / g, 128]: k_pe windows (None for "f32")
    scales: jax.Array | None  # uint32 [num_pages, page_size / 32, 128]: FP8 tile scales (None otherwise)
    kind: CacheKind = dataclasses.field(metadata=dict(static=True))
    latent_dim: int = dataclasses.field(metadata=dict(static=True))
    rope_dim: int = dataclasses.field(metadata=dict(static=True))

    @staticmethod
    def create(
        num_pages: int, page_size: int = 64, *, kind: CacheKind = "bf16", latent_dim: int = 512, rope_dim: int = 64
    ) -> LatentCache:
        """An all-zero cache of `num_pages · page_size` slots (FP8 tile scales 1)."""
        num_pages, page_size = check_int("num_pages", num_pages, 1), check_int("page_size", page_size, 1)
        latent_dim, rope_dim = check_int("latent_dim", latent_dim, 1), check_int("rope_dim", rope_dim, 0)
        check_alloc("num_pages × page_size × (latent_dim + rope_dim)", (num_pages, page_size, latent_dim + rope_dim), 4)
        if kind not in ("bf16", "fp8", "f32"):
            raise ValueError(f"kind must be 'bf16', 'fp8' or 'f32', got {kind!r}")
        if kind == "fp8" and latent_dim % FP8_TILE:
            raise ValueError(f"latent_dim must be a multiple of {FP8_TILE} for the fp8 cache, got {latent_dim}")
        if kind == "bf16" and latent_dim % 2:
            raise ValueError(f"latent_dim must be even for the bf16 cache, got {latent_dim}")
        lay = CacheLayout(kind, latent_dim, rope_dim, page_size)
        shapes = lay.shapes(num_pages)
        dtype = jnp.float32 if kind == "f32" else jnp.uint32
        data = jnp.zeros(shapes["data"], dtype)
        rope = None if shapes["rope"] is None else jnp.zeros(shapes["rope"], jnp.uint32)
        scales = None
        if shapes["scales"] is not None:
            win = lay.scales
            assert win is not None
            row = np.zeros(win.row, np.uint32)
            for j in range(win.group):
                row[j * win.window : j * win.window + win.words] = _ONE_F32_BITS
            scales = jnp.broadcast_to(jnp.asarray(row), shapes["scales"])
        return LatentCache(data, rope, scales, kind, latent_dim, rope_dim)

    # ----- sizes ------------------------------------------------------------------------------
    @property
    def layout(self) -> CacheLayout:
        return CacheLayout(self.kind, self.latent_dim, self.rope_dim, self.page_size)

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
    def allocated_bytes_per_token(self) -> float:
        """Bytes the device arrays hold per token (1152 bf16, 656 FP8 at 512 + 64 with pages of a multiple
        of 32 tokens: the format's size)."""
        return 4 * self.layout.allocated_words

    @property
    def bytes_read_per_token(self) -> int:
        """Bytes a TPU kernel moves from HBM to gather one token: one whole row of each part (1536 bf16 and
        FP8 at 512 + 64)."""
        lay = self.layout
        return 4 * (lay.main_words + sum(w.row for w in (lay.rope, lay.scales) if w is not None))

    # ----- reading ----------------------------------------------------------------------------
    def rows(self, slots: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """The latent rows `[..., width]` of `slots` (any shape), dequantized to `dtype`. Slots outside
        `[0, num_slots)` (including −1) read slot 0; mask them yourself."""
        if hasattr(slots, "dtype") and not jnp.issubdtype(slots.dtype, jnp.integer):
            raise TypeError(f"slots: expected integers, got {slots.dtype}")
        idx = jnp.clip(jnp.asarray(slots, jnp.int32), 0, self.num_slots - 1)
        lay = self.layout
        main = self.data.reshape(self.num_slots, -1)[idx]
        if lay.kind == "f32":
            return main.astype(dtype)
        page, off = idx // self.page_size, idx % self.page_size
        rope = _window_read(self.rope, lay.rope, page, off)
        scales = _window_read(self.scales, lay.scales, page, off)
        return decode_parts(lay, main, rope, scales).astype(dtype)

    # ----- writing ----------------------------------------------------------------------------
    def write(self, slots: jax.Array, c_kv: jax.Array, k_pe: jax.Array) -> LatentCache:
        """A cache with tokens written: `slots` int `[n]`, `c_kv` `[n, latent_dim]`, `k_pe` `[n, rope_dim]`
        (any float dtype; post-RMSNorm latent and post-RoPE rope part). Slots outside `[0, num_slots)`,
        −1 included, are skipped (padding). Jit-able; the FP8 cache quantizes each 128-wide tile with a
        power-of-two scale exactly as `reference.pack_mla_fp8`."""
        slots = jnp.asarray(check_array("slots", slots))
        check_array("c_kv", c_kv)
        check_array("k_pe", k_pe)
        if slots.ndim != 1 or not jnp.issubdtype(slots.dtype, jnp.integer):
            raise TypeError(f"slots: expected integers of shape [n], got {slots.dtype} {list(slots.shape)}")
        if not (jnp.issubdtype(c_kv.dtype, jnp.floating) and jnp.issubdtype(k_pe.dtype, jnp.floating)):
            raise TypeError(f"c_kv, k_pe: expected floats, got {c_kv.dtype} and {k_pe.dtype}")
        n = slots.shape[0]
        if c_kv.shape != (n, self.latent_dim) or k_pe.shape != (n, self.rope_dim):
            raise ValueError(
                f"c_kv, k_pe: expected [{n}, {self.latent_dim}] and [{n}, {self.rope_dim}], "
                f"got {list(c_kv.shape)} and {list(k_pe.shape)}"
            )
        # Invalid slots are sent past the end, where mode="drop" discards them. The scatters go into
        # the paged arrays themselves: a flat reshape around them could make XLA copy the whole cache.
        valid = (slots >= 0) & (slots < self.num_slots)
        page = jnp.where(valid, slots // self.page_size, self.num_pages).astype(jnp.int32)
        off = jnp.where(valid, slots % self.page_size, 0).astype(jnp.int32)
        lay = self.layout
        main, rope, scales = encode_parts(lay, c_kv, k_pe)
        return dataclasses.replace(
            self,
            data=self.data.at[page, off].set(main, mode="drop"),
            rope=_window_write(self.rope, lay.rope, page, off, rope),
            scales=_window_write(self.scales, lay.scales, page, off, scales),
        )

    # ----- byte formats (dsa.md §6) ---------------------------------------------------------------
    def to_flashmla_fp8(self) -> np.ndarray:
        """uint8 `[num_slots, 656]` FlashMLA rows (512 e4m3 | 4 f32 scales | 64 bf16), slot-major.
        A bf16 cache is quantized on the way (as `reference.pack_mla_fp8`)."""
        self._check_flashmla_widths()
        if self.kind != "fp8":
            rows = np.asarray(self.rows(jnp.arange(self.num_slots), jnp.float32), dtype=np.float64)
            return reference.pack_mla_fp8(rows[:, : self.latent_dim], rows[:, self.latent_dim :])
        lay = self.layout
        assert self.rope is not None and self.scales is not None
        words = np.asarray(self.data).reshape(self.num_slots, -1)
        scales = _windows_np(np.asarray(self.scales), lay.scales)
        rope = _windows_np(np.asarray(self.rope), lay.rope)
        out = np.empty((self.num_slots, reference.MLA_FP8_ROW_BYTES), np.uint8)
        out[:, :512] = _fp8_codes_from_words(words, 512)
        out[:, 512:528] = np.ascontiguousarray(scales).astype("<u4").view(np.uint8)
        out[:, 528:] = _bf16_bits_from_pairs(rope).astype("<u2").view(np.uint8)
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
            lay = CacheLayout("fp8", 512, 64, page_size)
            pages = n // page_size
            main = _fp8_words_from_codes(rows[:, :512]).reshape(pages, page_size, lay.main_words)
            k_pe_bits = np.ascontiguousarray(rows[:, 528:]).view("<u2").astype(np.uint32)
            rope = _windows_to_np(_bf16_pairs_np(k_pe_bits), lay.rope, pages, page_size)
            sc = _windows_to_np(scales.view("<u4").astype(np.uint32), lay.scales, pages, page_size)
            return LatentCache(jnp.asarray(main), jnp.asarray(rope), jnp.asarray(sc), "fp8", 512, 64)
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


jax.tree_util.register_dataclass(
    LatentCache, data_fields=["data", "rope", "scales"], meta_fields=["kind", "latent_dim", "rope_dim"]
)


# ----- codec (XLA) --------------------------------------------------------------------------------


def _bf16_bits(x: jax.Array) -> jax.Array:
    """uint32 holding the 16 bits of `x` rounded to bf16."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)


def _bf16_pairs(x: jax.Array) -> jax.Array:
    """uint32 `[n, ceil(d/2)]`: `x[i]` (bf16) in the low half of word `i`, `x[i + ceil(d/2)]` in the high."""
    n, d = x.shape
    half = -(-d // 2)
    bits = jnp.pad(_bf16_bits(x), ((0, 0), (0, 2 * half - d))).reshape(n, 2, half)
    return bits[:, 0] | (bits[:, 1] << 16)


def _unpair_bf16(words: jax.Array, d: int) -> jax.Array:
    """float32 `[..., d]` of bf16 pairs `[..., ceil(d/2)]` (the inverse of `_bf16_pairs`)."""
    lo = jax.lax.bitcast_convert_type(words << 16, jnp.float32)
    hi = jax.lax.bitcast_convert_type(words & jnp.uint32(_HIGH_HALF), jnp.float32)
    return jnp.concatenate([lo, hi], axis=-1)[..., :d]


def encode_parts(
    lay: CacheLayout, c_kv: jax.Array, k_pe: jax.Array
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """`(data rows [n, A], rope words [n, rope_words] or None, scale words [n, n_scales] or None)` for
    latents `c_kv` `[n, L]`, `k_pe` `[n, R]` (FP8: quantized here)."""
    n = c_kv.shape[0]
    if lay.kind == "f32":
        return jnp.concatenate([c_kv.astype(jnp.float32), k_pe.astype(jnp.float32)], axis=1), None, None
    per = lay.latent_dim // lay.planes
    rope = _bf16_pairs(k_pe) if lay.rope_words else None
    scale_words = None
    if lay.kind == "bf16":
        main = _bf16_pairs(c_kv)
    else:
        codes, scales = quantize_tiles(c_kv)
        b = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.uint32).reshape(n, 4, per)
        main = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
        scale_words = jax.lax.bitcast_convert_type(scales, jnp.uint32)
    return jnp.pad(main, ((0, 0), (0, lay.main_words - per))), rope, scale_words


def decode_parts(lay: CacheLayout, main: jax.Array, rope: jax.Array | None, scales: jax.Array | None) -> jax.Array:
    """float32 latent rows `[..., L + R]` (natural order, FP8 dequantized) of a token's parts: `data` rows
    `[..., A]`, rope words `[..., rope_words]`, scale words `[..., n_scales]` (None when absent)."""
    if lay.kind == "f32":
        return main
    L, R = lay.latent_dim, lay.rope_dim
    per = L // lay.planes
    words = main[..., :per]
    k = _unpair_bf16(rope, R) if rope is not None else jnp.zeros((*main.shape[:-1], 0), jnp.float32)
    if lay.kind == "bf16":
        return jnp.concatenate([_unpair_bf16(words, L), k], axis=-1)
    assert scales is not None
    planes = [((words >> (8 * j)) & 0xFF).astype(jnp.uint8) for j in range(4)]
    codes = jax.lax.bitcast_convert_type(jnp.concatenate(planes, axis=-1), jnp.float8_e4m3fn).astype(jnp.float32)
    c = codes * jnp.repeat(jax.lax.bitcast_convert_type(scales, jnp.float32), FP8_TILE, axis=-1)
    return jnp.concatenate([c, k], axis=-1)


def _window_read(arr: jax.Array | None, win: Windows | None, page: jax.Array, off: jax.Array) -> jax.Array | None:
    """The `win.words` words of each token (`page`, `off` int, any shape) from a windowed part."""
    if arr is None or win is None:
        return None
    rows = arr[page, off // win.group]  # [..., row]
    lanes = (off % win.group)[..., None] * win.window + jnp.arange(win.words, dtype=jnp.int32)
    return jnp.take_along_axis(rows, lanes, axis=-1)


def _window_write(
    arr: jax.Array | None, win: Windows | None, page: jax.Array, off: jax.Array, words: jax.Array | None
) -> jax.Array | None:
    """`arr` with each token's window set to `words` `[n, win.words]` (`page` = num_pages drops a token)."""
    if arr is None or win is None or words is None:
        return arr
    lanes = (off % win.group)[:, None] * win.window + jnp.arange(win.words, dtype=jnp.int32)[None, :]
    rows = jnp.broadcast_to((off // win.group)[:, None], lanes.shape)
    return arr.at[jnp.broadcast_to(page[:, None], lanes.shape), rows, lanes].set(words, mode="drop")


def _windows_np(arr: np.ndarray, win: Windows | None) -> np.ndarray:
    """uint32 `[num_slots, win.words]`: every token's window of a windowed part, slot-major."""
    assert win is not None
    pages, rows, _ = arr.shape
    w = arr[:, :, : win.group * win.window].reshape(pages, rows, win.group, win.window)[..., : win.words]
    return w.reshape(pages * rows * win.group, win.words)


def _windows_to_np(words: np.ndarray, win: Windows | None, pages: int, page_size: int) -> np.ndarray:
    """The windowed part `[pages, page_size / group, row]` holding `words` `[pages · page_size, words]`."""
    assert win is not None
    rows = page_size // win.group
    out = np.zeros((pages, rows, win.row), np.uint32)
    windows = out[:, :, : win.group * win.window].reshape(pages, rows, win.group, win.window)
    windows[..., : win.words] = words.reshape(pages, rows, win.group, win.words)
    out[:, :, : win.group * win.window] = windows.reshape(pages, rows, -1)
    return out


def _bf16_pairs_np(bits: np.ndarray) -> np.ndarray:
    half = bits.shape[1] // 2
    return bits[:, :half] | (bits[:, half:] << 16)


def _bf16_bits_from_pairs(words: np.ndarray) -> np.ndarray:
    return np.concatenate([words & 0xFFFF, words >> 16], axis=1)


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
