"""Text in and text out: a checkpoint's `tokenizer.json` (through the optional `tokenizers` package, extra
`dsa_hybrid[hf]`) and the chat encodings of DeepSeek-V3.2 (its own format, `encode_dsv32`, tools
included) and GLM-5
(the checkpoint's Jinja `chat_template`, `render_chat_template`). No JAX here."""

from __future__ import annotations

from dsa_hybrid.text.chat import chat_prompt, dsv32_tools_prompt, encode_dsv32, render_chat_template
from dsa_hybrid.text.tokenizer import StreamDecoder, Tokenizer

__all__ = ["StreamDecoder", "Tokenizer", "chat_prompt", "dsv32_tools_prompt", "encode_dsv32", "render_chat_template"]
