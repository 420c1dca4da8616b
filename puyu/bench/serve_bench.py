"""`puyu bench serve`: any OpenAI-compatible endpoint, one run or a sweep over concurrency or rate."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .client import ClientConfig, new_http_client, send_request
from .datasets import DatasetConfig, SampleRequest, load_dataset
from .load import LoadConfig
from .records import RequestRecord
from .points import BenchOptions, run_points
from .runner import RunResult, measure
from .tokenizer import serve_tokenizer


async def _serve_run(client: ClientConfig, samples: list[SampleRequest], load: LoadConfig, opts: BenchOptions,
                     tokenizer: Any, desc: str) -> RunResult:
    async with new_http_client(client) as http:
        async def send(sample: SampleRequest, record: RequestRecord) -> RequestRecord:
            return await send_request(http, client, sample, record, tokenizer)

        return await measure(send, samples, load, opts.num_warmups, opts.percentiles, opts.goodput or None,
                             opts.progress, desc)


def run_serve_bench(client: ClientConfig, dataset: DatasetConfig, load: LoadConfig, opts: BenchOptions,
                    tokenizer_name: Optional[str], argv: Optional[list[str]] = None,
                    fixed_output_len: Optional[int] = None, echo: Callable[[str], None] = print) -> list[dict]:
    client.validate()
    load.validate()
    opts.validate()
    tokenizer, tokenizer_name = serve_tokenizer(tokenizer_name, client.base_url, client.model, client.api_key)
    samples = load_dataset(dataset, tokenizer, fixed_output_len)
    header = {"backend": f"openai-{client.endpoint}", "base_url": client.base_url, "model_id": client.model,
              "tokenizer_id": tokenizer_name, "num_prompts": len(samples), "dataset": dataset.name}
    safe_client = {k: v for k, v in dataclasses.asdict(client).items() if k != "api_key"}
    config = {"client": safe_client, "dataset": dataclasses.asdict(dataset), "tokenizer": tokenizer_name,
              "token_counting": "usage deltas if streamed, else tokenised deltas; totals from final usage or "
                                "the tokenised full text; input tokens counted on the raw prompt"}
    default_label = f"serve-{Path(client.model).name or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"

    def run_one(point: LoadConfig, desc: str) -> RunResult:
        return asyncio.run(_serve_run(client, samples, point, opts, tokenizer, desc))

    return run_points(run_one, header, config, load, opts, default_label, argv, echo)
