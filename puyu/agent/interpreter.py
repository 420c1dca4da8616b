"""The sandboxed interpreter as a Lagent action (what the model calls through `<|interpreter|>`)."""
from __future__ import annotations

import re
from typing import Callable, Optional

from lagent.actions import BaseAction
from lagent.actions.parser import BaseParser, JsonParser
from lagent.schema import ActionReturn, ActionStatusCode

from .sandbox import CellResult, Sandbox

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(command: str) -> str:
    """The code of a call: the ```python blocks joined in order, or the whole text when there is no fence."""
    blocks = _FENCE.findall(command)
    code = "\n".join(b.strip("\n") for b in blocks) if blocks else command
    return code.strip("\n")


class SandboxInterpreter(BaseAction):
    """When you send Python code to this tool, it runs in a stateful Python session (like a Jupyter notebook) in
    the working directory that holds the uploaded files; printed output, the value of the last expression and
    errors come back, and matplotlib figures are saved as PNG. There is no network access."""

    def __init__(self, sandbox: Sandbox, on_cell: Optional[Callable[[str, CellResult], None]] = None,
                 observation_chars: int = 4000, description: Optional[dict] = None,
                 parser: type[BaseParser] = JsonParser, enable: bool = True) -> None:
        super().__init__(description, parser, enable)
        if not isinstance(observation_chars, int) or observation_chars < 200:
            raise ValueError(f"observation_chars: must be an integer >= 200, got {observation_chars!r}")
        self.sandbox = sandbox
        self.on_cell = on_cell
        self.observation_chars = observation_chars

    def run(self, command: str) -> ActionReturn:
        """Run Python code.

        Args:
            command (str): Python code, optionally inside a ```python block
        """
        code = extract_code(command)
        if not code.strip():
            return ActionReturn(args={"command": command}, type=self.name, state=ActionStatusCode.ARGS_ERROR,
                                errmsg="Error: the call contained no Python code.")
        result = self.sandbox.run(code)
        if self.on_cell is not None:
            self.on_cell(code, result)
        return to_action_return(self.name, command, result, self.observation_chars)


def shorten(text: str, limit: int) -> str:
    """Head and tail of a long output (the model's context is small; the transcript keeps it all)."""
    if len(text) <= limit:
        return text
    head, tail = limit * 3 // 5, limit * 2 // 5
    return f"{text[:head]}\n... [{len(text) - head - tail} characters omitted] ...\n{text[-tail:]}"


def to_action_return(name: str, command: str, result: CellResult, limit: int = 4000) -> ActionReturn:
    """What the model sees: output (shortened to `limit` characters), then the error (if any), then the figures as
    `[image](path)` items."""
    text = shorten(result.output.rstrip("\n"), limit)
    if result.status != "ok" and result.error and result.error not in text:
        text = f"{text}\n{result.error}".strip("\n")
    items = [{"type": "text", "content": text or "[no output]"}]
    items += [{"type": "image", "content": path} for path in result.figures]
    if result.status == "ok":
        return ActionReturn(args={"command": command}, type=name, result=items)
    message = "\n".join(i["content"] if i["type"] == "text" else f"[image]({i['content']})" for i in items)
    return ActionReturn(args={"command": command}, type=name, result=items, errmsg=message,
                        state=ActionStatusCode.API_ERROR)
