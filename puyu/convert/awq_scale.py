"""Activation-aware weight scaling (AWQ, Lin et al. 2023) before round-to-nearest 4-bit quantisation.

One float forward pass of the transformers reference model over a calibration text records the inputs of every
group of linears that share an input: the attention input (q/k/v, after attention_norm), the FFN input (gate/up,
after ffn_norm) and the down projection's input (silu(gate) * up). For each group, per-input-channel scales
`s = mean|x| ** a` (normalised) are searched over a grid of `a` in [0, 1] (a = 0 is plain RTN) to minimise
`|| X W^T - X (Q(W diag(s)) diag(1/s))^T ||` with Q the group-wise RTN quantiser; the best `s` is multiplied
into the weights' input columns and divided out of the op producing the input (the norm weight, or the up
projection's rows), which leaves the float model unchanged. The attention output projection is not scaled (its input comes from v through attention; with grouped
KV heads its channels do not map one to one onto v's rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .archs import layout
from .awq import fake_quantize
from .spec import CheckpointError, ModelSpec

GRID = 20


@dataclass
class ScaleGroup:
    """Linears (HF names of their weights) sharing one input, and the tensor that produces it."""

    linears: list[str]
    producer: str  # a norm weight `[in]`, or a linear weight whose output rows feed the input
    producer_rows: bool  # True: scale the producer's output rows (up_proj); False: a norm vector
    inputs: torch.Tensor  # calibration inputs `[tokens, in]`


@dataclass
class ScaleResult:
    alpha: float
    loss: float
    rtn_loss: float


def apply_awq_scales(src: Path, spec: ModelSpec, weights: dict[str, torch.Tensor], text: str, group_size: int,
                     max_tokens: int = 512) -> list[ScaleResult]:
    """Scale `weights` (HF names, modified in place) for the calibration `text`; returns each group's search."""
    ids = _calibration_ids(src, text, max_tokens)
    groups = collect_groups(src, spec, weights, ids)
    results = []
    for group in groups:
        ws = [weights[n].float() for n in group.linears]
        scales, result = search_scales(ws, group.inputs, group_size)
        for n in group.linears:
            weights[n] = (weights[n].float() * scales).to(weights[n].dtype)
        prod = weights[group.producer]
        factor = scales[:, None] if group.producer_rows else scales
        weights[group.producer] = (prod.float() / factor).to(prod.dtype)
        results.append(result)
    return results


def search_scales(ws: list[torch.Tensor], x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ScaleResult]:
    """The per-input-channel scales minimising the quantised output error of the linears `ws` (HF `[out, in]`)."""
    w = torch.cat(ws, dim=0)
    ref = x @ w.t()
    mean_abs = x.abs().mean(dim=0).clamp(min=1e-6)
    best, best_loss, rtn_loss = torch.ones_like(mean_abs), float("inf"), float("inf")
    best_alpha = 0.0
    for step in range(GRID + 1):
        alpha = step / GRID
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quantize((w * s).t(), group_size).t() / s
        loss = (x @ wq.t() - ref).pow(2).mean().item()
        if step == 0:
            rtn_loss = loss
        if loss < best_loss:
            best, best_loss, best_alpha = s, loss, alpha
    return best, ScaleResult(best_alpha, best_loss, rtn_loss)


def _calibration_ids(src: Path, text: str, max_tokens: int) -> list[int]:
    from ..tokenizer import Tokenizer

    ids = Tokenizer(src).encode(text, add_special_tokens=False)[:max_tokens]
    if len(ids) < 8:
        raise CheckpointError(f"calibration text gives {len(ids)} tokens; at least 8 are needed")
    return ids


def collect_groups(src: Path, spec: ModelSpec, weights: dict[str, torch.Tensor], ids: list[int]) -> list[ScaleGroup]:
    """Run the float reference model once and record each group's inputs."""
    from .reference import load_reference_model

    model = load_reference_model(src, torch.float32)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for key, module in (("attn", layer.self_attn.q_proj), ("mlp", layer.mlp.gate_proj),
                            ("down", layer.mlp.down_proj)):
            hooks.append(module.register_forward_hook(
                lambda _m, args, _out, k=(i, key): captured.__setitem__(k, args[0].detach().reshape(-1,
                                                                                          args[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    groups = []
    names = layout(spec.arch)
    for i in range(spec.num_layers):
        def w(name: str, p: str = f"model.layers.{i}.") -> str:
            return f"{p}{name}.weight"

        groups.append(ScaleGroup([w(n) for n in names.qkv], w(names.attn_norm), False, captured[(i, "attn")]))
        groups.append(ScaleGroup([w(names.gate), w(names.up)], w(names.ffn_norm), False, captured[(i, "mlp")]))
        groups.append(ScaleGroup([w(names.down)], w(names.up), True, captured[(i, "down")]))
    return groups
