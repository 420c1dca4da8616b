"""Scheduler: picks the tokens of the next step under a token budget, with chunked prefill and recompute preemption.

Each step first runs the running sequences, decodes (one token each) before the next chunks of unfinished prefills
(so a long prefill, or the recompute of a preempted sequence, does not stall the others), each group in arrival
order; then it admits waiting sequences (first looking up their prefix in the cache) while the budget
(`max_prefill_token_num`), `max_batch_size` and the free blocks allow. A prompt longer than the remaining budget is
prefilled in chunks over several steps. When a running sequence needs a block and none is free, the most recently
arrived running sequence not yet scheduled in this step is preempted: its blocks are released and it goes back to the
front of the queue, to be recomputed (prompt and the tokens generated so far) when blocks are free again; the prefix
cache usually revives most of it.
"""
from __future__ import annotations

import bisect
from collections import deque
from typing import Optional

from .block_manager import BlockManager
from .sequence import ScheduledSeq, Sequence, Status, TokenUpdate


class Scheduler:
    """Owns the step state of every sequence: what runs, what waits, how much is computed, when it is finished
    (a stop token, max_new_tokens or the session length; the engine adds stop strings and aborts)."""

    def __init__(self, block_manager: BlockManager, max_batch_size: int, token_budget: int,
                 session_len: Optional[int] = None):
        self.bm = block_manager
        self.max_batch_size = max_batch_size
        self.token_budget = token_budget
        self.session_len = session_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove `seq` (running or waiting) and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def schedule(self) -> list[ScheduledSeq]:
        """Decodes first (one token each), then the next chunks of unfinished prefills, then new admissions."""
        budget = self.token_budget
        out: list[ScheduledSeq] = []
        scheduled: set[int] = set()
        for decoding in (True, False):
            for seq in list(self.running):
                if budget <= 0:
                    break
                if id(seq) in scheduled or seq not in self.running or (seq.num_uncomputed == 1) != decoding:
                    continue
                n = min(seq.num_uncomputed, budget)
                if n == 0:  # nothing new (cannot happen inside the engine: a completed chunk always adds a token)
                    continue
                if not self._make_room(seq, seq.num_computed + n, scheduled):
                    continue  # seq itself was preempted
                out.append(ScheduledSeq(seq, seq.num_computed, n))
                scheduled.add(id(seq))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            chunk = self._admit(self.waiting[0], budget)
            if chunk is None:
                break
            self.waiting.popleft()
            out.append(chunk)
            budget -= chunk.num_tokens
        return out

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[int]) -> bool:
        """Allocate blocks for `seq`, preempting the latest arrivals not yet in this step while blocks run short.

        False if `seq` itself had to be preempted (it was the latest such arrival).
        """
        while not self.bm.allocate(seq, num_tokens):
            victim = next(s for s in reversed(self.running) if id(s) not in scheduled)  # seq is a candidate
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.release(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, seq: Sequence, budget: int) -> Optional[ScheduledSeq]:
        """Move the first waiting sequence to running with its first chunk, or None if its blocks do not fit."""
        n = self.bm.try_admit(seq, budget, use_prefix_cache=not seq.wants_prompt_logprobs)
        if n is None:
            return None
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival)
        return ScheduledSeq(seq, seq.num_computed, n)

    def update_from_output(self, scheduled: list[ScheduledSeq], tokens: dict[str, int]) -> list[TokenUpdate]:
        """After the model ran `scheduled`: count the computed tokens, register the blocks now full, then append
        each sampled token (`tokens`: request id -> token, for the chunks that completed) and finish the sequences it
        ends. A sequence without a token here (sampling failed) is left to the engine to abort."""
        for item in scheduled:
            item.seq.num_computed += item.num_tokens
            self.bm.register_full_blocks(item.seq)
        updates = []
        for item in scheduled:
            token = tokens.get(item.seq.request_id)
            if item.completes and token is not None:
                updates.append(self._append(item.seq, token))
        return updates

    def _append(self, seq: Sequence, token: int) -> TokenUpdate:
        g = seq.gen_config
        if token in seq.stop_ids and len(seq.output_ids) >= g.min_new_tokens:
            self.finish(seq, "stop")
            return TokenUpdate(seq, None, "stop")
        seq.output_ids.append(token)
        at_limit = len(seq.output_ids) >= g.max_new_tokens or (
            self.session_len is not None and len(seq) >= self.session_len)
        if at_limit:
            self.finish(seq, "length")
        return TokenUpdate(seq, token, "length" if at_limit else None)
