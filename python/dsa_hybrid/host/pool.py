"""`BlockPool`: THE block allocator (Rust core, `rust/src/pool.rs`) — a free list and reference counts.

The serving engine takes blocks from one pool and keeps one block table per request for every cache
(latent rows, device indexer, host indexer), so a block id means the same token positions in all of them.
The pool knows nothing of page layouts. A block held by several requests (a shared prefix) has a count
above one and returns to the free list when its last holder releases it; copy-on-write of a shared
partial page is the caller's job (`IndexerKeyCache.copy_block` copies a page's bytes; the engine only
ever shares whole computed pages, so it needs none).

Order: a fresh pool hands out the lowest ids first; `release` takes its blocks in reverse order, so a run
released and allocated again comes back in the same order (as the engine's former `PagePool` did).

Every call checks everything before it changes anything: on error the pool is exactly as before.
`CacheFullError` (with `wanted` and `free` attributes) when an allocation does not fit (any `n`, however
large), `IndexError` for a block id outside `[0, num_blocks)` (of any size: never wrapped), `ValueError`
for retaining or releasing a free block (counting each repeat of an id) or a negative `n`, `TypeError`
for something that is not integers (a float, a bool, a string, None, a nested sequence), `MemoryError`
if a pool's bookkeeping (8 bytes per block) cannot be allocated. Thread-safe: a mutex inside.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from dsa_hybrid import _core


class BlockPool:
    """A pool of `num_blocks` blocks, each free or held by some holders (see the module docstring).

    Args:
        num_blocks: blocks in the pool, in `[1, 2**31 - 1]` (ValueError otherwise): ids travel as int32.
    """

    __slots__ = ("_p",)

    def __init__(self, num_blocks: int) -> None:
        self._p = _core.BlockPool(num_blocks)

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
        return self._p.num_blocks

    @property
    def num_free(self) -> int:
        """Blocks no one holds."""
        return self._p.num_free

    def allocate(self, n: int) -> npt.NDArray[np.int32]:
        """`n` free blocks, each now held once: int32 `[n]`, in the order `free_blocks()` lists them.
        All or nothing: CacheFullError if fewer than `n` are free; ValueError for `n < 0`."""
        return self._p.allocate(n)

    def retain(self, blocks: Any) -> None:
        """One more holder of each of `blocks` (int array-like; an id listed twice gains two), e.g. a request
        adopting another's prefix pages. IndexError out of range, ValueError for a free block."""
        self._p.retain(blocks)

    def release(self, blocks: Any) -> None:
        """One holder fewer for each of `blocks` (int array-like), taken in reverse order; a block left
        with no holder goes back to the free list. IndexError out of range, ValueError for a block that
        is free (or would be released more times than it is held)."""
        self._p.release(blocks)

    def refcount(self, block: int) -> int:
        """Holders of `block` (0: free). IndexError out of range."""
        return self._p.refcount(block)

    def refcounts(self) -> npt.NDArray[np.int32]:
        """Holders of every block: int32 `[num_blocks]`."""
        return self._p.refcounts()

    def free_blocks(self) -> npt.NDArray[np.int32]:
        """The free blocks, int32, in the order `allocate` will hand them out."""
        return self._p.free_blocks()

    def __repr__(self) -> str:
        return f"BlockPool(num_blocks={self.num_blocks}, num_free={self.num_free})"
