"""What one benchmarked request leaves behind: its timestamps (one monotonic clock), chunks and outcome.

The load generator fills `t_arrival`, the client `t_send`, every streamed chunk (time and number of tokens in it),
the final token count and the status. Everything in `metrics.py` is computed from these records only, so the
metric code can be tested on hand-made timestamps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class Chunk:
    """One streamed chunk that carried content: when it arrived and how many tokens it held."""

    t: float
    tokens: int


@dataclass
class RequestRecord:
    index: int
    prompt_len: int  # tokens of the prompt, counted with the benchmark's tokenizer (what vLLM reports)
    expected_output_len: int  # what was asked for (max_tokens)
    t_arrival: float = 0.0  # the load generator released the request
    t_send: float = 0.0  # after the concurrency limit, just before the HTTP request / engine call
    chunks: list[Chunk] = field(default_factory=list)
    t_end: float = 0.0  # the response (or the error) was complete
    output_tokens: int = 0
    server_prompt_tokens: Optional[int] = None  # usage.prompt_tokens if the server sent it (includes templates)
    success: bool = False
    error: str = ""
    finish_reason: Optional[str] = None
    generated_text: str = ""

    @property
    def t_first_token(self) -> Optional[float]:
        return self.chunks[0].t if self.chunks else None

    @property
    def t_last_token(self) -> Optional[float]:
        return self.chunks[-1].t if self.chunks else None

    def to_json(self, include_text: bool = False) -> dict[str, Any]:
        """A flat dict for the per-request JSONL: raw timestamps plus the derived per-request metrics."""
        from .metrics import request_metrics

        d = asdict(self)
        d["chunks"] = [[c.t, c.tokens] for c in self.chunks]
        if not include_text:
            d.pop("generated_text")
        d.update(request_metrics(self))
        return d
