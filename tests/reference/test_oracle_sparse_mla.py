"""dsa.md §3: sparse MLA attention in absorbed form, its edge cases, and dense causal MLA."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsa_hybrid import DSAConfig, reference, testing


@given(testing.mla_problems())
def test_sparse_mla_matches_a_per_row_softmax(p):
    out, lse = reference.sparse_mla(p.q, p.kv, p.indices, p.scale, p.d_v)
    N = p.kv.shape[0]
    for t in range(p.q.shape[0]):
        sel = [i for i in p.indices[t].tolist() if 0 <= i < N]
        if not sel:
            assert np.all(out[t] == 0) and np.all(np.isposinf(lse[t]))
            continue
        logits = p.scale * p.q[t].astype(float) @ p.kv[sel].astype(float).T  # [h, |S|]
        want_lse = np.log(np.exp(logits).sum(-1))
        probs = np.exp(logits - want_lse[:, None])
        np.testing.assert_allclose(lse[t], want_lse, rtol=1e-10)
        np.testing.assert_allclose(out[t], probs @ p.kv[sel, : p.d_v].astype(float), rtol=1e-9, atol=1e-12)


@given(testing.mla_problems(), st.randoms(use_true_random=False))
def test_permuting_a_row_changes_nothing(p, rnd):
    perm = p.indices.copy()
    for row in perm:
        rnd.shuffle(row)
    a = reference.sparse_mla(p.q, p.kv, p.indices, p.scale, p.d_v)
    b = reference.sparse_mla(p.q, p.kv, perm, p.scale, p.d_v)
    testing.assert_mla_close(*b, *a, dtype=np.float64)


@given(testing.mla_problems())
def test_invalid_indices_are_skipped(p):
    N = p.kv.shape[0]
    valid = (p.indices >= 0) & (p.indices < N)
    # Replace every invalid entry with another invalid value: nothing changes.
    other = np.where(valid, p.indices, np.where(p.indices < 0, N + 5, -1)).astype(np.int32)
    a = reference.sparse_mla(p.q, p.kv, p.indices, p.scale, p.d_v)
    b = reference.sparse_mla(p.q, p.kv, other, p.scale, p.d_v)
    testing.assert_mla_close(*b, *a, dtype=np.float64)


def test_all_invalid_row_gives_zeros_and_infinite_lse():
    rng = np.random.default_rng(0)
    q, kv = rng.standard_normal((2, 3, 24)), rng.standard_normal((10, 24))
    idx = np.array([[-1, 10, 99], [4, -1, 2]])
    out, lse = reference.sparse_mla(q, kv, idx, 0.2, d_v=16)
    assert out.shape == (2, 3, 16) and lse.shape == (2, 3)
    assert np.all(out[0] == 0.0) and np.all(np.isposinf(lse[0]))
    assert np.all(np.isfinite(lse[1]))


@given(
    seed=st.integers(0, 2**32 - 1),
    L=st.integers(1, 40),
    heads=st.sampled_from([1, 4, 16]),
    model=st.sampled_from([DSAConfig.deepseek_v32(), DSAConfig.tiny()]),
)
def test_selecting_every_visible_position_equals_dense_causal_mla(seed, L, heads, model):
    rng = np.random.default_rng(seed)
    D, d_v = model.latent_dim, model.kv_lora_rank
    q = rng.standard_normal((L, heads, D)) * 0.3
    kv = rng.standard_normal((L, D))
    positions = np.arange(L)
    K = L + 3  # room for everything: select_topk takes all visible positions
    idx = reference.select_topk(np.zeros((L, L)), positions, K)
    sparse = reference.sparse_mla(q, kv, idx, model.softmax_scale, d_v)
    dense = reference.dense_mla(q, kv, positions, model.softmax_scale, d_v)
    testing.assert_mla_close(*sparse, *dense, dtype=np.float64)


def test_sparse_mla_checks_shapes():
    q, kv = np.zeros((2, 1, 8)), np.zeros((5, 8))
    with pytest.raises(ValueError, match="kv"):
        reference.sparse_mla(q, np.zeros((5, 9)), np.zeros((2, 3), int), 1.0, 4)
    with pytest.raises(ValueError, match="indices"):
        reference.sparse_mla(q, kv, np.zeros((3, 3), int), 1.0, 4)
    with pytest.raises(ValueError, match="d_v"):
        reference.sparse_mla(q, kv, np.zeros((2, 3), int), 1.0, 9)


def test_absorbed_form_equals_per_head_attention():
    """q_abs · [c_kv | k_pe] = q_nope · (W_UK c_kv) + q_pe · k_pe, and W_UV o_lat = Σ p · (W_UV c_kv)."""
    rng = np.random.default_rng(3)
    h, d_nope, d_rope, r, d_v, L = 3, 8, 4, 16, 6, 9
    q_nope, q_pe = rng.standard_normal((1, h, d_nope)), rng.standard_normal((1, h, d_rope))
    c_kv, k_pe = rng.standard_normal((L, r)), rng.standard_normal((L, d_rope))
    w_kv_b = rng.standard_normal((h * (d_nope + d_v), r))
    w_uk, w_uv = reference.split_kv_b(w_kv_b, h, d_nope, d_v)
    scale = (d_nope + d_rope) ** -0.5
    q_abs = reference.absorb_query(q_nope, q_pe, w_uk)
    o_lat, _ = reference.dense_mla(q_abs, np.concatenate([c_kv, k_pe], 1), np.array([L - 1]), scale, d_v=r)
    got = reference.mla_output(o_lat, w_uv)[0]
    for j in range(h):
        k_full = np.concatenate([c_kv @ w_uk[j].T, k_pe], 1)  # [L, d_nope + d_rope]
        v_full = c_kv @ w_uv[j].T  # [L, d_v]
        logits = scale * k_full @ np.concatenate([q_nope[0, j], q_pe[0, j]])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        np.testing.assert_allclose(got[j], p @ v_full, rtol=1e-10)


def test_v32_softmax_scale():
    assert DSAConfig.deepseek_v32().softmax_scale == pytest.approx(0.1352338, abs=5e-8)
    assert DSAConfig.glm5().softmax_scale == pytest.approx(256**-0.5)
