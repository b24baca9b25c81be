"""Pallas TPU kernels: `ops.tpu.sparse_mla` (sparse and dense-prefix MLA attention over paged latent rows),
`ops.tpu.indexer` (indexer scoring over FP8 key pages), `ops.tpu.topk` (`topk_select`: the exact top-k
select — radix threshold, lowest-position ties, in-kernel compaction — with its XLA twin
`topk_select_xla`), and `ops.tpu.block_sizes` (per-chip block sizes and the VMEM check). The other
kernels' XLA twins live one level up in `ops`; numerics are tested in TPU interpret mode, and
`tpu/compile.py` compiles them ahead of time for v5e, v6e, v5p and TPU7x."""
