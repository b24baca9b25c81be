"""Text in, text out: a byte-level BPE trained here with `tokenizers`, a tiny random DeepSeek-V3.2
checkpoint directory, and `dsa-hybrid generate` streaming through the Engine: the printed text is the
tokenizer's decoding of exactly the tokens greedy generation gives for the encoded prompt, EOS ends the
request (and is not printed), `--chat` encodes the prompt in DeepSeek-V3.2's chat format, and a missing
or broken checkpoint is one line on stderr with exit status 2."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from dsa_hybrid import DSAConfig  # noqa: E402
from dsa_hybrid.cli import main  # noqa: E402
from dsa_hybrid.cli.generate import run_generate  # noqa: E402
from dsa_hybrid.models.causal_lm import ModelParams, generate_greedy  # noqa: E402
from dsa_hybrid.models.checkpoint import write_safetensors  # noqa: E402
from dsa_hybrid.text import StreamDecoder, Tokenizer, encode_dsv32  # noqa: E402
from dsa_hybrid.text.chat import DSV32_ASSISTANT, DSV32_BOS, DSV32_EOS, DSV32_USER  # noqa: E402

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "sparse attention selects the top k tokens of every query",
    "hello world, hello sparse world; the indexer scores keys",
] * 20


def train_tokenizer(path: Path) -> None:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[DSV32_BOS, DSV32_EOS, DSV32_USER, DSV32_ASSISTANT, "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS, trainer)
    tk.save(str(path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DSAConfig, ModelParams, Tokenizer]:
    d = tmp_path_factory.mktemp("ckpt")
    train_tokenizer(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": DSV32_BOS}, "eos_token": DSV32_EOS, "add_bos_token": True})
    )
    tok = Tokenizer.from_checkpoint(d)
    eos = tok.eos_token_id
    assert eos == 1 and tok.vocab_size <= 320
    cfg = DSAConfig.tiny("deepseek_v32").replace(vocab_size=320, eos_token_id=eos, num_hidden_layers=1)
    params = ModelParams.random(cfg, seed=4)
    write_safetensors(d / "model.safetensors", params.state_dict())
    (d / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    return d, cfg, params, tok


def test_generate_streams_the_greedy_tokens_as_text(checkpoint) -> None:
    d, cfg, params, tok = checkpoint
    prompt = "hello sparse world"
    ids = tok.encode(prompt, add_special_tokens=True)
    assert ids[0] == tok.token_to_id(DSV32_BOS) and tok.decode(ids) == prompt
    want = generate_greedy(params, cfg, ids, 8, backend="xla", latent_kind="f32")
    assert cfg.eos_token_id[0] not in want  # (the fixture's seed gives no EOS here)
    out, err = io.StringIO(), io.StringIO()
    got = run_generate(str(d), prompt, max_tokens=8, out=out, err=err)
    assert got == want
    assert out.getvalue() == tok.decode(want) + "\n"
    assert "finish reason length" in err.getvalue()


def test_eos_ends_the_request_and_is_not_printed(checkpoint, tmp_path: Path) -> None:
    d, cfg, params, tok = checkpoint
    prompt = "the quick brown fox"
    ids = tok.encode(prompt, add_special_tokens=True)
    free = generate_greedy(params, cfg, ids, 6, backend="xla", latent_kind="f32")
    # Make EOS the model's choice wherever the third token would win (its LM-head row, tripled).
    eos = cfg.eos_token_id[0]
    head = np.asarray(params.lm_head).copy()
    head[eos] = 3 * head[free[2]]
    tensors = params.state_dict() | {"lm_head.weight": head}
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    write_safetensors(tmp_path / "model.safetensors", tensors)
    steered = ModelParams.from_checkpoint(tmp_path, cfg)
    want = generate_greedy(steered, cfg, ids, 6, backend="xla", latent_kind="f32")
    assert eos in want
    want = want[: want.index(eos) + 1]
    out, err = io.StringIO(), io.StringIO()
    got = run_generate(str(tmp_path), prompt, max_tokens=6, out=out, err=err)
    assert got == want and got[-1] == eos
    assert out.getvalue() == tok.decode(want[:-1]) + "\n" and DSV32_EOS not in out.getvalue()
    assert "finish reason eos" in err.getvalue()


def test_chat_prompt_uses_the_dsv32_encoding(checkpoint) -> None:
    d, cfg, params, tok = checkpoint
    text = encode_dsv32([{"role": "user", "content": "hello"}])
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id(DSV32_BOS) and ids[-1] == tok.token_to_id("</think>")
    want = generate_greedy(params, cfg, ids, 3, backend="xla", latent_kind="f32")
    got = run_generate(str(d), "hello", chat=True, max_tokens=3, out=io.StringIO(), err=io.StringIO())
    assert got == want


def test_stream_decoder_joins_to_the_full_decoding(checkpoint) -> None:
    _, _, _, tok = checkpoint
    ids = tok.encode("héllo wörld — ünïcode")  # multi-byte characters split across byte-level tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push([i]) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # refused by the argument parser, one line
        main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsa-hybrid generate: error:") and "nowhere" in err
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v32", "hidden_size": -1}')
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err
    (tmp_path / "config.json").write_text(
        json.dumps(DSAConfig.tiny("deepseek_v32").replace(vocab_size=320).to_hf_config())
    )
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json" in err
    train_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err and "Traceback" not in err
