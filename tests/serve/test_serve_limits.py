"""Where a reply ends: the context limit (prompt + max_tokens over it is a 400 naming both numbers), a `length` cut
never ending in half a UTF-8 character, and stop strings (multi-token, multi-byte) held back while streaming so that
neither a partial stop string nor anything after it is ever sent. Real server, openai SDK, random-weight puyu-tiny
(its byte-level vocabulary splits Chinese characters across tokens)."""
from __future__ import annotations

import openai
import pytest

from puyu.config import EngineConfig
from puyu.testing import openai_client, serving
from puyu.tiny import puyu_tiny_path

MODEL = "puyu-tiny"
SESSION = 256
CHINESE = "你好，我是书生·浦语。请用中文介绍上海和北京。"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from puyu.engine import AsyncEngine

    engine = AsyncEngine(puyu_tiny_path(tmp_path_factory.mktemp("models")),
                         EngineConfig(session_len=SESSION, cache_max_entry_count=128, cache_block_seq_len=16))
    with serving(engine, MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def test_serve_prompt_plus_max_tokens_over_the_context_is_a_400(client, server):
    prompt = "hello " * 40
    n = len(server.engine.tokenizer.encode(prompt))
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=SESSION - n + 1, stream=stream)
        err = info.value.body
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        assert str(n) in err["message"] and str(SESSION - n + 1) in err["message"] and str(SESSION) in err["message"]
    ok = client.completions.create(model=MODEL, prompt=prompt, max_tokens=SESSION - n, temperature=0)
    assert ok.usage.prompt_tokens == n
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                       max_completion_tokens=SESSION)
    assert info.value.body["param"] == "max_completion_tokens" and str(SESSION) in info.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_serve_length_cut_never_ends_in_a_broken_character(client, stream):
    """Every max_tokens from 1 to 24 on a Chinese prompt (the old code ended about half of them in U+FFFD)."""
    for max_tokens in range(1, 25):
        reply = client.completions.create(model=MODEL, prompt=CHINESE, max_tokens=max_tokens, temperature=0,
                                          stream=stream, extra_body={"ignore_eos": True})
        chunks = list(reply) if stream else [reply]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert not text.endswith("\ufffd"), (max_tokens, text)


def _reference(client, prompt: str) -> str:
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def _stop_candidates(server, text: str) -> list[str]:
    """Substrings of `text` that span several tokens, some with non-ASCII characters, first seen at their index."""
    tok = server.engine.tokenizer
    out = []
    for k in range(2, len(text) - 6):
        for length in (3, 5):
            s = text[k:k + length]
            if "\ufffd" in s or text.index(s) != k or len(tok.encode(s, add_special_tokens=False)) < 2:
                continue
            out.append(s)
    multibyte = [s for s in out if any(ord(c) > 127 for c in s)]
    return (multibyte[:3] + [s for s in out if s not in multibyte][:2]) or out[:4]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_serve_stop_strings_multi_token_and_multi_byte(client, server, stream, include):
    text = _reference(client, CHINESE)
    stops = _stop_candidates(server, text)
    assert stops and any(any(ord(c) > 127 for c in s) for s in stops)
    for stop in stops:
        cut = text.index(stop) + (len(stop) if include else 0)
        reply = client.completions.create(model=MODEL, prompt=CHINESE, max_tokens=60, temperature=0, stop=[stop],
                                          stream=stream, extra_body={"ignore_eos": True,
                                                                     "include_stop_str_in_output": include})
        chunks = list(reply) if stream else [reply]
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        assert got == text[:cut], (stop, got, text)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
