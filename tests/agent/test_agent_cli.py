"""End to end: `puyu agent run` and `puyu agent batch` as real subprocesses.

Content comes from a recorded model (replay) where the test needs meaningful code and answers; the interpreter,
protocol, run folder and scoring are the real ones. The same commands then run through the real engine (a model
directory) and the real server (a URL), where the tiny model's replies are noise but every part must still work.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from puyu.cli import main

DATA = "city,temp\nShanghai,25\nBeijing,18\nShenzhen,29\n"
ANALYSE = ("Let me look at the data.<|action_start|><|interpreter|>\n```python\nimport pandas as pd\n"
           "import matplotlib.pyplot as plt\ndf = pd.read_csv('weather.csv')\nprint(df.temp.mean())\n"
           "df.plot.bar(x='city', y='temp')\nplt.show()\n```<|action_end|>\n")
BROKEN = 'Now a tool.<|action_start|><|plugin|>\n{"name": "x", oops}<|action_end|>\n'
ANSWER = "The mean temperature is @mean_temp[24.0] and the warmest city is @warmest[Shenzhen].<|im_end|>"


def puyu(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command as a separate process."""
    return subprocess.run([sys.executable, "-m", "puyu.cli", "agent", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture()
def puyu_here(monkeypatch, capsys):
    """The same command line through `puyu.cli.main` in this process (saves a torch import per call)."""
    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        rc = main(["agent", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)

    return run


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "transcript.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("agent-cli")
    (d / "weather.csv").write_text(DATA)
    return d


def test_agent_run_writes_the_run_folder(data_dir, puyu_here):
    (data_dir / "replay.json").write_text(json.dumps([ANALYSE, BROKEN, ANSWER]))
    p = puyu_here("run", "--model", "replay:replay.json", "--file", "weather.csv", "--out", "run1", "--timeout", "300",
             "Which city is warmest, and what is the mean temperature?", cwd=data_dir)
    assert p.returncode == 0, p.stderr
    run = data_dir / "run1"
    ev = events(run)
    kinds = [e["event"] for e in ev if e["event"] != "prompt"]  # each model turn's prompt: test_agent_frictions
    assert kinds == ["run_start", "model", "cell", "action", "model", "protocol_error", "model", "answer", "run_end"]
    start, cell = ev[0], next(e for e in ev if e["event"] == "cell")
    assert start["files"][0]["name"] == "weather.csv" and start["isolation"]["network"] != "open"
    assert cell["status"] == "ok" and cell["output"].startswith("24.0") and cell["duration_s"] >= 0
    assert all(isinstance(e["t"], float) for e in ev)
    png = run / cell["figures"][0]
    assert png.read_bytes()[:4] == b"\x89PNG"
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "answered" and "@mean_temp[24.0]" in result["answer"] and result["turns"] == 3
    report = (run / "report.md").read_text()
    assert "df = pd.read_csv('weather.csv')" in report and f"]({cell['figures'][0]})" in report
    assert "@warmest[Shenzhen]" in report and "Protocol error" in report
    assert (run / "work" / "weather.csv").read_text() == DATA and (data_dir / "weather.csv").read_text() == DATA


def test_agent_batch_scores_answers(data_dir, puyu_here):
    tasks = [
        {"id": "right", "question": "Mean and warmest?", "files": ["weather.csv"],
         "answers": {"mean_temp": "24", "warmest": "Shenzhen"}},
        {"id": "half", "question": "Mean and coldest?", "files": ["weather.csv"],
         "answers": "@mean_temp[24.000000001] @warmest[Beijing]"},
        {"id": 7, "question": "DABench style", "file_name": "weather.csv", "constraints": "Round to 1 decimal.",
         "format": "@mean_temp[value]", "common_answers": [["mean_temp", "23.9"]]},
        {"id": "unscored", "question": "Describe the data.", "files": []},
    ]
    (data_dir / "tasks.jsonl").write_text("\n".join(json.dumps(t) for t in tasks) + "\n")
    replies = {"right": [ANALYSE, ANSWER], "half": [ANSWER], "7": [ANSWER], "unscored": ["It has 3 rows."]}
    (data_dir / "replays.json").write_text(json.dumps(replies))
    p = puyu_here("batch", "tasks.jsonl", "--model", "replay:replays.json", "--out", "batch1", "--concurrency", "2",
             cwd=data_dir)
    assert p.returncode == 0, p.stderr
    out = data_dir / "batch1"
    assert "accuracy by question: 33.3%" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == 4 and summary["scored"] == 3 and summary["status"] == {"answered": 4}
    assert summary["accuracy"] == {"by_question": 0.3333, "proportional_by_sub_question": 0.5,
                                   "by_sub_question": 0.6}
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["right"]["correct"] and rows["half"]["correctness"] == {"mean_temp": True, "warmest": False}
    assert not rows["7"]["correct"] and "correct" not in rows["unscored"]
    assert "Round to 1 decimal." in events(Path(rows["7"]["run_dir"]))[0]["question"]
    md = (out / "summary.md").read_text()
    assert "accuracy by question: 33.3%" in md and "[report](runs/right/report.md)" in md


def test_batch_ids_that_clean_to_one_name_get_separate_folders(data_dir, puyu_here):
    """`a/b` and `a_b` used to share runs/a_b (one run's files overwrote the other's) and `..` ran in the batch
    folder itself: every id now gets its own folder inside runs/."""
    ids = ["a/b", "a_b", "..", "."]
    tasks = [{"id": i, "question": f"Say {n}.", "files": []} for n, i in enumerate(ids)]
    (data_dir / "clash.jsonl").write_text("\n".join(json.dumps(t) for t in tasks) + "\n")
    replies = {i: [f"Answer number {n}.<|im_end|>"] for n, i in enumerate(ids)}
    (data_dir / "clash-replays.json").write_text(json.dumps(replies))
    p = puyu_here("batch", "clash.jsonl", "--model", "replay:clash-replays.json", "--out", "clash", cwd=data_dir)
    assert p.returncode == 0, p.stderr
    runs = (data_dir / "clash" / "runs").resolve()
    rows = {r["id"]: r for r in map(json.loads, (data_dir / "clash" / "results.jsonl").read_text().splitlines())}
    dirs = [Path(rows[i]["run_dir"]).resolve() for i in ids]
    assert len(set(dirs)) == len(ids) and all(d.parent == runs for d in dirs), dirs
    assert Path(rows["a_b"]["run_dir"]).name == "a_b"  # a safe id keeps its name
    for n, (i, d) in enumerate(zip(ids, dirs)):
        result = json.loads((d / "result.json").read_text())
        assert result["answer"].startswith(f"Answer number {n}."), (i, result["answer"])


def test_bad_tasks_file_names_file_and_line(data_dir, puyu_here):
    (data_dir / "bad.jsonl").write_text('{"id": 1, "question": "ok"}\n{"id": 2}\n')
    p = puyu_here("batch", "bad.jsonl", "--model", "replay:replay.json", cwd=data_dir)
    assert p.returncode == 2 and "bad.jsonl:2: field 'question'" in p.stderr and "Traceback" not in p.stderr


def test_agent_run_through_the_engine(data_dir, im_end_checkpoint):
    p = puyu("run", "--model", str(im_end_checkpoint.path), "--file", "weather.csv", "--out", "engine-run",
             "--session-len", "2048", "--max-new-tokens", "24", "--max-turn", "2", "--timeout", "10",
             "What is the mean temperature?", cwd=data_dir)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr
    result = json.loads((data_dir / "engine-run" / "result.json").read_text())
    assert result["status"] in ("answered", "max_turns") and result["turns"] >= 1
    models = [e for e in events(data_dir / "engine-run") if e["event"] == "model"]
    assert models and all(0 < e["usage"]["completion_tokens"] <= 24 and e["usage"]["prompt_tokens"] > 100
                          for e in models)
    assert (data_dir / "engine-run" / "report.md").is_file()


def test_agent_batch_through_the_server(data_dir, server_url, puyu_here):
    tasks = [{"id": f"s{i}", "question": f"Question {i}?", "files": ["weather.csv"], "answers": {"x": "1"}}
             for i in range(2)]
    (data_dir / "server-tasks.jsonl").write_text("\n".join(json.dumps(t) for t in tasks))
    p = puyu_here("batch", "server-tasks.jsonl", "--model", server_url, "--out", "server-batch", "--concurrency", "2",
             "--max-new-tokens", "24", "--max-turn", "2", "--timeout", "10", cwd=data_dir)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr
    summary = json.loads((data_dir / "server-batch" / "summary.json").read_text())
    assert summary["tasks"] == 2 and set(summary["status"]) <= {"answered", "max_turns"}
    assert summary["accuracy"]["by_question"] == 0.0  # noise never matches @x[1]
    assert summary["usage"]["completion_tokens"] > 0 and summary["usage"]["prompt_tokens"] > 200
