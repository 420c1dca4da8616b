"""Rotary scaling (linear, dynamic NTK) against transformers, on prompts longer than the original context."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine_helpers import greedy, make_prompts, reference_greedy
from puyu.convert.reference import load_reference_model
from puyu.tiny import TinyShape

SHAPE = TinyShape(max_position_embeddings=48)


@pytest.fixture(scope="module", params=[("internlm2", "linear"), ("llama", "dynamic"), ("internlm2", "dynamic")],
                ids=lambda p: "-".join(p))
def scaled_checkpoint(request, checkpoint_factory, tmp_path_factory):
    arch, kind = request.param
    src = checkpoint_factory(arch, "fp16", SHAPE)
    dst = tmp_path_factory.mktemp(f"rope-{arch}-{kind}") / "ckpt"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_scaling"] = {"type": kind, "factor": 2.0}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_scaled_rope_matches_transformers(scaled_checkpoint, make_pipeline):
    ref = load_reference_model(scaled_checkpoint, torch.float32)
    prompt = make_prompts(ref.config.vocab_size, (70,), seed=11)[0]  # beyond the original 48 positions
    pipe = make_pipeline(scaled_checkpoint)
    assert pipe.engine.session_len == 96  # 48 * factor 2
    out = pipe(prompt, greedy(16, logprobs=0))
    with torch.no_grad():  # first: transformers' dynamic rotary keeps the longest length it has seen
        expect = torch.log_softmax(ref(torch.tensor([prompt])).logits[0, -1], -1)
    assert out.token_ids == reference_greedy(ref, prompt, 16)
    assert abs(out.logprobs[0][out.token_ids[0]] - float(expect[out.token_ids[0]])) < 1e-4
