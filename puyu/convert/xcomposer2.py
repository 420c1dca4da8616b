"""InternLM-XComposer2 checkpoints: the Partial LoRA tensors in TurboMind layout, and the vision tower's weights.

The LLM is InternLM2 (the common reader handles it). Each of `wqkv`, `wo`, `w1`, `w3`, `w2` also has
`Plora_A.weight` `[r, in]` and `Plora_B.weight` `[out, r]`; in TurboMind layout they become
`layers.N.<linear>.lora_a.weight` `[in, r]` and `lora_b.weight` `[r, out]`, with `w_qkv`'s B columns in the fused,
rotary-permuted order of `w_qkv` itself (so `x @ lora_a @ lora_b` adds to `x @ w_qkv` column by column).

The vision tower is a CLIP ViT under `vit.vision_tower.vision_model.*` whose config the checkpoint does not carry
(the remote code fetches `openai/clip-vit-large-patch14-336`); `clip_config_from_weights` derives it from the shapes.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from .archs import split_grouped_qkv
from .readers import CheckpointFiles, fused_qkv
from .spec import CheckpointError, ModelSpec

VISION_PREFIX = "vit.vision_tower.vision_model."
PROJECTOR = ("vision_proj.0", "vision_proj.2")
# HF linear -> TurboMind linear
LORA_LINEARS = {"attention.wqkv": "attention.w_qkv", "attention.wo": "attention.wo",
                "feed_forward.w1": "feed_forward.w1", "feed_forward.w3": "feed_forward.w3",
                "feed_forward.w2": "feed_forward.w2"}
CLIP_HEAD_DIM = 64  # every CLIP ViT (B/16, L/14, L/14-336) uses 64-wide heads; shapes cannot tell the head count


def plora_rank(files: CheckpointFiles) -> int:
    return int(files.get("model.layers.0.attention.wqkv.Plora_A.weight").shape[0])


def iter_plora_tensors(get: Callable[[str], torch.Tensor], spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """(TurboMind name, tensor) of every PLoRA matrix, at tp=1: `lora_a` `[in, r]`, `lora_b` `[r, out]`."""
    for i in range(spec.num_layers):
        for hf, tm in LORA_LINEARS.items():
            p = f"model.layers.{i}.{hf}."
            a, b = get(p + "Plora_A.weight"), get(p + "Plora_B.weight")
            if a.shape[0] != b.shape[1]:
                raise CheckpointError(f"{p}Plora_A/Plora_B: ranks differ ({a.shape[0]} vs {b.shape[1]})")
            if tm == "attention.w_qkv":
                b = fused_qkv(list(split_grouped_qkv(b, spec)), spec)
            yield f"layers.{i}.{tm}.lora_a.weight", a.t().contiguous()
            yield f"layers.{i}.{tm}.lora_b.weight", b.t().contiguous()


def clip_fields(shape_of: Callable[[str], tuple[int, ...]], names: list[str], where: object) -> dict:
    """`CLIPVisionConfig` fields of the tower from its tensors' shapes alone (offline: no hub config needed).

    hidden = the patch embedding's output channels, patch = its kernel, image size = patch * sqrt(positions - 1),
    layers = the number of `encoder.layers.N`, intermediate = fc1's rows, heads = hidden / 64; CLIP's activation
    (quick_gelu) and LayerNorm eps (1e-5) are fixed by the architecture. `where` names the checkpoint in errors.
    """
    try:
        patch = shape_of(VISION_PREFIX + "embeddings.patch_embedding.weight")
        positions = shape_of(VISION_PREFIX + "embeddings.position_embedding.weight")[0]
        inter = shape_of(VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0]
    except (KeyError, CheckpointError):
        raise CheckpointError(f"{where}: no CLIP vision tower under {VISION_PREFIX!r}") from None
    hidden, channels, p = int(patch[0]), int(patch[1]), int(patch[2])
    side = round((positions - 1) ** 0.5)
    if side * side != positions - 1 or hidden % CLIP_HEAD_DIM:
        raise CheckpointError(f"{where}: the CLIP tower's shapes are not a square ViT with 64-wide heads "
                              f"(positions {positions}, hidden {hidden})")
    layer_ids = {int(m.group(1)) for n in names
                 if (m := re.match(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.", n))}
    return dict(hidden_size=hidden, intermediate_size=int(inter), num_hidden_layers=max(layer_ids) + 1,
                num_attention_heads=hidden // CLIP_HEAD_DIM, image_size=side * p, patch_size=p,
                num_channels=channels, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def clip_config_from_weights(files: CheckpointFiles):
    """A `CLIPVisionConfig` for the tower of a checkpoint (see `clip_fields`)."""
    from transformers import CLIPVisionConfig

    fields = clip_fields(lambda n: tuple(files.get(n).shape), files.names(), files.model_dir)
    return CLIPVisionConfig(**fields)


def vision_summary(shapes: dict[str, tuple[int, ...]], img_size: int, where: object) -> dict:
    """What `puyu inspect` shows of the vision side, from tensor shapes (headers only)."""
    f = clip_fields(lambda n: shapes[n], list(shapes), where)
    lora = shapes.get("model.layers.0.attention.wqkv.Plora_A.weight")
    side = f["image_size"] // f["patch_size"]
    return {"vision": f"CLIP ViT ({f['num_hidden_layers']} layers, hidden {f['hidden_size']}, "
                      f"{f['num_attention_heads']} heads, patch {f['patch_size']}) at {f['image_size']} px",
            "image_tokens": f"{side}x{side} = {side * side} per image (img_size {img_size})",
            "plora_r": lora[0] if lora else "none"}


def vision_state_dict(files: CheckpointFiles) -> dict[str, torch.Tensor]:
    """The tower's tensors named as `CLIPVisionModel`'s state dict."""
    return {n[len(VISION_PREFIX):]: files.get(n) for n in files.names() if n.startswith(VISION_PREFIX)}


def projector_weights(files: CheckpointFiles) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`[(weight [out, in], bias)]` of the projector's two linears (GELU between them)."""
    return [(files.get(f"{p}.weight"), files.get(f"{p}.bias")) for p in PROJECTOR]
