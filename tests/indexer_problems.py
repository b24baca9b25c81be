"""Random indexer problems shared by the host-select and device-indexer tests: an `IndexerKeyCache` of a few
sequences (forks, truncations, duplicated keys) and a ragged batch of query rows, with oracle scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

import dsa_hybrid as dh
from dsa_hybrid import reference as ref


@dataclass
class Problem:
    cache: dh.IndexerKeyCache
    keys: dict[int, np.ndarray]  # the float32 keys appended to each sequence, in order
    seq_ids: np.ndarray
    q: np.ndarray
    w: np.ndarray
    positions: np.ndarray
    k: int


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    """A cache of 1–3 sequences (one may be a fork sharing its parent's pages, one may have been truncated
    and refilled), and a ragged batch of query rows over them."""
    D = draw(st.sampled_from([16, 32, 128]))
    H = draw(st.sampled_from([1, 3, 16, 64]))
    block = draw(st.sampled_from([16, 64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cache = dh.IndexerKeyCache(num_blocks=160, block_size=block, head_dim=D)
    keys: dict[int, np.ndarray] = {}
    for sid in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 700))
        k = rng.standard_normal((n, D)).astype(np.float32)
        if draw(st.booleans()):  # duplicated keys score exactly alike: the tie rule decides
            k[rng.integers(0, n, n // 3)] = k[0]
        if sid == 1 and draw(st.booleans()):
            cache.fork(0, 1)  # shares sequence 0's pages, then grows its own
            k = np.concatenate([keys[0], k])
            cache.append(1, k[keys[0].shape[0] :])
        else:
            cache.add_sequence(sid)
            cache.append(sid, k)
        if draw(st.booleans()):  # truncate (maybe to nothing) and refill
            keep = draw(st.integers(0, k.shape[0] - 1))
            cache.truncate(sid, keep)
            cache.append(sid, k[keep:])
        keys[sid] = k
    T = draw(st.integers(1, 5))
    seq_ids = rng.integers(0, len(keys), T)
    positions = np.array([rng.integers(0, keys[s].shape[0]) for s in seq_ids])
    positions[0] = keys[seq_ids[0]].shape[0] - 1  # a decode row at the end of its sequence
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    w = (rng.standard_normal((T, H)) * H**-0.5).astype(np.float32)
    return Problem(cache, keys, seq_ids, q, w, positions, draw(st.sampled_from([1, 5, 64, 256])))


def oracle_scores(p: Problem, quantized: bool) -> np.ndarray:
    """float64 `[T, L]` oracle scores over the cache's own FP8 keys, NaN-free, −inf past each row."""
    L = int(p.positions.max()) + 1
    out = np.full((len(p.seq_ids), L), -np.inf)
    for t, (sid, pos) in enumerate(zip(p.seq_ids, p.positions, strict=True)):
        codes, scales = p.cache.gather(int(sid), np.arange(pos + 1))
        if quantized:
            row = ref.indexer_scores_fp8(p.q[t : t + 1], p.w[t : t + 1], codes, scales)
        else:
            keys = ref.fp8_decode(codes) * scales[:, None].astype(np.float64)  # rotated basis, like the queries
            row = ref.indexer_scores(ref.hadamard(p.q[t : t + 1]), p.w[t : t + 1], keys)
        out[t, : pos + 1] = row[0]
    return out


def tie_atol(scores: np.ndarray) -> float:
    # float32 accumulation of exact FP8 products: relative error ~1e-6 of the largest term.
    finite = np.abs(scores[np.isfinite(scores)])
    return 1e-5 * float(finite.max(initial=0.0)) + 1e-30


def small_paged_problem(rng: np.random.Generator, S: int = 16, D: int = 32, H: int = 4) -> tuple:
    """A small fixed problem through block tables: `(cache, IndexerPages of its bytes, q [3, H, D], w [3, H],
    tables int32 [3, 6] (−1 padded), positions int32 [3])`, rows over two sequences of 70 and 33 keys."""
    from dsa_hybrid.ops.indexer import IndexerPages

    cache = dh.IndexerKeyCache(num_blocks=12, block_size=S, head_dim=D)
    for s, n in enumerate((70, 33)):
        cache.add_sequence(s)
        cache.append(s, rng.standard_normal((n, D)).astype(np.float32))
    tables = np.full((3, 6), -1, np.int32)
    for i, s in enumerate((0, 1, 0)):
        bt = cache.block_table(s)
        tables[i, : bt.size] = bt
    pos = np.array([69, 32, 5], np.int32)
    q = rng.standard_normal((3, H, D)).astype(np.float32)
    w = (rng.random((3, H)) * H**-0.5).astype(np.float32)
    return cache, IndexerPages.from_host_pages(cache.pages(), S, D), q, w, tables, pos
