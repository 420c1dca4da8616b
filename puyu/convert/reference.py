"""Load a checkpoint into a transformers model, the reference every engine path is checked against.

InternLM2 has no class in transformers (it ships remote code), so its weights are mapped onto `LlamaForCausalLM`:
the fused grouped `wqkv` is split into q/k/v projections; everything else is a rename.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .readers import CheckpointFiles, _split_internlm2_wqkv
from .spec import ModelSpec, read_model_spec


def internlm2_to_llama_state_dict(files: CheckpointFiles, spec: ModelSpec) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": files.get("model.tok_embeddings.weight"),
        "model.norm.weight": files.get("model.norm.weight"),
        "lm_head.weight": files.get("output.weight"),
    }
    renames = {"attention.wo.weight": "self_attn.o_proj.weight", "feed_forward.w1.weight": "mlp.gate_proj.weight",
               "feed_forward.w3.weight": "mlp.up_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
               "attention_norm.weight": "input_layernorm.weight",
               "ffn_norm.weight": "post_attention_layernorm.weight"}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        q, k, v = _split_internlm2_wqkv(files.get(p + "attention.wqkv.weight"), spec)
        sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"] = q, k
        sd[p + "self_attn.v_proj.weight"] = v
        for old, new in renames.items():
            sd[p + new] = files.get(p + old)
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
        sd = internlm2_to_llama_state_dict(CheckpointFiles(model_dir), spec)
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
        model = model.to(device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
        model = model.to(device)
    return model.eval()
