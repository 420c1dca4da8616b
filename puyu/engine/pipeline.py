"""`puyu.pipeline`: LMDeploy's `pipeline` API over the native engine, so users can switch.

    pipe = puyu.pipeline("internlm2-chat-1_8b", session_len=4096, quant_policy=8)
    pipe("Hello")                                # -> Response
    pipe(["Hi", "Bonjour"], GenerationConfig(max_new_tokens=64))   # -> [Response, Response], run as one batch
    pipe(("Describe the image", image))         # a vision model: (text, image or [images]); a PIL image or a path
    for delta in pipe.stream_infer("Hi"): ...   # Response deltas
    pipe = puyu.pipeline(model, adapters={"sql": "path/to/peft-adapter"})
    pipe("Hi", GenerationConfig(adapter_name="sql"))   # per request; a batch may mix adapters and the base
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Iterator, Optional, Union, cast

from ..config import EngineConfig, GenerationConfig
from .engine import AsyncEngine
from .client import Prompt
from .outputs import StreamOutput


@dataclass
class Response:
    text: str
    token_ids: list[int] = field(default_factory=list)
    input_token_len: int = 0
    generate_token_len: int = 0
    finish_reason: Optional[str] = None
    logprobs: Optional[list[dict[int, float]]] = None
    index: int = 0
    error: Optional[str] = None


def _is_text_image(p: Any) -> bool:
    return isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)


def _vision_prompt(p: Any) -> Any:
    """`(text, image | [images])` -> one user message with the images then the text (LMDeploy's VLM pipeline
    form); `<ImageHere>` in the text places the images instead. Other prompts are returned as they are."""
    if not _is_text_image(p):
        return p
    text, images = p
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def _is_single(prompts: Any) -> bool:
    """One prompt: a string, a list of token ids, a list of chat messages or a (text, image) pair; anything else is
    a batch."""
    if isinstance(prompts, str) or _is_text_image(prompts):
        return True
    if isinstance(prompts, (list, tuple)) and prompts:
        return all(isinstance(p, int) and not isinstance(p, bool) for p in prompts) or all(
            isinstance(p, dict) for p in prompts)
    return False


def _gen_configs(gen_config: Union[GenerationConfig, dict, list, None], n: int) -> list[GenerationConfig]:
    if isinstance(gen_config, list):
        if len(gen_config) != n:
            raise ValueError(f"gen_config: {len(gen_config)} configs for {n} prompts")
        return [_one_config(g) for g in gen_config]
    return [_one_config(gen_config)] * n


def _one_config(g: Union[GenerationConfig, dict, None]) -> GenerationConfig:
    if g is None:
        return GenerationConfig()
    if isinstance(g, dict):
        return GenerationConfig(**g)
    if isinstance(g, GenerationConfig):
        return g
    raise ValueError(f"gen_config: must be a GenerationConfig or a dict, got {type(g).__name__}")


class Pipeline:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def __call__(self, prompts: Union[Prompt, list[Prompt]],
                 gen_config: Union[GenerationConfig, dict, list, None] = None) -> Union[Response, list[Response]]:
        single = _is_single(prompts)
        batch = cast(list[Prompt], [prompts] if single else list(prompts))
        configs = _gen_configs(gen_config, len(batch))
        # tokenise every prompt first, so a bad one fails the call before anything runs
        streams = []
        try:
            for p, g in zip(batch, configs):
                streams.append(self.engine.stream_sync(_vision_prompt(p), g))
            responses = self._collect(streams)
        finally:
            for s in streams:
                s.close()
        return responses[0] if single else responses

    def _collect(self, streams: list[Generator[StreamOutput, None, None]]) -> list[Response]:
        """Drain all streams at once (each in its own thread), so the requests share the engine's batches."""
        responses = [Response(text="", index=i) for i in range(len(streams))]

        def drain(i: int) -> None:
            for out in streams[i]:
                _accumulate(responses[i], out)

        threads = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(len(streams))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return responses

    def stream_infer(self, prompts: Union[Prompt, list[Prompt]],
                     gen_config: Union[GenerationConfig, dict, list, None] = None) -> Iterator[Response]:
        """Response deltas (`index` says which prompt), in the order they come from the engine."""
        import queue

        batch = cast(list[Prompt], [prompts] if _is_single(prompts) else list(prompts))
        configs = _gen_configs(gen_config, len(batch))
        streams = [self.engine.stream_sync(_vision_prompt(p), g) for p, g in zip(batch, configs)]
        q: queue.Queue = queue.Queue()

        def drain(i: int) -> None:
            for out in streams[i]:
                q.put((i, out))

        for i in range(len(streams)):
            threading.Thread(target=drain, args=(i,), daemon=True).start()
        left = len(streams)
        try:
            while left:
                i, out = q.get()
                left -= out.finish_reason is not None
                yield _accumulate(Response(text="", index=i), out)
        finally:
            for s in streams:
                s.close()

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def load_adapter(self, name: str, path: Union[str, Path]) -> None:
        """Load a PEFT LoRA adapter under `name` (AdapterError names the file and the field)."""
        self.engine.load_adapter(name, path).result()

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name).result()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _accumulate(resp: Response, out: StreamOutput) -> Response:
    resp.text += out.text
    resp.token_ids.extend(out.token_ids)
    resp.input_token_len = out.input_token_len or resp.input_token_len
    resp.generate_token_len = out.generate_token_len
    resp.finish_reason = out.finish_reason
    resp.error = out.error
    if out.logprobs is not None:
        resp.logprobs = (resp.logprobs or []) + out.logprobs
    return resp


def pipeline(model_path: Union[str, Path, None] = None, backend_config: Optional[EngineConfig] = None,
             adapters: Optional[dict[str, Union[str, Path]]] = None, **engine_options: Any) -> Pipeline:
    """Load a model (None: puyu-tiny) and return a callable pipeline; options are `EngineConfig` fields.
    `adapters` maps names to PEFT LoRA adapter directories; a request picks one with
    `GenerationConfig(adapter_name=...)`."""
    config = backend_config if backend_config is not None else EngineConfig.from_dict(engine_options)
    if backend_config is not None and engine_options:
        raise ValueError(f"{sorted(engine_options)[0]}: pass engine options in backend_config or as keywords")
    return Pipeline(AsyncEngine(model_path, config, adapters))
