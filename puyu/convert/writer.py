"""Write a TurboMind workspace on disk from an HF checkpoint (float or AutoAWQ gemm int4) or a GGUF file's sidecar
directory (see `gguf_convert`).

Everything is written into a temporary directory next to the destination and renamed into place at the end, so a
failure (bad input, a full disk, Ctrl-C) never leaves a half-written workspace behind.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from .gguf import SOURCE_FILE, is_gguf_dir
from .gguf_convert import gguf_weight_format, iter_gguf_tensors
from .layout import tp1_tensors
from .outdir import atomic_directory, check_destination, copy_side_files
from .readers import CheckpointFiles, iter_turbomind_tensors
from .spec import CheckpointError, ModelSpec, read_model_spec
from .tm_config import build_config, dump_config
from .tp import SUPPORTED_GROUP_SIZES, TPPlan
from .workspace import WEIGHTS_DIR

MODEL_FORMATS = ("hf", "awq")
DTYPE_CHOICES = ("auto", "float16", "bfloat16")


@dataclass
class ConvertOptions:
    tp: int = 1
    model_format: str = "hf"  # hf | awq
    dtype: str = "auto"  # auto | float16 | bfloat16 (ignored for int4: floats are fp16)
    group_size: Optional[int] = None  # None: the checkpoint's (awq) / 0 (hf)
    force: bool = False
    model_name: str = ""
    progress: bool = True

    def validate(self) -> None:
        if self.model_format not in MODEL_FORMATS:
            raise CheckpointError(f"model_format must be one of {', '.join(MODEL_FORMATS)}, got {self.model_format!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise CheckpointError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")


@dataclass
class ConvertResult:
    path: Path
    spec: ModelSpec
    weight_type: str
    tp: int
    seconds: float
    num_files: int
    weight_bytes: int


def convert_checkpoint(src: Path | str, dst: Path | str, options: ConvertOptions | None = None) -> ConvertResult:
    """Convert the HF checkpoint `src` into the workspace `dst` (see ../shared/spec/turbomind-format.md)."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    options = options or ConvertOptions()
    options.validate()
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    spec = read_model_spec(src)
    if spec.vision:
        from .xcomposer2 import plora_rank

        spec.lora_r = plora_rank(CheckpointFiles(src))
    gguf = is_gguf_dir(src)
    group_size, weight_type = gguf_weight_format(src, options) if gguf else _weight_format(src, spec, options)
    plan = TPPlan.for_spec(spec, options.tp, group_size)
    check_destination(dst, options.force)
    # a missing shard fails here, before anything is written
    tensors = iter_gguf_tensors(src, bool(group_size)) if gguf else iter_turbomind_tensors(CheckpointFiles(src), spec)
    with atomic_directory(dst) as tmp:
        num_files, nbytes = _write_weights(tensors, src, spec, plan, weight_type, tmp / WEIGHTS_DIR, options.progress)
        config = build_config(spec, tp=plan.tp, weight_type=weight_type, model_format=options.model_format,
                              group_size=group_size, vocab_pad=plan.vocab_pad, inter_pad=plan.inter_pad,
                              kv_heads_stored=plan.kv_heads_stored, model_name=options.model_name)
        dump_config(config, tmp / WEIGHTS_DIR / "config.yaml")
        copy_side_files(src, tmp, skip=(SOURCE_FILE,))  # the workspace holds the weights: no pointer to the file
    return ConvertResult(dst, spec, weight_type, plan.tp, time.perf_counter() - start, num_files, nbytes)


def _weight_format(src: Path, spec: ModelSpec, options: ConvertOptions) -> tuple[int, str]:
    """(group size, weight type) of an HF checkpoint's workspace."""
    group_size = _group_size(src, spec, options)
    return group_size, "int4" if group_size else _float_type(spec, options.dtype)


def _group_size(src: Path, spec: ModelSpec, options: ConvertOptions) -> int:
    """0 for float output; the AWQ group size (checked against the request and what the engine supports)."""
    where = src / "config.json"
    if options.model_format == "hf":
        if spec.quant_method:
            raise CheckpointError(f"{where}: the checkpoint is {spec.quant_method.upper()}-quantised "
                                  f"(quantization_config); convert it with --model-format {spec.quant_method}")
        return 0
    if not spec.quant_method:
        raise CheckpointError(f"{where}: --model-format awq needs an AutoAWQ checkpoint (no quantization_config); "
                              "make one with `puyu quantize`")
    if options.group_size and options.group_size != spec.group_size:
        raise CheckpointError(f"{where}: --group-size {options.group_size} does not match the checkpoint's "
                              f"quantization_config.group_size {spec.group_size}")
    if spec.group_size not in SUPPORTED_GROUP_SIZES:
        raise CheckpointError(f"{where}: unsupported group size {spec.group_size}; supported: "
                              f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
    return spec.group_size


def _float_type(spec: ModelSpec, dtype: str) -> str:
    if dtype != "auto":
        return dtype
    return spec.torch_dtype if spec.torch_dtype in ("float16", "bfloat16") else "float16"


def _write_weights(tensors: Iterable[tuple[str, torch.Tensor]], src: Path, spec: ModelSpec, plan: TPPlan,
                   weight_type: str, out_dir: Path, progress: bool) -> tuple[int, int]:
    """Stream the tp=1 tensors of `src` through the split and dump each rank's part; returns (files, bytes)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True)
    float_dtype = torch.bfloat16 if weight_type == "bfloat16" else torch.float16
    expected = tp1_tensors(spec, plan.group_size)
    num_files = nbytes = 0
    bar = tqdm(total=len(expected), desc=f"convert tp={plan.tp} {weight_type}", unit="tensor",
               disable=not progress, leave=False)
    with bar:
        for name, t in tensors:
            if name not in expected or tuple(t.shape) != expected[name].shape:
                raise CheckpointError(f"{src}: tensor {name} has shape {tuple(t.shape)}, expected "
                                      f"{expected[name].shape if name in expected else 'no such tensor'}")
            if t.is_floating_point():
                t = t.to(float_dtype)
            parts = plan.split(name, t)
            if name.endswith("attention.w_qkv.bias"):  # TurboMind loads a wo bias with attn_bias: zeros, like LMDeploy
                wo_bias = name.replace("w_qkv.bias", "wo.bias")
                parts += plan.split(wo_bias, torch.zeros(spec.hidden_size, dtype=float_dtype))
            for fname, part in parts:
                nbytes += dump_tensor(part, out_dir / fname)
                num_files += 1
            bar.update(1)
    return num_files, nbytes


def dump_tensor(t: torch.Tensor, path: Path) -> int:
    """Raw little-endian C-order bytes, no header (bf16 as its 16 raw bits)."""
    raw = t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    raw.numpy().tofile(str(path))
    return raw.numel()
