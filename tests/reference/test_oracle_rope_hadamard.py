"""dsa.md §2 (RoPE, YaRN) and the Hadamard rotation of §4."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsa_hybrid import DSAConfig, reference, testing


def test_hadamard_matches_sylvester_matrix_and_is_orthonormal():
    n = 128
    H = reference.hadamard(np.eye(n))  # row i = H · e_i
    i, j = np.indices((n, n))
    popcount = np.vectorize(lambda v: bin(v).count("1"))(i & j)
    np.testing.assert_array_equal(H * np.sqrt(n), np.where(popcount % 2 == 0, 1.0, -1.0))
    np.testing.assert_allclose(H @ H.T, np.eye(n), atol=1e-13)


@given(testing.float_arrays((3, 5, 128), np.float64, scale=10.0))
def test_hadamard_is_its_own_inverse_and_keeps_dot_products(x):
    y = reference.hadamard(x)
    np.testing.assert_allclose(reference.hadamard(y), x, atol=1e-12)
    np.testing.assert_allclose(np.einsum("abd,acd->abc", y, y), np.einsum("abd,acd->abc", x, x), rtol=1e-12, atol=1e-10)


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        reference.hadamard(np.ones(96))


@given(
    pairing=st.sampled_from(["interleaved", "half"]),
    d=st.sampled_from([8, 16, 64]),
    p=st.integers(0, 100_000),
    shift=st.integers(-5000, 5000),
    seed=st.integers(0, 2**32 - 1),
)
def test_rope_dot_product_depends_only_on_position_difference(pairing, d, p, shift, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal(d), rng.standard_normal(d)
    freqs = DSAConfig.deepseek_v32().rope_freqs[: d // 2]
    a = reference.apply_rope(q, np.asarray(p + 7), freqs, pairing) @ reference.apply_rope(
        k, np.asarray(p), freqs, pairing
    )
    q2 = max(p + shift, 0)
    b = reference.apply_rope(q, np.asarray(q2 + 7), freqs, pairing) @ reference.apply_rope(
        k, np.asarray(q2), freqs, pairing
    )
    assert a == pytest.approx(b, rel=1e-7, abs=1e-7)
    # A rotation keeps norms.
    assert np.linalg.norm(reference.apply_rope(q, np.asarray(p), freqs, pairing)) == pytest.approx(np.linalg.norm(q))


def test_rope_pairings_differ_and_match_their_definition():
    d = 8
    freqs = np.array([0.5, 0.25, 0.125, 0.0625])
    x = np.arange(1.0, d + 1)
    inter = reference.apply_rope(x, np.asarray(3), freqs, "interleaved")
    half = reference.apply_rope(x, np.asarray(3), freqs, "half")
    a = 3 * freqs
    np.testing.assert_allclose(inter[0::2], x[0::2] * np.cos(a) - x[1::2] * np.sin(a))
    np.testing.assert_allclose(inter[1::2], x[0::2] * np.sin(a) + x[1::2] * np.cos(a))
    np.testing.assert_allclose(half[:4], x[:4] * np.cos(a) - x[4:] * np.sin(a))
    np.testing.assert_allclose(half[4:], x[:4] * np.sin(a) + x[4:] * np.cos(a))
    assert not np.allclose(inter, half)


def test_rope_broadcasts_positions_over_heads():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 16))
    pos = np.array([0, 5, 9])
    freqs = DSAConfig.glm5().rope_freqs[:8]
    out = reference.apply_rope(x, pos[:, None], freqs, "interleaved")
    for t in range(3):
        for h in range(4):
            np.testing.assert_allclose(
                out[t, h], reference.apply_rope(x[t, h], np.asarray(pos[t]), freqs, "interleaved")
            )


def test_yarn_ramp_of_v32_is_between_dims_10_and_23():
    cfg = DSAConfig.deepseek_v32()
    assert reference.yarn_ramp_bounds(64, cfg.rope_theta, cfg.rope_scaling) == (10, 23)
    base = 10000.0 ** (-2 * np.arange(32) / 64)
    f = cfg.rope_freqs
    # Below the ramp: original frequencies; above it: interpolated by 1/factor; in between: a blend.
    np.testing.assert_allclose(f[:11], base[:11], rtol=1e-15)
    np.testing.assert_allclose(f[23:], base[23:] / 40.0, rtol=1e-15)
    inner = (f[11:23] - base[11:23] / 40) / (base[11:23] - base[11:23] / 40)  # = 1 - ramp
    assert np.all(np.diff(inner) < 0) and np.all((inner > 0) & (inner < 1))
    np.testing.assert_allclose(1 - inner, (np.arange(11, 23) - 10) / 13)


def test_glm5_has_plain_frequencies():
    f = DSAConfig.glm5().rope_freqs
    np.testing.assert_allclose(f, 1e6 ** (-2 * np.arange(32) / 64), rtol=1e-15)
