"""InternLM-XComposer2-VL in the engine, on a tiny random XComposer2-shaped checkpoint.

Against an independent reference (transformers' CLIPVisionModel from the recorded CLIP config + the InternLM2 ->
Llama mapping with the Partial LoRA hooked in by hand on image rows): logits with images within 1e-4, identical
greedy tokens (chunked prefill splitting an image, two images), the image changes the output, the prefix cache never
serves one image's blocks to another, image tokens are counted, KV int8 still agrees.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import DEVICE, greedy
from xcomposer2_reference import XComposer2Reference
from puyu.config import EngineConfig
from puyu.convert.readers import CheckpointFiles
from puyu.convert.xcomposer2 import clip_config_from_weights
from puyu.engine.llm_engine import LLMEngine
from puyu.engine.multimodal import IMAGE_TOKEN, PLACEHOLDER_ID
from puyu.engine.sequence import ScheduledSeq, Sequence
from puyu.config import GenerationConfig
from puyu.testing import random_image
from puyu.tiny_xcomposer2 import TinyVisionShape

NEW_TOKENS = 12
TOKENS_PER_IMAGE = TinyVisionShape().image_tokens
SYSTEM = {"role": "system", "content": "You see images."}


def _image(seed: int, size=(40, 30)):
    return random_image(seed, size)


def _ask(*parts) -> list[dict]:
    content = [{"type": "image", "image": p} if not isinstance(p, str) else {"type": "text", "text": p}
               for p in parts]
    return [SYSTEM, {"role": "user", "content": content}]


@pytest.fixture(scope="module")
def checkpoint(xcomposer2_checkpoint):
    return xcomposer2_checkpoint


@pytest.fixture(scope="module")
def reference(checkpoint):
    return XComposer2Reference(checkpoint)


def _engine(path, **kw) -> LLMEngine:
    kw.setdefault("cache_max_entry_count", 64)
    return LLMEngine(path, EngineConfig(dtype="float32", cache_block_seq_len=16, device=DEVICE, **kw))


@pytest.fixture(scope="module")
def engine(checkpoint):
    return _engine(checkpoint)


def _generate(engine: LLMEngine, messages, rid: str, new_tokens: int = NEW_TOKENS):
    ids, spans = engine.prepare_request(messages)
    engine.add_request(rid, ids, greedy(new_tokens), spans)
    tokens, last = [], None
    while rid in engine.requests:
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.token_ids
                last = out
    return tokens, last, ids, spans


def _prefill_logits(engine: LLMEngine, ids, spans) -> torch.Tensor:
    engine._encode_images(spans)
    seq = Sequence("prefill", ids, GenerationConfig(), 4096, images=spans)
    seq.block_table = list(range(-(-len(ids) // 16)))
    return engine.runner.run([ScheduledSeq(seq, 0, len(ids))])[0].cpu()


def test_clip_config_from_shapes(checkpoint):
    derived = clip_config_from_weights(CheckpointFiles(checkpoint)).to_dict()
    recorded = json.loads((checkpoint / "puyu_tiny.json").read_text())["clip_config"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps"):
        assert derived[key] == recorded[key], key


def test_prompt_layout(engine):
    image = _image(0)
    ids, spans = engine.prepare_request(_ask("Look: ", image, " What is it?"))
    assert len(spans) == 1 and spans[0].length == TOKENS_PER_IMAGE
    s = spans[0]
    assert ids[s.start:s.end] == [PLACEHOLDER_ID] * TOKENS_PER_IMAGE
    text = engine.tokenizer.decode(ids[:s.start], skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nLook: ") and "You see images." in text
    # a marker in the text places the image there, and no system message gets the default meta naming 浦语·灵笔
    marked = [{"role": "user", "content": [{"type": "text", "text": f"Q {IMAGE_TOKEN} A"},
                                           {"type": "image", "image": image}]}]
    ids2, spans2 = engine.prepare_request(marked)
    before = engine.tokenizer.decode(ids2[:spans2[0].start], skip_special_tokens=False)
    assert "浦语·灵笔" in before and before.endswith("user\nQ ")


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_logits_with_image_match_reference(checkpoint, engine, reference, kernels):
    image = _image(1)
    eng = engine if kernels == "torch" else _engine(checkpoint, kernels="auto")
    ids, spans = eng.prepare_request(_ask("Look: ", image, " Describe the picture."))
    ref = reference.logits(ids, [(spans[0].start, image)])[-1]
    got = _prefill_logits(eng, ids, spans)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # the check can see the Partial LoRA: without it the reference is far off
    no_lora = XComposer2Reference(checkpoint, plora=False).logits(ids, [(spans[0].start, image)])[-1]
    assert (no_lora - ref).abs().max() > 1e-2


def test_greedy_matches_reference_chunked_two_images(checkpoint, reference):
    """Prefill chunks of 16 tokens: the image spans are split across steps; two images in one prompt."""
    a, b = _image(2), _image(3, (70, 50))
    eng = _engine(checkpoint, max_prefill_token_num=16)
    tokens, last, ids, spans = _generate(eng, _ask(a, "and", b, "compare them"), "two")
    assert [s.start for s in spans][1] > spans[0].end
    assert tokens == reference.greedy(ids, [(spans[0].start, a), (spans[1].start, b)], NEW_TOKENS)
    # image tokens are counted in the prompt length (usage)
    assert last.input_token_len == len(ids)
    assert ids.count(PLACEHOLDER_ID) == 2 * TOKENS_PER_IMAGE


def test_image_changes_output(engine):
    first, *_ = _generate(engine, _ask(_image(4), "What is this?"), "img-a")
    second, *_ = _generate(engine, _ask(_image(5), "What is this?"), "img-b")
    assert first != second


def test_prefix_cache_is_keyed_by_image(checkpoint):
    """Same text, another image: the blocks holding image positions are not reused; the same image hits them."""
    eng = _engine(checkpoint, enable_prefix_caching=True)
    fresh = _engine(checkpoint, enable_prefix_caching=False)
    a, b = _image(6), _image(7)
    prompt_a, prompt_b = (_ask("Look at this please: ", im, "what is it?") for im in (a, b))
    _generate(eng, prompt_a, "a1")
    hit_before = eng.block_manager.stats.hit_tokens
    got_b, _, ids_b, spans_b = _generate(eng, prompt_b, "b1")
    reused = eng.block_manager.stats.hit_tokens - hit_before
    assert 0 < reused <= spans_b[0].start  # only blocks before the image
    assert got_b == _generate(fresh, prompt_b, "b-fresh")[0]
    hit_before = eng.block_manager.stats.hit_tokens
    got_a2, *_ = _generate(eng, prompt_a, "a2")
    assert eng.block_manager.stats.hit_tokens - hit_before > spans_b[0].end - 16
    assert got_a2 == _generate(fresh, prompt_a, "a-fresh")[0]


def test_preempted_image_requests_recompute_the_same(checkpoint):
    """A cache too small for three image requests at once: some are preempted and recomputed (their image
    features spliced in again), and every reply equals the reply it gets alone."""
    prompts = [_ask(f"Picture {i}: ", _image(20 + i), "tell me more") for i in range(3)]
    alone = [_generate(_engine(checkpoint), p, f"alone-{i}", 40)[0] for i, p in enumerate(prompts)]
    # 11 blocks of 16: two prompts of about 69 tokens (5 blocks each) start together, then grow to 7 blocks each
    eng = _engine(checkpoint, cache_max_entry_count=11, enable_prefix_caching=False)
    for i, p in enumerate(prompts):
        ids, spans = eng.prepare_request(p)
        eng.add_request(f"r{i}", ids, greedy(40), spans)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    while eng.requests:
        for out in eng.step():
            got[out.request_id] += out.token_ids
    assert eng.scheduler.num_preemptions > 0
    assert [got[f"r{i}"] for i in range(3)] == alone


def test_kv_int8_agrees(checkpoint, engine):
    """KV int8 with an image in the prompt: the last prompt logits stay close and greedy tokens mostly agree."""
    image = _image(8)
    messages = _ask("Look: ", image, " Describe it.")
    q8 = _engine(checkpoint, quant_policy=8)
    ids, spans = engine.prepare_request(messages)
    l0 = _prefill_logits(engine, ids, spans)
    ids8, spans8 = q8.prepare_request(messages)
    l8 = _prefill_logits(q8, ids8, spans8)
    assert int(l0.argmax()) == int(l8.argmax())
    p0, p8 = torch.log_softmax(l0, -1), torch.log_softmax(l8, -1)
    assert float((p0.exp() * (p0 - p8)).sum()) < 5e-3
    t0, *_ = _generate(engine, messages, "q0")
    t8, *_ = _generate(q8, messages, "q8")
    same = sum(x == y for x, y in zip(t0, t8)) / len(t0)
    assert t0[0] == t8[0] and same >= 0.5


def test_bad_image_inputs(engine, internlm2_checkpoint):
    with pytest.raises(ValueError, match=r"messages: 2 <ImageHere> markers for 1 images"):
        engine.prepare_request(_ask(f"{IMAGE_TOKEN}{IMAGE_TOKEN}", _image(0)))
    with pytest.raises(ValueError, match=r"messages\[1\]\.content\[0\]: not an image"):
        engine.prepare_request(_ask(b"not a png", "hi"))
    with pytest.raises(ValueError, match=r"messages: 9 images, over the limit of 8 per request"):
        engine.prepare_request(_ask(*[_image(0)] * 9, "so many"))
    text_only = _engine(internlm2_checkpoint)
    with pytest.raises(ValueError, match=r"messages\[1\]\.content\[1\]: model .* has no vision"):
        text_only.prepare_request(_ask("hi", _image(0)))
