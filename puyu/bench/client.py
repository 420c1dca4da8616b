"""An async OpenAI-compatible streaming client (httpx) that timestamps every content chunk and counts its tokens.

Nothing here is specific to a server: it sends the OpenAI chat or completions request with `stream: true` and
`stream_options.include_usage` (both switchable), and reads server-sent events. Tokens per chunk come from
usage deltas when the server streams cumulative usage, else from tokenising the delta with the target's
tokenizer; a request's output token count is the final `usage.completion_tokens` when present, else the
tokenised length of the whole generated text. A stream that finishes (finish_reason or usage) without any visible
text is a success with an empty output, its TTFT at the first chunk with choices (as vLLM counts it); the summary
reports such requests as `empty_outputs`. A request whose connection the server had already closed (a stale
keep-alive connection: nothing was received) is sent again on a new connection, so failures are the server's.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx

from .datasets import SampleRequest
from .records import Chunk, RequestRecord
from .tokenizer import count_tokens

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = "chat"
    api_key: Optional[str] = None
    ignore_eos: bool = True  # force the output length (vLLM, SGLang, LMDeploy, llama.cpp, puyu accept it)
    include_usage: bool = True
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 6 * 3600.0

    def validate(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint: must be chat or completions, got {self.endpoint!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url: must start with http:// or https://, got {self.base_url!r}")

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        base = base[:-3] if base.endswith("/v1") else base
        return base + ENDPOINTS[self.endpoint]


def build_body(cfg: ClientConfig, sample: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": sample.output_len, "stream": True,
                            "temperature": cfg.temperature}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": sample.prompt}]
    else:
        body["prompt"] = sample.prompt
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


def new_http_client(cfg: ClientConfig) -> httpx.AsyncClient:
    """No connection limit: a request waiting for a pooled connection would hide client-side queueing in TTFT."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=60.0), limits=limits, headers=headers)


def _content(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


class _StreamState:
    """Accumulates one response's chunks, text and usage as events arrive."""

    def __init__(self, record: RequestRecord, tokenizer: Any):
        self.record, self.tokenizer = record, tokenizer
        self.parts: list[str] = []
        self.usage_cum: Optional[int] = None
        self.final_usage: Optional[dict[str, Any]] = None
        self.tokenised = False  # some chunk's count came from tokenising its delta
        self.t_first_choices: Optional[float] = None  # the first event with choices, content or not

    def feed(self, event: dict[str, Any], t: float) -> None:
        if event.get("error"):
            raise RuntimeError(f"server error in stream: {json.dumps(event['error'])[:500]}")
        usage = event.get("usage") or None
        if event.get("choices") and self.t_first_choices is None:
            self.t_first_choices = t
        for choice in event.get("choices") or []:
            text = _content(choice)
            if choice.get("finish_reason"):
                self.record.finish_reason = choice["finish_reason"]
            if text:
                self.parts.append(text)
                self.record.chunks.append(Chunk(t, self._tokens_in(text, usage)))
        if usage:
            self.final_usage = usage
            self.usage_cum = usage.get("completion_tokens", self.usage_cum)

    def _tokens_in(self, text: str, usage: Optional[dict[str, Any]]) -> int:
        if usage and usage.get("completion_tokens") is not None:
            n = usage["completion_tokens"] - (self.usage_cum or 0)
            if n >= 1:
                return n
        self.tokenised = True
        if getattr(self.tokenizer, "count_later", False):  # a server's tokenizer: shares of the final usage
            return 1
        return max(1, count_tokens(self.tokenizer, text))

    def finish(self) -> None:
        r = self.record
        r.generated_text = "".join(self.parts)
        if self.final_usage and self.final_usage.get("completion_tokens") is not None:
            r.output_tokens = int(self.final_usage["completion_tokens"])
            r.server_prompt_tokens = self.final_usage.get("prompt_tokens")
            if self.tokenised and r.chunks:
                rescale_chunk_tokens(r.chunks, r.output_tokens)
        else:
            r.output_tokens = count_tokens(self.tokenizer, r.generated_text)
        if not r.chunks:
            if self.t_first_choices is None or not (r.finish_reason or self.final_usage):
                raise RuntimeError("the stream ended without any content or finish_reason")
            r.chunks.append(Chunk(self.t_first_choices, r.output_tokens))  # an empty output, counted apart
        r.success = True


def rescale_chunk_tokens(chunks: list[Chunk], total: int) -> None:
    """Make tokenised per-chunk counts sum to the server's total (re-tokenising deltas over- or under-counts,
    e.g. on partial UTF-8): proportional shares, largest remainders, at least 1 per chunk while tokens last."""
    if total <= 0 or sum(c.tokens for c in chunks) == total:
        return
    if total <= len(chunks):
        for i, c in enumerate(chunks):
            c.tokens = 1 if i < total else 0
        return
    spare = total - len(chunks)  # one token per chunk first, the rest in proportion to the tokenised counts
    weights = [max(c.tokens - 1, 0) for c in chunks]
    if sum(weights) == 0:
        weights = [1] * len(chunks)
    shares = [spare * w / sum(weights) for w in weights]
    extra = [int(s) for s in shares]
    order = sorted(range(len(chunks)), key=lambda i: shares[i] - extra[i], reverse=True)
    for i in order[:spare - sum(extra)]:
        extra[i] += 1
    for c, e in zip(chunks, extra):
        c.tokens = 1 + e


def _parse_sse_line(line: str) -> Optional[dict[str, Any]]:
    """The JSON of a `data:` line; None for comments, blanks, other fields and `[DONE]`."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    return json.loads(payload)


# a pooled keep-alive connection the server had closed fails like this before any byte of the response
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.ConnectError)
SEND_ATTEMPTS = 3


async def send_request(http: httpx.AsyncClient, cfg: ClientConfig, sample: SampleRequest, record: RequestRecord,
                       tokenizer: Any) -> RequestRecord:
    """Stream one request; fills t_send, chunks, t_end, token counts, status. Errors are kept, never raised.
    Sent again (t_send reset) when the connection failed before anything of the response arrived."""
    body = build_body(cfg, sample)
    for attempt in range(SEND_ATTEMPTS):
        state = _StreamState(record, tokenizer)
        record.t_send = time.perf_counter()
        received = False
        try:
            async with http.stream("POST", cfg.url, json=body) as resp:
                received = True
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode("utf-8", "replace")[:500]
                    raise RuntimeError(f"HTTP {resp.status_code}: {detail}")
                async for line in resp.aiter_lines():
                    event = _parse_sse_line(line)
                    if event is not None:
                        state.feed(event, time.perf_counter())
            state.finish()
            record.error = ""
        except STALE_CONNECTION as exc:
            if not received and attempt + 1 < SEND_ATTEMPTS:
                continue
            _failed(record, exc)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded with its message
            _failed(record, exc)
        break
    record.t_end = time.perf_counter()
    return record


def _failed(record: RequestRecord, exc: BaseException) -> None:
    record.success = False
    record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
