"""Sampling: filters and penalties against transformers' logits processors, seeds, stop conditions, logprobs."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from engine_helpers import greedy, make_prompts, reference_greedy
from puyu.config import GenerationConfig
from puyu.engine.sampler import SampleRequest, apply_penalties, top_k_top_p


def _req(g: GenerationConfig, prompt=(), output=()) -> SampleRequest:
    return SampleRequest(g, list(prompt), list(output), [], None)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.5), (7, 1.0), (20, 0.8)])
def test_top_k_top_p_match_transformers(top_k, top_p):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3
    expect = logits
    if top_k:
        expect = TopKLogitsWarper(top_k)(None, expect)
    if top_p < 1:
        expect = TopPLogitsWarper(top_p)(None, expect)
    for row in range(4):
        got = top_k_top_p(logits[row], top_k, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(expect[row]))
        assert torch.isinf(got).sum() > 0


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(2))
    prompt, output = [1, 5, 7, 7], [9, 5, 30]
    expect = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    got = apply_penalties(logits[0], _req(GenerationConfig(repetition_penalty=1.3), prompt, output))
    torch.testing.assert_close(got, expect[0])


def test_presence_and_frequency_penalties():
    logits = torch.zeros(10)
    g = GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, _req(g, prompt=[1, 2], output=[3, 3, 3, 4]))
    expect = torch.zeros(10)
    expect[3], expect[4] = -(0.5 + 3 * 0.25), -(0.5 + 0.25)
    torch.testing.assert_close(got, expect)  # prompt tokens are not penalised (OpenAI semantics)


@pytest.fixture(scope="module")
def pipe(internlm2_checkpoint):
    from puyu.engine.pipeline import pipeline

    p = pipeline(internlm2_checkpoint, cache_max_entry_count=64, cache_block_seq_len=16, dtype="float32")
    yield p
    p.close()


@pytest.fixture(scope="module")
def prompts(pipe):
    return make_prompts(pipe.engine.spec.vocab_size, (6, 11, 17), seed=5)


def test_same_seed_same_tokens_alone_and_in_a_batch(pipe, prompts):
    def cfg(seed):
        return GenerationConfig(do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=16, ignore_eos=True,
                                random_seed=seed)

    alone = pipe(prompts[0], cfg(42)).token_ids
    in_batch = pipe([prompts[1], prompts[0], prompts[2]], [cfg(3), cfg(42), cfg(9)])[1].token_ids
    twice = pipe([prompts[0], prompts[0]], [cfg(42), cfg(42)])
    assert alone == in_batch == twice[0].token_ids == twice[1].token_ids
    others = [pipe(prompts[0], cfg(s)).token_ids for s in (1, 2, 3)]
    assert any(o != alone for o in others), "different seeds should give different samples"


def test_top_k_one_is_greedy(pipe, prompts):
    sampled = pipe(prompts[1], GenerationConfig(do_sample=True, top_k=1, temperature=1.5, max_new_tokens=16,
                                                ignore_eos=True))
    assert sampled.token_ids == pipe(prompts[1], greedy(16)).token_ids


def test_stop_token_ids_and_max_new_tokens(pipe, prompts):
    free = pipe(prompts[2], greedy(20))
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop = free.token_ids[6]
    cut = free.token_ids.index(stop)
    out = pipe(prompts[2], greedy(20, stop_token_ids=[stop]))
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:cut]  # the stop token itself is not part of the output


def test_min_new_tokens_masks_stop_ids(pipe, prompts):
    free = pipe(prompts[2], greedy(20))
    first = free.token_ids[0]
    out = pipe(prompts[2], greedy(20, stop_token_ids=[first], min_new_tokens=4))
    assert len(out.token_ids) >= 4 and first not in out.token_ids[:4]


def test_stop_words_are_trimmed(pipe):
    prompt = "The quick brown fox jumps over the lazy dog. Hello, how are you"
    free = pipe(prompt, greedy(24))
    text = free.text
    candidates = [text[i:i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2]]
    assert candidates, f"no usable stop word in {text!r}"
    word = candidates[0]
    out = pipe(prompt, greedy(24, stop_words=[word]))
    assert out.finish_reason == "stop"
    assert out.text == text[:text.find(word)]
    assert word not in out.text


def test_ignore_eos(pipe, internlm2_checkpoint, reference_model):
    """Find a prompt whose greedy continuation reaches an EOS id; it stops there unless ignore_eos."""
    stop_ids = set(pipe.tokenizer.stop_token_ids)
    for p in make_prompts(pipe.engine.spec.vocab_size, (5, 37, 20, 64, 9, 13, 30, 50)):
        full = pipe(p, greedy(32))
        hits = [i for i, t in enumerate(full.token_ids) if t in stop_ids]
        if hits:
            break
    else:
        pytest.fail("no prompt reached an EOS id; the fixture model changed?")
    stopped = pipe(p, GenerationConfig(max_new_tokens=32))
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:hits[0]]
    assert full.token_ids == reference_greedy(reference_model(internlm2_checkpoint), p)


def test_logprobs_of_chosen_and_top_tokens(pipe, prompts, internlm2_checkpoint, reference_model):
    out = pipe(prompts[0], greedy(6, logprobs=3))
    ref = reference_model(internlm2_checkpoint)
    with torch.no_grad():
        logits = ref(torch.tensor([prompts[0] + out.token_ids])).logits[0, len(prompts[0]) - 1:-1]
    expect = torch.log_softmax(logits, -1)
    assert len(out.logprobs) == len(out.token_ids) == 6
    for step, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        ids = list(lp)
        assert ids[0] == tok  # the chosen token first
        assert len(lp) in (3, 4)
        for i, v in lp.items():
            assert abs(v - float(expect[step, i])) < 1e-4
        assert set(expect[step].topk(3).indices.tolist()) <= set(ids)
    assert pipe(prompts[0], greedy(2)).logprobs is None


def test_one_row_that_cannot_be_sampled_fails_alone():
    """A non-finite distribution in one row gives SamplingFailed for that row only; the others still sample."""
    from puyu.engine.sampler import SampleRequest, SamplingFailed, make_generator, sample

    logits = torch.randn(3, 50)
    logits[1] = float("nan")
    cfg = GenerationConfig(do_sample=True, temperature=0.7, logprobs=0)
    reqs = [SampleRequest(cfg, [1, 2], [], [2], make_generator(i)) for i in range(3)]
    tokens, logprobs = sample(logits, reqs)
    assert isinstance(tokens[1], SamplingFailed) and "sampling failed" in str(tokens[1])
    assert logprobs[1] is None
    for row in (0, 2):
        assert isinstance(tokens[row], int) and 0 <= tokens[row] < 50
        assert list(logprobs[row]) == [tokens[row]]
