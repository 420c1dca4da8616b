"""Read HF checkpoints (InternLM2, Llama, Qwen2) into TurboMind's tensor layout, in memory, at tp=1.

The names produced are TurboMind's file names without the rank (`layers.0.attention.w_qkv.weight`, ...), the shapes
are those of ../shared/spec/turbomind-format.md: linears transposed to `[in, out]`, fused QKV with the q/k rows permuted
to interleaved-pair rotary, `output.weight` in HF orientation `[vocab, hidden]`. No vocab/FFN padding at tp=1 beyond
what the caller asks for: the on-disk writer pads and splits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .archs import HFLayout, layout
from .archs.base import TensorGetter
from .spec import CheckpointError, ModelSpec, read_json, read_model_spec



class CheckpointFiles:
    """Lazy access to the tensors of an HF checkpoint: sharded or single safetensors, or `.bin` files."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._where: dict[str, Path] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._index()

    def _index(self) -> None:
        d = self.model_dir
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = d / index_name
            if index_path.exists():
                weight_map = read_json(index_path).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
                for name, fname in weight_map.items():
                    path = d / fname
                    if not path.exists():
                        raise CheckpointError(f"{path}: shard listed in {index_name} is missing")
                    self._where[name] = path
                return
        files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{d}: no weight files (*.safetensors or pytorch_model*.bin)")
        for path in files:
            for name in self._names_in(path):
                self._where[name] = path

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            try:
                with safe_open(str(path), framework="pt") as f:
                    return list(f.keys())
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
        return list(self._load_bin(path))

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin_cache:
            try:
                self._bin_cache[path] = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot be loaded safely with weights_only=True ({exc})") from None
        return self._bin_cache[path]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} not found in the checkpoint")
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            try:
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor(name)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot read tensor {name!r} ({exc})") from None
        return self._load_bin(path)[name]


def permute_rotary_rows(w: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """HF half-split rotary rows -> TurboMind interleaved pairs: new[h*D + 2j + s] = old[h*D + s*D/2 + j].

    Works on weights `[heads*D, in]`, biases `[heads*D]` and any tensor whose first axis is the output rows.
    """
    rest = w.shape[1:]
    return w.reshape(num_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(num_heads * head_dim, *rest)


def fused_qkv(parts: list[torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """Permute q/k rows for interleaved rotary and concatenate q|k|v along the output axis (rows)."""
    q, k, v = parts
    q = permute_rotary_rows(q, spec.num_heads, spec.head_dim)
    k = permute_rotary_rows(k, spec.num_kv_heads, spec.head_dim)
    return torch.cat([q, k, v], dim=0)


def _linear_rows(get: TensorGetter, p: str, spec: ModelSpec, names: HFLayout,
                 kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(TurboMind linear name, tensor with output rows first) of one layer's linears, for one tensor kind.

    `kind` is 'weight' for float checkpoints; 'qweight', 'scales' or 'qzeros' for AWQ ones (the getter then returns
    the unpacked values transposed to `[out, in]` / `[out, in/g]`, so that the same row surgery applies).
    """
    yield "attention.w_qkv", fused_qkv(names.qkv_parts(get, p, spec, kind), spec)
    yield "attention.wo", get(f"{p}{names.o}.{kind}")
    yield "feed_forward.w1", get(f"{p}{names.gate}.{kind}")
    yield "feed_forward.w3", get(f"{p}{names.up}.{kind}")
    yield "feed_forward.w2", get(f"{p}{names.down}.{kind}")


def _expected_rows(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    h, i = spec.hidden_size, spec.intermediate_size
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    return {"attention.w_qkv": (qkv, h), "attention.wo": (h, spec.num_heads * spec.head_dim),
            "feed_forward.w1": (i, h), "feed_forward.w3": (i, h), "feed_forward.w2": (h, i)}


def _awq_getter(files: "CheckpointFiles") -> TensorGetter:
    from ..int4_packing import unpack_awq

    def get(name: str) -> torch.Tensor:
        t = files.get(name)
        if name.endswith((".qweight", ".qzeros")):
            t = unpack_awq(t)
        return t.t()

    return get


def _finish_linear(rows: torch.Tensor, kind: str) -> tuple[str, torch.Tensor]:
    """Rows-first tensor of one kind -> (TurboMind suffix, `[in, out]` tensor in workspace packing)."""
    t = rows.t().contiguous()
    if kind == "qweight":
        from ..int4_packing import pack_int4

        return "qweight", pack_int4(t)
    if kind == "qzeros":
        return "zeros", t.to(torch.float16)
    if kind == "scales":
        return "scales", t.to(torch.float16)
    return kind, t


def iter_turbomind_tensors(files: CheckpointFiles, spec: ModelSpec,
                           dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (TurboMind name, tensor) for every weight of the model, at tp=1, unpadded.

    For an AWQ checkpoint (spec.quant_method == 'awq') each linear yields `X.qweight`, `X.scales`, `X.zeros`
    instead of `X.weight` (workspace packing, see DEVELOPERS.md); `dtype` applies to the float tensors only.
    """
    names = layout(spec.arch)

    def get(name: str) -> torch.Tensor:
        t = files.get(name)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    embed = get(names.embed)
    _check_shape(names.embed, embed, (spec.vocab_size, spec.hidden_size), files)
    yield "tok_embeddings.weight", embed
    yield "norm.weight", get(names.final_norm)
    lm_head = embed if (spec.tie_word_embeddings and names.lm_head not in files) else get(names.lm_head)
    _check_shape(names.lm_head, lm_head, (spec.vocab_size, spec.hidden_size), files)
    yield "output.weight", lm_head
    kinds = ("qweight", "scales", "qzeros") if spec.quant_method else ("weight",)
    linear_get = _awq_getter(files) if spec.quant_method else get
    expected = _expected_rows(spec)
    for i in range(spec.num_layers):
        p, tm = f"model.layers.{i}.", f"layers.{i}."
        for kind in kinds:
            for lin, rows in _linear_rows(linear_get, p, spec, names, kind):
                out_rows, in_cols = expected[lin]
                if kind in ("scales", "qzeros"):
                    in_cols = in_cols // spec.group_size
                _check_shape(f"{p}{lin} {kind}", rows, (out_rows, in_cols), files)
                suffix, t = _finish_linear(rows, kind)
                yield f"{tm}{lin}.{suffix}", t
        if spec.attn_bias:
            yield tm + "attention.w_qkv.bias", fused_qkv(names.qkv_parts(get, p, spec, "bias"), spec)
        yield tm + "attention_norm.weight", get(f"{p}{names.attn_norm}.weight")
        yield tm + "ffn_norm.weight", get(f"{p}{names.ffn_norm}.weight")
    if spec.vision == "xcomposer2":
        from .xcomposer2 import iter_plora_tensors

        yield from iter_plora_tensors(get, spec)


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], files: CheckpointFiles) -> None:
    if tuple(t.shape) != tuple(expected):
        raise CheckpointError(f"{files.model_dir}: tensor {name!r} has shape {tuple(t.shape)}, "
                              f"config.json implies {tuple(expected)}")


def read_hf_checkpoint(model_dir: Path | str,
                       dtype: torch.dtype | None = None) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Read an HF checkpoint directory into (spec, TurboMind-layout tensors at tp=1)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    spec = read_model_spec(model_dir)
    files = CheckpointFiles(model_dir)
    return spec, dict(iter_turbomind_tensors(files, spec, dtype))
