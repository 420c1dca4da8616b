"""POST /v1/completions: raw prompts (strings or token ids, one or several), streaming and whole responses."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .errors import APIError, engine_failure
from .metrics import ServerMetrics
from .protocol import CompletionRequest
from .responses import (ChoiceState, completion_logprobs, echo_logprobs, new_id, now, run_until_disconnect, sse,
                        sse_body, sse_response, usage)
from ..engine.client import EngineClient
from .runner import Job, cache_salt, check_context, collect, merged, request_adapter, start


class Completion:
    """One completion call: choice index = prompt number * n + sample number (as OpenAI numbers them)."""

    def __init__(self, req: CompletionRequest, engine: EngineClient, metrics: ServerMetrics, model_name: str):
        self.req, self.engine, self.metrics, self.model = req, engine, metrics, model_name
        self.id = new_id("cmpl")
        self.created = now()
        self.n = req.n or 1
        self.prompts = req.prompts()
        self.prompt_ids: list[list[int]] = []  # as the engine tokenises them (for the context check and echo)
        # echo + logprobs: the prompt's tokens get logprobs too (lm-eval's loglikelihood requests)
        self.prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None

    def _jobs(self) -> list[Job]:
        """The engine requests; string prompts are tokenised here (as the engine does) to check the context."""
        skip = True if self.req.skip_special_tokens is None else self.req.skip_special_tokens
        tokenizer, max_tokens = self.engine.tokenizer, self.req.max_tokens or 16
        jobs = []
        for p, prompt in enumerate(self.prompts):
            if isinstance(prompt, list):
                tokenizer.check_ids(prompt, "prompt token id")
                ids = list(prompt)
            else:  # the engine tokenises it again (the prompt it gets stays the client's)
                ids = tokenizer.encode(prompt)
            self.prompt_ids.append(ids)
            check_context(len(ids), max_tokens, int(self.engine.session_len))
            for i in range(self.n):
                cfg = self.req.generation_config(max_tokens, self.req.logprobs, skip, i)
                cfg.prompt_logprobs = self.prompt_logprobs
                jobs.append(Job(p * self.n + i, prompt, cfg))
        return jobs

    def _echo(self, index: int) -> str:
        if not self.req.echo:
            return ""
        prompt = self.prompts[index // self.n]
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt, skip_special_tokens=False)

    def _prompt_tokens(self, states: dict[int, ChoiceState]) -> int:
        """Each prompt counted once, however many samples it has."""
        return sum(states[p * self.n].prompt_tokens for p in range(len(self.prompts)))

    async def respond(self, request: Request) -> Response:
        try:
            jobs = await asyncio.to_thread(self._jobs)
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt", code="invalid_value") from None
        streams = await start(self.engine, jobs, self.id, self.metrics, prompt_field="prompt",
                              salt=cache_salt(request.scope, self.req.cache_salt),
                              adapter=request_adapter(request.scope))
        if self.req.stream:
            return sse_response(self._stream(streams))
        return await run_until_disconnect(request, self._whole(streams), self.metrics)

    def _logprobs(self, state: ChoiceState, ids: list[int], lps: list, offset: int,
                  prompt: Optional[int] = None) -> Optional[dict[str, Any]]:
        """`prompt` (its number): its tokens first (echo), from the engine's prompt logprobs."""
        if self.req.logprobs is None:
            return None
        generated = completion_logprobs(self.engine.tokenizer, ids, lps, self.req.logprobs, offset)
        if prompt is None or self.prompt_logprobs is None or state.prompt_logprobs is None:
            return generated
        return echo_logprobs(self.engine.tokenizer, self.prompt_ids[prompt], state.prompt_logprobs,
                             self.req.logprobs, generated)

    async def _whole(self, streams: list) -> JSONResponse:
        states = await collect(streams)
        choices = []
        for index, state in sorted(states.items()):
            echo = self._echo(index)
            choices.append({"index": index, "text": echo + state.full_text, "finish_reason": state.finish_reason,
                            "logprobs": self._logprobs(state, state.token_ids, state.logprobs, len(echo),
                                                       index // self.n)})
        completion_tokens = sum(s.completion_tokens for s in states.values())
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(self._prompt_tokens(states), completion_tokens)}
        return JSONResponse(body)

    def _chunk(self, index: int, text: str, finish: Optional[str] = None,
               logprobs: Optional[dict] = None) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                                "model": self.model,
                                "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                             "finish_reason": finish}]}
        if self.req.include_usage:
            body["usage"] = None
        return sse(body)

    def _stream(self, streams: list) -> AsyncIterator[str]:
        states = {s.index: ChoiceState() for s in streams}

        def tail() -> list[str]:
            if not self.req.include_usage:
                return []
            completion_tokens = sum(s.completion_tokens for s in states.values())
            return [sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                         "choices": [], "usage": usage(self._prompt_tokens(states), completion_tokens)})]

        return sse_body(self._events(streams, states), tail, self.metrics)

    async def _events(self, streams: list, states: dict[int, ChoiceState]) -> AsyncIterator[str]:
        offsets = {index: 0 for index in states}
        firsts = {s.index: s.first for s in streams}  # primed: the first output (prompt logprobs) is already here
        for index in states:
            echo = self._echo(index)
            if echo:
                offsets[index] = len(echo)
                lps = None
                first = firsts.get(index)
                if self.prompt_logprobs is not None and first is not None and first.prompt_logprobs is not None:
                    lps = echo_logprobs(self.engine.tokenizer, self.prompt_ids[index // self.n],
                                        first.prompt_logprobs, self.req.logprobs or 0, None)
                yield self._chunk(index, echo, logprobs=lps)
        async for index, out in merged(streams):
            state = states[index]
            state.add(out)
            text = out.text or ""
            lps = self._logprobs(state, list(out.token_ids or []), list(out.logprobs or []), offsets[index])
            offsets[index] += len(text)
            if out.finish_reason == "error":
                yield self._chunk(index, text, "error")
                yield sse(engine_failure(state.error or "unknown error").body())
            elif text or lps or out.finish_reason:
                yield self._chunk(index, text, out.finish_reason, lps)
