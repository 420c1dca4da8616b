"""The routing policies (puyu/scale/routing.py) on their own: no Ray, replica ids are plain strings."""
from __future__ import annotations

import pytest

from puyu.engine.block_manager import BlockManager
from puyu.engine.sequence import Sequence
from puyu.config import GenerationConfig
from puyu.scale.routing import Policy, block_chain

BS = 4


def chain(prefix: int, tail: int, n_blocks: int = 4) -> tuple[int, ...]:
    """A prompt of `n_blocks` shared blocks (by `prefix`) plus a distinct tail."""
    ids = [prefix * 1000 + i for i in range(n_blocks * BS)] + [tail, tail + 1]
    return block_chain(ids, BS)


def test_block_chain_is_the_engine_chain():
    """The router's key is the chain BlockManager registers for the same prompt and salt."""
    ids = list(range(3, 3 + 4 * BS + 1))
    for salt in (None, "tenant-a"):
        bm = BlockManager(num_blocks=16, block_size=BS)
        seq = Sequence("r", ids, GenerationConfig(cache_salt=salt))
        assert bm.try_admit(seq, budget=1000) is not None
        seq.num_computed = len(ids)
        bm.register_full_blocks(seq)
        assert block_chain(ids, BS, salt) == tuple(seq.block_hashes[:(len(ids) - 1) // BS])
    assert block_chain(ids, BS, "a") != block_chain(ids, BS, "b") != block_chain(ids, BS)


def route(policy: Policy, replicas: list[str], load: dict[str, int], key: tuple[int, ...]) -> str:
    chosen = policy.rank(replicas, load, key)[0]
    policy.sent(chosen, key)
    return chosen


def test_repeated_prefixes_stick_to_one_replica_and_new_ones_spread():
    policy, replicas, load = Policy("prefix"), ["r0", "r1", "r2"], {"r0": 0, "r1": 0, "r2": 0}
    homes = {p: route(policy, replicas, load, chain(p, 0)) for p in range(3)}
    assert sorted(homes.values()) == replicas  # an idle cluster spreads new prefixes
    for p in range(3):
        for tail in range(1, 6):
            assert route(policy, replicas, load, chain(p, tail)) == homes[p]


def test_a_hot_prefix_does_not_pile_up_on_its_replica():
    policy, replicas = Policy("prefix", imbalance=2), ["r0", "r1"]
    load = {"r0": 0, "r1": 0}
    home = route(policy, replicas, load, chain(7, 0))
    other = "r1" if home == "r0" else "r0"
    for _ in range(10):  # requests that never finish: load only grows
        load[route(policy, replicas, load, chain(7, 1))] += 1
    assert load[other] >= 3 and abs(load[home] - load[other]) <= 3


def test_prefix_routing_beats_round_robin_on_a_shared_prefix_workload():
    """Block-level hit rate of the same workload (3 system prompts, requests interleaved) under both policies,
    counting a hit when the chosen replica was sent the block before."""
    def hit_rate(name: str) -> float:
        policy, replicas, load = Policy(name), ["r0", "r1"], {"r0": 0, "r1": 0}
        seen: dict[str, set[int]] = {r: set() for r in replicas}
        hits = total = 0
        for i in range(60):
            key = chain(i % 3, i)
            r = route(policy, replicas, load, key)
            hits += sum(1 for h in key if h in seen[r])
            total += len(key)
            seen[r].update(key)
        return hits / total

    prefix, rr = hit_rate("prefix"), hit_rate("round-robin")
    assert prefix > rr
    assert prefix > 0.9


def test_least_loaded_and_round_robin():
    ll = Policy("least-loaded")
    assert ll.rank(["a", "b", "c"], {"a": 3, "b": 1, "c": 2})[0] == "b"
    rr = Policy("round-robin")
    picks = [rr.rank(["a", "b"], {})[0] for _ in range(4)]
    assert sorted(picks) == ["a", "a", "b", "b"]


def test_forgotten_replica_loses_its_prefixes():
    policy, replicas, load = Policy("prefix"), ["r0", "r1"], {"r0": 0, "r1": 5}
    route(policy, replicas, load, chain(1, 0))  # r0: least loaded
    load = {"r0": 0, "r1": 0}
    policy.forget("r0")
    assert policy.table.matched_blocks(chain(1, 2), replicas) == {"r0": 0, "r1": 0}


def test_bad_policy_names_the_field():
    with pytest.raises(ValueError, match="routing"):
        Policy("random")
