"""The TurboMind adapter behind the real server, with LMDeploy's GPU pipeline replaced by a stand-in.

TurboMind itself needs CUDA; everything around it does not. The stand-in carries what `lmdeploy.pipeline` carries
that the adapter could touch (LMDeploy's real `Tokenizer` class, `session_len`, `chat_template`, `stop_session`) and
streams `GenOut`-shaped outputs, so the server, the adapter's tokenisation and its counters run for real.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import pytest

openai = pytest.importorskip("openai")
lmdeploy_tokenizer = pytest.importorskip("lmdeploy.tokenizer")


@dataclass
class _GenOut:  # the fields of lmdeploy.messages's GenOut that the adapter reads
    response: str
    token_ids: list[int]
    finish_reason: Optional[str]
    input_token_len: int
    generate_token_len: int
    logprobs: Any = None


class _StandInPipeline:
    """Answers every request with the prompt's last `reply_len` tokens, reversed, one token per output."""

    def __init__(self, model_dir: Path, reply_len: int = 4):
        self.tokenizer = lmdeploy_tokenizer.Tokenizer(str(model_dir))  # what the old adapter exposed to the server
        self.session_len = 256
        self.reply_len = reply_len
        self.calls: list[dict[str, Any]] = []
        self.stopped: list[int] = []
        self.gate: Optional[asyncio.Event] = None

    async def generate(self, messages: Any, session_id: int, gen_config: Any, input_ids: Optional[list[int]] = None,
                       sequence_start: bool = True, sequence_end: bool = True, **_: Any) -> AsyncIterator[_GenOut]:
        self.calls.append({"messages": messages, "input_ids": input_ids, "max_new_tokens": gen_config.max_new_tokens})
        if self.gate is not None:
            await self.gate.wait()
        reply = list(reversed(input_ids or []))[:min(self.reply_len, gen_config.max_new_tokens)]
        for i, token in enumerate(reply):
            last = i == len(reply) - 1
            yield _GenOut(self.tokenizer.decode([token]), [token], "length" if last else None, len(input_ids or []),
                          i + 1)

    async def stop_session(self, session_id: int) -> None:
        self.stopped.append(session_id)


@pytest.fixture()
def adapter(internlm2_checkpoint: Path):
    from puyu.config import EngineConfig
    from puyu.serve.turbomind import TurboMindEngine

    return TurboMindEngine(internlm2_checkpoint, EngineConfig(device="cuda"), pipe=_StandInPipeline(
        internlm2_checkpoint))


def test_chat_through_the_turbomind_adapter_uses_puyus_tokenizer(adapter, internlm2_checkpoint: Path):
    from puyu.serve.api_server import create_app
    from puyu.testing import ServerThread
    from puyu.tokenizer import Tokenizer

    messages = [{"role": "user", "content": "hello there"}]
    ours = Tokenizer(internlm2_checkpoint)
    expected_ids = ours.encode(ours.apply_chat_template(messages), add_special_tokens=False)
    with ServerThread(create_app(adapter)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        reply = client.chat.completions.create(model=adapter.model_name, messages=messages, max_tokens=3)
        completion = client.completions.create(model=adapter.model_name, prompt=[5, 6, 7, 8], max_tokens=2)
    call = adapter.pipe.calls[0]
    assert call["messages"] is None and call["input_ids"] == expected_ids  # TurboMind gets puyu's rendering
    assert reply.usage.prompt_tokens == len(expected_ids) and reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == ours.decode(list(reversed(expected_ids))[:3])
    assert adapter.pipe.calls[1]["input_ids"] == [5, 6, 7, 8] and completion.usage.completion_tokens == 2


def test_turbomind_adapter_rejects_out_of_range_ids_and_long_prompts(adapter):
    from puyu.serve.api_server import create_app
    from puyu.testing import ServerThread

    with ServerThread(create_app(adapter)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="out of range"):
            client.completions.create(model=adapter.model_name, prompt=[adapter.tokenizer.vocab_rows + 5])
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=adapter.model_name, prompt=[5] * (adapter.session_len + 1))
    assert adapter.pipe.calls == []


def test_turbomind_adapter_counts_waiting_and_running(adapter):
    from puyu.config import GenerationConfig

    async def scenario() -> list[dict[str, Any]]:
        adapter.pipe.gate = asyncio.Event()
        seen: list[dict[str, Any]] = []

        async def consume() -> None:
            async for _ in adapter.generate([5, 6, 7], GenerationConfig(max_new_tokens=2)):
                seen.append(adapter.stats())

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        seen.append(adapter.stats())  # blocked before the first output: waiting
        adapter.pipe.gate.set()
        await task
        seen.append(adapter.stats())
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] == {"running": 0, "waiting": 1}
    assert seen[1] == {"running": 1, "waiting": 0}
    assert seen[-1] == {"running": 0, "waiting": 0}
