"""Parsing InternLM2 replies into steps, hardened where Lagent 0.2.4's `Internlm2Protocol.parse` breaks.

Lagent crashes on two plugin calls in one reply (tuple unpacking), silently drops a second interpreter call, and
leaves invalid JSON or an unknown tool to the agent loop, which then retries the same prompt without telling the
model. `parse_reply` never raises: it returns the first call, how many further calls it ignored, and a `problem`
(the sentence the model is told) when the reply cannot be executed.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

from lagent.actions import ActionExecutor
from lagent.agents.internlm2_agent import Internlm2Protocol

IM_END = "<|im_end|>"
ACTION_START, ACTION_END = "<|action_start|>", "<|action_end|>"
CHANNELS = {"<|plugin|>": "plugin", "<|interpreter|>": "interpreter"}
# A call opens with <|action_start|> and a channel token; models sometimes drop one of the two.
_CALL = re.compile(r"<\|action_start\|>[ \t]*(<\|plugin\|>|<\|interpreter\|>)?|(<\|plugin\|>|<\|interpreter\|>)")
CALL_FORMAT = '{"name": "<tool name>", "parameters": {<arguments>}}'


@dataclass
class ParsedReply:
    kind: str  # answer | plugin | interpreter | invalid
    thought: str  # the text before the first call (the whole reply for an answer)
    action: Optional[dict] = None  # {"name": ..., "parameters": {...}} of the first call
    channel: Optional[str] = None  # plugin | interpreter (also set for an invalid call when known)
    call_text: str = ""  # the first call's body, as the model wrote it
    problem: Optional[str] = None  # why it cannot be executed (told to the model)
    ignored_calls: int = 0  # further calls in the same reply, not executed


def split_calls(message: str) -> tuple[str, list[tuple[Optional[str], str]]]:
    """(text before the first call, [(channel or None, body), ...]); a body ends at <|action_end|> or the next call."""
    matches = list(_CALL.finditer(message))
    if not matches:
        return message, []
    calls = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(message)
        body = message[m.end():end].split(ACTION_END)[0]
        token = m.group(1) or m.group(2)
        calls.append((CHANNELS.get(token) if token else None, body.strip("\n")))
    return message[:matches[0].start()], calls


def _load_call_json(body: str) -> dict:
    text = body.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*\n(.*?)\n?```", text, re.S)
    if fenced:
        text = fenced.group(1)
    call = json.loads(text)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise ValueError('the call must be a JSON object with a "name" string')
    params = call.get("parameters", call.get("arguments", {}))
    if isinstance(params, str):  # OpenAI style: arguments as a JSON string
        params = json.loads(params) if params.strip() else {}
    if not isinstance(params, dict):
        raise ValueError('"parameters" must be a JSON object')
    return {"name": call["name"], "parameters": params}


class HardenedInternlm2Protocol(Internlm2Protocol):
    """Lagent's prompt formatting, with a parser that never raises and explains every rejected call."""

    def parse_reply(self, message: str, plugin_executor: Optional[ActionExecutor] = None,
                    interpreter_executor: Optional[ActionExecutor] = None) -> ParsedReply:
        message = message.split(IM_END)[0]
        thought, calls = split_calls(message)
        if not calls:
            return ParsedReply("answer", message.replace(ACTION_END, "").strip())
        thought = thought.strip()
        channel, body = calls[0]
        reply = ParsedReply("invalid", thought, channel=channel, call_text=body, ignored_calls=len(calls) - 1)
        if channel is None:
            reply.problem = ("Error: a tool call must start with <|action_start|> followed by <|plugin|> or "
                             "<|interpreter|>.")
        elif channel == "interpreter":
            self._interpreter_action(reply, body, interpreter_executor)
        else:
            self._plugin_action(reply, body, plugin_executor)
        return reply

    @staticmethod
    def _interpreter_action(reply: ParsedReply, body: str, executor: Optional[ActionExecutor]) -> None:
        if executor is None or not executor.action_names():
            reply.problem = "Error: the code interpreter is not available here. Answer without running code."
        elif not body.strip():
            reply.problem = "Error: the interpreter call contained no code."
        else:
            reply.kind = "interpreter"
            reply.action = {"name": executor.action_names()[0], "parameters": {"command": body}}

    @staticmethod
    def _plugin_action(reply: ParsedReply, body: str, executor: Optional[ActionExecutor]) -> None:
        if executor is None or not executor.action_names():
            reply.problem = "Error: no tools are available here. Answer directly."
            return
        names = ", ".join(executor.action_names())
        try:
            action = _load_call_json(body)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            reply.problem = (f"Error: the tool call is not valid ({exc}). Write exactly one call as {CALL_FORMAT}; "
                             f"available tools: {names}.")
            return
        if not executor.is_valid(action["name"].split(".")[0]):
            reply.problem = f"Error: there is no tool named {action['name']!r}; available tools: {names}."
            return
        reply.kind, reply.action = "plugin", action

    def parse(self, message: str, plugin_executor: Optional[ActionExecutor] = None,
              interpreter_executor: Optional[ActionExecutor] = None):
        """Lagent's signature `(name, thought, action)`, without its crashes (an invalid call reads as no call)."""
        reply = self.parse_reply(message, plugin_executor, interpreter_executor)
        if reply.kind == "interpreter":
            return "interpreter", reply.thought, reply.action
        if reply.kind == "plugin":
            return "plugin", reply.thought, json.dumps(reply.action, ensure_ascii=False)
        return None, reply.thought, None


def ignored_calls_note(count: int) -> str:
    return (f"\nNote: your reply contained {count + 1} tool calls; only the first one was executed. "
            "Make one call per reply.")
