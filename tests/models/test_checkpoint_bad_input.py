"""Hostile checkpoint files, one table row each: a `.safetensors` file whose header lies about the file, a
`model.safetensors.index.json` naming files outside the checkpoint, a `config.json` with negative, absurd or
mistyped sizes. Every row states the exception it must raise and a fragment of its message (which names
the field); none may crash, hang or allocate what the file claims."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid.models.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_index,
    read_safetensors,
    write_safetensors,
)


def st_bytes(header: Any, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file: 8-byte length, the header (a JSON value, or raw bytes), the data."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head) if header_len is None else header_len) + head + data


def t(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


D8 = b"\x00" * 8
D16 = b"\x00" * 16

# (case id, file bytes, expected exception, message fragment)
SAFETENSORS_CASES: list[tuple[str, bytes, type[Exception], str]] = [
    ("shorter than the length field", b"\x01\x02", CheckpointError, "too short"),
    ("header length past the file", st_bytes({"a": t()}, D8, header_len=10_000), CheckpointError, "exceeds the file"),
    ("header length 2^63", st_bytes({"a": t()}, D8, header_len=2**63), CheckpointError, "exceeds the file"),
    ("header not JSON", st_bytes(b"{not json", D8), CheckpointError, "not valid UTF-8 JSON"),
    ("header not UTF-8", st_bytes(b'{"\xff\xfe": 1}', D8), CheckpointError, "not valid UTF-8 JSON"),
    ("header a list", st_bytes([1, 2], D8), CheckpointError, "must be a JSON object, got list"),
    (
        "duplicate tensor name",
        st_bytes(b'{"a": %s, "a": %s}' % (json.dumps(t()).encode(), json.dumps(t()).encode()), D8),
        CheckpointError,
        "duplicate key 'a'",
    ),
    (
        "entry not an object",
        st_bytes({"a": [1, 2]}, D8),
        CheckpointError,
        "expected an object with dtype, shape, data_offsets",
    ),
    (
        "entry missing data_offsets",
        st_bytes({"a": {"dtype": "F32", "shape": [2]}}, D8),
        CheckpointError,
        "expected an object with dtype",
    ),
    ("entry with an extra key", st_bytes({"a": t() | {"x": 1}}, D8), CheckpointError, "expected an object with dtype"),
    ("unknown dtype", st_bytes({"a": t(dtype="F7")}, D8), CheckpointError, "unsupported dtype 'F7'"),
    ("dtype not a string", st_bytes({"a": t(dtype=123)}, D8), CheckpointError, "unsupported dtype 123"),
    (
        "negative dimension",
        st_bytes({"a": t(shape=(-2,))}, D8),
        CheckpointError,
        "shape must be a list of non-negative integers",
    ),
    (
        "float dimension",
        st_bytes({"a": t(shape=[2.0])}, D8),
        CheckpointError,
        "shape must be a list of non-negative integers",
    ),
    (
        "bool dimension",
        st_bytes({"a": t(shape=[True, 2])}, D8),
        CheckpointError,
        "shape must be a list of non-negative integers",
    ),
    ("shape not a list", st_bytes({"a": t(shape="2")}, D8), CheckpointError, "shape must be a list"),
    (
        "shape product past int64",
        st_bytes({"a": t(shape=(2**40, 2**40))}, D8),
        CheckpointError,
        "needs 4835703278458516698824704",
    ),
    ("too many dimensions", st_bytes({"a": t(shape=[1] * 17)}, D8), CheckpointError, "17 dimensions"),
    (
        "offsets not integers",
        st_bytes({"a": t(offsets=["0", "8"])}, D8),
        CheckpointError,
        "data_offsets must be [start, end] integers",
    ),
    ("three offsets", st_bytes({"a": t(offsets=(0, 4, 8))}, D8), CheckpointError, "data_offsets must be [start, end]"),
    ("start after end", st_bytes({"a": t(offsets=(8, 0))}, D8), CheckpointError, "outside the data section"),
    ("negative start", st_bytes({"a": t(offsets=(-8, 0))}, D8), CheckpointError, "outside the data section"),
    (
        "end past the data",
        st_bytes({"a": t(offsets=(0, 8))}, b"\x00" * 4),
        CheckpointError,
        "outside the data section [0, 4]",
    ),
    (
        "size not shape x itemsize",
        st_bytes({"a": t(shape=(3,))}, D8),
        CheckpointError,
        "span 8 bytes, but shape [3] of F32 needs 12",
    ),
    (
        "overlapping tensors",
        st_bytes({"a": t(offsets=(0, 8)), "b": t(offsets=(4, 12))}, D16),
        CheckpointError,
        "overlap",
    ),
    (
        "overlap hidden behind an empty tensor",
        st_bytes(
            {"a": t(shape=(4,), offsets=(0, 16)), "e": t(shape=(0,), offsets=(4, 4)), "b": t(offsets=(8, 16))}, D16
        ),
        CheckpointError,
        "'a' and 'b' overlap",
    ),
    (
        "metadata not strings",
        st_bytes({"__metadata__": {"format": 1}, "a": t()}, D8),
        CheckpointError,
        "__metadata__ must be an object of strings",
    ),
]


@pytest.mark.parametrize(
    ("data", "exc", "fragment"), [c[1:] for c in SAFETENSORS_CASES], ids=[c[0] for c in SAFETENSORS_CASES]
)
def test_hostile_safetensors_file_is_refused(tmp_path: Path, data: bytes, exc: type[Exception], fragment: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(exc, match=re_escape(fragment)) as info:
        read_safetensors(path)
    assert str(path) in str(info.value)  # names the file
    with pytest.raises(exc, match=re_escape(fragment)):  # the directory scan validates the same way
        checkpoint_index(tmp_path)


def test_valid_files_still_read_and_zero_sized_tensors_are_fine(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_safetensors(tmp_path / "m.safetensors", {"a": a, "empty": np.zeros((0, 4), np.float32)})
    got = read_safetensors(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(got["a"], a)
    assert got["empty"].shape == (0, 4)
    with pytest.raises(KeyError, match="nope: not in"):
        read_safetensors(tmp_path / "m.safetensors", ["nope"])


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def index_dir(tmp_path: Path, weight_map: Any, raw: bytes | None = None) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    write_safetensors(d / "model-1.safetensors", {"w": np.ones(2, np.float32)})
    (d / "model.safetensors.index.json").write_bytes(
        raw if raw is not None else json.dumps({"weight_map": weight_map}).encode()
    )
    return d


def outside_symlink(tmp_path: Path) -> dict[str, str]:
    write_safetensors(tmp_path / "secret.safetensors", {"w": np.ones(2, np.float32)})
    return {"w": "link.safetensors"}


INDEX_CASES: list[tuple[str, Any, bytes | None, type[Exception], str]] = [
    ("index not JSON", None, b"{", CheckpointError, "not valid UTF-8 JSON"),
    ("no weight_map", None, b'{"metadata": {}}', CheckpointError, "expected an object with a 'weight_map' object"),
    ("weight_map a list", None, b'{"weight_map": []}', CheckpointError, "'weight_map' object"),
    (
        "duplicate tensor in the index",
        None,
        b'{"weight_map": {"w": "model-1.safetensors", "w": "model-1.safetensors"}}',
        CheckpointError,
        "duplicate key 'w'",
    ),
    ("parent directory", {"w": "../model-1.safetensors"}, None, CheckpointError, "without '..'"),
    ("nested parent directory", {"w": "sub/../../x.safetensors"}, None, CheckpointError, "without '..'"),
    ("absolute path", {"w": "/etc/passwd"}, None, CheckpointError, "must be relative"),
    ("windows drive", {"w": "C:\\x.safetensors"}, None, CheckpointError, "must be relative"),
    ("backslash parent", {"w": "..\\x.safetensors"}, None, CheckpointError, "without '..'"),
    ("file name not a string", {"w": 5}, None, CheckpointError, "file name must be a non-empty string, got 5"),
    ("empty file name", {"w": ""}, None, CheckpointError, "non-empty string"),
    ("NUL in the file name", {"w": "a\x00.safetensors"}, None, CheckpointError, "non-empty string"),
]


@pytest.mark.parametrize(
    ("weight_map", "raw", "exc", "fragment"), [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES]
)
def test_hostile_index_is_refused(
    tmp_path: Path, weight_map: Any, raw: bytes | None, exc: type[Exception], fragment: str
) -> None:
    d = index_dir(tmp_path, weight_map, raw)
    with pytest.raises(exc, match=re_escape(fragment)) as info:
        checkpoint_index(d)
    assert "model.safetensors.index.json" in str(info.value)


def test_symlinked_shard_escaping_the_directory_is_refused(tmp_path: Path) -> None:
    d = index_dir(tmp_path, outside_symlink(tmp_path))
    (d / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        checkpoint_index(d)
    (d / "model.safetensors.index.json").unlink()  # the directory scan refuses it too
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        checkpoint_index(d)


def test_index_naming_missing_files_or_tensors(tmp_path: Path) -> None:
    d = index_dir(tmp_path, {"w": "model-1.safetensors", "v": "model-1.safetensors", "u": "model-2.safetensors"})
    ckpt = Checkpoint(d)
    np.testing.assert_array_equal(ckpt.array("w"), np.ones(2, np.float32))
    with pytest.raises(CheckpointError, match="the index names tensor 'v', the file lacks it"):
        ckpt.array("v")
    with pytest.raises(FileNotFoundError, match="model-2.safetensors: named by the checkpoint index"):
        ckpt.array("u")
    with pytest.raises(KeyError, match="x: missing from the checkpoint"):
        ckpt.array("x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="must be a directory"):
        Checkpoint(d / "model-1.safetensors")


def base_config() -> dict[str, Any]:
    return DSAConfig.tiny("deepseek_v32").replace(first_k_dense_replace=1).to_hf_config()


CONFIG_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("negative hidden_size", {"hidden_size": -64}, "hidden_size must be an integer in [1, 1048576], got -64"),
    ("hidden_size a string", {"hidden_size": "64"}, "hidden_size must be an integer in [1, 1048576], got '64'"),
    ("hidden_size a float", {"hidden_size": 64.5}, "hidden_size must be an integer"),
    ("absurd hidden_size", {"hidden_size": 10**12}, "hidden_size must be an integer in [1, 1048576]"),
    (
        "num_hidden_layers a bool",
        {"num_hidden_layers": True},
        "num_hidden_layers must be an integer in [1, 4096], got True",
    ),
    ("zero layers", {"num_hidden_layers": 0}, "num_hidden_layers must be an integer in [1, 4096]"),
    ("absurd vocab", {"vocab_size": 2**40}, "vocab_size must be an integer in [0, 8388608]"),
    ("negative intermediate_size", {"intermediate_size": -1}, "intermediate_size must be an integer"),
    ("absurd experts", {"n_routed_experts": 10**9}, "n_routed_experts must be an integer in [0, 65536]"),
    ("absurd index_topk", {"index_topk": 2**40}, "index_topk must be an integer"),
    ("negative nextn layers", {"num_nextn_predict_layers": -1}, "num_nextn_predict_layers must be an integer"),
    ("negative rms_norm_eps", {"rms_norm_eps": -1e-6}, "rms_norm_eps must be a finite positive number"),
    ("NaN rope_theta", {"rope_theta": math.nan}, "rope_theta must be a finite positive number"),
    ("rope_theta a string", {"rope_theta": "1e4"}, "rope_theta must be a finite positive number, got '1e4'"),
    ("norm_topk_prob a string", {"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false"),
    ("indexer_types a string", {"indexer_types": "full"}, "indexer_types must be a list of strings"),
    ("mlp_layer_types of ints", {"mlp_layer_types": [0, 1]}, "mlp_layer_types must be a list of strings"),
    (
        "yarn factor not a number",
        {"rope_scaling": {"type": "yarn", "factor": "x", "original_max_position_embeddings": 4}},
        "yarn rope scaling has a non-numeric field",
    ),
    ("rope_scaling a list", {"rope_scaling": [1]}, "rope_scaling must be an object"),
    (
        "fp8 blocks of 64",
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
        "weight_block_size [64, 64] is not supported",
    ),
    ("eos_token_id a string", {"eos_token_id": "2"}, "eos_token_id must be an int or a list of ints"),
]


@pytest.mark.parametrize(("change", "fragment"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_hostile_config_is_refused(tmp_path: Path, change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=re_escape(fragment)):
        DSAConfig.from_hf_config(base_config() | change)
    (tmp_path / "config.json").write_text(json.dumps(base_config() | change))
    with pytest.raises(ValueError, match=re_escape(fragment)):
        DSAConfig.from_hf_config(tmp_path)


def test_config_json_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        DSAConfig.from_hf_config(tmp_path)
