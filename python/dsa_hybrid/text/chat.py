"""Chat encodings: a conversation (a list of `{"role": ..., "content": ...}` messages) as the prompt text
a model was trained on.

- DeepSeek-V3.2 ships no Jinja template: its release has an encoding script instead (`encoding_dsv32.py`).
  `encode_dsv32` writes the same format for system, user and assistant messages: `<｜begin▁of▁sentence｜>`,
  the system text, each user turn as `<｜User｜>{content}<｜Assistant｜>` followed by `</think>` (chat mode,
  or an earlier turn) or `<think>` (the last user turn in thinking mode), each assistant turn as
  `{content}<｜end▁of▁sentence｜>` (its reasoning, `reasoning_content`, kept only after the last user turn
  in thinking mode, as `{reasoning}</think>` before the content). Tool calls are not supported here.
- GLM-5 (and any other checkpoint with a `chat_template` in tokenizer_config.json) is rendered with
  jinja2 in a sandbox, as transformers' `apply_chat_template` does (`render_chat_template`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dsa_hybrid.text.tokenizer import Tokenizer

DSV32_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
DSV32_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
DSV32_USER = "<\uff5cUser\uff5c>"
DSV32_ASSISTANT = "<\uff5cAssistant\uff5c>"
THINK_START, THINK_END = "<think>", "</think>"
Message = Mapping[str, Any]


def _check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}]: expected an object with a string 'role', got {m!r}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected a string, got {type(content).__name__}")


def encode_dsv32(messages: Sequence[Message], *, thinking: bool = False, add_bos: bool = True) -> str:
    """DeepSeek-V3.2's prompt text for `messages` (roles "system", "user", "assistant"), ending ready for
    the assistant's reply when the last message is a user turn. `thinking` selects the thinking mode (the
    reply starts inside `<think>`); otherwise the chat mode (`</think>` closes the empty thought)."""
    _check_messages(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out = [DSV32_BOS] if add_bos else []
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if m.get("tool_calls") or role == "tool" or m.get("tools"):
            raise ValueError(f"messages[{i}]: tool calls and tool results are not supported by encode_dsv32")
        if role == "system":
            out.append(content)
        elif role == "user":
            out.append(f"{DSV32_USER}{content}{DSV32_ASSISTANT}")
            out.append(THINK_START if thinking and i == last_user else THINK_END)
        elif role == "assistant":
            reasoning = ""
            if thinking and i > last_user:
                reasoning = (m.get("reasoning_content") or "") + THINK_END
            out.append(f"{reasoning}{content}{DSV32_EOS}")
        else:
            raise ValueError(f"messages[{i}].role: expected 'system', 'user' or 'assistant', got {role!r}")
    return "".join(out)


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
    dependencies, or on its own)."""
    _check_messages(messages)
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("render_chat_template needs jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


def chat_prompt(tokenizer: Tokenizer, model_type: str, messages: Sequence[Message], *, thinking: bool = False) -> str:
    """The prompt text of `messages` for a checkpoint: DeepSeek-V3.2's own encoding for model type
    "deepseek_v32" (its release recommends the encoding script over any template), else the checkpoint's
    `chat_template` (GLM-5). `ValueError` when neither applies."""
    if model_type == "deepseek_v32":
        return encode_dsv32(messages, thinking=thinking)
    if tokenizer.chat_template is not None:
        return render_chat_template(
            tokenizer.chat_template, messages, bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "", enable_thinking=thinking,
        )  # fmt: skip
    raise ValueError(f"the checkpoint has no chat_template and model type {model_type!r} has no built-in encoding")
