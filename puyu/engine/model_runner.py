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

    def run(self, step: list[ScheduledSeq]) -> torch.Tensor:
        """float32 logits `[S, vocab]`, one row per scheduled sequence whose chunk completes it, in step order."""
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        write_slots: list[torch.Tensor] = []
        batch = AttentionBatch(write_slots=torch.empty(0, dtype=torch.int64))
        decode_rows: list[int] = []
        decode_items: list[ScheduledSeq] = []
        logit_rows: list[int] = []
        seq_lens: list[tuple[int, int]] = []
        for item in step:
            seq, start, n = item.seq, item.start, item.num_tokens
            row = len(ids)
            ids.extend(seq.token_at(start, start + n))
            positions.append(torch.arange(start, start + n, dtype=torch.int64))
            write_slots.append(slots_for(seq.block_table, start, start + n, self.block_size))
            seq_lens.append((n, start + n))
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_items.append(item)
            else:
                ctx = slots_for(seq.block_table, 0, start + n, self.block_size, self.device)
                batch.prefills.append(PrefillChunk(row, n, start, ctx))
            if item.completes:
                logit_rows.append(row + n - 1)
        dev = self.device
        batch.write_slots = torch.cat(write_slots).to(dev)
        if decode_items:
            batch.decode = self._decode_batch(decode_items, decode_rows)
        return self.model.forward(torch.tensor(ids, dtype=torch.int64, device=dev), torch.cat(positions).to(dev),
                                  batch, self.cache, torch.tensor(logit_rows, dtype=torch.int64, device=dev),
                                  seq_lens)

    def _decode_batch(self, items: list[ScheduledSeq], rows: list[int]) -> DecodeBatch:
        """Context slots of all single-token sequences, padded to the longest context, and the padding mask."""
        lens = torch.tensor([it.start + 1 for it in items], dtype=torch.int64)
        max_len = int(lens.max())
        max_blocks = -(-max_len // self.block_size)
        table = torch.zeros(len(items), max_blocks, dtype=torch.int64)
        for b, it in enumerate(items):
            blocks = it.seq.block_table[:max_blocks]
            table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        pos = torch.arange(max_len, dtype=torch.int64)
        slots = table[:, pos // self.block_size] * self.block_size + pos % self.block_size
        mask = pos[None, :] < lens[:, None]
        slots = torch.where(mask, slots, torch.zeros_like(slots))
        dev = self.device
        return DecodeBatch(rows=torch.tensor(rows, dtype=torch.int64, device=dev), ctx_slots=slots.reshape(-1).to(dev),
                           mask=mask[:, None, None, :].to(dev), max_len=max_len)
