"""The DSA attention layer (`layers.dsa_attention`): `DSAParams`, `DSACaches`, `dsa_attention` (indexer on the
device) and `dsa_attention_host` (indexer in the Rust core), built from public jitted halves that the model,
the engine and the placement cost model share."""
