"""Block sizes of the Pallas TPU kernels per chip generation, and the VMEM check made before a launch.

As JAX's `ragged_paged_attention/tuned_block_sizes.py`, the sizes live in one table keyed by chip
generation (`ops.target.tpu_chip()`: "v5e", "v5p", "v6e", "tpu7x"; `None` for interpret mode / an
unknown chip). **They are not tuned on hardware yet** (nothing here has been timed on a chip): they
follow the MXU shapes (128 × 128 on v5e / v5p, 256 × 256 on v6e / TPU7x) and keep every kernel well
inside each chip's default scoped VMEM. `tpu/validate.py` on a TPU VM is where they get tuned.

Every kernel computes its VMEM need from its own block and scratch shapes (`vmem_bytes`) before the
`pallas_call`; when the need passes the chip's default scoped limit the call raises the limit
(`vmem_limit_bytes`), and when it passes the chip's physical VMEM (`pltpu.get_tpu_info()`, with a
margin for Mosaic's internal scratch) the tokens per step are halved until it fits, or the call
raises a `ValueError` naming the need and the capacity.
"""

from __future__ import annotations

import dataclasses
import math

# Default scoped VMEM limit of a Mosaic kernel, per chip (bytes): what a kernel may use without
# `vmem_limit_bytes` (the `--xla_tpu_scoped_vmem_limit_kib` default). Measured with the AOT compiler
# of libtpu 0.0.42 (`tpu/compile.py --probe-vmem`): the largest scratch that compiles without a limit.
SCOPED_VMEM_DEFAULT = {"v5e": 16 << 20, "v5p": 16 << 20, "v6e": 32 << 20, "tpu7x": 32 << 20, None: 16 << 20}
# Physical VMEM per TensorCore (`pltpu.get_tpu_info().vmem_capacity_bytes`), for when no TPU info is
# available (interpret mode).
VMEM_CAPACITY = {"v5e": 128 << 20, "v5p": 64 << 20, "v6e": 128 << 20, "tpu7x": 64 << 20, None: 64 << 20}
# Left to Mosaic's internal scratch and the pipeline's bookkeeping.
VMEM_MARGIN = 4 << 20


@dataclasses.dataclass(frozen=True)
class SparseMLABlocks:
    tokens_per_step: int  # query tokens per grid step
    chunk: int  # gathered rows per DMA batch / per softmax step (mode "rows")


@dataclasses.dataclass(frozen=True)
class IndexerBlocks:
    rows_per_step: int  # query rows per grid step
    keys_per_step: int  # keys (whole pages) scored per grid step


# chip → blocks. Rows per matmul: heads × 1 token for sparse MLA (each token has its own rows),
# rows × heads for the indexer; `chunk` / `keys_per_step` are the matmul's N (128 fills a v5e/v5p MXU,
# 256 a v6e/TPU7x one).
SPARSE_MLA: dict[str | None, SparseMLABlocks] = {
    "v5e": SparseMLABlocks(8, 128),
    "v5p": SparseMLABlocks(8, 128),
    "v6e": SparseMLABlocks(8, 256),
    "tpu7x": SparseMLABlocks(8, 256),
    None: SparseMLABlocks(8, 128),
}
INDEXER: dict[str | None, IndexerBlocks] = {
    "v5e": IndexerBlocks(8, 512),
    "v5p": IndexerBlocks(8, 512),
    "v6e": IndexerBlocks(8, 512),
    "tpu7x": IndexerBlocks(8, 1024),
    None: IndexerBlocks(8, 512),
}


# Every kernel launch traced in this process appends its name, blocks and VMEM need here (read by
# `tpu/compile.py` to print the VMEM column; cleared by the caller).
LAUNCHES: list[dict] = []


def record(name: str, chip: str | None, need: int, limit: int | None, **blocks: int) -> None:
    LAUNCHES.append(dict(name=name, chip=chip, vmem_need=need, vmem_limit=limit, **blocks))


def sparse_mla_blocks(chip: str | None) -> SparseMLABlocks:
    return SPARSE_MLA.get(chip, SPARSE_MLA[None])


def indexer_blocks(chip: str | None) -> IndexerBlocks:
    return INDEXER.get(chip, INDEXER[None])


def tile_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of a VMEM array of `shape` in Mosaic's native tiling: the last two dimensions padded to
    (8 · packing, 128) for 32/16/8-bit types (a 1-D array to 128 · 8 · packing elements)."""
    packing = max(1, 4 // itemsize)
    if len(shape) == 1:
        return _round(shape[0], 1024 * packing) * itemsize
    *lead, a, b = shape
    return math.prod(lead) * _round(a, 8 * packing) * _round(b, 128) * itemsize


def vmem_limit(chip: str | None, need: int, capacity: int | None = None) -> int | None:
    """`vmem_limit_bytes` for a kernel needing `need` bytes: None (the default limit) when it fits the
    default scoped VMEM; else the need plus a margin, capped by the capacity. Raises when it cannot fit."""
    capacity = VMEM_CAPACITY.get(chip, VMEM_CAPACITY[None]) if capacity is None else capacity
    if need + VMEM_MARGIN > capacity:
        raise ValueError(f"kernel needs {need} bytes of VMEM; the chip has {capacity} (margin {VMEM_MARGIN})")
    if need <= SCOPED_VMEM_DEFAULT.get(chip, SCOPED_VMEM_DEFAULT[None]) - VMEM_MARGIN:
        return None
    return min(capacity, _round(need + VMEM_MARGIN, 1 << 20))


def capacity(chip: str | None) -> int:
    """The target's VMEM per TensorCore: `pltpu.get_tpu_info()` when the target is a TPU, the table
    otherwise."""
    if chip is not None:
        try:
            from jax.experimental.pallas import tpu as pltpu

            return int(pltpu.get_tpu_info().vmem_capacity_bytes)
        except Exception:  # noqa: BLE001 - no TPU info for this target: the table's value
            pass
    return VMEM_CAPACITY.get(chip, VMEM_CAPACITY[None])


def fits(chip: str | None, need: int) -> bool:
    return need + VMEM_MARGIN <= capacity(chip)


def _round(x: int, m: int) -> int:
    return -(-x // m) * m
