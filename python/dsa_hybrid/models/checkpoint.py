"""Hugging Face checkpoints: read (and write) `*.safetensors`, and load one layer's DSA weights (dsa.md §4b).

The reader is self-contained (numpy + ml_dtypes, no torch): it memory-maps each file and reads only the
tensors asked for. It understands F32, F16, BF16, F8_E4M3 and the integer types. FP8 checkpoints store
each linear weight as e4m3fn with a companion `weight_scale_inv` of 128 × 128 block scales,
`W[a, b] = W8[a, b] · S[a // 128, b // 128]`; `load_layer_params` dequantizes them to float32.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

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
FP8_BLOCK = 128


def read_safetensors(path: str | os.PathLike[str], names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of one `.safetensors` file (all, or those in `names`), as numpy arrays (bf16 and fp8 as
    ml_dtypes types). `KeyError` names a requested tensor the file lacks."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(bytes(data[8 : 8 + header_len]))
    header.pop("__metadata__", None)
    wanted = list(header) if names is None else list(names)
    out = {}
    for name in wanted:
        if name not in header:
            raise KeyError(f"{name}: not in {path}")
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{name}: unsupported dtype {info['dtype']} in {path}")
        start, end = info["data_offsets"]
        raw = data[8 + header_len + start : 8 + header_len + end]
        out[name] = np.frombuffer(raw.tobytes(), dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


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


def checkpoint_index(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Tensor name → file, from `model.safetensors.index.json` (its `weight_map`), or by scanning every
    `*.safetensors` file of `directory` when there is no index."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: d / file for name, file in weight_map.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors files and no model.safetensors.index.json")
    out = {}
    for f in files:
        data = np.memmap(f, dtype=np.uint8, mode="r")
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        out.update({name: f for name in json.loads(bytes(data[8 : 8 + n])) if name != "__metadata__"})
    return out


def dequantize_fp8_blocks(w8: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """`W[a, b] = W8[a, b] · S[a // 128, b // 128]` in float32 (DeepSeek's FP8 weight format)."""
    rows, cols = w8.shape
    want = [-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)]
    if list(scale_inv.shape) != want:
        raise ValueError(
            f"weight_scale_inv: expected shape {want} for a {[rows, cols]} weight, got {list(scale_inv.shape)}"
        )
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), FP8_BLOCK, axis=0), FP8_BLOCK, axis=1)[:rows, :cols]
    return w8.astype(np.float32) * s


def quantize_fp8_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse, as DeepSeek's checkpoints are made: per 128 × 128 block, `scale = amax / 448`,
    `W8 = e4m3fn(W / scale)`. Returns `(W8 float8_e4m3fn, weight_scale_inv float32)`."""
    rows, cols = w.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = np.zeros((br * FP8_BLOCK, bc * FP8_BLOCK), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(br, FP8_BLOCK, bc, FP8_BLOCK)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0
    w8 = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols].astype(ml_dtypes.float8_e4m3fn)
    return w8, scale.astype(np.float32)


def load_layer_tensors(directory: str | os.PathLike[str], layer: int, names: Iterable[str]) -> dict[str, np.ndarray]:
    """float32 tensors `model.layers.{layer}.self_attn.<name>` for each of `names` (see `load_tensors`)."""
    return load_tensors(directory, [f"model.layers.{layer}.self_attn.{n}" for n in names])


def load_tensors(directory: str | os.PathLike[str], names: Iterable[str]) -> dict[str, np.ndarray]:
    """float32 tensors by full name, FP8 weights dequantized with their `weight_scale_inv`. `KeyError`
    names a missing tensor."""
    index = checkpoint_index(directory)
    out = {}
    for full in names:
        if full not in index:
            raise KeyError(f"{full}: missing from the checkpoint in {directory}")
        t = read_safetensors(index[full], [full])[full]
        if t.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
            scale_name = full.removesuffix("weight") + "weight_scale_inv"
            if scale_name not in index:
                raise KeyError(f"{scale_name}: missing (needed to dequantize the FP8 weight {full})")
            t = dequantize_fp8_blocks(t, read_safetensors(index[scale_name], [scale_name])[scale_name])
        out[full] = t.astype(np.float32)
    return out


def load_layer_params(directory: str | os.PathLike[str], cfg: DSAConfig, layer: int):
    """The `DSAParams` of layer `layer` from a checkpoint directory (`*.safetensors` + optional index json;
    bf16, fp32 or FP8 with block scales). Missing or misshapen tensors raise an error naming them. A GLM-5
    "shared" layer's indexer tensors are not read (transformers stores none): its indexer parameters are None."""
    from dsa_hybrid.layers.dsa_attention import HF_NAMES, DSAParams, layer_param_names

    names = [HF_NAMES[n] for n in layer_param_names(cfg, layer)]
    return DSAParams.from_state_dict(load_layer_tensors(directory, layer, names), cfg, layer)
