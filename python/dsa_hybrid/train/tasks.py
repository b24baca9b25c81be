"""Synthetic long-context tasks whose answers depend on a few tokens far back: key-value recall.

**Key-value recall** (a passkey-style multi-query associative recall). A sequence of length `L` is
`BOS`, then filler tokens with `pairs` *fact* tokens scattered among them — each fact one token naming a
(key, value) pair, keys distinct within the sequence —, then `queries` questions at the end: a *ask*
token naming a key, followed by the answer, the value token of that key's fact. The model is scored on
predicting each answer from its ask token: the one position that holds the fact can be anywhere in the
`L`-token context. Dense attention can find it; a sliding window or random positions keep it with
probability about `k / L`; DSA keeps it when its indexer scores the fact above the filler.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsa_hybrid.ops.checks import check_alloc, check_int

# The largest vocabulary a task may name (token ids are int32).
MAX_VOCAB = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """Token layout of the key-value recall task (ids `0 … vocab_size − 1`)."""

    n_keys: int = 16
    n_values: int = 16
    n_filler: int = 64
    pairs: int = 8
    queries: int = 4

    PAD = 0
    BOS = 1

    def __post_init__(self) -> None:
        for name in ("n_keys", "n_values", "n_filler", "pairs", "queries"):
            check_int(f"RecallTask.{name}", getattr(self, name), 1)
        if self.vocab_size > MAX_VOCAB:
            raise ValueError(f"RecallTask: vocab_size {self.vocab_size} would pass {MAX_VOCAB} (int32 ids)")
        if self.pairs > self.n_keys or self.queries > self.pairs:
            raise ValueError(
                f"RecallTask: need queries ({self.queries}) <= pairs ({self.pairs}) <= n_keys ({self.n_keys})"
            )

    @property
    def filler0(self) -> int:
        return 2

    @property
    def ask0(self) -> int:
        return self.filler0 + self.n_filler

    @property
    def fact0(self) -> int:
        return self.ask0 + self.n_keys

    @property
    def value0(self) -> int:
        return self.fact0 + self.n_keys * self.n_values

    @property
    def vocab_size(self) -> int:
        return self.value0 + self.n_values

    def min_length(self) -> int:
        return 1 + self.pairs + 2 * self.queries

    def batch(self, rng: np.random.Generator, batch: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(tokens, targets, weights)`, each `[batch, length]`: int32 inputs, int32 next-token targets
        (the answer at each ask position, 0 elsewhere) and float32 weights (1 at ask positions).
        `TypeError` for `rng` not a numpy `Generator` or non-integer sizes, `ValueError` for `batch` < 1 or
        `length` < `min_length()`, `MemoryError` beyond 2**40 bytes."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy Generator (np.random.default_rng), got {type(rng).__name__}")
        batch = check_int("batch", batch, 1)
        length = check_int("length", length, self.min_length())
        check_alloc("batch x length", (batch, length), 8 * 3)
        tokens = self.filler0 + rng.integers(0, self.n_filler, (batch, length))
        tokens[:, 0] = self.BOS
        targets = np.zeros((batch, length), np.int64)
        weights = np.zeros((batch, length), np.float32)
        body = length - 2 * self.queries  # facts go into positions 1 … body − 1
        for b in range(batch):
            keys = rng.permutation(self.n_keys)[: self.pairs]
            values = rng.integers(0, self.n_values, self.pairs)
            where = 1 + rng.permutation(body - 1)[: self.pairs]
            tokens[b, where] = self.fact0 + keys * self.n_values + values
            asked = rng.permutation(self.pairs)[: self.queries]
            for j, a in enumerate(asked):
                p = body + 2 * j
                tokens[b, p] = self.ask0 + keys[a]
                tokens[b, p + 1] = self.value0 + values[a]
                targets[b, p] = self.value0 + values[a]
                weights[b, p] = 1.0
        return tokens.astype(np.int32), targets.astype(np.int32), weights

    def ask_positions(self, length: int) -> np.ndarray:
        """int32 `[queries]`: where the ask tokens sit in a sequence of `length` (the scored rows);
        `length` as in `batch`."""
        length = check_int("length", length, self.min_length())
        return (length - 2 * self.queries + 2 * np.arange(self.queries)).astype(np.int32)

    def prompts(self, rng: np.random.Generator, n: int, length: int) -> tuple[list[list[int]], list[int]]:
        """`n` serving prompts of `length` tokens ending with an ask token, and the expected answers
        (`length` >= `min_length() - 2 * queries + 1`, `n` >= 1)."""
        n = check_int("n", n, 1)
        length = check_int("length", length, self.min_length() - 2 * self.queries + 1)
        tokens, targets, _ = self.batch(rng, n, length + 2 * self.queries - 1)
        end = length  # the first ask token is at index length − 1
        return [t[:end].tolist() for t in tokens], [int(targets[i, end - 1]) for i in range(n)]
