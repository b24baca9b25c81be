"""The float64 numpy oracle of `docs/dsa.md`: plain, readable, and the ground truth.

Every fast path in dsa_hybrid (Rust host core, JAX/XLA, Pallas TPU) is tested against
these functions. They favour clarity over speed; read them to learn DSA.

Contents, in the order of the spec:

- §2  RoPE: `rope_freqs` (with YaRN), `apply_rope` (interleaved or half-split pairing)
- §3  MLA: `rms_norm`, `layer_norm`, `absorb_query`, `sparse_mla`, `dense_mla`, `mla_output`
- §4  Lightning indexer: `hadamard`, FP8 e4m3fn (`fp8_encode`, `fp8_decode`, `pow2_scale`,
      `quantize_fp8`, `dequantize_fp8`), `indexer_scores` (exact) and `indexer_scores_fp8`
- §5  Top-k: `select_topk`, `positions_to_slots`
- §6  Byte layouts: indexer-key pages (132 B/token) and MLA latent rows (656 B FP8, 1152 B bf16)
- §7  Indexer training objective: `indexer_kl_loss`

Conventions: `T` query tokens, `L` keys, `h` attention heads, `H` indexer heads, `D` widths.
Arrays come in as any float dtype and are computed in float64.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    from dsa_hybrid.models.config import YarnScaling

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
INDEXER_PAGE_TOKENS = 64
MLA_FP8_TILE = 128


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# §2 RoPE
# ---------------------------------------------------------------------------------------------


def rope_freqs(d_rope: int, theta: float, yarn: YarnScaling | None = None) -> np.ndarray:
    """Frequencies `f_i = theta^(-2i/d_rope)`, i < d_rope/2, with the YaRN ramp when `yarn` is set
    (and its factor > 1). Returns float64 `[d_rope // 2]`."""
    i = np.arange(d_rope // 2, dtype=np.float64)
    freqs = theta ** (-2.0 * i / d_rope)
    if yarn is None or yarn.factor <= 1.0:
        return freqs
    low, high = yarn_ramp_bounds(d_rope, theta, yarn)
    ramp = np.clip((i - low) / max(high - low, 1e-3), 0.0, 1.0)
    return freqs / yarn.factor * ramp + freqs * (1.0 - ramp)


def yarn_ramp_bounds(d_rope: int, theta: float, yarn: YarnScaling) -> tuple[int, int]:
    """The dims `(low, high)` between which YaRN blends interpolated and original frequencies
    (10 and 23 for DeepSeek-V3.2)."""

    def dim_for_rotations(n_rot: float) -> float:
        return d_rope * math.log(yarn.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = math.floor(dim_for_rotations(yarn.beta_fast))
    high = math.ceil(dim_for_rotations(yarn.beta_slow))
    half = d_rope // 2 - 1
    return max(low, 0), min(high, half)


def apply_rope(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray, pairing: str) -> np.ndarray:
    """Rotate the last dim of `x` (`[..., d_rope]`) by angles `positions[...] * freqs`.

    `positions` broadcasts against `x.shape[:-1]` (e.g. `[T]` against `[T, d]` needs `[T]`; for
    `[T, H, d]` pass `positions[:, None]`). `pairing`:
    - "interleaved" rotates `(x[2i], x[2i+1])`,
    - "half" (NeoX) rotates `(x[i], x[i + d/2])`.
    """
    x = _f64(x)
    angles = _f64(positions)[..., None] * _f64(freqs)  # [..., d/2]
    cos, sin = np.cos(angles), np.sin(angles)
    if pairing == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
    elif pairing == "half":
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
    else:
        raise ValueError(f"pairing must be 'interleaved' or 'half', got {pairing!r}")
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty(np.broadcast_shapes(x.shape, ra.shape[:-1] + (x.shape[-1],)))
    if pairing == "interleaved":
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :half], out[..., half:] = ra, rb
    return out


# ---------------------------------------------------------------------------------------------
# §3 MLA
# ---------------------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """`x / sqrt(mean(x²) + eps) * weight` over the last dim."""
    x = _f64(x)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * _f64(weight)


def layer_norm(
    x: np.ndarray, weight: np.ndarray | None = None, bias: np.ndarray | None = None, eps: float = 1e-6
) -> np.ndarray:
    """LayerNorm over the last dim, with optional affine weight and bias (the indexer's `k_norm`)."""
    x = _f64(x)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    return y


def split_kv_b(w_kv_b: np.ndarray, n_heads: int, d_nope: int, d_v: int) -> tuple[np.ndarray, np.ndarray]:
    """View `kv_b_proj.weight` (`[h·(d_nope + d_v), r_kv]`) as
    `(W_UK [h, d_nope, r_kv], W_UV [h, d_v, r_kv])`."""
    w = _f64(w_kv_b).reshape(n_heads, d_nope + d_v, -1)
    return w[:, :d_nope, :], w[:, d_nope:, :]


def absorb_query(q_nope: np.ndarray, q_pe: np.ndarray, w_uk: np.ndarray) -> np.ndarray:
    """Absorbed query `[q_nope · W_UK | q_pe]`: `q_nope [T, h, d_nope]`, `q_pe [T, h, d_rope]` (already
    rotated), `w_uk [h, d_nope, r_kv]` → `[T, h, r_kv + d_rope]`."""
    q_lat = np.einsum("thn,hnr->thr", _f64(q_nope), _f64(w_uk))
    return np.concatenate([q_lat, _f64(q_pe)], axis=-1)


def mla_output(o_lat: np.ndarray, w_uv: np.ndarray) -> np.ndarray:
    """Per head `o[h] = W_UV[h] · o_lat[h]`: `o_lat [T, h, r_kv]`, `w_uv [h, d_v, r_kv]` → `[T, h, d_v]`.
    (The output projection `W_o` then acts on the heads concatenated.)"""
    return np.einsum("thr,hvr->thv", _f64(o_lat), _f64(w_uv))


def sparse_mla(
    q: np.ndarray, kv: np.ndarray, indices: np.ndarray, scale: float, d_v: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse MLA attention in absorbed (MQA) form (dsa.md §3).

    q:       `[T, h, D]` absorbed queries (`D = r_kv + d_rope`, 576 for DeepSeek-V3.2)
    kv:      `[N, D]` cached latent rows `[c_kv | k_pe]`; the values are the first `d_v` columns
    indices: `[T, K]` integer row numbers into `kv`; entries < 0 or >= N are invalid and skipped
    Returns `(out [T, h, d_v], lse [T, h])`, float64. A row with no valid index gets `out = 0` and
    `lse = +inf`. Valid duplicates count once each; the order of a row's indices does not matter.
    """
    q, kv = _f64(q), _f64(kv)
    indices = np.asarray(indices)
    T, h, D = q.shape
    if kv.ndim != 2 or kv.shape[1] != D:
        raise ValueError(f"kv must be [N, {D}], got {kv.shape}")
    if indices.ndim != 2 or indices.shape[0] != T:
        raise ValueError(f"indices must be [{T}, K], got {indices.shape}")
    if not 0 < d_v <= D:
        raise ValueError(f"d_v must be in (0, {D}], got {d_v}")
    N = kv.shape[0]
    valid = (indices >= 0) & (indices < N)  # [T, K]
    rows = kv[np.where(valid, indices, 0)]  # [T, K, D]; invalid ones are masked below

    logits = scale * np.einsum("thd,tkd->thk", q, rows)
    logits = np.where(valid[:, None, :], logits, -np.inf)
    m = logits.max(axis=-1, keepdims=True)  # -inf on empty rows
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(logits - m_safe)  # exactly 0 where invalid
    denom = p.sum(axis=-1)  # [T, h]
    empty = denom == 0.0
    out = np.einsum("thk,tkv->thv", p, rows[..., :d_v]) / np.where(empty, 1.0, denom)[..., None]
    lse = np.where(empty, np.inf, np.log(np.where(empty, 1.0, denom)) + m_safe[..., 0])
    return out, lse


def dense_mla(
    q: np.ndarray, kv: np.ndarray, positions: np.ndarray, scale: float, d_v: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Dense causal MLA attention over one sequence, written independently of `sparse_mla`.

    q: `[T, h, D]`; kv: `[L, D]` the sequence's rows by position; positions: `[T]` absolute position of
    each query token, which sees rows `0..positions[t]` (inclusive). Returns `(out [T, h, d_v], lse [T, h])`.
    """
    q, kv = _f64(q), _f64(kv)
    positions = np.asarray(positions)
    if np.any(positions >= kv.shape[0]) or np.any(positions < 0):
        raise ValueError("positions must lie in [0, L)")
    logits = scale * np.einsum("thd,ld->thl", q, kv)
    causal = np.arange(kv.shape[0])[None, :] <= positions[:, None]  # [T, L]
    logits = np.where(causal[:, None, :], logits, -np.inf)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    p = np.exp(logits - lse[..., None])
    return np.einsum("thl,lv->thv", p, kv[:, :d_v]), lse


# ---------------------------------------------------------------------------------------------
# §4 Lightning indexer: Hadamard, FP8, scores
# ---------------------------------------------------------------------------------------------


def hadamard(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh–Hadamard transform of the last dim (a power of two), Sylvester order:
    butterflies `(a, b) → (a + b, a − b)` at strides 1, 2, …, n/2, then `/ sqrt(n)`. Its own inverse."""
    y = _f64(x).copy()
    n = y.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"hadamard needs a power-of-two width, got {n}")
    h = 1
    while h < n:
        blocks = y.reshape(*y.shape[:-1], n // (2 * h), 2, h)
        a, b = blocks[..., 0, :].copy(), blocks[..., 1, :].copy()
        blocks[..., 0, :], blocks[..., 1, :] = a + b, a - b
        h *= 2
    return y / math.sqrt(n)


def _fp8_value(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * (man / 8.0) * 2.0**-6  # subnormal
    return sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)


FP8_E4M3_TABLE = np.array([_fp8_value(c) for c in range(256)], dtype=np.float64)
"""The value of every e4m3fn code (index = code), float64. 0x7F and 0xFF are NaN."""


def fp8_decode(codes: np.ndarray) -> np.ndarray:
    """e4m3fn codes (uint8) → float64 values."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"fp8 codes must be uint8, got {codes.dtype}")
    return FP8_E4M3_TABLE[codes]


def fp8_encode(x: np.ndarray) -> np.ndarray:
    """Float values → e4m3fn codes (uint8): saturate to ±448, round to nearest, ties to even.
    NaN is rejected (ValueError)."""
    x = _f64(x)
    if np.isnan(x).any():
        raise ValueError("fp8_encode: NaN cannot be quantized")
    sign = np.where(np.signbit(x), 0x80, 0x00)
    a = np.minimum(np.abs(x), E4M3_MAX)
    # Normal range: a = 2^e · (1 + m/8). frexp gives a = f · 2^E with f in [0.5, 1), so e = E − 1.
    _, E = np.frexp(a)
    e = E.astype(np.int64) - 1
    q = np.rint(np.ldexp(a, 3 - e)).astype(np.int64)  # in [8, 16]; rint rounds half to even
    carry = q == 16
    e, q = np.where(carry, e + 1, e), np.where(carry, 8, q)
    normal_code = ((e + 7) << 3) | (q - 8)
    # Subnormals are multiples of 2^-9; q == 8 rounds up to the smallest normal, code 0x08.
    subnormal_code = np.rint(a * 512.0).astype(np.int64)
    code = np.where(a >= 2.0**-6, normal_code, subnormal_code)
    return (sign | code).astype(np.uint8)


def pow2_scale(amax: np.ndarray) -> np.ndarray:
    """`2^ceil(log2(max(amax, 1e-4) / 448))` as float32, computed exactly: the smallest power of two
    `s` with `448·s >= amax`."""
    amax = np.maximum(_f64(amax), AMAX_FLOOR)
    k = np.ceil(np.log2(amax / E4M3_MAX))
    k = np.where(E4M3_MAX * np.exp2(k) < amax, k + 1, k)  # guard against log2 rounding
    k = np.where(E4M3_MAX * np.exp2(k - 1) >= amax, k - 1, k)
    return np.exp2(k).astype(np.float32)


def quantize_fp8(x: np.ndarray, tile: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Quantize the last dim of `x` in tiles of `tile` (default: the whole dim), one power-of-two scale
    per tile. Returns `(codes uint8, same shape as x; scales float32 [..., n_tiles])`; with `tile=None`
    the scales have shape `x.shape[:-1]`."""
    x = _f64(x)
    if not np.isfinite(x).all():
        raise ValueError("quantize_fp8: input contains NaN or inf")
    n = x.shape[-1]
    t = n if tile is None else tile
    if n % t:
        raise ValueError(f"quantize_fp8: width {n} is not a multiple of the tile {t}")
    tiles = x.reshape(*x.shape[:-1], n // t, t)
    scales = pow2_scale(np.abs(tiles).max(axis=-1, initial=0.0))  # [..., n_tiles]
    v = np.clip(tiles / scales[..., None].astype(np.float64), -E4M3_MAX, E4M3_MAX)
    codes = fp8_encode(v).reshape(x.shape)
    return codes, (scales[..., 0] if tile is None else scales)


def dequantize_fp8(codes: np.ndarray, scales: np.ndarray, tile: int | None = None) -> np.ndarray:
    """Inverse of `quantize_fp8` up to rounding: `value = e4m3(code) · scale` (float64)."""
    v = fp8_decode(codes)
    n = v.shape[-1]
    t = n if tile is None else tile
    s = _f64(scales)
    s = s[..., None] if tile is None else s
    return (v.reshape(*v.shape[:-1], n // t, t) * s[..., None]).reshape(v.shape)


def quantize_indexer_keys(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the indexer-key cache stores: Hadamard, then FP8 with one scale per key.
    `k [..., D]` (post-RoPE) → `(codes uint8 [..., D], scales float32 [...])`."""
    return quantize_fp8(hadamard(k))


def indexer_scores(q: np.ndarray, w: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Exact lightning-indexer scores (the paper's Eq. 1, dsa.md §4):
    `I[t, s] = Σ_j w[t, j] · ReLU(D^-0.5 · q[t, j] · k[s])`.

    q: `[T, H, D]` post-RoPE indexer queries; w: `[T, H]` head weights (already × H^-0.5);
    k: `[L, D]` post-RoPE keys. Returns float64 `[T, L]` (no causal mask: see `select_topk`).
    """
    q, w, k = _f64(q), _f64(w), _f64(k)
    logits = np.einsum("thd,ld->thl", q, k) * q.shape[-1] ** -0.5
    return np.einsum("th,thl->tl", w, np.maximum(logits, 0.0))


def indexer_scores_fp8(q: np.ndarray, w: np.ndarray, k_codes: np.ndarray, k_scales: np.ndarray) -> np.ndarray:
    """The deployed FP8 path (dsa.md §4), emulated exactly: queries are Hadamard-rotated and quantized
    per head, keys come already quantized (`quantize_indexer_keys`), products are exact.

    `I[t, s] = sk[s] · Σ_j (w[t, j] · D^-0.5 · sq[t, j]) · ReLU(q8[t, j] · k8[s])`.
    q: `[T, H, D]`, w: `[T, H]`, k_codes: uint8 `[L, D]`, k_scales: `[L]`. Returns float64 `[T, L]`.
    """
    q_codes, q_scales = quantize_fp8(hadamard(q))  # [T, H, D], [T, H]
    q8, k8 = fp8_decode(q_codes), fp8_decode(k_codes)
    head_w = _f64(w) * q.shape[-1] ** -0.5 * _f64(q_scales)  # [T, H]
    dots = np.maximum(np.einsum("thd,ld->thl", q8, k8), 0.0)
    return np.einsum("th,thl->tl", head_w, dots) * _f64(k_scales)[None, :]


# ---------------------------------------------------------------------------------------------
# §5 Top-k selection
# ---------------------------------------------------------------------------------------------


def select_topk(scores: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    """Top-k visible keys per query token (dsa.md §5).

    scores: `[T, L]` indexer scores, column = key position; positions: `[T]` absolute position `p_t`
    of each query token, which sees keys `0..p_t` (so `p_t < L`). Returns int32 `[T, k]`: the
    `min(k, p_t + 1)` visible positions with the largest scores, sorted ascending, padded with −1.
    Ties at the boundary go to the lowest position. NaN in a visible score raises ValueError.
    """
    scores = _f64(scores)
    positions = np.asarray(positions)
    T, L = scores.shape
    if positions.shape != (T,):
        raise ValueError(f"positions must be [{T}], got {positions.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if T and (positions.min() < 0 or positions.max() >= L):
        raise ValueError(f"positions must lie in [0, {L}) (scores has {L} columns)")
    out = np.full((T, k), -1, dtype=np.int32)
    for t in range(T):
        n = int(positions[t]) + 1
        row = scores[t, :n]
        if np.isnan(row).any():
            raise ValueError(f"scores: NaN in row {t} among its visible positions")
        # Sort by score descending, then position ascending: lexsort's last key is the primary one.
        order = np.lexsort((np.arange(n), -row))
        chosen = np.sort(order[: min(k, n)])
        out[t, : chosen.size] = chosen
    return out


def positions_to_slots(positions: np.ndarray, block_table: np.ndarray, block_size: int) -> np.ndarray:
    """Logical positions → cache slots: `block_table[pos // block_size] · block_size + pos % block_size`;
    −1 stays −1. positions: int `[...]` of one sequence, block_table: int `[n_blocks]`."""
    positions = np.asarray(positions, dtype=np.int64)
    block_table = np.asarray(block_table, dtype=np.int64)
    valid = positions >= 0
    safe = np.where(valid, positions, 0)
    if valid.any() and safe.max() // block_size >= block_table.shape[0]:
        raise ValueError("positions beyond the sequence's block table")
    slots = block_table[safe // block_size] * block_size + safe % block_size
    return np.where(valid, slots, -1).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# §6 Byte layouts
# ---------------------------------------------------------------------------------------------


def pack_indexer_pages(codes: np.ndarray, scales: np.ndarray, block_size: int = INDEXER_PAGE_TOKENS) -> np.ndarray:
    """Pack quantized indexer keys into pages (dsa.md §6). codes: uint8 `[n, D]`, scales: float32 `[n]`.
    Returns uint8 `[ceil(n / block_size), block_size · (D + 4)]`: per page, the `block_size × D` code
    bytes token-major, then `block_size` little-endian float32 scales. Unused slots are zero."""
    codes = np.asarray(codes, dtype=np.uint8)
    n, d = codes.shape
    n_pages = -(-n // block_size)
    fp8_part = np.zeros((n_pages * block_size, d), dtype=np.uint8)
    fp8_part[:n] = codes
    scale_part = np.zeros(n_pages * block_size, dtype="<f4")
    scale_part[:n] = np.asarray(scales, dtype=np.float32)
    pages = np.concatenate(
        [
            fp8_part.reshape(n_pages, block_size * d),
            scale_part.view(np.uint8).reshape(n_pages, block_size * 4),
        ],
        axis=1,
    )
    return pages


def unpack_indexer_pages(
    pages: np.ndarray, n: int, head_dim: int = 128, block_size: int = INDEXER_PAGE_TOKENS
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack_indexer_pages`: the first `n` tokens as `(codes uint8 [n, D], scales float32 [n])`."""
    pages = np.asarray(pages, dtype=np.uint8).reshape(-1, block_size * (head_dim + 4))
    split = block_size * head_dim
    codes = pages[:, :split].reshape(-1, head_dim)[:n]
    scales = np.ascontiguousarray(pages[:, split:]).view("<f4").reshape(-1)[:n]
    return codes.copy(), scales.astype(np.float32)


MLA_FP8_ROW_BYTES = 656
MLA_BF16_ROW_BYTES = 1152


def pack_mla_fp8(c_kv: np.ndarray, k_pe: np.ndarray) -> np.ndarray:
    """FlashMLA's FP8 latent rows (dsa.md §6): c_kv `[n, 512]`, k_pe `[n, 64]` → uint8 `[n, 656]`:
    512 e4m3 codes (4 tiles of 128, one power-of-two scale each), 4 float32 scales, 64 bf16 k_pe."""
    c_kv, k_pe = _f64(c_kv), _f64(k_pe)
    n = c_kv.shape[0]
    if c_kv.shape != (n, 512) or k_pe.shape != (n, 64):
        raise ValueError(f"expected c_kv [n, 512] and k_pe [n, 64], got {c_kv.shape} and {k_pe.shape}")
    codes, scales = quantize_fp8(c_kv, tile=MLA_FP8_TILE)  # [n, 512], [n, 4]
    rows = np.empty((n, MLA_FP8_ROW_BYTES), dtype=np.uint8)
    rows[:, :512] = codes
    rows[:, 512:528] = scales.astype("<f4").view(np.uint8).reshape(n, 16)
    rows[:, 528:] = k_pe.astype(ml_dtypes.bfloat16).view(np.uint8).reshape(n, 128)
    return rows


def unpack_mla_fp8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack_mla_fp8`: uint8 `[n, 656]` → `(c_kv float64 [n, 512], k_pe float64 [n, 64])`."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    n = rows.shape[0]
    scales = rows[:, 512:528].copy().view("<f4").reshape(n, 4)
    c_kv = dequantize_fp8(rows[:, :512], scales, tile=MLA_FP8_TILE)
    k_pe = rows[:, 528:].copy().view(ml_dtypes.bfloat16).reshape(n, 64).astype(np.float64)
    return c_kv, k_pe


def pack_mla_bf16(c_kv: np.ndarray, k_pe: np.ndarray) -> np.ndarray:
    """bf16 latent rows (dsa.md §6): `[c_kv 512 | k_pe 64]` as bf16 → uint8 `[n, 1152]`."""
    row = np.concatenate([_f64(c_kv), _f64(k_pe)], axis=-1).astype(ml_dtypes.bfloat16)
    return row.view(np.uint8).reshape(row.shape[0], MLA_BF16_ROW_BYTES)


def unpack_mla_bf16(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack_mla_bf16`: → `(c_kv float64 [n, 512], k_pe float64 [n, 64])`."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    v = rows.view(ml_dtypes.bfloat16).reshape(rows.shape[0], 576).astype(np.float64)
    return v[:, :512], v[:, 512:]


# ---------------------------------------------------------------------------------------------
# §7 Indexer training objective
# ---------------------------------------------------------------------------------------------


def indexer_kl_loss(attn_probs: np.ndarray, scores: np.ndarray, selected: np.ndarray | None = None) -> float:
    """`Σ_t KL(P[t] ‖ softmax(I[t]))` with `P[t]` = main attention probabilities summed over heads and
    L1-normalised (dsa.md §7). attn_probs: `[T, h, L]`, scores: `[T, L]` (−inf where not visible).
    With `selected` (`[T, K]` positions, −1 padded) both distributions are restricted to that set
    (the sparse training stage)."""
    p = _f64(attn_probs).sum(axis=1)
    s = _f64(scores)
    if selected is not None:
        mask = np.zeros_like(s, dtype=bool)
        sel = np.asarray(selected)
        rows = np.repeat(np.arange(s.shape[0]), sel.shape[1])
        ok = sel.reshape(-1) >= 0
        mask[rows[ok], sel.reshape(-1)[ok]] = True
        p = np.where(mask, p, 0.0)
        s = np.where(mask, s, -np.inf)
    p = p / p.sum(axis=-1, keepdims=True)
    log_q = s - (np.log(np.sum(np.exp(s - s.max(-1, keepdims=True)), -1, keepdims=True)) + s.max(-1, keepdims=True))
    has_mass = p > 0  # 0 · log 0 = 0, also where log_q = −inf
    terms = np.where(has_mass, p * (np.log(np.where(has_mass, p, 1.0)) - np.where(has_mass, log_q, 0.0)), 0.0)
    return float(terms.sum())


# ---------------------------------------------------------------------------------------------
# MoE block (DeepSeek-V3 / V3.2 and GLM-5: transformers' `DeepseekV3MoE`, `GlmMoeDsaMoE`)
# ---------------------------------------------------------------------------------------------


def _topk_stable(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest entries of each row, largest first; ties go to the lower index
    (as `jax.lax.top_k`; torch leaves the order of ties unspecified)."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def moe_route(
    router_logits: np.ndarray,
    e_score_correction_bias: np.ndarray,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `route_tokens_to_experts`: sigmoid scores; the correction bias is added for the
    choice only; each group of `E / n_group` experts is scored by the sum of its top-2 biased scores;
    only the `topk_group` best groups stay eligible; the `top_k` best eligible experts are chosen; their
    weights are the unbiased scores, normalised to sum 1 if `norm_topk_prob` (+1e-20), times
    `routed_scaling_factor`. Returns `(indices int [T, top_k], weights float64 [T, top_k])`."""
    scores = 1.0 / (1.0 + np.exp(-_f64(router_logits)))
    T, E = scores.shape
    choice = scores + _f64(e_score_correction_bias)
    grouped = choice.reshape(T, n_group, E // n_group)
    group_scores = np.sort(grouped, axis=-1)[..., ::-1][..., :2].sum(axis=-1)
    groups = _topk_stable(group_scores, topk_group)
    group_mask = np.zeros((T, n_group), bool)
    np.put_along_axis(group_mask, groups, True, axis=1)
    expert_mask = np.repeat(group_mask, E // n_group, axis=1)
    masked = np.where(expert_mask, choice, -np.inf)
    idx = _topk_stable(masked, top_k)
    weights = np.take_along_axis(scores, idx, axis=1)
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return idx, weights * routed_scaling_factor


def swiglu_mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """`down(silu(gate(x)) · up(x))`, linear weights `[out, in]`."""
    x = _f64(x)
    g = x @ _f64(gate).T
    return ((g / (1.0 + np.exp(-g))) * (x @ _f64(up).T)) @ _f64(down).T


def moe_block(
    x: np.ndarray,
    router: np.ndarray,
    e_score_correction_bias: np.ndarray,
    experts_gate: np.ndarray,
    experts_up: np.ndarray,
    experts_down: np.ndarray,
    shared_gate: np.ndarray | None,
    shared_up: np.ndarray | None,
    shared_down: np.ndarray | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> np.ndarray:
    """The MoE MLP of one token batch `x` `[T, d]`: router `[E, d]`, routed experts' SwiGLU weights
    `experts_gate`/`experts_up` `[E, I, d]` and `experts_down` `[E, d, I]`, plus the shared experts'
    SwiGLU (`[n_shared·I, d]`, ..., or None) applied to every token. Each token, one at a time:
    `Σ_j w_j · expert_{e_j}(x) + shared(x)` with `(e, w) = moe_route(x @ router.T, ...)`."""
    x = _f64(x)
    idx, weights = moe_route(
        x @ _f64(router).T, e_score_correction_bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor
    )
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(idx[t], weights[t], strict=True):
            out[t] += w * swiglu_mlp(x[t : t + 1], experts_gate[e], experts_up[e], experts_down[e])[0]
    if shared_gate is not None:
        assert shared_up is not None and shared_down is not None
        out += swiglu_mlp(x, shared_gate, shared_up, shared_down)
    return out
