"""Model runner: turns a scheduled step into flat tensors (ids, positions, slots), runs the model, returns logits."""
from __future__ import annotations

import torch

from .attention import AttentionBatch, DecodeBatch, PrefillChunk
from .kv_cache import KVCacheStorage, slots_for
from .model import DecoderModel
from .sequence import ScheduledSeq


class ModelRunner:
    def __init__(self, model: DecoderModel, cache: KVCacheStorage):
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.device = model.device

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def run(self, step: list[ScheduledSeq]) -> torch.Tensor:
        """float32 logits `[S, vocab]`, one row per scheduled sequence whose chunk completes it, in step order.

        The per-token bookkeeping is built in plain Python lists and turned into one tensor each (a step over many
        sequences would otherwise create many tiny tensors, and on cuda each would be its own copy).
        """
        ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []
        prefills: list[PrefillChunk] = []
        decode_rows: list[int] = []
        decode_items: list[ScheduledSeq] = []
        logit_rows: list[int] = []
        seq_lens: list[tuple[int, int]] = []
        dev = self.device
        for item in step:
            seq, start, n = item.seq, item.start, item.num_tokens
            row = len(ids)
            ids.extend(seq.token_at(start, start + n))
            positions.extend(range(start, start + n))
            write_slots.extend(self._slots(seq.block_table, start, start + n))
            seq_lens.append((n, start + n))
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_items.append(item)
            else:
                ctx = slots_for(seq.block_table, 0, start + n, self.block_size, dev)
                prefills.append(PrefillChunk(row, n, start, ctx))
            if item.completes:
                logit_rows.append(row + n - 1)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=dev)  # noqa: E731
        batch = AttentionBatch(write_slots=as_tensor(write_slots), prefills=prefills)
        if decode_items:
            batch.decode = self._decode_batch(decode_items, decode_rows)
        return self.model.forward(as_tensor(ids), as_tensor(positions), batch, self.cache, as_tensor(logit_rows),
                                  seq_lens)

    def _decode_batch(self, items: list[ScheduledSeq], rows: list[int]) -> DecodeBatch:
        """Context slots of all single-token sequences, padded to the longest context, and the padding mask."""
        lens = [it.start + 1 for it in items]
        max_len = max(lens)
        max_blocks = -(-max_len // self.block_size)
        table = [it.seq.block_table[:max_blocks] + [0] * (max_blocks - len(it.seq.block_table[:max_blocks]))
                 for it in items]
        dev = self.device
        table_t = torch.tensor(table, dtype=torch.int64, device=dev)
        lens_t = torch.tensor(lens, dtype=torch.int64, device=dev)
        pos = torch.arange(max_len, dtype=torch.int64, device=dev)
        slots = table_t[:, pos // self.block_size] * self.block_size + pos % self.block_size
        mask = pos[None, :] < lens_t[:, None]
        slots = torch.where(mask, slots, torch.zeros_like(slots))
        return DecodeBatch(rows=torch.tensor(rows, dtype=torch.int64, device=dev), ctx_slots=slots.reshape(-1),
                           mask=mask[:, None, None, :], max_len=max_len)
