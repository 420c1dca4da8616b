"""Llama (SmolLM2 among its checkpoints): separate q/k/v projections, no biases."""
from .base import HFLayout

LLAMA = HFLayout(
    key="llama", hf_architectures=("LlamaForCausalLM",),
    embed="model.embed_tokens.weight", lm_head="lm_head.weight",
    attn_norm="input_layernorm", ffn_norm="post_attention_layernorm",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), o="self_attn.o_proj",
    gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
