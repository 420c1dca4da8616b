"""An XComposer2 reference from transformers parts, independent of puyu's vision and PLoRA code.

CLIP: `CLIPVisionModel` built from the config the tiny builder recorded (not derived from shapes), images through
transformers' `CLIPImageProcessorPil` (bicubic square resize, no crop, CLIP mean/std). LLM: the InternLM2 -> Llama
mapping of puyu.convert.reference, with the Partial LoRA added by hand as forward hooks on q/k/v/o/gate/up/down
that add `B(A(x))` on the rows of a mask. Every forward recomputes the whole sequence (no KV cache).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from puyu.convert.reference import load_reference_model

PREFIX = "vit.vision_tower.vision_model."


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            out.update({k: s.get_tensor(k).float() for k in s.keys()})
    return out


class XComposer2Reference:
    def __init__(self, path: Path, plora: bool = True):
        from transformers import CLIPVisionConfig, CLIPVisionModel
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        meta = json.loads((path / "puyu_tiny.json").read_text())
        cfg = json.loads((path / "config.json").read_text())
        w = _tensors(path)
        clip_cfg = CLIPVisionConfig(**meta["clip_config"])
        clip_cfg._attn_implementation = "eager"
        self.clip = CLIPVisionModel(clip_cfg).eval()
        self.clip.load_state_dict({k[len(PREFIX):]: v for k, v in w.items() if k.startswith(PREFIX)}, strict=False)
        side = cfg["img_size"]
        self.processor = CLIPImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False,
                                               do_resize=True, resample=3, do_convert_rgb=True)
        self.proj = [(w[f"vision_proj.{i}.weight"], w[f"vision_proj.{i}.bias"]) for i in (0, 2)]
        self.llm = load_reference_model(path, torch.float32)
        self.mask = torch.zeros(1, 0, dtype=torch.bool)
        if plora:
            self._hook_plora(w, cfg)

    def _hook_plora(self, w: dict[str, torch.Tensor], cfg: dict) -> None:
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        d, g = cfg["hidden_size"] // heads, heads // kv
        for i, layer in enumerate(self.llm.model.layers):
            p = f"model.layers.{i}."
            a = w[p + "attention.wqkv.Plora_A.weight"]
            b = w[p + "attention.wqkv.Plora_B.weight"].reshape(kv, g + 2, d, -1)
            parts = {"q_proj": b[:, :g].reshape(heads * d, -1), "k_proj": b[:, g].reshape(kv * d, -1),
                     "v_proj": b[:, g + 1].reshape(kv * d, -1)}
            for name, bb in parts.items():
                self._hook(getattr(layer.self_attn, name), a, bb)
            for mod, hf in ((layer.self_attn.o_proj, "attention.wo"), (layer.mlp.gate_proj, "feed_forward.w1"),
                            (layer.mlp.up_proj, "feed_forward.w3"), (layer.mlp.down_proj, "feed_forward.w2")):
                self._hook(mod, w[p + hf + ".Plora_A.weight"], w[p + hf + ".Plora_B.weight"])

    def _hook(self, module: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
        def hook(mod, inputs, output):
            delta = F.linear(F.linear(inputs[0], a), b)
            return output + self.mask[..., None].to(output.dtype) * delta

        module.register_forward_hook(hook)

    @torch.no_grad()
    def image_embeds(self, image) -> torch.Tensor:
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        feats = self.clip(pixel_values=pixels).last_hidden_state[0, 1:]
        (w0, b0), (w2, b2) = self.proj
        return F.linear(F.gelu(F.linear(feats, w0, b0)), w2, b2)

    @torch.no_grad()
    def logits(self, ids: list[int], images: list[tuple[int, object]]) -> torch.Tensor:
        """Logits `[T, vocab]` of the whole sequence; `images`: (start position, PIL image) of each image."""
        emb = self.llm.model.embed_tokens(torch.tensor([ids]))
        mask = torch.zeros(1, len(ids), dtype=torch.bool)
        for start, image in images:
            e = self.image_embeds(image)
            emb[0, start:start + len(e)] = e
            mask[0, start:start + len(e)] = True
        self.mask = mask
        return self.llm(inputs_embeds=emb, use_cache=False).logits[0]

    def greedy(self, ids: list[int], images: list[tuple[int, object]], new_tokens: int) -> list[int]:
        out: list[int] = []
        for _ in range(new_tokens):
            out.append(int(self.logits(ids + out, images)[-1].argmax()))
        return out
