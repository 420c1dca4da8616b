"""`puyu bench engine` and `puyu bench latency` in-process on the real engine; CLI errors are one line, exit 2."""
from __future__ import annotations

import json

import pytest
from bench_servers import run_cli


def test_engine_bench_exact_token_counts(internlm2_checkpoint, tmp_path):
    code, out, err = run_cli(["bench", "engine", str(internlm2_checkpoint), "--num-prompts", "6", "--input-len", "20",
                              "--output-len", "7", "--concurrency", "3", "--result-dir", str(tmp_path),
                              "--label", "eng", "--no-progress", "--num-threads", "2", "--cache-max-entry-count", "64"])
    assert code == 0, out[-2000:] + err
    s = json.loads((tmp_path / "eng.json").read_text())
    assert s["backend"] == "puyu-engine" and s["completed"] == 6 and s["max_concurrency"] == 3
    assert s["input_lens"] == [20] * 6 and s["output_lens"] == [7] * 6
    assert s["engine_stats"]["tokens_generated"] >= 6 * 7
    assert s["config"]["engine"]["num_threads"] == 2
    assert 1 <= s["max_concurrent_requests"] <= 3
    lines = (tmp_path / "eng.requests.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(sum(n for _, n in json.loads(line)["chunks"]) == 7 for line in lines)
    assert (tmp_path / "eng.cdf.png").exists()


def test_engine_bench_shared_prefix_hits_the_prefix_cache(internlm2_checkpoint, tmp_path):
    code, out, err = run_cli(["bench", "engine", str(internlm2_checkpoint), "--dataset", "shared-prefix",
                              "--num-prompts", "6", "--num-groups", "1", "--prefix-len", "160", "--input-len", "8",
                              "--output-len", "2", "--concurrency", "1", "--cache-block-seq-len", "16",
                              "--cache-max-entry-count", "64",
                              "--result-dir", str(tmp_path), "--label", "pfx", "--no-progress", "--no-plots"])
    assert code == 0, out[-2000:] + err
    stats = json.loads((tmp_path / "pfx.json").read_text())["engine_stats"]
    assert stats["prefix_cache_hits"] > 0


@pytest.mark.parametrize("flag", ["--no-enable-prefix-caching", "--disable-prefix-caching"])
def test_engine_bench_takes_the_serve_engine_options(internlm2_checkpoint, tmp_path, flag):
    """The engine options are `puyu serve`'s (README); the bench's earlier --disable-prefix-caching still works."""
    code, out, err = run_cli(["bench", "engine", str(internlm2_checkpoint), "--dataset", "shared-prefix",
                              "--num-prompts", "4", "--num-groups", "1", "--prefix-len", "160", "--input-len", "8",
                              "--output-len", "2", "--concurrency", "1", "--cache-block-seq-len", "16",
                              "--cache-max-entry-count", "64", flag,
                              "--result-dir", str(tmp_path), "--label", "nopfx", "--no-progress", "--no-plots"])
    assert code == 0, out[-2000:] + err
    summary = json.loads((tmp_path / "nopfx.json").read_text())
    assert summary["config"]["engine"]["enable_prefix_caching"] is False
    assert summary["engine_stats"]["prefix_cache_hits"] == 0


def test_latency_sweep(internlm2_checkpoint, tmp_path):
    code, out, err = run_cli(["bench", "latency", str(internlm2_checkpoint), "--input-len", "16", "--output-len", "5",
                              "--batch", "1", "3", "--rounds", "2", "--result-dir", str(tmp_path), "--label", "lat",
                              "--cache-max-entry-count", "64", "--show-formulas", "--no-progress"])
    assert code == 0, out[-2000:] + err
    data = json.loads((tmp_path / "lat.json").read_text())
    assert [(r["batch"], r["completed"], r["failed"]) for r in data["rows"]] == [(1, 2, 0), (3, 6, 0)]
    assert all(r["mean_ttft_ms"] > 0 and r["mean_tpot_ms"] > 0 for r in data["rows"])
    assert "ttft = t_first_content_chunk - t_send" in out
    assert (tmp_path / "lat.png").exists()


@pytest.mark.parametrize("args,message", [
    (["bench", "serve", "--base-url", "localhost:1", "--model", "m"], "--base-url"),
    (["bench", "serve", "--base-url", "http://x", "--model", "m", "--goodput", "ttft"], "--goodput"),
    (["bench", "serve", "--base-url", "http://x", "--model", "m", "--sweep", "batch=1"], "--sweep"),
    (["bench", "serve", "--base-url", "http://x", "--model", "m", "--dataset", "sharegpt"], "--dataset-path"),
    (["bench", "serve", "--base-url", "http://x", "--model", "m", "--extra-body", "[1]"], "--extra-body"),
    (["bench", "compare", "a-missing.json", "b-missing.json"], "a-missing.json"),
])
def test_cli_errors_are_one_line(args, message):
    code, out, err = run_cli(args)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
