"""Chat encodings: a conversation (a list of `{"role": ..., "content": ...}` messages) as the prompt text
a model was trained on.

- DeepSeek-V3.2 ships no Jinja template: its release has an encoding script instead (`encoding_dsv32.py`).
  `encode_dsv32` writes the same format for system, user and assistant messages: `<｜begin▁of▁sentence｜>`,
  the system text, each user turn as `<｜User｜>{content}<｜Assistant｜>` followed by `</think>` (chat mode,
  or an earlier turn) or `<think>` (the last user turn in thinking mode), each assistant turn as
  `{content}<｜end▁of▁sentence｜>` (its reasoning, `reasoning_content`, kept only after the last user turn
  in thinking mode, as `{reasoning}</think>` before the content). Tools offered in the system prompt,
  assistant tool calls (a DSML `function_calls` block) and tool results (`<function_results>`) are
  written as the script writes them.
- GLM-5 (and any other checkpoint with a `chat_template` in tokenizer_config.json) is rendered with
  jinja2 in a sandbox, as transformers' `apply_chat_template` does (`render_chat_template`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dsa_hybrid.text.tokenizer import Tokenizer

DSV32_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
DSV32_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
DSV32_USER = "<\uff5cUser\uff5c>"
DSV32_ASSISTANT = "<\uff5cAssistant\uff5c>"
DSV32_DSML = "\uff5cDSML\uff5c"
THINK_START, THINK_END = "<think>", "</think>"
Message = Mapping[str, Any]

# The tools section of DeepSeek-V3.2's system prompt, as its encoding script writes it (`{dsml}` is
# `DSV32_DSML`, `{schemas}` one JSON object per tool, one per line).
DSV32_TOOLS_PROMPT = """## Tools
You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your \
reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>
String and scalar parameters should be specified as is without any escaping or quotes, while lists and \
objects should use JSON format. The "string" attribute should be set to "true" for string type parameters \
and "false" for other types (numbers, booleans, arrays, objects).
If the thinking_mode is enabled, then after function results you should strongly consider outputting a \
thinking block. Here is an example:
<{dsml}function_calls>
...
</{dsml}function_calls>
<function_results>
...
</function_results>
{think_start}...thinking about results{think_end}
Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""


def _check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}]: expected an object with a string 'role', got {m!r}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected a string, got {type(content).__name__}")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _functions(tools: Any, where: str) -> list[Any]:
    """OpenAI-style tools (`{"type": "function", "function": {...}}`) to their function objects."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ValueError(f"{where}: expected a list of {{'type': 'function', 'function': {{...}}}} objects")
    out = []
    for j, t in enumerate(tools):
        if not isinstance(t, Mapping) or not isinstance(t.get("function"), Mapping):
            raise ValueError(f"{where}[{j}]: expected an object with a 'function' object, got {t!r}")
        out.append(t["function"])
    return out


def dsv32_tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt section that offers `tools` (OpenAI style) to DeepSeek-V3.2."""
    schemas = "\n".join(_json(f) for f in _functions(tools, "tools"))
    return DSV32_TOOLS_PROMPT.format(dsml=DSV32_DSML, schemas=schemas, think_start=THINK_START, think_end=THINK_END)


def _tool_calls(calls: Any, where: str) -> str:
    """An assistant turn's `tool_calls` (OpenAI style; `arguments` a JSON object or its text) in DSML."""
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise ValueError(f"{where}: expected a list of tool calls")
    invokes = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where}[{j}]: expected {{'function': {{'name': ..., 'arguments': ...}}}}, got {call!r}")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}[{j}].function.arguments: not JSON ({e})") from None
        if not isinstance(args, Mapping):
            raise ValueError(f"{where}[{j}].function.arguments: expected a JSON object, got {args!r}")
        params = [
            f'<{DSV32_DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else _json(v)}</{DSV32_DSML}parameter>"
            for k, v in args.items()
        ]
        invokes.append(f'<{DSV32_DSML}invoke name="{fn["name"]}">\n' + "\n".join(params) + f"\n</{DSV32_DSML}invoke>")
    return f"\n\n<{DSV32_DSML}function_calls>\n" + "\n".join(invokes) + f"\n</{DSV32_DSML}function_calls>"


def encode_dsv32(
    messages: Sequence[Message],
    *,
    thinking: bool = False,
    add_bos: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """DeepSeek-V3.2's prompt text for `messages`, as the release's encoding script writes it, ending
    ready for the assistant's reply when the last message is a user turn or a tool result. `thinking`
    selects the thinking mode (the reply starts inside `<think>`); otherwise the chat mode (`</think>`
    closes the empty thought).

    Roles: "system", "user", "developer" (a user turn carrying its own tools), "assistant" (with optional
    `reasoning_content` and OpenAI-style `tool_calls`, written as a DSML `function_calls` block) and
    "tool" (one result per call of the assistant turn before, in order, grouped in `<function_results>`).
    `tools` (OpenAI style, `[{"type": "function", "function": {...}}]`) are offered in the system prompt:
    the first message's if it is a system turn, else an empty one put first; a system or developer turn
    may also carry its own `tools` key, as the script reads them. ValueError naming the message for a
    malformed conversation."""
    _check_messages(messages)
    msgs: list[Message] = list(messages)
    if tools is not None:
        _functions(tools, "tools")
        if msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "tools": [*(msgs[0].get("tools") or []), *tools]}
        else:
            msgs.insert(0, {"role": "system", "content": "", "tools": list(tools)})
    shift = len(msgs) - len(messages)  # message indices in errors refer to the caller's list
    last_user = max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)
    out = [DSV32_BOS] if add_bos else []
    for i, m in enumerate(msgs):
        where = f"messages[{max(i - shift, 0)}]"
        role, content = m["role"], m.get("content") or ""
        offered = dsv32_tools_prompt(m["tools"]) if m.get("tools") else ""
        opens = THINK_START if thinking and i == last_user else THINK_END
        if role == "system":
            out.append(content + ("\n\n" + offered if offered else ""))
        elif role == "developer":
            if not content:
                raise ValueError(f"{where}.content: a developer turn needs content")
            body = ("\n\n" + offered if offered else "") + f"\n\n# The user's message is: {content}"
            out.append(f"{DSV32_USER}{body}{DSV32_ASSISTANT}{opens}")
        elif role == "user":
            out.append(f"{DSV32_USER}{content}{DSV32_ASSISTANT}{opens}")
        elif role == "assistant":
            calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls") if m.get("tool_calls") else ""
            reasoning = ""
            if thinking and i > last_user:
                if not (m.get("reasoning_content") or calls):
                    raise ValueError(
                        f"{where}: in thinking mode an assistant turn after the last user turn needs "
                        "reasoning_content or tool_calls"
                    )
                reasoning = (m.get("reasoning_content") or "") + THINK_END
            out.append(f"{reasoning}{content}{calls}{DSV32_EOS}")
        elif role == "tool":
            first = i
            while first > 0 and msgs[first - 1]["role"] == "tool":
                first -= 1
            owner = msgs[first - 1] if first > 0 else None
            pending = owner.get("tool_calls") if owner is not None and owner["role"] == "assistant" else None
            order = i - first + 1
            if not pending or len(pending) < order:
                raise ValueError(f"{where}: a tool result needs an assistant turn before it with a tool call for it")
            out.append(("\n\n<function_results>" if order == 1 else "") + f"\n<result>{content}</result>")
            if order == len(pending):
                out.append("\n</function_results>\n\n" + (THINK_START if thinking and i >= last_user else THINK_END))
        else:
            raise ValueError(
                f"{where}.role: expected 'system', 'user', 'developer', 'assistant' or 'tool', got {role!r}"
            )
    return "".join(out)


# Caps inside a chat template's sandbox: the size of a `*` / `**` result (characters or items of a repeated
# string / list; binary digits of an integer power) and the length of `range(...)`. A real template loops
# over the messages and repeats short strings; these bound what a hostile one can allocate.
TEMPLATE_MAX_RESULT = 1_000_000
TEMPLATE_MAX_POW_BITS = 100_000
TEMPLATE_MAX_RANGE = 100_000
# What rendering a template may raise besides jinja2's own errors (all reported as the template's fault).
_RENDER_ERRORS = (ArithmeticError, RecursionError, TypeError, LookupError, AttributeError, ValueError, MemoryError)


def _capped_range(*args: int) -> range:
    r = range(*args)
    if len(r) > TEMPLATE_MAX_RANGE:
        raise OverflowError(f"range of {len(r)} items (the sandbox allows {TEMPLATE_MAX_RANGE})")
    return r


def _capped_binop(op: str, left: Any, right: Any) -> Any:
    """`left * right` or `left ** right`, refused (OverflowError) before computing a result over the caps."""
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and not isinstance(seq, bool):
                if len(seq) * max(n, 0) > TEMPLATE_MAX_RESULT:
                    raise OverflowError(
                        f"'*' would make {len(seq) * n} items (the sandbox allows {TEMPLATE_MAX_RESULT})"
                    )
        return left * right
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if right * abs(left).bit_length() > TEMPLATE_MAX_POW_BITS:
            raise OverflowError(f"'**' would make a {right * abs(left).bit_length()}-bit integer")
    return left**right


def render_chat_template(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render a Hugging Face Jinja chat template (sandboxed jinja2, `trim_blocks` / `lstrip_blocks`,
    `raise_exception` and `tojson` as transformers provides them). `variables` (e.g. `bos_token`,
    `enable_thinking`) are passed to the template. Needs jinja2 (installed with the `hf` extra's
    dependencies, or on its own). Any failure of the template (syntax, an undefined name, `raise_exception`,
    arithmetic, recursion, `{% include %}` / `{% import %}` with no loader, a `*` / `**` / `range` result
    over the sandbox's caps `TEMPLATE_MAX_*`) raises `ValueError("chat template: ...")`."""
    _check_messages(messages)
    if not isinstance(template, str):
        raise TypeError(f"template: expected the template's text (str), got {type(template).__name__}")
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("render_chat_template needs jinja2: pip install jinja2") from None

    class CappedSandbox(ImmutableSandboxedEnvironment):
        """jinja2's sandbox with `*` and `**` routed through `call_binop` (its documented hook) and capped."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            return _capped_binop(operator, left, right)

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = CappedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = _capped_range
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None
    except _RENDER_ERRORS as e:
        if isinstance(e, ValueError) and str(e).startswith("chat template: "):
            raise
        raise ValueError(f"chat template: {type(e).__name__}: {e}") from None


def chat_prompt(
    tokenizer: Tokenizer,
    model_type: str,
    messages: Sequence[Message],
    *,
    thinking: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The prompt text of `messages` for a checkpoint: DeepSeek-V3.2's own encoding for model type
    "deepseek_v32" (its release recommends the encoding script over any template), else the checkpoint's
    `chat_template` (GLM-5, whose template renders `tools` and tool turns itself). `tools`: OpenAI-style
    tool definitions offered to the model. `ValueError` when neither applies; `TypeError` naming
    `tokenizer` when it is not a tokenizer (has no `chat_template`)."""
    if not hasattr(tokenizer, "chat_template"):
        raise TypeError(f"tokenizer: expected a Tokenizer (with a chat_template), got {type(tokenizer).__name__}")
    if model_type == "deepseek_v32":
        return encode_dsv32(messages, thinking=thinking, tools=tools)
    if tokenizer.chat_template is not None:
        extra: dict[str, Any] = {} if tools is None else {"tools": [dict(t) for t in tools]}
        return render_chat_template(
            tokenizer.chat_template, messages, bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "", enable_thinking=thinking, **extra,
        )  # fmt: skip
    raise ValueError(f"the checkpoint has no chat_template and model type {model_type!r} has no built-in encoding")
