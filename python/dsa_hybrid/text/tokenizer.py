"""`Tokenizer`: a checkpoint's `tokenizer.json` (Hugging Face `tokenizers`), with the special tokens and
chat template of its `tokenizer_config.json`; `StreamDecoder` turns generated ids into text as they come.

`tokenizers` is an optional dependency (`pip install dsa_hybrid[hf]`), imported on first use.

Errors (docs/errors.md): a missing file is `FileNotFoundError`, a file that is not a tokenizer (or a
config that is not JSON, a field of the wrong type) `ValueError` naming the file and field; ids that are
not integers `TypeError`, ids outside the vocabulary `ValueError`, checked before anything is decoded
or a `StreamDecoder` changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["StreamDecoder", "Tokenizer"]

# The largest tokenizer.json read (the biggest released ones are ~20 MB): a larger file is refused
# before the Rust tokenizer parses it.
MAX_TOKENIZER_BYTES = 1 << 30


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "dsa_hybrid.text needs the 'tokenizers' package: pip install 'dsa_hybrid[hf]' (or tokenizers>=0.19)"
        ) from None
    return tokenizers


def _check_ids(name: str, ids: Any, vocab_size: int) -> list[int]:
    """`ids` as a list of Python ints in `[0, vocab_size)`: TypeError for a string, a non-iterable, a
    bool or non-integer entry; ValueError for an id outside the vocabulary."""
    import numbers

    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{name}: expected a sequence of token ids, got {type(ids).__name__}")
    out = []
    for j, i in enumerate(ids):
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or type(i).__name__ == "bool_":
            raise TypeError(f"{name}[{j}]: expected an integer token id, got {type(i).__name__} {i!r}")
        v = int(i)
        if not 0 <= v < vocab_size:
            raise ValueError(f"{name}[{j}]: token id {v} outside the vocabulary [0, {vocab_size})")
        out.append(v)
    return out


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken-like object."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class Tokenizer:
    """A Hugging Face fast tokenizer and its special tokens.

    Attributes:
        bos_token, eos_token: the special tokens' text (None when the config names none).
        chat_template: the Jinja chat template of tokenizer_config.json (None when absent).
        add_bos_token: whether `encode(..., add_special_tokens=True)` prepends `bos_token`.
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token

    @staticmethod
    def from_file(path: str | os.PathLike[str], config: dict[str, Any] | None = None) -> Tokenizer:
        """From a `tokenizer.json` file, with the settings of a parsed `tokenizer_config.json`.

        `TypeError` for a `path` that is no path or a `config` that is no dict; `FileNotFoundError` when
        there is no such file; `ValueError` for a file over 1 GiB, one the tokenizers library cannot
        read, or a config field of the wrong type (`add_bos_token` not a bool, `chat_template` neither
        a string nor a list of named templates)."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a path, got {type(path).__name__}")
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config: expected a dict (parsed tokenizer_config.json), got {type(config).__name__}")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no tokenizer.json")
        if p.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ValueError(f"{p}: {p.stat().st_size} bytes, over the limit of {MAX_TOKENIZER_BYTES} (refused)")
        config = config or {}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{p}: chat_template: expected a string, got {type(template).__name__}")
        add_bos = config.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise ValueError(f"{p}: add_bos_token: expected true or false, got {add_bos!r}")
        tk = _tokenizers()
        try:
            backend = tk.Tokenizer.from_file(str(p))
        except Exception as e:  # noqa: BLE001 - the Rust tokenizer raises bare Exceptions
            raise ValueError(f"{p}: not a valid tokenizer.json ({' '.join(str(e).split())[:300]})") from None
        return Tokenizer(
            backend,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            chat_template=template,
            add_bos_token=add_bos,
        )

    @staticmethod
    def from_checkpoint(directory: str | os.PathLike[str]) -> Tokenizer:
        """From a checkpoint directory's `tokenizer.json` and (if present) `tokenizer_config.json` (its
        bos / eos tokens, `add_bos_token`, `chat_template`; a separate `chat_template.jinja` file too).
        `FileNotFoundError` for a directory that does not exist; the rest as `from_file`, and a
        `tokenizer_config.json` or `chat_template.jinja` that is not UTF-8 (JSON) is a `ValueError`."""
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory: expected a path, got {type(directory).__name__}")
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such checkpoint directory")
        config: dict[str, Any] = {}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{cfg_path}: expected a JSON object")
        jinja = d / "chat_template.jinja"
        if "chat_template" not in config and jinja.is_file():
            try:
                config["chat_template"] = jinja.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{jinja}: not UTF-8 ({e})") from None
        return Tokenizer.from_file(d / "tokenizer.json", config)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        """The id of `token` (None when the vocabulary has no such token; `TypeError` for a non-string)."""
        if not isinstance(token, str):
            raise TypeError(f"token: expected a str, got {type(token).__name__}")
        tid = self.backend.token_to_id(token)
        return None if tid is None else int(tid)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (special tokens in the text are recognised as such). With
        `add_special_tokens`, `bos_token` is prepended when the config asks for it (`add_bos_token`)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [int(i) for i in self.backend.encode(text, add_special_tokens=False).ids]
        if add_special_tokens and self.add_bos_token and self.bos_token is not None:
            bos = self.token_to_id(self.bos_token)
            if bos is not None and ids[:1] != [bos]:
                ids = [bos, *ids]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """The text of `ids` (ints in `[0, vocab_size)`: `TypeError` / `ValueError` naming the entry)."""
        return self._decode_checked(_check_ids("ids", ids, self.vocab_size), bool(skip_special_tokens))

    def _decode_checked(self, ids: list[int], skip_special_tokens: bool) -> str:
        """`decode` of ids already checked (the stream decoder checks each id once, when it is pushed)."""
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))


class StreamDecoder:
    """Text of a growing list of token ids, handed out piece by piece: `push(ids)` returns the text the
    new ids add. Pieces that end in an incomplete UTF-8 sequence (decoded as U+FFFD) are held back until
    the next ids complete them, so the pieces joined are `tokenizer.decode(all ids)`."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.skip = bool(skip_special_tokens)
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, ids: Sequence[int]) -> str:
        """The text `ids` add (`""` while a character is incomplete). Bad ids raise as in
        `Tokenizer.decode`, before anything is kept."""
        self.ids.extend(_check_ids("ids", ids, self.tokenizer.vocab_size))
        text = self.tokenizer._decode_checked(self.ids, self.skip)
        if text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.emitted):  # a decoder that rewrote earlier text: hand out the rest
            new = text[len(self.emitted) :] if len(text) > len(self.emitted) else ""
        else:
            new = text[len(self.emitted) :]
        self.emitted = text
        return new

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end), as decoded."""
        text = self.tokenizer._decode_checked(self.ids, self.skip)
        new = text[len(self.emitted) :]
        self.emitted = text
        return new
