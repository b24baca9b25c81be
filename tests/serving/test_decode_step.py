"""The decode step's fixed cost: a host step runs one jitted program between host calls, compiles nothing
new as the context grows, and its `StepLogits` give the same tokens as the dense logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dsa_hybrid.models import causal_lm as M
from dsa_hybrid.models.causal_lm import StepLogits, pad_rows, split_rows
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.serving.engine import Engine


def test_step_logits_greedy_and_take_read_the_real_rows_of_every_group() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 7)).astype(np.float32), rng.standard_normal((2, 7)).astype(np.float32)
    out = StepLogits((jnp.asarray(a), jnp.asarray(b)), (M.greedy_rows(a), M.greedy_rows(b)), (3, 2))
    dense = np.concatenate([a[:3], b[:2]])
    np.testing.assert_array_equal(np.asarray(out.dense()), dense)
    np.testing.assert_array_equal(out.greedy(), dense.argmax(-1))
    np.testing.assert_array_equal(out.take(np.array([4, 0, 3])), dense[[4, 0, 3]])
    assert out.num_rows == 5


def test_pad_rows_and_split_rows() -> None:
    x = np.arange(6, dtype=np.int32).reshape(3, 2)
    assert pad_rows(x, 3, -1) is x
    np.testing.assert_array_equal(pad_rows(x, 4, -1), [[0, 1], [2, 3], [4, 5], [-1, -1]])
    assert split_rows(np.array([7, 7, 7]), 2) == [slice(0, 3)]  # one sequence is never cut
    assert split_rows(np.array([1, 1, 2, 2]), 2) == [slice(0, 2), slice(2, 4)]


def test_host_decode_steps_dispatch_few_programs_and_compile_nothing_new() -> None:
    """Greedy decode on the host placement: `layers + 1` jitted programs per step, none recompiled while
    the context grows past several pages (the host programs see no block table), and the same tokens as
    the device placement."""
    cfg = DSAConfig.tiny()
    params = M.ModelParams.random(cfg, seed=1)
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, 20).tolist()
    kw = dict(num_pages=8, page_size=16, max_model_len=64, latent_kind="f32", backend="xla", host_threads=1)
    dev = Engine(params, cfg, placement="device", **kw).generate([prompt], 30)
    eng = Engine(params, cfg, placement="host", **kw)
    eng.add_request(prompt, 30)
    eng.step()  # the prefill
    eng.step()  # the first decode step compiles the one-row programs
    calls: list[str] = []
    real = {n: getattr(M, n) for n in ("host_step_first", "host_step_next", "host_step_attend_next")}
    sizes = {n: f._cache_size() for n, f in real.items()}
    try:
        for n, f in real.items():
            setattr(M, n, lambda *a, _f=f, _n=n, **k: (calls.append(_n), _f(*a, **k))[1])
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
    finally:
        for n, f in real.items():
            setattr(M, n, f)
    assert steps == 28 and len(calls) == steps * (cfg.num_hidden_layers + 1)
    assert {n: f._cache_size() for n, f in real.items()} == sizes  # 20 → 50 tokens: no new program
    assert eng.finished[0].output == dev[0]
