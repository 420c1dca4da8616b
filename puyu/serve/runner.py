"""Running the engine requests of one API call: `n` choices (and several prompts), merged into one stream.

Each engine request is primed (its first output awaited) before the HTTP response starts, so a prompt that is too
long or an option the engine rejects becomes a 400 instead of a broken stream. Closing the merged stream (client gone,
task cancelled) closes every engine iterator at once, which aborts the requests and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Mapping, Optional, Sequence

import anyio

from ..config import ConfigError, GenerationConfig
from ..engine.client import EngineClient
from ..engine.outputs import StreamOutput
from .errors import APIError, bad_request, engine_failure
from .metrics import RequestTimer, ServerMetrics
from .middleware import tenant
from .responses import ChoiceState


@dataclass
class Job:
    """One engine request: which choice it answers, its prompt and its options."""

    index: int
    prompt: Any
    gen_config: GenerationConfig


class ChoiceStream:
    """An engine iterator whose first output has already arrived."""

    def __init__(self, index: int, iterator: AsyncGenerator[StreamOutput, None], first: StreamOutput,
                 timer: RequestTimer):
        self.index = index
        self.iterator = iterator
        self.first: Optional[StreamOutput] = first
        self.timer = timer
        self.done = False

    async def outputs(self) -> AsyncIterator[StreamOutput]:
        while True:
            if self.first is not None:
                out, self.first = self.first, None
            else:
                try:
                    out = await self.iterator.__anext__()
                except StopAsyncIteration:
                    self.done = True
                    return
            self.timer.tokens_arrived(time.perf_counter(), len(out.token_ids or []))
            if out.finish_reason is not None:
                self.done = True
                self.timer.done(time.perf_counter(), int(out.input_token_len or 0))
            yield out
            if self.done:
                return

    async def close(self) -> None:
        """Abort the engine request unless it finished (shielded: it runs while the caller is being cancelled)."""
        with anyio.CancelScope(shield=True):
            await self.iterator.aclose()


def engine_error(exc: BaseException, prompt_field: str = "messages") -> APIError:
    """An exception raised while starting a request, as the answer to the client."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RuntimeError) and str(exc) == "the engine is closed":
        return APIError(503, "the engine has stopped; the server cannot take requests", code="engine_stopped")
    if isinstance(exc, ConfigError):
        return bad_request(str(exc), exc.field)
    if isinstance(exc, ValueError):  # PromptTooLongError is one: its message holds both lengths
        code = "context_length_exceeded" if type(exc).__name__ == "PromptTooLongError" else "invalid_value"
        return bad_request(str(exc), prompt_field if code == "context_length_exceeded" else None, code)
    return engine_failure(f"{type(exc).__name__}: {exc}")


def check_context(prompt_len: int, max_tokens: int, session_len: int, field: str = "max_tokens") -> None:
    """Prompt + requested completion must fit the context (as vLLM: a 400 naming both numbers, not a silent cut).
    A prompt longer than the context alone is the engine's PromptTooLongError."""
    if prompt_len <= session_len < prompt_len + max_tokens:
        raise APIError(400, f"this model's context is {session_len} tokens, but {prompt_len + max_tokens} were "
                            f"requested: {prompt_len} in the prompt and {max_tokens} for the completion ({field}); "
                            f"lower {field} to at most {session_len - prompt_len}",
                       param=field, code="context_length_exceeded")


def cache_salt(scope: Mapping[str, Any], requested: Optional[str]) -> Optional[str]:
    """The prefix-cache namespace of a request: its API key's tenant (under --api-keys, so one key's cached prompts
    can neither be reused nor timed by another), refined by the request's own `cache_salt`."""
    who = tenant(scope)
    if who is None:
        return requested
    return who if requested is None else f"{who}/{requested}"


def request_adapter(scope: Mapping[str, Any]) -> Optional[str]:
    """The LoRA adapter the request's `model` selected (api_server's `answer` put it in the scope; None: base)."""
    from .lora_api import SCOPE_KEY

    return scope.get(SCOPE_KEY)


async def start(engine: EngineClient, jobs: Sequence[Job], request_id: str, metrics: ServerMetrics,
                prompt_field: str = "messages", salt: Optional[str] = None,
                adapter: Optional[str] = None) -> list[ChoiceStream]:
    """Submit every job and wait for its first output; on any failure abort the others and raise APIError.
    `salt`: the prefix-cache namespace given to every job (see `cache_salt`); `adapter`: the LoRA adapter."""
    if salt is not None or adapter is not None:
        jobs = [dataclasses.replace(job, gen_config=dataclasses.replace(job.gen_config, cache_salt=salt,
                                                                        adapter_name=adapter)) for job in jobs]
    started: list[ChoiceStream] = []
    t0 = time.perf_counter()
    try:
        for job in jobs:
            # the engine tokenises a string prompt in `generate`: off the event loop
            it = await asyncio.to_thread(engine.generate, job.prompt, job.gen_config,
                                         request_id=f"{request_id}-{job.index}")
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                raise APIError(500, "the engine ended the request without output", code="engine_error") from None
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await it.aclose()
                raise
            started.append(ChoiceStream(job.index, it, first, RequestTimer(metrics, t0)))
    except BaseException as exc:
        for s in started:
            await s.close()
        if isinstance(exc, Exception):
            raise engine_error(exc, prompt_field) from exc
        raise
    return started


async def merged(streams: list[ChoiceStream]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, output) from all streams as they come; closing this closes them all."""
    if len(streams) == 1:
        s = streams[0]
        try:
            async for out in s.outputs():
                yield s.index, out
        finally:
            await s.close()
        return
    queue: asyncio.Queue = asyncio.Queue()
    sentinel = object()

    async def pump(s: ChoiceStream) -> None:
        try:
            async for out in s.outputs():
                await queue.put((s.index, out))
        except Exception as exc:  # one failing choice must not hang the merge
            await queue.put((s.index, exc))
        finally:
            await queue.put((s.index, sentinel))

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if item is sentinel:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            yield index, item
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait(tasks)  # an iterator cannot be closed while its pump is still inside it
        for s in streams:
            await s.close()


async def collect(streams: list[ChoiceStream]) -> dict[int, ChoiceState]:
    """Run the streams to the end (for a whole, non-streamed answer); an engine error fails the call with a 500."""
    states = {s.index: ChoiceState() for s in streams}
    async for index, out in merged(streams):
        states[index].add(out)
    for state in states.values():
        if state.finish_reason == "error":
            raise engine_failure(state.error or "unknown error")
    return states
