"""Shared fixtures: tiny checkpoints built offline for every architecture we support."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from puyu.tiny import TinyShape, build_checkpoint

ARCHS = ("internlm2", "llama", "qwen2")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="session", autouse=True)
def _offline_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reaches a hub; puyu-tiny and other caches go to a per-run folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PUYU_CACHE"] = str(tmp_path_factory.mktemp("puyu-cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """`make(arch, dtype='fp16', shape=TinyShape(), seed=0)` -> path of an HF checkpoint dir (cached per session)."""
    cache: dict[tuple, Path] = {}

    def make(arch: str, dtype: str = "fp16", shape: TinyShape | None = None, seed: int = 0) -> Path:
        shape = shape or TinyShape()
        key = (arch, dtype, shape, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{arch}-{dtype}")
            cache[key] = build_checkpoint(out, arch, DTYPES[dtype], shape, seed=seed, num_shards=2)
        return cache[key]

    return make


@pytest.fixture(scope="session", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory, arch: str) -> Path:
    """One fp16 tiny checkpoint per architecture (parametrised)."""
    return checkpoint_factory(arch, "fp16")


@pytest.fixture(scope="session")
def internlm2_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("internlm2", "fp16")


@pytest.fixture(scope="session")
def xcomposer2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random InternLM-XComposer2 checkpoint (InternLM2 + PLoRA + CLIP tower + projector), fp16."""
    from puyu.tiny_xcomposer2 import build_xcomposer2_checkpoint

    return build_xcomposer2_checkpoint(tmp_path_factory.mktemp("ckpt-xcomposer2"), torch.float16, seed=5)
