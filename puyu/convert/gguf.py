"""GGUF files (llama.cpp's format) as puyu checkpoints.

A GGUF file is opened once into a small *sidecar directory* under the puyu cache (`gguf/<key>/<file stem>/`) that
holds what every other part of puyu reads from an HF checkpoint: `config.json` and `generation_config.json` written
from the GGUF metadata, the tokenizer (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`) built from
the metadata by transformers' GGUF tokenizer converter, and `gguf_source.json` naming the file. The weights stay in
the GGUF file and are read from it (memory-mapped) by `read_gguf_weights`; the key changes when the file does.

Weights land in the TurboMind layout of DEVELOPERS.md. llama.cpp stores the q/k rows of `llama` and `internlm2`
already permuted to interleaved-pair rotary (its converter undoes HF's half split), which is TurboMind's order, so
those rows are taken as they are; `qwen2` files keep HF's order (llama.cpp runs them with NEOX rotary) and are
permuted like an HF checkpoint. Q4_0 / Q4_1 linears (groups of 32 along the input, `w = d*q - 8d` / `w = d*q + m`)
map exactly onto the group-wise int4 layout (`scales = d`, `zeros = 8` / `-m/d`) and stay packed unless
`dequantize=True`; every other type is dequantised with `gguf.quants`.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .spec import CheckpointError, ModelSpec, read_json, read_model_spec

if TYPE_CHECKING:
    import torch

SOURCE_FILE = "gguf_source.json"
GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "internlm2": "InternLM2ForCausalLM"}
# the tensor types read here; 4-bit types in PACKED_TYPES are kept packed
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
PACKED_TYPES = ("Q4_0", "Q4_1")
GROUP = 32
_LINEARS = {"attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
            "ffn_down": "feed_forward.w2"}


def is_gguf_file(path: Path | str) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def is_gguf_dir(path: Path | str) -> bool:
    return (Path(path) / SOURCE_FILE).is_file()


# ---- opening a file ------------------------------------------------------------------------------------------------
def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` over the file; every way a file can be wrong is one CheckpointError naming it."""
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not is_gguf_file(path):
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic at the start)")
    try:
        reader = _fast_reader(gguf, path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors ... on a damaged file
        raise CheckpointError(f"{path}: truncated or damaged GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHS)}")
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which puyu does not "
                                  f"read; supported: {', '.join(SUPPORTED_TYPES)}")
    return reader


class _PlainMemmap:
    """numpy for gguf's reader, whose `memmap` gives a plain ndarray view of the map: the reader slices the map
    hundreds of thousands of times for the vocabulary, and np.memmap's per-slice bookkeeping made that 3x slower
    (4.5 s vs 1.6 s for SmolLM2's 49k tokens). The data is the same read-only map."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def memmap(*args: Any, **kwargs: Any) -> np.ndarray:
        return np.memmap(*args, **kwargs).view(np.ndarray)


def _fast_reader(gguf: Any, path: Path) -> Any:
    module = gguf.gguf_reader
    saved = module.np
    module.np = _PlainMemmap()
    try:
        return gguf.GGUFReader(str(path), "r")
    finally:
        module.np = saved


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception:
        return default


def _required(reader: Any, path: Path, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise CheckpointError(f"{path}: GGUF metadata {key!r} is missing")
    return value


# ---- the sidecar directory -----------------------------------------------------------------------------------------
def hf_config(reader: Any, path: Path) -> dict:
    """An HF-style config.json from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    p = f"{arch}."
    hidden = int(_required(reader, path, p + "embedding_length"))
    heads = int(_required(reader, path, p + "attention.head_count"))
    names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    cfg: dict[str, Any] = {
        "architectures": [GGUF_ARCHS[arch]], "model_type": arch,
        "hidden_size": hidden, "num_hidden_layers": int(_required(reader, path, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv") or heads),
        "head_dim": int(_field(reader, p + "rope.dimension_count") or hidden // heads),
        "intermediate_size": int(_required(reader, path, p + "feed_forward_length")),
        "vocab_size": int(_field(reader, p + "vocab_size") or int(embed.shape[1])),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon") or 1e-6),
        "rope_theta": float(_field(reader, p + "rope.freq_base") or 10000.0),
        "max_position_embeddings": int(_field(reader, p + "context_length") or 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "bfloat16",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = _field(reader, p + "rope.scaling.type")
    if scaling in ("linear", "yarn"):
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(_field(reader, p + "rope.scaling.factor") or 1.0)}
    if arch == "internlm2":
        cfg["bias"] = "blk.0.attn_q.bias" in names
    elif arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    return cfg


def _eos_ids(reader: Any) -> list[int]:
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def _write_tokenizer(path: Path, out_dir: Path) -> None:
    """tokenizer.json / tokenizer_config.json / chat_template.jinja from the GGUF metadata (gpt2 BPE or llama SPM),
    through transformers' converter of GGUF tokenizers."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise CheckpointError(f"{path}: the tokenizer in the GGUF metadata cannot be built ({exc})") from None
    tok.save_pretrained(str(out_dir))


def _source_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_model_dir(path: Path | str, cache: Optional[Path] = None) -> Path:
    """The sidecar directory of a GGUF file, written on first use (atomically: never half there)."""
    from ..paths import cache_root
    from .outdir import atomic_directory

    path = Path(path).expanduser().resolve()
    if not is_gguf_file(path):
        open_gguf(path)  # raises the reason
    out = (cache or cache_root()) / "gguf" / _source_key(path) / path.stem
    if is_gguf_dir(out):
        return out
    reader = open_gguf(path)
    with atomic_directory(out) as tmp:
        cfg = hf_config(reader, path)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": _eos_ids(reader)}))
        _write_tokenizer(path, tmp)
        if not (tmp / "chat_template.jinja").exists() and _field(reader, "tokenizer.chat_template"):
            (tmp / "chat_template.jinja").write_text(_field(reader, "tokenizer.chat_template"))
        (tmp / SOURCE_FILE).write_text(json.dumps({"path": str(path), "size": path.stat().st_size}))
    return out


def gguf_source(model_dir: Path) -> Path:
    """The GGUF file behind a sidecar directory (it must still be there, with the same size)."""
    src = read_json(model_dir / SOURCE_FILE)
    path = Path(src["path"])
    if not path.is_file() or path.stat().st_size != src.get("size"):
        raise CheckpointError(f"{path}: the GGUF file behind {model_dir} is gone or has changed")
    return path


# ---- weights -------------------------------------------------------------------------------------------------------
def _dense(t: Any) -> np.ndarray:
    """A tensor as float32 `[rows, cols]` (GGUF's ne0 is the last numpy axis: rows = outputs, cols = inputs)."""
    from gguf.quants import dequantize

    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)


def _q4_parts(t: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0 / Q4_1 blocks -> integer values uint8 `[rows, cols]`, scales and zeros float32 `[rows, cols/32]`.

    A block is `d` (fp16) [, `m` (fp16)], then 16 bytes: byte j holds element j (low nibble) and j+16 (high)."""
    blocks = t.data.view(np.uint8)
    has_min = t.tensor_type.name == "Q4_1"
    width = 20 if has_min else 18
    rows = blocks.shape[0]
    blocks = blocks.reshape(rows, -1, width)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., width - 16:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, -1)
    if has_min:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zeros = np.divide(-m, d, out=np.zeros_like(m), where=d != 0)
    else:
        zeros = np.full_like(d, 8.0)
    return q, d, zeros


class _Tensors:
    def __init__(self, reader: Any, path: Path):
        self.by_name = {t.name: t for t in reader.tensors}
        self.path = path

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def get(self, name: str) -> Any:
        if name not in self.by_name:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self.by_name[name]


def _rotary_rows(rows: np.ndarray, heads: int, head_dim: int, permute: bool) -> np.ndarray:
    """HF half-split rows -> interleaved pairs (the readers' `permute_rotary_rows`) where `permute`."""
    if not permute:
        return rows
    from .readers import permute_rotary_rows

    return permute_rotary_rows(_to_torch(rows), heads, head_dim).numpy()


def _to_torch(a: np.ndarray) -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def _qkv(tensors: _Tensors, i: int, spec: ModelSpec, packed: bool, permute: bool) -> dict[str, np.ndarray]:
    """The fused w_qkv of layer i: `{'weight': [in, out]}` dense, or `{'q', 'scales', 'zeros'}` packed."""
    parts = [tensors.get(f"blk.{i}.attn_{n}.weight") for n in "qkv"]
    heads = (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads)
    perm = (permute, permute, False)
    if packed:
        split = [_q4_parts(p) for p in parts]
        return {key: np.concatenate([_rotary_rows(s[k], h, spec.head_dim, pm)
                                     for s, h, pm in zip(split, heads, perm)]).T
                for k, key in enumerate(("q", "scales", "zeros"))}
    return {"weight": np.concatenate([_rotary_rows(_dense(p), h, spec.head_dim, pm)
                                      for p, h, pm in zip(parts, heads, perm)]).T}


def _linear_out(name: str, parts: dict[str, np.ndarray], dtype: "torch.dtype | None") -> dict[str, "torch.Tensor"]:
    import torch

    from ..int4_packing import pack_int4

    if "weight" in parts:
        w = _to_torch(parts["weight"])
        return {f"{name}.weight": w.to(dtype) if dtype is not None else w}
    return {f"{name}.qweight": pack_int4(_to_torch(parts["q"])),
            f"{name}.scales": _to_torch(parts["scales"]).to(torch.float16),
            # -m/d is not an integer: kept in float32 so that (q - z) * s reproduces d*q + m
            f"{name}.zeros": _to_torch(parts["zeros"])}


def _linear(t: Any, packed: bool) -> dict[str, np.ndarray]:
    if packed:
        q, s, z = _q4_parts(t)
        return {"q": q.T, "scales": s.T, "zeros": z.T}
    return {"weight": _dense(t).T}


def read_gguf_weights(model_dir: Path | str, dtype: "torch.dtype | None" = None,
                      dequantize: bool = False) -> tuple[ModelSpec, dict[str, "torch.Tensor"]]:
    """(spec, TurboMind-layout tensors at tp=1) of the GGUF file behind a sidecar directory.

    Q4_0/Q4_1 linears come as `X.qweight/scales/zeros` (group 32) unless `dequantize`; `dtype` applies to float
    tensors. q, k and v of a layer stay packed only when all three are Q4_0/Q4_1.
    """
    import torch

    model_dir = Path(model_dir)
    spec = read_model_spec(model_dir)
    path = gguf_source(model_dir)
    tensors = _Tensors(open_gguf(path), path)
    permute = spec.arch == "qwen2"

    def dense(name: str) -> torch.Tensor:
        with warnings.catch_warnings():  # the file's memory map is read-only, and no weight is ever written to
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(_dense(tensors.get(name)))
        return t.to(dtype) if dtype is not None else t

    def is_packed(*names: str) -> bool:
        return not dequantize and all(tensors.get(n).tensor_type.name in PACKED_TYPES for n in names)

    out: dict[str, torch.Tensor] = {"tok_embeddings.weight": dense("token_embd.weight"),
                                    "norm.weight": dense("output_norm.weight")}
    out["output.weight"] = dense("output.weight") if "output.weight" in tensors else out["tok_embeddings.weight"]
    for i in range(spec.num_layers):
        b, tm = f"blk.{i}.", f"layers.{i}."
        qkv_names = [f"{b}attn_{n}.weight" for n in "qkv"]
        out.update(_linear_out(tm + "attention.w_qkv", _qkv(tensors, i, spec, is_packed(*qkv_names), permute), dtype))
        for gguf_name, tm_name in _LINEARS.items():
            t = tensors.get(f"{b}{gguf_name}.weight")
            out.update(_linear_out(tm + tm_name, _linear(t, is_packed(t.name)), dtype))
        if spec.attn_bias:
            biases = [_rotary_rows(_dense(tensors.get(f"{b}attn_{n}.bias")), h, spec.head_dim, permute and n != "v")
                      for n, h in (("q", spec.num_heads), ("k", spec.num_kv_heads), ("v", spec.num_kv_heads))]
            bias = torch.from_numpy(np.concatenate(biases))
            out[tm + "attention.w_qkv.bias"] = bias.to(dtype) if dtype is not None else bias
        out[tm + "attention_norm.weight"] = dense(f"{b}attn_norm.weight")
        out[tm + "ffn_norm.weight"] = dense(f"{b}ffn_norm.weight")
    return spec, out
