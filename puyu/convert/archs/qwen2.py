"""Qwen2: Llama's names, with q/k/v biases (ModelSpec.attn_bias)."""
import dataclasses

from .llama import LLAMA

QWEN2 = dataclasses.replace(LLAMA, key="qwen2", hf_architectures=("Qwen2ForCausalLM",))
