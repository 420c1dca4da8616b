"""The chat tab's behaviour, apart from its layout: one `Conversation` per browser session, and the handlers that
stream a reply into it. Handlers are async generators yielding (chatbot messages, conversation, status, error)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from .backends import BackendError, ChatBackend
from ..personas import Persona
from .settings import ChatSettings

Update = tuple[list[dict[str, str]], "Conversation", str, str]


@dataclass
class Conversation:
    """What one browser session has said so far. `messages` alternate user / assistant after an optional greeting."""

    persona: str = ""
    system: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def start(cls, persona: Persona, system: Optional[str] = None) -> "Conversation":
        greeting = [{"role": "assistant", "content": persona.greeting}] if persona.greeting else []
        return cls(persona.name, persona.system if system is None else system, greeting)

    def request(self) -> list[dict[str, str]]:
        """The messages sent to the backend: the system prompt (if any), then the history."""
        system = [{"role": "system", "content": self.system}] if self.system.strip() else []
        return system + [dict(m) for m in self.messages]

    def display(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages]


def format_status(finish_reason: Optional[str], prompt_tokens: Optional[int],
                  completion_tokens: Optional[int]) -> str:
    # 'length': the reply hit the max-new-tokens limit mid-way; say so, it is not the model's own end
    parts = [f"finish: {finish_reason}" + (" (reply cut: Max new tokens reached)" if finish_reason == "length" else "")]
    if prompt_tokens is not None:
        parts.append(f"prompt tokens: {prompt_tokens}")
    if completion_tokens is not None:
        parts.append(f"generated tokens: {completion_tokens}")
    return " · ".join(parts)


def format_error(message: str) -> str:
    return f"**Error:** {message}"


async def stream_reply(backend: ChatBackend, conv: Conversation, settings: ChatSettings) -> AsyncIterator[Update]:
    """Append an assistant message to `conv` and fill it as the backend streams.

    On a backend error the partial reply is kept (marked) if there is one, else the empty message is dropped, and
    the error is yielded for the page. Cancellation (the stop button) leaves the partial reply in place.
    """
    request = conv.request()
    reply = {"role": "assistant", "content": ""}
    conv.messages.append(reply)
    yield conv.display(), conv, "generating…", ""
    finish, prompt_tokens, completion_tokens = None, None, None
    try:
        async for chunk in backend.stream(request, settings):
            if chunk.text:
                reply["content"] += chunk.text
                yield conv.display(), conv, "generating…", ""
            finish = chunk.finish_reason or finish
            prompt_tokens = chunk.prompt_tokens if chunk.prompt_tokens is not None else prompt_tokens
            completion_tokens = chunk.completion_tokens if chunk.completion_tokens is not None else completion_tokens
    except BackendError as exc:
        if not reply["content"]:
            conv.messages.pop()
        yield conv.display(), conv, "", format_error(str(exc))
        return
    yield conv.display(), conv, format_status(finish, prompt_tokens, completion_tokens), ""


async def send(backend: ChatBackend, message: str, conv: Conversation,
               settings: ChatSettings) -> AsyncIterator[tuple]:
    """Like `stream_reply`, with the input box's value as a fifth item: emptied once the message is sent, or given
    back (and the message taken out of the history) when the backend fails before replying, so it can be edited."""
    conv = copy.deepcopy(conv)
    message = message.strip()
    if not message:
        yield conv.display(), conv, "", format_error("type a message first"), message
        return
    conv.messages.append({"role": "user", "content": message})
    # the question on the page at once, on its own, before the backend is asked (which may take a while)
    yield conv.display(), conv, "generating…", "", ""
    async for chat, conv, status, error in stream_reply(backend, conv, settings):  # noqa: B020 (each yield is the new state)
        if error and conv.messages[-1] == {"role": "user", "content": message}:
            conv.messages.pop()
            yield conv.display(), conv, status, error, message
            return
        yield chat, conv, status, error, ""


async def regenerate(backend: ChatBackend, conv: Conversation, settings: ChatSettings) -> AsyncIterator[Update]:
    """Drop the replies after the last user message and answer it again."""
    users = [i for i, m in enumerate(conv.messages) if m["role"] == "user"]
    if not users:
        yield conv.display(), conv, "", format_error("nothing to regenerate: send a message first")
        return
    conv = copy.deepcopy(conv)
    del conv.messages[users[-1] + 1:]
    async for update in stream_reply(backend, conv, settings):
        yield update
