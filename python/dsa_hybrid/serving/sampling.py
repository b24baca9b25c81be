"""Sampling of the next token: greedy, or temperature with top-k / top-p (nucleus) truncation, and the
request's stop conditions (`stop_token_ids`, stop sequences of token ids, `ignore_eos`).

Each request draws from its own seeded generator, so its output depends only on its prompt, its
sampling settings and its seed: not on what it was batched with, how its prompt was chunked, where
its indexer ran, or whether it was preempted (a recomputed request keeps the tokens it already drew).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

__all__ = ["SamplingError", "SamplingParams", "draw_tokens", "sample", "sample_request"]


class SamplingError(ValueError):
    """Drawing one request's next token failed (e.g. its logits hold NaN). `request_id` names the request:
    the engine finishes that request alone (finish reason "error") and the others go on untouched."""

    def __init__(self, request_id: int, message: str) -> None:
        super().__init__(f"request {request_id}: {message}")
        self.request_id = request_id


def _integer(name: str, value: object) -> int:
    """`value` as an int: Python or numpy integers only (a bool, a float or a string is a TypeError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _real(name: str, value: object) -> float:
    """`value` as a float: Python or numpy reals (not a bool, a string or None)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _token_ids(name: str, values: object) -> tuple[int, ...]:
    """A sequence of token ids >= 0 as a tuple of ints (TypeError for a non-sequence or non-integers)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(values).__name__}")
    ids = tuple(_integer(name, t) for t in values)
    if any(t < 0 for t in ids):
        raise ValueError(f"{name} must be token ids >= 0, got {list(ids)}")
    return ids


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
        # Lists are accepted and stored as tuples (the params stay hashable and immutable). Every field is
        # checked here, so a request's settings can never fail later, inside a step.
        temperature = _real("temperature", self.temperature)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        top_k = _integer("top_k", self.top_k)
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no cut), got {top_k}")
        top_p = _real("top_p", self.top_p)
        if not 0 < top_p <= 1:  # NaN fails this too
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        seed = self.seed
        if seed is not None:
            seed = _integer("seed", seed)
            if not 0 <= seed < 2**64:
                raise ValueError(f"seed must be None or an integer in [0, 2**64), got {seed}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise TypeError(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")
        ids = _token_ids("stop_token_ids", self.stop_token_ids)
        if isinstance(self.stop, (str, bytes)) or not isinstance(self.stop, Iterable):
            raise TypeError(f"stop must be a sequence of token-id sequences, got {type(self.stop).__name__}")
        seqs = tuple(_token_ids("stop", seq) for seq in self.stop)
        if any(not seq for seq in seqs):
            raise ValueError("stop: every stop sequence must be a non-empty sequence of token ids >= 0")
        for name, value in (
            ("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seed", seed),
            ("ignore_eos", bool(self.ignore_eos)), ("stop_token_ids", ids), ("stop", seqs),
        ):  # fmt: skip
            object.__setattr__(self, name, value)

    def max_token_id(self) -> int:
        """The largest token id named by the stop conditions (-1 when there are none): `Engine.add_request`
        checks it against the vocabulary."""
        return max([-1, *self.stop_token_ids, *(t for seq in self.stop for t in seq)])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from `logits` float `[vocab]` (ties in greedy go to the lowest id). ValueError, before
    the generator is used, when a drawn (non-greedy) request's logits hold NaN or +inf or are not one row."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be one non-empty row [vocab], got shape {logits.shape}")
    if params.greedy:
        return int(np.argmax(logits))
    if np.isnan(logits).any() or np.isposinf(logits).any() or not np.isfinite(logits.max()):
        raise ValueError("logits hold NaN or +inf (or no finite value): no distribution to draw from")
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


def sample_request(request_id: int, logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """`sample`, with a failure reported as `SamplingError` naming `request_id` (so one request's bad logits
    finish that request alone instead of failing every step)."""
    try:
        return sample(logits, params, rng)
    except Exception as e:
        raise SamplingError(request_id, str(e)) from e


class Drawer(Protocol):
    """What `draw_tokens` reads of a request that draws (a scheduled chunk)."""

    @property
    def request_id(self) -> int: ...
    @property
    def sampling(self) -> SamplingParams: ...
    @property
    def rng(self) -> np.random.Generator: ...


def draw_tokens(drawers: Sequence[Drawer], logits_rows: np.ndarray, tokens: dict[int, int]) -> None:
    """Each of `drawers` draws its next token from its row of `logits_rows` (`[len(drawers), vocab]`, or
    more rows, padding) with its own generator (`sample_request`), into `tokens` by request id. If any
    draw raises, every drawer's generator state is restored first, so a retried step draws the same
    tokens."""
    states = [d.rng.bit_generator.state for d in drawers]
    try:
        for j, d in enumerate(drawers):
            tokens[d.request_id] = sample_request(d.request_id, logits_rows[j], d.sampling, d.rng)
    except BaseException:
        for d, state in zip(drawers, states, strict=True):
            d.rng.bit_generator.state = state
        raise
