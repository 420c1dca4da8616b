"""Low-rank adapters applied per row of a flattened step: `y[rows] += (x[rows] @ A) @ B * scale`.

A step names, per adapter, the rows (flat token indices) it applies to (`StepInputs.lora_rows`); rows no adapter
names get exactly the base linear's output. XComposer2's Partial LoRA is the adapter 'plora' on the image-token
rows; a per-request LoRA adapter would be another name on all rows of its request, through the same path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

# the TurboMind linears an adapter can touch; 'feed_forward.w1w3' is w1 and w3 fused as the model's gate_up
LINEARS = ("attention.w_qkv", "attention.wo", "feed_forward.w1w3", "feed_forward.w2")


@dataclass
class LoraPair:
    a: torch.Tensor  # [in, r]
    b: torch.Tensor  # [r, out]
    scale: float = 1.0


@dataclass
class StepInputs:
    """What a step carries beyond token ids: rows whose embedding is given (image features), adapter rows."""

    embed_rows: Optional[torch.Tensor] = None  # int64 [E] flat rows whose input embedding is replaced
    embeds: Optional[torch.Tensor] = None  # [E, hidden]
    lora_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter name -> distinct int64 rows


class RowLora:
    """The adapters of a model: `adapters[name][layer][linear] -> LoraPair`.

    Each adapter in a step costs, per linear it touches, two thin matmuls on its gathered rows (on all rows, with
    no gather or scatter, when it covers them all). Stacking the adapters' pairs into one masked pair of matmuls was
    measured slower on cpu (it multiplies the B-side flops by the number of adapters), so they run one by one.
    """

    def __init__(self, adapters: dict[str, list[dict[str, LoraPair]]]):
        self.adapters = adapters

    def add(self, name: str, layers: list[dict[str, LoraPair]]) -> None:
        self.adapters[name] = layers

    def remove(self, name: str) -> None:
        del self.adapters[name]

    def apply(self, layer: int, linear: str, x: torch.Tensor, y: torch.Tensor,
              step: Optional[StepInputs]) -> torch.Tensor:
        """`y` (the base output for input `x`) with each adapter's delta added on that adapter's rows, in place."""
        if step is None or not step.lora_rows:
            return y
        for name, rows in step.lora_rows.items():
            pair = self.adapters[name][layer].get(linear)
            if pair is None or rows.numel() == 0:
                continue
            if rows.numel() == x.shape[0]:  # the rows are distinct, so these are all rows: no gather or scatter
                y.add_(((x @ pair.a) @ pair.b).to(y.dtype), alpha=pair.scale)
                continue
            delta = (x.index_select(0, rows) @ pair.a) @ pair.b
            if pair.scale != 1.0:
                delta = delta * pair.scale
            y.index_add_(0, rows, delta.to(y.dtype))
        return y


def plora_from_weights(weights: dict[str, torch.Tensor], num_layers: int,
                       scale: float = 1.0) -> list[dict[str, LoraPair]]:
    """Per-layer PLoRA pairs from TurboMind-layout `layers.N.<linear>.lora_a/lora_b.weight` tensors; w1 and w3 are
    fused (A side by side, B block-diagonal) to match the model's one gate_up matmul."""
    layers: list[dict[str, LoraPair]] = []
    for i in range(num_layers):
        p = f"layers.{i}."

        def pair(lin: str, p: str = p) -> tuple[torch.Tensor, torch.Tensor]:
            return weights[f"{p}{lin}.lora_a.weight"], weights[f"{p}{lin}.lora_b.weight"]

        (a1, b1), (a3, b3) = pair("feed_forward.w1"), pair("feed_forward.w3")
        layers.append({
            "attention.w_qkv": LoraPair(*pair("attention.w_qkv"), scale),
            "attention.wo": LoraPair(*pair("attention.wo"), scale),
            "feed_forward.w1w3": LoraPair(torch.cat([a1, a3], dim=1), torch.block_diag(b1, b3), scale),
            "feed_forward.w2": LoraPair(*pair("feed_forward.w2"), scale),
        })
    return layers
