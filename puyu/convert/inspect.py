"""`puyu inspect PATH`: what an HF checkpoint or a TurboMind workspace holds, without loading the weights."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .spec import CheckpointError, read_model_spec


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass
class Inspection:
    path: Path
    kind: str  # 'hf' | 'workspace' | 'gguf'
    summary: dict[str, Any]
    tensors: list[TensorEntry] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def inspect_path(path: Path | str) -> Inspection:
    path = Path(path)
    if path.is_file() or path.suffix == ".gguf":
        return _inspect_gguf(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (path / "triton_models").exists():
        return _inspect_workspace(path)
    return _inspect_hf(path)


def _inspect_gguf(path: Path) -> Inspection:
    """A GGUF file: the summary of its sidecar config, and its tensors as stored (GGUF types, bytes on disk)."""
    from .gguf import gguf_model_dir, open_gguf

    summary = _inspect_hf_summary(gguf_model_dir(path))
    reader = open_gguf(path)
    types = sorted({t.tensor_type.name for t in reader.tensors})
    summary["dtype"] = "GGUF " + ", ".join(types)
    tensors = [TensorEntry(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name, int(t.n_bytes))
               for t in reader.tensors]
    return Inspection(path, "gguf", summary, tensors)


def _inspect_hf(path: Path) -> Inspection:
    summary = _inspect_hf_summary(path)
    tensors = []
    for f in sorted(path.glob("*.safetensors")):
        tensors += _safetensors_entries(f)
    if not tensors:
        for f in sorted(path.glob("pytorch_model*.bin")):
            tensors += _bin_entries(f)
    if summary.get("img_size"):
        from .xcomposer2 import vision_summary

        summary.update(vision_summary({t.name: t.shape for t in tensors}, summary.pop("img_size"), path))
    return Inspection(path, "hf", summary, tensors)


def _inspect_hf_summary(path: Path) -> dict[str, Any]:
    return model_summary(read_model_spec(path), path)


def model_summary(spec: Any, path: Path, stored: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The labels every kind of checkpoint shares: the shapes, then what decides whether the model computes
    correctly (rope, norm eps, tied embeddings, chat template, the special token ids). `stored`: a workspace's
    values as written where they differ from the model's (padded FFN, duplicated KV heads)."""
    stored = stored or {}

    def with_stored(key: str, value: Any) -> Any:
        return f"{value} (stored {stored[key]})" if key in stored and stored[key] != value else value

    rope = f"{spec.rope_scaling_type} x{spec.rope_scaling_factor:g}" if spec.rope_scaling_type else "none"
    if spec.rope_scaling_type and spec.original_max_position_embeddings:
        rope += f" (from {spec.original_max_position_embeddings})"
    summary = {"architecture": spec.model_arch, "layers": spec.num_layers, "hidden": spec.hidden_size,
               "heads": spec.num_heads, "kv_heads": with_stored("kv_heads", spec.num_kv_heads),
               "head_dim": spec.head_dim, "ffn": with_stored("ffn", spec.intermediate_size), "vocab": spec.vocab_size,
               "dtype": spec.torch_dtype,
               "quantization": f"{spec.quant_method} group {spec.group_size}" if spec.quant_method else "none",
               "session_len": spec.session_len, "rope_theta": f"{spec.rope_theta:g}", "rope_scaling": rope,
               "norm_eps": f"{spec.norm_eps:g}", "tied_embeddings": "yes" if spec.tie_word_embeddings else "no"}
    summary.update(_tokenizer_summary(spec, path))
    if spec.vision:
        summary["img_size"] = spec.img_size  # _inspect_hf turns it into the vision lines
    return summary


def _tokenizer_summary(spec: Any, path: Path) -> dict[str, Any]:
    """Chat template, BOS / EOS / stop ids as the engine will use them (its own tokenizer wrapper)."""
    from ..serve.banner import describe_chat_template
    from ..tokenizer import Tokenizer

    try:
        tok = Tokenizer(path, spec.vocab_size, spec.eos_token_ids, spec.arch)
    except Exception as exc:  # no tokenizer files, or a broken one: say so, the shapes are still worth showing
        return {"tokenizer": f"not readable ({exc})"}
    return {"chat_template": describe_chat_template(tok.chat_template),
            "bos_id": spec.bos_token_id if spec.bos_token_id is not None else "none",
            "eos_ids": ", ".join(map(str, spec.eos_token_ids)) or "none",
            "stop_ids": ", ".join(map(str, tok.stop_token_ids)) or "none"}


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _safetensors_entries(path: Path) -> list[TensorEntry]:
    """Read the JSON header only."""
    with open(path, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out.append(TensorEntry(name, tuple(meta["shape"]), meta["dtype"], end - start))
    return out


def _bin_entries(path: Path) -> list[TensorEntry]:
    import torch

    sd = torch.load(str(path), map_location="meta", weights_only=True)
    return [TensorEntry(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), v.numel() * v.element_size())
            for k, v in sd.items()]


def _inspect_workspace(path: Path) -> Inspection:
    from .workspace import read_workspace_config, weights_dir, workspace_files, workspace_spec

    cfg = read_workspace_config(path)
    spec = workspace_spec(path, cfg)
    summary = model_summary(spec, path, stored={"kv_heads": cfg.kv_head_num, "ffn": cfg.inter_size})
    summary["dtype"] = cfg.weight_type
    summary.update({"tp": cfg.tp, "model_format": cfg.model_format, "session_len": cfg.session_len})
    _, files = workspace_files(path)
    known = {fname: (tuple(shape), str(dtype).removeprefix("torch."))
             for _, parts in files.values() for fname, shape, dtype in parts}
    tensors = []
    for f in sorted(weights_dir(path).iterdir()):  # every file, also those the reader skips (zero wo biases)
        if f.is_file() and f.name != "config.yaml":
            shape, dtype = known.get(f.name, ((), str(cfg.float_dtype).removeprefix("torch.")))
            tensors.append(TensorEntry(f.name, shape, dtype, f.stat().st_size))
    return Inspection(path, "workspace", summary, tensors)


def format_inspection(ins: Inspection, show_tensors: bool = True) -> str:
    kinds = {'workspace': 'TurboMind workspace', 'gguf': 'GGUF file', 'hf': 'HF checkpoint'}
    lines = [f"{ins.path}: {kinds[ins.kind]}"]
    lines += [f"  {k}: {v}" for k, v in ins.summary.items()]
    lines.append(f"  tensors: {len(ins.tensors)}, {_human(ins.total_bytes)} ({ins.total_bytes} bytes)")
    if show_tensors:
        for t in sorted(ins.tensors, key=lambda t: _natural(t.name)):
            shape = "x".join(map(str, t.shape)) if t.shape else "-"
            lines.append(f"    {t.name:<48} {shape:>16} {t.dtype:>9} {t.nbytes:>12}")
    return "\n".join(lines)


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"
