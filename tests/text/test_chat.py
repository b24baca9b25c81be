"""Chat encodings: DeepSeek-V3.2's format (what its release's encoding script writes for system, user
and assistant turns, chat and thinking modes) and a checkpoint's Jinja chat template (GLM-5 style)."""

from __future__ import annotations

import pytest

from dsa_hybrid.text.chat import (
    DSV32_ASSISTANT,
    DSV32_BOS,
    DSV32_EOS,
    DSV32_USER,
    encode_dsv32,
    render_chat_template,
)

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
    {"role": "user", "content": "1+1=?"},
]


def test_dsv32_encoding_chat_and_thinking_modes() -> None:
    assert DSV32_BOS == "<｜begin▁of▁sentence｜>" and DSV32_USER == "<｜User｜>"
    head = f"{DSV32_BOS}You are a helpful assistant.{DSV32_USER}hello{DSV32_ASSISTANT}</think>"
    head += f"Hello! I am DeepSeek.{DSV32_EOS}{DSV32_USER}1+1=?{DSV32_ASSISTANT}"
    # Earlier turns' reasoning is dropped; the last user turn opens the reply.
    assert encode_dsv32(CONVERSATION, thinking=True) == head + "<think>"
    assert encode_dsv32(CONVERSATION) == head + "</think>"
    assert encode_dsv32(CONVERSATION[1:2], add_bos=False) == f"{DSV32_USER}hello{DSV32_ASSISTANT}</think>"
    # An assistant turn after the last user turn keeps its reasoning in thinking mode.
    tail = [*CONVERSATION, {"role": "assistant", "content": "2", "reasoning_content": "1+1"}]
    assert encode_dsv32(tail, thinking=True) == head + "<think>1+1</think>2" + DSV32_EOS


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"content": "x"}], "messages[0]: expected an object with a string 'role'"),
        ([{"role": "user", "content": 3}], "messages[0].content: expected a string"),
        ([{"role": "robot", "content": "x"}], "messages[0].role: expected 'system', 'user' or 'assistant'"),
        ([{"role": "tool", "content": "x"}], "tool calls and tool results are not supported"),
    ],
)
def test_dsv32_encoding_refuses_bad_messages(messages: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=__import__("re").escape(fragment)):
        encode_dsv32(messages)  # type: ignore[arg-type]


GLM_LIKE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '<think>' if enable_thinking else '</think>' }}{% endif %}"
)


def test_jinja_chat_template_renders_sandboxed() -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    got = render_chat_template(GLM_LIKE, msgs, enable_thinking=False)
    assert got == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nhi<|assistant|></think>"
    assert render_chat_template(GLM_LIKE, msgs, add_generation_prompt=False).endswith("hi")
    with pytest.raises(ValueError, match="chat template: no system turns"):
        render_chat_template("{{ raise_exception('no system turns') }}", msgs)
    with pytest.raises(ValueError, match="chat template"):  # the sandbox refuses attribute escapes
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", msgs)
    with pytest.raises(ValueError, match="chat template"):
        render_chat_template("{% for %}", msgs)
