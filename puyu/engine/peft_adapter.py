"""PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) mapped onto the engine's linears.

PEFT stores, per targeted HF linear `W [out, in]`, `lora_A [r, in]` and `lora_B [out, r]`; the layer computes
`W x + (alpha / r) * B A x`. The engine's linears are TurboMind's (puyu/convert/readers.py): q|k|v fused with the
q and k output rows permuted for interleaved rotary, and w1|w3 fused as one gate_up. So an adapter's pairs are fused
the same way: the A sides of q, k, v (or gate, up) are put side by side, the B sides block-diagonally, and B's q/k
output rows get the base weights' permutation (`fused_qkv`), so `x @ A @ B` is exactly the HF delta in the engine's
output order. InternLM2's one grouped `wqkv` has one A, and its B is split and permuted like the base tensor. The
scale (alpha / r, or alpha / sqrt(r) with rsLoRA) is folded into B.

Every error is an `AdapterError` naming the file and the field (or tensor) that is wrong.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..convert.archs import HFLayout, layout
from ..convert.readers import fused_qkv
from ..convert.spec import ModelSpec
from .lora import LoraPair

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter cannot be used on this model; the message is `<file>: <field>: <what is wrong>`."""

    def __init__(self, file: Union[str, Path], field: str, message: str):
        self.file, self.field = str(file), field
        super().__init__(f"{file}: {field}: {message}")


def load_peft_adapter(path: Union[str, Path], spec: ModelSpec, dtype: torch.dtype,
                      device: torch.device) -> list[dict[str, LoraPair]]:
    """Per-layer `{TurboMind linear: LoraPair}` of the PEFT adapter in directory `path`, for a model of `spec`."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise AdapterError(root, "path", "no such adapter directory")
    config_file, weights_file = root / CONFIG_FILE, root / WEIGHTS_FILE
    config = _read_config(config_file)
    names = layout(spec.arch)
    scale = _scale(config, config_file)
    _check_targets(config.get("target_modules"), names, config_file, spec.arch)
    tensors = _read_tensors(weights_file)
    by_layer = _group(tensors, names, spec, weights_file)
    shapes = base_shapes(spec, names)
    layers: list[dict[str, LoraPair]] = []
    for i in range(spec.num_layers):
        pairs = by_layer.get(i, {})
        for name, (a, b) in pairs.items():
            _check_pair(f"model.layers.{i}.{name}", a, b, shapes[name], config.get("r"), weights_file)
        layer = _fuse_layer(pairs, names, spec, shapes, scale, i)
        layers.append({k: LoraPair(p.a.to(device, dtype), p.b.to(device, dtype)) for k, p in layer.items()})
    return layers


def _read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise AdapterError(file, "file", "missing (a PEFT adapter directory has adapter_config.json)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(file, "file", f"not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(file, "file", "must hold a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise AdapterError(file, "peft_type", f"only LORA adapters are supported, got {kind!r}")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False}
    for key, ok in unsupported.items():
        if config.get(key, ok) != ok:
            raise AdapterError(file, key, f"{config[key]!r} is not supported (only {ok!r})")
    if config.get("bias", "none") != "none":
        raise AdapterError(file, "bias", f"only 'none' is supported, got {config['bias']!r}")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication", "trainable_token_indices",
                "target_parameters"):
        if config.get(key):
            raise AdapterError(file, key, f"not supported (must be empty), got {config[key]!r}")
    return config


def _scale(config: dict[str, Any], file: Path) -> float:
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(file, "r", f"must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(file, "lora_alpha", f"must be a number, got {alpha!r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _check_targets(targets: Any, names: HFLayout, file: Path, arch: str) -> None:
    """`target_modules`: module names (PEFT matches them as suffixes), a regex, or 'all-linear'; each listed name
    must be one of the architecture's per-layer linears."""
    known = ", ".join(_short(n) for n in names.linears)
    if isinstance(targets, str):
        if targets != "all-linear" and not any(re.fullmatch(targets, f"model.layers.0.{n}") for n in names.linears):
            raise AdapterError(file, "target_modules", f"{targets!r} matches no linear of {arch} ({known})")
        return
    if not isinstance(targets, list) or not targets:
        raise AdapterError(file, "target_modules", f"must be a non-empty list or a string, got {targets!r}")
    for t in targets:
        if not isinstance(t, str) or not any(n == t or n.endswith("." + t) for n in names.linears):
            raise AdapterError(file, "target_modules", f"{t!r} is not a linear of {arch} (its linears: {known})")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise AdapterError(file, "file", "missing (puyu reads adapters saved as safetensors)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(file, "file", f"not a readable safetensors file ({exc})") from None


def _group(tensors: dict[str, torch.Tensor], names: HFLayout, spec: ModelSpec,
           file: Path) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """layer -> HF linear -> (A, B); every tensor must be an A or B of a per-layer linear of a layer that exists."""
    found: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(2) not in names.linears:
            raise AdapterError(file, key, f"not a LoRA tensor of a {spec.arch} layer linear "
                                          f"({', '.join(_short(n) for n in names.linears)})")
        layer = int(m.group(1))
        if layer >= spec.num_layers:
            raise AdapterError(file, key, f"layer {layer} does not exist (the base model has {spec.num_layers})")
        found.setdefault(layer, {}).setdefault(m.group(2), {})[m.group(3)] = t.float()
    out: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer, linears in found.items():
        for name, ab in linears.items():
            for side in "AB":
                if side not in ab:
                    raise AdapterError(file, f"model.layers.{layer}.{name}.lora_{side}.weight",
                                       f"missing (its lora_{'B' if side == 'A' else 'A'} is there)")
            out.setdefault(layer, {})[name] = (ab["A"], ab["B"])
    return out


def base_shapes(spec: ModelSpec, names: HFLayout) -> dict[str, tuple[int, int]]:
    """HF linear -> (out, in) of the base model."""
    h, inter, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    qkv_out = [q + 2 * kv] if len(names.qkv) == 1 else [q, kv, kv]
    shapes = {name: (out, h) for name, out in zip(names.qkv, qkv_out)}
    shapes.update({names.o: (h, q), names.gate: (inter, h), names.up: (inter, h), names.down: (h, inter)})
    return shapes


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, int], r: Optional[int],
                file: Path) -> None:
    out, inp = shape
    if a.dim() != 2 or a.shape[1] != inp or a.shape[0] != r:
        raise AdapterError(file, f"{name}.lora_A.weight", f"shape {list(a.shape)} does not fit the base model "
                                                          f"(expected [r={r}, in={inp}])")
    if b.dim() != 2 or b.shape[0] != out or b.shape[1] != r:
        raise AdapterError(file, f"{name}.lora_B.weight", f"shape {list(b.shape)} does not fit the base model "
                                                          f"(expected [out={out}, r={r}])")


def _fuse_layer(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], names: HFLayout, spec: ModelSpec,
                shapes: dict[str, tuple[int, int]], scale: float, layer: int) -> dict[str, LoraPair]:
    """One layer's pairs on the TurboMind linears (A `[in, r']`, B `[r', out]` with the scale folded in)."""
    out: dict[str, LoraPair] = {}
    qkv = _side_by_side(pairs, names.qkv, shapes)
    if qkv is not None:
        a, b_rows = qkv
        prefix = f"model.layers.{layer}."
        parts = names.qkv_parts(lambda n: b_rows[n.removeprefix(prefix).removesuffix(".lora_B")], prefix, spec,
                                "lora_B")
        out["attention.w_qkv"] = LoraPair(a, fused_qkv(parts, spec).t() * scale)
    gate_up = _side_by_side(pairs, (names.gate, names.up), shapes)
    if gate_up is not None:
        a, b_rows = gate_up
        out["feed_forward.w1w3"] = LoraPair(a, torch.cat([b_rows[names.gate], b_rows[names.up]]).t() * scale)
    for hf, tm in ((names.o, "attention.wo"), (names.down, "feed_forward.w2")):
        if hf in pairs:
            a, b = pairs[hf]
            out[tm] = LoraPair(a.t().contiguous(), b.t() * scale)
    return {k: LoraPair(p.a.contiguous(), p.b.contiguous()) for k, p in out.items()}


def _side_by_side(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], group: tuple[str, ...],
                  shapes: dict[str, tuple[int, int]]) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """For linears fused into one matmul: A `[in, sum r]` (the present ones' A side by side) and, per linear, its B
    rows `[out_i, sum r]` holding its B in its own columns (zeros elsewhere; all zeros for an untargeted one)."""
    present = [n for n in group if n in pairs]
    if not present:
        return None
    a = torch.cat([pairs[n][0].t() for n in present], dim=1)
    ranks = {n: pairs[n][0].shape[0] for n in present}
    total = sum(ranks.values())
    rows: dict[str, torch.Tensor] = {}
    col = 0
    for n in group:
        block = torch.zeros(shapes[n][0], total)
        if n in pairs:
            block[:, col:col + ranks[n]] = pairs[n][1]
            col += ranks[n]
        rows[n] = block
    return a, rows
