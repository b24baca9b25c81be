"""Runs the `Engine` on a device mesh in a fresh interpreter, for tests/parallel/test_engine_mesh.py (JAX's
device count is fixed when it starts).

    python engine_worker.py mesh                      8 forced host devices in one process
    python engine_worker.py mp PROCESS_ID PORT        one of 2 jax.distributed processes x 2 devices

Prints one JSON line: {run name: {"tokens": [[...], ...], "preemptions": int, "ranks": [...],
"steps": int, "seconds": float}}. The requests and engine settings are defined here; the test rebuilds
them for the one-device reference.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

PAGE = 16
NEW_TOKENS = 3
BUDGET = 32  # tokens per DP rank and step: the 33-token prompt is prefilled in two chunks
PAGES_PER_RANK = 4  # 64 tokens per rank: three requests on a rank do not fit together (preemption)
LENGTHS = (33, 9, 27, 20, 5, 30)  # past index_topk (16): the indexer really drops tokens
MAX_LEN = 48


def config(name: str):
    from dsa_hybrid.models.config import DSAConfig

    if name == "dsv32":  # 1 dense + 1 MoE layer, 8 experts
        return DSAConfig.tiny("deepseek_v32").replace(first_k_dense_replace=1)
    if name == "glm":  # GLM-5 structure: a "shared" indexer layer, MoE
        return DSAConfig.tiny("glm_moe_dsa").replace(
            num_hidden_layers=3, first_k_dense_replace=1, indexer_types=("full", "shared", "full")
        )
    raise ValueError(f"unknown config {name!r}")


def prompts(cfg) -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, cfg.vocab_size, n).tolist() for n in LENGTHS]


# (run name, config, dp, tp, placement): a dp x tp mesh with the indexer on the host, a dp-heavy mesh
# with it on the devices, and across two processes (one DP rank on each) the host placement, which
# exercises both the cross-process collectives and the per-process host caches (the device placement
# across processes is the same sharded program as in one process; left out to keep CI short).
MESH_RUNS = (("glm_dp2_tp4_host", "glm", 2, 4, "host"), ("glm_dp4_tp2_device", "glm", 4, 2, "device"))
MP_RUNS = (("glm_dp2_tp2_host", "glm", 2, 2, "host"),)


def run(cfg_name: str, dp: int, tp: int, placement: str) -> dict:
    from dsa_hybrid.models.causal_lm import ModelParams
    from dsa_hybrid.parallel.mesh import make_mesh
    from dsa_hybrid.serving.engine import Engine

    t0 = time.perf_counter()
    cfg = config(cfg_name)
    params = ModelParams.random(cfg, seed=3)
    eng = Engine(
        params, cfg, num_pages=PAGES_PER_RANK, page_size=PAGE, max_tokens_per_step=BUDGET, max_model_len=MAX_LEN,
        backend="xla", placement=placement, mesh=make_mesh(dp, tp),
    )  # fmt: skip
    ps = prompts(cfg)
    ids = [eng.add_request(p, NEW_TOKENS) for p in ps]
    ranks = [eng.rank_of(i) for i in ids]
    outputs: dict[int, list[int]] = {}
    while eng.has_unfinished():
        eng.step()
        for i in ids:
            if i in eng.finished:
                outputs[i] = eng.finished[i].output
    return {
        "tokens": [outputs[i] for i in ids],
        "preemptions": eng.stats.preemptions,
        "ranks": ranks,
        "steps": eng.stats.steps,
        "host_ranks": sorted(getattr(eng.runner, "host_caches_by_rank", {})),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str]) -> None:
    mode = argv[0]
    os.environ["JAX_PLATFORMS"] = "cpu"
    if mode == "mesh":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        runs = MESH_RUNS
    elif mode == "mp":
        pid, port = int(argv[1]), int(argv[2])
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        from dsa_hybrid.parallel.distributed import initialize

        initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
        runs = MP_RUNS
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps({name: run(c, dp, tp, pl) for name, c, dp, tp, pl in runs}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
