"""Lagent models backed by puyu: the in-process engine, or any OpenAI-compatible server (ours or LMDeploy's).

Both render the InternLM2 prompt themselves (Lagent's meta template keeps the `name=<|interpreter|>` turns that a
checkpoint's own chat template may drop) and stream text with special tokens kept; `StreamingModel` turns the
deltas into Lagent's (status, cumulative text) stream and cuts at `<|im_end|>`.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
from typing import Any, Iterator, Optional

import httpx

from ..config import EngineConfig, GenerationConfig
from ..engine.client import EngineClient
from .llm_base import IM_END, StreamingModel

_DONE = object()


def _sampling(params: dict) -> dict:
    temperature = float(params.get("temperature") or 0.0)
    return {"max_new_tokens": int(params.get("max_new_tokens", 512)), "temperature": temperature,
            "top_p": float(params.get("top_p") or 1.0), "top_k": int(params.get("top_k") or 0),
            "repetition_penalty": float(params.get("repetition_penalty") or 1.0)}


class EngineModel(StreamingModel):
    """Generation on a `puyu.engine.AsyncEngine` in this process; thread-safe (concurrent runs batch together).

    The engine's async stream is consumed on a private event-loop thread and handed over through a queue, so Lagent's
    synchronous `stream_chat` works from any thread; leaving the stream early cancels the request in the engine.
    """

    def __init__(self, engine: Optional[EngineClient] = None, model_path: Optional[str] = None,
                 engine_config: Optional[EngineConfig] = None, **gen_defaults: Any) -> None:
        if engine is None:
            from ..engine import AsyncEngine

            engine = AsyncEngine(model_path, engine_config or EngineConfig())
            self._owns_engine = True
        else:
            self._owns_engine = False
        self.engine = engine
        tok = engine.tokenizer
        super().__init__(str(engine.model_name or model_path), bos=getattr(tok, "bos_token", None) or "",
                         **gen_defaults)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="puyu-agent-engine-loop", daemon=True)
        self._thread.start()

    def _gen_config(self, params: dict) -> GenerationConfig:
        s = _sampling(params)
        return GenerationConfig(max_new_tokens=s["max_new_tokens"], do_sample=s["temperature"] > 0,
                                temperature=s["temperature"] if s["temperature"] > 0 else 1.0, top_p=s["top_p"],
                                top_k=s["top_k"], repetition_penalty=s["repetition_penalty"],
                                stop_words=[w for w in params.get("stop_words") or [] if w] or None,
                                skip_special_tokens=False)

    def _stream(self, prompt: str, params: dict) -> Iterator[str]:
        ids = self.engine.tokenizer.encode(prompt, add_special_tokens=False)  # the BOS is in the rendered prompt
        stream = self.engine.generate(ids, self._gen_config(params))  # raises PromptTooLongError here
        items: queue.Queue = queue.Queue()

        async def pump() -> None:
            try:
                async for out in stream:
                    items.put(out)
            except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
                items.put(exc)
            finally:
                await stream.aclose()
                items.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (out := items.get()) is not _DONE:
                if isinstance(out, BaseException):
                    raise out
                self.last_usage = {"prompt_tokens": out.input_token_len or len(ids),
                                   "completion_tokens": out.generate_token_len}
                if out.finish_reason == "error":
                    raise RuntimeError(out.error or "the engine failed")
                if out.finish_reason is not None:
                    self.last_finish_reason = out.finish_reason
                yield out.text
        finally:
            if not future.done():
                self._loop.call_soon_threadsafe(future.cancel)  # aborts the request, frees its KV blocks

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        if self._owns_engine:
            self.engine.close()


class OpenAIServerModel(StreamingModel):
    """Streams `/v1/completions` of an OpenAI-compatible server with the rendered prompt and
    `skip_special_tokens: false` (as Lagent's `LMDeployClient` does). `bos` defaults to empty: servers add it."""

    def __init__(self, url: str, model_name: Optional[str] = None, api_key: Optional[str] = None,
                 timeout_s: float = 600.0, bos: str = "", **gen_defaults: Any) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url: must start with http:// or https://, got {url!r}")
        base = url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.model_name = model_name or self._first_model()
        super().__init__(self.model_name, bos=bos, **gen_defaults)

    def _first_model(self) -> str:
        try:
            resp = self.client.get(f"{self.base_url}/models")
            resp.raise_for_status()
            return resp.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{self.base_url}/models: cannot list the server's models ({exc})") from None

    def _payload(self, prompt: str, params: dict) -> dict:
        s = _sampling(params)
        stops = [IM_END] + [w for w in params.get("stop_words") or [] if w and w != IM_END]
        return {"model": self.model_name, "prompt": prompt, "max_tokens": s["max_new_tokens"],
                "temperature": s["temperature"], "top_p": s["top_p"], "top_k": s["top_k"],
                "repetition_penalty": s["repetition_penalty"], "stop": stops[:4], "stream": True,
                "stream_options": {"include_usage": True}, "skip_special_tokens": False}

    def _stream(self, prompt: str, params: dict) -> Iterator[str]:
        with self.client.stream("POST", f"{self.base_url}/completions", json=self._payload(prompt, params)) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code} from {self.base_url}/completions: "
                                   f"{resp.read().decode(errors='replace')[:500]}")
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise RuntimeError(f"server error: {chunk['error']}")
                if chunk.get("usage"):
                    self.last_usage = {k: chunk["usage"][k] for k in ("prompt_tokens", "completion_tokens")
                                       if k in chunk["usage"]}
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason"):
                        self.last_finish_reason = choice["finish_reason"]
                    yield choice.get("text") or ""

    def close(self) -> None:
        self.client.close()
