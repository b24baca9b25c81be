"""`dsa_hybrid.text`'s bad-input catalogue (issue 16): `Tokenizer` (`from_file`, `from_checkpoint` on
hostile or missing files, `encode`, `decode`, `token_to_id`), `StreamDecoder` (`push`, `flush`: a refused
push keeps the decoder's state), `encode_dsv32`, `dsv32_tools_prompt`, `render_chat_template`, `chat_prompt`, and a hostile
chat template: the Jinja environment is sandboxed (no attribute escapes, no mutation of the caller's
messages, no file access) and whatever a template does ends as an ordinary `Exception`.

Each case states its exception and a fragment of the message (the argument, field or file)."""

# ruff: noqa: E501 - one catalogue case per line

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from dsa_hybrid.text import (  # noqa: E402
    StreamDecoder,
    Tokenizer,
    chat_prompt,
    dsv32_tools_prompt,
    encode_dsv32,
    render_chat_template,
)
from dsa_hybrid.text import tokenizer as tokenizer_mod  # noqa: E402

WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "sparse", "attention"]


def write_tokenizer(path: Path) -> None:
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<s>", "</s>"])
    tk.save(str(path))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True})
    )
    return d


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> Tokenizer:
    return Tokenizer.from_checkpoint(ckpt)


MSGS = [{"role": "user", "content": "hi"}]


# (id, call(tok, dir), exception, fragment). `dir` is a fresh copy of the checkpoint directory for the
# file cases; `tok` the tokenizer read from the good one.
Case = tuple[str, Callable[[Tokenizer, Path], Any], type[BaseException], str]


def put(d: Path, name: str, data: bytes | str) -> Path:
    (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return d


# fmt: off
CASES: list[Case] = [
    # Tokenizer.from_file / from_checkpoint
    ("from_file/path-none", lambda t, d: Tokenizer.from_file(None), TypeError, "path: expected a path"),
    ("from_file/missing", lambda t, d: Tokenizer.from_file(d / "nope.json"), FileNotFoundError, "no tokenizer.json"),
    ("from_file/a-directory", lambda t, d: Tokenizer.from_file(d), FileNotFoundError, "no tokenizer.json"),
    ("from_file/not-json", lambda t, d: Tokenizer.from_file(put(d, "x.json", "{model: ") / "x.json"), ValueError, "not a valid tokenizer.json"),
    ("from_file/not-utf8", lambda t, d: Tokenizer.from_file(put(d, "x.json", b"\xff\xfe{}") / "x.json"), ValueError, "not a valid tokenizer.json"),
    ("from_file/wrong-model", lambda t, d: Tokenizer.from_file(put(d, "x.json", '{"model": {"type": "Evil"}}') / "x.json"), ValueError, "not a valid tokenizer.json"),
    ("from_file/a-list", lambda t, d: Tokenizer.from_file(put(d, "x.json", "[1, 2, 3]") / "x.json"), ValueError, "not a valid tokenizer.json"),
    ("from_file/config-list", lambda t, d: Tokenizer.from_file(d / "tokenizer.json", ["bos"]), TypeError, "config: expected a dict"),
    ("from_file/add-bos-str", lambda t, d: Tokenizer.from_file(d / "tokenizer.json", {"add_bos_token": "false"}), ValueError, "add_bos_token: expected true or false, got 'false'"),
    ("from_file/template-int", lambda t, d: Tokenizer.from_file(d / "tokenizer.json", {"chat_template": 5}), ValueError, "chat_template: expected a string"),
    ("from_file/template-list-bad", lambda t, d: Tokenizer.from_file(d / "tokenizer.json", {"chat_template": [{"name": "default", "template": 7}]}), ValueError, "chat_template:"),
    ("from_checkpoint/missing", lambda t, d: Tokenizer.from_checkpoint(d / "nope"), FileNotFoundError, "no such checkpoint directory"),
    ("from_checkpoint/int", lambda t, d: Tokenizer.from_checkpoint(3), TypeError, "directory: expected a path"),
    ("from_checkpoint/no-tokenizer", lambda t, d: ((d / "tokenizer.json").unlink(), Tokenizer.from_checkpoint(d)), FileNotFoundError, "no tokenizer.json"),
    ("from_checkpoint/config-not-json", lambda t, d: Tokenizer.from_checkpoint(put(d, "tokenizer_config.json", "{")), ValueError, "tokenizer_config.json: not valid JSON"),
    ("from_checkpoint/config-not-utf8", lambda t, d: Tokenizer.from_checkpoint(put(d, "tokenizer_config.json", b'{"a": "\xff"}')), ValueError, "tokenizer_config.json: not valid JSON"),
    ("from_checkpoint/config-list", lambda t, d: Tokenizer.from_checkpoint(put(d, "tokenizer_config.json", "[]")), ValueError, "tokenizer_config.json: expected a JSON object"),
    ("from_checkpoint/jinja-not-utf8", lambda t, d: Tokenizer.from_checkpoint(put(put(d, "tokenizer_config.json", "{}"), "chat_template.jinja", b"\xff{{ x }}")), ValueError, "chat_template.jinja: not UTF-8"),
    # encode, token_to_id, decode
    ("encode/bytes", lambda t, d: t.encode(b"hello"), TypeError, "text must be a str"),
    ("encode/none", lambda t, d: t.encode(None), TypeError, "text must be a str"),
    ("token_to_id/int", lambda t, d: t.token_to_id(3), TypeError, "token: expected a str"),
    ("decode/str", lambda t, d: t.decode("hello"), TypeError, "ids: expected a sequence of token ids"),
    ("decode/int", lambda t, d: t.decode(3), TypeError, "ids: expected a sequence"),
    ("decode/float", lambda t, d: t.decode([3, 1.5]), TypeError, "ids[1]: expected an integer token id"),
    ("decode/bool", lambda t, d: t.decode([True]), TypeError, "ids[0]:"),
    ("decode/np-bool", lambda t, d: t.decode(np.array([True])), TypeError, "ids[0]:"),
    ("decode/negative", lambda t, d: t.decode([3, -1]), ValueError, "ids[1]: token id -1 outside the vocabulary [0, 7)"),
    ("decode/past-vocab", lambda t, d: t.decode([7]), ValueError, "ids[0]: token id 7 outside"),
    ("decode/huge", lambda t, d: t.decode([2**70]), ValueError, "outside the vocabulary"),
    # StreamDecoder
    ("stream/tokenizer", lambda t, d: StreamDecoder(None), TypeError, "tokenizer: expected a Tokenizer"),
    ("stream/push-str", lambda t, d: StreamDecoder(t).push("hello"), TypeError, "ids: expected a sequence"),
    ("stream/push-neg", lambda t, d: StreamDecoder(t).push([3, -5]), ValueError, "ids[1]: token id -5"),
    # encode_dsv32
    ("dsv32/str", lambda t, d: encode_dsv32("hi"), ValueError, "messages: expected a non-empty list"),
    ("dsv32/empty", lambda t, d: encode_dsv32([]), ValueError, "messages: expected a non-empty list"),
    ("dsv32/no-role", lambda t, d: encode_dsv32([{"content": "x"}]), ValueError, "messages[0]: expected an object with a string 'role'"),
    ("dsv32/not-mapping", lambda t, d: encode_dsv32([MSGS[0], "user: hi"]), ValueError, "messages[1]:"),
    ("dsv32/content-int", lambda t, d: encode_dsv32([{"role": "user", "content": 5}]), ValueError, "messages[0].content: expected a string"),
    ("dsv32/role", lambda t, d: encode_dsv32([{"role": "bot", "content": "x"}]), ValueError, "messages[0].role: expected 'system', 'user'"),
    ("dsv32/tool-result-alone", lambda t, d: encode_dsv32([{"role": "tool", "content": "x"}]), ValueError, "messages[0]:"),
    ("dsv32/tool-calls", lambda t, d: encode_dsv32([{"role": "assistant", "content": "", "tool_calls": [{}]}]), ValueError, "messages[0].tool_calls[0]:"),
    # dsv32_tools_prompt
    ("tools/str", lambda t, d: dsv32_tools_prompt("search"), ValueError, "tools: expected a list of"),
    ("tools/none", lambda t, d: dsv32_tools_prompt(None), ValueError, "tools: expected a list"),
    ("tools/int", lambda t, d: dsv32_tools_prompt([5]), ValueError, "tools[0]: expected an object with a 'function' object"),
    ("tools/no-function", lambda t, d: dsv32_tools_prompt([{"type": "function"}]), ValueError, "tools[0]:"),
    # render_chat_template, chat_prompt
    ("render/messages", lambda t, d: render_chat_template("{{ messages }}", None), ValueError, "messages:"),
    ("render/syntax", lambda t, d: render_chat_template("{% if %}", MSGS), ValueError, "chat template:"),
    ("render/undefined", lambda t, d: render_chat_template("{{ a.b.c }}", MSGS), ValueError, "chat template: 'a' is undefined"),
    ("render/raise", lambda t, d: render_chat_template("{{ raise_exception('no system turns') }}", MSGS), ValueError, "chat template: no system turns"),
    ("chat_prompt/no-template", lambda t, d: chat_prompt(t, "glm_moe_dsa", MSGS), ValueError, "has no chat_template"),
    ("chat_prompt/messages", lambda t, d: chat_prompt(t, "deepseek_v32", []), ValueError, "messages:"),
    ("chat_prompt/tokenizer-none", lambda t, d: chat_prompt(None, "glm_moe_dsa", MSGS), TypeError, "tokenizer: expected a Tokenizer"),
    ("render/template-none", lambda t, d: render_chat_template(None, MSGS), TypeError, "template: expected the template's text"),
]
# fmt: on


def state(t: Tokenizer) -> tuple:
    return (t.vocab_size, t.bos_token, t.eos_token, t.add_bos_token, t.chat_template, t.encode("hello world"))


@pytest.mark.parametrize(("call", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_name(
    call: Callable[[Tokenizer, Path], Any],
    exc: type[BaseException],
    match: str,
    tok: Tokenizer,
    ckpt: Path,
    tmp_path: Path,
) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in ckpt.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    before = state(tok)
    with pytest.raises(exc) as info:
        call(tok, d)
    assert match in str(info.value), str(info.value)
    assert state(tok) == before
    assert sorted(f.name for f in ckpt.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_an_oversized_tokenizer_json_is_refused_before_it_is_parsed(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizer_mod, "MAX_TOKENIZER_BYTES", 16)
    with pytest.raises(ValueError, match="over the limit of 16"):
        Tokenizer.from_file(ckpt / "tokenizer.json")


def test_a_refused_push_keeps_the_stream_decoder_state(tok: Tokenizer) -> None:
    dec = StreamDecoder(tok)
    first = dec.push([3])
    ids, emitted = list(dec.ids), dec.emitted
    for bad in ([4, -1], [4, 99], [4, 2.0], "x"):
        with pytest.raises((TypeError, ValueError)):
            dec.push(bad)  # type: ignore[arg-type]
        assert dec.ids == ids and dec.emitted == emitted
    assert first + dec.push([4]) + dec.flush() == tok.decode([3, 4])


# Hostile chat templates: the sandbox refuses every escape as a ValueError naming the template; what it
# cannot refuse by name (a recursion, a division by zero, a range past the sandbox's limit) still ends as
# an ordinary Exception, never a crash or a BaseException, and never touches the caller's messages.
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('true') }}",
    "{{ lipsum.__globals__['os'].listdir('/') }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ messages.pop() }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{% set x = messages.append(1) %}",
    "{{ messages[0].__class__.__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ request.application.__globals__ }}",
]
OTHER_FAILURES = [
    ("{% include '/etc/passwd' %}", "TypeError: no loader"),  # no loader: nothing is read from disk
    ("{% import 'os' as os %}", "TypeError: no loader"),
    ("{% for i in range(10**9) %}x{% endfor %}", "OverflowError: range of 1000000000 items"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ 1 % 0 }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ 'a' * 10**10 }}", "OverflowError: '*' would make 10000000000 items"),  # would allocate 10 GB
    ("{{ 10**10 * 'a' }}", "OverflowError: '*' would make"),
    ("{{ [0] * 10**9 }}", "OverflowError: '*' would make 1000000000 items"),
    ("{{ (2 ** 1000000) % 7 }}", "OverflowError: '**' would make a 2000000-bit integer"),
    ("{{ 2.0 ** 10000 }}", "OverflowError"),
]


@pytest.mark.parametrize(("template", "kind"), OTHER_FAILURES, ids=[t for t, _ in OTHER_FAILURES])
def test_a_failing_chat_template_raises_a_named_value_error(template: str, kind: str) -> None:
    """Whatever goes wrong inside a template (no loader, arithmetic, recursion, a result over the
    sandbox's caps: refused before it is computed) is `ValueError("chat template: ...")`."""
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="^chat template: ") as info:
        render_chat_template(template, msgs)
    assert kind in str(info.value), str(info.value)
    assert msgs == [{"role": "user", "content": "hi"}]


def test_the_sandbox_caps_leave_ordinary_arithmetic_alone() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    t = "{{ '-' * 3 }}|{{ 3 * 'ab' }}|{{ [1, 2] * 2 }}|{{ 2 ** 10 }}|{{ 1.5 * 2 }}|{{ range(3) | list }}|{{ ('x' * 1000000) | length }}"
    assert render_chat_template(t, msgs) == "---|ababab|[1, 2, 1, 2]|1024|3.0|[0, 1, 2]|1000000"


# ----- good cases --------------------------------------------------------------------------------------
def test_good_inputs_do_what_they_say(tok: Tokenizer, ckpt: Path) -> None:
    assert tok.vocab_size == 7 and tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.eos_token_id == 2
    assert tok.encode("hello world") == [3, 4] and tok.encode("hello world", add_special_tokens=True) == [1, 3, 4]
    assert tok.encode("unknown") == [0] and tok.token_to_id("sparse") == 5 and tok.token_to_id("nope") is None
    assert tok.decode(np.array([3, 4], np.int64)) == "hello world"
    assert tok.decode([1, 3], skip_special_tokens=False).startswith("<s>")
    dec = StreamDecoder(tok)
    assert "".join([dec.push([3]), dec.push([4, 5]), dec.flush()]) == tok.decode([3, 4, 5])
    plain = Tokenizer.from_file(ckpt / "tokenizer.json", {"chat_template": [{"name": "default", "template": "T"}]})
    assert plain.chat_template == "T" and plain.add_bos_token is False
    assert (
        render_chat_template("{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}", MSGS) == "[user:hi]"
    )
    assert render_chat_template("{{ messages|tojson }}", MSGS) == json.dumps(MSGS, sort_keys=True)
    assert chat_prompt(tok, "deepseek_v32", MSGS) == encode_dsv32(MSGS)


def test_a_memory_bomb_template_ends_as_an_exception_in_a_child_process() -> None:
    """`'a' * 10**10` asks for 10 GB: under a 2 GiB address-space limit (the child only) the render must
    end with an ordinary exception (MemoryError, or a ValueError if the sandbox refuses the size), never
    an abort or a kill."""
    code = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from dsa_hybrid.text.chat import render_chat_template
        try:
            render_chat_template("{{ 'a' * 10**10 }}", [{"role": "user", "content": "hi"}])
        except (MemoryError, ValueError) as e:
            print("refused", type(e).__name__)
            sys.exit(0)
        print("rendered")
        sys.exit(3)
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0 and p.stdout.startswith("refused"), (p.returncode, p.stdout, p.stderr[-2000:])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.integers(-3, 9), max_size=4), max_size=8))
def test_stream_decoder_fuzz_keeps_its_state_on_refusal(tok: Tokenizer, pushes: list[list[int]]) -> None:
    """Random pushes, some with ids outside [0, 7): a refused push changes nothing, and the pieces of the
    accepted ones join to the decode of every accepted id."""
    dec = StreamDecoder(tok)
    kept: list[int] = []
    pieces = []
    for ids in pushes:
        if all(0 <= i < tok.vocab_size for i in ids):
            pieces.append(dec.push(ids))
            kept += ids
        else:
            with pytest.raises(ValueError, match=r"ids\[\d+\]: token id -?\d+ outside the vocabulary"):
                dec.push(ids)
        assert dec.ids == kept
    assert "".join(pieces) + dec.flush() == tok.decode(kept)
