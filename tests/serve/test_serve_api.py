"""The real server (uvicorn on 127.0.0.1, a free port) on the real engine with a tiny InternLM2 checkpoint,
driven with the `openai` SDK and raw HTTP: endpoints, streaming, usage, errors, auth, concurrency, disconnects."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from puyu.config import EngineConfig, GenerationConfig
from puyu.serve.api_server import create_app
from puyu.testing import ServerThread
from serve_testlib import metric

MODEL = "tiny-internlm2"
MSGS = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def engine(internlm2_checkpoint):
    from puyu.engine import AsyncEngine

    eng = AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=256, cache_max_entry_count=512,
                                                         cache_block_seq_len=16, max_batch_size=64))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def prompt_len(engine, messages) -> int:
    tok = engine.tokenizer
    return len(tok.encode(tok.apply_chat_template(messages), add_special_tokens=False))


def test_serve_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_serve_chat_whole_and_streamed_agree_with_usage(client, engine):
    whole = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == prompt_len(engine, MSGS)
    assert 1 <= whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same reply either way
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_serve_chat_reply_is_the_engine_reply(client, engine):
    """The server adds nothing: its text equals the engine's own greedy text for the same prompt."""
    async def direct() -> str:
        ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(MSGS), add_special_tokens=False)
        return "".join([o.text async for o in engine.generate(ids, GenerationConfig(max_new_tokens=12))])

    reply = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == asyncio.run(direct())


def test_serve_completions_whole_stream_echo_logprobs_n(client, engine):
    prompt = "The quick brown fox"
    n_prompt = len(engine.tokenizer.encode(prompt))
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                      echo=True)
    text = whole.choices[0].text
    assert text.startswith(prompt) and whole.usage.prompt_tokens == n_prompt
    lp = whole.choices[0].logprobs
    # echo: the prompt's tokens come first (the first without a logprob), see test_serve_echo_logprobs.py
    assert len(lp.tokens) == n_prompt + whole.usage.completion_tokens == len(lp.token_logprobs)
    assert lp.token_logprobs[0] is None
    assert all(1 <= len(top) <= 2 and max(top.values()) >= tok_lp - 1e-6  # byte tokens may share a string
               for top, tok_lp in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert "".join(lp.tokens[n_prompt:]) == text[len(prompt):]
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text[len(prompt):]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    several = client.completions.create(model=MODEL, prompt=[prompt, "Hello"], n=2, max_tokens=4,
                                        temperature=0.9, seed=1, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]
    # each prompt counted once, however many samples it has
    assert several.usage.prompt_tokens == n_prompt + len(engine.tokenizer.encode("Hello"))
    assert several.usage.completion_tokens == 4 * 4


def test_serve_chat_n_and_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, n=3, temperature=1.0,
                                           seed=3, logprobs=True, top_logprobs=3)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    for c in reply.choices:
        entries = c.logprobs.content
        assert entries and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)


def test_serve_tiny_temperature_is_greedy_not_an_overflow(client):
    greedy = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0)
    tiny = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=5e-324, top_p=5e-324)
    assert tiny.choices[0].text == greedy.choices[0].text


def test_serve_stop_and_seed(client):
    first = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    text = first.choices[0].message.content
    cut = text[3:6]
    if cut.strip():
        stopped = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0, stop=[cut])
        assert stopped.choices[0].message.content == text[:text.index(cut)]
        assert stopped.choices[0].finish_reason == "stop"
    a, b = (client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=1.0, seed=11)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def raw_post(server, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers or {}, timeout=60)


def assert_error(resp: httpx.Response, status: int, *words: str, param=None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err
    if param is not None:
        assert err["param"] == param
    return err


def test_serve_errors_have_openai_shape_and_status(server, engine):
    assert_error(raw_post(server, "/v1/chat/completions", b'{"model": "x", "messages": ['), 400, "malformed JSON")
    assert_error(raw_post(server, "/v1/chat/completions", b"[1, 2]"), 400, "JSON object")
    assert_error(raw_post(server, "/v1/chat/completions", {"model": MODEL}), 400, "messages", param="messages")
    assert_error(raw_post(server, "/v1/completions", {"prompt": "x"}), 400, "model", param="model")
    assert_error(raw_post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": MSGS}), 404, "gpt-4",
                 param="model")
    assert_error(raw_post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "temperature": -1}),
                 400, "temperature", param="temperature")
    assert_error(raw_post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "service_tier": "x",
                                                            "functions": [{}]}), 400, "service_tier", "functions")
    assert_error(raw_post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "logit_bias": {"1": 500}}),
                 400, "100", param="logit_bias.1")
    assert_error(raw_post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3}), 400, "best_of")
    # found by fuzzing: a denormal penalty overflowed the logits inside the engine (a 500 for every running request)
    assert_error(raw_post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "repetition_penalty": 5e-324}),
                 400, param="repetition_penalty")
    assert_error(raw_post(server, "/v1/completions", {"model": MODEL, "prompt": [5, 10 ** 6]}), 400, "out of range")
    long_text = "hello " * 400
    n_tokens = len(engine.tokenizer.encode(long_text))
    for stream in (False, True):
        err = assert_error(raw_post(server, "/v1/completions", {"model": MODEL, "prompt": long_text, "stream": stream}),
                           400, str(n_tokens), "256")
        assert err["code"] == "context_length_exceeded"
    err = assert_error(raw_post(server, "/v1/chat/completions",
                                {"model": MODEL, "messages": [{"role": "user", "content": long_text}]}), 400, "256")
    assert err["code"] == "context_length_exceeded"
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)


def test_serve_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="unknown field 'frobnicate'"):
        client.chat.completions.create(model=MODEL, messages=MSGS, extra_body={"frobnicate": True})


def test_serve_api_keys(engine):
    with ServerThread(create_app(engine, model_name=MODEL, api_keys=["k-1", "k-2"])) as srv:
        base = srv.url + "/v1"
        for key in ("k-1", "k-2"):
            assert openai.OpenAI(base_url=base, api_key=key, max_retries=0).models.list().data[0].id == MODEL
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        resp = httpx.post(base + "/chat/completions", content=b"{broken")  # no key: 401 before the body is read
        assert_error(resp, 401, "missing API key")
        assert resp.headers["www-authenticate"] == "Bearer"
        assert httpx.get(srv.url + "/health").status_code == 200


def test_serve_64_concurrent_streams_complete_with_correct_usage(server, engine):
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(i: int):
        messages = [{"role": "user", "content": f"Request number {i}: what is the capital of France?"}]
        stream = await aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                       temperature=0.8, seed=i, stream=True,
                                                       stream_options={"include_usage": True},
                                                       extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        return messages, chunks

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    results = asyncio.run(all_of_them())
    assert len(results) == 64
    for messages, chunks in results:
        usage = chunks[-1].usage
        assert usage.prompt_tokens == prompt_len(engine, messages)
        assert usage.completion_tokens == 6  # ignore_eos: every stream runs to max_tokens
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
    assert engine.stats()["blocks_used"] == 0


def test_serve_disconnect_frees_blocks_at_once(server, engine):
    body = {"model": MODEL, "prompt": "The weather in Shanghai is sunny. " * 4, "max_tokens": 200,
            "ignore_eos": True, "stream": True, "temperature": 0}
    before = engine.stats()["tokens_generated"]
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break
            scrape = http.get(server.url + "/metrics").text
            assert metric(scrape, "puyu_kv_blocks_used") > 0  # the request holds blocks while it streams
        # leaving the `with` closes the connection mid-stream
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        scrape = httpx.get(server.url + "/metrics").text
        if metric(scrape, "puyu_kv_blocks_used") == 0 and metric(scrape, "puyu_requests_running") == 0:
            break
        time.sleep(0.05)
    assert metric(scrape, "puyu_kv_blocks_used") == 0
    assert metric(scrape, "puyu_requests_aborted_total") >= 1
    assert engine.stats()["tokens_generated"] - before < 200  # aborted, not run to the end


def test_serve_disconnect_during_a_whole_answer_aborts_it(internlm2_checkpoint):
    """Non-streamed: the server watches the connection while generating and aborts when the client goes."""
    import socket

    from puyu.engine import AsyncEngine

    with AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=4096, cache_max_entry_count=300,
                                                        cache_block_seq_len=16)) as engine:
        with ServerThread(create_app(engine, model_name=MODEL)) as srv:
            body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True,
                               "temperature": 0}).encode()
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            while engine.stats()["tokens_generated"] < 5:  # it is generating
                time.sleep(0.01)
            sock.close()
            deadline = time.monotonic() + 60
            while engine.stats()["blocks_used"] and time.monotonic() < deadline:
                time.sleep(0.02)
            scrape = httpx.get(srv.url + "/metrics").text
        assert metric(scrape, "puyu_kv_blocks_used") == 0
        assert metric(scrape, "puyu_requests_aborted_total") == 1
        assert engine.stats()["tokens_generated"] < 4000


def test_serve_metrics_count_requests_latencies_and_prefix_hits(client, server):
    long_prompt = "Large language models predict the next token. " * 6
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=3, temperature=0)
    scrape = httpx.get(server.url + "/metrics").text
    assert metric(scrape, "puyu_prefix_cache_hit_rate") > 0
    assert metric(scrape, "puyu_time_to_first_token_seconds_count") >= 2
    assert metric(scrape, "puyu_time_per_output_token_seconds_count") >= 2
    assert 'puyu_http_requests_total{endpoint="/v1/completions",status="200"}' in scrape
    assert metric(scrape, "puyu_kv_blocks_total") == 512


class FaultyEngine:
    """Fault injection around the real engine: a prompt containing BOOM fails after its first output."""

    def __init__(self, engine):
        self.inner = engine
        self.tokenizer, self.session_len, self.model_name = engine.tokenizer, engine.session_len, engine.model_name

    def stats(self):
        return self.inner.stats()

    async def generate(self, prompt, gen_config, request_id=None):
        stream = self.inner.generate(prompt, gen_config, request_id=request_id)
        try:
            async for out in stream:
                if isinstance(prompt, str) and "BOOM" in prompt and out.finish_reason is None:
                    yield out
                    raise RuntimeError("injected failure")
                yield out
        finally:
            await stream.aclose()


def test_serve_exception_in_one_request_fails_only_that_request(engine):
    with ServerThread(create_app(FaultyEngine(engine), model_name=MODEL)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)

        async def good(i: int) -> int:
            r = await aclient.completions.create(model=MODEL, prompt=f"fine {i}", max_tokens=8, temperature=0,
                                                 extra_body={"ignore_eos": True})
            return r.usage.completion_tokens

        async def bad() -> str:
            try:
                await aclient.completions.create(model=MODEL, prompt="BOOM", max_tokens=8,
                                                 extra_body={"ignore_eos": True})
            except openai.InternalServerError as exc:
                return str(exc)
            return "no error"

        async def mix():
            try:
                return await asyncio.gather(bad(), *(good(i) for i in range(4)))
            finally:
                await aclient.close()

        failed, *ok = asyncio.run(mix())
        assert "injected failure" in failed
        assert ok == [8, 8, 8, 8]
        with pytest.raises(openai.APIError, match="injected failure"):
            list(client.completions.create(model=MODEL, prompt="BOOM", max_tokens=8, stream=True,
                                           extra_body={"ignore_eos": True}))
        assert client.completions.create(model=MODEL, prompt="still alive", max_tokens=2).usage.completion_tokens
    assert engine.stats()["blocks_used"] == 0
