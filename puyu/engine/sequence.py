"""One request's state inside the engine: its tokens, how many are in the KV cache, its blocks."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..config import GenerationConfig

if TYPE_CHECKING:  # only in annotations: the scheduler's state (and the replica router) import no torch
    import torch

_arrival = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class ImageSpan:
    """An image's place in a prompt: positions [start, start + length) take `embeds` instead of token embeddings.

    `digest` identifies the image's pixels: it keys the prefix cache, so blocks computed for one image are never
    reused for another (their token ids are the same placeholders)."""

    start: int
    length: int
    digest: str
    embeds: Optional[torch.Tensor] = None  # [length, hidden], set on the engine thread
    pixels: Optional[torch.Tensor] = None  # [3, S, S] preprocessed, until encoded

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    gen_config: GenerationConfig
    generator: Optional[torch.Generator] = None
    stop_ids: frozenset[int] = frozenset()  # tokens that end it (EOS and the request's stop_token_ids), not kept
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full computed blocks
    arrival: int = field(default_factory=lambda: next(_arrival))
    finish_reason: Optional[str] = None
    preemptions: int = 0
    images: list[ImageSpan] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float]] = field(default_factory=list)  # for prompt tokens 1.. (when asked)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Asked for, and not all collected yet (a recomputed prompt after preemption is not collected twice)."""
        return self.gen_config.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1
    # the identity of the loaded LoRA adapter it runs with (its name and load number): keys its prefix-cache blocks
    adapter_key: Optional[str] = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed

    def token_at(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    def block_key(self, start: int, end: int) -> tuple:
        """What identifies tokens [start, end) for the prefix cache: their ids, plus (digest, offset) of every image
        overlapping them."""
        tokens = tuple(self.token_at(start, end))
        marks = tuple((im.digest, max(start, im.start) - im.start) for im in self.images
                      if im.start < end and start < im.end)
        return tokens + marks if marks else tokens


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: tokens [start, start + num_tokens) get computed."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when the chunk reaches the end of the sequence, so its last logits give the next token."""
        return self.start + self.num_tokens == len(self.seq)


@dataclass
class TokenUpdate:
    """What one sampled token did to its sequence (`Scheduler.update_from_output`): `token` was appended (None for
    a stop token, which is not kept), and `finish_reason` is set when that ended the sequence."""

    seq: Sequence
    token: Optional[int]
    finish_reason: Optional[str] = None
