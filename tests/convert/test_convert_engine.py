"""The native engine serves a workspace like the HF directory it came from, and int4 within quantisation error."""
from __future__ import annotations

import pytest
import torch

from convert_helpers import INT4_SHAPE
from puyu.cli import main
from puyu.config import GenerationConfig
from puyu.convert import load_model_weights
from puyu.engine.block_manager import BlockManager
from puyu.engine.int4 import Int4Linear
from puyu.engine.kv_cache import KVCacheStorage
from puyu.engine.model import DecoderModel
from puyu.engine.model_runner import ModelRunner
from puyu.engine.sequence import ScheduledSeq, Sequence

PROMPT_LENGTHS = (7, 19)


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab - 8, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def engine_logits(spec, weights, prompts) -> torch.Tensor:
    """Last-token logits of one prefill step of the engine's decoder (fp32, cpu)."""
    model = DecoderModel(spec, weights, torch.device("cpu"))
    cache = KVCacheStorage(spec.num_layers, 16, 16, spec.num_kv_heads, spec.head_dim, torch.float32, "cpu")
    bm = BlockManager(16, 16)
    seqs = [Sequence(str(i), p, GenerationConfig()) for i, p in enumerate(prompts)]
    for s in seqs:
        assert bm.allocate(s, len(s))
    return ModelRunner(model, cache).run([ScheduledSeq(s, 0, len(s)) for s in seqs])


def _logits(path, prompts=None):
    spec, weights = load_model_weights(path, torch.float32)
    prompts = prompts or _prompts(spec.vocab_size)
    return engine_logits(spec, weights, prompts), prompts


def _greedy(path) -> tuple[list[int], list[float]]:
    from puyu.engine.pipeline import pipeline

    pipe = pipeline(str(path), cache_max_entry_count=32, dtype="float32")
    try:
        r = pipe("The quick brown fox", GenerationConfig(max_new_tokens=16, ignore_eos=True, logprobs=0))
    finally:
        getattr(pipe, "close", lambda: None)()
    return r.token_ids, [next(iter(d.values())) for d in r.logprobs]


@pytest.mark.parametrize("tp", [1, 4])
def test_workspace_gives_the_same_logits_as_hf_dir(tiny_checkpoint, tmp_path, tp):
    ws = tmp_path / "ws"
    assert main(["convert", str(tiny_checkpoint), "--dst-path", str(ws), "--tp", str(tp), "--no-progress"]) == 0
    hf, prompts = _logits(tiny_checkpoint)
    got, _ = _logits(ws, prompts)
    torch.testing.assert_close(got, hf, rtol=0, atol=0)


def test_pipeline_serves_workspace_like_hf_dir(internlm2_checkpoint, tmp_path):
    ws = tmp_path / "ws"
    assert main(["convert", str(internlm2_checkpoint), "--dst-path", str(ws), "--tp", "2", "--no-progress"]) == 0
    ids, logprobs = _greedy(internlm2_checkpoint)
    ids_ws, logprobs_ws = _greedy(ws)
    assert ids_ws == ids and len(ids) == 16
    assert logprobs_ws == pytest.approx(logprobs, abs=1e-5)


@pytest.fixture(scope="module")
def int4_case(checkpoint_factory, tmp_path_factory):
    src = checkpoint_factory("internlm2", "fp16", INT4_SHAPE)
    root = tmp_path_factory.mktemp("int4-engine")
    assert main(["quantize", str(src), "--dst-path", str(root / "awq"), "--group-size", "64"]) == 0
    assert main(["convert", str(root / "awq"), "--dst-path", str(root / "ws"), "--tp", "4", "--no-progress"]) == 0
    return src, root / "awq", root / "ws"


def _dequantised(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float weights equal to the int4 ones (for the engine's dense path)."""
    out = {}
    for name, t in weights.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            scales = weights[base + ".scales"]
            lin = Int4Linear(t, scales, weights[base + ".zeros"], t.shape[0] // scales.shape[0])
            out[base + ".weight"] = lin.dequantize(torch.float32)
        elif not name.endswith((".scales", ".zeros")):
            out[name] = t
    return out


def test_int4_workspace_logits(int4_case, checkpoint_factory):
    src, awq, ws = int4_case
    fp, prompts = _logits(src)
    spec, weights = load_model_weights(ws, torch.float32)
    assert any(k.endswith(".qweight") for k in weights)
    int4 = engine_logits(spec, weights, prompts)
    # the int4 path computes exactly the model its integers describe ...
    torch.testing.assert_close(int4, engine_logits(spec, _dequantised(weights), prompts), rtol=1e-4, atol=1e-4)
    # ... the AWQ directory served directly gives the same ...
    torch.testing.assert_close(_logits(awq, prompts)[0], int4, rtol=1e-4, atol=1e-4)
    # ... and that model is the float one within 4-bit quantisation error. This random 2-layer model amplifies the
    # error (measured: 0.23 and 0.41 relative); the same architecture with other random weights is at ~1.4.
    other, _ = _logits(checkpoint_factory("internlm2", "fp16", INT4_SHAPE, seed=1), prompts)
    rel = (int4 - fp).norm(dim=-1) / fp.norm(dim=-1)
    rel_other = (other - fp).norm(dim=-1) / fp.norm(dim=-1)
    assert torch.all(rel < 0.5) and torch.all(rel < rel_other / 2), (rel, rel_other)


def test_int4_linears_within_rtn_error(int4_case):
    """Each 4-bit linear of the workspace against its float original: ~9% relative output error for Gaussian weights
    at 4 bits per group of 64 (step ~ range/15, noise step/sqrt(12)); 15% allowed."""
    src, _, ws = int4_case
    _, fp = load_model_weights(src, torch.float32)
    _, q = load_model_weights(ws, torch.float32)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    linears = [n[: -len(".qweight")] for n in q if n.endswith(".qweight")]
    assert len(linears) == 5 * 2
    for name in linears:
        w = fp[name + ".weight"]
        lin = Int4Linear(q[name + ".qweight"], q[name + ".scales"], q[name + ".zeros"], 64)
        xin = x if w.shape[0] == 256 else torch.randn(8, w.shape[0], generator=torch.Generator().manual_seed(1))
        ref = xin @ w
        rel = ((lin(xin) - ref).norm() / ref.norm()).item()
        assert 0.01 < rel < 0.15, (name, rel)


def test_int4_greedy_same_from_awq_dir_and_workspace(int4_case):
    _, awq, ws = int4_case
    assert _greedy(ws)[0] == _greedy(awq)[0]
