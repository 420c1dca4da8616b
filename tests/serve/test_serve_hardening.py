"""Hardening of the real server (issue 13, items 8-13): request-body limit and tokenisation off the event loop, bounded
and linear stop strings, lone surrogates and deep JSON, Host / Origin / Content-Type checks, API keys on every path but
/health, strict request fields, framing and body read timeout. Real requests to the real server on 127.0.0.1."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from puyu.config import EngineConfig
from puyu.serve.api_server import create_app
from puyu.testing import ServerThread

MODEL = "tiny-internlm2"
MSGS = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engine(internlm2_checkpoint):
    from puyu.engine import AsyncEngine

    eng = AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=256, cache_max_entry_count=256,
                                                         cache_block_seq_len=16, max_batch_size=16))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, model_name=MODEL, max_request_bytes=64 * 1024 * 1024,
                                 allowed_origins=["https://ui.example"], body_timeout=1.0)) as srv:
        yield srv


def post(server, path: str, body, headers=None, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json",
                                                                   **(headers or {})}, timeout=120, **kw)


def error(resp: httpx.Response, status: int, param=None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    return err


def raw_http(port: int, data: bytes, wait: float = 10) -> bytes:
    """Send raw bytes, return what the server answers (until it closes or `wait` seconds pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        out = b""
        try:
            while b"\r\n\r\n" not in out or not out.split(b"\r\n\r\n", 1)[1]:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
    return out


# ---- 8: body limit, tokenisation off the event loop ---------------------------------------------------------------
def test_serve_request_body_limit_is_413(engine):
    with ServerThread(create_app(engine, model_name=MODEL, max_request_bytes=64 * 1024)) as srv:
        big = {"model": MODEL, "prompt": "x" * (100 * 1024)}
        err = error(post(srv, "/v1/completions", big), 413)
        assert "64" in err["message"] or "65536" in err["message"]

        def chunks():  # no Content-Length: the limit holds on the bytes that arrive
            data = json.dumps(big).encode()
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        resp = httpx.post(srv.url + "/v1/completions", content=chunks(), timeout=60,
                          headers={"Content-Type": "application/json"})
        error(resp, 413)
        ok = post(srv, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_serve_health_answers_while_a_huge_prompt_is_tokenised(server):
    """A multi-megabyte prompt is tokenised (and found too long) in a worker thread: /health keeps answering."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello world, " * 400_000}]}
    result: dict = {}

    def big() -> None:
        t0 = time.perf_counter()
        result["resp"] = post(server, "/v1/chat/completions", body)
        result["took"] = time.perf_counter() - t0

    thread = threading.Thread(target=big)
    thread.start()
    worst = 0.0
    with httpx.Client(timeout=60) as http:
        while thread.is_alive():
            t0 = time.perf_counter()
            assert http.get(server.url + "/health").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.01)
    thread.join()
    assert error(result["resp"], 400)["code"] == "context_length_exceeded"
    assert result["took"] > 0.5, "the prompt was too quick to tokenise to show anything"
    assert worst < 0.5, f"/health took {worst:.2f} s while the prompt was tokenised ({result['took']:.2f} s)"


# ---- 9: stop strings bounded, and checked in linear time ----------------------------------------------------------
def test_serve_stop_strings_are_bounded(server):
    for stop in (["x" * 1025], [f"s{i}" for i in range(17)], "y" * 100_000):
        err = error(post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "stop": stop}), 400, "stop")
        assert "stop" in err["message"]
    ok = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4,
                                          "stop": ["q" * 1024] * 16})
    assert ok.status_code == 200, ok.text


def test_serve_stop_check_is_linear_in_the_text():
    """The server's stop check (TextStream) on 16 stop strings of 1024 characters that almost match all along: the
    old check rescanned every prefix of every stop word on each delta (quadratic; minutes here)."""
    from puyu.engine.outputs import TextStream

    class Detok:
        def add(self, ids):
            return "".join(ids)

        def flush(self):
            return ""

    class Tok:
        def detokenizer(self, skip):
            return Detok()

    stream = TextStream(Tok(), True, ["a" * 1023 + chr(ord("b") + i) for i in range(16)])
    t0 = time.perf_counter()
    out = "".join(stream.add(["a"]) for _ in range(4000))
    took = time.perf_counter() - t0
    assert out == "a" * (4000 - 1023) and not stream.stopped
    assert stream.add(["c"]) == "" and stream.stopped  # 'a'*1023 + 'c' ends the text where that stop word starts
    assert took < 2.0, f"{took:.2f} s for 4000 deltas"


# ---- 10: lone surrogates, deep JSON -------------------------------------------------------------------------------
def test_serve_lone_surrogate_is_400_naming_the_field(server):
    cases = [
        ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800"}]}',
         "messages[0].content"),
        ("/v1/completions", '{"model": "%s", "prompt": "a\\ud800"}', "prompt"),
        ("/v1/completions", '{"model": "%s", "prompt": "Hi", "stop": ["\\udfff"]}', "stop"),
        ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
                                 '"user": "\\ud83d"}', "user"),
    ]
    for path, body, param in cases:
        err = error(post(server, path, body % MODEL), 400, param)
        assert "surrogate" in err["message"]


def test_serve_deeply_nested_json_is_400_naming_the_field(server):
    deep = "[" * 100_000 + "]" * 100_000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "tool_calls": [call]},
                                         {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    err = error(post(server, "/v1/chat/completions", body), 400, "messages[1].tool_calls[0].function.arguments")
    assert "nested" in err["message"]
    params: dict = {}
    for _ in range(200):
        params = {"type": "object", "properties": {"x": params}}
    body = {"model": MODEL, "messages": MSGS, "tools": [{"type": "function",
                                                         "function": {"name": "f", "parameters": params}}]}
    err = error(post(server, "/v1/chat/completions", body), 400, "tools[0].function.parameters")
    assert "nested" in err["message"]
    # a whole body nested past the JSON parser's recursion limit
    err = error(post(server, "/v1/chat/completions", '{"model": "x", "messages": ' + deep + "}"), 400)
    assert err["code"] in ("invalid_json", "invalid_body")


# ---- 11: Content-Type, Origin, Host -------------------------------------------------------------------------------
def test_serve_cross_origin_and_non_json_posts_are_refused(server):
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        err = error(post(server, "/v1/completions", body, {"Content-Type": ctype}), 415)
        assert "application/json" in err["message"]
    err = error(post(server, "/v1/completions", body, {"Origin": "https://evil.example"}), 403)
    assert "evil.example" in err["message"]
    error(post(server, "/v1/completions", body, {"Origin": "null"}), 403)
    # the allowed origin, and the server's own (its /docs page), go through; CORS headers for the allowed one
    ok = post(server, "/v1/completions", body, {"Origin": "https://ui.example"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ui.example"
    assert post(server, "/v1/completions", body, {"Origin": server.url}).status_code == 200
    pre = httpx.options(server.url + "/v1/chat/completions",
                        headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                                 "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://ui.example"
    # charset parameters and clients that send no Content-Type at all still work
    assert post(server, "/v1/completions", body, {"Content-Type": "application/json; charset=utf-8"}).status_code \
        == 200
    req = httpx.Request("POST", server.url + "/v1/completions", content=body.encode())
    assert "content-type" not in req.headers
    assert httpx.Client(timeout=60).send(req).status_code == 200


def test_serve_host_header_allow_list(engine, server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    err = error(post(server, "/v1/completions", body, {"Host": "rebind.evil.example"}), 400)
    assert err["code"] == "invalid_host"
    error(httpx.get(server.url + "/health", headers={"Host": "rebind.evil.example:80"}), 400)
    for host in ("localhost", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200
    with ServerThread(create_app(engine, model_name=MODEL, allowed_hosts=["*"])) as srv:
        assert httpx.get(srv.url + "/health", headers={"Host": "any.example"}).status_code == 200
    with ServerThread(create_app(engine, model_name=MODEL, allowed_hosts=["api.example"])) as srv:
        assert httpx.get(srv.url + "/health", headers={"Host": "api.example:443"}).status_code == 200
        error(httpx.get(srv.url + "/health"), 400)


def test_serve_default_allowed_hosts():
    from puyu.serve.middleware import default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "::1", "localhost"]
    assert "myhost.lan" in default_allowed_hosts("myhost.lan")
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("::") is None


def test_serve_openai_sdk_still_works(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2).choices
    assert list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stream=True))


# ---- 12: API keys on /metrics, /docs, /openapi.json ---------------------------------------------------------------
def test_serve_api_keys_protect_metrics_docs_and_schema(engine):
    with ServerThread(create_app(engine, model_name=MODEL, api_keys=["k-1"])) as srv:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"):
            assert httpx.get(srv.url + path).status_code == 401, path
            assert httpx.get(srv.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert httpx.get(srv.url + path, headers={"Authorization": "Bearer k-1"}).status_code == 200, path
        assert httpx.get(srv.url + "/health").status_code == 200  # open for probes (documented)


def _prompt_hits(engine, srv, key: str, prompt: list[int], salt=None) -> int:
    """Prefix-cache blocks found for one completion of `prompt` sent with API key `key`."""
    before = engine.stats()["prefix_cache_hit_tokens"]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, **({"cache_salt": salt} if salt else {})}
    resp = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert resp.status_code == 200, resp.text
    return engine.stats()["prefix_cache_hit_tokens"] - before


def test_serve_prefix_cache_is_isolated_per_api_key(engine):
    """Another key's cached prompt is neither reused nor visible (no hit, so no TTFT gap and no /metrics hit)."""
    secret = list(range(100, 100 + 3 * 16 + 5))  # three full blocks of 16 and a tail
    with ServerThread(create_app(engine, model_name=MODEL, api_keys=["alice", "mallory"])) as srv:
        assert _prompt_hits(engine, srv, "alice", secret) == 0
        assert _prompt_hits(engine, srv, "mallory", secret) == 0  # alice's blocks stay hers
        assert _prompt_hits(engine, srv, "alice", secret) == 48  # but alice still reuses them
        assert _prompt_hits(engine, srv, "alice", secret, salt="project-b") == 0  # vLLM's cache_salt refines it
        assert _prompt_hits(engine, srv, "alice", secret, salt="project-b") == 48


def test_block_manager_shares_blocks_only_under_the_same_salt():
    from puyu.config import GenerationConfig
    from puyu.engine.block_manager import BlockManager
    from puyu.engine.sequence import Sequence

    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    tokens = list(range(1, 11))
    first = Sequence("a", tokens, GenerationConfig(cache_salt="t1"))
    bm.admit(first, bm.match_prefix(first))
    assert bm.allocate(first, len(tokens))
    first.num_computed = len(tokens)
    bm.register_full_blocks(first)
    for salt, expect in (("t1", 2), ("t2", 0), (None, 0)):
        seq = Sequence(f"b-{salt}", tokens, GenerationConfig(cache_salt=salt))
        assert len(bm.match_prefix(seq)) == expect, salt


# ---- 13: strict fields, framing, body read timeout ----------------------------------------------------------------
@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"max_tokens": "10"}, "max_tokens"),
    ("/v1/chat/completions", {"stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"n": 1.0}, "n"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/completions", {"prompt": [True]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2.0]}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "echo": "true"}, "echo"),
    ("/v1/completions", {"prompt": "Hi", "seed": "3"}, "seed"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
])
def test_serve_request_fields_are_not_coerced(server, path, extra, param):
    body = {"model": MODEL, **({"messages": MSGS} if "chat" in path else {}), **extra}
    err = error(post(server, path, body), 400)
    assert param in (err["param"] or "") or param in err["message"], err


def test_serve_content_length_with_transfer_encoding_is_400(server):
    body = b'{"model": "%s", "prompt": "Hi", "max_tokens": 2}' % MODEL.encode()
    chunked = hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    answer = raw_http(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"Content-Type: application/json\r\nContent-Length: 5\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_serve_slow_body_times_out_with_408(server):
    t0 = time.perf_counter()
    answer = raw_http(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"",
                      wait=10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.perf_counter() - t0 < 5  # body_timeout=1.0
    assert httpx.get(server.url + "/health").status_code == 200


def _recv_all(sock, wait: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or `wait` seconds), and when it closed."""
    sock.settimeout(wait)
    start, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except socket.timeout:
        return data, float("inf")
    return data, time.monotonic() - start


def _read_response(sock) -> bytes:
    """One whole HTTP response (headers and a Content-Length body) from a kept-alive connection."""
    sock.settimeout(20)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def test_serve_slow_headers_time_out_with_408(engine):
    """Slowloris: a client that trickles its request line and headers is cut off after the header deadline, on a
    fresh connection and on a kept-alive one; a normal request on the same server is unaffected."""
    from puyu.serve.api_server import uvicorn_options

    with ServerThread(create_app(engine, model_name=MODEL), **uvicorn_options(header_timeout=1.5)) as srv:
        fresh = socket.create_connection(("127.0.0.1", srv.port))
        fresh.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.5)
        fresh.sendall(b"X-Slow: 1\r\n")  # bytes keep coming, but the headers never end
        data, closed_after = _recv_all(fresh, 20)
        assert data.startswith(b"HTTP/1.1 408") and closed_after < 10, (data, closed_after)

        kept = socket.create_connection(("127.0.0.1", srv.port))
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = _read_response(kept)
        assert first.startswith(b"HTTP/1.1 200"), first
        time.sleep(2.0)  # idle longer than the header deadline: keep-alive (30 s) is what bounds idleness
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _read_response(kept).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\n")  # a second request that never finishes its headers
        data, closed_after = _recv_all(kept, 20)
        assert data.startswith(b"HTTP/1.1 408") and closed_after < 10, (data, closed_after)
        assert httpx.get(srv.url + "/health").status_code == 200
