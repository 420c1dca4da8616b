"""Block manager and scheduler: prefix matching (exact), revival of freed blocks, LRU eviction, budgets, preemption."""
from __future__ import annotations

from puyu.config import GenerationConfig
from puyu.engine.block_manager import BlockManager, chain_hash
from puyu.engine.scheduler import Scheduler
from puyu.engine.sequence import Sequence

BS = 4


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), GenerationConfig())


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    """What the engine does around a forward: blocks for all tokens, mark them computed, register full blocks."""
    cached = bm.match_prefix(s)
    bm.admit(s, cached)
    assert bm.allocate(s, len(s))
    s.num_computed = len(s)
    bm.register_full_blocks(s)


def test_freed_blocks_are_revived_by_the_same_prefix():
    bm = BlockManager(8, BS)
    a = seq(range(10))  # 2 full blocks + 2 tokens
    run_prefill(bm, a)
    blocks = list(a.block_table)
    bm.release(a)
    assert bm.num_free == 8
    b = seq(list(range(8)) + [50, 51, 52])
    cached = bm.match_prefix(b)
    assert cached == blocks[:2]
    bm.admit(b, cached)
    assert b.num_computed == 8 and bm.num_free == 6
    assert bm.stats.hits == 1 and bm.stats.hit_tokens == 8


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(8, BS)
    a = seq(range(8))
    run_prefill(bm, a)
    bm.release(a)
    assert len(bm.match_prefix(seq(range(8)))) == 1  # the second block holds the last token: recomputed


def test_match_checks_tokens_not_only_hashes():
    bm = BlockManager(8, BS)
    a = seq(range(6))
    run_prefill(bm, a)
    first = a.block_table[0]
    bm.release(a)
    # make the hash of other tokens point at block 0, as a hash collision would
    other = (9, 9, 9, 9)
    bm.by_hash[chain_hash(None, other)] = first
    assert bm.match_prefix(seq(list(other) + [1, 2])) == []


def test_lru_evicts_oldest_released_and_unhashed_blocks_first():
    bm = BlockManager(4, BS)
    a, b = seq(range(4), "a"), seq(range(100, 104), "b")
    for s in (a, b):
        s.prompt_ids.append(7)  # 1 full block + 1 token each: 2 blocks
        run_prefill(bm, s)
    a_full, b_full = a.block_table[0], b.block_table[0]
    bm.release(a)
    bm.release(b)
    c = seq(range(200, 203), "c")
    assert bm.allocate(c, 3 + 4)  # 2 blocks: the two unhashed tail blocks go first
    assert a_full not in c.block_table and b_full not in c.block_table
    d = seq(range(300, 303), "d")
    assert bm.allocate(d, 3)  # 1 more: evicts a's block (released before b's)
    assert d.block_table == [a_full]
    assert bm.match_prefix(seq(list(range(4)) + [7])) == []
    assert bm.match_prefix(seq(list(range(100, 104)) + [7])) == [b_full]


def test_scheduler_budget_chunks_and_batch_limit():
    bm = BlockManager(64, BS)
    sch = Scheduler(bm, max_batch_size=2, token_budget=10)
    for i, n in enumerate((7, 25, 3)):
        sch.add(seq(range(1000 * i, 1000 * i + n), f"r{i}"))
    step = sch.schedule()
    assert [(s.seq.request_id, s.start, s.num_tokens) for s in step] == [("r0", 0, 7), ("r1", 0, 3)]
    for s in step:
        s.seq.num_computed += s.num_tokens
    step[0].seq.output_ids.append(1)  # r0's prompt is done: it got a token and decodes; r1 continues
    step = sch.schedule()  # r2 waits: the batch is full
    assert [(s.seq.request_id, s.start, s.num_tokens) for s in step] == [("r0", 7, 1), ("r1", 3, 9)]
    assert len(sch.waiting) == 1


def test_scheduler_preempts_the_latest_arrival():
    bm = BlockManager(4, BS)
    sch = Scheduler(bm, max_batch_size=8, token_budget=100)
    a, b = seq(range(8), "a"), seq(range(100, 108), "b")
    sch.add(a)
    sch.add(b)
    for s in sch.schedule():
        s.seq.num_computed += s.num_tokens
    assert bm.num_free == 0
    a.output_ids.append(5)  # a needs a third block: b is preempted
    step = sch.schedule()
    assert [s.seq.request_id for s in step] == ["a"]
    assert list(sch.waiting) == [b] and b.block_table == [] and b.num_computed == 0 and b.preemptions == 1


def test_decodes_go_before_a_long_recompute():
    bm = BlockManager(64, BS)
    sch = Scheduler(bm, max_batch_size=8, token_budget=8)
    a, b = seq(range(20), "a"), seq(range(100, 103), "b")
    sch.add(a)
    sch.add(b)
    for _ in range(3):  # a: 8 + 8 + 4 tokens; b is admitted in the third step
        for s in sch.schedule():
            s.seq.num_computed += s.num_tokens
    a.output_ids.append(1)
    b.output_ids.append(1)
    sch._preempt(a)  # a, the older one, must now recompute 21 tokens
    steps = []
    for _ in range(2):
        step = sch.schedule()
        steps.append([(s.seq.request_id, s.num_tokens) for s in step])
        for s in step:
            s.seq.num_computed += s.num_tokens
            if s.completes:
                s.seq.output_ids.append(1)
    assert steps == [[("b", 1), ("a", 7)], [("b", 1), ("a", 7)]]


def test_update_from_output_owns_the_step_bookkeeping():
    """After a step the scheduler counts computed tokens, registers full blocks, appends tokens and finishes
    sequences on a stop token (not kept), max_new_tokens or the session length."""
    bm = BlockManager(64, BS)
    sch = Scheduler(bm, max_batch_size=8, token_budget=100, session_len=11)
    stop = Sequence("stop", list(range(6)), GenerationConfig(), stop_ids=frozenset({99}))
    short = Sequence("short", list(range(10, 16)), GenerationConfig(max_new_tokens=1))
    session = Sequence("session", list(range(20, 30)), GenerationConfig())
    goes_on = Sequence("goes_on", list(range(40, 48)), GenerationConfig())
    for s in (stop, short, session, goes_on):
        sch.add(s)
    step = sch.schedule()
    updates = sch.update_from_output(step, {"stop": 99, "short": 7, "session": 8, "goes_on": 9})
    got = {u.seq.request_id: (u.token, u.finish_reason) for u in updates}
    assert got == {"stop": (None, "stop"), "short": (7, "length"), "session": (8, "length"), "goes_on": (9, None)}
    assert stop.output_ids == [] and short.output_ids == [7] and goes_on.output_ids == [9]
    assert goes_on.num_computed == 8 and stop.block_table == [] and session.block_table == []  # finished: released
    assert sch.running == [goes_on] and len(bm.match_prefix(seq(list(range(40, 48)) + [1]))) == 2  # registered


def test_update_from_output_skips_incomplete_chunks_and_min_tokens_keeps_stop():
    bm = BlockManager(64, BS)
    sch = Scheduler(bm, max_batch_size=8, token_budget=5)
    long = Sequence("long", list(range(12)), GenerationConfig())
    early = Sequence("early", [1, 2], GenerationConfig(min_new_tokens=2), stop_ids=frozenset({3}))
    sch.add(long)
    sch.add(early)
    step = sch.schedule()  # long: 5 of 12 tokens, early waits (budget)
    assert sch.update_from_output(step, {"long": 4}) == [] and long.num_computed == 5 and long.output_ids == []
    sch.token_budget = 100
    step = sch.schedule()
    updates = sch.update_from_output(step, {"long": 4, "early": 3})
    assert [(u.seq.request_id, u.token, u.finish_reason) for u in updates] == [("long", 4, None), ("early", 3, None)]


def test_try_admit_changes_nothing_when_blocks_do_not_fit():
    bm = BlockManager(3, BS)
    first = seq(range(8), "first")
    assert bm.try_admit(first, 100) == 8 and bm.num_free == 1
    big = seq(range(100, 112), "big")
    assert bm.try_admit(big, 100) is None
    assert big.block_table == [] and big.num_computed == 0 and bm.num_free == 1 and bm.stats.queries == 1
