"""Sampling of the next token: greedy, or temperature with top-k / top-p (nucleus) truncation, and the
request's stop conditions (`stop_token_ids`, stop sequences of token ids, `ignore_eos`).

Each request draws from its own seeded generator, so its output depends only on its prompt, its
sampling settings and its seed: not on what it was batched with, how its prompt was chunked, where
its indexer ran, or whether it was preempted (a recomputed request keeps the tokens it already drew).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a request picks its tokens.

    Attributes:
        temperature: 0 for greedy (argmax); otherwise logits are divided by it before the softmax.
        top_k: keep only the `top_k` most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
        seed: the request's generator seed (None: drawn from the operating system).
        stop_token_ids: token ids that end the request (finish reason "stop"); the token is kept in
            the output.
        stop: stop sequences, each a non-empty sequence of token ids: the request ends (finish reason
            "stop") as soon as its output ends with one of them; the sequence is kept in the output.
        ignore_eos: keep generating past the model's EOS token ids (`DSAConfig.eos_token_id`), e.g. to
            benchmark a fixed number of tokens.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[tuple[int, ...], ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted and stored as tuples (the params stay hashable and immutable).
        ids = tuple(int(t) for t in self.stop_token_ids)
        seqs = tuple(tuple(int(t) for t in seq) for seq in self.stop)
        if any(t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {list(ids)}")
        if any(not seq or min(seq) < 0 for seq in seqs):
            raise ValueError("stop: every stop sequence must be a non-empty sequence of token ids >= 0")
        object.__setattr__(self, "stop_token_ids", ids)
        object.__setattr__(self, "stop", seqs)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from `logits` float `[vocab]` (any finite values; ties in greedy go to the lowest id)."""
    logits = np.asarray(logits, np.float64)
    if params.greedy:
        return int(np.argmax(logits))
    order = np.argsort(-logits, kind="stable")  # most likely first; ties by id
    if params.top_k:
        order = order[: params.top_k]
    z = logits[order] / params.temperature
    p = np.exp(z - z[0])
    p /= p.sum()
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1  # reach top_p, at least one token
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(p.size, p=p)])
