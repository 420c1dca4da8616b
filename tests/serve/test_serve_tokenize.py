"""/tokenize and /detokenize (vLLM's shapes) on the real server: the ids are the engine's own (a completion's
usage.prompt_tokens, a chat request's prompt), and detokenize inverts tokenize."""
from __future__ import annotations

import httpx
import openai
import pytest

from puyu.config import EngineConfig
from puyu.serve.api_server import create_app
from puyu.testing import ServerThread

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(internlm2_checkpoint):
    from puyu.engine import AsyncEngine

    engine = AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=256, cache_max_entry_count=64,
                                                            cache_block_seq_len=16))
    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        srv.engine = engine
        yield srv
    engine.close()


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def test_serve_tokenize_prompt_matches_the_engine(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    text = "The quick brown fox 你好"
    r = post(server, "/tokenize", {"model": MODEL, "prompt": text})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"} and body["max_model_len"] == 256
    assert body["count"] == len(body["tokens"]) == client.completions.create(
        model=MODEL, prompt=text, max_tokens=1).usage.prompt_tokens
    assert body["tokens"] == server.engine.tokenizer.encode(text)
    plain = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True}).json()
    assert plain["tokens"] == server.engine.tokenizer.encode(text, add_special_tokens=False)
    assert "".join(plain["token_strs"]) == text
    back = post(server, "/detokenize", {"model": MODEL, "tokens": plain["tokens"]}).json()
    assert back == {"prompt": text}


def test_serve_tokenize_messages_counts_the_chat_prompt(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    r = post(server, "/tokenize", {"model": MODEL, "messages": messages}).json()
    usage = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage
    assert r["count"] == usage.prompt_tokens


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, None),
    ("/tokenize", {"model": "other", "prompt": "x"}, "model"),
    ("/detokenize", {"tokens": [10 ** 7]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_serve_tokenize_errors(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code in (400, 404)
    err = r.json()["error"]
    if param:
        assert err["param"] == param
