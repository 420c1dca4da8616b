"""The engine-backed and server-backed Lagent models stream as Lagent expects, through the real engine and server
(fixtures in conftest.py: a checkpoint edited to end its reply with <|im_end|>). Greedy decoding makes both
backends produce the same text."""
from __future__ import annotations

import time

import pytest
from lagent.agents.internlm2_agent import Internlm2Agent, Internlm2Protocol
from lagent.schema import AgentStatusCode, ModelStatusCode

from puyu.agent.models import EngineModel, OpenAIServerModel
from puyu.config import EngineConfig


def check_stream(chunks: list[tuple], original: str) -> str:
    """STREAM_ING ... END, cumulative text, cut before <|im_end|>; returns the final text."""
    states = [s for s, _, _ in chunks]
    texts = [t for _, t, _ in chunks]
    assert states[-1] == ModelStatusCode.END and set(states[:-1]) == {ModelStatusCode.STREAM_ING}
    assert len(states) >= 3  # really streamed, not one blob
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)
    final = texts[-1]
    assert final and "<|im_end|>" not in final and original.startswith(final) and final != original
    return final


def test_engine_model_streams_into_lagent_and_stops_at_im_end(engine_model, im_end_checkpoint):
    chunks = list(engine_model.stream_chat(im_end_checkpoint.messages))
    check_stream(chunks, im_end_checkpoint.original)
    assert engine_model.last_finish_reason == "stop"
    assert 1 <= engine_model.last_usage["completion_tokens"] <= im_end_checkpoint.k + 1
    stats = engine_model.engine.stats()
    assert stats["running"] == 0 and stats["blocks_used"] == 0


def test_server_model_streams_the_same_text(engine_model, server_url, im_end_checkpoint):
    server_model = OpenAIServerModel(server_url, bos="<s>", max_new_tokens=32)  # same prompt ids as the engine's
    assert server_model.model_name == engine_model.path
    chunks = list(server_model.stream_chat(im_end_checkpoint.messages))
    final = check_stream(chunks, im_end_checkpoint.original)
    assert final == list(engine_model.stream_chat(im_end_checkpoint.messages))[-1][1]
    usage = server_model.last_usage
    assert usage["completion_tokens"] <= im_end_checkpoint.k + 1 and usage["prompt_tokens"] > 10
    server_model.close()


def test_leaving_the_stream_early_aborts_the_engine_request(internlm2_checkpoint, im_end_checkpoint):
    options = EngineConfig(**im_end_checkpoint.engine_options)
    model = EngineModel(model_path=str(internlm2_checkpoint), engine_config=options, max_new_tokens=500)
    try:
        stream = model.stream_chat(im_end_checkpoint.messages)
        next(stream), next(stream)
        stream.close()
        deadline = time.monotonic() + 30
        while model.engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = model.engine.stats()
        assert stats["running"] == 0 and stats["blocks_used"] == 0 and stats["tokens_generated"] < 500
    finally:
        model.close()


def test_lagent_internlm2_agent_consumes_both_models(engine_model, server_url):
    """Lagent's own stream loop (not ours) runs on the puyu models and ends with END and the reply."""
    server_model = OpenAIServerModel(server_url, bos="<s>", max_new_tokens=32)
    try:
        for model in (engine_model, server_model):
            agent = Internlm2Agent(model, protocol=Internlm2Protocol(), max_turn=1)
            returns = list(agent.stream_chat("Hello"))
            assert returns[-1].state == AgentStatusCode.END
            assert returns[-1].response and "<|im_end|>" not in returns[-1].response
    finally:
        server_model.close()


def test_server_errors_become_a_lagent_error_status(server_url, im_end_checkpoint):
    model = OpenAIServerModel(server_url, max_new_tokens=32)
    model.model_name = "no-such-model"
    chunks = list(model.stream_chat(im_end_checkpoint.messages))
    assert chunks[-1][0] == ModelStatusCode.SERVER_ERR and "404" in model.last_error
    model.close()


def test_unreachable_server_is_a_clear_error(unused_port):
    with pytest.raises(ValueError, match="cannot list the server's models"):
        OpenAIServerModel(f"http://127.0.0.1:{unused_port}")
