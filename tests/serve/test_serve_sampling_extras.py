"""vLLM's sampling extras honoured through the real server (openai SDK, random-weight puyu-tiny): min_tokens,
stop_token_ids, logit_bias, min_p; n > 1 with usage counted as OpenAI does; /health once the engine thread died.
Each effect is checked against the engine's own greedy tokens for the same prompt."""
from __future__ import annotations

import httpx
import openai
import pytest

from puyu.config import EngineConfig, GenerationConfig
from puyu.serve.api_server import create_app
from puyu.testing import ServerThread, openai_client, serving
from puyu.tiny import puyu_tiny_path

MODEL = "puyu-tiny"
PROMPT = "The weather in Shanghai is"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return puyu_tiny_path(tmp_path_factory.mktemp("models"))


def _engine(model_dir):
    from puyu.engine import AsyncEngine

    return AsyncEngine(model_dir, EngineConfig(session_len=256, cache_max_entry_count=128, cache_block_seq_len=16))


@pytest.fixture(scope="module")
def server(model_dir):
    engine = _engine(model_dir)
    with serving(engine, MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def greedy_ids(server, n: int = 12, **options) -> list[int]:
    outs = server.engine.stream_sync(PROMPT, GenerationConfig(max_new_tokens=n, ignore_eos=True, **options))
    return [t for o in outs for t in o.token_ids]


def complete(client, **kw):
    extra = kw.pop("extra", {})
    return client.completions.create(model=MODEL, prompt=kw.pop("prompt", PROMPT), temperature=kw.pop("temperature", 0),
                                     max_tokens=kw.pop("max_tokens", 12), extra_body=extra, **kw)


def test_serve_stop_token_ids_and_min_tokens(client, server):
    ids = greedy_ids(server)
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    reply = complete(client, extra={"stop_token_ids": [ids[k]], "ignore_eos": True})
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == k
    assert reply.choices[0].text == server.engine.tokenizer.decode(ids[:k])
    held = complete(client, max_tokens=30, extra={"stop_token_ids": [ids[k]], "ignore_eos": True,
                                                  "min_tokens": k + 3})
    assert held.usage.completion_tokens >= k + 3  # the stop id is masked until min_tokens


def test_serve_logit_bias(client, server):
    ids = greedy_ids(server)
    tok = server.engine.tokenizer
    pushed = next(i for i in range(100, 800) if i not in ids and tok.decode([i]).isalpha())
    reply = complete(client, max_tokens=4, logit_bias={str(pushed): 100}, extra={"ignore_eos": True})
    assert reply.choices[0].text == tok.decode([pushed] * 4)
    banned = complete(client, max_tokens=1, logit_bias={str(ids[0]): -100}, extra={"ignore_eos": True})
    assert banned.choices[0].text != tok.decode(ids[:1])
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        complete(client, logit_bias={str(10 ** 7): 1})


def test_serve_min_p_one_keeps_only_the_top_token(client, server):
    greedy = server.engine.tokenizer.decode(greedy_ids(server))
    for seed in (1, 2, 3):
        reply = complete(client, temperature=1.0, seed=seed, extra={"min_p": 1.0, "ignore_eos": True})
        assert reply.choices[0].text == greedy
    loose = {complete(client, temperature=1.0, seed=s, extra={"ignore_eos": True}).choices[0].text for s in (1, 2, 3)}
    assert loose != {greedy}  # without min_p, sampling does differ from greedy


def test_serve_n_choices_and_usage(client):
    one = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                         extra_body={"ignore_eos": True})
    three = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           n=3, temperature=1.0, seed=4, extra_body={"ignore_eos": True})
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    assert three.usage.completion_tokens == 15 and three.usage.total_tokens == one.usage.prompt_tokens + 15
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            n=3, temperature=1.0, seed=4, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-1].usage.prompt_tokens == one.usage.prompt_tokens


def test_serve_health_is_503_once_the_engine_thread_died(model_dir):
    engine = _engine(model_dir)
    try:
        with ServerThread(create_app(engine, model_name=MODEL)) as srv:
            assert httpx.get(srv.url + "/health").status_code == 200

            def broken() -> bool:  # a bug in the engine loop, outside a step
                raise RuntimeError("injected engine-loop failure")

            engine.engine.has_work = broken
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            with pytest.raises(openai.APIError, match="engine"):
                client.completions.create(model=MODEL, prompt="x", max_tokens=4)
            engine._thread.join(timeout=30)
            health = httpx.get(srv.url + "/health")
            assert health.status_code == 503 and health.json()["status"] == "engine stopped"
            with pytest.raises(openai.APIStatusError) as info:
                client.completions.create(model=MODEL, prompt="x", max_tokens=4)
            assert info.value.status_code == 503
    finally:
        engine.close()
