"""The InternLM2 agent loop, on Lagent's `Internlm2Agent`, hardened: every reply either runs one call, ends the run
with an answer, or tells the model what was wrong; the loop is bounded by `max_turn` and a model error ends it
cleanly. Each step is reported to an optional `recorder(event: dict)` (the run folder's transcript)."""
from __future__ import annotations

import re
import time
from typing import Callable, Optional, Union

from lagent.actions import ActionExecutor
from lagent.agents.internlm2_agent import Internlm2Agent
from lagent.llms import BaseModel
from lagent.schema import ActionReturn, AgentReturn, AgentStatusCode, ModelStatusCode

from .protocol import HardenedInternlm2Protocol, ParsedReply, ignored_calls_note

Recorder = Callable[[dict], None]


class PuyuAgent(Internlm2Agent):
    """`chat(question)` -> `AgentReturn`; `errmsg` is set when the run ended without a final answer."""

    def __init__(self, llm: BaseModel, plugin_executor: Optional[ActionExecutor] = None,
                 interpreter_executor: Optional[ActionExecutor] = None,
                 protocol: Optional[HardenedInternlm2Protocol] = None, max_turn: int = 10,
                 recorder: Optional[Recorder] = None) -> None:
        if not isinstance(max_turn, int) or max_turn < 1:
            raise ValueError(f"max_turn: must be a positive integer, got {max_turn!r}")
        super().__init__(llm, plugin_executor, interpreter_executor, protocol or HardenedInternlm2Protocol(),
                         max_turn)
        self.recorder = recorder

    def _record(self, event: dict) -> None:
        if self.recorder is not None:
            self.recorder(event)

    def chat(self, message: Union[str, dict, list], **kwargs) -> AgentReturn:
        history = [dict(role="user", content=message)] if isinstance(message, str) else \
            [message] if isinstance(message, dict) else list(message)
        offset = len(history)
        ret = AgentReturn()
        for turn in range(1, self.max_turn + 1):
            prompt = self._protocol.format(inner_step=history, plugin_executor=self._action_executor,
                                           interpreter_executor=self._interpreter_executor)
            # the whole prompt as sent (system prompt with the tool instructions included), for the transcript
            self._record({"event": "prompt", "turn": turn, "messages": _plain(prompt)})
            text, error = self._generate(prompt, turn, **kwargs)
            if error is not None:
                ret.state, ret.errmsg = AgentStatusCode.SERVER_ERR, error
                break
            reply = self._protocol.parse_reply(text, self._action_executor, self._interpreter_executor)
            if reply.kind == "answer":
                history.append(dict(role="language", content=reply.thought))
                ret.response, ret.state = reply.thought, AgentStatusCode.END
                self._record({"event": "answer", "turn": turn, "text": reply.thought})
                self._flag_unexecuted(reply.thought, turn)
                break
            if reply.kind == "invalid":
                self._reject(history, text, reply, turn)
                continue
            self._execute(history, ret, reply, turn)
        else:
            ret.state = AgentStatusCode.END
            ret.errmsg = f"stopped after {self.max_turn} turns without a final answer"
            self._record({"event": "max_turns", "turn": self.max_turn, "message": ret.errmsg})
        ret.inner_steps = history[offset:]
        return ret

    def _generate(self, prompt: list, turn: int, **kwargs) -> tuple[str, Optional[str]]:
        """Stream one reply; returns (text, error message or None). Never raises."""
        start, text, first = time.monotonic(), "", None
        try:
            for status, text, _ in self._llm.stream_chat(prompt, **kwargs):
                first = first if first is not None else time.monotonic() - start
                if status < 0:
                    reason = getattr(self._llm, "last_error", None) or f"model error {ModelStatusCode(status).name}"
                    return text, self._model_error(turn, reason, start)
        except Exception as exc:  # a server gone away, a prompt too long: the run ends, the process does not
            return text, self._model_error(turn, f"{type(exc).__name__}: {exc}", start)
        self._record({"event": "model", "turn": turn, "text": text, "duration_s": round(time.monotonic() - start, 3),
                      "first_token_s": round(first, 3) if first is not None else None,
                      "usage": dict(getattr(self._llm, "last_usage", None) or {})})
        return text, None

    def _flag_unexecuted(self, text: str, turn: int) -> None:
        """Python blocks written in the reply's text, outside an interpreter call, never ran: say so, so that
        neither the user nor the report takes their 'output' for a result."""
        blocks = count_python_blocks(text)
        if blocks:
            self._record({"event": "unexecuted_code", "turn": turn, "blocks": blocks,
                          "message": f"{blocks} python block(s) in the model's text were not executed (only code "
                                     f"inside an interpreter call runs)"})

    def _model_error(self, turn: int, message: str, start: float) -> str:
        self._record({"event": "model_error", "turn": turn, "message": message,
                      "duration_s": round(time.monotonic() - start, 3),
                      "usage": dict(getattr(self._llm, "last_usage", None) or {})})
        return message

    def _reject(self, history: list, text: str, reply: ParsedReply, turn: int) -> None:
        """Keep the faulty reply in the conversation and answer it with the problem, so the model can correct it."""
        self._record({"event": "protocol_error", "turn": turn, "channel": reply.channel, "problem": reply.problem,
                      "call": reply.call_text})
        history.append(dict(role="assistant", content=text.split("<|im_end|>")[0]))
        problem = reply.problem or "the reply could not be executed"
        env = dict(role="environment", content=problem + ignored_calls_note(reply.ignored_calls)
                   if reply.ignored_calls else problem)
        if reply.channel:
            env["name"] = reply.channel
        history.append(env)

    def _execute(self, history: list, ret: AgentReturn, reply: ParsedReply, turn: int) -> None:
        assert reply.action is not None  # the parser sets an action for every plugin/interpreter reply
        executor = self._interpreter_executor if reply.kind == "interpreter" else self._action_executor
        start = time.monotonic()
        action_return: ActionReturn = executor(reply.action["name"], reply.action["parameters"])
        action_return.thought = reply.thought
        ret.actions.append(action_return)
        response = self._protocol.format_response(action_return, name=reply.kind)
        if reply.ignored_calls:
            response["content"] += ignored_calls_note(reply.ignored_calls)
        self._record({"event": "action", "turn": turn, "channel": reply.kind, "name": reply.action["name"],
                      "parameters": reply.action["parameters"], "state": int(action_return.state),
                      "response": response["content"], "ignored_calls": reply.ignored_calls,
                      "duration_s": round(time.monotonic() - start, 3)})
        self._flag_unexecuted(reply.thought, turn)
        history.append(dict(role="language", content=reply.thought))
        history.append(dict(role="tool", content=reply.action, name=reply.kind))
        history.append(response)


_PYTHON_BLOCK = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*(?:python|py|python3)\b", re.MULTILINE | re.IGNORECASE)


def count_python_blocks(text: str) -> int:
    """Fenced python code blocks (```python, ~~~py, ...) opened in `text`."""
    return len(_PYTHON_BLOCK.findall(text or ""))


def _plain(prompt: list) -> list:
    """The prompt messages as JSON-safe dicts (a tool call's content is a dict; anything else becomes text)."""
    out = []
    for m in prompt:
        m = dict(m)
        if not isinstance(m.get("content"), (str, dict, list, type(None))):
            m["content"] = str(m["content"])
        out.append(m)
    return out
