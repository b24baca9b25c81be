"""The public hypothesis kit: strategies produce what they promise, helpers catch what they should."""

import numpy as np
import pytest
from hypothesis import given

from dsa_hybrid import reference, testing


@given(testing.mla_problems())
def test_mla_problems_are_well_formed(p):
    T, h, D = p.q.shape
    assert p.kv.shape[1] == D and 0 < p.d_v <= D and p.indices.shape[0] == T
    N = p.kv.shape[0]
    for row in p.indices:
        valid = row[(row >= 0) & (row < N)]
        assert np.unique(valid).size == valid.size  # valid entries are distinct
        assert np.all((row == -1) | (row >= 0))


@given(testing.index_rows(n_slots=10, rows=4, k=6, allow_invalid=False))
def test_index_rows_without_invalid_are_full(rows):
    assert rows.shape == (4, 6)
    assert np.all((rows >= 0) & (rows < 10))  # 10 slots ≥ k = 6: every entry valid
    assert all(np.unique(r).size == 6 for r in rows)


@given(testing.ragged_batches())
def test_ragged_batches_flatten_consistently(b):
    assert b.seq_of_token.shape == b.position_of_token.shape == (b.new_tokens.sum(),)
    for s in range(len(b.lengths)):
        pos = b.position_of_token[b.seq_of_token == s]
        assert pos.tolist() == list(range(b.lengths[s], b.lengths[s] + b.new_tokens[s]))


@given(testing.indexer_problems())
def test_indexer_problems_positions_are_visible(p):
    assert np.all(p.positions < p.k.shape[0]) and p.q.shape[:2] == p.w.shape


def test_assert_close_catches_differences_and_infinities():
    testing.assert_close([1.0, np.inf], [1.0 + 1e-6, np.inf], np.float32)
    with pytest.raises(AssertionError):
        testing.assert_close([1.0], [1.01], np.float32)
    with pytest.raises(AssertionError):
        testing.assert_close([np.inf], [1.0], np.float32)
    with pytest.raises(AssertionError, match="NaN"):
        testing.assert_close([np.nan], [np.nan], np.float32)
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_close([1.0, 2.0], [1.0], np.float32)
    testing.assert_close([1.0], [1.01], testing.bfloat16)  # bf16 tolerance is looser


def test_assert_mla_close_checks_empty_rows():
    ref_out, ref_lse = np.zeros((1, 1, 2)), np.array([[np.inf]])
    testing.assert_mla_close(ref_out, ref_lse, ref_out, ref_lse)
    with pytest.raises(AssertionError, match="lse"):
        testing.assert_mla_close(ref_out, np.array([[0.0]]), ref_out, ref_lse)
    with pytest.raises(AssertionError, match="exactly zero"):
        testing.assert_mla_close(np.ones((1, 1, 2)), ref_lse, ref_out, ref_lse)


def test_topk_helpers_allow_exact_ties_only():
    scores = np.array([[3.0, 1.0, 2.0, 2.0, 0.5]])
    pos = np.array([4])
    expected = reference.select_topk(scores, pos, 2)  # [[0, 2]]: tie 2 vs 3 goes to 2
    testing.assert_topk_equal(expected, expected)
    tie_swapped = np.array([[3, 0]])
    testing.assert_topk_equal(tie_swapped, expected, scores)
    testing.assert_valid_topk(tie_swapped, scores, pos, 2)
    with pytest.raises(AssertionError, match="differ"):
        testing.assert_topk_equal(tie_swapped, expected)  # without scores ties are not excused
    wrong = np.array([[0, 1]])
    with pytest.raises(AssertionError, match="beyond ties"):
        testing.assert_topk_equal(wrong, expected, scores)
    with pytest.raises(AssertionError, match="scores"):
        testing.assert_valid_topk(wrong, scores, pos, 2)
    with pytest.raises(AssertionError, match="visible"):
        testing.assert_valid_topk(np.array([[0, 2]]), scores, np.array([1]), 2)
    with pytest.raises(AssertionError, match="duplicate"):
        testing.assert_valid_topk(np.array([[0, 0]]), scores, pos, 2)
    with pytest.raises(AssertionError, match="selected"):
        testing.assert_valid_topk(np.array([[0, -1]]), scores, pos, 2)
    assert testing.topk_recall(np.array([[0, 1]]), expected) == 0.5
    assert testing.topk_recall(np.array([[-1, -1]]), np.array([[-1, -1]])) == 1.0


def test_tolerance_knows_the_dtypes():
    assert testing.tolerance(np.float64)[0] < testing.tolerance(np.float32)[0] < testing.tolerance(testing.bfloat16)[0]
    with pytest.raises(KeyError):
        testing.tolerance(np.int32)
