"""Helpers for the serve tests: a real uvicorn server in a thread and a "scripted" tiny checkpoint (both in
puyu.testing), and the scripted replies the tests use."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from puyu.testing import chain_ids, script_checkpoint  # noqa: F401 (moved to puyu.testing, re-exported)


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
