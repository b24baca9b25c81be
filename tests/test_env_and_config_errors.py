"""Settings that used to be ignored or computed wrong silently: an unknown or unrunnable `DSA_HYBRID_SIMD`
(or an unknown `DSA_HYBRID_QUERY_DTYPE`)
value warns, naming it; a YaRN `mscale != mscale_all_dim` (transformers would scale cos/sin by their
ratio, which this package does not do) is refused when the config is made or read."""

from __future__ import annotations

import platform

import pytest

from dsa_hybrid import DSAConfig, YarnScaling, cpu_features
from dsa_hybrid.host.selection import check_query_dtype_env, check_simd_env


@pytest.mark.parametrize("value", ["avx9", "AVX2", "sse", "neon" if platform.machine() != "aarch64" else "avx2"])
def test_a_simd_path_that_cannot_be_honoured_warns_naming_it(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSA_HYBRID_SIMD", value)
    active = cpu_features()["simd_path"]
    with pytest.warns(RuntimeWarning, match=f"DSA_HYBRID_SIMD='{value}'.*ignored, using '{active}'"):
        check_simd_env()


@pytest.mark.parametrize("value", [None, "", "  "])
def test_no_simd_setting_is_silent(value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("DSA_HYBRID_SIMD", raising=False)
    else:
        monkeypatch.setenv("DSA_HYBRID_SIMD", value)
    assert check_simd_env() is None


def test_the_simd_path_in_use_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSA_HYBRID_SIMD", str(cpu_features()["simd_path"]))
    assert check_simd_env() is None


@pytest.mark.parametrize("value", ["bf16", "float16", "FLOAT32"])
def test_an_unknown_query_dtype_setting_warns_naming_it(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSA_HYBRID_QUERY_DTYPE", value)
    auto = cpu_features()["indexer_query_dtype"]
    with pytest.warns(RuntimeWarning, match=f"DSA_HYBRID_QUERY_DTYPE='{value}' is not one of.*ignored.*'{auto}'"):
        check_query_dtype_env()


@pytest.mark.parametrize("value", [None, "", "auto", " float32 ", "bfloat16"])
def test_a_valid_query_dtype_setting_is_silent(value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("DSA_HYBRID_QUERY_DTYPE", raising=False)
    else:
        monkeypatch.setenv("DSA_HYBRID_QUERY_DTYPE", value)
    assert check_query_dtype_env() is None


def test_yarn_mscale_unequal_to_mscale_all_dim_is_refused() -> None:
    with pytest.raises(ValueError, match=r"mscale \(0.707\) != mscale_all_dim \(1.0\)"):
        YarnScaling(factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=1.0)
    YarnScaling(factor=40.0, original_max_position_embeddings=4096, mscale=0.8, mscale_all_dim=0.8)  # equal: fine
    YarnScaling(factor=1.0, original_max_position_embeddings=4096, mscale=0.5, mscale_all_dim=1.0)  # no YaRN: fine
    hf = DSAConfig.tiny().to_hf_config()
    hf["rope_scaling"] = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                          "mscale": 1.0, "mscale_all_dim": 0.5}  # fmt: skip
    with pytest.raises(ValueError, match=r"config.json \(deepseek_v32\): rope_scaling: yarn mscale"):
        DSAConfig.from_hf_config(hf)
