"""Load a checkpoint into a transformers model, the reference every engine path is checked against.

InternLM2 has no class in transformers (it ships remote code), so its weights are mapped onto `LlamaForCausalLM`:
the fused grouped `wqkv` is split into q/k/v projections; everything else is a rename.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .archs import LLAMA, layout
from .readers import CheckpointFiles
from .spec import ModelSpec, read_model_spec


def to_llama_state_dict(files: CheckpointFiles, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under `LlamaForCausalLM`'s names (InternLM2's grouped wqkv split into q/k/v)."""
    src, dst = layout(spec.arch), LLAMA
    sd: dict[str, torch.Tensor] = {dst.embed: files.get(src.embed), dst.final_norm: files.get(src.final_norm),
                                   dst.lm_head: files.get(src.lm_head)}
    pairs = [(src.o, dst.o), (src.gate, dst.gate), (src.up, dst.up), (src.down, dst.down),
             (src.attn_norm, dst.attn_norm), (src.ffn_norm, dst.ffn_norm)]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        q, k, v = src.qkv_parts(files.get, p, spec, "weight")
        sd.update({p + name + ".weight": t for name, t in dst.join_qkv(q, k, v, spec).items()})
        for old, new in pairs:
            sd[f"{p}{new}.weight"] = files.get(f"{p}{old}.weight")
    return sd


def _llama_config(spec: ModelSpec):
    from transformers import LlamaConfig

    rope_parameters: dict = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling_type:
        rope_parameters.update(rope_type=spec.rope_scaling_type, factor=spec.rope_scaling_factor)
    return LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.norm_eps, rope_parameters=rope_parameters,
        attention_bias=spec.attn_bias, tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=spec.bos_token_id, eos_token_id=list(spec.eos_token_ids),
    )


def load_reference_model(model_dir: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A transformers causal LM with the checkpoint's weights (InternLM2 mapped onto Llama), in eval mode."""
    model_dir = Path(model_dir)
    spec = read_model_spec(model_dir)
    if spec.arch == "internlm2":
        from transformers import LlamaForCausalLM

        config = _llama_config(spec)
        config._attn_implementation = "eager"
        model: Any = LlamaForCausalLM(config)
        model = model.to(dtype)
        sd = to_llama_state_dict(CheckpointFiles(model_dir), spec)
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
        model = model.to(device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
        model = model.to(device)
    return model.eval()
