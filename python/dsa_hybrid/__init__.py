"""dsa_hybrid: DeepSeek Sparse Attention (DSA) as a Rust-accelerated CPU/TPU hybrid.

Public API:
- `DSAConfig`, `YarnScaling` — model shapes and constants (presets, Hugging Face config.json).
- `reference` — the float64 numpy oracle of spec/DSA.md, ground truth for every fast path.
- `testing` — hypothesis strategies and assertion helpers for testing DSA kernels
  (needs `hypothesis`: `pip install "dsa_hybrid[testing]"`); imported on first use.
- `IndexerKeyCache`, `CacheFullError` — the paged FP8 indexer-key cache (Rust core).
- `topk(scores, k, lengths)` — host top-k selection (spec §5) on SIMD kernels; `IndexerKeyCache.select`
  fuses it with indexer scoring from the FP8 pages.
- `LatentCache`, `sparse_mla`, `prefix_mla` — the device half (JAX): the paged bf16/FP8 MLA latent cache
  and sparse MLA attention on it (Pallas TPU kernel, XLA path anywhere); imported on first use.
- `IndexerPages`, `ExactIndexerKeys`, `select_topk_device` — the lightning indexer on the device.
- `DSAParams`, `DSACaches`, `dsa_attention`, `dsa_attention_host`, `load_layer_params` — the DSA attention
  layer (indexer on the device or the host) and Hugging Face checkpoint loading.
- `ModelParams`, `generate_greedy`, `Engine`, `SamplingParams`, `PlacementCosts` — a small DSA causal LM
  (dense layers), greedy generation, and the engine: continuous batching, prefix sharing, preemption,
  sampling, and the indexer placed on the host or the device per step.
- `cpu_features()`, `set_simd_path()` — what the Rust host core detected, and which SIMD path it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _core, reference
from .cache import CacheFullError, IndexerKeyCache
from .config import DSAConfig, YarnScaling
from .selection import set_simd_path, topk

__version__: str = _core.__version__

if TYPE_CHECKING:
    from . import testing
    from .checkpoint import load_layer_params
    from .device_indexer import ExactIndexerKeys, IndexerPages, select_topk_device
    from .engine import Engine
    from .latent_cache import LatentCache
    from .layer import DSACaches, DSAParams, dsa_attention, dsa_attention_host
    from .model import ModelParams, generate_greedy
    from .placement import PlacementCosts
    from .sampling import SamplingParams
    from .sparse_attention import prefix_mla, sparse_mla


def cpu_features() -> dict[str, bool | str]:
    """CPU features detected by the Rust core (`avx2`, `fma`, `f16c`, `avx512f`, `neon`, ...) and
    `simd_path`, the SIMD path its kernels dispatch to on this machine."""
    return dict(_core.cpu_features())


# The device half imports JAX (seconds of start-up): load it on first use.
_LAZY = {
    "LatentCache": ".latent_cache",
    "sparse_mla": ".sparse_attention",
    "prefix_mla": ".sparse_attention",
    "IndexerPages": ".device_indexer",
    "ExactIndexerKeys": ".device_indexer",
    "select_topk_device": ".device_indexer",
    "DSAParams": ".layer",
    "DSACaches": ".layer",
    "dsa_attention": ".layer",
    "dsa_attention_host": ".layer",
    "load_layer_params": ".checkpoint",
    "ModelParams": ".model",
    "generate_greedy": ".model",
    "Engine": ".engine",
    "SamplingParams": ".sampling",
    "PlacementCosts": ".placement",
}


def __getattr__(name: str) -> Any:
    # `testing` needs hypothesis, an optional dependency: import it only when asked for.
    if name == "testing":
        return importlib.import_module(".testing", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'dsa_hybrid' has no attribute {name!r}")


__all__ = [
    "CacheFullError",
    "IndexerKeyCache",
    "LatentCache",
    "prefix_mla",
    "sparse_mla",
    "IndexerPages",
    "ExactIndexerKeys",
    "select_topk_device",
    "DSAParams",
    "DSACaches",
    "dsa_attention",
    "dsa_attention_host",
    "load_layer_params",
    "ModelParams",
    "generate_greedy",
    "Engine",
    "SamplingParams",
    "PlacementCosts",
    "DSAConfig",
    "YarnScaling",
    "cpu_features",
    "set_simd_path",
    "topk",
    "reference",
    "testing",
    "__version__",
]
