"""POST /v1/chat/completions: prompt rendering, tool calls, streaming and whole responses."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..chat_templates import INTERNLM2_CHAT_TEMPLATE
from ..tokenizer import render_chat
from .errors import bad_request, engine_failure
from .media import has_vision, load_image_part, no_vision
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, ImagePart
from .responses import (ChoiceState, chat_logprobs, new_id, now, run_until_disconnect, sse, sse_body, sse_response,
                        usage)
from ..engine.client import EngineClient
from .runner import Job, cache_salt, check_context, collect, merged, request_adapter, start
from .tools import ParsedReply, ToolStreamParser, forced_prefix, parse_reply, strip_end_markers, to_internlm2_messages


def _needs_protocol_template(req: ChatCompletionRequest) -> bool:
    return req.uses_tools() or any(m.role == "tool" or getattr(m, "tool_calls", None) for m in req.messages)


def render_prompt(tokenizer: Any, req: ChatCompletionRequest) -> tuple[list[int], str]:
    """Token ids of the prompt, and the text forced at the start of the reply (`tool_choice` required / named).

    Plain chats use the checkpoint's own template. Tool turns need `name=` on messages; a checkpoint template that
    ignores names would drop the tool list, so those conversations use the InternLM2 template instead."""
    tools = req.tools if req.uses_tools() else None
    messages = to_internlm2_messages(req.messages, tools)
    template = tokenizer.chat_template
    if _needs_protocol_template(req) and "name" not in template:
        template = INTERNLM2_CHAT_TEMPLATE
    text = render_chat(template, messages, True, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    prefix = forced_prefix(req.tool_choice) if tools else ""
    return tokenizer.encode(text + prefix, add_special_tokens=False), prefix


def image_parts(req: ChatCompletionRequest) -> list[tuple[int, int, ImagePart]]:
    """(message index, part index, part) of every image part of the request."""
    found = []
    for i, m in enumerate(req.messages):
        content = getattr(m, "content", None)
        if isinstance(content, list):
            found += [(i, j, p) for j, p in enumerate(content) if isinstance(p, ImagePart)]
    return found


def image_prompt(req: ChatCompletionRequest, allowed: Optional[Any]) -> list[dict]:
    """Engine chat messages for a request with images: the text of each message as `render_prompt` has it, and in
    messages with images the parts in order, each image decoded (a bad one is a 400 naming its part)."""
    if req.uses_tools():
        raise bad_request("tools: not supported together with image content", "tools")
    out = []
    for i, m in enumerate(req.messages):
        msg: dict[str, Any] = to_internlm2_messages([m], None)[0]
        content = getattr(m, "content", None)
        if isinstance(content, list) and any(isinstance(p, ImagePart) for p in content):
            msg["content"] = [
                {"type": "image", "image": load_image_part(p.image_url.url, f"messages[{i}].content[{j}].image_url",
                                                           allowed)}
                if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for j, p in enumerate(content)]
        out.append(msg)
    return out


class ChatCompletion:
    """One chat completion call."""

    def __init__(self, req: ChatCompletionRequest, engine: EngineClient, metrics: ServerMetrics, model_name: str):
        self.req, self.engine, self.metrics, self.model = req, engine, metrics, model_name
        self.id = new_id("chatcmpl")
        self.created = now()
        self.tools = req.uses_tools()
        self.n = req.n or 1

    def _jobs(self, prompt: Any) -> list[Job]:
        """`prompt`: token ids, or chat messages with images (whose length the engine knows once they are spliced:
        without max_tokens such a reply runs to the end of the session)."""
        session_len = int(self.engine.session_len)
        prompt_len = len(prompt) if prompt and isinstance(prompt[0], int) else 0
        requested = self.req.requested_max_tokens()
        if requested is not None and prompt_len:
            field = "max_completion_tokens" if self.req.max_completion_tokens is not None else "max_tokens"
            check_context(prompt_len, requested, session_len, field)
        max_new = requested or max(1, session_len - prompt_len)
        skip = False if self.tools else (True if self.req.skip_special_tokens is None else self.req.skip_special_tokens)
        return [Job(i, prompt, self.req.generation_config(max_new, self.req.engine_logprobs(), skip, i))
                for i in range(self.n)]

    async def respond(self, request: Request) -> Response:
        # rendering and tokenising a long conversation takes a while: off the event loop, so /health and the other
        # requests' streams go on meanwhile
        images = image_parts(self.req)
        if images and not has_vision(self.engine):
            i, j, _ = images[0]
            raise no_vision(self.model, f"messages[{i}].content[{j}]")
        prompt: Any
        if images:  # decoding images takes a while too
            allowed = getattr(request.app.state, "allowed_local_media_path", None)
            prompt, self.prefix = await asyncio.to_thread(image_prompt, self.req, allowed), ""
        else:
            prompt, self.prefix = await asyncio.to_thread(render_prompt, self.engine.tokenizer, self.req)
        streams = await start(self.engine, self._jobs(prompt), self.id, self.metrics,
                              salt=cache_salt(request.scope, self.req.cache_salt),
                              adapter=request_adapter(request.scope))
        if self.req.stream:
            return sse_response(self._stream(streams))
        return await run_until_disconnect(request, self._whole(streams), self.metrics)

    def _parse(self, state: ChoiceState) -> ParsedReply:
        text = state.full_text
        if not self.tools:
            return ParsedReply(content=text)
        parsed = parse_reply(self.prefix + text)
        if self.req.parallel_tool_calls is False:
            parsed.tool_calls = parsed.tool_calls[:1]
        return parsed

    def _finish(self, state: ChoiceState, parsed: ParsedReply) -> Optional[str]:
        if state.finish_reason == "stop" and parsed.tool_calls:
            return "tool_calls"
        return state.finish_reason

    async def _whole(self, streams: list) -> JSONResponse:
        states = await collect(streams)
        choices = []
        for index, state in sorted(states.items()):
            parsed = self._parse(state)
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
            if parsed.tool_calls:
                message["tool_calls"] = parsed.tool_calls
            logprobs = None
            if self.req.logprobs:
                logprobs = {"content": chat_logprobs(self.engine.tokenizer, state.token_ids, state.logprobs,
                                                     self.req.top_logprobs or 0)}
            choices.append({"index": index, "message": message, "logprobs": logprobs,
                            "finish_reason": self._finish(state, parsed)})
        prompt_tokens = next(iter(states.values())).prompt_tokens
        body = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(prompt_tokens, sum(s.completion_tokens for s in states.values()))}
        return JSONResponse(body)

    def _chunk(self, choices: list[dict[str, Any]], usage_: Optional[dict] = None) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "choices": choices}
        if self.req.include_usage:
            body["usage"] = usage_
        return sse(body)

    def _delta(self, index: int, delta: dict[str, Any], finish: Optional[str] = None,
               logprobs: Optional[list] = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish}

    def _stream(self, streams: list) -> AsyncIterator[str]:
        states = {s.index: ChoiceState() for s in streams}

        def tail() -> list[str]:
            if not self.req.include_usage:
                return []
            prompt_tokens = next(iter(states.values())).prompt_tokens
            return [self._chunk([], usage(prompt_tokens, sum(s.completion_tokens for s in states.values())))]

        return sse_body(self._events(streams, states), tail, self.metrics)

    async def _events(self, streams: list, states: dict[int, ChoiceState]) -> AsyncIterator[str]:
        parsers = {s.index: ToolStreamParser() for s in streams}
        for p in parsers.values():
            p.feed(self.prefix)
        for index in states:
            yield self._chunk([self._delta(index, {"role": "assistant", "content": ""})])
        async for index, out in merged(streams):
            state = states[index]
            state.add(out)
            for chunk in self._stream_step(index, out, state, parsers[index]):
                yield chunk

    def _stream_step(self, index: int, out: Any, state: ChoiceState, parser: ToolStreamParser) -> list[str]:
        chunks = []
        text = out.text or ""
        if not self.tools:
            content = text
        else:
            content = parser.feed(text)
        logprobs = None
        if self.req.logprobs and out.token_ids:
            logprobs = chat_logprobs(self.engine.tokenizer, list(out.token_ids), list(out.logprobs or []),
                                     self.req.top_logprobs or 0)
        if content or logprobs:
            chunks.append(self._chunk([self._delta(index, {"content": content}, logprobs=logprobs)]))
        if out.finish_reason is None:
            return chunks
        if out.finish_reason == "error":
            err = engine_failure(state.error or "unknown error")
            chunks.append(self._chunk([self._delta(index, {}, "error")]))
            chunks.append(sse(err.body()))
            return chunks
        parsed = parser.finish() if self.tools else ParsedReply(content=None)
        if self.req.parallel_tool_calls is False:
            parsed.tool_calls = parsed.tool_calls[:1]
        delta: dict[str, Any] = {}
        if parsed.content:
            delta["content"] = strip_end_markers(parsed.content)
        if parsed.tool_calls:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(parsed.tool_calls)]
        if delta:
            chunks.append(self._chunk([self._delta(index, delta)]))
        chunks.append(self._chunk([self._delta(index, {}, self._finish(state, parsed))]))
        return chunks
