"""puyu: a serving stack for InternLM chat models.

`puyu.pipeline(model_path, **engine_options)` is the Python entry point (like LMDeploy's `pipeline`);
`EngineConfig` and `GenerationConfig` are the typed options. Imports are lazy: `import puyu` loads no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "pipeline": "puyu.engine.pipeline", "Pipeline": "puyu.engine.pipeline", "Response": "puyu.engine.pipeline",
    "AsyncEngine": "puyu.engine.engine", "EngineConfig": "puyu.config", "GenerationConfig": "puyu.config",
    "ConfigError": "puyu.config", "PromptTooLongError": "puyu.engine.errors",
    "CheckpointError": "puyu.convert.spec",
}
__all__ = ["__version__", *sorted(_EXPORTS)]  # noqa: PLE0604 (lazy names: the dict is the one list of them)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'puyu' has no attribute {name!r}")
