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
