"""Device code in JAX: the paged latent cache, sparse MLA attention and the lightning indexer.

- `ops.latent_cache`: `LatentCache` — the paged bf16 / FP8 / f32 MLA latent cache (FlashMLA row formats).
- `ops.sparse_mla`: `sparse_mla`, `prefix_mla`, `dense_mla`, `merge_splits` — attention over selected
  cache slots (XLA path anywhere; the Pallas TPU kernel on a TPU).
- `ops.indexer`: `IndexerPages`, `ExactIndexerKeys`, `select_topk_device` — indexer keys on the device,
  chunked scoring and a deterministic top-k.
- `ops.tpu`: the Pallas TPU kernels behind them.

Each Pallas kernel has an XLA twin computing the same function; both are tested against `reference`.
"""
