"""Models: `models.config` (`DSAConfig`: presets and Hugging Face config.json), `models.checkpoint`
(safetensors reader/writer, FP8 weight blocks, `load_layer_params`) and `models.causal_lm` (`ModelParams`,
the pure `forward` over paged caches, `generate_greedy`)."""
