"""Block manager: hands out KV-cache blocks, with prefix caching.

A full block is registered under a chained hash (hash of the previous block's hash and its own tokens, plus the
digests of the images overlapping it: `Sequence.block_key`) together with that key, so a match is exact even if two
hashes collide. Blocks whose last user is gone keep their contents and their hash: they sit in a free list ordered
by release time, and a later request with the same prefix revives them; allocation takes the least recently
released block (LRU eviction), dropping its hash.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: Optional[int] = None
    tokens: tuple[int, ...] = ()


@dataclass
class PrefixStats:
    queries: int = 0  # admissions that looked the prompt up
    hits: int = 0  # admissions that reused at least one block
    hit_tokens: int = 0
    query_tokens: int = 0


def chain_hash(prev: Optional[int], tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


def chain_root(seq: Sequence) -> Optional[int]:
    """Where the hash chain of `seq` starts: its cache salt (tenant, API key) and its LoRA adapter are folded into the
    first block's hash, so requests under different salts never share (or learn of) each other's cached blocks, and
    blocks computed under one adapter (its K/V differ: the adapter changes w_qkv) are never reused under another or
    under the base model. The adapter key changes on every load, so a reloaded name never meets stale blocks."""
    salt, adapter = seq.gen_config.cache_salt, seq.adapter_key
    if adapter is None:
        return salt_root(salt)
    return hash(("cache_salt", salt, "adapter", adapter))


def salt_root(salt: Optional[str]) -> Optional[int]:
    """The first link of the hash chain under cache salt `salt` (None: no salt). A string hash: equal within one
    process only (PYTHONHASHSEED), so a router in another process computes its own chains, never compares ours."""
    return None if salt is None else hash(("cache_salt", salt))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_hash: dict[int, int] = {}
        self.stats = PrefixStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs to hold `num_tokens` tokens in total."""
        return self.blocks_needed_after(len(seq.block_table), num_tokens)

    # ---- prefix cache ---------------------------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the longest prefix of `seq` made of full blocks, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        prev = chain_root(seq)
        seq.block_hashes = []
        bs = self.block_size
        for b in range((len(seq) - 1) // bs):
            tokens = seq.block_key(b * bs, (b + 1) * bs)
            h = chain_hash(prev, tokens)
            block_id = self.by_hash.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            found.append(block_id)
            seq.block_hashes.append(h)
            prev = h
        return found

    def try_admit(self, seq: Sequence, budget: int, use_prefix_cache: bool = True) -> Optional[int]:
        """Admit a waiting `seq` with its cached prefix and blocks for its first chunk (at most `budget` tokens
        beyond the prefix), or change nothing and return None when the blocks do not fit. Returns the chunk's size.
        `use_prefix_cache=False`: compute the whole prompt (its logits are wanted), its blocks still get registered."""
        if use_prefix_cache:
            cached = self.match_prefix(seq)
        else:
            cached, seq.block_hashes = [], []
        start = len(cached) * self.block_size
        n = min(len(seq) - start, budget)
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if revived + self.blocks_needed_after(len(cached), start + n) > self.num_free:
            return None
        self.admit(seq, cached)
        taken = self.allocate(seq, start + n)
        assert taken  # counted above
        return n

    def blocks_needed_after(self, num_blocks: int, num_tokens: int) -> int:
        """New blocks a table of `num_blocks` blocks needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - num_blocks)

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give a waiting `seq` its cached prefix blocks (reviving free ones) and count the lookup."""
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_computed = len(cached) * self.block_size
        del seq.block_hashes[len(cached):]
        if self.enable_prefix_caching:
            self.stats.queries += 1
            self.stats.query_tokens += len(seq)
            self.stats.hits += bool(cached)
            self.stats.hit_tokens += seq.num_computed

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks of `seq` that are now full and computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed // bs, len(seq.block_table))
        for b in range(len(seq.block_hashes), full):
            block = self.blocks[seq.block_table[b]]
            tokens = seq.block_key(b * bs, (b + 1) * bs)
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else chain_root(seq), tokens)
            seq.block_hashes.append(h)
            if block.hash is None and h not in self.by_hash:
                block.hash, block.tokens = h, tokens
                self.by_hash[h] = block.block_id

    # ---- allocation -----------------------------------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.by_hash.get(block.hash) == block_id:
                del self.by_hash[block.hash]
            block.hash, block.tokens = None, ()
        block.ref_count = 1
        return block_id

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table of `seq` to hold `num_tokens` tokens; False (nothing taken) if blocks run short."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s blocks; cached ones stay revivable, tail blocks are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # nothing to revive: reuse it before evicting cached blocks
                    self.free.move_to_end(block_id, last=False)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed = 0
