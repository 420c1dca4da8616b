"""The architectures puyu reads, one file each; `layout(key)` and `HF_ARCHITECTURES` are the registry."""
from __future__ import annotations

from .base import Heads, HFLayout, group_qkv, split_grouped_qkv
from .internlm2 import INTERNLM2
from .llama import LLAMA
from .qwen2 import QWEN2

LAYOUTS: dict[str, HFLayout] = {a.key: a for a in (INTERNLM2, LLAMA, QWEN2)}
# config.json `architectures[0]` -> ModelSpec.arch
HF_ARCHITECTURES: dict[str, str] = {name: a.key for a in LAYOUTS.values() for name in a.hf_architectures}


def layout(key: str) -> HFLayout:
    """The layout of ModelSpec.arch `key` (KeyError names the known ones)."""
    try:
        return LAYOUTS[key]
    except KeyError:
        raise KeyError(f"no architecture {key!r} (known: {', '.join(LAYOUTS)})") from None


__all__ = ["HF_ARCHITECTURES", "LAYOUTS", "HFLayout", "Heads", "group_qkv", "layout", "split_grouped_qkv"]
