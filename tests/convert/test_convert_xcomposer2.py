"""The XComposer2 reader: PLoRA tensors in TurboMind layout, the CLIP config from shapes, `.bin` shards (as the
VL-7B ships), and `puyu inspect` on the checkpoint."""
from __future__ import annotations

import shutil

import torch

from puyu.cli import main
from puyu.convert import load_model_weights
from puyu.convert.readers import permute_rotary_rows
from puyu.testing import load_shards, random_image


def _bin_copy(src, dst):
    """The same checkpoint with its weights as two pickled `pytorch_model-*.bin` shards and their index."""
    import json

    shutil.copytree(src, dst)
    shards = load_shards(dst)
    weight_map = {}
    for k, (name, tensors) in enumerate(sorted(shards.items())):
        fname = f"pytorch_model-{k + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(dict(tensors), dst / fname)
        weight_map.update({n: fname for n in tensors})
        (dst / name).unlink()
    (dst / "model.safetensors.index.json").unlink()
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def test_plora_tensors_in_turbomind_layout(xcomposer2_checkpoint):
    spec, w = load_model_weights(xcomposer2_checkpoint, torch.float32)
    hf = {k: v.float() for shard in load_shards(xcomposer2_checkpoint).values() for k, v in shard.items()}
    assert spec.vision == "xcomposer2" and spec.img_size == 56
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        torch.testing.assert_close(w[f"layers.{i}.attention.wo.lora_a.weight"],
                                   hf[p + "attention.wo.Plora_A.weight"].t())
        torch.testing.assert_close(w[f"layers.{i}.feed_forward.w2.lora_b.weight"],
                                   hf[p + "feed_forward.w2.Plora_B.weight"].t())
        # w_qkv's B is permuted exactly like w_qkv's own output columns: (x A) B adds to x w_qkv column by column
        a, b = hf[p + "attention.wqkv.Plora_A.weight"], hf[p + "attention.wqkv.Plora_B.weight"]
        x = torch.randn(3, spec.hidden_size)
        hf_delta = x @ a.t() @ b.t()  # grouped HF order
        tm_delta = x @ w[f"layers.{i}.attention.w_qkv.lora_a.weight"] @ w[f"layers.{i}.attention.w_qkv.lora_b.weight"]
        g, d = spec.num_heads // spec.num_kv_heads, spec.head_dim
        grouped = hf_delta.t().reshape(spec.num_kv_heads, g + 2, d, 3)
        q = permute_rotary_rows(grouped[:, :g].reshape(-1, 3), spec.num_heads, d)
        k = permute_rotary_rows(grouped[:, g].reshape(-1, 3), spec.num_kv_heads, d)
        v = grouped[:, g + 1].reshape(-1, 3)
        torch.testing.assert_close(tm_delta, torch.cat([q, k, v]).t(), atol=1e-5, rtol=1e-5)


def test_bin_shards_read_like_safetensors(xcomposer2_checkpoint, tmp_path):
    from puyu.engine.xcomposer2_vision import XComposer2Vision, preprocess

    bins = _bin_copy(xcomposer2_checkpoint, tmp_path / "bin")
    _, a = load_model_weights(xcomposer2_checkpoint, torch.float32)
    _, b = load_model_weights(bins, torch.float32)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pixels = preprocess(random_image(0, (30, 20)), 56)[None]
    feats = [XComposer2Vision(d, torch.float32, torch.device("cpu")).encode(pixels)
             for d in (xcomposer2_checkpoint, bins)]
    assert feats[0].shape == (1, 16, 64) and torch.equal(*feats)


def test_inspect_shows_the_vision_side(xcomposer2_checkpoint, tmp_path, capsys):
    assert main(["inspect", str(xcomposer2_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "architecture: InternLMXComposer2ForCausalLM" in out
    assert "vision: CLIP ViT (2 layers, hidden 128, 2 heads, patch 14) at 56 px" in out
    assert "image_tokens: 4x4 = 16 per image" in out and "plora_r: 8" in out
    assert main(["inspect", str(_bin_copy(xcomposer2_checkpoint, tmp_path / "bin"))]) == 0
    assert "plora_r: 8" in capsys.readouterr().out


def test_convert_round_trip_and_workspace_refused_by_the_vl_engine(xcomposer2_checkpoint, tmp_path):
    """`puyu convert` writes the PLoRA files; reading the workspace back gives the reader's tensors; the native
    engine refuses the workspace (no vision tower in it) with a message naming it."""
    import pytest

    from puyu.config import EngineConfig
    from puyu.convert.spec import CheckpointError
    from puyu.convert.workspace import read_workspace
    from puyu.engine.llm_engine import LLMEngine

    ws = tmp_path / "ws"
    assert main(["convert", str(xcomposer2_checkpoint), "--dst-path", str(ws), "--tp", "2", "--no-progress"]) == 0
    _, expected = load_model_weights(xcomposer2_checkpoint)
    spec, got = read_workspace(ws)
    assert spec.lora_r == 8 and got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(CheckpointError, match="holds no vision tower"):
        LLMEngine(ws, EngineConfig(dtype="float32", cache_max_entry_count=16))
