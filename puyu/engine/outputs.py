"""What the engine streams back, and the per-request text state (detokeniser + stop words) that produces it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class StreamOutput:
    """One delta of a request's stream (see DEVELOPERS.md, Contracts)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # None | stop | length | abort | error
    input_token_len: int = 0
    generate_token_len: int = 0  # cumulative
    logprobs: Optional[list[dict[int, float]]] = None
    error: Optional[str] = None
    request_id: str = ""


class TextStream:
    """Text deltas of one request: incremental detokenisation, stop words cut out (and held back while ambiguous)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool, stop_words: Optional[list[str]]):
        self.detok: IncrementalDetokenizer = tokenizer.detokenizer(skip_special_tokens)
        self.stop_words = list(stop_words or [])
        self.held = ""
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        """Text completed by `ids`; sets `stopped` when a stop word appears (the word and the rest are dropped)."""
        return self._filter(self.detok.add(ids))

    def finish(self) -> str:
        """Remaining text at the end of the stream."""
        if self.stopped:
            return ""
        text = self._filter(self.detok.flush())
        if self.stopped:
            return text
        text, self.held = text + self.held, ""
        return text

    def _filter(self, delta: str) -> str:
        if self.stopped or not self.stop_words:
            return "" if self.stopped else delta
        buf = self.held + delta
        hits = [i for i in (buf.find(w) for w in self.stop_words) if i >= 0]
        if hits:
            self.stopped = True
            self.held = ""
            return buf[:min(hits)]
        keep = max((n for w in self.stop_words for n in range(1, len(w)) if buf.endswith(w[:n])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]
