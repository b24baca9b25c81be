"""`Tokenizer`: a checkpoint's `tokenizer.json` (Hugging Face `tokenizers`), with the special tokens and
chat template of its `tokenizer_config.json`; `StreamDecoder` turns generated ids into text as they come.

`tokenizers` is an optional dependency (`pip install dsa_hybrid[hf]`), imported on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "dsa_hybrid.text needs the 'tokenizers' package: pip install 'dsa_hybrid[hf]' (or tokenizers>=0.19)"
        ) from None
    return tokenizers


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
        """From a `tokenizer.json` file, with the settings of a parsed `tokenizer_config.json`."""
        tk = _tokenizers()
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no tokenizer.json")
        try:
            backend = tk.Tokenizer.from_file(str(p))
        except Exception as e:  # noqa: BLE001 - the Rust tokenizer raises bare Exceptions
            raise ValueError(f"{p}: not a valid tokenizer.json ({e})") from None
        config = config or {}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return Tokenizer(
            backend,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            chat_template=template if isinstance(template, str) else None,
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    @staticmethod
    def from_checkpoint(directory: str | os.PathLike[str]) -> Tokenizer:
        """From a checkpoint directory's `tokenizer.json` and (if present) `tokenizer_config.json` (its
        bos / eos tokens, `add_bos_token`, `chat_template`; a separate `chat_template.jinja` file too)."""
        d = Path(directory)
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
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        return Tokenizer.from_file(d / "tokenizer.json", config)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
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
        return str(self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))


class StreamDecoder:
    """Text of a growing list of token ids, handed out piece by piece: `push(ids)` returns the text the
    new ids add. Pieces that end in an incomplete UTF-8 sequence (decoded as U+FFFD) are held back until
    the next ids complete them, so the pieces joined are `tokenizer.decode(all ids)`."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
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
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        new = text[len(self.emitted) :]
        self.emitted = text
        return new
