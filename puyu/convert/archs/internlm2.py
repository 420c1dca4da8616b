"""InternLM2 (and the InternLM2 LLM inside InternLM-XComposer2, whose vision side is convert/xcomposer2.py)."""
from .base import HFLayout

INTERNLM2 = HFLayout(
    key="internlm2", hf_architectures=("InternLM2ForCausalLM", "InternLMXComposer2ForCausalLM"),
    embed="model.tok_embeddings.weight", lm_head="output.weight",
    attn_norm="attention_norm", ffn_norm="ffn_norm", qkv=("attention.wqkv",), o="attention.wo",
    gate="feed_forward.w1", up="feed_forward.w3", down="feed_forward.w2")
