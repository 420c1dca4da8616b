"""What `puyu convert` writes for a GGUF file (through its sidecar directory, see `puyu.convert.gguf`).

A file whose linears are all Q4_0 / Q4_1 becomes the AWQ-style int4 workspace with group size 32 by default (the
packed nibbles and scales as they are; the zero points in the workspace's fp16, so a Q4_1 zero `-m/d` is rounded to
fp16 there); any other file, or `--model-format hf`, becomes an fp16 / bf16 workspace of the dequantised weights.
The tensors are those `read_gguf_weights` gives the engine, so the workspace serves like the file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .gguf import GROUP, PACKED_TYPES, gguf_source, open_gguf, read_gguf_weights
from .spec import CheckpointError

if TYPE_CHECKING:
    import torch

    from .writer import ConvertOptions

_LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def _reader(model_dir: Path) -> tuple[Path, Any]:
    path = gguf_source(model_dir)
    return path, open_gguf(path)


def _unpacked_linears(reader: Any) -> list[tuple[str, str]]:
    """(name, type) of the linears that are not Q4_0 / Q4_1."""
    return [(t.name, t.tensor_type.name) for t in reader.tensors
            if _LINEAR.match(t.name) and t.tensor_type.name not in PACKED_TYPES]


def gguf_default_format(model_dir: Path) -> str:
    """'awq' (int4 workspace) when every linear of the file is Q4_0 / Q4_1, else 'hf' (float workspace)."""
    return "hf" if _unpacked_linears(_reader(model_dir)[1]) else "awq"


def gguf_weight_format(model_dir: Path, options: "ConvertOptions") -> tuple[int, str]:
    """(group size, weight type) of the workspace; a request the file cannot meet is a CheckpointError naming it."""
    path, reader = _reader(model_dir)
    if options.model_format == "hf":
        if options.group_size:
            raise CheckpointError(f"{path}: --group-size applies to --model-format awq only")
        return 0, _float_type(reader, options.dtype)
    unpacked = _unpacked_linears(reader)
    if unpacked:
        name, qtype = unpacked[0]
        raise CheckpointError(f"{path}: --model-format awq needs Q4_0/Q4_1 linears, but tensor {name!r} is {qtype} "
                              "(use --model-format hf for fp16/bf16 weights)")
    if options.group_size not in (None, GROUP):
        raise CheckpointError(f"{path}: --group-size {options.group_size} does not match the file's Q4 blocks of "
                              f"{GROUP}")
    return GROUP, "int4"


def _float_type(reader: Any, dtype: str) -> str:
    """auto: bfloat16 when the file holds BF16 tensors, else float16 (which holds F16 and the dequantised types)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if any(t.tensor_type.name == "BF16" for t in reader.tensors) else "float16"


def iter_gguf_tensors(model_dir: Path, packed: bool) -> Iterator[tuple[str, "torch.Tensor"]]:
    """The tp=1 TurboMind tensors of the file (Q4 linears as qweight/scales/zeros when `packed`); lazy: nothing is
    read before the first item is asked for."""
    _, tensors = read_gguf_weights(model_dir, dequantize=not packed)
    yield from tensors.items()
