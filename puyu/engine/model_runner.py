"""Model runner: turns a scheduled step into flat tensors (ids, positions, slots), runs the model, returns logits."""
from __future__ import annotations

from collections import defaultdict

import torch

from .attention import AttentionBatch, DecodeBatch, PrefillChunk, PrefillGroup
from .kv_cache import KVCacheStorage, slot_list, slots_for
from .lora import StepInputs
from .model import DecoderModel
from .sequence import ScheduledSeq


class ModelRunner:
    def __init__(self, model: DecoderModel, cache: KVCacheStorage):
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.device = model.device
        self.prompt_logits: dict[int, torch.Tensor] = {}

    def _tensor(self, xs: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.int64, device=self.device)

    def run(self, step: list[ScheduledSeq]) -> torch.Tensor:
        """float32 logits `[S, vocab]`, one row per scheduled sequence whose chunk completes it, in step order.
        For sequences that want prompt logprobs, `self.prompt_logits` is then {index in step: logits `[k, vocab]` of
        their chunk's prompt positions} (position p predicts prompt token p + 1); empty otherwise.

        The per-token bookkeeping is built in plain Python lists and turned into one tensor each (a step over many
        sequences would otherwise create many tiny tensors, and on cuda each would be its own copy).
        """
        ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []
        prefills: list[PrefillChunk] = []
        fresh: dict[int, list[int]] = defaultdict(list)  # prompt length -> rows of fresh prompts of that length
        decode_rows: list[int] = []
        decode_items: list[ScheduledSeq] = []
        logit_rows: list[int] = []
        prompt_rows: list[tuple[int, int, int]] = []  # (step index, first row, count)
        seq_lens: list[tuple[int, int]] = []
        image_rows: list[int] = []
        image_embeds: list[torch.Tensor] = []
        adapter_rows: dict[str, list[int]] = defaultdict(list)  # adapter name -> rows of its requests
        for index, item in enumerate(step):
            seq, start, n = item.seq, item.start, item.num_tokens
            row = len(ids)
            ids.extend(seq.token_at(start, start + n))
            positions.extend(range(start, start + n))
            write_slots.extend(slot_list(seq.block_table, start, start + n, self.block_size))
            seq_lens.append((n, start + n))
            if seq.gen_config.adapter_name is not None:
                adapter_rows[seq.gen_config.adapter_name].extend(range(row, row + n))
            for im in seq.images:
                lo, hi = max(start, im.start), min(start + n, im.end)
                if lo < hi:
                    assert im.embeds is not None  # encoded when the request was added (LLMEngine._encode_images)
                    image_rows.extend(range(row + lo - start, row + hi - start))
                    image_embeds.append(im.embeds[lo - im.start:hi - im.start])
            if start == 0:
                fresh[n].extend(range(row, row + n))
            elif n == 1:
                decode_rows.append(row)
                decode_items.append(item)
            else:
                ctx = slots_for(seq.block_table, 0, start + n, self.block_size, self.device)
                prefills.append(PrefillChunk(row, n, start, ctx))
            if item.completes:
                logit_rows.append(row + n - 1)
            if seq.wants_prompt_logprobs:
                first = len(seq.prompt_logprobs)  # positions [first, end) predict prompt tokens first+1..end
                end = min(start + n, len(seq.prompt_ids) - 1)
                if end > first >= start:
                    prompt_rows.append((index, row + first - start, end - first))
        extra = [r for _, first, count in prompt_rows for r in range(first, first + count)]
        batch = AttentionBatch(write_slots=self._tensor(write_slots), prefills=prefills)
        batch.groups = [self._fresh_group(rows, n, write_slots) for n, rows in fresh.items()]
        if decode_items:
            batch.decode = self._decode_batch(decode_items, decode_rows)
        inputs = self._step_inputs(image_rows, image_embeds, adapter_rows) if image_rows or adapter_rows else None
        logits = self.model.forward(self._tensor(ids), self._tensor(positions), batch, self.cache,
                                    self._tensor(logit_rows + extra), seq_lens, inputs)
        self.prompt_logits, at = {}, len(logit_rows)
        for index, _, count in prompt_rows:
            self.prompt_logits[index] = logits[at:at + count]
            at += count
        return logits[:len(logit_rows)] if prompt_rows else logits

    def _step_inputs(self, image_rows: list[int], image_embeds: list[torch.Tensor],
                     adapter_rows: dict[str, list[int]]) -> StepInputs:
        """Image features replace the placeholder embeddings, Partial LoRA ('plora') applies on those rows; each
        request's LoRA adapter applies on all of its rows."""
        extra = StepInputs(lora_rows={name: self._tensor(rows) for name, rows in adapter_rows.items()})
        if image_rows:
            extra.embed_rows = self._tensor(image_rows)
            extra.embeds = torch.cat(image_embeds)
            extra.lora_rows["plora"] = extra.embed_rows
        return extra

    def _fresh_group(self, rows: list[int], q_len: int, write_slots: list[int]) -> PrefillGroup:
        """Fresh prompts attend only over themselves: their context slots are the slots they write."""
        return PrefillGroup(rows=self._tensor(rows), ctx_slots=self._tensor([write_slots[r] for r in rows]),
                            num_seqs=len(rows) // q_len, q_len=q_len)

    def _decode_batch(self, items: list[ScheduledSeq], rows: list[int]) -> DecodeBatch:
        """Block tables of all single-token sequences, padded to the longest, and the mask of real keys."""
        lens = [it.start + 1 for it in items]
        max_blocks = -(-max(lens) // self.block_size)
        table = [(it.seq.block_table[:max_blocks] + [0] * max_blocks)[:max_blocks] for it in items]
        pos = torch.arange(max_blocks * self.block_size, dtype=torch.int64, device=self.device)
        mask = pos[None, :] < self._tensor(lens)[:, None]  # (the kernel path needs only lens)
        return DecodeBatch(rows=self._tensor(rows), block_table=self._tensor(table), mask=mask[:, None, None, :],
                           lens=self._tensor(lens))
