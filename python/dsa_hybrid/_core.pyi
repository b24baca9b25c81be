"""Type stubs for the Rust extension module `dsa_hybrid._core`."""

import numpy as np
import numpy.typing as npt

__version__: str

def cpu_features() -> dict[str, bool | str]:
    """Detected CPU features (name -> present) plus `simd_path`, the SIMD path in use."""

def fp8_quantize_rows(
    x: npt.NDArray[np.float32], *, hadamard: bool = True
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Quantize each row of a C-contiguous float32 `[n, d]` array to FP8 e4m3fn with one power-of-two
    scale per row, after an optional orthonormal Hadamard rotation (spec §4). Returns
    `(codes uint8 [n, d], scales float32 [n])`, bit-identical to the reference. Releases the GIL.
    Raises ValueError on NaN/inf or (with `hadamard`) a width that is not a power of two."""

def fp8_decode_table() -> npt.NDArray[np.float32]:
    """float32 `[256]`: the value of each e4m3fn code (0x7F and 0xFF are NaN)."""
