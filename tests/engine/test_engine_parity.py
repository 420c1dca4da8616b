"""Parity with transformers (fp32) on the tiny InternLM2 / Llama / Qwen2 checkpoints.

Logits of the last token within 1e-4; 32 greedy tokens identical: alone, in one batch of mixed lengths, with
chunked prefill, after a preemption, and on a prefix-cache hit.
"""
from __future__ import annotations

import copy

import pytest
import torch

from engine_helpers import DEVICE, NEW_TOKENS, greedy, make_prompts, reference_greedy
from puyu.config import GenerationConfig
from puyu.convert import load_model_weights
from puyu.engine.block_manager import BlockManager
from puyu.engine.kv_cache import KVCacheStorage
from puyu.engine.model import DecoderModel
from puyu.engine.model_runner import ModelRunner
from puyu.engine.sequence import ScheduledSeq, Sequence

LENGTHS = (5, 37, 20, 64)


@pytest.fixture(scope="module")
def case(tiny_checkpoint, reference_model):
    """Prompts and transformers' greedy continuations for one architecture."""
    ref = reference_model(tiny_checkpoint)
    prompts = make_prompts(ref.config.vocab_size, LENGTHS)
    return tiny_checkpoint, ref, prompts, [reference_greedy(ref, p) for p in prompts]


def _rounded_to_bf16(ref):
    """A copy of the reference whose weights are bf16 numbers (held in float32), as a bf16 checkpoint gives."""
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    return ref


@pytest.mark.parametrize("kernels", ["torch", "auto", "auto-bf16-weights", "torch-bf16", "auto-bf16"])
def test_last_token_logits_match_transformers(case, kernels):
    """One mixed prefill step and one decode step; `auto` runs puyu's cpu kernels (float32 weights), and on bf16
    weights computed in float32 the kernel that streams them as bf16. `-bf16`: the whole model in bf16 (what
    'auto' serves for a bf16 checkpoint on AVX-512 BF16 CPUs: the bf16 dot-product kernel), against the float32
    reference on the same bf16 weights, within bf16's rounding."""
    path, ref, prompts, _ = case
    spec, weights = load_model_weights(path, torch.float32)
    dtype, atol = torch.float32, 1e-4
    if kernels.endswith("bf16-weights"):
        ref = _rounded_to_bf16(ref)
        weights = {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in weights.items()}
    elif kernels.endswith("-bf16"):
        ref = _rounded_to_bf16(ref)
        weights = {k: v.bfloat16() if v.is_floating_point() else v for k, v in weights.items()}
        dtype, atol = torch.bfloat16, 3e-1
    device = torch.device(DEVICE)
    model = DecoderModel(spec, {k: v.to(device) for k, v in weights.items()}, device, kernels.split("-")[0])
    cache = KVCacheStorage(spec.num_layers, 32, 16, spec.num_kv_heads, spec.head_dim, dtype, device)
    bm = BlockManager(32, 16)
    seqs = [Sequence(str(i), p, GenerationConfig()) for i, p in enumerate(prompts)]
    for s in seqs:
        assert bm.allocate(s, len(s))
    # one flattened step over sequences of mixed lengths, then one batched decode step
    logits = ModelRunner(model, cache).run([ScheduledSeq(s, 0, len(s)) for s in seqs])
    logits = logits.cpu()
    next_ids = logits.argmax(-1).tolist()
    for s, t in zip(seqs, next_ids):
        s.num_computed = len(s)
        s.output_ids.append(t)
        assert bm.allocate(s, len(s))
    decode_logits = ModelRunner(model, cache).run([ScheduledSeq(s, len(s) - 1, 1) for s in seqs]).cpu()
    with torch.no_grad():
        for i, s in enumerate(seqs):
            expect = ref(torch.tensor([s.token_ids])).logits[0]
            torch.testing.assert_close(logits[i].float(), expect[-2], atol=atol, rtol=atol)
            torch.testing.assert_close(decode_logits[i].float(), expect[-1], atol=atol, rtol=atol)
            if dtype == torch.bfloat16:  # a loose bound on the worst element; the typical one must stay small
                mean_err = max((logits[i].float() - expect[-2]).abs().mean(), (decode_logits[i].float() - expect[-1]).abs().mean())
                assert mean_err < 3e-2 * expect.abs().mean(), (float(mean_err), float(expect.abs().mean()))


def test_greedy_single_and_batch_match_transformers(case, make_pipeline):
    path, _, prompts, expected = case
    pipe = make_pipeline(path)
    single = pipe(prompts[1], greedy())
    assert single.token_ids == expected[1]
    assert single.generate_token_len == NEW_TOKENS and single.finish_reason == "length"
    batch = pipe(prompts, greedy())
    assert [r.token_ids for r in batch] == expected
    assert [r.input_token_len for r in batch] == list(LENGTHS)


def test_greedy_with_chunked_prefill(case, make_pipeline):
    path, _, prompts, expected = case
    pipe = make_pipeline(path, max_prefill_token_num=24)  # 37- and 64-token prompts take 2-3 steps
    assert [r.token_ids for r in pipe(prompts, greedy())] == expected


def test_greedy_after_preemption(case, make_pipeline):
    path, _, prompts, expected = case
    # 4 sequences need 2+5+4+7 = 18 blocks of 16 at the end; 12 blocks force preemptions
    pipe = make_pipeline(path, cache_max_entry_count=12)
    assert [r.token_ids for r in pipe(prompts, greedy())] == expected
    assert pipe.stats()["preemptions"] > 0


def test_greedy_on_prefix_cache_hit(case, make_pipeline):
    path, ref, prompts, expected = case
    pipe = make_pipeline(path)
    assert pipe(prompts[3], greedy()).token_ids == expected[3]
    before = pipe.stats()
    extended = prompts[3] + prompts[0]  # shares the 64-token prefix: 4 full blocks
    out = pipe(extended, greedy())
    after = pipe.stats()
    assert after["prefix_cache_hits"] == before["prefix_cache_hits"] + 1
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 64
    assert out.token_ids == reference_greedy(ref, extended)
    # the same prompt again reuses its own blocks, all but the last (partial) one
    again = pipe(extended, greedy())
    assert again.token_ids == out.token_ids
    assert pipe.stats()["prefix_cache_hit_tokens"] - after["prefix_cache_hit_tokens"] == 64
