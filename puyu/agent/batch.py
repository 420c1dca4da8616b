"""Many analysis runs from a tasks file, scored where a task has closed-form answers.

tasks.jsonl, one task per line (InfiAgent-DABench's question fields are accepted as they are):
    {"id": "t1", "question": "...", "files": ["data.csv"], "answers": {"mean_y": "4.33"}}
    - `files` (list) or `file_name` (str): paths relative to `data_dir` (default: the tasks file's folder)
    - `constraints`, `format`: appended to the question (DABench puts the `@name[value]` instructions there)
    - `answers` / `common_answers` / `answer`: labels (object, DABench `[[name, value], ...]`, or "@a[1] @b[2]")
Writes OUT/runs/<id>/ (one run folder per task), OUT/results.jsonl, OUT/summary.json and OUT/summary.md.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lagent.llms import BaseModel

from .runner import RunConfig, run_analysis
from .scoring import accuracies, normalise_labels, score_answer


@dataclass
class Task:
    id: str
    question: str
    files: list[Path] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)


def _task_from_record(rec: dict, where: str, data_dir: Path, line_no: int) -> Task:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field 'question' must be a non-empty string")
    for extra in ("constraints", "format"):
        if rec.get(extra):
            question += f"\n{rec[extra]}"
    names = rec.get("files", [rec["file_name"]] if "file_name" in rec else [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: field 'files' must be a list of paths")
    files = [data_dir / n for n in names]
    for f in files:
        if not f.is_file():
            raise ValueError(f"{where}: input file {f} does not exist")
    raw = rec.get("answers", rec.get("common_answers", rec.get("answer")))
    return Task(str(rec.get("id", line_no)), question, files, normalise_labels(raw, where))


def load_tasks(path: str | Path, data_dir: Optional[str | Path] = None) -> list[Task]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tasks file does not exist")
    base = Path(data_dir) if data_dir else path.parent
    tasks: list[Task] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        tasks.append(_task_from_record(rec, where, base, line_no))
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    ids = [t.id for t in tasks]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise ValueError(f"{path}: task id {dup!r} occurs more than once")
    return tasks


def folder_names(task_ids: list[str]) -> dict[str, str]:
    """A distinct, safe folder name under `runs/` for each task id: an id made only of letters, digits and `_.-`
    (not all dots) is its own name; any other id, or one whose name is taken, gets the cleaned id plus a hash of
    the id, so `a/b` and `a_b` never share a folder and `..` never leaves `runs/`."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for task_id in task_ids:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", task_id)[:80]
        if name != task_id or not name.strip(".") or name in taken:
            stem, salt = name.strip(".")[:60] or "task", 0
            while True:
                name = f"{stem}-{hashlib.sha256(f'{salt}/{task_id}'.encode()).hexdigest()[:10]}"
                if name not in taken:
                    break
                salt += 1
        names[task_id] = name
        taken.add(name)
    return names


def _run_one(task: Task, make_model: Callable[[Task], BaseModel], out: Path, config: RunConfig,
             gen_params: dict, folder: str) -> dict:
    start = time.monotonic()
    try:
        res = run_analysis(make_model(task), task.question, task.files, out / "runs" / folder,
                           config, task_id=task.id, **gen_params)
        row: dict[str, Any] = {"id": task.id, "status": res.status, "answer": res.answer, "turns": res.turns,
               "duration_s": res.duration_s, "usage": res.usage, "error": res.error, "run_dir": res.run_dir}
    except Exception as exc:  # one broken task must not end the batch
        row = {"id": task.id, "status": "failed", "answer": "", "turns": 0, "usage": {},
               "duration_s": round(time.monotonic() - start, 3), "error": f"{type(exc).__name__}: {exc}",
               "run_dir": None}
    if task.labels:
        row.update(score_answer(row["answer"], task.labels), labels=task.labels)
        row["correct"] = all(row["correctness"].values())
    return row


def run_batch(tasks: list[Task], make_model: Callable[[Task], BaseModel], out_dir: str | Path,
              config: Optional[RunConfig] = None, concurrency: int = 1, **gen_params) -> dict:
    """Run every task (up to `concurrency` at once, each with its own sandbox); returns the summary."""
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency: must be a positive integer, got {concurrency!r}")
    config = config or RunConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    folders = folder_names([t.id for t in tasks])
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        rows = list(pool.map(lambda t: _run_one(t, make_model, out, config, gen_params, folders[t.id]), tasks))
    with (out / "results.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = summarise(rows, time.monotonic() - start, concurrency)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (out / "summary.md").write_text(summary_markdown(summary, rows), encoding="utf-8")
    return summary


def summarise(rows: list[dict], wall_s: float, concurrency: int) -> dict:
    usage: dict = {}
    for row in rows:
        for k, v in row["usage"].items():
            usage[k] = usage.get(k, 0) + v
    statuses: dict = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    scored = [r for r in rows if "correctness" in r]
    return {"tasks": len(rows), "scored": len(scored), "status": statuses,
            "accuracy": accuracies(scored), "usage": usage,
            "usage_per_task": {k: round(v / len(rows), 1) for k, v in usage.items()},
            "mean_task_s": round(sum(r["duration_s"] for r in rows) / len(rows), 3),
            "wall_s": round(wall_s, 3), "concurrency": concurrency}


def summary_markdown(summary: dict, rows: list[dict]) -> str:
    acc = summary["accuracy"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = ["# Agent batch", "", f"{summary['tasks']} tasks ({summary['scored']} scored), "
             f"concurrency {summary['concurrency']}, wall time {summary['wall_s']} s, "
             f"mean {summary['mean_task_s']} s per task", "",
             f"- accuracy by question: {pct(acc['by_question'])}",
             f"- accuracy proportional by sub-question: {pct(acc['proportional_by_sub_question'])}",
             f"- accuracy by sub-question: {pct(acc['by_sub_question'])}",
             f"- status: {', '.join(f'{k} {v}' for k, v in summary['status'].items())}",
             f"- usage: {', '.join(f'{k} {v}' for k, v in summary['usage'].items()) or 'not reported'}", "",
             "| task | status | correct | turns | time (s) | usage | report |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        correct = "" if "correct" not in r else ("yes" if r["correct"] else
                                                 f"{sum(r['correctness'].values())}/{len(r['correctness'])}")
        usage = ", ".join(f"{k} {v}" for k, v in r["usage"].items())
        report = f"[report](runs/{Path(r['run_dir']).name}/report.md)" if r["run_dir"] else r["error"] or ""
        lines.append(f"| {r['id']} | {r['status']} | {correct} | {r['turns']} | {r['duration_s']} | {usage} | "
                     f"{report} |")
    return "\n".join(lines) + "\n"
