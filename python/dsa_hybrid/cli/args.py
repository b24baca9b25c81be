"""argparse types shared by the `dsa-hybrid` commands (absurd values are refused before anything runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer in `[lo, hi]` (a usage error, exit 2, otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must lie in [{lo}, {hi}], got {value}")
        return value

    parse.__name__ = "integer"
    return parse
