"""`puyu quantize`: an HF float checkpoint -> an AutoAWQ "gemm" 4-bit checkpoint, on CPU.

Round-to-nearest per group of input rows by default. With a calibration text, activation-aware scaling (AWQ) first:
for each group of linears sharing an input, per-input-channel scales `s = mean|x|^a` (a searched on a grid) are
multiplied into the weights and divided out of the op that produces that input (a norm, or the up projection for
the down projection), which is exact in float and moves quantisation error away from the salient channels.
The output is what `lmdeploy lite auto_awq` / AutoAWQ save: `qweight`, `qzeros`, `scales` per linear, fp16 elsewhere,
and `quantization_config` in config.json; `puyu convert --model-format awq` turns it into an int4 workspace.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .awq import quantize_rtn
from .outdir import atomic_directory, check_destination, copy_side_files
from .archs import layout
from .readers import CheckpointFiles
from .spec import CheckpointError, ModelSpec, read_json, read_model_spec
from .tp import SUPPORTED_GROUP_SIZES


@dataclass
class QuantizeOptions:
    w_bits: int = 4
    group_size: int = 128
    calib_path: Optional[Path] = None  # a text file: activation-aware scaling; None: plain round-to-nearest
    calib_tokens: int = 512
    force: bool = False

    def validate(self) -> None:
        if self.w_bits != 4:
            raise CheckpointError(f"w_bits must be 4, got {self.w_bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise CheckpointError(f"unsupported group size {self.group_size}; supported: "
                                  f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
        if self.calib_path is not None and not Path(self.calib_path).is_file():
            raise CheckpointError(f"{self.calib_path}: calibration text file not found")


@dataclass
class QuantizeResult:
    path: Path
    seconds: float
    num_linears: int
    awq_scaled: bool


def quantize_checkpoint(src: Path | str, dst: Path | str,
                        options: QuantizeOptions | None = None) -> QuantizeResult:
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    options = options or QuantizeOptions()
    options.validate()
    spec = read_model_spec(src)
    if spec.quant_method:
        raise CheckpointError(f"{src / 'config.json'}: the checkpoint is already quantised ({spec.quant_method})")
    _check_dims(src, spec, options.group_size)
    check_destination(dst, options.force)
    files = CheckpointFiles(src)
    weights = {name: files.get(name) for name in files.names()}
    if options.calib_path is not None:
        from .awq_scale import apply_awq_scales

        apply_awq_scales(src, spec, weights, Path(options.calib_path).read_text(), options.group_size,
                         options.calib_tokens)
    out = _quantize_weights(weights, spec, options.group_size)
    with atomic_directory(dst) as tmp:
        _write(src, tmp, out, options.group_size)
    n = spec.num_layers * len(layout(spec.arch).linears)
    return QuantizeResult(dst, time.perf_counter() - start, n, options.calib_path is not None)


def _check_dims(src: Path, spec: ModelSpec, g: int) -> None:
    ins = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
           "num_attention_heads x head_dim": spec.num_heads * spec.head_dim}
    for what, n in ins.items():
        if n % g:
            raise CheckpointError(f"{src / 'config.json'}: {what} {n} is not a multiple of the group size {g}")


def _quantize_weights(weights: dict[str, torch.Tensor], spec: ModelSpec, g: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    linears = {f"model.layers.{i}.{lin}.weight" for i in range(spec.num_layers) for lin in layout(spec.arch).linears}
    for name, t in weights.items():
        if name in linears:
            prefix = name[: -len(".weight")]
            q = quantize_rtn(t.t(), g)  # HF [out, in] -> [in, out]
            for kind, packed in q.to_awq().items():
                out[f"{prefix}.{kind}"] = packed
        else:
            out[name] = t.to(torch.float16) if t.is_floating_point() else t
    missing = [n for n in linears if n not in weights]
    if missing:
        raise CheckpointError(f"linear weight {missing[0]!r} not found in the checkpoint")
    return out


def _write(src: Path, out_dir: Path, weights: dict[str, torch.Tensor], g: int) -> None:
    from ..tiny import write_sharded_safetensors

    total = sum(t.numel() * t.element_size() for t in weights.values())
    write_sharded_safetensors(weights, out_dir, num_shards=max(1, -(-total // (2 << 30))))
    copy_side_files(src, out_dir)
    cfg = read_json(src / "config.json")
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": None}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
