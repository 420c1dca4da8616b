"""Chat templates puyu supplies itself (no torch here: the tokenizer and the server import this).

InternLM2's template is used for checkpoints that carry none and for the tiny fixtures; the protocol tokens are its
tool-call markers (../shared/spec/internlm2-protocol.md).
"""
from __future__ import annotations

# InternLM2's protocol tokens, in the order of their ids in the real vocabulary (92538..92543).
PROTOCOL_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]

# The InternLM2 chat template, as jinja for tokenizer_config.json.
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set name = message.get('name') %}"
    "{% if name in ['plugin', 'interpreter'] and message['role'] != 'user' %}"
    "{% set name = '<|' + name + '|>' %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] }}{% if name %}{{ ' name=' + name }}{% endif %}"
    "{{ '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
