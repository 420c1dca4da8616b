"""Every bad input gets one clear line on stderr, exit code 2, and leaves no workspace (half-written or not)."""
from __future__ import annotations

import json

import pytest

from convert_helpers import INT4_SHAPE, copy_checkpoint
from puyu.cli import main
from puyu.convert.spec import CheckpointError
from puyu.convert.workspace import read_workspace


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _no_leftovers(dst) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp-")]


def _convert_fails(capsys, src, dst, *extra: str, match: str) -> None:
    rc, err = _run(capsys, "convert", str(src), "--dst-path", str(dst), "--no-progress", *extra)
    assert rc == 2, err
    assert err.startswith("puyu: error:") and match in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    _no_leftovers(dst)


def test_unsupported_architecture(checkpoint_factory, tmp_path, capsys):
    src = copy_checkpoint(checkpoint_factory("llama"), tmp_path / "src", architectures=["MambaForCausalLM"])
    _convert_fails(capsys, src, tmp_path / "ws", match="unsupported architecture 'MambaForCausalLM'")


def test_missing_shard(checkpoint_factory, tmp_path, capsys):
    src = copy_checkpoint(checkpoint_factory("qwen2"), tmp_path / "src")
    (src / "model-00002-of-00002.safetensors").unlink()
    _convert_fails(capsys, src, tmp_path / "ws", match="model-00002-of-00002.safetensors: shard listed")


def test_shape_mismatch_midway_leaves_nothing(checkpoint_factory, tmp_path, capsys):
    """The FFN width in config.json is wrong: embeddings are already written when layer 0 fails."""
    src = copy_checkpoint(checkpoint_factory("internlm2"), tmp_path / "src", intermediate_size=96)
    _convert_fails(capsys, src, tmp_path / "ws", "--tp", "2", match="shape")


def test_non_empty_destination_needs_force(internlm2_checkpoint, tmp_path, capsys):
    dst = tmp_path / "ws"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, err = _run(capsys, "convert", str(internlm2_checkpoint), "--dst-path", str(dst), "--no-progress")
    assert rc == 2 and "not empty" in err and "--force" in err
    assert (dst / "keep.txt").read_text() == "mine" and not (dst / "triton_models").exists()
    rc, _ = _run(capsys, "convert", str(internlm2_checkpoint), "--dst-path", str(dst), "--no-progress", "--force")
    assert rc == 0 and (dst / "triton_models/weights/config.yaml").exists() and not (dst / "keep.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(capsys, "convert", str(internlm2_checkpoint), "--dst-path", str(empty), "--no-progress")[0] == 0


@pytest.mark.parametrize("tp,match", [("8", "tp 8 does not divide the 4 attention heads"),
                                      ("3", "tp must be one of")])
def test_tp_not_dividing_heads(internlm2_checkpoint, tmp_path, capsys, tp, match):
    _convert_fails(capsys, internlm2_checkpoint, tmp_path / "ws", "--tp", tp, match=match)


def test_kv_heads_not_divisible(checkpoint_factory, tmp_path, capsys):
    from puyu.tiny import TinyShape

    src = checkpoint_factory("llama", "fp16", TinyShape(hidden_size=96, num_attention_heads=12,
                                                        num_key_value_heads=3))
    _convert_fails(capsys, src, tmp_path / "ws", "--tp", "4", match="does not divide the 3 KV heads")


@pytest.fixture(scope="module")
def awq_dir(checkpoint_factory, tmp_path_factory):
    src = checkpoint_factory("llama", "fp16", INT4_SHAPE)
    dst = tmp_path_factory.mktemp("awq-err") / "awq"
    assert main(["quantize", str(src), "--dst-path", str(dst), "--group-size", "128"]) == 0
    return dst


def test_unsupported_group_size(checkpoint_factory, awq_dir, tmp_path, capsys):
    src = checkpoint_factory("llama", "fp16", INT4_SHAPE)
    rc, err = _run(capsys, "quantize", str(src), "--dst-path", str(tmp_path / "q"), "--group-size", "48")
    assert rc == 2 and "unsupported group size 48" in err
    _no_leftovers(tmp_path / "q")
    bad = copy_checkpoint(awq_dir, tmp_path / "awq16")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 16
    (bad / "config.json").write_text(json.dumps(cfg))
    _convert_fails(capsys, bad, tmp_path / "ws", match="unsupported group size 16")
    _convert_fails(capsys, awq_dir, tmp_path / "ws", "--group-size", "64",
                   match="--group-size 64 does not match the checkpoint's quantization_config.group_size 128")
    _convert_fails(capsys, awq_dir, tmp_path / "ws", "--tp", "4",
                   match="group size 128 does not divide the attention output rows per rank")


def test_model_format_mismatch(internlm2_checkpoint, awq_dir, tmp_path, capsys):
    _convert_fails(capsys, internlm2_checkpoint, tmp_path / "ws", "--model-format", "awq",
                   match="needs an AutoAWQ checkpoint")
    _convert_fails(capsys, awq_dir, tmp_path / "ws", "--model-format", "hf", match="--model-format awq")
    bad = copy_checkpoint(awq_dir, tmp_path / "gptq")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (bad / "config.json").write_text(json.dumps(cfg))
    _convert_fails(capsys, bad, tmp_path / "ws", match="unsupported quantization_config")


def test_not_a_directory(tmp_path, capsys):
    _convert_fails(capsys, tmp_path / "nowhere", tmp_path / "ws", match="nowhere")


def test_damaged_workspace_errors_name_the_file(internlm2_checkpoint, tmp_path, capsys):
    assert main(["convert", str(internlm2_checkpoint), "--dst-path", str(tmp_path / "ws"), "--tp", "2",
                 "--no-progress"]) == 0
    weights = tmp_path / "ws/triton_models/weights"
    f = weights / "layers.1.feed_forward.w2.1.weight"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w2\.1\.weight: .*shape mismatch"):
        read_workspace(tmp_path / "ws")
    f.unlink()
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w2\.1\.weight: tensor file missing"):
        read_workspace(tmp_path / "ws")
    (weights / "config.yaml").write_text("model_config: [1, 2")
    rc, err = _run(capsys, "inspect", str(tmp_path / "ws"))
    assert rc == 2 and "config.yaml: not valid YAML" in err
