"""Fixtures of the agent tests: a tiny InternLM2 checkpoint edited to end its replies with <|im_end|>, the in-process
engine model over it, and the OpenAI-compatible server over it on a real socket.

A tiny random model never says <|im_end|> on purpose, so `im_end_checkpoint` edits a copy of the InternLM2 test
checkpoint: the output row of <|im_end|> becomes 3x the row of the token greedy decoding picks at step K for
MESSAGES, so the model ends that reply with <|im_end|> within K+1 tokens.
"""
from __future__ import annotations

import asyncio
import shutil
from types import SimpleNamespace

import pytest

from puyu.agent.models import EngineModel
from puyu.config import EngineConfig, GenerationConfig
from puyu.testing import ServerThread, free_port, load_shards, save_shards

K = 4
MESSAGES = [dict(role="system", content="You can run code.", name="interpreter"), dict(role="user", content="Hello")]
ENGINE = dict(session_len=1024, cache_max_entry_count=64, max_batch_size=4)


def _greedy_ids(engine, prompt_ids: list[int], n: int) -> list[int]:
    async def collect() -> list[int]:
        ids: list[int] = []
        async for out in engine.generate(prompt_ids, GenerationConfig(max_new_tokens=n, skip_special_tokens=False)):
            ids += out.token_ids
        return ids

    return asyncio.run(collect())


@pytest.fixture(scope="session")
def im_end_checkpoint(internlm2_checkpoint, tmp_path_factory):
    """The edited checkpoint: `path`, `original` (the unedited greedy reply), `k`, `messages`, `engine_options`."""
    from puyu.engine import AsyncEngine

    with AsyncEngine(internlm2_checkpoint, EngineConfig(**ENGINE)) as engine:
        model = EngineModel(engine)
        prompt_ids = engine.tokenizer.encode(model.render(MESSAGES), add_special_tokens=False)
        ids = _greedy_ids(engine, prompt_ids, 24)
        original = engine.tokenizer.decode(ids, skip_special_tokens=False)
        im_end = engine.tokenizer.token_to_id("<|im_end|>")
        model.close()
    assert im_end not in ids[:K + 1], "the unedited model already stops: pick another prompt"
    out = tmp_path_factory.mktemp("im-end-ckpt")
    shutil.copytree(internlm2_checkpoint, out, dirs_exist_ok=True)
    shards = load_shards(out)
    weights = next(shard for shard in shards.values() if "output.weight" in shard)
    w = weights["output.weight"].float()
    w[im_end] = 3 * w[ids[K]]
    weights["output.weight"] = w.to(weights["output.weight"].dtype)
    save_shards(out, shards)
    return SimpleNamespace(path=out, original=original, k=K, messages=MESSAGES, engine_options=ENGINE)


@pytest.fixture(scope="session")
def engine_model(im_end_checkpoint):
    model = EngineModel(model_path=str(im_end_checkpoint.path), engine_config=EngineConfig(**ENGINE),
                        max_new_tokens=32)
    yield model
    model.close()


@pytest.fixture()
def unused_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def server_url(im_end_checkpoint):
    """`puyu serve`'s app on a real socket (uvicorn in a thread) over its own engine."""
    from puyu.engine import AsyncEngine
    from puyu.serve.api_server import create_app

    with AsyncEngine(im_end_checkpoint.path, EngineConfig(**ENGINE)) as engine:
        with ServerThread(create_app(engine)) as server:
            yield server.url


