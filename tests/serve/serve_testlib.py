"""Helpers for the serve tests: a real uvicorn server in a thread (puyu.testing), and a "scripted" tiny checkpoint.

The scripted checkpoint is a real InternLM2 checkpoint whose weights make greedy decoding follow fixed token chains:
attention and FFN outputs are zeroed, so the residual stream is the token's embedding and the next token depends on
the current token only; the LM head maps each chain token onto its successor. A prompt ending in a chain's first
token is answered with that chain (e.g. an InternLM2 tool call), through the real engine, tokenizer and server.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from puyu.testing import load_shards, save_shards


def script_checkpoint(model_dir: Path, chains: Sequence[Sequence[int]], gain: float = 30.0) -> None:
    """Rewrite the weights of an InternLM2 tiny checkpoint so that greedy decoding follows `chains` (token ids;
    each token may have only one successor across all chains)."""
    successor: dict[int, int] = {}
    for chain in chains:
        for cur, nxt in zip(chain, chain[1:]):
            if successor.setdefault(cur, nxt) != nxt:
                raise ValueError(f"token {cur} would need two successors ({successor[cur]} and {nxt})")
    shards = load_shards(model_dir)
    weights = {k: v for shard in shards.values() for k, v in shard.items()}
    embed = weights["model.tok_embeddings.weight"].float()
    normed = embed / embed.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    head = torch.zeros_like(weights["output.weight"], dtype=torch.float32)
    for cur, nxt in successor.items():
        head[nxt] += gain * normed[cur] / normed[cur].pow(2).sum()
    for shard in shards.values():
        for name, t in shard.items():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                shard[name] = torch.zeros_like(t)
            elif name.endswith("norm.weight"):
                shard[name] = torch.ones_like(t)
            elif name == "output.weight":
                shard[name] = head.to(t.dtype)
    save_shards(model_dir, shards)


def chain_ids(tokenizer: Any, start_text: str, reply: str) -> list[int]:
    """The last token of `start_text` followed by the tokens of `reply`."""
    return tokenizer.encode(start_text, add_special_tokens=False)[-1:] + \
        tokenizer.encode(reply, add_special_tokens=False)


def metric(text: str, name: str) -> Optional[float]:
    """The value of an unlabelled metric in a Prometheus scrape."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


CALL_REPLY = 'Sure.<|action_start|><|plugin|>{"name": "get_weather"}<|action_end|><|im_end|>'
BAD_REPLY = "BAD<|action_end|><|im_end|>"  # after a forced '{"name": ..., "parameters": ' prefix: broken JSON


def scripted_checkpoint(source: Path, out: Path) -> Path:
    """A copy of the tiny InternLM2 checkpoint `source` that answers every chat turn with CALL_REPLY, and a forced
    named tool call (prompt ending in '"parameters": ') with BAD_REPLY."""
    import shutil

    from puyu.tokenizer import Tokenizer

    shutil.copytree(source, out)
    tok = Tokenizer(out)
    script_checkpoint(out, [chain_ids(tok, "assistant\n", CALL_REPLY), chain_ids(tok, '"parameters": ', BAD_REPLY)])
    return out


def conforms(value, schema) -> bool:
    """A small JSON-schema check for the keywords used here (type, properties, required, enum, items, bounds)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict) or any(k not in value for k in schema.get("required", [])):
            return False
        props = schema.get("properties", {})
        if props and any(k not in props for k in value):
            return False
        return all(conforms(v, props[k]) for k, v in value.items() if k in props)
    if kind == "array":
        return (isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
                and all(conforms(v, schema.get("items", {})) for v in value))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", value) <= value <= schema.get("maximum", value))
    if kind == "boolean":
        return isinstance(value, bool)
    return kind is None
