"""`host.sparse_mla_host`: the Rust core's fused sparse-MLA kernel against the float64 oracle
(`reference.sparse_mla`), and its invariants: every SIMD path and thread count gives the same bits, a
bfloat16 latent gives the bits of the same values in float32, −1 / out-of-range entries are skipped, empty
rows are 0 / +inf, duplicates count once each, inf/NaN inputs give NaN rows."""

from __future__ import annotations

from collections.abc import Iterator

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsa_hybrid import host, reference, testing
from dsa_hybrid.host import sparse_mla_host


def _available_paths() -> list[str]:
    native = host.cpu_features()["simd_path"]
    order = {"avx512": ["scalar", "avx2", "avx512"], "avx2": ["scalar", "avx2"], "neon": ["scalar", "neon"]}
    return order.get(str(native), ["scalar"])


@pytest.fixture(autouse=True)
def _restore_simd_path() -> Iterator[None]:
    yield
    host.set_simd_path(None)


def _bf16_exact(x: np.ndarray) -> np.ndarray:
    """`x` rounded to bfloat16 values, as float32."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    p=testing.mla_problems(heads=(1, 3, 16, 20, 64), widths=((16, 8), (32, 16), (64, 64), (24, 8))),
    bf16=st.booleans(),
    threads=st.sampled_from([1, 2]),
)
def test_matches_the_oracle(p: testing.MLAProblem, bf16: bool, threads: int) -> None:
    kv = p.kv.astype(ml_dtypes.bfloat16) if bf16 else p.kv
    out, lse = sparse_mla_host(p.q, kv, p.indices, p.scale, p.d_v, threads=threads)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    ref_out, ref_lse = reference.sparse_mla(p.q, np.asarray(kv, np.float32), p.indices, p.scale, p.d_v)
    testing.assert_mla_close(out, lse, ref_out, ref_lse, atol=2e-5)


def test_deepseek_v32_widths_against_the_oracle() -> None:
    """h = 128, D = 576, d_v = 512, K = 2048 (decode and a small prefill block), bf16 latent, −1 padding."""
    rng = np.random.default_rng(3)
    T, h, N, K = 3, 128, 3000, 2048
    q = (rng.standard_normal((T, h, 576)) / 8).astype(np.float32)
    kv = rng.standard_normal((N, 576)).astype(ml_dtypes.bfloat16)
    idx = rng.integers(0, N, (T, K)).astype(np.int32)
    idx[1, 1500:] = -1
    out, lse = sparse_mla_host(q, kv, idx, 0.1352338, 512)
    ref_out, ref_lse = reference.sparse_mla(q, kv.astype(np.float32), idx, 0.1352338, 512)
    testing.assert_mla_close(out, lse, ref_out, ref_lse, atol=2e-5)


def _problem(seed: int, T: int = 3, h: int = 40, D: int = 48, d_v: int = 32, N: int = 90, K: int = 150) -> tuple:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, h, D)).astype(np.float32)
    kv = _bf16_exact(rng.standard_normal((N, D)))
    idx = rng.integers(-5, N + 5, (T, K))
    return q, kv, idx, 0.3, d_v


def test_every_simd_path_thread_count_and_latent_dtype_gives_the_same_bits() -> None:
    for seed, shape in enumerate([{}, {"h": 128, "D": 72, "d_v": 64}, {"h": 5, "d_v": 12}, {"T": 1, "h": 64}]):
        q, kv, idx, scale, d_v = _problem(seed, **shape)
        host.set_simd_path("scalar")
        want_out, want_lse = sparse_mla_host(q, kv, idx, scale, d_v, threads=1)
        for path in _available_paths():
            host.set_simd_path(path)
            for threads in (1, 2, 3):
                for kv_in in (kv, kv.astype(ml_dtypes.bfloat16)):
                    out, lse = sparse_mla_host(q, kv_in, idx, scale, d_v, threads=threads)
                    np.testing.assert_array_equal(out.view(np.uint32), want_out.view(np.uint32), err_msg=path)
                    np.testing.assert_array_equal(lse.view(np.uint32), want_lse.view(np.uint32), err_msg=path)


def test_invalid_entries_empty_rows_duplicates_and_index_dtypes() -> None:
    q, kv, idx, scale, d_v = _problem(7, T=4, K=20)
    N = kv.shape[0]
    idx[0] = -1  # empty: all −1
    idx[1] = np.r_[np.full(10, N), np.full(10, -3)]  # empty: out of range both ways
    idx[2, :] = 5  # one row, twenty times: the same as that row once
    out, lse = sparse_mla_host(q, kv, idx, scale, d_v)
    assert np.all(out[:2] == 0.0) and np.all(np.isposinf(lse[:2]))
    once_out, once_lse = sparse_mla_host(q[2:3], kv, np.array([[5]]), scale, d_v)
    np.testing.assert_allclose(out[2], once_out[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse[2], once_lse[0] + np.log(20), rtol=1e-6)
    # The order of a row's indices does not matter (up to rounding); skipped entries change nothing.
    perm = np.random.default_rng(0).permutation(idx.shape[1])
    out_p, lse_p = sparse_mla_host(q, kv, np.c_[idx[:, perm], np.full((4, 7), -1)], scale, d_v)
    np.testing.assert_allclose(out_p, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse_p[2:], lse[2:], rtol=1e-6)
    # Every integer dtype, values that do not fit int64 or int32 included, are range-checked, never wrapped.
    ref = sparse_mla_host(q, kv, idx, scale, d_v)
    for dt in (np.int32, np.int16, np.uint32):
        ok = idx.astype(dt) if np.issubdtype(dt, np.signedinteger) else np.where(idx < 0, N + 1, idx).astype(dt)
        got = sparse_mla_host(q, kv, ok, scale, d_v)
        np.testing.assert_array_equal(got[0], ref[0])
    huge = np.where(idx < 0, 2**64 - 1, idx).astype(np.uint64)
    huge_out, _ = sparse_mla_host(q, kv, huge, scale, d_v)
    np.testing.assert_array_equal(huge_out, ref[0])
    wrap = np.where(idx < 0, 2**32 + 1, idx).astype(np.int64)  # 2**32 + 1 must not read row 1
    np.testing.assert_array_equal(sparse_mla_host(q, kv, wrap, scale, d_v)[0], ref[0])


def test_non_finite_inputs_give_nan_rows_and_empty_shapes_work() -> None:
    q, kv, idx, scale, d_v = _problem(11, T=3, K=10)
    idx[:] = np.arange(10)
    kv[3, 7] = np.inf
    q[2, 4, 0] = np.nan
    idx[1] = np.arange(10, 20)  # row 1 does not select row 3
    out, lse = sparse_mla_host(q, kv, idx, scale, d_v)
    assert np.all(np.isnan(out[0])) and np.all(np.isnan(lse[0]))
    assert np.all(np.isfinite(out[1])) and np.all(np.isfinite(lse[1]))
    assert np.isnan(lse[2]).any()
    for T, h, K in ((0, 4, 3), (2, 0, 3), (2, 4, 0)):
        o, lz = sparse_mla_host(
            np.zeros((T, h, 16), np.float32), np.zeros((4, 16), np.float32), np.zeros((T, K), np.int64), 1.0, 8
        )
        assert o.shape == (T, h, 8) and lz.shape == (T, h)
        assert np.all(o == 0) and np.all(np.isposinf(lz))


def test_fma_peak_is_measured_on_the_path_in_use() -> None:
    peak = host.fma_peak_gflops(seconds=0.02, repeats=1)
    assert peak > 0.1
