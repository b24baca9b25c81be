"""The model on a mesh gives the tokens of one device: 8 forced host CPU devices in one process, and
2 `jax.distributed` processes × 2 devices on loopback. Both run in fresh interpreters (`worker.py`):
the device count is fixed when JAX starts. The one-device reference runs here."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid.layers.dsa_attention import dsa_attention, rms_norm
from dsa_hybrid.models.causal_lm import ModelParams, create_caches, generate_greedy

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("parallel_worker", HERE / "worker.py")
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TIMEOUT = 420  # seconds per subprocess run: a hang (a lost peer) fails instead of blocking CI


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def reference(name: str) -> tuple[list[list[int]], np.ndarray]:
    """One device: each prompt's greedy tokens, and layer 0's selection of every prompt row."""
    cfg, _, _, seed, prompts = worker.case(name)
    params = ModelParams.random(cfg, seed=seed)
    tokens = [generate_greedy(params, cfg, p, worker.NEW_TOKENS, page_size=worker.PAGE, backend="xla") for p in prompts]
    topks = []
    select = jax.jit(
        lambda attn, x, pos, table, cache: dsa_attention(attn, cfg, x, pos, pos, table, cache, backend="xla")[2]
    )
    for p in prompts:
        n = len(p)
        pages = -(-n // worker.PAGE)
        cache = create_caches(cfg, pages, worker.PAGE)[0]
        pos = jnp.arange(n, dtype=jnp.int32)
        table = jnp.tile(jnp.arange(pages, dtype=jnp.int32), (n, 1))
        x = rms_norm(params.embed[jnp.asarray(p)], params.blocks[0].input_norm, cfg.rms_norm_eps)
        topks.append(np.asarray(select(params.blocks[0].attn, x, pos, table, cache)))
    return tokens, np.concatenate(topks)


def _finish(proc: subprocess.Popen[str]) -> str:
    """The worker's stdout once it exits 0 (killed on a timeout or a failure of this process)."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:  # never leave a worker (or a peer waiting on the coordinator) behind
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    return out


def test_eight_devices_give_the_tokens_of_one() -> None:
    names = ["dsv32_moe", "glm_shared"]
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "worker.py"), "mesh", *names],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    # The one-device references are computed here while the worker runs (the checks are the same).
    try:
        refs = {name: reference(name) for name in names}
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    got = json.loads(_finish(proc).strip().splitlines()[-1])
    for name in names:
        tokens, topk = refs[name]
        assert got[name]["tokens"] == tokens, name
        # Every TP rank selected the same positions for every row, and the same as one device.
        assert got[name]["topk_equal"] is True, name
        np.testing.assert_array_equal(np.asarray(got[name]["topk"]), topk, err_msg=name)
        n = len(worker.case(name)[4][0])  # 24 tokens, K = 16: the last rows really drop tokens
        assert (topk[-1] >= 0).all() and topk[-1].max() < n and len(set(topk[-1].tolist())) == 16


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_give_the_tokens_of_one() -> None:
    port = _free_port()
    cmd = [sys.executable, str(HERE / "worker.py"), "mp", "mp_moe"]
    procs = [
        subprocess.Popen(
            [*cmd, str(i), str(port), "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        tokens, _ = reference("mp_moe")  # while the two processes run
        outs = [json.loads(_finish(p).strip().splitlines()[-1])["mp_moe"] for p in procs]
    finally:
        for p in procs:  # never leave a peer waiting on the coordinator
            if p.poll() is None:
                p.kill()
                p.wait()
    assert outs[0]["tokens"] == outs[1]["tokens"] == tokens


@pytest.mark.skipif(len(jax.devices()) > 1, reason="the in-process checks assume one device")
def test_bad_rows_are_named() -> None:
    from dsa_hybrid.parallel.forward import generate_greedy_sharded, place_rows
    from dsa_hybrid.parallel.mesh import make_mesh

    cfg, _, _, _, _ = worker.case("dsv32_moe")
    mesh = make_mesh(1, 1)
    params = ModelParams.random(cfg, seed=0)
    with pytest.raises(ValueError, match="prompts"):
        generate_greedy_sharded(params, cfg, mesh, [[]], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy_sharded(params, cfg, mesh, [[1, 2]], 0)
    with pytest.raises(ValueError, match="per_rank"):
        place_rows(mesh, [])
