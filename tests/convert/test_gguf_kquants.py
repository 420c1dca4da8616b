"""K-quant GGUF tensors (Q4_K, Q5_K, Q6_K; with Q8_0 in the qwen2 file) through puyu against transformers' own GGUF
loader: greedy tokens and the chosen tokens' logprobs. `gguf.quants` cannot write K-quants, so the tensors are
random block bytes with small positive fp16 super-block scales (gguf_helpers.random_kquant).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_helpers import PROMPT, cache, hf_greedy, hf_model, needs_tokenizer, tokenizer_fields, write_gguf

from puyu.config import GenerationConfig

__all__ = ["cache", "tokenizer_fields"]  # fixtures
NEW_TOKENS = 16


def _puyu_greedy_logprobs(path) -> tuple[list[int], list[float]]:
    import puyu

    with puyu.pipeline(str(path), dtype="float32") as pipe:
        r = pipe(list(PROMPT), GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0))
    return r.token_ids, [lp[tok] for tok, lp in zip(r.token_ids, r.logprobs)]


def _hf_logprobs(model: torch.nn.Module, tokens: list[int]) -> list[float]:
    """transformers' log_softmax of each generated token, teacher-forced over prompt + tokens."""
    with torch.no_grad():
        logp = model(torch.tensor([PROMPT + tokens])).logits[0].float().log_softmax(-1)
    return [logp[len(PROMPT) - 1 + t, tok].item() for t, tok in enumerate(tokens)]


@needs_tokenizer
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kquant_matches_transformers(cache, tokenizer_fields, tmp_path, arch):
    """One file per architecture whose linears cycle through Q4_K, Q5_K, Q6_K, Q8_0 (loading is the slow part)."""
    import gguf

    path = write_gguf(tmp_path / f"tiny-{arch}-kquants.gguf", tokenizer_fields, arch, "mixed_k", seed=5)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("blk.")}
    assert types == {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "F32"}  # F32: the norms (and qwen2's biases)
    tokens, logprobs = _puyu_greedy_logprobs(path)
    model = hf_model(path)
    assert tokens == hf_greedy(path, model)
    assert np.abs(np.array(logprobs) - np.array(_hf_logprobs(model, tokens))).max() < 1e-3
