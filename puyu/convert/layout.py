"""The tp=1 TurboMind tensors a model has: names, shapes and whether they are packed int4.

Both the workspace writer (progress total, sanity) and the reader (which files to map) derive from this one list.
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import ModelSpec

LINEARS = ("attention.w_qkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    packed: bool = False  # int32 words of 8 nibbles (qweight); otherwise a float tensor


def linear_dims(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear of a layer."""
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    return {"attention.w_qkv": (h, (spec.num_heads + 2 * spec.num_kv_heads) * d),
            "attention.wo": (spec.num_heads * d, h),
            "feed_forward.w1": (h, i), "feed_forward.w3": (h, i), "feed_forward.w2": (i, h)}


def tp1_tensors(spec: ModelSpec, group_size: int = 0) -> dict[str, TensorInfo]:
    """Every tp=1 tensor name -> its shape; `group_size > 0` means 4-bit linears (qweight/scales/zeros)."""
    h, v = spec.hidden_size, spec.vocab_size
    out: dict[str, TensorInfo] = {"tok_embeddings.weight": TensorInfo((v, h)), "norm.weight": TensorInfo((h,)),
                                  "output.weight": TensorInfo((v, h))}
    dims = linear_dims(spec)
    for layer in range(spec.num_layers):
        p = f"layers.{layer}."
        for lin in LINEARS:
            n_in, n_out = dims[lin]
            if group_size:
                out[f"{p}{lin}.qweight"] = TensorInfo((n_in, n_out // 8), packed=True)
                out[f"{p}{lin}.scales"] = TensorInfo((n_in // group_size, n_out))
                out[f"{p}{lin}.zeros"] = TensorInfo((n_in // group_size, n_out))
            else:
                out[f"{p}{lin}.weight"] = TensorInfo((n_in, n_out))
        if spec.attn_bias:
            out[f"{p}attention.w_qkv.bias"] = TensorInfo((dims["attention.w_qkv"][1],))
        out[f"{p}attention_norm.weight"] = TensorInfo((h,))
        out[f"{p}ffn_norm.weight"] = TensorInfo((h,))
        if spec.lora_r:  # XComposer2's Partial LoRA: x @ lora_a [in, r] @ lora_b [r, out] on image tokens
            for lin in LINEARS:
                n_in, n_out = dims[lin]
                out[f"{p}{lin}.lora_a.weight"] = TensorInfo((n_in, spec.lora_r))
                out[f"{p}{lin}.lora_b.weight"] = TensorInfo((spec.lora_r, n_out))
    return out
