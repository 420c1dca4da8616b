"""What `puyu bench` tells its user: a refused warm-up stops the run with the server's message, latency shows
progress, unsaved results are said to be unsaved, formulas only on request and only those that apply, a sweep ends
with a summary table, plot ticks sit at the swept values."""
from __future__ import annotations

import sys

import pytest
from bench_servers import Server, free_port, run_cli

from puyu.bench.metrics import FORMULAS
from puyu.bench.points import NOT_SAVED
from puyu.bench.runner import BenchAborted, check_warmup

ENGINE = ["--num-threads", "2", "--cache-max-entry-count", "64"]


@pytest.fixture(scope="module")
def puyu_server(internlm2_checkpoint, tmp_path_factory):
    port = free_port()
    cmd = [sys.executable, "-m", "puyu.cli", "serve", str(internlm2_checkpoint), "--server-port", str(port),
           "--model-name", "tiny", "--log-level", "warning", *ENGINE]
    with Server(cmd, port, tmp_path_factory.mktemp("serve") / "server.log", ready_path="/health") as server:
        server.wait_ready()
        yield server


def test_a_wrong_model_stops_after_the_warm_up_with_the_servers_message(puyu_server, internlm2_checkpoint,
                                                                          tmp_path):
    code, out, err = run_cli(["bench", "serve", "--base-url", puyu_server.base_url, "--model", "no-such-model",
                              "--tokenizer", str(internlm2_checkpoint), "--num-prompts", "4", "--input-len", "8",
                              "--output-len", "4", "--num-warmups", "2", "--no-progress",
                              "--result-dir", str(tmp_path / "res")])
    assert code == 2, out + err
    line = err.strip().splitlines()[-1]
    assert "refused (HTTP 404)" in line and "'no-such-model' does not exist" in line and "--model" in line
    assert "Successful requests" not in out and not (tmp_path / "res").exists()  # no empty report


def test_warm_up_check_stops_only_on_a_shared_lasting_refusal():
    nf = 'RuntimeError: HTTP 404: {"error": {"message": "no model x"}}'
    with pytest.raises(BenchAborted, match="no model x"):
        check_warmup([nf, nf], 2)
    check_warmup([nf], 2)  # one of two failed: measure
    check_warmup(["RuntimeError: HTTP 429: slow down"] * 2, 2)  # rate limits may pass
    check_warmup(["ConnectError: refused"] * 2, 2)  # not a refusal by the server: the run reports it
    check_warmup([], 0)


def test_latency_shows_progress_says_nothing_was_saved_and_formulas_on_request(internlm2_checkpoint):
    args = ["bench", "latency", str(internlm2_checkpoint), "--batch", "1", "2", "--input-len", "8",
            "--output-len", "3", "--rounds", "1", "--num-warmups", "0", *ENGINE]
    code, out, err = run_cli(args)
    assert code == 0, err
    assert "shape 1/2: batch 1" in err and "shape 2/2: batch 2" in err  # the progress bars, on stderr
    assert NOT_SAVED in out and "Formulas:" not in out
    code, out, _ = run_cli(args + ["--show-formulas", "--no-progress"])
    assert code == 0 and "Formulas:" in out
    shown = [f for f in FORMULAS if f in out]
    assert any(f.startswith("ttft =") for f in shown) and any(f.startswith("tpot =") for f in shown)
    assert not any(f.startswith(("itl =", "request_goodput", "max_concurrent")) for f in shown)  # not in the table


def test_a_sweep_prints_a_summary_table(internlm2_checkpoint):
    code, out, err = run_cli(["bench", "engine", str(internlm2_checkpoint), "--num-prompts", "4", "--input-len",
                              "8", "--output-len", "3", "--sweep", "concurrency=1,2", "--no-progress", *ENGINE])
    assert code == 0, err
    table = out[out.index("Sweep summary"):].splitlines()
    assert table[1].split()[:3] == ["concurrency", "ok", "fail"]
    assert [row.split()[:3] for row in table[3:5]] == [["1", "4", "0"], ["2", "4", "0"]]
    assert NOT_SAVED in out and "Formulas:" not in out


def test_plot_ticks_sit_at_the_swept_values():
    from puyu.bench.plots import _pyplot, load_figure

    plt = _pyplot()
    points = [{"max_concurrency": c, "output_throughput": 10.0 * c, "p99_ttft_ms": 1.0, "p99_tpot_ms": 2.0}
              for c in (1, 3, 12)]
    fig = load_figure(plt, {"run": points}, "max_concurrency")
    try:
        for ax in fig.axes:
            assert list(ax.get_xticks()) == [1.0, 3.0, 12.0]
            assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3", "12"]
    finally:
        plt.close(fig)
