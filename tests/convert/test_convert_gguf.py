"""`puyu convert model.gguf`: a Q4_1 file becomes the int4 workspace (group 32), a file of other types an fp16 one;
either serves with the same greedy tokens as the GGUF file itself. Bad requests: one line, exit 2, no workspace.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf_helpers import PROMPT, cache, needs_tokenizer, tokenizer_fields, write_gguf

from puyu.config import GenerationConfig
from puyu.convert.spec import CheckpointError

__all__ = ["cache", "tokenizer_fields"]  # fixtures
PROMPTS = [PROMPT, [1, 9906, 11, 856, 836, 374], [504, 3458, 282, 4649, 314, 28, 216, 88, 1029, 30, 16]]
NEW_TOKENS = 16


def _convert(src: Path, dst: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puyu.cli", "convert", str(src), "--dst-path", str(dst), *args],
                          capture_output=True, text=True, timeout=120)


def _greedy(model: Path) -> list[list[int]]:
    import puyu

    with puyu.pipeline(str(model)) as pipe:
        return [r.token_ids for r in pipe(PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True))]


def _weight_config(ws: Path) -> str:
    return (ws / "triton_models" / "weights" / "config.yaml").read_text()


@pytest.fixture(scope="module")
def q4_file(cache, tokenizer_fields, tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf", tokenizer_fields, "llama", "Q4_1", seed=7)


@pytest.fixture(scope="module")
def mixed_file(cache, tokenizer_fields, tmp_path_factory) -> Path:
    """qwen2 (HF rotary order, q/k/v biases) with linears cycling F32, F16, Q8_0, Q4_0, Q4_1."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf", tokenizer_fields, "qwen2", "mixed", seed=8)


@needs_tokenizer
def test_q4_1_file_to_int4_workspace(q4_file, tmp_path):
    from puyu.convert import load_model_weights
    from puyu.resolve import resolve_model_path

    ws = tmp_path / "ws"
    r = _convert(q4_file, ws)
    assert r.returncode == 0, r.stderr
    assert "weight_type: int4" in _weight_config(ws) and "group_size: 32" in _weight_config(ws)
    assert not (ws / "gguf_source.json").exists()  # the workspace stands alone
    _, ours = load_model_weights(ws)
    _, src = load_model_weights(resolve_model_path(str(q4_file)))
    for name in ("layers.1.attention.w_qkv", "layers.0.feed_forward.w2"):
        assert torch.equal(ours[f"{name}.qweight"], src[f"{name}.qweight"])
        assert torch.equal(ours[f"{name}.scales"], src[f"{name}.scales"])
        # Q4_1's zero -m/d is not an integer: the workspace keeps it in fp16
        torch.testing.assert_close(ours[f"{name}.zeros"].float(), src[f"{name}.zeros"], rtol=1e-3, atol=1e-3)
    assert _greedy(ws) == _greedy(q4_file)


@needs_tokenizer
def test_mixed_file_to_fp16_workspace(mixed_file, tmp_path):
    ws = tmp_path / "ws"
    r = _convert(mixed_file, ws)
    assert r.returncode == 0, r.stderr
    assert "weight_type: float16" in _weight_config(ws)
    assert _greedy(ws) == _greedy(mixed_file)


def _one_line_error(r: subprocess.CompletedProcess, path: Path) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and str(path) in lines[0], r


@needs_tokenizer
def test_awq_needs_q4_linears(mixed_file, tmp_path):
    ws = tmp_path / "ws"
    r = _convert(mixed_file, ws, "--model-format", "awq")
    _one_line_error(r, mixed_file)
    assert "Q4_0/Q4_1" in r.stderr
    assert not ws.exists() and not list(tmp_path.glob(".ws.tmp-*"))


@needs_tokenizer
def test_truncated_file(q4_file, tmp_path):
    bad = tmp_path / "truncated.gguf"
    data = q4_file.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    ws = tmp_path / "ws"
    r = _convert(bad, ws)
    _one_line_error(r, bad)
    assert not ws.exists() and not list(tmp_path.glob(".ws.tmp-*"))


@needs_tokenizer
def test_group_size_must_be_32(q4_file, tmp_path):
    from puyu.convert.writer import ConvertOptions, convert_checkpoint
    from puyu.resolve import resolve_model_path

    options = ConvertOptions(model_format="awq", group_size=64, progress=False)
    with pytest.raises(CheckpointError, match="group-size 64") as exc:
        convert_checkpoint(resolve_model_path(str(q4_file)), tmp_path / "ws", options)
    assert str(q4_file) in str(exc.value) and not (tmp_path / "ws").exists()
