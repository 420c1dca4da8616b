"""Where the chat tab's replies come from: the in-process engine, or any OpenAI-compatible server.

Both backends take OpenAI-style chat messages plus `ChatSettings` and yield `ChatChunk`s (a text delta; the last
chunk carries the finish reason and token counts). Any failure is raised as `BackendError` with a message meant for
the page.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Protocol, cast

from ..engine.client import EngineClient
from .settings import ChatSettings


class BackendError(RuntimeError):
    """The backend failed a request; the message is shown in the page."""


@dataclass
class ChatChunk:
    text: str
    finish_reason: Optional[str] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None


class ChatBackend(Protocol):
    description: str

    def stream(self, messages: list[dict[str, str]], settings: ChatSettings) -> AsyncIterator[ChatChunk]: ...

    def close(self) -> None: ...


class EngineBackend:
    """The engine in this process (`puyu.engine.AsyncEngine`), driven from its own event loop thread."""

    def __init__(self, engine: EngineClient):
        """`engine` follows the AsyncEngine contract (puyu.serve.backends.build_engine makes one)."""
        self.engine = engine
        self.description = f"in-process engine · {engine.model_name}"
        # what the chat tab picks personas by: the model's name and architecture, and its tokenizer
        self.model_id = f"{engine.model_name} {getattr(getattr(engine, 'spec', None), 'arch', '') or ''}".strip()
        self.tokenizer = getattr(engine, "tokenizer", None)

    async def stream(self, messages: list[dict[str, str]], settings: ChatSettings) -> AsyncIterator[ChatChunk]:
        try:
            # The engine runs in its own thread and streams into whichever loop iterates; leaving early aborts.
            prompt = _engine_messages(messages)
            async for out in self.engine.generate(prompt, settings.to_generation_config()):
                if out.finish_reason == "error":
                    raise BackendError(f"engine error: {out.error or 'unknown error'}")
                yield ChatChunk(out.text, out.finish_reason, out.input_token_len,
                                out.generate_token_len if out.finish_reason else None)
        except ValueError as exc:  # PromptTooLongError and invalid generation settings
            raise BackendError(str(exc)) from None

    def close(self) -> None:
        self.engine.close()


class OpenAIBackend:
    """Any OpenAI-compatible server (`puyu serve`, LMDeploy's api_server, ...) through the `openai` SDK."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, model: Optional[str] = None,
                 timeout: float = 600.0):
        import openai

        base_url = base_url.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        self.base_url = base_url
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout,
                                          max_retries=0)
        self.model = model
        self.api_key = api_key
        self.description = f"OpenAI-compatible server · {base_url}"
        self.model_id = model or ""  # what the chat tab picks personas by (the server's model, when named)
        self.tokenizer = None  # not known here: no language notes for a remote model

    def probe_model_id(self, timeout: float = 3.0) -> str:
        """The model the server serves (GET /models), for picking the starting persona; '' when the server does
        not answer now (the page reports that on the first message)."""
        import httpx

        if self.model:
            return self.model
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            data = httpx.get(f"{self.base_url}/models", headers=headers, timeout=timeout).json().get("data") or []
            self.model_id = str(data[0].get("id", "")) if data else ""
        except (httpx.HTTPError, ValueError, AttributeError, TypeError):
            self.model_id = ""
        return self.model_id

    async def _model(self) -> str:
        if self.model is None:
            page = await self._client.models.list()
            if not page.data:
                raise BackendError(f"{self.base_url}/models lists no model")
            self.model = page.data[0].id
        return self.model

    async def stream(self, messages: list[dict[str, str]], settings: ChatSettings) -> AsyncIterator[ChatChunk]:
        import openai

        try:
            stream = await self._client.chat.completions.create(
                model=await self._model(), messages=cast(Any, messages), stream=True,
                stream_options={"include_usage": True}, **settings.to_openai_kwargs())
            finish: Optional[str] = None
            async for event in stream:
                if event.choices:
                    choice = event.choices[0]
                    finish = choice.finish_reason or finish
                    if choice.delta.content:
                        yield ChatChunk(choice.delta.content)
                if event.usage is not None:
                    yield ChatChunk("", finish or "stop", event.usage.prompt_tokens, event.usage.completion_tokens)
                    return
            yield ChatChunk("", finish or "stop")
        except openai.APIStatusError as exc:
            raise BackendError(f"server answered {exc.status_code}: {_error_message(exc)}") from None
        except openai.APIConnectionError as exc:
            raise BackendError(f"cannot reach {self.base_url}: {exc}") from None

    def close(self) -> None:
        pass


def _engine_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages with `image_url` parts (data: URLs) -> the engine's, each image decoded."""
    from ..serve.errors import APIError
    from ..serve.media import load_image_part

    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if p.get("type") == "image_url":
                    try:
                        image = load_image_part(p["image_url"]["url"], f"messages[{i}].content[{j}]", None)
                    except APIError as exc:
                        raise BackendError(str(exc)) from None
                    parts.append({"type": "image", "image": image})
                else:
                    parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(exc)
