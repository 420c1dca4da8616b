"""Choosing and building the engine behind `puyu serve` / `puyu chat`: the native AsyncEngine or TurboMind."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import EngineConfig
from ..engine.client import EngineClient
from ..resolve import resolve_model_path
from .turbomind import unavailable_reason


@dataclass
class BackendChoice:
    name: str  # native | turbomind
    note: str = ""  # why an automatic choice fell back to native on a machine with a CUDA GPU (else nothing to say)


def choose_backend(requested: Optional[str]) -> BackendChoice:
    """`--backend` as given; without one, TurboMind where it can run, else native. The one-line reason for not
    using TurboMind is a note only on a machine with a CUDA GPU: on a CPU-only one native is the only choice, and
    saying so at every start is noise."""
    if requested == "native":
        return BackendChoice("native")
    reason = unavailable_reason()
    if requested == "turbomind":
        if reason:
            raise ValueError(f"--backend turbomind: {reason}")
        return BackendChoice("turbomind")
    if reason:
        return BackendChoice("native", f"TurboMind not used: {reason}" if _has_cuda() else "")
    return BackendChoice("turbomind")


def build_engine(model: Optional[str], backend: str, config: EngineConfig,
                 adapters: Optional[dict[str, str]] = None) -> EngineClient:
    """An engine following the AsyncEngine contract, for MODEL (directory, workspace, registry name or None);
    `adapters` (name -> PEFT LoRA directory) are loaded by the native engine only."""
    path: Path = resolve_model_path(model)
    if backend == "turbomind":
        if adapters:
            raise ValueError("--lora: the TurboMind backend takes no LoRA adapters; serve with --backend native")
        from .turbomind import TurboMindEngine

        return TurboMindEngine(path, config)
    from ..engine import AsyncEngine

    return AsyncEngine(path, config, dict(adapters or {}))


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken torch: the engine reports it when it loads
        return False
