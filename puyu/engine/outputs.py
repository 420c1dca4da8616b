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
    prompt_logprobs: Optional[list[dict[int, float]]] = None  # on the first output, when asked: prompt tokens 1..


class _StopMatcher:
    """Knuth-Morris-Pratt state of one stop word over the text so far: `state` is the length of the longest suffix of
    the text that is a prefix of the word, so each new character costs amortised O(1) (no rescans of held text)."""

    def __init__(self, word: str):
        self.word = word
        fail = [0] * len(word)
        k = 0
        for i in range(1, len(word)):
            while k and word[i] != word[k]:
                k = fail[k - 1]
            if word[i] == word[k]:
                k += 1
            fail[i] = k
        self.fail = fail
        self.state = 0

    def feed(self, ch: str) -> bool:
        """Advance by one character; True when the word has just been completed."""
        w, k = self.word, self.state
        while k and w[k] != ch:
            k = self.fail[k - 1]
        if w[k] == ch:
            k += 1
        if k == len(w):
            self.state = self.fail[k - 1]
            return True
        self.state = k
        return False


class TextStream:
    """Text deltas of one request: incremental detokenisation, stop words cut out (and held back while ambiguous).

    The stop check is linear in the generated text: each stop word keeps a KMP state, and only the new characters are
    looked at (the held-back text is the longest partial match, at most the longest stop word less one)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool, stop_words: Optional[list[str]],
                 include_stop: bool = False):
        self.include_stop = include_stop  # the matched stop word ends the text instead of being dropped
        self.detok: IncrementalDetokenizer = tokenizer.detokenizer(skip_special_tokens)
        self.stop_words = [w for w in (stop_words or []) if w]
        self._matchers = [_StopMatcher(w) for w in self.stop_words]
        self._firsts = frozenset(w[0] for w in self.stop_words)
        self.held = ""
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        """Text completed by `ids`; sets `stopped` when a stop word appears (the word and the rest are dropped)."""
        return self._filter(self.detok.add(ids))

    def finish(self, cut: bool = False) -> str:
        """Remaining text at the end of the stream. `cut` (the reply ran out of tokens): an incomplete UTF-8
        character at the very end is dropped instead of being sent as U+FFFD."""
        if self.stopped:
            return ""
        tail = self.detok.flush()
        if cut:
            tail = tail.rstrip("\ufffd")
        text = self._filter(tail)
        if self.stopped:
            return text
        text, self.held = text + self.held, ""
        return text

    def _filter(self, delta: str) -> str:
        """The first stop word to be completed ends the text (the earliest-starting one if several end together)."""
        if self.stopped or not self._matchers:
            return "" if self.stopped else delta
        buf = self.held + delta
        base = len(self.held)
        matchers, firsts = self._matchers, self._firsts
        active = bool(self.held)
        for i, ch in enumerate(delta):
            if not active and ch not in firsts:
                continue  # every state is 0 and stays 0
            cut, end = -1, -1
            for m in matchers:
                if m.feed(ch):
                    start = base + i + 1 - len(m.word)
                    if cut < 0 or start < cut:
                        cut, end = start, base + i + 1
            if cut >= 0:
                self.stopped = True
                self.held = ""
                return buf[:end] if self.include_stop else buf[:cut]
            active = any(m.state for m in matchers)
        keep = max(m.state for m in matchers)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]
