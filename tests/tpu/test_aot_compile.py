"""Every Pallas kernel compiles with the real TPU compiler (libtpu, ahead of time, no TPU needed) for v5e,
v6e, v5p and TPU7x, through the public API with backend "auto" under a TPU default device
(`tpu/compile.py`'s CI set: DeepSeek-V3.2 and GLM-5 shapes, decode and prefill chunks, bf16 and FP8
caches, full heads and tensor-parallel splits; the exact top-k select `ops.tpu.topk.topk_select` on its
own at k = 2048 for 1 row × 4K, 13 × 32K and 64 × 128K scores).

Without libtpu the tests skip, unless `DSA_HYBRID_REQUIRE_TPU_COMPILE=1` (CI sets it): then they fail,
so a CI image that lost the compiler cannot pass silently. Install it with
`pip install "dsa_hybrid[tpu-compile]"`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from dsa_hybrid.ops.tpu import block_sizes

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("dsa_tpu_compile", ROOT / "tpu" / "compile.py")
assert _spec is not None and _spec.loader is not None
aot = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = aot  # dataclasses look their module up while the file runs
_spec.loader.exec_module(aot)

REQUIRED = os.environ.get("DSA_HYBRID_REQUIRE_TPU_COMPILE") == "1"


@pytest.fixture
def tpu_compiler() -> None:
    if aot.have_libtpu():
        return
    message = 'libtpu is not installed (pip install "dsa_hybrid[tpu-compile]")'
    if REQUIRED:
        pytest.fail(f"{message}, and DSA_HYBRID_REQUIRE_TPU_COMPILE=1 requires the TPU compile check")
    pytest.skip(message)


@pytest.mark.parametrize("chip", list(aot.CHIPS))
@pytest.mark.parametrize("case", aot.ci_cases(), ids=lambda c: f"{c.kernel}-{c.shape.replace(' ', '-')}")
def test_kernel_compiles_for_the_chip(tpu_compiler, case, chip: str) -> None:
    result = aot.compile_case(case, chip)
    assert result.ok, f"{case.kernel} {case.shape} on {chip}: {result.error}"
    expected = {
        "sparse_mla": "sparse_mla_rows",
        "prefix_mla": "sparse_mla_pages",
        "query_blocks": "sparse_mla_blocks",
        "indexer": "indexer_scores",
        "topk": "topk_select",
    }
    assert any(k.startswith(expected[case.kernel]) for k in result.kernels), result.kernels
    if case.kernel == "indexer":
        assert "topk_select" in result.kernels  # the chunk scan's exact top-k runs on the TPU too
    if case.kernel == "topk":  # [T, k] int32 positions (and the NaN flags) come back from the device
        assert result.out_bytes >= case.tokens * aot.K * 4
    # The kernel's own VMEM accounting fits the chip's default scoped VMEM (or asks for a limit).
    assert 0 < result.vmem <= (result.vmem_limit or block_sizes.SCOPED_VMEM_DEFAULT[chip])


@pytest.mark.parametrize("chip", ["v5e", "tpu7x"])
def test_cache_layouts_allocate_exactly_their_format_and_are_not_copied(tpu_compiler, chip: str) -> None:
    """In a compiled kernel program each cache grows by exactly its format's size per token (dsa.md §6:
    1152 B bf16, 656 B FP8 latent rows, 132 B indexer keys; no tile padding, no layout copy of the cache:
    temporaries do not grow with it). `tpu/compile.py --memory` prints it for all four chips."""
    from dsa_hybrid.ops.latent_cache import LatentCache

    want = {
        "latent bf16": LatentCache.create(1, kind="bf16").bytes_per_token,
        "latent fp8": LatentCache.create(1, kind="fp8").bytes_per_token,
        "indexer fp8": 132,
    }
    assert want["latent bf16"] == 1152 and want["latent fp8"] == 656
    assert LatentCache.create(1, kind="fp8").allocated_bytes_per_token == 656
    for label, allocated, temporaries, size in aot.bytes_per_token(chip):
        assert allocated == want[label] == size, label
        assert abs(temporaries) < 16, label  # a copy of the cache would add its whole size per token


def test_the_dsa_layer_picks_the_pallas_kernels_for_a_tpu_target(tpu_compiler) -> None:
    kernels = aot.layer_kernels("v5e")
    assert "sparse_mla_rows_fp8" in kernels and "sparse_mla_pages_fp8" in kernels, kernels
