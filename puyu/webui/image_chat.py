"""The image Q&A tab's behaviour: one picture per conversation, asked about over several turns.

The conversation sends OpenAI-style messages: the first user message carries the picture as an `image_url` part
(a PNG data: URL), later ones are text; `chat.send` / `chat.stream_reply` stream the replies as in the chat tab.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, cast

from . import chat
from .backends import ChatBackend
from .settings import ChatSettings

NO_IMAGE = "upload an image first"


def image_data_url(image: Any) -> str:
    """A PIL image as a PNG data: URL (what the OpenAI API and the engine backend both read)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class ImageConversation:
    """What one browser session asked about its picture. `messages` alternate user / assistant (text only)."""

    image_url: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)

    def request(self) -> list[dict[str, Any]]:
        """The history, with the picture attached to the first user message."""
        out: list[dict[str, Any]] = [dict(m) for m in self.messages]
        first = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
        if first is not None and self.image_url:
            out[first]["content"] = [{"type": "image_url", "image_url": {"url": self.image_url}},
                                     {"type": "text", "text": self.messages[first]["content"]}]
        return out

    def display(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages]


def new_conversation(image: Any) -> ImageConversation:
    return ImageConversation(image_data_url(image) if image is not None else "")


async def ask(backend: ChatBackend, question: str, conv: ImageConversation,
              settings: ChatSettings) -> AsyncIterator[tuple]:
    """`chat.send` for a picture: (chatbot messages, conversation, status, error, input box)."""
    if not conv.image_url:
        yield conv.display(), conv, "", chat.format_error(NO_IMAGE), question
        return
    # an ImageConversation has what `send` uses of a Conversation (messages, display, request_messages)
    async for update in chat.send(backend, question, cast(Any, conv), settings):
        yield update
