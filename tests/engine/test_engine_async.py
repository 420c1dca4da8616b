"""AsyncEngine: streaming deltas, concurrent requests, early exit and cancellation free the KV blocks, stats."""
from __future__ import annotations

import asyncio

import pytest

from engine_helpers import greedy, make_prompts
from puyu.config import EngineConfig, GenerationConfig
from puyu.engine.engine import AsyncEngine


@pytest.fixture(scope="module")
def engine(internlm2_checkpoint):
    eng = AsyncEngine(internlm2_checkpoint, EngineConfig(cache_max_entry_count=64, cache_block_seq_len=16,
                                                         enable_prefix_caching=False))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(engine):
    return make_prompts(engine.spec.vocab_size, (7, 19, 30), seed=3)


async def collect(engine, prompt, cfg):
    return [o async for o in engine.generate(prompt, cfg)]


def test_attributes(engine):
    assert engine.model_name and engine.session_len > 0
    assert engine.spec.arch == "internlm2" and engine.tokenizer.stop_token_ids
    assert engine.config.cache_block_seq_len == 16


def test_stream_deltas_add_up(engine, prompts):
    chunks = asyncio.run(collect(engine, prompts[0], greedy(12, logprobs=0)))
    assert [c.generate_token_len for c in chunks] == list(range(1, 13))
    assert all(len(c.token_ids) == 1 and len(c.logprobs) == 1 for c in chunks)
    assert [c.finish_reason for c in chunks] == [None] * 11 + ["length"]
    assert all(c.input_token_len == 7 for c in chunks)
    ids = [t for c in chunks for t in c.token_ids]
    text = "".join(c.text for c in chunks)
    assert text == engine.tokenizer.decode(ids)


def test_concurrent_requests_match_sequential(engine, prompts):
    async def run():
        return await asyncio.gather(*(collect(engine, p, greedy(10)) for p in prompts))

    together = asyncio.run(run())
    alone = [asyncio.run(collect(engine, p, greedy(10))) for p in prompts]
    ids = lambda chunks: [t for c in chunks for t in c.token_ids]  # noqa: E731
    assert [ids(c) for c in together] == [ids(c) for c in alone]


def _idle_after_one_more(engine, prompt) -> dict:
    """Run one more request to the end: commands are processed in order, so any earlier abort is done."""
    asyncio.run(collect(engine, prompt, greedy(2)))
    return engine.stats()


def test_break_aborts_and_frees_blocks(engine, prompts):
    async def run():
        stream = engine.generate(prompts[2], greedy(200))
        got = []
        async for out in stream:
            got.append(out)
            if len(got) == 3:
                break
        await stream.aclose()
        return got

    got = asyncio.run(run())
    assert len(got) == 3 and got[-1].finish_reason is None
    stats = _idle_after_one_more(engine, prompts[0])
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["blocks_used"] == 0 and stats["blocks_free"] == stats["blocks_total"]


def test_cancelled_task_aborts(engine, prompts):
    async def run():
        first = asyncio.Event()

        async def consume():
            async for _ in engine.generate(prompts[1], greedy(500)):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    stats = _idle_after_one_more(engine, prompts[0])
    assert stats["running"] == 0 and stats["blocks_used"] == 0


def test_explicit_abort_and_duplicate_id(engine, prompts):
    async def run():
        stream = engine.generate(prompts[0], greedy(500), request_id="req-1")
        first = await stream.__anext__()
        with pytest.raises(ValueError, match="req-1"):
            await engine.generate(prompts[1], greedy(5), request_id="req-1").__anext__()
        engine.abort("req-1")
        rest = [o async for o in stream]
        return first, rest

    first, rest = asyncio.run(run())
    assert first.finish_reason is None
    assert rest[-1].finish_reason == "abort"


def test_stats_count_tokens(engine, prompts):
    before = engine.stats()["tokens_generated"]
    asyncio.run(collect(engine, prompts[0], greedy(5)))
    stats = engine.stats()
    assert stats["tokens_generated"] == before + 5
    for key in ("running", "waiting", "blocks_total", "blocks_used", "blocks_free", "prefix_cache_queries",
                "prefix_cache_hits", "tokens_generated"):
        assert isinstance(stats[key], int)


def test_chat_messages_prompt(engine):
    messages = [{"role": "system", "content": "You are puyu."}, {"role": "user", "content": "你好"}]
    chunks = asyncio.run(collect(engine, messages, GenerationConfig(max_new_tokens=4)))
    rendered = engine.tokenizer.apply_chat_template(messages)
    expect_len = len(engine.tokenizer.encode(rendered, add_special_tokens=False))
    assert chunks[-1].input_token_len == expect_len
    assert rendered.endswith("<|im_start|>assistant\n")


def test_close_ends_pending_adds_and_refuses_new_ones(internlm2_checkpoint, prompts):
    """A request still in the command list when close() runs gets a final 'abort' (it used to wait forever), and
    one registered after close() is refused, not left without an engine thread to answer it."""
    import queue

    eng = AsyncEngine(internlm2_checkpoint, EngineConfig(cache_max_entry_count=16, cache_block_seq_len=16))
    got: queue.Queue = queue.Queue()
    with eng._cv:  # the engine thread cannot take commands while this lock is held: the add stays pending
        eng._register("pending", list(prompts[0]), greedy(4), got.put)
        eng._closed = True  # what close() sets, under the same lock
        eng._cv.notify()
    eng._thread.join(timeout=30)
    assert not eng._thread.is_alive()
    last = got.get(timeout=5)
    assert (last.request_id, last.finish_reason) == ("pending", "abort")
    with pytest.raises(RuntimeError, match="closed"):
        eng._register("late", list(prompts[0]), greedy(4), got.put)
    with pytest.raises(RuntimeError, match="closed"):
        list(eng.stream_sync(prompts[0], greedy(4)))
    eng.close()
