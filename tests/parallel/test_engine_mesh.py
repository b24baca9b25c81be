"""The `Engine` on a device mesh gives the tokens of the one-device `Engine`: 8 forced host CPU devices in
one process (dp 2 x tp 4 with the indexer on the host, dp 4 x tp 2 on the devices), and 2
`jax.distributed` processes x 2 devices on loopback (the host placement; each process keeps host caches only
for its own DP rank). Requests of different lengths, a pool small enough to preempt, chunked prefill.
The meshes run in fresh interpreters (`engine_worker.py`); the one-device reference runs here."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.serving.engine import Engine

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("engine_worker", HERE / "engine_worker.py")
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TIMEOUT = 900  # seconds per subprocess run: a hang (a lost peer) fails instead of blocking CI (a loaded
# 2-core machine took 6.5 min for the two-process run)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


@functools.cache
def reference(cfg_name: str) -> list[list[int]]:
    """The one-device Engine's tokens for the worker's requests (a pool that never preempts)."""
    cfg = worker.config(cfg_name)
    eng = Engine(
        ModelParams.random(cfg, seed=3), cfg, num_pages=32, page_size=worker.PAGE,
        max_tokens_per_step=worker.BUDGET, max_model_len=worker.MAX_LEN, backend="xla",
    )  # fmt: skip
    out = eng.generate(worker.prompts(cfg), worker.NEW_TOKENS)
    assert eng.stats.preemptions == 0
    return out


def ranks_by_load(dp: int) -> list[int]:
    """Where the placement rule puts the worker's requests: the least loaded rank (tokens of its waiting
    and running requests; all are added before the first step), ties to the lowest."""
    loads, ranks = [0] * dp, []
    for n in worker.LENGTHS:
        r = loads.index(min(loads))
        ranks.append(r)
        loads[r] += n
    return ranks


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_worker.py"), "mesh"],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env(), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("run", [r[0] for r in worker.MESH_RUNS])
def test_engine_on_eight_devices_gives_the_tokens_of_one(mesh_results: dict, run: str) -> None:
    _, cfg_name, dp, _, placement = next(r for r in worker.MESH_RUNS if r[0] == run)
    got = mesh_results[run]
    assert got["tokens"] == reference(cfg_name), run
    assert got["ranks"] == ranks_by_load(dp)  # requests landed on ranks by load
    if dp == 2:  # rank 1's requests outgrow its 4 pages together: the youngest is preempted, recomputed
        assert got["preemptions"] > 0
    assert got["host_ranks"] == (list(range(dp)) if placement == "host" else [])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_engine_across_two_processes_gives_the_tokens_of_one() -> None:
    port = _free_port()
    cmd = [sys.executable, str(HERE / "engine_worker.py"), "mp"]
    procs = [
        subprocess.Popen([*cmd, str(i), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env())
        for i in range(2)
    ]  # fmt: skip
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:  # never leave a peer waiting on the coordinator
            if p.poll() is None:
                p.kill()
                p.wait()
    for run, cfg_name, dp, _, placement in worker.MP_RUNS:
        a, b = outs[0][run], outs[1][run]
        assert a["tokens"] == b["tokens"] == reference(cfg_name), run
        assert a["ranks"] == b["ranks"] == ranks_by_load(dp), run
        assert a["steps"] == b["steps"] and a["preemptions"] == b["preemptions"] > 0, run
        # Each process keeps host caches only for the DP rank its own devices hold.
        assert (a["host_ranks"], b["host_ranks"]) == (([0], [1]) if placement == "host" else ([], [])), run


@pytest.mark.skipif(len(jax.devices()) > 1, reason="the in-process checks assume one device")
def test_mesh_engine_refuses_what_it_cannot_serve() -> None:
    from dsa_hybrid.parallel.mesh import make_mesh

    cfg = worker.config("glm")
    params = ModelParams.random(cfg, seed=3)
    mesh = make_mesh(1, 1)
    with pytest.raises(ValueError, match="placement"):
        Engine(params, cfg, num_pages=4, page_size=16, placement="auto", mesh=mesh)
    with pytest.raises(ValueError, match="page_size"):
        Engine(params, cfg, num_pages=4, page_size=8, placement="host", mesh=mesh)
