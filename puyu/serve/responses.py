"""Pieces of OpenAI response bodies shared by the chat and completion endpoints: SSE framing, usage, logprobs."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.outputs import StreamOutput
from .errors import engine_failure

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def sse_response(body: Any) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    prompt_logprobs: Optional[list[dict[int, float]]] = None  # prompt tokens 1.. (echo with logprobs)

    def add(self, out: StreamOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text.append(out.text or "")
        self.token_ids.extend(out.token_ids or [])
        self.logprobs.extend(out.logprobs or [])
        self.completion_tokens = int(out.generate_token_len or 0) or len(self.token_ids)
        self.prompt_tokens = int(out.input_token_len or 0)
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.error = out.error

    @property
    def full_text(self) -> str:
        return "".join(self.text)


def token_str(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([int(token_id)], skip_special_tokens=False)


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float]],
                  top: int) -> list[dict[str, Any]]:
    """OpenAI chat `logprobs.content` entries for these tokens."""
    entries = []
    for tid, lp in zip(token_ids, logprobs):
        chosen = float(lp.get(tid, next(iter(lp.values()), 0.0))) if lp else 0.0
        text = token_str(tokenizer, tid)
        alts = sorted(((int(k), float(v)) for k, v in (lp or {}).items()), key=lambda kv: -kv[1])[:top]
        entries.append({"token": text, "logprob": chosen, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t := token_str(tokenizer, k)), "logprob": v,
                                          "bytes": list(t.encode())} for k, v in alts]})
    return entries


def completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float]], top: int,
                        offset: int) -> dict[str, Any]:
    """OpenAI completion `logprobs` (tokens, token_logprobs, top_logprobs, text_offset) for these tokens."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in zip(token_ids, logprobs):
        text = token_str(tokenizer, tid)
        tokens.append(text)
        token_lps.append(float(lp.get(tid, 0.0)) if lp else 0.0)
        alts = sorted(((int(k), float(v)) for k, v in (lp or {}).items()), key=lambda kv: -kv[1])[:top]
        best: dict[str, float] = {}
        for k, v in alts:  # tokens that decode to the same string (partial UTF-8) keep the higher logprob
            best.setdefault(token_str(tokenizer, k), v)
        tops.append(best if top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(tokenizer: Any, prompt_ids: list[int], logprobs: list[dict[int, float]], top: int,
                  generated: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Completion `logprobs` with the prompt's tokens first (the first one has no logprob: nothing predicts it, as in
    OpenAI's echo), then the generated ones (`generated`, offsets already after the echoed text)."""
    part = completion_logprobs(tokenizer, prompt_ids[1:], logprobs, top, len(token_str(tokenizer, prompt_ids[0])))
    first = token_str(tokenizer, prompt_ids[0])
    out = {"tokens": [first] + part["tokens"], "token_logprobs": [None] + part["token_logprobs"],
           "top_logprobs": [None] + part["top_logprobs"], "text_offset": [0] + part["text_offset"]}
    for key in out:
        out[key] += (generated or {}).get(key, [])
    return out


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone (only call after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before a non-streaming answer was ready."""


async def run_until_disconnect(request: Request, work: Any, metrics: Any = None) -> Any:
    """Await `work` unless the client leaves first; then cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled() or task not in done:
        if metrics is not None:
            metrics.aborted.inc()
        raise ClientGone()
    return task.result()


async def sse_body(events: AsyncIterator[str], tail: Callable[[], list[str]], metrics: Any) -> AsyncIterator[str]:
    """A response stream: `events`, then `tail()` (the usage chunk) and [DONE]. A client that leaves is counted and
    its engine requests closed at once; an engine failure ends this stream with an error event, not the server."""
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        metrics.aborted.inc()
        raise
    except Exception as exc:
        yield sse(engine_failure(f"{type(exc).__name__}: {exc}").body())
        yield SSE_DONE
        return
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()  # type: ignore[attr-defined]
    for event in tail():
        yield event
    yield SSE_DONE
