"""`puyu chat`: a terminal chat on an in-process engine, with streaming replies and multi-turn history.

Commands (typed alone on a line): /reset clears the history (the persona stays), /exit or /quit (or Ctrl-D) leaves,
/help lists them. Ctrl-C while a reply streams stops that reply and keeps the chat going. With `--image FILE` (a vision
model) the image goes with the first question of the conversation (again after /reset) and stays in the history.
"""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from ..config import GenerationConfig
from ..engine.client import EngineClient
from ..personas import DEFAULT_PERSONA_DIR, Persona, read_persona

HELP = "commands: /reset (clear the history), /exit or /quit (leave), /help"
PROMPT = "user> "
REPLY = "assistant> "


def find_persona(name_or_path: str, directory: Path = DEFAULT_PERSONA_DIR) -> Persona:
    """A persona by file path, file stem (`bajie`) or display name (`八戒`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return read_persona(path)
    files = sorted(directory.glob("*.y*ml")) if directory.is_dir() else []
    for f in files:
        persona = read_persona(f)
        if name_or_path in (f.stem, persona.name):
            return persona
    known = ", ".join(f.stem for f in files) or "none"
    raise ValueError(f"--persona: no persona {name_or_path!r} in {directory} (known: {known})")


@dataclass
class Conversation:
    """The history sent to the model each turn."""

    persona: Persona = field(default_factory=Persona)
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = []
        if self.persona.system:
            self.messages.append({"role": "system", "content": self.persona.system})
        if self.persona.greeting:
            self.messages.append({"role": "assistant", "content": self.persona.greeting})


class TerminalChat:
    """Reads lines, streams replies; `read` and `out` are replaceable for embedding."""

    def __init__(self, engine: EngineClient, gen_config: GenerationConfig, persona: Persona,
                 read: Callable[[str], str] = input, out: TextIO = sys.stdout, image: Any = None):
        self.engine = engine
        self.image = image  # a PIL image attached to the first user turn
        self.image_pending = image is not None
        self.gen_config = gen_config
        self.conv = Conversation(persona)
        self.read = read
        self.out = out
        self.loop = asyncio.new_event_loop()
        self.finish_reason: Optional[str] = None  # of the last reply

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def greet(self) -> None:
        who = f" as {self.conv.persona.name}" if self.conv.persona.name else ""
        self.write(f"puyu chat with {self.engine.model_name}{who} (session {self.engine.session_len} tokens). "
                   f"{HELP}\n")
        if self.conv.persona.greeting:
            self.write(f"{REPLY}{self.conv.persona.greeting}\n")

    def run(self) -> int:
        self.greet()
        try:
            while True:
                try:
                    line = self.read(PROMPT)
                except EOFError:
                    self.write("\n")
                    return 0
                except KeyboardInterrupt:
                    self.write("\n")
                    return 0
                if not self.command(line.strip()):
                    return 0
        finally:
            self.loop.close()

    def command(self, line: str) -> bool:
        """Handle one input line; False means leave."""
        if not line:
            return True
        if line in ("/exit", "/quit"):
            return False
        if line == "/reset":
            self.conv.reset()
            self.image_pending = self.image is not None
            self.write("(history cleared)\n")
            if self.conv.persona.greeting:
                self.write(f"{REPLY}{self.conv.persona.greeting}\n")
            return True
        if line == "/help":
            self.write(HELP + "\n")
            return True
        self.turn(line)
        return True

    def _user_message(self, text: str) -> dict[str, Any]:
        if not self.image_pending:
            return {"role": "user", "content": text}
        return {"role": "user", "content": [{"type": "image", "image": self.image}, {"type": "text", "text": text}]}

    def _drop_turn(self) -> None:
        """Forget the user turn that got no reply (its image, if it had one, goes with the next turn)."""
        last = self.conv.messages.pop()
        if isinstance(last.get("content"), list):
            self.image_pending = True

    def turn(self, text: str) -> None:
        self.conv.messages.append(self._user_message(text))
        self.image_pending = False
        self.write(REPLY)
        try:
            reply = self.loop.run_until_complete(self._stream())
        except KeyboardInterrupt:
            self._cancel_pending()
            self.write("\n(reply stopped)\n")
            self._drop_turn()
            return
        except ValueError as exc:  # the history no longer fits the session, or a bad option
            self.write(f"\nerror: {exc}. Type /reset to start a new conversation.\n")
            self._drop_turn()
            return
        except RuntimeError as exc:  # the engine failed on this reply; the chat goes on
            self.write(f"\nerror: {exc}\n")
            self._drop_turn()
            return
        self.write("\n")
        if self.finish_reason == "length":  # kept in the history: the next turn may ask to go on
            self.write(f"(reply cut at {self.gen_config.max_new_tokens} tokens: --max-new-tokens raises the "
                       f"limit)\n")
        self.conv.messages.append({"role": "assistant", "content": reply})

    def _cancel_pending(self) -> None:
        """After Ctrl-C: cancel the interrupted reply (its stream aborts the request) and let it finish."""
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

    async def _stream(self) -> str:
        parts: list[str] = []
        self.finish_reason = None
        stream = self.engine.generate(list(self.conv.messages), self.gen_config)
        try:
            async for out in stream:
                self.finish_reason = out.finish_reason or self.finish_reason
                if out.text:
                    parts.append(out.text)
                    self.write(out.text)
                if out.finish_reason == "error":
                    raise RuntimeError(out.error or "the engine failed")
        finally:
            await stream.aclose()
        return "".join(parts)
