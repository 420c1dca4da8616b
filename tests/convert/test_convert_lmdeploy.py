"""Against LMDeploy 0.7.3's own converter (run on CPU, its CUDA engine stubbed out): byte-identical tensor files,
the same config.yaml (but for names and embedding_size, see below), and puyu reads LMDeploy's workspaces.

Skipped when lmdeploy is not importable (it is an optional extra: `pip install lmdeploy<=0.7.3 --no-deps`).
"""
from __future__ import annotations

import pytest
import torch
import yaml

from convert_helpers import INT4_SHAPE, copy_checkpoint, lmdeploy_available, lmdeploy_convert
from puyu.cli import main
from puyu.convert.readers import read_hf_checkpoint
from puyu.convert.workspace import read_workspace
from puyu.tiny import TinyShape

pytestmark = pytest.mark.skipif(not lmdeploy_available(), reason="lmdeploy (<= 0.7.3) not importable")

# LMDeploy's InternLM2 reader assumes head_dim 128
INTERNLM2_D128 = TinyShape(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, intermediate_size=320)
# XComposer2 (Partial LoRA on every linear): LMDeploy cannot replicate KV heads of a LoRA B, so 2 KV heads for tp 2;
# FFN 330 is padded at tp 2 (w1/w3 B and w2 A get the padding)
XCOMPOSER2_D128 = TinyShape(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, intermediate_size=330)
CASES = {"llama-tp4": ("llama", INT4_SHAPE, 4, "hf"), "qwen2-tp2": ("qwen2", INT4_SHAPE, 2, "hf"),
         "internlm2-tp2": ("internlm2", INTERNLM2_D128, 2, "hf"), "qwen2-awq-tp2": ("qwen2", INT4_SHAPE, 2, "awq"),
         "xcomposer2-tp1": ("xcomposer2", XCOMPOSER2_D128, 1, "hf"),
         "xcomposer2-tp2": ("xcomposer2", XCOMPOSER2_D128, 2, "hf")}
# fields LMDeploy takes from its command line (model name, chat template); embedding_size: LMDeploy writes the
# unpadded vocab there and pads at load time, the spec asks for the padded rows; both load the same files
NAMING = {"model_name", "chat_template", "embedding_size"}


@pytest.fixture(scope="module")
def workspaces(checkpoint_factory, tmp_path_factory):
    """case -> (source dir, puyu's workspace, LMDeploy's workspace); LMDeploy runs once for all cases."""
    root = tmp_path_factory.mktemp("vs-lmdeploy")
    out, jobs = {}, []
    for case, (arch, shape, tp, fmt) in CASES.items():
        if arch == "xcomposer2":
            from puyu.tiny_xcomposer2 import build_xcomposer2_checkpoint

            src = build_xcomposer2_checkpoint(root / f"{case}-src", torch.float16, shape, seed=7)
        else:
            src = checkpoint_factory(arch, "fp16", shape)
        if arch == "internlm2":  # InternLM2's dynamic NTK rope scaling, as the real chat models have it
            src = copy_checkpoint(src, root / f"{case}-src", rope_scaling={"type": "dynamic", "factor": 2.0})
        if fmt == "awq":
            assert main(["quantize", str(src), "--dst-path", str(root / f"{case}-src")]) == 0
            src = root / f"{case}-src"
        ours, theirs = root / f"{case}-ours", root / f"{case}-theirs"
        assert main(["convert", str(src), "--dst-path", str(ours), "--tp", str(tp), "--no-progress"]) == 0
        jobs.append((src, theirs, tp, fmt))
        out[case] = (src, ours, theirs)
    lmdeploy_convert(jobs)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_files_identical_to_lmdeploy(workspaces, case):
    _, ours, theirs = workspaces[case]
    a, b = ours / "triton_models/weights", theirs / "triton_models/weights"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "config.yaml":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ya, yb = (yaml.safe_load((d / "config.yaml").read_text()) for d in (a, b))
    assert ya.keys() == yb.keys()
    allowed = set(NAMING)
    if case.startswith("internlm2"):
        # session_len: the spec scales it by the rope factor (the model's real context), LMDeploy 0.7.3 writes
        # max_position_embeddings; engine settings override it at load time anyway
        assert ya["attention_config"]["rope_scaling_type"] == "dynamic"
        assert (ya["model_config"]["session_len"], yb["model_config"]["session_len"]) == (4096, 2048)
        allowed.add("session_len")
    if case.startswith("xcomposer2"):  # PLoRA files per linear and rank, and LMDeploy's lora_config
        assert sum(".lora_a." in n or ".lora_b." in n for n in names) == 2 * 5 * 2 * CASES[case][2]
        assert yb["lora_config"] == {"lora_policy": "plora", "lora_r": 256, "lora_scale": 1.0, "lora_max_wo_r": 256,
                                     "lora_rank_pattern": "", "lora_scale_pattern": ""}
    for section in ya:
        diff = {k for k in set(ya[section]) | set(yb[section]) if ya[section].get(k) != yb[section].get(k)}
        assert diff <= allowed, {k: (ya[section].get(k), yb[section].get(k)) for k in diff}


@pytest.mark.parametrize("case", list(CASES))
def test_puyu_reads_lmdeploy_workspace(workspaces, case):
    """The same tensors as the HF directory, so the engine serves LMDeploy's workspace like the original."""
    src, _, theirs = workspaces[case]
    _, expected = read_hf_checkpoint(src)
    _, got = read_workspace(theirs)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
