"""Chat encodings: DeepSeek-V3.2's format (what its release's encoding script writes for system, user
and assistant turns, chat and thinking modes, tools, tool calls and tool results) and a checkpoint's Jinja
chat template (GLM-5 style)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsa_hybrid.text.chat import (
    DSV32_ASSISTANT,
    DSV32_BOS,
    DSV32_EOS,
    DSV32_USER,
    chat_prompt,
    dsv32_tools_prompt,
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
        ([{"role": "robot", "content": "x"}], "messages[0].role: expected 'system', 'user', 'developer'"),
        ([{"role": "tool", "content": "x"}], "messages[0]: a tool result needs an assistant turn before it"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "x"}],
            "messages[2]: a tool result needs an assistant turn before it with a tool call",
        ),
        ([{"role": "assistant", "tool_calls": [{"name": "f"}]}], "messages[0].tool_calls[0]: expected {'function'"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
            "messages[0].tool_calls[0].function.arguments: expected a JSON object",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
            "messages[0].tool_calls[0].function.arguments: not JSON",
        ),
        (
            [{"role": "system", "content": "s", "tools": [{"name": "f"}]}],
            "tools[0]: expected an object with a 'function'",
        ),
        ([{"role": "developer", "content": ""}], "messages[0].content: a developer turn needs content"),
    ],
)
def test_dsv32_encoding_refuses_bad_messages(messages: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=__import__("re").escape(fragment)):
        encode_dsv32(messages)  # type: ignore[arg-type]


def test_dsv32_thinking_mode_needs_reasoning_or_tool_calls_after_the_last_user_turn() -> None:
    with pytest.raises(ValueError, match=r"messages\[4\]: in thinking mode"):
        encode_dsv32([*CONVERSATION, {"role": "assistant", "content": "2"}], thinking=True)
    assert encode_dsv32([*CONVERSATION, {"role": "assistant", "content": "2"}]).endswith("</think>2" + DSV32_EOS)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city (°C)",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
NOW_FN = {"name": "now", "description": "The time", "parameters": {"type": "object", "properties": {}}}
NOW = {"type": "function", "function": NOW_FN}
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant.", "tools": [WEATHER, NOW]},
    {"role": "user", "content": "Weather in Paris and Beijing for 2 days?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "two calls",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": {"city": "北京", "days": 2, "opts": {"unit": "C"}, "list": [1, 2]},
                },
            },
        ],
    },
    {"role": "tool", "content": "sunny, 21"},
    {"role": "tool", "content": "cloudy, 18"},
    {"role": "assistant", "content": "Paris: sunny; Beijing: cloudy.", "reasoning_content": "summarize"},
    {"role": "user", "content": "And the time?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": "{}"}}],
    },  # fmt: skip
    {"role": "tool", "content": "12:00"},
]
DEVELOPER = [{"role": "developer", "content": "hi", "tools": [NOW]}]
# What DeepSeek-V3.2's encoding script writes for these conversations (see the file's "_source").
SCRIPT = json.loads((Path(__file__).parent / "dsv32_tool_encoding.json").read_text(encoding="utf-8"))


def test_dsv32_tools_tool_calls_and_results_match_the_release_script() -> None:
    assert encode_dsv32(TOOL_CONVERSATION) == SCRIPT["chat_full"]
    assert encode_dsv32(TOOL_CONVERSATION, thinking=True) == SCRIPT["thinking_full"]
    assert encode_dsv32(TOOL_CONVERSATION[:7], thinking=True) == SCRIPT["thinking_7"]
    assert encode_dsv32(DEVELOPER, thinking=True) == SCRIPT["developer"]
    # The pieces, spelled out: the DSML call block (string arguments as is, others as JSON) and the results.
    dsml = "\uff5cDSML\uff5c"
    call = (
        f'\n\n<{dsml}function_calls>\n<{dsml}invoke name="get_weather">\n'
        f'<{dsml}parameter name="city" string="true">Paris</{dsml}parameter>\n'
        f'<{dsml}parameter name="days" string="false">2</{dsml}parameter>\n</{dsml}invoke>\n'
    )
    assert call in SCRIPT["chat_full"]
    assert f'<{dsml}parameter name="opts" string="false">{{"unit": "C"}}</{dsml}parameter>' in SCRIPT["chat_full"]
    results = "\n\n<function_results>\n<result>sunny, 21</result>\n<result>cloudy, 18</result>\n</function_results>"
    assert results + "\n\n</think>" in SCRIPT["chat_full"]
    assert SCRIPT["thinking_full"].endswith("\n<result>12:00</result>\n</function_results>\n\n<think>")
    assert '"name": "get_weather", "description": "Weather of a city (°C)"' in dsv32_tools_prompt([WEATHER])


def test_dsv32_tools_argument_goes_into_the_system_prompt() -> None:
    plain = [{"role": "user", "content": "hi"}]
    with_system = [{"role": "system", "content": "S"}, *plain]
    offered = dsv32_tools_prompt([WEATHER, NOW])
    assert encode_dsv32(plain, tools=[WEATHER, NOW]) == encode_dsv32(
        [{"role": "system", "tools": [WEATHER, NOW]}, *plain]
    )
    assert encode_dsv32(plain, tools=[WEATHER, NOW]).startswith(DSV32_BOS + "\n\n" + offered + DSV32_USER)
    assert (
        encode_dsv32(with_system, tools=[WEATHER, NOW])
        == f"{DSV32_BOS}S\n\n{offered}{DSV32_USER}hi{DSV32_ASSISTANT}</think>"
    )
    assert with_system[0] == {"role": "system", "content": "S"}  # the caller's messages are not changed
    with pytest.raises(ValueError, match=r"tools\[0\]: expected an object with a 'function'"):
        encode_dsv32(plain, tools=[{"name": "f"}])


def test_chat_prompt_passes_tools_to_the_encoding_or_the_template() -> None:
    tok = SimpleNamespace(chat_template=None, bos_token=None, eos_token=None)
    msgs = [{"role": "user", "content": "hi"}]
    assert chat_prompt(tok, "deepseek_v32", msgs, tools=[NOW]) == encode_dsv32(msgs, tools=[NOW])  # type: ignore[arg-type]
    tok.chat_template = "{% for t in tools %}<tool>{{ t.function.name }}</tool>{% endfor %}{{ messages[0].content }}"
    assert chat_prompt(tok, "glm_moe_dsa", msgs, tools=[WEATHER, NOW]) == "<tool>get_weather</tool><tool>now</tool>hi"  # type: ignore[arg-type]


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
