"""`KVManager`: the engine's pages and prefixes — one block pool, one block table per request.

Every cache of every layer (latent rows, device indexer pages, host indexer cache) is paged alike, so one
block id stands for the same token positions in all of them and a request's block table addresses all
of them at once. The blocks come from the Rust `BlockPool` (`dsa_hybrid.host.BlockPool`: free list and
reference counts, the one allocator of the package). A block can be held by several requests at once
(prefix sharing): it returns to the pool when the last holder lets go. Shared blocks are never written: a
request only writes positions at or after its `computed` count, and it adopts only whole blocks below it.

`PrefixIndex` finds, for a request, the longest run of whole blocks some other live request has already
computed for the same leading tokens. The key of block `i` is a hash chained over blocks `0..i` (as in
vLLM's prefix caching), so one lookup matches a whole prefix; a hit is confirmed on the tokens themselves,
so a hash collision can never hand out the wrong blocks.

The interface the scheduler uses (`serving.scheduler`): `blocks_needed` / `allocate` (all or nothing),
`adopt_prefix`, `mark_computed`, `free`; the runner reads `block_table`. Nothing here touches a cache's
bytes: a fork or a preemption is one operation on one table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dsa_hybrid.host import BlockPool

logger = logging.getLogger(__name__)


class Holder(Protocol):
    """What the prefix index and the KV manager need from a request."""

    id: int
    computed: int  # tokens whose keys and latents are in the caches

    @property
    def tokens(self) -> list[int]: ...


def page_hashes(tokens: Sequence[int], page_size: int, upto: int, have: list[int]) -> list[int]:
    """Chained hashes of the first `upto` whole pages of `tokens`, extending `have` (the ones already made)."""
    h = have[-1] if have else 0
    for i in range(len(have), upto):
        h = hash((h, tuple(tokens[i * page_size : (i + 1) * page_size])))
        have.append(h)
    return have


class PrefixIndex:
    """Chained page hash → the live requests whose computed pages hold that prefix."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._holders: dict[int, dict[int, Holder]] = {}
        self._registered: dict[int, list[int]] = {}  # request id → its hashes in the index, in page order
        self._hashes: dict[int, list[int]] = {}  # request id → chained hashes of its tokens' whole pages

    def _hashes_of(self, r: Holder, upto: int) -> list[int]:
        return page_hashes(r.tokens, self.page_size, upto, self._hashes.setdefault(r.id, []))

    def register(self, r: Holder) -> None:
        """Index `r`'s whole computed pages (call after its `computed` grows)."""
        done = self._registered.setdefault(r.id, [])
        full = r.computed // self.page_size
        for h in self._hashes_of(r, full)[len(done) : full]:
            self._holders.setdefault(h, {})[r.id] = r
            done.append(h)

    def forget(self, r: Holder) -> None:
        """Drop `r` from the index (it finished, was aborted or preempted)."""
        for h in self._registered.pop(r.id, []):
            holders = self._holders.get(h)
            if holders is not None:
                holders.pop(r.id, None)
                if not holders:
                    del self._holders[h]
        self._hashes.pop(r.id, None)

    def longest_match(self, r: Holder) -> tuple[Holder, int] | None:
        """`(donor, m)`: another live request whose first `m` computed pages hold `r`'s first `m · page_size`
        tokens, with `m` as large as possible and `m · page_size` below `len(r.tokens)` (the last token
        must still be computed: its logits give the next token). None when no page beyond
        `r.computed` can be gained."""
        S = self.page_size
        most = (len(r.tokens) - 1) // S
        first = r.computed // S + 1  # a match must reach past what r has already computed
        if most < first:
            return None
        hashes = self._hashes_of(r, most)
        for m in range(most, first - 1, -1):  # longest first; chained hashes: one hit covers pages 0..m-1
            for donor in self._holders.get(hashes[m - 1], {}).values():
                if donor.id != r.id and donor.computed >= m * S and donor.tokens[: m * S] == r.tokens[: m * S]:
                    return donor, m
        return None


class KVManager:
    """The block pool, each request's block table and the prefix index.

    Args:
        num_blocks: blocks in the pool (every cache of every layer has this many pages).
        block_size: tokens per block.
        prefix_sharing: let a request adopt another live request's computed blocks for equal leading tokens.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_sharing: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.prefix = PrefixIndex(block_size) if prefix_sharing else None
        self._tables: dict[int, list[int]] = {}  # request id → its blocks, in position order

    # ----- state -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def block_table(self, request_id: int) -> list[int]:
        """A copy of the request's block table (empty when it holds no blocks)."""
        return list(self._tables.get(request_id, ()))

    def block_tables(self) -> dict[int, list[int]]:
        """A copy of every non-empty block table, by request id."""
        return {rid: list(t) for rid, t in self._tables.items() if t}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----- allocation --------------------------------------------------------------------------
    def blocks_needed(self, request_id: int, num_tokens: int) -> int:
        """Blocks the request still lacks to hold positions `< num_tokens`."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(request_id, ())))

    def allocate(self, request_id: int, num_tokens: int) -> bool:
        """Extend the request's table to hold positions `< num_tokens`. All or nothing: False (and nothing
        changed) when the pool has fewer free blocks than needed."""
        need = self.blocks_needed(request_id, num_tokens)
        if need > self.pool.num_free:
            return False
        if need:
            self._tables.setdefault(request_id, []).extend(self.pool.allocate(need).tolist())
        return True

    def free(self, r: Holder) -> None:
        """Give back every block `r` holds and drop it from the prefix index (finished, aborted, preempted)."""
        table = self._tables.pop(r.id, [])
        if table:
            self.pool.release(np.asarray(table, np.int32))
        if self.prefix is not None:
            self.prefix.forget(r)

    # ----- transactions ------------------------------------------------------------------------
    def snapshot(self) -> dict[int, list[int]]:
        """Every request's block table (copies): what `restore` brings back after a failed step."""
        return {rid: list(t) for rid, t in self._tables.items()}

    def restore(self, tables: dict[int, list[int]], holders: Sequence[Holder]) -> None:
        """Undo everything since `snapshot()` returned `tables`: each request holds exactly those blocks
        again and every block's reference count is the number of tables holding it (blocks taken since
        are released, blocks given back since are taken back from the free list; the free list's order
        may differ, which no result depends on). `holders` are the live requests at the snapshot (their
        `computed` already restored): the prefix index is rebuilt from them."""
        want = np.zeros(self.num_blocks, np.int64)
        for t in tables.values():
            np.add.at(want, np.asarray(t, np.int64), 1)
        have = self.pool.refcounts().astype(np.int64)
        extra = np.repeat(np.arange(self.num_blocks), np.maximum(have - want, 0)).astype(np.int32)
        if extra.size:
            self.pool.release(extra)
        held = have - np.maximum(have - want, 0)  # counts after the release
        refill = np.flatnonzero((held == 0) & (want > 0))
        if refill.size:  # given back during the failed step: take exactly those off the free list again
            taken = self.pool.allocate(self.pool.num_free)
            keep = np.isin(taken, refill)
            if (~keep).any():
                self.pool.release(taken[~keep])
            held[refill] = 1
        more = np.repeat(np.arange(self.num_blocks), np.maximum(want - held, 0)).astype(np.int32)
        if more.size:
            self.pool.retain(more)
        self._tables = {rid: list(t) for rid, t in tables.items()}
        if self.prefix is not None:
            self.prefix = PrefixIndex(self.block_size)
            for r in holders:
                if r.id in self._tables:
                    self.prefix.register(r)

    # ----- prefixes ----------------------------------------------------------------------------
    def mark_computed(self, r: Holder) -> None:
        """`r.computed` grew: its whole computed blocks become adoptable by others."""
        if self.prefix is not None:
            self.prefix.register(r)

    def adopt_prefix(self, r: Holder) -> int | None:
        """Replace `r`'s leading blocks by those of another live request that has computed more of the same
        leading tokens (the longest run of whole blocks, below `r`'s last token). Returns the number of
        tokens `r` now has computed (set `r.computed` to it, then call `mark_computed`), or None when no
        block can be gained. The adopted blocks gain a holder; `r`'s own blocks lose one."""
        if self.prefix is None:
            return None
        match = self.prefix.longest_match(r)
        if match is None:
            return None
        donor, m = match
        shared = self._tables[donor.id][:m]
        self.pool.retain(np.asarray(shared, np.int32))  # before the release: no block passes through free
        own = self._tables.pop(r.id, [])
        if own:
            self.pool.release(np.asarray(own, np.int32))
        self.prefix.forget(r)
        self._tables[r.id] = shared
        logger.debug("request %d adopts %d blocks of request %d", r.id, m, donor.id)
        return m * self.block_size
