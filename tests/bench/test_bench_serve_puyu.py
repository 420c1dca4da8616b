"""`puyu bench serve` against a live `puyu serve` on 127.0.0.1 (tiny InternLM2 checkpoint)."""
from __future__ import annotations

import json
import sys

import pytest
from bench_servers import Server, free_port, run_cli

from puyu.bench.datasets import write_sharegpt_file

API_KEY = "bench-test-key"


@pytest.fixture(scope="module")
def puyu_server(internlm2_checkpoint, tmp_path_factory):
    port = free_port()
    cmd = [sys.executable, "-m", "puyu.cli", "serve", str(internlm2_checkpoint), "--server-port", str(port),
           "--model-name", "tiny-internlm2", "--api-keys", API_KEY, "--num-threads", "2", "--log-level", "warning",
           "--cache-max-entry-count", "64"]  # 64 KV blocks, not a fraction of the shared machine's RAM
    with Server(cmd, port, tmp_path_factory.mktemp("puyu-serve") / "server.log", ready_path="/health") as server:
        server.wait_ready()
        yield server, internlm2_checkpoint


def args_for(server, model_dir, out_dir, label, *extra):
    return ["bench", "serve", "--base-url", server.base_url + "/v1", "--model", "tiny-internlm2",
            "--tokenizer", str(model_dir), "--api-key", API_KEY, "--result-dir", str(out_dir), "--label", label,
            "--no-progress", *extra]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chat_random_forced_lengths(puyu_server, tmp_path):
    server, model = puyu_server
    code, out, err = run_cli(args_for(server, model, tmp_path, "puyu-chat", "--num-prompts", "8", "--input-len", "32",
                                      "--output-len", "12", "--max-concurrency", "4", "--percentiles", "50,99.9"))
    assert code == 0, out[-2000:] + err + server.log_tail()
    s = json.loads((tmp_path / "puyu-chat.json").read_text())
    assert s["completed"] == 8 and s["failed"] == 0
    assert s["output_lens"] == [12] * 8  # ignore_eos forces the length
    assert s["total_output_tokens"] == 96 and "p99.9_ttft_ms" in s and "P99.9 TTFT" in out
    for r in rows(tmp_path / "puyu-chat.requests.jsonl"):
        assert r["finish_reason"] == "length"
        assert sum(n for _, n in r["chunks"]) == 12
        assert r["server_prompt_tokens"] > r["prompt_len"] == 32  # the chat template adds tokens
        assert r["tpot"] == pytest.approx((r["e2el"] - r["ttft"]) / 11)


def test_completions_sharegpt_poisson_with_goodput(puyu_server, tmp_path):
    server, model = puyu_server
    data = write_sharegpt_file(tmp_path / "sharegpt.json", num_conversations=40, seed=2)
    code, out, err = run_cli(args_for(server, model, tmp_path, "puyu-sg", "--endpoint", "completions",
                                      "--dataset", "sharegpt", "--dataset-path", str(data), "--num-prompts", "8",
                                      "--output-len", "6", "--request-rate", "50", "--arrival", "gamma",
                                      "--burstiness", "0.5", "--goodput", "ttft:600000", "e2el:600000"))
    assert code == 0, out[-2000:] + err + server.log_tail()
    s = json.loads((tmp_path / "puyu-sg.json").read_text())
    assert s["completed"] == 8 and s["dataset"] == "sharegpt" and s["arrival"] == "gamma"
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])
    assert s["output_lens"] == [6] * 8 and len(set(s["input_lens"])) > 1


def test_wrong_api_key_is_a_kept_error(puyu_server, tmp_path):
    server, model = puyu_server
    args = args_for(server, model, tmp_path, "puyu-401", "--num-prompts", "3", "--input-len", "8",
                    "--output-len", "4", "--num-warmups", "0")
    args[args.index(API_KEY)] = "wrong-key"
    code, _, _ = run_cli(args)
    assert code == 1
    s = json.loads((tmp_path / "puyu-401.json").read_text())
    assert s["failed"] == 3 and "HTTP 401" in s["errors"][0]["error"]
