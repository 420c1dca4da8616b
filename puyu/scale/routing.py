"""Routing policies for engine replicas, free of Ray: which replica a request should go to.

A request's routing key is the chain of block hashes the engine's prefix cache would look its prompt up by
(`chain_hash` over full blocks, the chain rooted at the cache salt), computed in the router's process. The prefix
policy remembers which replica was sent which hashes; a replica that was sent the first k blocks of a prompt holds
them in its cache unless it evicted them since, so the table is an estimate, never a source of wrong answers (a miss
only costs a prefill). Invariants: a policy never picks a replica outside `candidates`; under the prefix policy the
chosen replica's load exceeds the least loaded one's by at most `imbalance` requests (so a hot prefix cannot pile
every request on one replica).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence, cast

from ..engine.block_manager import chain_hash, salt_root
from ..engine.client import Prompt, TokenizerClient

POLICIES = ("prefix", "least-loaded", "round-robin")
DEFAULT_IMBALANCE = 4  # requests in flight; beyond this the least-loaded replica wins over a prefix match
DEFAULT_TABLE_SIZE = 200_000  # block hashes remembered (LRU), a few MB


def prompt_ids(tokenizer: TokenizerClient, prompt: Prompt) -> list[int]:
    """The token ids the engine computes for `prompt` (LLMEngine.prepare_prompt): a string as is with special tokens,
    chat messages through the chat template, token ids unchanged. Image parts or anything else: no ids (the
    request is routed by load alone; the replica checks the prompt)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = cast(list[dict], prompt)
        if any(not isinstance(m.get("content"), (str, type(None))) for m in messages):
            return []  # multimodal content parts: the vision engine splices image tokens in
        return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(cast(list[int], prompt))
    return []


def block_chain(ids: Sequence[int], block_size: int, salt: Optional[str] = None) -> tuple[int, ...]:
    """The hashes of the prompt's full blocks, as BlockManager.match_prefix chains them (the last token is always
    computed, so a block ending on it is not a cacheable prefix)."""
    prev = salt_root(salt)
    chain = []
    for b in range((len(ids) - 1) // block_size):
        prev = chain_hash(prev, tuple(ids[b * block_size:(b + 1) * block_size]))
        chain.append(prev)
    return tuple(chain)


class PrefixTable:
    """block hash -> the replicas that were sent it, least recently used forgotten first."""

    def __init__(self, max_entries: int = DEFAULT_TABLE_SIZE):
        self.max_entries = max_entries
        self._holders: OrderedDict[int, set[Any]] = OrderedDict()

    def matched_blocks(self, chain: Sequence[int], replicas: Sequence[Any]) -> dict[Any, int]:
        """For each replica, how many leading blocks of `chain` it was sent."""
        counts = {r: 0 for r in replicas}
        alive = set(replicas)
        for h in chain:
            alive &= self._holders.get(h, set())
            if not alive:
                break
            for r in alive:
                counts[r] += 1
        return counts

    def insert(self, chain: Sequence[int], replica: Any) -> None:
        for h in chain:
            holders = self._holders.pop(h, set())
            holders.add(replica)
            self._holders[h] = holders
        while len(self._holders) > self.max_entries:
            self._holders.popitem(last=False)

    def forget(self, replica: Any) -> None:
        """A replica died: its cache died with it."""
        for h in [h for h, holders in self._holders.items() if replica in holders]:
            self._holders[h].discard(replica)
            if not self._holders[h]:
                del self._holders[h]


class Policy:
    """One routing policy over replicas identified by any hashable id; `load` is requests in flight per replica."""

    def __init__(self, name: str = "prefix", imbalance: int = DEFAULT_IMBALANCE,
                 table_size: int = DEFAULT_TABLE_SIZE):
        if name not in POLICIES:
            raise ValueError(f"routing: {name!r} is not one of {', '.join(POLICIES)}")
        if imbalance < 0:
            raise ValueError(f"imbalance: must be >= 0, got {imbalance}")
        self.name, self.imbalance = name, imbalance
        self.table = PrefixTable(table_size)
        self._turn = 0

    def rank(self, candidates: Sequence[Any], load: Mapping[Any, int],
             chain: Sequence[int] = ()) -> list[Any]:
        """`candidates` best first. The caller sends the request to the first one that accepts it; call `sent`
        with the replica it went to."""
        if not candidates:
            return []
        by_load = sorted(candidates, key=lambda r: (load.get(r, 0), str(r)))
        if self.name == "round-robin":
            self._turn = (self._turn + 1) % len(candidates)
            ordered = sorted(candidates, key=str)
            return ordered[self._turn:] + ordered[:self._turn]
        if self.name == "least-loaded" or not chain:
            return self._rotate_ties(by_load, load)
        matched = self.table.matched_blocks(chain, candidates)
        least = load.get(by_load[0], 0)
        fair = [r for r in candidates if load.get(r, 0) - least <= self.imbalance]
        best = max(fair, key=lambda r: (matched[r], -load.get(r, 0)))
        if matched[best] == 0:
            return self._rotate_ties(by_load, load)
        return [best] + [r for r in by_load if r != best]

    def _rotate_ties(self, by_load: list[Any], load: Mapping[Any, int]) -> list[Any]:
        """Among the equally least-loaded, take turns (an idle cluster still spreads new prefixes)."""
        least = load.get(by_load[0], 0)
        ties = [r for r in by_load if load.get(r, 0) == least]
        self._turn = (self._turn + 1) % len(ties)
        first = ties[self._turn]
        return [first] + [r for r in by_load if r != first]

    def sent(self, replica: Any, chain: Sequence[int]) -> None:
        if self.name == "prefix" and chain:
            self.table.insert(chain, replica)

    def forget(self, replica: Any) -> None:
        self.table.forget(replica)

