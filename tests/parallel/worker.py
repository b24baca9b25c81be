"""Runs the sharded model in a fresh interpreter, for tests/parallel (JAX's device count is fixed when
it starts, and the test session's JAX already runs on one CPU device).

    python worker.py mesh CASE...                       8 forced host devices in one process
    python worker.py mp CASE PROCESS_ID PORT DEVICES     one of 2 jax.distributed processes (loopback)

Prints one JSON line: {case: {"tokens": [[...], ...], "topk_equal": bool, "seconds": float}}.
The cases (config, mesh, prompts) are defined here; the tests rebuild them for the one-device reference.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

NEW_TOKENS = 4
PAGE = 8


def case(name: str):
    """(cfg, dp, tp, seed, prompts) of a named case."""
    from dsa_hybrid.models.config import DSAConfig

    if name == "dsv32_moe":  # 1 dense + 1 MoE layer, 8 experts over 8 devices
        cfg, dp, tp = DSAConfig.tiny("deepseek_v32").replace(first_k_dense_replace=1), 2, 4
    elif name == "glm_shared":  # GLM-5 structure, a "shared" indexer layer, MoE; dp-heavy mesh
        cfg = DSAConfig.tiny("glm_moe_dsa").replace(
            num_hidden_layers=3, first_k_dense_replace=1, indexer_types=("full", "shared", "full")
        )
        dp, tp = 4, 2
    elif name == "mp_moe":  # 2 processes x 2 devices
        cfg, dp, tp = DSAConfig.tiny("deepseek_v32").replace(first_k_dense_replace=1, n_routed_experts=8), 2, 2
    else:
        raise ValueError(f"unknown case {name!r}")
    rng = np.random.default_rng(7)
    # Prompts longer than index_topk (16), so the indexer really drops tokens; one length, so the
    # one-device reference compiles one prefill shape.
    prompts = [rng.integers(0, cfg.vocab_size, 24).tolist() for _ in range(dp)]
    return cfg, dp, tp, 3, prompts


def run(name: str) -> dict:
    import jax
    import jax.numpy as jnp

    from dsa_hybrid.models.causal_lm import ModelParams, embed
    from dsa_hybrid.parallel.forward import (
        create_sharded_caches,
        generate_greedy_sharded,
        layer_topk_copies,
        place_rows,
        shard_params,
    )
    from dsa_hybrid.parallel.mesh import make_mesh

    cfg, dp, tp, seed, prompts = case(name)
    t0 = time.perf_counter()
    mesh = make_mesh(dp, tp)
    params = ModelParams.random(cfg, seed=seed)
    sharded = shard_params(params, mesh)
    tokens = generate_greedy_sharded(sharded, cfg, mesh, prompts, NEW_TOKENS, page_size=PAGE, backend="xla")
    # Layer 0's selection as every TP rank computes it, for the prompts' rows (a prefill).
    pages = -(-len(prompts[0]) // PAGE)
    caches = create_sharded_caches(cfg, mesh, pages, PAGE)
    rows = [
        {"tokens": np.array(p), "positions": np.arange(len(p)), "slots": np.arange(len(p)),
         "block_tables": np.tile(np.arange(pages), (len(p), 1))}
        for p in prompts
    ]  # fmt: skip
    arrays = place_rows(mesh, rows)
    x = jax.jit(embed)(sharded, arrays["tokens"])
    copies = np.asarray(
        jax.jit(lambda a: a)(layer_topk_copies(sharded.blocks[0], cfg, mesh, x, arrays["positions"], arrays["slots"],
                                               arrays["block_tables"], caches[0], backend="xla"))
    ) if jax.process_count() == 1 else None  # fmt: skip
    topk_equal = None if copies is None else bool(all(np.array_equal(copies[0], c) for c in copies))
    del jnp
    return {
        "tokens": tokens,
        "topk_equal": topk_equal,
        "topk": None if copies is None else copies[0].tolist(),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "mesh":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["JAX_PLATFORMS"] = "cpu"
        print(json.dumps({name: run(name) for name in argv[1:]}), flush=True)
    elif mode == "mp":
        name, pid, port, ndev = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
        os.environ["JAX_PLATFORMS"] = "cpu"
        from dsa_hybrid.parallel.distributed import initialize

        initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
        print(json.dumps({name: run(name)}), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
