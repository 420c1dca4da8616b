"""One engine replica (a Ray Serve deployment class) and the board its counters are posted to.

Each replica owns an `AsyncEngine` on its device (a GPU as a Ray resource, or a CPU thread count) and streams
`StreamOutput`s to the ingress. Leaving the stream early (the ingress cancels it when its client is gone) closes the
engine iterator, which aborts the request and frees its KV blocks. Every `PUSH_PERIOD_S` and after every request a
replica posts `engine.stats()` (plus its id, pid and request count) to the `StatsBoard` actor, which the ingress reads
for /metrics and /health: a dead replica stops posting, so its gauges age out while its counters stay summed.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, AsyncIterator, Optional

import ray

from ..config import EngineConfig, GenerationConfig
from ..engine.client import Prompt
from ..engine.outputs import StreamOutput

PUSH_PERIOD_S = 0.5
BOARD_NAMESPACE = "puyu"


@ray.remote(num_cpus=0)
class StatsBoard:
    """replica id -> (time posted, stats): the replicas' last word."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, dict[str, Any]]] = {}

    def post(self, replica: str, stats: dict[str, Any]) -> None:
        self.entries[replica] = (time.time(), stats)

    def snapshot(self) -> dict[str, tuple[float, dict[str, Any]]]:
        return dict(self.entries)


def stats_board(name: str) -> Any:
    """The board called `name`, created on first use; it lives as long as the Ray cluster (a `serve deploy`ed app
    outlives the process that created it)."""
    return StatsBoard.options(name=name, namespace=BOARD_NAMESPACE, get_if_exists=True,  # type: ignore[attr-defined]
                              lifetime="detached").remote()


class EngineReplica:
    """The deployment class: `EngineReplica(model_path, config, board)`; methods are called through a handle."""

    def __init__(self, model_path: str, config: EngineConfig, board: Optional[str] = None):
        from ray import serve

        from ..engine import AsyncEngine

        self.engine = AsyncEngine(model_path, config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.requests = 0
        self._board = stats_board(board) if board else None
        self._stop = threading.Event()
        if self._board is not None:
            threading.Thread(target=self._push_loop, name="puyu-stats", daemon=True).start()

    def info(self) -> dict[str, Any]:
        """What the ingress needs to stand in for the engine: names, lengths and the tokenizer's inputs."""
        spec = self.engine.spec
        return {"model_name": self.engine.model_name, "session_len": int(self.engine.session_len),
                "model_path": str(self.engine.model_path), "vocab_size": spec.vocab_size,
                "eos_token_ids": list(spec.eos_token_ids), "arch": spec.arch,
                "block_size": int(self.engine.config.cache_block_seq_len), "replica": self.replica_id, "pid": os.getpid()}

    async def generate(self, prompt: Prompt, gen_config: GenerationConfig, request_id: Optional[str] = None,
                       route: tuple[int, ...] = ()) -> AsyncIterator[StreamOutput]:
        """The engine's stream; `route` is the router's key (unused here). Errors before streaming (a prompt too
        long) are raised as the engine raises them."""
        self.requests += 1
        try:
            it = self.engine.generate(prompt, gen_config, request_id=request_id)
        except ValueError as exc:  # as a plain ValueError: Ray must rebuild it in the ingress (one argument)
            raise ValueError(str(exc)) from None
        try:
            async for out in it:
                yield out
        finally:
            await it.aclose()
            self._post()

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), "requests": self.requests, "pid": os.getpid()}

    def _post(self) -> None:
        if self._board is not None:
            self._board.post.remote(self.replica_id, self.stats())

    def _push_loop(self) -> None:
        while not self._stop.wait(PUSH_PERIOD_S):
            try:
                self._post()
            except Exception:  # the board is gone (cluster shutting down): nothing to report to
                return

    def __del__(self) -> None:
        self._stop.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
