"""`puyu quantize` with activation-aware scaling, and `puyu inspect`."""
from __future__ import annotations

import json

import pytest
import torch

from convert_helpers import INT4_SHAPE
from puyu.cli import main
from puyu.convert.awq_scale import apply_awq_scales, search_scales
from puyu.convert.readers import CheckpointFiles, iter_turbomind_tensors
from puyu.convert.spec import read_model_spec
from puyu.tiny import _CORPUS


def test_scale_search_beats_rtn_on_outlier_channels():
    """Inputs with a few large channels (as real activations have): the searched scales cut the error."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    x[:, :4] *= 30.0
    w = torch.randn(64, 128, generator=gen)
    scales, r = search_scales([w], x, 64)
    assert r.alpha > 0 and r.loss < 0.7 * r.rtn_loss
    assert scales.shape == (128,) and torch.all(scales[:4] > scales[4:].max())


class _Dict:
    """A `CheckpointFiles` stand-in over an in-memory dict (HF names)."""

    def __init__(self, weights, model_dir):
        self.weights, self.model_dir = weights, model_dir

    def get(self, name):
        return self.weights[name]

    def __contains__(self, name):
        return name in self.weights


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(_CORPUS * 2)
    return path


def test_scaling_leaves_the_float_model_unchanged(checkpoint_factory, calib):
    from test_convert_engine import engine_logits

    src = checkpoint_factory("internlm2", "fp16", INT4_SHAPE)
    spec = read_model_spec(src)
    files = CheckpointFiles(src)
    original = {n: files.get(n).float() for n in files.names()}
    scaled = dict(original)
    results = apply_awq_scales(src, spec, scaled, calib.read_text(), 64, max_tokens=64)
    assert len(results) == 3 * spec.num_layers and all(r.loss <= r.rtn_loss for r in results)
    changed = "model.layers.0.attention_norm.weight"
    assert not torch.equal(scaled[changed], original[changed])
    prompts = [[5, 17, 99, 230, 41, 7, 300]]
    before = engine_logits(spec, dict(iter_turbomind_tensors(_Dict(original, src), spec)), prompts)
    after = engine_logits(spec, dict(iter_turbomind_tensors(_Dict(scaled, src), spec)), prompts)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-3)


def test_quantize_cli_with_calibration(checkpoint_factory, calib, tmp_path, capsys):
    src = checkpoint_factory("llama", "fp16", INT4_SHAPE)
    dst = tmp_path / "awq"
    rc = main(["quantize", str(src), "--dst-path", str(dst), "--group-size", "64", "--calib-file", str(calib),
               "--calib-tokens", "64"])
    assert rc == 0 and "activation-aware" in capsys.readouterr().out
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert main(["convert", str(dst), "--dst-path", str(tmp_path / "ws"), "--no-progress"]) == 0
    rc = main(["quantize", str(src), "--dst-path", str(tmp_path / "x"), "--calib-file", str(tmp_path / "none.txt")])
    assert rc == 2 and "calibration text file not found" in capsys.readouterr().err


def test_inspect_checkpoint_and_workspace(checkpoint_factory, tmp_path, capsys):
    src = checkpoint_factory("qwen2")
    assert main(["inspect", str(src), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "HF checkpoint" in out and "Qwen2ForCausalLM" in out and "model.layers.1.self_attn.q_proj.bias" in out
    assert main(["convert", str(src), "--dst-path", str(tmp_path / "ws"), "--tp", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ws"), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "TurboMind workspace" in out and "tp: 2" in out and "dtype: float16" in out
    line = next(ln for ln in out.splitlines() if "layers.0.attention.w_qkv.1.weight" in ln)
    assert line.split()[1:] == ["64x64", "float16", str(64 * 64 * 2)]  # (4 + 2*2) heads x 16 / 2 ranks
    total = sum(f.stat().st_size for f in (tmp_path / "ws/triton_models/weights").iterdir() if f.name != "config.yaml")
    assert f"({total} bytes)" in out
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
