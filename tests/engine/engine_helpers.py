"""Helpers shared by the engine tests (plain functions; the fixtures are in conftest.py)."""
from __future__ import annotations

import inspect
import os

import torch

from puyu.config import GenerationConfig

NEW_TOKENS = 32
# the engine tests run on cpu; PUYU_TEST_DEVICE=cuda runs the engine side on a GPU (the reference stays on cpu)
DEVICE = os.environ.get("PUYU_TEST_DEVICE", "cpu")


def make_prompts(vocab: int, lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    """Random prompts of token ids (no special ids 0..2), deterministic."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 8, (n,), generator=gen).tolist() for n in lengths]


def reference_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy continuation (its own KV cache), argmax of the raw logits, never stopping early.

    A plain loop rather than `generate`: `min_new_tokens` there would mask EOS, which a random model often prefers.
    """
    out: list[int] = []
    x, past = torch.tensor([prompt]), None
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        for _ in range(new_tokens):
            o = model(x, use_cache=True, **{name: past})
            past = getattr(o, name)
            out.append(int(o.logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
    return out


def greedy(new_tokens: int = NEW_TOKENS, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, **kw)
