"""The native engine: request -> scheduler -> model runner -> sampler -> stream (see DEVELOPERS.md, Contracts).

Attributes are imported lazily so that `import puyu.engine.kv_cache` (or the CLI) does not load the whole engine.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AsyncEngine": ".engine", "LLMEngine": ".llm_engine", "StreamOutput": ".outputs",
    "Pipeline": ".pipeline", "Response": ".pipeline", "pipeline": ".pipeline",
    "PromptTooLongError": ".errors", "CheckpointError": ".errors", "ConfigError": ".errors",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (lazy names: the dict is the one list of them)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
