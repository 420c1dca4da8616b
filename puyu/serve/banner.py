"""The start-up line that says what actually runs: compute dtype, KV-cache size, session length, chat template.

Shared by `puyu serve`, `puyu chat` and `puyu webui`, so that a bf16 checkpoint computing in float32 on a CPU, or a
cache far larger than the model, is visible at start-up instead of in `top`.
"""
from __future__ import annotations

from typing import Any

from ..tiny import INTERNLM2_CHAT_TEMPLATE

# markers of the common template families, checked in order (InternLM2's is ChatML with its own tokens)
_TEMPLATE_FAMILIES = (("<|start_header_id|>", "Llama 3"), ("<|im_start|>", "ChatML"), ("[INST]", "Llama 2 / Mistral"),
                      ("<start_of_turn>", "Gemma"), ("<|user|>", "Zephyr / Phi"))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe_chat_template(template: str) -> str:
    """What a user needs to know of the template in use: whose it is and its family."""
    if not template:
        return "none (chat requests are refused; /v1/completions works)"
    if template == INTERNLM2_CHAT_TEMPLATE:
        return "InternLM2's (built in: the checkpoint has none)"
    family = next((name for marker, name in _TEMPLATE_FAMILIES if marker in template), "custom")
    return f"the checkpoint's ({family})"


def engine_banner(engine: Any) -> str:
    """One line: 'dtype float32 (checkpoint bfloat16) · KV cache 512.0 MiB (23552 tokens) · session 8192 tokens ·
    chat template ...'. Fields the engine does not report (TurboMind) are left out."""
    stats = engine.stats() if hasattr(engine, "stats") else {}
    spec = getattr(engine, "spec", None)
    parts = []
    if stats.get("dtype"):
        checkpoint = getattr(spec, "torch_dtype", "")
        note = f" (checkpoint {checkpoint})" if checkpoint and checkpoint != stats["dtype"] else ""
        parts.append(f"dtype {stats['dtype']}{note} on {stats.get('device', '?')}")
    if stats.get("kv_cache_bytes"):
        tokens = stats["blocks_total"] * stats["block_size"]
        quant = {4: ", int4", 8: ", int8"}.get(stats.get("quant_policy", 0), "")
        parts.append(f"KV cache {human_bytes(stats['kv_cache_bytes'])} ({tokens} tokens{quant})")
    session_len = getattr(engine, "session_len", None)
    if session_len:
        parts.append(f"session {session_len} tokens")
    template = getattr(getattr(engine, "tokenizer", None), "chat_template", None)
    if isinstance(template, str):
        parts.append(f"chat template {describe_chat_template(template)}")
    return " · ".join(parts)
