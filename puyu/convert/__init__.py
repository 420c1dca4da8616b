"""Checkpoint readers and the TurboMind workspace converter.

torch is imported only when weights are read, so that `puyu --help` and the CLI parsers stay fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .spec import CheckpointError, ModelSpec, read_model_spec

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointError", "ModelSpec", "is_workspace", "load_model_weights", "read_model_spec"]


def is_workspace(path: Path | str) -> bool:
    return (Path(path) / "triton_models").exists()


def load_model_weights(path: Path | str, dtype: "torch.dtype | None" = None,
                       dequantize: bool = False) -> tuple[ModelSpec, dict[str, "torch.Tensor"]]:
    """TurboMind-layout tensors at tp=1 from an HF directory, a TurboMind workspace or a GGUF sidecar directory
    (see DEVELOPERS.md). `dequantize` turns a GGUF file's packed 4-bit linears into dense weights."""
    path = Path(path)
    from .gguf import is_gguf_dir

    if is_gguf_dir(path):
        from .gguf import read_gguf_weights

        return read_gguf_weights(path, dtype, dequantize)
    if is_workspace(path):
        from .workspace import read_workspace

        return read_workspace(path, dtype)
    from .readers import read_hf_checkpoint

    return read_hf_checkpoint(path, dtype)
