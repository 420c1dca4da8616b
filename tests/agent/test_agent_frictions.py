"""What an agent run tells its user: an answer given without running code says so, python the model wrote outside
an interpreter call is flagged as not executed, the transcript holds each prompt in full (tool instructions
included), and the file turn spells the size out so it is not read as data. Real sandbox, recorded model replies."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lagent")

from puyu.agent.agent import count_python_blocks  # noqa: E402
from puyu.agent.replay import ReplayModel  # noqa: E402
from puyu.agent.runner import RunConfig, file_message, run_analysis  # noqa: E402

DATA = "city,temp\nShanghai,25\n"
CALL = ("Counting.<|action_start|><|interpreter|>\n```python\nprint(len(open('t.csv').read().splitlines()) - 1)\n"
        "```<|action_end|>\n")
PRETEND = "Here is how:\n```python\nprint(1 + 1)\n```\nIt prints 2, so the answer is 2.<|im_end|>"


@pytest.fixture()
def csv(tmp_path) -> Path:
    path = tmp_path / "t.csv"
    path.write_text(DATA)
    return path


def run(replies: list[str], csv: Path, tmp_path: Path, name: str):
    result = run_analysis(ReplayModel(replies), "How many rows?", [csv], tmp_path / name, RunConfig(max_turn=3))
    events = [json.loads(line) for line in (Path(result.run_dir) / "transcript.jsonl").read_text().splitlines()]
    return result, events


def test_an_answer_without_code_says_so_and_unrun_python_is_flagged(csv, tmp_path):
    result, events = run([PRETEND], csv, tmp_path, "pretend")
    assert result.status == "answered" and result.code_cells == 0 and result.unexecuted_blocks == 1
    assert result.summary.startswith("answered without running code") and "not executed" in result.summary
    assert [e["event"] for e in events].count("unexecuted_code") == 1
    report = (Path(result.run_dir) / "report.md").read_text()
    assert "answered without running code" in report and "Not executed" in report
    saved = json.loads((Path(result.run_dir) / "result.json").read_text())
    assert saved["summary"] == result.summary


def test_an_answer_after_running_code_is_plainly_answered(csv, tmp_path):
    result, events = run([CALL, "There is 1 row.<|im_end|>"], csv, tmp_path, "ran")
    assert result.code_cells == 1 and result.summary == "answered"
    cell = next(e for e in events if e["event"] == "cell")
    assert cell["output"].strip() == "1"


def test_the_transcript_holds_each_prompt_with_the_tool_instructions(csv, tmp_path):
    _, events = run([CALL, "There is 1 row.<|im_end|>"], csv, tmp_path, "prompts")
    prompts = [e for e in events if e["event"] == "prompt"]
    models = [e for e in events if e["event"] == "model"]
    assert [p["turn"] for p in prompts] == [m["turn"] for m in models] == [1, 2]
    first = prompts[0]["messages"]
    system = "\n".join(str(m["content"]) for m in first if m["role"] == "system")
    assert "jupyter" in system.lower() and "python" in system.lower()  # the tool instructions the model saw
    assert any(m.get("name") == "file" and "t.csv" in m["content"] for m in first)
    assert len(prompts[1]["messages"]) > len(first)  # the second turn carries the call and its output


def test_the_file_turn_spells_the_size_out(csv):
    info = json.loads(file_message([csv])["content"])
    assert info == [{"path": "t.csv", "size": f"{len(DATA)} bytes on disk"}]


def test_python_blocks_are_counted():
    assert count_python_blocks(PRETEND) == 1 and count_python_blocks("```py\nx\n```\n~~~python\ny\n~~~") == 2
    assert count_python_blocks("plain text, `inline` code and ```bash\nls\n```") == 0
