"""XComposer2's vision side: CLIP preprocessing, the CLIP tower and the projector, image -> `[tokens, hidden]`.

Preprocess: RGB, bicubic resize to `img_size` x `img_size` (no crop), scale to [0, 1], normalise with CLIP's
mean/std. Features: the last encoder layer's output (no post_layernorm), CLS dropped. Projector: Linear, exact (erf)
GELU, Linear. The CLIP config comes from the weights' shapes (convert/xcomposer2.py), so no hub access is needed.
"""
from __future__ import annotations

from pathlib import Path

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..convert.readers import CheckpointFiles
from ..convert.xcomposer2 import clip_config_from_weights, projector_weights, vision_state_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(image, img_size: int) -> torch.Tensor:
    """A PIL image -> float32 `[3, img_size, img_size]`, normalised as CLIP expects.

    Computed with numpy (single-threaded): it runs in the caller's thread, and torch ops there would start OpenMP
    regions beside the engine thread's (see engine.py)."""
    from PIL import Image

    rgb = image.convert("RGB").resize((img_size, img_size), Image.Resampling.BICUBIC)
    x = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    normed = (x - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(normed.transpose(2, 0, 1)))


class XComposer2Vision:
    """The tower and projector of one checkpoint, on one device and dtype."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device):
        from transformers import CLIPVisionModel

        files = CheckpointFiles(Path(model_dir))
        config = clip_config_from_weights(files)
        config._attn_implementation = "eager"
        self.img_size = int(config.image_size)
        self.num_tokens = (config.image_size // config.patch_size) ** 2
        tower = CLIPVisionModel(config)
        state = vision_state_dict(files)
        missing = [k for k in tower.state_dict() if k not in state and not k.endswith("position_ids")]
        if missing:
            from ..convert.spec import CheckpointError

            raise CheckpointError(f"{model_dir}: the CLIP tower lacks {missing[0]!r}")
        tower.load_state_dict(state, strict=False)
        moved: Any = tower
        self.tower = moved.to(device=device, dtype=dtype).eval()
        self.proj = [(w.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                     for w, b in projector_weights(files)]
        self.dtype, self.device = dtype, device

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[N, 3, S, S]` preprocessed images -> `[N, tokens, hidden]` LLM-space embeddings."""
        out = self.tower(pixel_values=pixels.to(device=self.device, dtype=self.dtype))
        feats = out.last_hidden_state[:, 1:]  # the encoder's output: post_layernorm is only on the pooled CLS
        (w0, b0), (w2, b2) = self.proj
        return F.linear(F.gelu(F.linear(feats, w0, b0)), w2, b2)
