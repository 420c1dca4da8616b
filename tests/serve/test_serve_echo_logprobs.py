"""Completions `echo` with `logprobs` (lm-eval's loglikelihood requests): the prompt's tokens come back with their
logprobs, which match transformers' log-softmax over the same checkpoint's logits (the engine's prompt logits:
prefix cache skipped, chunked prefill included), whole and streamed, with and without generated tokens."""
from __future__ import annotations

import math

import pytest
import torch

from puyu.config import EngineConfig
from puyu.convert.reference import load_reference_model
from puyu.testing import openai_client, serving

MODEL = "tiny"
PROMPT = "The quick brown fox jumps over the lazy dog. 你好，今天天气很好。"


@pytest.fixture(scope="module")
def server(internlm2_checkpoint):
    from puyu.engine import AsyncEngine

    # a small prefill budget: the prompt is computed in several chunks
    engine = AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=256, cache_max_entry_count=64,
                                                            cache_block_seq_len=16, max_prefill_token_num=8,
                                                            dtype="float32"))
    with serving(engine, MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def expected(server, internlm2_checkpoint):
    """transformers' logprob of each prompt token given those before it, and its top-3."""
    ids = server.engine.tokenizer.encode(PROMPT)
    with torch.no_grad():
        logits = load_reference_model(internlm2_checkpoint)(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return ids, [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))], [torch.topk(lp[i - 1], 3) for i in
                                                                           range(1, len(ids))]


def check_prompt_part(server, lps, expected, n_prompt):
    ids, want, tops = expected
    tok = server.engine.tokenizer
    assert lps.tokens[:n_prompt] == [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    for got, ref in zip(lps.token_logprobs[1:n_prompt], want):
        assert math.isclose(got, ref, abs_tol=2e-3), (got, ref)
    for got, ref in zip(lps.top_logprobs[1:n_prompt], tops):
        best = max(got.values())
        assert math.isclose(best, float(ref.values[0]), abs_tol=2e-3)


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_serve_echo_logprobs_match_transformers(client, server, expected, max_tokens):
    n_prompt = len(expected[0])
    for _ in range(2):  # the second time the prompt is in the prefix cache: its logprobs must still be computed
        r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=3, max_tokens=max_tokens,
                                      temperature=0, extra_body={"ignore_eos": True})
        choice = r.choices[0]
        assert choice.text.startswith(PROMPT)
        lps = choice.logprobs
        assert len(lps.tokens) == n_prompt + max_tokens == len(lps.token_logprobs) == len(lps.text_offset)
        check_prompt_part(server, lps, expected, n_prompt)
        assert all(v is not None for v in lps.token_logprobs[n_prompt:])
        assert lps.text_offset[n_prompt] == len(PROMPT)
        assert r.usage.prompt_tokens == n_prompt


def test_serve_echo_logprobs_streamed(client, server, expected):
    n_prompt = len(expected[0])
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=3, max_tokens=3,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    first = chunks[0].choices[0]
    assert first.text == PROMPT
    check_prompt_part(server, first.logprobs, expected, n_prompt)
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs) == \
        n_prompt + 3


def test_serve_logprobs_without_echo_has_no_prompt_part(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=2, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert len(r.choices[0].logprobs.tokens) == 4 and None not in r.choices[0].logprobs.token_logprobs
