"""A tiny random InternLM-XComposer2-shaped checkpoint, built offline for the vision-language tests.

Layout as the real checkpoints (`internlm/internlm-xcomposer2-vl-7b`): an InternLM2 LLM (`model.*`, `output.weight`)
whose `wqkv`, `wo`, `w1`, `w3`, `w2` each carry a Partial LoRA (`<linear>.Plora_A.weight` `[r, in]`,
`<linear>.Plora_B.weight` `[out, r]`), a CLIP vision tower under `vit.vision_tower.vision_model.*` and the projector
`vision_proj.{0,2}`. As in the real repository, no CLIP config is written: a reader has to derive it from the
weights' shapes. `puyu_tiny.json` records the CLIP config used, so that a test's reference can build CLIP
independently of that derivation.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .tiny import TinyShape, build_checkpoint, write_sharded_safetensors

ARCHITECTURE = "InternLMXComposer2ForCausalLM"
VISION_PREFIX = "vit.vision_tower.vision_model."
LORA_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


@dataclass(frozen=True)
class TinyVisionShape:
    hidden_size: int = 128  # two 64-wide heads, as every CLIP ViT has
    num_hidden_layers: int = 2
    intermediate_size: int = 256
    patch_size: int = 14
    img_size: int = 56  # 4 x 4 = 16 image tokens
    plora_r: int = 8

    @property
    def num_heads(self) -> int:
        return self.hidden_size // 64

    @property
    def image_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def clip_config_dict(v: TinyVisionShape) -> dict:
    """The CLIPVisionConfig fields of the tiny tower (what the real tower's openai config says, scaled down)."""
    return {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_heads,
            "image_size": v.img_size, "patch_size": v.patch_size, "num_channels": 3,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": v.hidden_size}


def _clip_weights(v: TinyVisionShape, seed: int) -> dict[str, torch.Tensor]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**clip_config_dict(v)))
    with torch.no_grad():  # peakier features than the init: the image must visibly move the LLM
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() == 2:
                p.mul_(4.0)
    return {f"{VISION_PREFIX}{k}": t.detach().clone() for k, t in model.state_dict().items()
            if not k.endswith("position_ids")}


def _plora_and_projector(llm: dict[str, torch.Tensor], shape: TinyShape, v: TinyVisionShape,
                         seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    out: dict[str, torch.Tensor] = {}
    for layer in range(shape.num_hidden_layers):
        for lin in LORA_LINEARS:
            base = llm[f"model.layers.{layer}.{lin}.weight"]
            out_f, in_f = base.shape
            p = f"model.layers.{layer}.{lin}."
            out[p + "Plora_A.weight"] = torch.randn(v.plora_r, in_f, generator=gen) / math.sqrt(in_f)
            out[p + "Plora_B.weight"] = torch.randn(out_f, v.plora_r, generator=gen) / math.sqrt(v.plora_r)
    h = shape.hidden_size
    out["vision_proj.0.weight"] = torch.randn(h, v.hidden_size, generator=gen) / math.sqrt(v.hidden_size)
    out["vision_proj.0.bias"] = 0.1 * torch.randn(h, generator=gen)
    out["vision_proj.2.weight"] = torch.randn(h, h, generator=gen) * (3.0 / math.sqrt(h))
    out["vision_proj.2.bias"] = 0.1 * torch.randn(h, generator=gen)
    return out


def build_xcomposer2_checkpoint(out_dir: Path | str, dtype: torch.dtype = torch.float16,
                                shape: Optional[TinyShape] = None, vision: Optional[TinyVisionShape] = None,
                                seed: int = 0) -> Path:
    """An XComposer2 checkpoint dir: the tiny InternLM2 (tokenizer, LLM weights) plus PLoRA, CLIP, projector."""
    shape, vision = shape or TinyShape(), vision or TinyVisionShape()
    out_dir = build_checkpoint(out_dir, "internlm2", dtype, shape, seed=seed, num_shards=1)
    from safetensors.torch import load_file

    shard = next(out_dir.glob("model-*.safetensors"))
    weights = load_file(str(shard))
    shard.unlink()
    (out_dir / "model.safetensors.index.json").unlink()
    extra = _plora_and_projector(weights, shape, vision, seed)
    extra.update(_clip_weights(vision, seed + 2))
    weights.update({k: t.to(dtype) for k, t in extra.items()})
    write_sharded_safetensors(weights, out_dir, 2)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg.update(architectures=[ARCHITECTURE], model_type="internlmxcomposer2", img_size=vision.img_size,
               vision_tower="openai/clip-vit-large-patch14-336",
               auto_map={"AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    meta = json.loads((out_dir / "puyu_tiny.json").read_text())
    meta.update(arch="xcomposer2", vision=asdict(vision), clip_config=clip_config_dict(vision))
    (out_dir / "puyu_tiny.json").write_text(json.dumps(meta))
    return out_dir
