"""The engine's page bookkeeping: a reference-counted page pool and an index of computed prefixes.

Both caches of every layer (latent rows, indexer keys) are paged alike, so one page id stands for the
same token positions in all of them. A page can be held by several requests at once (prefix sharing):
it returns to the pool when the last holder lets go. Shared pages are never written: a request only
writes positions at or after its `computed` count, and it adopts only whole pages before that count.

`PrefixIndex` finds, for a request, the longest run of whole pages some other live request has already
computed for the same leading tokens. The key of page `i` is a hash chained over pages `0..i` (as in
vLLM's prefix caching), so one lookup matches a whole prefix; a hit is confirmed on the tokens
themselves, so a hash collision can never hand out the wrong pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class PoolExhausted(RuntimeError):
    """No free page is left."""


class PagePool:
    """`num_pages` pages with reference counts; `take` hands out a free page, `release` drops a hold."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: page 0 first
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def free_pages(self) -> list[int]:
        return list(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def take(self, n: int) -> list[int]:
        """`n` free pages, each now held once. PoolExhausted (and nothing taken) if fewer are free."""
        if n > len(self._free):
            raise PoolExhausted(f"{n} pages wanted, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: Sequence[int]) -> list[int]:
        """One more hold on each of `pages` (all held already)."""
        for p in pages:
            if self._refs[p] < 1:
                raise ValueError(f"page {p} is free: only held pages can be shared")
            self._refs[p] += 1
        return list(pages)

    def release(self, pages: Sequence[int]) -> None:
        """Drop one hold on each of `pages`; pages nobody holds go back to the pool."""
        for p in reversed(pages):
            if self._refs[p] < 1:
                raise ValueError(f"page {p} is not held")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)


class Holder(Protocol):
    """What the index needs from a request."""

    id: int
    pages: list[int]
    computed: int

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
