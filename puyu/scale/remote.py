"""`RayEngine`: the EngineClient the API server (puyu/serve/api_server.py, unchanged) runs on when the engines are
Ray Serve replicas.

`generate` tokenises the prompt here only to compute its routing key (the block-hash chain; the replica tokenises
again and checks the prompt as the engine always does) and streams the replica's outputs. Faults: a replica that
dies before anything was streamed is retried on another (up to `retries` times); one that dies after raises an
APIError 503 naming the replica, which the server answers as any engine failure (a 503 JSON error, or an error
event closing the SSE stream). Never a hang: Ray reports a dead actor's stream as an error. Closing the stream
cancels the replica's request, which aborts it in its engine.
"""
from __future__ import annotations

import threading
import time
from typing import Any, AsyncGenerator, Callable, Optional

from ..config import GenerationConfig
from ..engine.client import Prompt, TokenizerClient
from ..engine.errors import PromptTooLongError
from ..engine.outputs import StreamOutput
from ..serve.errors import APIError
from .routing import block_chain, prompt_ids

GAUGE_MAX_AGE_S = 3.0  # a replica silent this long is gone: its gauges leave the sums (its counters stay)
GAUGES = ("running", "waiting", "blocks_total", "blocks_used", "blocks_free", "kv_cache_bytes")
COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_tokens", "prefix_cache_query_tokens",
            "preemptions", "tokens_generated", "requests")


def replica_gone(exc: BaseException) -> bool:
    """Whether `exc` says the replica (its actor, process or node) died, rather than the request failing."""
    from ray import exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError, rex.NodeDiedError,
                            rex.WorkerCrashedError))


def unwrap(exc: BaseException) -> BaseException:
    """The replica's own exception (a ValueError for a prompt too long) out of Ray's wrapper."""
    from ray.exceptions import RayTaskError

    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    return cause if isinstance(cause, BaseException) else exc


class RayEngine:
    """Stands in for an AsyncEngine; `handle` is the replicas' DeploymentHandle, `info` one replica's `info()`,
    `board` the StatsBoard actor, `replica_states` a callable giving (up, total) replica counts."""

    def __init__(self, handle: Any, info: dict[str, Any], board: Any,
                 replica_states: Callable[[], tuple[int, int]], retries: int = 2):
        from ..tokenizer import Tokenizer

        self._handle = handle.options(stream=True)
        self._info = info
        self._tokenizer = Tokenizer(info["model_path"], info["vocab_size"], info["eos_token_ids"], info["arch"])
        self._board = board
        self._replica_states = replica_states
        self.retries = retries
        self._board_entries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._states = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="puyu-ray-stats", daemon=True)
        self._thread.start()

    @property
    def board(self) -> Any:
        return self._board

    @property
    def tokenizer(self) -> TokenizerClient:
        return self._tokenizer

    @property
    def model_name(self) -> str:
        return str(self._info["model_name"])

    @property
    def session_len(self) -> int:
        return int(self._info["session_len"])

    def generate(self, prompt: Prompt, gen_config: GenerationConfig,
                 request_id: Optional[str] = None) -> AsyncGenerator[StreamOutput, None]:
        gen_config.validate()
        ids = prompt_ids(self._tokenizer, prompt)
        if len(ids) > self.session_len:  # the engine's own error, before a replica is bothered
            raise PromptTooLongError(len(ids), self.session_len)
        chain = block_chain(ids, int(self._info["block_size"]), gen_config.cache_salt)
        return self._stream(prompt, gen_config, request_id, chain)

    async def _stream(self, prompt: Prompt, gen_config: GenerationConfig, request_id: Optional[str],
                      chain: tuple[int, ...]) -> AsyncGenerator[StreamOutput, None]:
        for attempt in range(self.retries + 1):
            response = self._handle.generate.remote(prompt, gen_config, request_id, route=chain)
            streamed, finished = False, False
            try:
                async for out in response:
                    streamed = True
                    finished = out.finish_reason is not None
                    yield out
                finished = True
                return
            except Exception as exc:
                finished = True
                if not replica_gone(exc):
                    raise unwrap(exc) from None
                if streamed or attempt == self.retries:
                    raise APIError(503, f"the replica answering this request died ({type(exc).__name__}); "
                                        f"{'the reply is cut' if streamed else 'no replica could take it'}, "
                                        f"send it again", code="replica_unavailable") from None
            finally:
                if not finished:  # the client left (or we were cancelled): abort on the replica
                    response.cancel()

    # ---- state read from the board and from Ray Serve -------------------------------------------------------------
    def _refresh_loop(self) -> None:
        import ray

        while True:
            try:
                self._board_entries = ray.get(self._board.snapshot.remote(), timeout=5)
                self._states = self._replica_states()
            except Exception:  # Ray shutting down, controller busy: keep the last view
                pass
            if self._stop.wait(0.5):
                return

    def replicas(self) -> dict[str, Any]:
        """/health's view: replicas up / total, and each live replica's request count and prefix-cache hits."""
        up, total = self._states
        now = time.time()
        live = {rid: {"requests": int(s.get("requests", 0)), "pid": s.get("pid"),
                      "prefix_cache_hits": s.get("prefix_cache_hits", 0),
                      "prefix_cache_queries": s.get("prefix_cache_queries", 0)}
                for rid, (t, s) in self._board_entries.items() if now - t <= GAUGE_MAX_AGE_S}
        return {"up": up, "total": total, "live": live}

    def stats(self) -> dict[str, Any]:
        """The replicas' stats summed: counters over every replica that ever posted (so they never go down when
        one dies), gauges over the live ones; `replicas` counts those."""
        now = time.time()
        total: dict[str, Any] = {}
        for t, stats in self._board_entries.values():
            fresh = now - t <= GAUGE_MAX_AGE_S
            for key, value in stats.items():
                if key in COUNTERS or (key in GAUGES and fresh):
                    total[key] = total.get(key, 0) + value
        total["replicas"] = self._states[0]
        return total

    def close(self) -> None:
        self._stop.set()
