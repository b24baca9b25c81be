"""Models: `models.config` (`DSAConfig`: presets and Hugging Face config.json), `models.checkpoint`
(validated, memory-mapped safetensors reader/writer, sharded checkpoints, FP8 weight blocks,
`load_layer_params`), `models.moe` (the MoE block) and `models.causal_lm` (`ModelParams`: weights resident
in their checkpoint format, the pure `forward` over paged caches, `generate_greedy`)."""
