"""A public hypothesis kit for testing DSA kernels against `dsa_hybrid.reference`.

Strategies draw small, varied problems (shapes, −1 and out-of-range indices, ties, ragged batches);
assertion helpers compare outputs with per-dtype tolerances and compare top-k selections while
allowing exact ties. dsa_hybrid's own tests use them; so can anyone testing their own kernel:

    from hypothesis import given
    from dsa_hybrid import reference, testing

    @given(testing.mla_problems())
    def test_my_kernel(p):
        out, lse = my_sparse_mla(p.q, p.kv, p.indices, p.scale, p.d_v)
        ref_out, ref_lse = reference.sparse_mla(p.q, p.kv, p.indices, p.scale, p.d_v)
        testing.assert_mla_close(out, lse, ref_out, ref_lse, dtype=np.float32)

Array contents come from a drawn seed and numpy's generator (fast, reproducible, shrinks well);
shapes, index patterns and edge cases are drawn by hypothesis itself. Needs `hypothesis`
(`pip install "dsa_hybrid[testing]"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from dsa_hybrid.models.config import SUPPORTED_MODEL_TYPES, DSAConfig

__all__ = [
    "IndexerProblem",
    "MLAProblem",
    "RaggedBatch",
    "assert_close",
    "assert_mla_close",
    "assert_topk_equal",
    "assert_valid_topk",
    "dsa_configs",
    "float_arrays",
    "index_rows",
    "indexer_problems",
    "mla_problems",
    "ragged_batches",
    "tolerance",
    "topk_recall",
]

# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------

# (rtol, atol) for comparing a result computed in `dtype` against the float64 oracle, for outputs
# of order 1 (attention outputs are convex combinations of rows of order 1).
_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-5),
    "float16": (5e-3, 5e-3),
    "bfloat16": (3e-2, 3e-2),
    "float8_e4m3fn": (1.5e-1, 1e-1),
}


def tolerance(dtype: Any) -> tuple[float, float]:
    """`(rtol, atol)` for comparing a result computed in `dtype` with the float64 reference."""
    name = np.dtype(dtype).name
    if name not in _TOLERANCES:
        raise KeyError(f"no tolerance for dtype {name}; known: {sorted(_TOLERANCES)}")
    return _TOLERANCES[name]


def assert_close(
    actual: Any,
    expected: Any,
    dtype: Any = np.float32,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    what: str = "values",
) -> None:
    """Assert `actual ≈ expected` elementwise with the tolerance of `dtype` (override with rtol/atol).
    Shapes must match; infinities must match exactly (same place, same sign); NaN never passes."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    if np.isnan(a).any() or np.isnan(e).any():
        raise AssertionError(f"{what}: NaN present (actual: {np.isnan(a).sum()}, expected: {np.isnan(e).sum()})")
    d_rtol, d_atol = tolerance(dtype)
    np.testing.assert_allclose(
        a, e, rtol=d_rtol if rtol is None else rtol, atol=d_atol if atol is None else atol, err_msg=what
    )


def assert_mla_close(
    out: Any, lse: Any, ref_out: Any, ref_lse: Any, dtype: Any = np.float32, *, atol: float | None = None
) -> None:
    """Compare a sparse-MLA result `(out [T, h, d_v], lse [T, h])` with the reference: empty rows must
    have `lse = +inf` and `out = 0` exactly where the reference does; the rest within `dtype`'s tolerance."""
    lse, ref_lse = np.asarray(lse, dtype=np.float64), np.asarray(ref_lse, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if lse.shape != ref_lse.shape:
        raise AssertionError(f"lse: shape {lse.shape} != expected {ref_lse.shape}")
    empty = np.isposinf(ref_lse)
    if not np.array_equal(np.isposinf(lse), empty):
        raise AssertionError(f"lse: +inf (empty rows) at {np.argwhere(np.isposinf(lse) != empty)[:5].tolist()} differ")
    if np.any(out[empty] != 0.0):
        raise AssertionError("out: rows with no valid index must be exactly zero")
    assert_close(lse[~empty], ref_lse[~empty], dtype, atol=atol, what="lse")
    assert_close(out, ref_out, dtype, atol=atol, what="out")


# ---------------------------------------------------------------------------------------------
# Top-k comparisons
# ---------------------------------------------------------------------------------------------


def _visible_count(positions: np.ndarray, k: int) -> np.ndarray:
    return np.minimum(np.asarray(positions, dtype=np.int64) + 1, k)


def assert_valid_topk(indices: Any, scores: Any, positions: Any, k: int) -> None:
    """Assert `indices` (`[T, k]`) is *a* correct top-k selection per dsa.md §5 for `scores [T, L]` and
    query `positions [T]`: each row holds `min(k, p_t + 1)` distinct positions in `[0, p_t]`, the rest
    −1, and no unselected visible key scores higher than a selected one. (Exact ties may go either way;
    `assert_topk_equal` additionally checks the lowest-position tie rule.)"""
    idx = np.asarray(indices)
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.int64)
    if idx.ndim != 2 or idx.shape != (s.shape[0], k):
        raise AssertionError(f"indices: shape {idx.shape} != {(s.shape[0], k)}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise AssertionError(f"indices: dtype {idx.dtype} is not an integer type")
    want = _visible_count(pos, k)
    for t in range(idx.shape[0]):
        row = idx[t]
        sel = row[row != -1]
        if sel.size != want[t]:
            raise AssertionError(f"row {t}: {sel.size} selected (want {want[t]}), entries {row[:16].tolist()}...")
        if np.unique(sel).size != sel.size:
            raise AssertionError(f"row {t}: duplicate positions selected")
        if sel.size and (sel.min() < 0 or sel.max() > pos[t]):
            raise AssertionError(f"row {t}: position outside the visible range [0, {pos[t]}]")
        visible = s[t, : pos[t] + 1]
        unselected = np.ones(visible.size, dtype=bool)
        unselected[sel] = False
        if unselected.any() and sel.size:
            best_left, worst_kept = visible[unselected].max(), visible[sel].min()
            if best_left > worst_kept:
                raise AssertionError(f"row {t}: an unselected key scores {best_left} > selected {worst_kept}")


def assert_topk_equal(actual: Any, expected: Any, scores: Any = None, *, tie_atol: float = 0.0) -> None:
    """Assert two top-k selections (`[T, k]`, −1 padded, any order within a row) pick the same sets.

    Without `scores`, the sets must be identical. With `scores` (`[T, L]`), a row may differ only in
    positions whose score is within `tie_atol` of the row's boundary score (the k-th largest selected
    score), i.e. only among ties; `tie_atol=0` allows exact ties only.
    """
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape != e.shape:
        raise AssertionError(f"top-k shapes differ: {a.shape} vs {e.shape}")
    s = None if scores is None else np.asarray(scores, dtype=np.float64)
    for t in range(a.shape[0]):
        sa, se = set(a[t][a[t] != -1].tolist()), set(e[t][e[t] != -1].tolist())
        if sa == se:
            continue
        if len(sa) != len(se):
            raise AssertionError(f"row {t}: {len(sa)} selected vs {len(se)} expected")
        diff = sorted(sa ^ se)
        if s is None:
            raise AssertionError(f"row {t}: selections differ at positions {diff[:10]}")
        boundary = s[t, sorted(se)].min()
        off = [p for p in diff if abs(s[t, p] - boundary) > tie_atol]
        if off:
            raise AssertionError(
                f"row {t}: selections differ beyond ties at positions {off[:10]} "
                f"(scores {s[t, off[:5]].tolist()}, boundary {boundary})"
            )


def topk_recall(actual: Any, expected: Any) -> float:
    """Mean over rows of `|actual ∩ expected| / |expected|` (rows with nothing expected count as 1)."""
    a, e = np.asarray(actual), np.asarray(expected)
    recalls = []
    for ra, re in zip(a, e, strict=True):
        se = set(re[re != -1].tolist())
        recalls.append(1.0 if not se else len(se & set(ra[ra != -1].tolist())) / len(se))
    return float(np.mean(recalls)) if recalls else 1.0


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

_seeds = st.integers(min_value=0, max_value=2**32 - 1)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _cast(x: np.ndarray, dtype: Any) -> np.ndarray:
    return x.astype(np.dtype(dtype))


@st.composite
def float_arrays(
    draw: st.DrawFn, shape: tuple[int, ...], dtype: Any = np.float32, scale: float = 1.0, ties: bool = False
) -> np.ndarray:
    """A random normal array of `shape` in `dtype` (float32, float16, bfloat16, float64), × `scale`.
    With `ties`, values are snapped to a coarse grid so that many are exactly equal."""
    x = _rng(draw(_seeds)).standard_normal(shape) * scale
    if ties:
        x = np.round(x * 2.0) / 2.0
    return _cast(x, dtype)


@st.composite
def dsa_configs(draw: st.DrawFn, model_types: tuple[str, ...] = SUPPORTED_MODEL_TYPES) -> DSAConfig:
    """Small `DSAConfig`s of either model type, with varied heads, widths and `index_topk`."""
    base = DSAConfig.tiny(draw(st.sampled_from(model_types)))
    d_rope = draw(st.sampled_from([4, 8, 16]))
    return base.replace(
        num_attention_heads=draw(st.sampled_from([1, 2, 4, 8])),
        kv_lora_rank=draw(st.sampled_from([8, 16, 32])),
        qk_nope_head_dim=draw(st.sampled_from([8, 16])),
        qk_rope_head_dim=d_rope,
        v_head_dim=draw(st.sampled_from([8, 16])),
        index_n_heads=draw(st.sampled_from([1, 2, 4, 8])),
        index_head_dim=draw(st.sampled_from([d for d in (16, 32, 64, 128) if d >= d_rope])),
        index_topk=draw(st.integers(1, 32)),
    )


@dataclass(frozen=True)
class IndexerProblem:
    """One indexer scoring + top-k problem over a single sequence.

    q `[T, H, D]` post-RoPE queries; w `[T, H]` head weights; k `[L, D]` post-RoPE keys; positions `[T]`
    absolute query positions (each `< L`); topk the `k` of the selection.
    """

    q: np.ndarray
    w: np.ndarray
    k: np.ndarray
    positions: np.ndarray
    topk: int


@st.composite
def indexer_problems(
    draw: st.DrawFn,
    max_tokens: int = 6,
    max_keys: int = 200,
    heads: tuple[int, ...] = (1, 2, 4, 8),
    head_dims: tuple[int, ...] = (16, 32, 128),
    max_topk: int = 64,
    dtype: Any = np.float32,
) -> IndexerProblem:
    """An `IndexerProblem`: L from 1 (including L < topk), positions anywhere in [0, L) — decode at the
    last key or prefill in the middle — weights of both signs, optionally heavy ties."""
    T = draw(st.integers(1, max_tokens))
    L = draw(st.integers(1, max_keys))
    H = draw(st.sampled_from(heads))
    D = draw(st.sampled_from(head_dims))
    ties = draw(st.booleans())
    q = draw(float_arrays((T, H, D), dtype, ties=ties))
    k = draw(float_arrays((L, D), dtype, ties=ties))
    w = draw(float_arrays((T, H), dtype, scale=H**-0.5))
    positions = np.asarray(draw(st.lists(st.integers(0, L - 1), min_size=T, max_size=T)), dtype=np.int32)
    return IndexerProblem(q=q, w=w, k=k, positions=positions, topk=draw(st.integers(1, max_topk)))


@st.composite
def index_rows(
    draw: st.DrawFn, n_slots: int, rows: int, k: int, allow_invalid: bool = True, allow_empty: bool = True
) -> np.ndarray:
    """int32 `[rows, k]` index rows into `n_slots` cache slots: valid entries are distinct within a
    row; with `allow_invalid`, −1 and out-of-range entries (≥ n_slots) are mixed in at random places;
    with `allow_empty`, some rows have no valid entry at all."""
    rng = _rng(draw(_seeds))
    out = np.empty((rows, k), dtype=np.int32)
    for r in range(rows):
        max_valid = min(k, n_slots)
        lo = 0 if allow_empty else min(1, max_valid)
        n_valid = draw(st.integers(lo, max_valid))
        if not allow_invalid:
            n_valid = max_valid
        row = np.full(k, -1, dtype=np.int64)
        row[:n_valid] = rng.choice(n_slots, size=n_valid, replace=False)
        if allow_invalid and n_valid < k:
            bad = rng.random(k - n_valid) < 0.3
            row[n_valid:][bad] = n_slots + rng.integers(0, 1000, size=int(bad.sum()))
        out[r] = rng.permutation(row)
    return out


@dataclass(frozen=True)
class MLAProblem:
    """One sparse-MLA problem: q `[T, h, D]`, kv `[N, D]`, indices `[T, K]`, `scale`, `d_v ≤ D`."""

    q: np.ndarray
    kv: np.ndarray
    indices: np.ndarray
    scale: float
    d_v: int


@st.composite
def mla_problems(
    draw: st.DrawFn,
    max_tokens: int = 5,
    max_slots: int = 96,
    heads: tuple[int, ...] = (1, 2, 4, 16),
    widths: tuple[tuple[int, int], ...] = ((16, 8), (32, 16), (64, 64)),
    max_topk: int = 48,
    dtype: Any = np.float32,
) -> MLAProblem:
    """An `MLAProblem` with `D = d_v + d_rope` drawn from `widths` (pairs `(d_v, d_rope)`), −1 and
    out-of-range indices, empty rows, and logits large enough that the softmax is not flat."""
    T = draw(st.integers(1, max_tokens))
    N = draw(st.integers(1, max_slots))
    h = draw(st.sampled_from(heads))
    d_v, d_rope = draw(st.sampled_from(widths))
    D = d_v + d_rope
    K = draw(st.integers(1, max_topk))
    q = draw(float_arrays((T, h, D), dtype))
    kv = draw(float_arrays((N, D), dtype))
    indices = draw(index_rows(N, T, K))
    scale = draw(st.sampled_from([D**-0.5, 0.1352338, 1.0]))
    return MLAProblem(q=q, kv=kv, indices=indices, scale=scale, d_v=d_v)


@dataclass(frozen=True)
class RaggedBatch:
    """A batch of sequences of different lengths, flattened token-major as kernels see it.

    lengths `[B]` tokens already in each sequence's cache (0 allowed); new_tokens `[B]` tokens each
    sequence adds this step (1 = decode, more = prefill chunk, 0 = idle); seq_of_token `[T]` and
    position_of_token `[T]` for the flattened new tokens.
    """

    lengths: np.ndarray
    new_tokens: np.ndarray
    seq_of_token: np.ndarray
    position_of_token: np.ndarray


@st.composite
def ragged_batches(draw: st.DrawFn, max_seqs: int = 5, max_len: int = 300, max_new: int = 8) -> RaggedBatch:
    """A `RaggedBatch` mixing decodes, prefill chunks, empty caches and idle sequences."""
    B = draw(st.integers(1, max_seqs))
    lengths = np.asarray(draw(st.lists(st.integers(0, max_len), min_size=B, max_size=B)), dtype=np.int64)
    new = np.asarray(draw(st.lists(st.integers(0, max_new), min_size=B, max_size=B)), dtype=np.int64)
    seq = np.repeat(np.arange(B), new)
    pos = np.concatenate([lengths[b] + np.arange(new[b]) for b in range(B)]) if new.sum() else np.zeros(0, np.int64)
    return RaggedBatch(
        lengths=lengths,
        new_tokens=new,
        seq_of_token=seq.astype(np.int32),
        position_of_token=pos.astype(np.int32),
    )


# bfloat16 is not a numpy builtin: expose it so users can pass `testing.bfloat16` as a dtype.
bfloat16 = ml_dtypes.bfloat16
