"""`sampling.sample` (greedy, temperature, top-k, top-p) and `SamplingParams` (stop conditions included).
The block pool's tests moved to test_kv_manager.py (the engine uses the Rust `BlockPool` now)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_hybrid.serving.sampling import SamplingParams, sample

LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))


@given(st.lists(st.floats(-30, 30), min_size=1, max_size=40), st.integers(0, 2**31))
@settings(max_examples=50, deadline=None)
def test_greedy_and_top_k_one_are_the_argmax(logits: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    assert sample(np.array(logits), SamplingParams(), rng) == int(np.argmax(logits))
    assert sample(np.array(logits), SamplingParams(temperature=2.0, top_k=1), rng) == int(np.argmax(logits))


def test_temperature_one_draws_the_softmax() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    counts = np.bincount([sample(LOGITS, SamplingParams(temperature=1.0), rng) for _ in range(n)], minlength=5)
    np.testing.assert_allclose(counts / n, np.exp(LOGITS), atol=0.015)  # ~4 standard errors


def test_top_k_and_top_p_cut_the_tail() -> None:
    rng = np.random.default_rng(1)
    top2 = {sample(LOGITS, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(300)}
    assert top2 == {1, 3}
    # Sorted: 0.4, 0.3, 0.15, ... ; 0.4 + 0.3 = 0.7 ≥ 0.65 > 0.4: the nucleus is {1, 3}.
    nucleus = {sample(LOGITS, SamplingParams(temperature=1.0, top_p=0.65), rng) for _ in range(300)}
    assert nucleus == {1, 3}
    assert {sample(LOGITS, SamplingParams(temperature=1.0, top_p=0.01), rng) for _ in range(50)} == {1}


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_sampling_params(kw: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_stop_conditions_are_stored_as_tuples_and_checked() -> None:
    sp = SamplingParams(stop_token_ids=[3, 4], stop=[[1, 2], (7,)])
    assert sp.stop_token_ids == (3, 4) and sp.stop == ((1, 2), (7,))
    assert isinstance(hash(sp), int)  # still hashable
    assert not sp.ignore_eos
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[-1])
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[[]])
