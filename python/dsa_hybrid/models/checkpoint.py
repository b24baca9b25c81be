"""Hugging Face checkpoints: read (and write) `*.safetensors`, and load one layer's DSA weights (dsa.md §4b).

The reader is self-contained (numpy + ml_dtypes, no torch). Each file is memory-mapped and only the bytes
of the tensors asked for are read. Every header field is checked against the file before any tensor is
touched (`SafetensorsFile`): header length vs file size, the JSON's shape, dtype names, shapes,
`data_offsets` (within the data section, sized `prod(shape) · itemsize`, not overlapping), duplicate
names. A sharded checkpoint's `model.safetensors.index.json` may name only files inside the checkpoint
directory. A malformed file raises `CheckpointError` (a `ValueError`) naming the file and the field.

It understands F64, F32, F16, BF16, F8_E4M3 and the integer types. FP8 checkpoints store each linear weight
as e4m3fn with a companion `weight_scale_inv` of 128 × 128 block scales, `W[a, b] = W8[a, b] · S[a // 128,
b // 128]`; `Checkpoint.weight` returns them as an `Fp8Weight` (kept FP8) or dequantized to float32.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

from dsa_hybrid.layers.weights import FP8_BLOCK, Fp8Weight
from dsa_hybrid.layers.weights import dequantize_fp8_blocks as dequantize_fp8_blocks
from dsa_hybrid.layers.weights import quantize_fp8_blocks as quantize_fp8_blocks_unchecked
from dsa_hybrid.models.config import DSAConfig

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
# The safetensors format's own limit on the JSON header (the Rust reference refuses larger ones).
MAX_HEADER_BYTES = 100_000_000
INDEX_FILE = "model.safetensors.index.json"
__all__ = [
    "FP8_BLOCK",
    "Checkpoint",
    "CheckpointError",
    "SafetensorsFile",
    "checkpoint_index",
    "dequantize_fp8_blocks",
    "load_layer_params",
    "load_tensors",
    "quantize_fp8_blocks",
    "read_safetensors",
    "write_safetensors",
]


class CheckpointError(ValueError):
    """A checkpoint file or index that does not describe itself consistently (names the file and field)."""


def quantize_fp8_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FP8-quantize a float weight `w [..., out, in]` as DeepSeek's checkpoints are made: per 128 × 128
    block `scale = amax / 448`, `codes = e4m3fn(W / scale)`. Returns `(codes [..., out, in]
    float8_e4m3fn, scale_inv [..., ceil(out / 128), ceil(in / 128)] float32)`. `TypeError` names `w`
    when it is not a real (integer or float) array, `ValueError` when it has fewer than 2 dimensions, an
    empty one, or a NaN / infinite entry (a block's scale would be NaN: every code of it lost)."""
    a = np.asarray(w)
    real = np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
    if a.dtype == np.bool_ or not (real or a.dtype in (np.dtype(ml_dtypes.bfloat16), FP8)):
        raise TypeError(f"w: expected a real (float or integer) array, got dtype {a.dtype}")
    if a.ndim < 2:
        raise ValueError(f"w: expected a weight of shape [..., out, in] (2-D or more), got shape {list(a.shape)}")
    if a.size == 0:
        raise ValueError(f"w: expected a non-empty weight, got shape {list(a.shape)}")
    if not np.isfinite(a.astype(np.float32)).all():
        raise ValueError("w: the weight has NaN or infinite entries (their 128 x 128 blocks cannot be scaled)")
    return quantize_fp8_blocks_unchecked(a)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"duplicate key {k!r}")
        out[k] = v
    return out


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped, its header validated against the file (see the module
    docstring). `names` lists its tensors; `array(name)` is a read-only view of the mapped bytes (no
    copy); `dtype(name)`, `shape(name)`, `nbytes(name)` read the header only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        where = str(self.path)
        if size < 8:
            raise CheckpointError(f"{where}: {size} bytes, too short for a safetensors header length (8 bytes)")
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{where}: header length {header_len} exceeds the file ({size} bytes) or the "
                    f"{MAX_HEADER_BYTES}-byte limit"
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: header: {e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{where}: header is not valid UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{where}: header must be a JSON object, got {type(header).__name__}")
        meta = header.pop("__metadata__", None)
        if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
            raise CheckpointError(f"{where}: __metadata__ must be an object of strings")
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, info in header.items():
            self._entries[name] = entry = self._check_entry(where, name, info, data_len)
            spans.append((entry[2], entry[3], name))
        spans.sort()
        prev_end, prev = 0, ""
        for start, end, name in spans:
            if start == end:  # zero-sized tensors overlap nothing
                continue
            if start < prev_end:
                raise CheckpointError(f"{where}: tensors {prev!r} and {name!r} overlap (bytes {start}..{prev_end})")
            prev_end, prev = end, name
        self._map: np.memmap | None = None

    @staticmethod
    def _check_entry(where: str, name: str, info: Any, data_len: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        at = f"{where}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            keys = sorted(info) if isinstance(info, dict) else type(info).__name__
            raise CheckpointError(f"{at}: expected an object with dtype, shape, data_offsets, got {keys}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{at}: unsupported dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{at}: shape must be a list of non-negative integers, got {shape!r}")
        if len(shape) > 16:
            raise CheckpointError(f"{at}: shape has {len(shape)} dimensions (at most 16)")
        count = math.prod(shape)  # Python ints: no overflow; bounded by the data section below
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise CheckpointError(f"{at}: data_offsets must be [start, end] integers, got {offsets!r}")
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise CheckpointError(
                f"{at}: data_offsets [{start}, {end}] outside the data section [0, {data_len}] (or start > end)"
            )
        itemsize = _DTYPES[dtype].itemsize
        if end - start != count * itemsize:
            raise CheckpointError(
                f"{at}: data_offsets span {end - start} bytes, but shape {shape} of {dtype} needs {count * itemsize}"
            )
        return _DTYPES[dtype], tuple(shape), start, end

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        if name not in self._entries:
            raise KeyError(f"{name}: not in {self.path}")
        return self._entries[name]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def nbytes(self, name: str) -> int:
        _, _, start, end = self._entry(name)
        return end - start

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only view of the memory-mapped file (its bytes are read on first use)."""
        dtype, shape, start, end = self._entry(name)
        if start == end:
            return np.zeros(shape, dtype)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self._data_start + start : self._data_start + end]
        return np.frombuffer(raw, dtype=dtype).reshape(shape)


def read_safetensors(path: str | os.PathLike[str], names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of one `.safetensors` file (all, or those in `names`), as numpy arrays (copies; bf16 and
    fp8 as ml_dtypes types). `KeyError` names a requested tensor the file lacks; `CheckpointError` a
    malformed file."""
    f = SafetensorsFile(path)
    return {name: np.array(f.array(name)) for name in (f.names if names is None else names)}


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray]) -> None:
    """Write `tensors` as one `.safetensors` file (for tests, golden files and converted checkpoints)."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        if a.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {a.dtype} has no safetensors name")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a.tobytes())
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def _confined(directory: Path, rel: Any, where: str) -> Path:
    """`directory / rel` for a plain relative file name that stays inside `directory` (symlinks resolved)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise CheckpointError(f"{where}: file name must be a non-empty string, got {rel!r}")
    parts = rel.replace("\\", "/").split("/")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":") or ".." in parts:
        raise CheckpointError(f"{where}: file name {rel!r} must be relative, without '..', inside the checkpoint")
    target = (directory / rel).resolve()
    if not target.is_relative_to(directory.resolve()):
        raise CheckpointError(f"{where}: file {rel!r} resolves to {target}, outside the checkpoint directory")
    return directory / rel


def _checkpoint_dir(directory: str | os.PathLike[str]) -> Path:
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"{d}: checkpoint directory does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{d}: a checkpoint must be a directory")
    return d


def checkpoint_index(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Tensor name → file, from `model.safetensors.index.json` (its `weight_map`, whose file names must
    stay inside `directory`), or by reading the header of every `*.safetensors` file of `directory` when
    there is no index. `CheckpointError` for a malformed index, `FileNotFoundError` when there is nothing."""
    d = _checkpoint_dir(directory)
    index = d / INDEX_FILE
    if index.exists():
        where = str(index)
        try:
            doc = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_unique_object)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{where}: not valid UTF-8 JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
            raise CheckpointError(f"{where}: expected an object with a 'weight_map' object")
        files: dict[str, Path] = {}
        out = {}
        for name, rel in doc["weight_map"].items():
            if rel not in files:
                files[rel] = _confined(d, rel, f"{where}: weight_map[{name!r}]")
            out[name] = files[rel]
        return out
    paths = sorted(d.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"{d}: no *.safetensors files and no {INDEX_FILE}")
    out = {}
    for f in paths:
        _confined(d, f.name, str(f))
        for name in SafetensorsFile(f).names:
            if name in out:
                raise CheckpointError(f"{f}: tensor {name!r} is also in {out[name]}")
            out[name] = f
    return out


class Checkpoint:
    """A checkpoint directory opened lazily: the index is read once, each shard is opened (header
    validated, memory-mapped) the first time one of its tensors is asked for, and a tensor's bytes are
    read only when it is. `weight` returns what a layer keeps resident."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = _checkpoint_dir(directory)
        self.index = checkpoint_index(self.directory)
        self._files: dict[Path, SafetensorsFile] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def file(self, name: str) -> SafetensorsFile:
        if name not in self.index:
            raise KeyError(f"{name}: missing from the checkpoint in {self.directory}")
        path = self.index[name]
        if path not in self._files:
            if not path.exists():
                raise FileNotFoundError(f"{path}: named by the checkpoint index (for {name}) but missing")
            self._files[path] = SafetensorsFile(path)
        f = self._files[path]
        if name not in f:
            raise CheckpointError(f"{path}: the index names tensor {name!r}, the file lacks it")
        return f

    def array(self, name: str) -> np.ndarray:
        """The tensor as stored (a read-only memory-mapped view)."""
        return self.file(name).array(name)

    def nbytes(self, name: str) -> int:
        return self.file(name).nbytes(name)

    def scale_name(self, name: str) -> str:
        """The name of the FP8 block scales of weight `name` (`"….weight"` → `"….weight_scale_inv"`);
        `TypeError` naming `name` when it is not a string."""
        if not isinstance(name, str):
            raise TypeError(f"name: expected a tensor name (str), got {type(name).__name__}")
        return name.removesuffix("weight") + "weight_scale_inv"

    def weight(self, name: str, weights: str = "float32") -> np.ndarray | Fp8Weight:
        """Tensor `name` as a layer keeps it: `weights` "float32" → float32 numpy (FP8 dequantized with
        its `weight_scale_inv`); "checkpoint" → as stored (bf16 stays bf16), an FP8 weight as
        `Fp8Weight(codes, scale_inv)` of numpy arrays. Arrays are copies (the file may change later)."""
        a = self.array(name)
        if a.dtype == FP8:
            scale_name = self.scale_name(name)
            if scale_name not in self.index:
                raise KeyError(f"{scale_name}: missing (needed to dequantize the FP8 weight {name})")
            s = self.array(scale_name).astype(np.float32)
            if a.ndim < 2:
                raise CheckpointError(f"{name}: an FP8 weight must be a matrix, got shape {list(a.shape)}")
            want = [*a.shape[:-2], -(-a.shape[-2] // FP8_BLOCK), -(-a.shape[-1] // FP8_BLOCK)]
            if list(s.shape) != want:
                raise ValueError(
                    f"{scale_name}: expected shape {want} for the {list(a.shape)} weight {name}, got {list(s.shape)}"
                )
            if weights == "checkpoint":
                return Fp8Weight(np.array(a), s)  # type: ignore[arg-type]  # numpy leaves until placed
            return dequantize_fp8_blocks(a, s)
        if weights == "checkpoint" and a.dtype == np.dtype(ml_dtypes.bfloat16):
            return np.array(a)
        return a.astype(np.float32)

    def nbytes_of(self, names: Iterable[str]) -> int:
        """Bytes the checkpoint stores for `names` and their FP8 scales."""
        total = 0
        for n in names:
            total += self.nbytes(n)
            if self.file(n).dtype(n) == FP8:
                total += self.nbytes(self.scale_name(n))
        return total

    def layers_beyond(self, num_layers: int) -> list[int]:
        """Layer numbers `>= num_layers` that have tensors (MTP / next-n layers), sorted. `ValueError` /
        `TypeError` naming `num_layers` unless it is an integer >= 0."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
            raise TypeError(f"num_layers: expected an integer >= 0, got {type(num_layers).__name__}")
        if num_layers < 0:
            raise ValueError(f"num_layers: expected an integer >= 0, got {num_layers}")
        found = set()
        for name in self.index:
            if name.startswith("model.layers."):
                head = name.split(".")[2]
                if head.isdigit() and int(head) >= num_layers:
                    found.add(int(head))
        return sorted(found)


class LoadProgress:
    """A one-line progress bar on stderr (`\\r`-redrawn): shown when `enabled`, or by default when stderr
    is a terminal."""

    def __init__(self, total: int, enabled: bool | None = None, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.done, self.bytes = total, 0, 0

    def step(self, nbytes: int = 0) -> None:
        self.done += 1
        self.bytes += nbytes
        if not self.enabled:
            return
        width = 30
        fill = width * self.done // max(self.total, 1)
        end = "\n" if self.done >= self.total else ""
        self.stream.write(
            f"\rloading {self.done}/{self.total} layers [{'#' * fill}{'.' * (width - fill)}] "
            f"{self.bytes / 2**20:.1f} MiB{end}"
        )
        self.stream.flush()


def load_layer_tensors(directory: str | os.PathLike[str], layer: int, names: Iterable[str]) -> dict[str, np.ndarray]:
    """float32 tensors `model.layers.{layer}.self_attn.<name>` for each of `names` (see `load_tensors`)."""
    return load_tensors(directory, [f"model.layers.{layer}.self_attn.{n}" for n in names])


def load_tensors(directory: str | os.PathLike[str] | Checkpoint, names: Iterable[str]) -> dict[str, np.ndarray]:
    """float32 tensors by full name, FP8 weights dequantized with their `weight_scale_inv`. `KeyError`
    names a missing tensor."""
    ckpt = directory if isinstance(directory, Checkpoint) else Checkpoint(directory)
    out = {}
    for full in names:
        w = ckpt.weight(full, "float32")
        assert isinstance(w, np.ndarray)
        out[full] = w
    return out


def load_layer_params(
    directory: str | os.PathLike[str] | Checkpoint, cfg: DSAConfig, layer: int, *, weights: str = "float32"
):
    """The `DSAParams` of layer `layer` from a checkpoint directory (`*.safetensors` + optional index json;
    bf16, fp32 or FP8 with block scales). `weights` "float32" widens every linear weight; "checkpoint" keeps
    bf16 and FP8 weights as stored (`DSAParams.from_state_dict`). Missing or misshapen tensors raise an
    error naming them. A GLM-5 "shared" layer's indexer tensors are not read (transformers stores none):
    its indexer parameters are None."""
    from dsa_hybrid.layers.dsa_attention import HF_NAMES, DSAParams, layer_param_names

    ckpt = directory if isinstance(directory, Checkpoint) else Checkpoint(directory)
    prefix = f"model.layers.{layer}.self_attn."
    tensors = {prefix + HF_NAMES[n]: ckpt.weight(prefix + HF_NAMES[n], weights) for n in layer_param_names(cfg, layer)}
    return DSAParams.from_state_dict(tensors, cfg, layer, weights=weights)
