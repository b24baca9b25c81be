"""`dsa_hybrid.text`'s public names are importable from the package top level, lazily (importing
`dsa_hybrid` loads neither JAX nor `tokenizers` for them), and are the same objects."""

from __future__ import annotations

import subprocess
import sys

import dsa_hybrid
import dsa_hybrid.text as text

NAMES = ["Tokenizer", "StreamDecoder", "chat_prompt", "encode_dsv32", "render_chat_template"]


def test_text_names_are_top_level_and_identical() -> None:
    for name in NAMES:
        assert name in dsa_hybrid.__all__ and getattr(dsa_hybrid, name) is getattr(text, name), name


def test_top_level_text_names_load_no_jax_and_no_tokenizers() -> None:
    code = (
        "import sys, dsa_hybrid as dh; dh.Tokenizer; dh.encode_dsv32([{'role': 'user', 'content': 'x'}]); "
        "print('jax' in sys.modules, 'tokenizers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]
