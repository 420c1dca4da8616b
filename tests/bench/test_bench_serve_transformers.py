"""`puyu bench serve` against a second, different OpenAI-compatible server (`transformers serve` with a tiny Llama
checkpoint, offline): nothing puyu-specific on the wire. Also: server-side rejections and dead servers are counted
as failed requests with their errors kept, and the JSON, JSONL and plots are written."""
from __future__ import annotations

import json
import shutil

import pytest
from bench_servers import VENV_BIN, Server, free_port, offline_env, run_cli, run_puyu

# transformers serve rejects `ignore_eos` (422); its own `generation_config` field with eos_token_id -1 (no EOS)
# forces the length instead.
TF_EXTRA = json.dumps({"generation_config": json.dumps({"do_sample": False, "eos_token_id": -1})})
VLLM_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "output_throughput", "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
             "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
             "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms", "input_lens", "output_lens")


@pytest.fixture(scope="module")
def tf_server(checkpoint_factory, tmp_path_factory):
    exe = VENV_BIN / "transformers"
    if not exe.exists():
        exe = shutil.which("transformers")
    assert exe, "the transformers CLI is part of the test environment"
    model = checkpoint_factory("llama", "fp16")
    port = free_port()
    cmd = [str(exe), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    work = tmp_path_factory.mktemp("tf-serve")
    # transformers serve lists /v1/models from the HF cache and fails where that folder does not exist yet
    # (a fresh machine): give it an existing, empty one
    (work / "hf-cache").mkdir()
    env = offline_env(HF_HUB_CACHE=str(work / "hf-cache"))
    with Server(cmd, port, work / "server.log", env=env) as server:
        server.wait_ready()
        yield server, model


def bench_args(base_url, model, out_dir, label, *extra):
    return ["bench", "serve", "--base-url", base_url, "--model", str(model), "--num-prompts", "6",
            "--input-len", "24", "--output-len", "8", "--num-warmups", "1", "--result-dir", str(out_dir),
            "--label", label, "--no-progress", "--no-ignore-eos", "--extra-body", TF_EXTRA, *extra]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chat_run_writes_summary_requests_and_plot(tf_server, tmp_path):
    server, model = tf_server
    proc = run_puyu(bench_args(server.base_url, model, tmp_path, "tf-chat", "--max-concurrency", "2",
                               "--goodput", "ttft:600000", "tpot:600000", "--show-formulas"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + server.log_tail()
    assert "Formulas:" in proc.stdout and "tpot = (e2el - ttft) / (output_tokens - 1)" in proc.stdout
    summary = json.loads((tmp_path / "tf-chat.json").read_text())
    for key in VLLM_KEYS:
        assert key in summary, key
    assert summary["completed"] == 6 and summary["failed"] == 0 and summary["errors"] == []
    assert summary["backend"] == "openai-chat" and summary["max_concurrency"] == 2
    assert 1 <= summary["max_concurrent_requests"] <= 2
    assert summary["request_goodput"] == pytest.approx(summary["request_throughput"])
    assert summary["input_lens"] == [24] * 6  # token-exact prompts
    assert summary["output_lens"] == [8] * 6 and summary["total_output_tokens"] == 48
    env = summary["environment"]
    assert env["versions"]["transformers"] and env["cpu_count"] and "bench serve" in env["command"]
    assert "git_commit" in env and summary["config"]["client"]["extra_body"]
    rows = read_jsonl(tmp_path / "tf-chat.requests.jsonl")
    assert len(rows) == 6 and all(r["success"] for r in rows)
    for r in rows:  # per-chunk counts agree with the server's usage total
        assert sum(n for _, n in r["chunks"]) == r["output_tokens"]
        assert r["ttft"] > 0 and r["e2el"] >= r["ttft"] and r["server_prompt_tokens"] > r["prompt_len"]
    assert (tmp_path / "tf-chat.cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_completions_sweep_writes_sweep_files(tf_server, tmp_path):
    server, model = tf_server
    code, out, err = run_cli(bench_args(server.base_url, model, tmp_path, "tf-cmpl", "--endpoint", "completions",
                                        "--sweep", "concurrency=1,3"))
    assert code == 0, out[-2000:] + err[-2000:] + server.log_tail()
    sweep = json.loads((tmp_path / "tf-cmpl.sweep.json").read_text())
    assert [p["max_concurrency"] for p in sweep["points"]] == [1, 3]
    assert all(p["completed"] == 6 for p in sweep["points"])
    assert sweep["points"][0]["max_concurrent_requests"] == 1
    for name in ("tf-cmpl-c1.json", "tf-cmpl-c3.json", "tf-cmpl-c3.requests.jsonl", "tf-cmpl.sweep.png"):
        assert (tmp_path / name).exists(), name
    code, out, err = run_cli(["bench", "compare", str(tmp_path / "tf-cmpl-c1.json"), str(tmp_path / "tf-cmpl-c3.json"),
                              "--plot", str(tmp_path / "cmp.png"), "--show-formulas"])
    assert code == 0, err
    assert "tf-cmpl-c3 / tf-cmpl-c1" in out and "output tok/s" in out and "Formulas:" in out
    assert (tmp_path / "cmp.png").exists()


def test_server_rejections_are_failed_requests_with_their_error(tf_server, tmp_path):
    server, model = tf_server
    args = bench_args(server.base_url, model, tmp_path, "tf-422", "--num-warmups", "0")
    args.remove("--no-ignore-eos")  # transformers serve answers 422 to the unknown `ignore_eos` field
    code, _, _ = run_cli(args)
    assert code == 1
    summary = json.loads((tmp_path / "tf-422.json").read_text())
    assert summary["completed"] == 0 and summary["failed"] == 6
    assert summary["errors"][0]["count"] == 6 and "HTTP 422" in summary["errors"][0]["error"]
    assert "ignore_eos" in summary["errors"][0]["error"]
    rows = read_jsonl(tmp_path / "tf-422.requests.jsonl")
    assert len(rows) == 6 and all(not r["success"] and "HTTP 422" in r["error"] for r in rows)


def test_dead_server_is_reported_not_dropped(tf_server, tmp_path):
    _, model = tf_server
    code, _, _ = run_cli(bench_args(f"http://127.0.0.1:{free_port()}", model, tmp_path, "dead", "--num-warmups", "0",
                                    "--no-plots"))
    assert code == 1
    summary = json.loads((tmp_path / "dead.json").read_text())
    assert summary["failed"] == 6 and "ConnectError" in summary["errors"][0]["error"]
    assert not (tmp_path / "dead.cdf.png").exists()
