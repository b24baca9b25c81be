"""Device code in JAX: the paged latent cache, sparse MLA attention and the lightning indexer.

- `ops.latent_cache`: `LatentCache` — the paged bf16 / FP8 / f32 MLA latent cache (FlashMLA row formats).
- `ops.sparse_mla`: `sparse_mla`, `prefix_mla`, `dense_mla`, `merge_splits` — attention over selected
  cache slots (XLA path anywhere; the Pallas TPU kernel on a TPU).
- `ops.indexer`: `IndexerPages`, `ExactIndexerKeys`, `select_topk_device` — indexer keys on the device,
  chunked scoring and a deterministic top-k.
- `ops.target`: `target_is_tpu`, `resolve_backend`, `tpu_chip`, `target_device` — which device a
  computation is built for, so `backend="auto"` picks the Pallas kernels for a TPU target, also when a
  CPU host compiles ahead of time (re-exported here).
- `ops.tpu`: the Pallas TPU kernels behind them, and their per-chip block sizes.

Each Pallas kernel has an XLA twin computing the same function; both are tested against `reference`.
"""

from dsa_hybrid.ops.target import resolve_backend, target_device, target_device_kind, target_is_tpu, tpu_chip

__all__ = ["resolve_backend", "target_device", "target_device_kind", "target_is_tpu", "tpu_chip"]
