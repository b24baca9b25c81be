"""bfloat16 indexer scoring (`query_dtype="bfloat16"`): the AVX512-BF16 kernel (where the CPU has it) and
its exact scalar twin give the same bits; against the float64 oracle over the same (bf16-rounded) queries
the scores agree to float32 rounding and the selections are the oracle's up to ties; with FP8 queries the
selection is the float32 path's up to ties (only the order of the sums differs). The default, "auto", is
one of the two by a rule of the machine (bf16 for FP8 queries on AMD cores with AVX512-BF16), pinned by
`DSA_HYBRID_QUERY_DTYPE`."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from indexer_problems import Problem, oracle_scores, problems, tie_atol
from test_host_topk import SIMD_PATHS

import dsa_hybrid as dh
from dsa_hybrid import reference as ref
from dsa_hybrid.testing import assert_topk_equal, assert_valid_topk

BF16: dict[str, Any] = {"query_dtype": "bfloat16"}


def bf16_oracle_scores(p: Problem, quantized: bool) -> np.ndarray:
    """float64 oracle scores with the queries as the bf16 path scores them: rotated (and with `quantized`
    FP8-quantized, values exact in bf16), then rounded to bfloat16."""
    if quantized:
        return oracle_scores(p, True)
    L = int(p.positions.max()) + 1
    out = np.full((len(p.seq_ids), L), -np.inf)
    for t, (sid, pos) in enumerate(zip(p.seq_ids, p.positions, strict=True)):
        codes, scales = p.cache.gather(int(sid), np.arange(pos + 1))
        keys = ref.fp8_decode(codes) * scales[:, None].astype(np.float64)
        q_rot = ref.hadamard(p.q[t : t + 1]).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        out[t, : pos + 1] = ref.indexer_scores(q_rot, p.w[t : t + 1], keys)[0]
    return out


@given(problems(), st.booleans())
def test_bf16_scores_match_the_oracle_and_every_path_gives_the_same_bits(p: Problem, quantized: bool) -> None:
    want_scores = bf16_oracle_scores(p, quantized)
    want = ref.select_topk(np.where(np.isfinite(want_scores), want_scores, -1e300), p.positions, p.k)
    results = {}
    for path in SIMD_PATHS:
        dh.set_simd_path(path)
        try:
            s = p.cache.scores(p.seq_ids, p.q, p.w, p.positions, quantize_queries=quantized, **BF16)
            sel = p.cache.select(p.seq_ids, p.q, p.w, p.positions, p.k, quantize_queries=quantized, **BF16)
        finally:
            dh.set_simd_path(None)
        np.testing.assert_allclose(s, want_scores, rtol=1e-5, atol=tie_atol(want_scores))
        assert_valid_topk(sel, s, p.positions, p.k)
        assert_topk_equal(sel, want, want_scores, tie_atol=tie_atol(want_scores))
        np.testing.assert_array_equal(sel, dh.topk(s, p.k, p.positions + 1))
        results[path] = (s, sel)
    first_s, first_sel = results[SIMD_PATHS[0]]
    for path, (s, sel) in results.items():
        np.testing.assert_array_equal(s.view(np.uint32), first_s.view(np.uint32), err_msg=path)
        np.testing.assert_array_equal(sel, first_sel, err_msg=path)
    if quantized:
        # FP8 queries are exact in bf16: the float32 path's scores, up to the order of the sums.
        f32 = p.cache.scores(p.seq_ids, p.q, p.w, p.positions, query_dtype="float32")
        np.testing.assert_allclose(first_s, f32, rtol=1e-5, atol=tie_atol(f32))


def test_bf16_paged_equals_sequence_select_and_threads_change_nothing() -> None:
    rng = np.random.default_rng(5)
    cache = dh.IndexerKeyCache(num_blocks=80, block_size=64, head_dim=128)
    cache.add_sequence(0)
    cache.append(0, rng.standard_normal((4000, 128)).astype(np.float32))
    q = rng.standard_normal((3, 64, 128)).astype(np.float32)
    w = rng.standard_normal((3, 64)).astype(np.float32) / 8
    pos = np.array([3999, 2500, 700])
    base = cache.select([0, 0, 0], q, w, pos, 256, threads=1, **BF16)
    for threads in (2, 3):
        np.testing.assert_array_equal(cache.select([0, 0, 0], q, w, pos, 256, threads=threads, **BF16), base)
    table = np.asarray(cache.block_table(0), np.int32)[None].repeat(3, 0)
    np.testing.assert_array_equal(cache.select_paged(table, pos, q, w, 256, **BF16), base)
    np.testing.assert_array_equal(
        cache.scores_paged(table, pos, q, w, **BF16), cache.scores([0, 0, 0], q, w, pos, **BF16)
    )
    # Not the float32 scores bit for bit (another summation order), but the same to float32 rounding.
    s32 = cache.scores([0, 0, 0], q, w, pos, query_dtype="float32")
    s16 = cache.scores([0, 0, 0], q, w, pos, **BF16)
    np.testing.assert_allclose(s16, s32, rtol=1e-5, atol=tie_atol(s32))


@pytest.mark.parametrize("bad", ["float16", "bf16", ""])
def test_an_unknown_query_dtype_is_refused_by_name(bad: str) -> None:
    cache = dh.IndexerKeyCache(num_blocks=2, block_size=16, head_dim=16)
    cache.add_sequence(0)
    cache.append(0, np.ones((20, 16), np.float32))
    with pytest.raises(ValueError, match="query_dtype: expected"):
        cache.select([0], np.ones((1, 1, 16), np.float32), np.ones((1, 1), np.float32), [19], 4, query_dtype=bad)
    with pytest.raises(TypeError, match="query_dtype: expected a str"):
        cache.scores([0], np.ones((1, 1, 16), np.float32), np.ones((1, 1), np.float32), [19], query_dtype=1)  # type: ignore[arg-type]


def test_cpu_features_report_avx512bf16_on_x86() -> None:
    feats = dh.cpu_features()
    if "avx2" in feats:
        assert isinstance(feats["avx512bf16"], bool)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


def _x86_vendor() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def test_auto_picks_bf16_for_fp8_queries_on_amd_cores_with_avx512bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSA_HYBRID_QUERY_DTYPE", raising=False)
    feats = dh.cpu_features()
    vendor = _x86_vendor()
    if platform.machine() not in ("x86_64", "AMD64") or vendor is None:
        assert feats["indexer_query_dtype"] == "float32"
        return
    want = "bfloat16" if feats["avx512bf16"] and vendor == "AuthenticAMD" else "float32"
    assert feats["indexer_query_dtype"] == want, (vendor, feats)


@pytest.mark.parametrize("env", [None, "float32", "bfloat16", "auto"])
def test_auto_scores_are_the_chosen_dtypes_bits_on_every_path(env: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default ("auto") gives exactly the bits of the dtype it picks (the env variable's, or the
    machine's), for one decode row and for prefill rows sharing keys, at 16 indexer heads (the few-head
    kernels) and 64; unquantized queries stay float32; pinning a SIMD path changes nothing."""
    if env is None:
        monkeypatch.delenv("DSA_HYBRID_QUERY_DTYPE", raising=False)
    else:
        monkeypatch.setenv("DSA_HYBRID_QUERY_DTYPE", env)
    picked = str(dh.cpu_features()["indexer_query_dtype"])
    if env in ("float32", "bfloat16"):
        assert picked == env
    rng = np.random.default_rng(11)
    for heads, d in ((16, 64), (64, 128)):
        cache = dh.IndexerKeyCache(num_blocks=40, block_size=64, head_dim=d)
        cache.add_sequence(0)
        cache.append(0, rng.standard_normal((1500, d)).astype(np.float32))
        pos = np.array([1499, 1400, 1401, 1402, 333])  # a decode row, prefill rows, a short row
        q = rng.standard_normal((5, heads, d)).astype(np.float32)
        w = rng.standard_normal((5, heads)).astype(np.float32) / 8
        ids = [0] * 5
        table = np.asarray(cache.block_table(0), np.int32)[None].repeat(5, 0)
        chosen = cache.scores(ids, q, w, pos, query_dtype=picked)
        other = cache.scores(ids, q, w, pos, query_dtype="float32" if picked == "bfloat16" else "bfloat16")
        for path in SIMD_PATHS:
            dh.set_simd_path(path)
            try:
                np.testing.assert_array_equal(_bits(cache.scores(ids, q, w, pos)), _bits(chosen), err_msg=path)
                np.testing.assert_array_equal(_bits(cache.scores_paged(table, pos, q, w)), _bits(chosen))
                unq = cache.scores(ids, q, w, pos, quantize_queries=False)
                want_unq = cache.scores(ids, q, w, pos, quantize_queries=False, query_dtype="float32")
                np.testing.assert_array_equal(_bits(unq), _bits(want_unq), err_msg=path)
            finally:
                dh.set_simd_path(None)
        # The two dtypes really differ here (another order of sums), so the checks above could fail.
        assert not np.array_equal(_bits(chosen), _bits(other))
        np.testing.assert_allclose(chosen, other, rtol=1e-5, atol=tie_atol(chosen))
        sel = cache.select(ids, q, w, pos, 256)
        np.testing.assert_array_equal(sel, cache.select(ids, q, w, pos, 256, query_dtype=picked))
        np.testing.assert_array_equal(sel, dh.topk(chosen, 256, pos + 1))
