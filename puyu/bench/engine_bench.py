"""`puyu bench engine`: the engine in-process (no HTTP), like LMDeploy's profile_throughput.

Prompts go in as token ids (exactly the dataset's prompt tokens, no chat template); every `StreamOutput` that
carries token ids is a chunk with exactly that many tokens, so no re-tokenising is involved.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional

from puyu.config import EngineConfig, GenerationConfig

from .datasets import DatasetConfig, SampleRequest, load_dataset
from .load import LoadConfig
from .points import BenchOptions, run_points
from .records import Chunk, RequestRecord
from .runner import RunResult, measure
from .tokenizer import load_tokenizer


def make_engine_sender(engine: Any, tokenizer: Any, temperature: float = 0.0) -> Callable:
    """An async `send(sample, record)` that streams one request through `engine.generate`."""

    async def send(sample: SampleRequest, record: RequestRecord) -> RequestRecord:
        ids = tokenizer.encode(sample.prompt, add_special_tokens=False)
        gen = GenerationConfig(max_new_tokens=sample.output_len, ignore_eos=True, do_sample=temperature > 0,
                               temperature=temperature)
        record.t_send = time.perf_counter()
        try:
            async for out in engine.generate(ids, gen):
                if out.token_ids:
                    record.chunks.append(Chunk(time.perf_counter(), len(out.token_ids)))
                record.output_tokens = out.generate_token_len
                if out.finish_reason:
                    record.finish_reason = out.finish_reason
                    if out.finish_reason in ("error", "abort"):
                        raise RuntimeError(out.error or f"request ended with {out.finish_reason}")
            if not record.chunks:
                raise RuntimeError("the stream ended without any token")
            record.success = True
        except Exception as exc:  # noqa: BLE001 - kept in the record, never dropped
            record.success, record.error = False, f"{type(exc).__name__}: {exc}"
        record.t_end = time.perf_counter()
        return record

    return send


def open_engine(model: Optional[str], config: EngineConfig) -> tuple[Any, Path]:
    from puyu.engine import AsyncEngine
    from puyu.resolve import resolve_model_path

    path = resolve_model_path(model)
    return AsyncEngine(path, config), path


def run_engine_bench(model: Optional[str], engine_cfg: EngineConfig, dataset: DatasetConfig, load: LoadConfig,
                     opts: BenchOptions, argv: Optional[list[str]] = None, fixed_output_len: Optional[int] = None,
                     echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    load.validate()
    opts.validate()
    engine, path = open_engine(model, engine_cfg)
    try:
        tokenizer = load_tokenizer(str(path))
        samples = load_dataset(dataset, tokenizer, fixed_output_len)
        send = make_engine_sender(engine, tokenizer)
        header = {"backend": "puyu-engine", "model_id": str(model or "puyu-tiny"), "model_path": str(path),
                  "tokenizer_id": str(path), "num_prompts": len(samples), "dataset": dataset.name}
        config = {"engine": dataclasses.asdict(engine.config), "dataset": dataclasses.asdict(dataset),
                  "token_counting": "exact: token ids streamed by the engine; prompts sent as token ids"}

        def run_one(point: LoadConfig, desc: str) -> RunResult:
            result = asyncio.run(measure(send, samples, point, opts.num_warmups, opts.percentiles,
                                         opts.goodput or None, opts.progress, desc))
            result.metrics["engine_stats"] = engine.stats()
            return result

        default_label = f"engine-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return run_points(run_one, header, config, load, opts, default_label, argv, echo)
    finally:
        engine.close()
