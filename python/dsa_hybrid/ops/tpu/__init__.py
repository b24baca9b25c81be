"""Pallas TPU kernels: `ops.tpu.sparse_mla` (sparse and dense-prefix MLA attention over paged latent rows),
`ops.tpu.indexer` (indexer scoring over FP8 key pages), `ops.tpu.topk` (the exact radix top-k threshold),
and `ops.tpu.block_sizes` (per-chip block sizes and the VMEM check). Their XLA twins live one level up
in `ops`; numerics are tested in TPU interpret mode, and `tpu/compile.py` compiles them ahead of time
for v5e, v6e, v5p and TPU7x."""
