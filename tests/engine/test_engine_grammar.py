"""Constrained decoding in the engine, against transformers: a guided greedy reply is, token by token, the argmax of
transformers' logits over the tokens the grammar allows (the mask lands on the right row of a batch, the matcher
advances with each token, EOS only where the grammar accepts); unguided rows of the same batch are untouched; the
byte checks keep JSON strings free of raw control characters and invalid UTF-8. Also min_p and logit_bias."""
from __future__ import annotations

import json
import re

import pytest
import torch

from engine_helpers import greedy, make_prompts
from puyu.config import GenerationConfig, Guide
from puyu.convert.reference import load_reference_model
from puyu.engine.grammar import Grammars, apply_guides
from puyu.engine.sampler import top_k_top_p

SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}, "b": {"enum": [1, 2, 3]},
                                           "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
          "required": ["a", "b", "c"]}


@pytest.fixture(scope="module")
def pipe(internlm2_checkpoint):
    from puyu.engine.pipeline import pipeline

    p = pipeline(internlm2_checkpoint, cache_max_entry_count=64, cache_block_seq_len=16, dtype="float32")
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference(internlm2_checkpoint):
    return load_reference_model(internlm2_checkpoint)


@pytest.fixture(scope="module")
def prompts(pipe):
    return make_prompts(pipe.engine.spec.vocab_size, (5, 9, 13), seed=3)


def reference_guided(model, tokenizer, prompt: list[int], guide: Guide, limit: int = 80) -> list[int]:
    """transformers' logits, masked by a fresh matcher of the same grammar, argmax; stops where the grammar ends."""
    state = Grammars(tokenizer).matcher(guide, tokenizer.stop_token_ids)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(limit):
            logits = model(torch.tensor([ids])).logits[0, -1:].float()
            token = int(apply_guides(logits, [state])[0].argmax())
            assert state.accept(token)
            if token in tokenizer.stop_token_ids:
                break
            out.append(token)
            ids.append(token)
            if state.finished:
                break
    return out


@pytest.mark.parametrize("guide", [Guide("json_schema", json.dumps(SCHEMA)), Guide("regex", r"[a-z]{3,6}-\d\d"),
                                   Guide("choice", json.dumps(["alpha", "beta", "gamma"]))])
def test_guided_greedy_matches_masked_transformers(pipe, reference, prompts, guide):
    tok = pipe.engine.tokenizer
    plain = [pipe(p, greedy(12)).token_ids for p in prompts]
    configs = [greedy(12), GenerationConfig(max_new_tokens=80, guide=guide), greedy(12)]
    batch = pipe(prompts, configs)
    assert [batch[0].token_ids, batch[2].token_ids] == [plain[0], plain[2]]  # unguided rows are untouched
    guided = batch[1]
    assert guided.finish_reason == "stop"
    assert guided.token_ids == reference_guided(reference, tok, prompts[1], guide)
    text = tok.decode(guided.token_ids)
    if guide.kind == "json_schema":
        value = json.loads(text)
        assert set(value) == {"a", "b", "c"} and value["b"] in (1, 2, 3) and len(value["a"]) <= 8
    elif guide.kind == "regex":
        assert re.fullmatch(guide.spec, text)
    else:
        assert text in json.loads(guide.spec)


def test_json_strings_hold_no_control_bytes_nor_invalid_utf8(pipe):
    """Random logits, sampled: xgrammar alone admits raw control bytes and overlong sequences in JSON strings."""
    tok = pipe.engine.tokenizer
    grammars = Grammars(tok)
    guide = Guide("json_schema", json.dumps({"type": "array", "items": {"type": "string"}, "maxItems": 4}))
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        state, ids = grammars.matcher(guide, tok.stop_token_ids), []
        for _ in range(120):
            logits = torch.randn(1, tok.vocab_rows, generator=gen) * 4
            token = int(torch.multinomial(apply_guides(logits, [state])[0].softmax(-1), 1, generator=gen))
            assert state.accept(token)
            if state.finished:
                break
            ids.append(token)
        if state.finished:
            text = tok.decode(ids)
            assert "\ufffd" not in text and not any(ord(c) < 0x20 for c in text), text
            json.loads(text)


def test_min_p_keeps_tokens_within_the_ratio():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(top_k_top_p(logits, 0, 1.0, min_p=0.3))
    assert kept.tolist() == [True, True, True, False]  # 0.05 < 0.3 * 0.5


def test_logit_bias_moves_greedy(pipe, prompts):
    base = pipe(prompts[0], greedy(4)).token_ids
    pushed = pipe(prompts[0], greedy(4, logit_bias={7: 100.0})).token_ids
    assert pushed == [7, 7, 7, 7] != base
    banned = pipe(prompts[0], greedy(1, logit_bias={base[0]: -100.0})).token_ids
    assert banned != base[:1]


def test_a_guide_that_cannot_compile_names_its_field(pipe):
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema: cannot be compiled"):
        pipe("x", GenerationConfig(guide=Guide("json_schema", '{"type": "frob"}', "response_format.json_schema.schema")))


def test_unpacked_mask_matches_xgrammar_apply(pipe):
    """The torch path (for logits on a GPU) masks exactly what xgrammar's CPU kernel masks."""
    from puyu.engine.grammar import unpack_mask
    import xgrammar as xgr

    tok = pipe.engine.tokenizer
    state = Grammars(tok).matcher(Guide("json_schema", json.dumps(SCHEMA)), tok.stop_token_ids)
    bitmask = xgr.allocate_token_bitmask(1, tok.vocab_rows)
    state.fill(bitmask, 0)
    logits = torch.zeros(1, tok.vocab_rows)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    assert torch.equal(unpack_mask(bitmask, tok.vocab_rows), torch.isfinite(logits))
    assert 0 < int(torch.isfinite(logits).sum()) < tok.vocab_rows
