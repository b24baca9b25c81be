"""`dsa_hybrid.topk`: the host SIMD top-k (dsa.md §5) against `reference.select_topk`, on every SIMD path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dsa_hybrid as dh
from dsa_hybrid import reference as ref
from dsa_hybrid.testing import assert_topk_equal

ALL_PATHS = ("scalar", "avx2", "avx512", "neon")


def _supported(path: str) -> bool:
    try:
        dh.set_simd_path(path)
        return True
    except ValueError:
        return False
    finally:
        dh.set_simd_path(None)


SIMD_PATHS = [p for p in ALL_PATHS if _supported(p)]


@pytest.fixture(params=SIMD_PATHS)
def simd_path(request: pytest.FixtureRequest):
    dh.set_simd_path(request.param)
    yield request.param
    dh.set_simd_path(None)


def _oracle(scores: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """reference.select_topk per row, with length 0 (no visible key) giving an all −1 row."""
    out = np.full((scores.shape[0], k), -1, dtype=np.int32)
    for t, n in enumerate(lengths):
        if n:
            out[t] = ref.select_topk(scores[t : t + 1, :n], np.array([n - 1]), k)[0]
    return out


@st.composite
def score_rows(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    T = draw(st.integers(1, 4))
    L = draw(st.sampled_from([1, 7, 63, 64, 100, 2049, 5000, 40_000]))
    k = draw(st.sampled_from([1, 2, 16, 100, 2048]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "relu_ties", "few_levels", "sorted", "constant"]))
    if kind == "normal":
        s = rng.standard_normal((T, L)).astype(np.float32)
    elif kind == "relu_ties":  # what few indexer heads produce: many exact zeros, some −0.0
        s = np.maximum(rng.standard_normal((T, L)), 0).astype(np.float32)
        s[rng.random((T, L)) < 0.1] = -0.0
    elif kind == "few_levels":
        s = rng.integers(0, 4, (T, L)).astype(np.float32)
    elif kind == "sorted":
        s = np.tile(np.arange(L, dtype=np.float32), (T, 1))
    else:
        s = np.full((T, L), 3.0, np.float32)
    if draw(st.booleans()):
        s[rng.random((T, L)) < 0.01] = draw(st.sampled_from([np.inf, -np.inf]))
    lengths = np.asarray(draw(st.lists(st.integers(0, L), min_size=T, max_size=T)), dtype=np.int64)
    return s, lengths, k


@given(score_rows())
def test_topk_equals_the_reference_on_every_path(problem: tuple[np.ndarray, np.ndarray, int]) -> None:
    scores, lengths, k = problem
    want = _oracle(scores, lengths, k)
    for path in SIMD_PATHS:
        dh.set_simd_path(path)
        try:
            got = dh.topk(scores, k, lengths)
            by_score = dh.topk(scores, k, lengths, sorted=True)
        finally:
            dh.set_simd_path(None)
        assert got.dtype == np.int32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=path)
        # sorted=True: the same positions, listed by descending score (ties: lower position first).
        for t in range(scores.shape[0]):
            row = by_score[t][by_score[t] >= 0]
            np.testing.assert_array_equal(np.sort(row), want[t][want[t] >= 0])
            keyed = list(zip((-scores[t, row].astype(np.float64) + 0.0).tolist(), row.tolist(), strict=True))
            assert keyed == sorted(keyed)


def test_full_rows_and_threads(simd_path: str) -> None:
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((8, 70_000)).astype(np.float32)
    want = ref.select_topk(scores, np.full(8, 69_999), 2048)
    for threads in (None, 1, 2, 3):
        got = dh.topk(scores, 2048, threads=threads)
        assert_topk_equal(got, want)
        np.testing.assert_array_equal(got, want)


def test_other_float_dtypes_are_converted() -> None:
    s = np.array([[0.5, 2.0, -1.0, 2.0]], dtype=np.float64)
    np.testing.assert_array_equal(dh.topk(s, 2), [[1, 3]])
    np.testing.assert_array_equal(dh.topk(s.astype(np.float16), 3, sorted=True), [[1, 3, 0]])


@pytest.mark.parametrize("where", [0, 777, 69_999])
def test_nan_among_visible_scores_is_refused(simd_path: str, where: int) -> None:
    s = np.ones((3, 70_000), np.float32)
    s[1, where] = np.nan
    with pytest.raises(ValueError, match="NaN in row 1"):
        dh.topk(s, 2048)
    # Past the row's visible length a NaN is not looked at.
    lengths = np.array([70_000, where, 5])
    assert dh.topk(s, 4, lengths).shape == (3, 4)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda s: dh.topk(s, 0), ValueError, "k: must be at least 1"),
        (lambda s: dh.topk(s[0], 2), ValueError, r"scores: expected shape \[T, L\]"),
        (lambda s: dh.topk(s.astype(np.int32), 2), TypeError, "scores: expected a float array"),
        (lambda s: dh.topk(s, 2, [1, 2]), ValueError, "lengths: 2 entries for 3 rows"),
        (lambda s: dh.topk(s, 2, [1, 2, 11]), ValueError, "lengths: entry 2 is 11"),
        (lambda s: dh.topk(s, 2, [1, -1, 3]), ValueError, "lengths: entry 1 is -1"),
        (lambda s: dh.topk(s, 2, [1.5, 2, 3]), ValueError, "lengths: expected integers"),
        (lambda s: dh.topk(s, 2, threads=0), ValueError, "threads: must be at least 1"),
    ],
)
def test_bad_arguments_get_clear_errors(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call(np.zeros((3, 10), np.float32))


def test_simd_path_can_be_pinned_and_restored() -> None:
    best = dh.cpu_features()["simd_path"]
    assert best in SIMD_PATHS
    assert dh.set_simd_path("scalar") == "scalar"
    assert dh.cpu_features()["simd_path"] == "scalar"
    assert dh.set_simd_path(None) == best
    with pytest.raises(ValueError, match="unknown SIMD path"):
        dh.set_simd_path("sse9")
    missing = [p for p in ALL_PATHS if p not in SIMD_PATHS]
    for p in missing:
        with pytest.raises(ValueError, match="cannot run"):
            dh.set_simd_path(p)
    assert dh.cpu_features()["simd_path"] == best
