"""The bench client counts what the server did, not its own artefacts: a stream that finishes without visible text
is a success reported as an empty output (TTFT at the first chunk with choices, as vLLM counts it); a request on a
keep-alive connection the server had closed (nothing received) is sent again; and without --tokenizer the server's
own /tokenize counts the tokens, or the run stops at once in one line. Real servers on 127.0.0.1: `puyu serve`
(subprocess) and a streaming server that drops reused connections (keepalive_server)."""
from __future__ import annotations

import json
import sys

import pytest
from bench_servers import Server, free_port, run_cli
from keepalive_server import WORDS, KeepAliveClosingServer

from puyu.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def puyu_server(internlm2_checkpoint, tmp_path_factory):
    port = free_port()
    cmd = [sys.executable, "-m", "puyu.cli", "serve", str(internlm2_checkpoint), "--server-port", str(port),
           "--model-name", "tiny-internlm2", "--num-threads", "2", "--log-level", "warning",
           "--cache-max-entry-count", "64"]
    with Server(cmd, port, tmp_path_factory.mktemp("puyu-serve") / "server.log", ready_path="/health") as server:
        server.wait_ready()
        yield server, internlm2_checkpoint


def bench(base_url, out_dir, label, *extra):
    return ["bench", "serve", "--base-url", base_url + "/v1", "--model", "tiny-internlm2", "--result-dir",
            str(out_dir), "--label", label, "--no-progress", "--num-warmups", "0", *extra]


def test_empty_streams_are_successes_counted_apart(puyu_server, tmp_path):
    """EOS pushed to the top: every reply ends at once with finish_reason stop and no text."""
    server, model = puyu_server
    eos = Tokenizer(model).stop_token_ids[0]
    code, out, err = run_cli(bench(server.base_url, tmp_path, "empty", "--tokenizer", str(model), "--num-prompts",
                                   "6", "--input-len", "16", "--output-len", "8", "--no-ignore-eos",
                                   "--extra-body", json.dumps({"logit_bias": {str(eos): 100}})))
    assert code == 0, out[-2000:] + err + server.log_tail()
    s = json.loads((tmp_path / "empty.json").read_text())
    assert s["completed"] == 6 and s["failed"] == 0 and s["empty_outputs"] == 6
    assert "Successful requests with empty output:" in out
    for r in [json.loads(line) for line in (tmp_path / "empty.requests.jsonl").read_text().splitlines()]:
        assert r["finish_reason"] == "stop" and r["ttft"] is not None and r["ttft"] > 0


def test_reused_connections_the_server_closed_are_sent_again(internlm2_checkpoint, tmp_path):
    with KeepAliveClosingServer() as server:
        code, out, err = run_cli(bench(server.base_url, tmp_path, "keepalive", "--tokenizer",
                                       str(internlm2_checkpoint), "--num-prompts", "12", "--input-len", "8",
                                       "--output-len", "4", "--max-concurrency", "2"))
        assert code == 0, out[-2000:] + err
        s = json.loads((tmp_path / "keepalive.json").read_text())
        assert s["completed"] == 12 and s["failed"] == 0
        assert s["total_output_tokens"] == 12 * len(WORDS)
        assert server.stats["dropped"] > 0  # the client did reuse connections the server then dropped


def test_no_tokenizer_uses_the_servers_tokenize(puyu_server, tmp_path):
    server, model = puyu_server
    code, out, err = run_cli(bench(server.base_url, tmp_path, "remote", "--num-prompts", "4", "--input-len", "20",
                                   "--output-len", "5"))
    assert code == 0, out[-2000:] + err + server.log_tail()
    s = json.loads((tmp_path / "remote.json").read_text())
    assert s["completed"] == 4 and s["tokenizer_id"].endswith("/tokenize")
    assert s["input_lens"] == [20] * 4 and s["output_lens"] == [5] * 4
    for r in [json.loads(line) for line in (tmp_path / "remote.requests.jsonl").read_text().splitlines()]:
        assert sum(n for _, n in r["chunks"]) == 5


def test_no_tokenizer_and_no_tokenize_endpoint_fails_in_one_line(tmp_path):
    with KeepAliveClosingServer() as server:  # no /tokenize (404), and the model is not on disk
        code, out, err = run_cli(["bench", "serve", "--base-url", server.base_url, "--model", "some-org/no-such-model",
                                  "--result-dir", str(tmp_path), "--no-progress", "--num-prompts", "2"])
    assert code != 0
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and "--tokenizer" in lines[0], out + err
