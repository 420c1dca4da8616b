"""InternLM2 tool calling on the OpenAI API: messages in, `tool_calls` out (whole replies and streamed).

Protocol (../shared/spec/internlm2-protocol.md): the tool list is a system turn named `<|plugin|>` holding the JSON
list of function objects; a call in a reply is `{thought}<|action_start|><|plugin|>\\n{json}<|action_end|>`; a tool
result is an `environment` turn named `<|plugin|>`. Two calls in one reply become two `tool_calls`. A call whose JSON
cannot be read (e.g. cut by `max_tokens`) is not a call: the reply is returned as plain content with the protocol
markup removed, never a crash, a retry loop or `<|action_start|>` in `content`. With `tool_choice` required or named
the call is forced by a grammar (`puyu.engine.grammar`, kind tool_call), so it always parses.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from .protocol import NamedToolChoice, Tool

ACTION_START = "<|action_start|>"
ACTION_END = "<|action_end|>"
PLUGIN = "<|plugin|>"
CALL_START = ACTION_START + PLUGIN
END_MARKERS = ("<|im_end|>", "</s>")
PROTOCOL_MARKUP = (ACTION_START, ACTION_END, PLUGIN, "<|interpreter|>", "<|im_start|>") + END_MARKERS


def _call_text(name: str, arguments: str) -> str:
    try:
        params = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        params = arguments  # keep what the client sent; the model sees it verbatim
    return CALL_START + "\n" + json.dumps({"name": name, "parameters": params}, ensure_ascii=False) + ACTION_END


def to_internlm2_messages(messages: list[Any], tools: Optional[list[Tool]]) -> list[dict[str, str]]:
    """OpenAI messages -> InternLM2 chat messages (`role`, `content`, optional `name`) for the chat template."""
    out: list[dict[str, str]] = []
    if tools:
        functions = [t.function.model_dump(exclude_none=True) for t in tools]
        out.append({"role": "system", "name": "plugin", "content": json.dumps(functions, ensure_ascii=False)})
    for m in messages:
        if m.role == "tool":
            out.append({"role": "environment", "name": "plugin", "content": m.text()})
        elif m.role == "assistant" and getattr(m, "tool_calls", None):
            calls = "".join(_call_text(c.function.name, c.function.arguments) for c in m.tool_calls)
            out.append({"role": "assistant", "content": m.text() + calls})
        else:
            role = "system" if m.role == "developer" else m.role
            msg = {"role": role, "content": m.text()}
            if getattr(m, "name", None) and role == "user":
                msg["name"] = m.name
            out.append(msg)
    # a system turn with tools must come first only if there is no other system prompt before the user turn
    return _system_first(out)


def _system_first(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Put a plain system prompt before the tool list (InternLM2's order: persona, then plugins)."""
    if len(msgs) > 1 and msgs[0].get("name") == "plugin" and msgs[1]["role"] == "system" and "name" not in msgs[1]:
        msgs[0], msgs[1] = msgs[1], msgs[0]
    return msgs


def forced_prefix(tool_choice: Any) -> str:
    """Text that starts the assistant turn so the model must call a tool (`required`) or a given one (named)."""
    if isinstance(tool_choice, NamedToolChoice):
        return CALL_START + "\n" + '{"name": ' + json.dumps(tool_choice.function.name) + ', "parameters": '
    if tool_choice == "required":
        return CALL_START + "\n"
    return ""


@dataclass
class ParsedReply:
    content: Optional[str]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None  # why a call in the reply could not be read

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"


def strip_end_markers(text: str) -> str:
    for marker in END_MARKERS:
        if text.endswith(marker):
            text = text[: -len(marker)]
    return text


def strip_markup(text: str) -> str:
    """`text` without InternLM2 protocol tokens (what a call that could not be parsed leaves as content)."""
    for marker in PROTOCOL_MARKUP:
        text = text.replace(marker, "")
    return text


def _parse_call(body: str) -> dict[str, Any]:
    """One action body (`\\n{json}`) -> an OpenAI tool call; ValueError if it is not a call."""
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool call is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError("tool call JSON has no 'name'")
    params = obj.get("parameters", obj.get("arguments", {}))
    arguments = params if isinstance(params, str) else json.dumps(params, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": arguments}}


def parse_reply(text: str) -> ParsedReply:
    """A whole reply (special tokens kept) -> content and tool calls."""
    text = strip_end_markers(text)
    if CALL_START not in text:
        return ParsedReply(content=text)
    head, *blocks = text.split(CALL_START)
    calls = []
    for block in blocks:
        body = block.split(ACTION_END, 1)[0]
        try:
            calls.append(_parse_call(body))
        except ValueError as exc:
            plain = strip_markup(text)
            return ParsedReply(content=plain if plain.strip() else None, error=str(exc))
    return ParsedReply(content=head or None, tool_calls=calls)


class ToolStreamParser:
    """Streaming version of `parse_reply`: content deltas go out as they come; once a call starts, the rest of the
    reply is held back and turned into complete `tool_calls` at the end (or into content if it is not a call)."""

    def __init__(self) -> None:
        self._pending = ""  # text that may be the start of CALL_START
        self._calls = ""  # everything from the first CALL_START on
        self.in_call = False

    def feed(self, delta: str) -> str:
        """Returns the content that can be sent now."""
        if self.in_call:
            self._calls += delta
            return ""
        text = self._pending + delta
        idx = text.find(CALL_START)
        if idx >= 0:
            self.in_call = True
            self._pending, self._calls = "", text[idx:]
            return text[:idx]
        keep = _partial_suffix(text, CALL_START)
        self._pending = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> ParsedReply:
        """The end of the reply: remaining content, and the calls (if any)."""
        if not self.in_call:
            return ParsedReply(content=strip_end_markers(self._pending) or None)
        parsed = parse_reply(self._calls)
        if parsed.error:
            return parsed  # the call text, markup removed, becomes content
        return ParsedReply(content=None, tool_calls=parsed.tool_calls)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
