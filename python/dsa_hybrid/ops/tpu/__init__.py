"""Pallas TPU kernels: `ops.tpu.sparse_mla` (sparse and dense-prefix MLA attention over paged latent rows)
and `ops.tpu.indexer` (indexer scoring over FP8 key pages). Their XLA twins live one level up in `ops`;
numerics are tested in TPU interpret mode, and `tpu/` compiles them ahead of time for real chips."""
