"""AsyncEngine: an LLMEngine driven by one background thread, streaming to asyncio (and to plain threads).

Callers never touch the LLMEngine: `generate` validates and tokenises the prompt in the caller's thread (so a bad
prompt raises right away), then hands the request to the engine thread through a command list; the thread runs steps
while there is work and sends each output to the request's sink (`loop.call_soon_threadsafe` for asyncio streams,
a `queue.Queue` for the synchronous pipeline). Leaving a stream early sends an abort, which frees the KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any, AsyncGenerator, Callable, Generator, Optional, Union

from ..config import EngineConfig, GenerationConfig
from .client import Prompt
from .llm_engine import LLMEngine
from .outputs import StreamOutput

__all__ = ["AsyncEngine", "LLMEngine", "StreamOutput"]

log = logging.getLogger(__name__)
Sink = Callable[[StreamOutput], None]


class AsyncEngine:
    engine: LLMEngine  # built on, and used only by, the engine thread (its counters are read from others)

    def __init__(self, model_path: Union[str, Path, None] = None, config: Optional[EngineConfig] = None,
                 adapters: Optional[dict[str, Union[str, Path]]] = None, **options: Any):
        if config is None:
            config = EngineConfig.from_dict(options)
        elif options:
            raise ValueError(f"{sorted(options)[0]}: pass engine options either in config or as keywords, not both")
        self._cv = threading.Condition()
        self._commands: list[tuple[str, Any]] = []
        self._sinks: dict[str, Sink] = {}
        self._closed = False
        self._start_thread(model_path, config, adapters)
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self.spec = self.engine.spec
        self.model_name = self.engine.model_name
        self.model_path = self.engine.model_path
        self.session_len = self.engine.session_len

    def _start_thread(self, model_path: Union[str, Path, None], config: EngineConfig,
                      adapters: Optional[dict[str, Union[str, Path]]] = None) -> None:
        """Start the engine thread and build the LLMEngine on it; its errors are raised here.

        All torch work (loading, packing, every step) stays on that one thread: when two threads run OpenMP
        regions on a machine with few cores, libgomp throttles its spin-waits and every parallel region then pays
        a futex wake-up (measured on 2 cores: 41 ms instead of 23 ms per decode step).
        """
        failed: list[BaseException] = []
        ready = threading.Event()

        def run() -> None:
            try:
                self.engine = LLMEngine(model_path, config, adapters)
            except BaseException as exc:  # re-raised in the constructor's thread
                failed.append(exc)
                return
            finally:
                ready.set()
            try:
                self._run()
            except BaseException as exc:  # a bug outside a step: say so to every waiting request, never hang them
                log.exception("the engine thread died")
                self._died(f"the engine thread died: {type(exc).__name__}: {exc}")

        self._thread = threading.Thread(target=run, name="puyu-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    # ---- public API -----------------------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, gen_config: Optional[GenerationConfig] = None,
                 request_id: Optional[str] = None) -> AsyncGenerator[StreamOutput, None]:
        """Stream of `StreamOutput` deltas; raises (PromptTooLongError, ValueError) before anything is yielded."""
        ids, gen_config, request_id = self._prepare(prompt, gen_config, request_id)
        return self._stream(ids, gen_config, request_id)

    def stream_sync(self, prompt: Prompt, gen_config: Optional[GenerationConfig] = None,
                    request_id: Optional[str] = None) -> Generator[StreamOutput, None, None]:
        """The same stream for synchronous callers (the pipeline); closing the iterator aborts the request."""
        ids, gen_config, request_id = self._prepare(prompt, gen_config, request_id)
        return self._stream_sync(ids, gen_config, request_id)

    def abort(self, request_id: str) -> None:
        self._submit("abort", request_id)

    def is_alive(self) -> bool:
        """True while the engine thread runs and takes requests (False after close() or a crash)."""
        return self._thread.is_alive() and not self._closed

    @property
    def adapters(self) -> dict[str, Path]:
        """The loaded LoRA adapters: name -> directory (a copy)."""
        return dict(self.engine.adapters)

    def load_adapter(self, name: str, path: Union[str, Path]) -> Future:
        """Load a PEFT LoRA adapter on the engine thread, between steps; the future's exception, if any, is an
        AdapterError or ValueError naming the file and field (or the name)."""
        return self._adapter_command("load_adapter", (name, path))

    def unload_adapter(self, name: str) -> Future:
        """Drop a loaded adapter on the engine thread (refused, in the future, while a request uses it)."""
        return self._adapter_command("unload_adapter", (name,))

    def _adapter_command(self, kind: str, args: tuple) -> Future:
        done: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._commands.append((kind, (args, done)))
            self._cv.notify()
        return done

    def stats(self) -> dict[str, Any]:
        """A snapshot of the engine's counters (read without stopping the engine thread)."""
        return self.engine.stats()

    def close(self) -> None:
        """Stop the engine thread. Every request it was given ends with 'abort': those running and those still
        waiting in the command list; `generate` after (or racing) close raises RuntimeError."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)

    def __enter__(self) -> "AsyncEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- request plumbing -----------------------------------------------------------------------------------------
    def _prepare(self, prompt: Prompt, gen_config: Optional[GenerationConfig],
                 request_id: Optional[str]) -> tuple[tuple[list[int], list], GenerationConfig, str]:
        """((token ids, image spans), config, request id): images are decoded and preprocessed here, encoded by the
        vision tower on the engine thread."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        gen_config = gen_config if gen_config is not None else GenerationConfig()
        if not isinstance(gen_config, GenerationConfig):
            raise ValueError(f"gen_config: must be a GenerationConfig, got {type(gen_config).__name__}")
        gen_config.validate()
        self.engine.check_request(gen_config)
        ids = self.engine.prepare_request(prompt)
        return ids, gen_config, request_id or uuid.uuid4().hex

    def _register(self, request_id: str, ids: tuple[list[int], list], gen_config: GenerationConfig,
                  sink: Sink) -> None:
        with self._cv:
            # checked again under the lock: a close() (or a crash) since _prepare would leave nobody to answer
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("the engine is closed")
            if request_id in self._sinks:
                raise ValueError(f"request_id: {request_id!r} is already running")
            self._sinks[request_id] = sink
            self._commands.append(("add", (request_id, ids, gen_config)))
            self._cv.notify()

    async def _stream(self, ids: tuple[list[int], list], gen_config: GenerationConfig,
                      request_id: str) -> AsyncGenerator[StreamOutput, None]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[StreamOutput] = asyncio.Queue()

        def sink(out: StreamOutput) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, out)
            except RuntimeError:  # the caller's loop is gone: nobody listens any more
                self.abort(request_id)

        self._register(request_id, ids, gen_config, sink)
        finished = False
        try:
            while True:
                out = await q.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def _stream_sync(self, ids: tuple[list[int], list], gen_config: GenerationConfig,
                     request_id: str) -> Generator[StreamOutput, None, None]:
        q: queue.Queue[StreamOutput] = queue.Queue()
        self._register(request_id, ids, gen_config, q.put)
        finished = False
        try:
            while True:
                out = q.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def _submit(self, kind: str, payload: Any) -> None:
        with self._cv:
            self._commands.append((kind, payload))
            self._cv.notify()

    # ---- the engine thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._commands and not self.engine.has_work() and not self._closed:
                    self._cv.wait()
                if self._closed:
                    outs = [o for rid in list(self.engine.requests) if (o := self.engine.abort(rid)) is not None]
                    outs += [StreamOutput(finish_reason="abort", request_id=payload[0])
                             for kind, payload in self._commands if kind == "add"]
                    for kind, payload in self._commands:
                        if kind.endswith("_adapter"):
                            payload[1].set_exception(RuntimeError("the engine is closed"))
                    self._commands = []
                    self._deliver(outs)
                    return
                commands, self._commands = self._commands, []
                outs = [o for cmd in commands if (o := self._apply(cmd)) is not None]
            self._deliver(outs)
            if self.engine.has_work():
                self._deliver(self._step())

    def _died(self, error: str) -> None:
        with self._cv:
            self._closed = True
            sinks, self._sinks, self._commands = self._sinks, {}, []
        for request_id, sink in sinks.items():
            sink(StreamOutput(finish_reason="error", error=error, request_id=request_id))

    def _apply(self, cmd: tuple[str, Any]) -> Optional[StreamOutput]:
        kind, payload = cmd
        if kind == "abort":
            return self.engine.abort(payload)
        if kind in ("load_adapter", "unload_adapter"):
            args, done = payload
            try:
                getattr(self.engine, kind)(*args)
            except Exception as exc:  # the caller gets it; the engine goes on
                done.set_exception(exc)
            else:
                done.set_result(None)
            return None
        request_id, (ids, images), gen_config = payload
        try:
            self.engine.add_request(request_id, ids, gen_config, images)
        except Exception as exc:  # the request fails, the engine goes on
            return StreamOutput(finish_reason="error", error=f"{type(exc).__name__}: {exc}", request_id=request_id)
        return None

    def _step(self) -> list[StreamOutput]:
        try:
            return self.engine.step()
        except Exception as exc:  # a bug or an out-of-memory: end the requests instead of hanging them
            log.exception("engine step failed")
            return self.engine.fail_all(f"{type(exc).__name__}: {exc}")

    def _deliver(self, outs: list[StreamOutput]) -> None:
        for out in outs:
            with self._cv:
                sink = self._sinks.get(out.request_id)
                if out.finish_reason is not None:
                    self._sinks.pop(out.request_id, None)
            if sink is not None:
                sink(out)
