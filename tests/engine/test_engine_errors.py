"""Bad input gets a clear error: long prompts, invalid options, missing/corrupt weights, unknown architectures."""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from puyu.config import ConfigError, EngineConfig, GenerationConfig
from puyu.convert.spec import CheckpointError
from puyu.engine.errors import PromptTooLongError
from puyu.engine.pipeline import pipeline


@pytest.fixture(scope="module")
def pipe(internlm2_checkpoint):
    p = pipeline(internlm2_checkpoint, session_len=32, cache_max_entry_count=16, cache_block_seq_len=16)
    yield p
    p.close()


def test_prompt_longer_than_session(pipe):
    with pytest.raises(PromptTooLongError) as err:
        pipe(list(range(3, 43)))
    assert isinstance(err.value, ValueError)
    assert "40" in str(err.value) and "32" in str(err.value)


def test_prompt_too_long_raises_before_streaming(pipe):
    async def run():
        with pytest.raises(PromptTooLongError):
            pipe.engine.generate(list(range(3, 43)))  # raised at the call, nothing to iterate
        chunks = [o async for o in pipe.engine.generate(list(range(3, 13)), GenerationConfig(max_new_tokens=3))]
        return chunks

    chunks = asyncio.run(run())
    assert chunks[-1].finish_reason in ("length", "stop")


def test_generation_stops_at_session_len(pipe):
    out = pipe(list(range(3, 30)), GenerationConfig(max_new_tokens=100, ignore_eos=True))
    assert out.finish_reason == "length"
    assert out.input_token_len + out.generate_token_len == 32


def test_bad_token_ids_and_prompts(pipe):
    with pytest.raises(ValueError, match="out of range"):
        pipe([3, 4, 10 ** 6])
    with pytest.raises(ValueError, match="prompt"):
        pipe("")
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        pipe([{"content": "no role"}])


@pytest.mark.parametrize("field,value", [("top_p", 0.0), ("temperature", -1.0), ("max_new_tokens", 0),
                                         ("top_k", -1), ("logprobs", 50), ("stop_words", [""])])
def test_invalid_sampling_values(field, value):
    with pytest.raises(ConfigError) as err:
        GenerationConfig(**{field: value})
    assert err.value.field == field and field in str(err.value)


def test_invalid_gen_config_type_and_stop_ids(pipe):
    with pytest.raises(ValueError, match="gen_config"):
        pipe("hi", 42)
    with pytest.raises(ValueError, match="stop_token_ids"):
        pipe("hi", GenerationConfig(stop_token_ids=[10 ** 6]))


def test_invalid_engine_options(internlm2_checkpoint):
    with pytest.raises(ConfigError, match="cache_blok_seq_len"):
        pipeline(internlm2_checkpoint, cache_blok_seq_len=16)
    with pytest.raises(ConfigError, match="quant_policy"):
        pipeline(internlm2_checkpoint, quant_policy=3)
    with pytest.raises(ConfigError, match="tp"):
        pipeline(internlm2_checkpoint, tp=2)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device"):
            pipeline(internlm2_checkpoint, device="cuda")


@pytest.fixture
def broken_copy(internlm2_checkpoint, tmp_path):
    def make():
        dst = tmp_path / "ckpt"
        shutil.copytree(internlm2_checkpoint, dst)
        return dst

    return make


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no-such-model"):
        pipeline(str(tmp_path / "no-such-model"))


def test_missing_shard(broken_copy):
    path = broken_copy()
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        pipeline(path, cache_max_entry_count=4)


def test_corrupt_shard(broken_copy):
    path = broken_copy()
    shard = path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model-00001-of-00002"):
        pipeline(path, cache_max_entry_count=4)


def test_unknown_architecture(broken_copy):
    path = broken_copy()
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="MambaForCausalLM"):
        pipeline(path, cache_max_entry_count=4)


def test_unsupported_rope_scaling(broken_copy):
    path = broken_copy()
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="yarn"):
        pipeline(path, cache_max_entry_count=4)


def test_engine_config_object_and_keywords_conflict(internlm2_checkpoint):
    with pytest.raises(ValueError, match="session_len"):
        pipeline(internlm2_checkpoint, backend_config=EngineConfig(), session_len=8)
