"""dsa_hybrid: DeepSeek Sparse Attention (DSA) as a Rust-accelerated CPU/TPU hybrid.

The package is laid out by job (docs/architecture.md); this module only names the public API:

- `DSAConfig`, `YarnScaling` — model shapes and constants (presets, Hugging Face config.json).
- `reference` — the float64 numpy oracle of docs/dsa.md, ground truth for every fast path.
- `testing` — hypothesis strategies and assertion helpers for testing DSA kernels
  (needs `hypothesis`: `pip install "dsa_hybrid[testing]"`); imported on first use.
- `host`: `IndexerKeyCache`, `CacheFullError`, `BlockPool` — the Rust core's paged FP8 indexer-key cache
  and its block allocator; `topk(scores, k, lengths)` — host top-k (docs/dsa.md §5) on SIMD kernels;
  `cpu_features()`, `set_simd_path()` — what the core detected and which SIMD path it uses;
  `sparse_mla_host(q, kv, indices, scale)` — sparse MLA attention on the CPU (fused SIMD kernel, numpy).
- `ops`: `LatentCache`, `sparse_mla`, `prefix_mla` — the paged bf16/FP8 MLA latent cache and sparse MLA
  attention on it (Pallas TPU kernels in `ops.tpu`, XLA path anywhere); `IndexerPages`,
  `ExactIndexerKeys`, `select_topk_device` — the lightning indexer on the device.
- `layers`: `DSAParams`, `DSACaches`, `dsa_attention`, `dsa_attention_host` — the DSA attention layer
  (indexer on the device or the host). `models`: `ModelParams`, `generate_greedy`, `load_layer_params`.
- `serving`: `Engine`, `SamplingParams`, `PlacementCosts` — continuous batching, prefix sharing,
  preemption, sampling, and the indexer placed on the host or the device per step.
- `text`: `Tokenizer`, `StreamDecoder` — a checkpoint's tokenizer.json (needs `tokenizers`:
  `pip install "dsa_hybrid[hf]"`) and incremental decoding; `chat_prompt`, `encode_dsv32`,
  `render_chat_template` — the chat encodings of DeepSeek-V3.2 (tools included) and GLM-5.

Everything that needs JAX is imported on first use (JAX costs seconds of start-up).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dsa_hybrid import _aliases, _core, reference
from dsa_hybrid.host import (
    BlockPool,
    CacheFullError,
    IndexerKeyCache,
    InternalError,
    cpu_features,
    set_simd_path,
    sparse_mla_host,
    topk,
)
from dsa_hybrid.models.config import DSAConfig, YarnScaling

__version__: str = _core.__version__

if TYPE_CHECKING:
    from dsa_hybrid import testing
    from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention, dsa_attention_host
    from dsa_hybrid.models.causal_lm import ModelParams, generate_greedy
    from dsa_hybrid.models.checkpoint import load_layer_params
    from dsa_hybrid.ops.indexer import ExactIndexerKeys, IndexerPages, select_topk_device
    from dsa_hybrid.ops.latent_cache import LatentCache
    from dsa_hybrid.ops.sparse_mla import prefix_mla, sparse_mla
    from dsa_hybrid.serving.engine import Engine
    from dsa_hybrid.serving.placement import PlacementCosts
    from dsa_hybrid.serving.sampling import SamplingParams
    from dsa_hybrid.text.chat import chat_prompt, encode_dsv32, render_chat_template
    from dsa_hybrid.text.tokenizer import StreamDecoder, Tokenizer

# Public name -> the module that defines it, imported on first use.
_LAZY = {
    "LatentCache": "dsa_hybrid.ops.latent_cache",
    "sparse_mla": "dsa_hybrid.ops.sparse_mla",
    "prefix_mla": "dsa_hybrid.ops.sparse_mla",
    "IndexerPages": "dsa_hybrid.ops.indexer",
    "ExactIndexerKeys": "dsa_hybrid.ops.indexer",
    "select_topk_device": "dsa_hybrid.ops.indexer",
    "DSAParams": "dsa_hybrid.layers.dsa_attention",
    "DSACaches": "dsa_hybrid.layers.dsa_attention",
    "dsa_attention": "dsa_hybrid.layers.dsa_attention",
    "dsa_attention_host": "dsa_hybrid.layers.dsa_attention",
    "load_layer_params": "dsa_hybrid.models.checkpoint",
    "ModelParams": "dsa_hybrid.models.causal_lm",
    "generate_greedy": "dsa_hybrid.models.causal_lm",
    "Engine": "dsa_hybrid.serving.engine",
    "SamplingParams": "dsa_hybrid.serving.sampling",
    "PlacementCosts": "dsa_hybrid.serving.placement",
    "Tokenizer": "dsa_hybrid.text.tokenizer",
    "StreamDecoder": "dsa_hybrid.text.tokenizer",
    "chat_prompt": "dsa_hybrid.text.chat",
    "encode_dsv32": "dsa_hybrid.text.chat",
    "render_chat_template": "dsa_hybrid.text.chat",
}


def __getattr__(name: str) -> Any:
    # `testing` needs hypothesis, an optional dependency: import it only when asked for.
    if name == "testing":
        return importlib.import_module("dsa_hybrid.testing")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsa_hybrid' has no attribute {name!r}")


_aliases.install()

__all__ = [
    "BlockPool",
    "InternalError",
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
    "Tokenizer",
    "StreamDecoder",
    "chat_prompt",
    "encode_dsv32",
    "render_chat_template",
    "DSAConfig",
    "YarnScaling",
    "cpu_features",
    "set_simd_path",
    "sparse_mla_host",
    "topk",
    "reference",
    "testing",
    "__version__",
]
