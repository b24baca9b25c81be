"""`dsa-hybrid generate`: text from a checkpoint directory, streamed through the Engine.

Loads `config.json`, the weights (`ModelParams.from_checkpoint`, lazily, checkpoint format off CPU) and
`tokenizer.json`; encodes the prompt (with `--chat`, as one user turn in the model's chat format:
DeepSeek-V3.2's encoding or the checkpoint's `chat_template`); serves it as one request and prints the
text of each step's new tokens as they come. The model's EOS ids (config.json `eos_token_id`, and the
tokenizer's `eos_token`) end the request. Errors in the inputs (a missing or malformed checkpoint, no
tokenizer) are one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO

from dsa_hybrid.models.checkpoint import CheckpointError
from dsa_hybrid.models.config import DSAConfig


class GenerateError(Exception):
    """An input problem reported as one line (the CLI's exit status 2)."""


def run_generate(
    checkpoint: str,
    prompt: str,
    *,
    chat: bool = False,
    thinking: bool = False,
    system: str | None = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    placement: str | None = None,
    progress: bool | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> list[int]:
    """Generate from `checkpoint` and stream the text to `out`; returns the generated token ids (EOS
    included when it ended the request). Input problems raise `GenerateError` with a one-line message."""
    from dsa_hybrid.models.causal_lm import ModelParams
    from dsa_hybrid.serving.engine import Engine
    from dsa_hybrid.serving.sampling import SamplingParams
    from dsa_hybrid.text import StreamDecoder, Tokenizer, chat_prompt

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    d = Path(checkpoint)
    if not d.is_dir():
        raise GenerateError(f"{d}: not a checkpoint directory")
    try:
        cfg = DSAConfig.from_hf_config(d)
    except FileNotFoundError:
        raise GenerateError(f"{d}: no config.json") from None
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenerateError(f"{d / 'config.json'}: {e}") from None
    try:
        tok = Tokenizer.from_checkpoint(d)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise GenerateError(str(e)) from None
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        try:
            text = chat_prompt(tok, cfg.model_type, messages, thinking=thinking)
        except (ValueError, ImportError) as e:
            raise GenerateError(f"--chat: {e}") from None
        ids = tok.encode(text)
    else:
        ids = tok.encode(prompt, add_special_tokens=True)
    if not ids:
        raise GenerateError("--prompt: encodes to no tokens")
    if max(ids) >= cfg.vocab_size:
        raise GenerateError(f"tokenizer.json: token id {max(ids)} is outside the model's vocabulary ({cfg.vocab_size})")
    try:
        params = ModelParams.from_checkpoint(d, cfg, progress=progress)
    except (FileNotFoundError, KeyError, CheckpointError, ValueError) as e:
        raise GenerateError(f"{d}: {e.args[0] if e.args else e}") from None
    eos = tok.eos_token_id
    stop = (eos,) if eos is not None and eos not in cfg.eos_token_id and eos < cfg.vocab_size else ()
    try:
        sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, stop_token_ids=stop)
    except (TypeError, ValueError) as e:
        raise GenerateError(str(e)) from None
    page_size = 16
    total = len(ids) + max_tokens
    engine = Engine(
        params, cfg, num_pages=-(-total // page_size) + 1, page_size=page_size, max_model_len=total,
        max_tokens_per_step=min(512, max(16, len(ids))), placement=placement,
    )  # fmt: skip
    rid = engine.add_request(ids, max_tokens, sampling)
    decoder = StreamDecoder(tok)
    generated: list[int] = []
    while engine.has_unfinished():
        new = engine.step().get(rid, [])
        generated.extend(new)
        piece = decoder.push(new)
        if piece:
            out.write(piece)
            out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    reason = engine.finished[rid].finish_reason if rid in engine.finished else "?"
    err.write(f"[{len(generated)} tokens, finish reason {reason}]\n")
    return generated
