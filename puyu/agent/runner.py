"""One analysis run and its folder.

    RUN/transcript.jsonl  every event: run start, model turns (text, timing, usage), calls, code cells (code,
                          output, error, figures, timing), protocol errors, the answer, run end
    RUN/work/             the interpreter's working directory: copies of the input files and what the code wrote
    RUN/figures/*.png     the figures the code produced
    RUN/report.md         question, answer, then every step with its code, output and figures inline
    RUN/result.json       the summary (status, answer, turns, tokens, time, isolation in force)
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from lagent.actions import ActionExecutor
from lagent.llms import BaseModel

from .agent import PuyuAgent
from .interpreter import SandboxInterpreter
from .report import write_report
from .sandbox import CellResult, Sandbox, SandboxConfig, copy_input_files


@dataclass
class RunConfig:
    max_turn: int = 10
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    observation_chars: int = 4000  # of a cell's output shown to the model (the transcript keeps the whole output)

    def __post_init__(self) -> None:
        if not isinstance(self.max_turn, int) or self.max_turn < 1:
            raise ValueError(f"max_turn: must be a positive integer, got {self.max_turn!r}")
        if not isinstance(self.observation_chars, int) or self.observation_chars < 200:
            raise ValueError(f"observation_chars: must be an integer >= 200, got {self.observation_chars!r}")


@dataclass
class RunResult:
    run_dir: str
    status: str  # answered | max_turns | model_error
    answer: str
    turns: int
    duration_s: float
    usage: dict
    figures: list[str]
    error: Optional[str] = None
    task_id: Optional[str] = None
    code_cells: int = 0  # cells the interpreter ran
    unexecuted_blocks: int = 0  # python blocks the model wrote outside an interpreter call (never run)

    @property
    def summary(self) -> str:
        """The status as a user reads it: 'answered without running code' says the answer is the model's own
        claim, not a computed result."""
        status = self.status
        if status == "answered" and not self.code_cells:
            status = "answered without running code"
        if self.unexecuted_blocks:
            status += f" ({self.unexecuted_blocks} python block(s) in the text not executed)"
        return status


class Transcript:
    """Append-only JSONL writer; every event gets `t`, seconds since the run started."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.monotonic()
        self.events: list[dict] = []
        path.write_text("")

    def __call__(self, event: dict) -> None:
        event = {"t": round(time.monotonic() - self.start, 3), **event}
        self.events.append(event)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(event, ensure_ascii=False) + "\n")


def file_message(copies: list[Path]) -> dict:
    """InternLM2's file upload turn: `<|im_start|>user name=file` with the paths (relative to the working dir).
    The size is spelled out as the file's size on disk ('25 bytes on disk', not '25B'): a small model took a bare
    '25B' for a value in the data."""
    info = [{"path": p.name, "size": _human_size(p.stat().st_size)} for p in copies]
    return dict(role="user", name="file", content=json.dumps(info, ensure_ascii=False))


def _human_size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes on disk"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit} on disk"
    return f"{size:.1f} GiB on disk"


def _file_record(p: Path) -> dict:
    return {"name": p.name, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def run_analysis(llm: BaseModel, question: str, files: Sequence[str | Path], run_dir: str | Path,
                 config: Optional[RunConfig] = None, task_id: Optional[str] = None, **gen_params) -> RunResult:
    """Run one question over the files with a fresh sandbox; writes the run folder and returns its summary."""
    config = config or RunConfig()
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question: must be a non-empty string")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    work, figures = run_dir / "work", run_dir / "figures"
    work.mkdir(exist_ok=True)
    copies = copy_input_files(files, work)
    transcript = Transcript(run_dir / "transcript.jsonl")
    start = time.monotonic()
    with Sandbox(work, figures, config.sandbox) as sandbox:
        transcript({"event": "run_start", "task_id": task_id, "question": question, "model": llm.path,
                    "files": [_file_record(p) for p in copies], "isolation": sandbox.isolation,
                    "config": asdict(config), "gen_params": gen_params})

        def on_cell(code: str, result: CellResult) -> None:
            cell = result.to_dict()
            cell["figures"] = [str(Path(f).relative_to(run_dir)) for f in result.figures]
            transcript({"event": "cell", "code": code, **cell})

        interpreter = ActionExecutor([SandboxInterpreter(sandbox, on_cell, config.observation_chars)])
        agent = PuyuAgent(llm, interpreter_executor=interpreter, max_turn=config.max_turn, recorder=transcript)
        messages = [dict(role="user", content=question)] + ([file_message(copies)] if copies else [])
        ret = agent.chat(messages, **gen_params)
    result = _summarise(transcript.events, ret, run_dir, time.monotonic() - start, task_id)
    summary = {**asdict(result), "summary": result.summary}
    transcript({"event": "run_end", **summary})
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    write_report(run_dir / "report.md", transcript.events, result)
    return result


def _summarise(events: list[dict], ret, run_dir: Path, duration: float, task_id: Optional[str]) -> RunResult:
    usage: dict = {}
    for e in events:
        for key, value in (e.get("usage") or {}).items():
            if isinstance(value, (int, float)):
                usage[key] = usage.get(key, 0) + value
    turns = sum(1 for e in events if e["event"] in ("model", "model_error"))
    figures = [f for e in events if e["event"] == "cell" for f in e["figures"]]
    if any(e["event"] == "model_error" for e in events):
        status = "model_error"
    elif any(e["event"] == "answer" for e in events):
        status = "answered"
    else:
        status = "max_turns"
    cells = sum(1 for e in events if e["event"] == "cell")
    unexecuted = sum(e["blocks"] for e in events if e["event"] == "unexecuted_code")
    return RunResult(str(run_dir), status, ret.response or "", turns, round(duration, 3), usage, figures,
                     ret.errmsg, task_id, cells, unexecuted)
