"""Small synthetic GGUF files (written with `gguf.GGUFWriter`, see gguf_helpers) through puyu against transformers'
own GGUF loader; damaged / unsupported files; transformers-5 `rope_parameters` in config.json. The K-quants are in
test_gguf_kquants.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gguf_helpers import cache, hf_greedy, needs_tokenizer, puyu_greedy, quantizable, tokenizer_fields, write_gguf

from puyu.config import GenerationConfig
from puyu.convert.spec import CheckpointError

__all__ = ["cache", "tokenizer_fields"]  # fixtures


# ---- 6. synthetic files against transformers -------------------------------------------------------------------------
@needs_tokenizer
@pytest.mark.parametrize("arch, qtype", [("llama", "mixed"), ("qwen2", "mixed"), ("llama", "Q4_1"),
                                         ("qwen2", "Q4_0")])
def test_synthetic_greedy_matches_transformers(cache, tokenizer_fields, tmp_path, arch, qtype):
    quantizable(qtype)
    path = write_gguf(tmp_path / f"tiny-{arch}-{qtype}.gguf", tokenizer_fields, arch, qtype, seed=1)
    ours, ref = puyu_greedy(path), hf_greedy(path)
    assert ours == ref


@needs_tokenizer
def test_llama_rope_freq_base(cache, tokenizer_fields, tmp_path):
    from puyu.convert import read_model_spec
    from puyu.resolve import resolve_model_path

    path = write_gguf(tmp_path / "tiny-llama-rope.gguf", tokenizer_fields, "llama", "F32", rope_theta=100000.0, seed=2)
    assert read_model_spec(resolve_model_path(str(path))).rope_theta == 100000.0
    assert puyu_greedy(path) == hf_greedy(path)


# ---- 7. bad files ----------------------------------------------------------------------------------------------------
def _no_sidecar_for(cache: Path, stem: str) -> bool:
    d = cache / "gguf"
    return not d.exists() or not [p for p in d.rglob("*") if stem in p.name]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puyu.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def small_valid(tokenizer_fields, tmp_path) -> Path:
    return write_gguf(tmp_path / "valid.gguf", tokenizer_fields, "llama", "F16", seed=3)


@needs_tokenizer
def test_truncated_file(cache, small_valid, tmp_path):
    from puyu.resolve import resolve_model_path

    data = small_valid.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        resolve_model_path(str(bad))
    r = _cli("inspect", str(bad))
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], r.stderr
    assert _no_sidecar_for(cache, "truncated")


@needs_tokenizer
def test_unknown_architecture(cache, tokenizer_fields, tmp_path):
    import gguf

    from puyu.resolve import resolve_model_path

    bad = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(bad), "gpt2")
    w.add_uint32("gpt2.block_count", 1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="gpt2") as exc:
        resolve_model_path(str(bad))
    assert str(bad) in str(exc.value)
    r = _cli("inspect", str(bad))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr, r
    assert _no_sidecar_for(cache, "gpt2")


def test_not_a_gguf_file(cache, tmp_path):
    from puyu.convert.gguf import gguf_model_dir

    bad = tmp_path / "notes.gguf"
    bad.write_text("this is not a GGUF file\n")
    with pytest.raises(CheckpointError, match="not a GGUF") as exc:
        gguf_model_dir(bad)
    assert str(bad) in str(exc.value)
    r = _cli("inspect", str(bad))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr, r
    assert _no_sidecar_for(cache, "notes")


@needs_tokenizer
def test_unsupported_tensor_type(cache, tokenizer_fields, tmp_path):
    from puyu.resolve import resolve_model_path

    bad = write_gguf(tmp_path / "int8.gguf", tokenizer_fields, "llama", "F32", seed=4,
                     extra_tensor=("blk.0.weird.weight", np.ones((4, 32), np.int8)))
    with pytest.raises(CheckpointError, match="blk.0.weird.weight") as exc:
        resolve_model_path(str(bad))
    assert "I8" in str(exc.value) and str(bad) in str(exc.value)
    assert _no_sidecar_for(cache, "int8")


# ---- 8. transformers-5 rope_parameters in config.json ----------------------------------------------------------------
def _with_rope_parameters(src: Path, dst: Path, theta: float) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.mark.parametrize("arch", ["llama", "qwen2", "internlm2"])
def test_rope_parameters_read(checkpoint_factory, tmp_path, arch):
    from puyu.convert import read_model_spec

    d = _with_rope_parameters(checkpoint_factory(arch, "fp16"), tmp_path / arch, 100000.0)
    assert read_model_spec(d).rope_theta == 100000.0


def test_rope_parameters_logits_match_transformers(checkpoint_factory, tmp_path):
    import puyu
    from puyu.convert.reference import load_reference_model

    d = _with_rope_parameters(checkpoint_factory("llama", "fp16"), tmp_path / "llama", 100000.0)
    ref = load_reference_model(d, torch.float32)
    assert getattr(ref.config, "rope_theta", None) == 100000.0 or \
        (getattr(ref.config, "rope_parameters", None) or {}).get("rope_theta") == 100000.0
    prompt = list(range(5, 37))
    with puyu.pipeline(str(d), dtype="float32") as pipe:
        r = pipe(prompt, GenerationConfig(max_new_tokens=8, ignore_eos=True, logprobs=0))
    with torch.no_grad():
        logp = ref(torch.tensor([prompt + r.token_ids])).logits[0].float().log_softmax(-1)
    for t, (tok, lp) in enumerate(zip(r.token_ids, r.logprobs)):
        assert int(logp[len(prompt) - 1 + t].argmax()) == tok
        assert abs(lp[tok] - logp[len(prompt) - 1 + t, tok].item()) < 1e-3
