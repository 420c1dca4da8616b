"""Fixtures for the engine tests: transformers references and engines on the tiny checkpoints."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from engine_helpers import DEVICE
from puyu.config import EngineConfig


@pytest.fixture(scope="session")
def reference_model():
    """`get(path)` -> the fp32 transformers reference of a checkpoint (cached per session)."""
    from puyu.convert.reference import load_reference_model

    cache: dict = {}

    def get(path):
        if path not in cache:
            cache[path] = load_reference_model(path, torch.float32)
        return cache[path]

    return get


@pytest.fixture
def make_pipeline() -> Iterator:
    """`make(path, adapters=None, **engine_options)` -> a Pipeline (fp32, small absolute cache), closed after the
    test; `adapters` maps names to PEFT LoRA adapter directories."""
    from puyu.engine.pipeline import pipeline

    made = []

    def make(path, adapters=None, **options):
        options.setdefault("cache_max_entry_count", 64)
        options.setdefault("cache_block_seq_len", 16)
        options.setdefault("dtype", "float32")
        options.setdefault("device", DEVICE)
        pipe = pipeline(path, backend_config=EngineConfig(**options), adapters=adapters)
        made.append(pipe)
        return pipe

    yield make
    for pipe in made:
        pipe.close()
