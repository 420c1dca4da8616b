"""The Markdown report of a run: the answer first, then every step with code, output and figures inline."""
from __future__ import annotations

import re
from pathlib import Path

from .protocol import split_calls

_SPECIAL = re.compile(r"<\|(?:action_start|action_end|plugin|interpreter|im_start|im_end)\|>")


def fence(text: str, lang: str = "") -> str:
    """A code block whose fence is longer than any backtick run inside the text."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def clean(text: str) -> str:
    return _SPECIAL.sub("", text).strip()


def _usage_line(usage: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in usage.items()) or "not reported"


def _render_event(e: dict) -> list[str]:
    kind = e["event"]
    if kind == "model":
        thought, _ = split_calls(e["text"])
        head = f"### Turn {e['turn']} ({e['duration_s']} s)"
        return [head, clean(thought)] if clean(thought) else [head]
    if kind == "cell":
        out = [fence(e["code"], "python"), f"Result: **{e['status']}** in {e['duration_s']} s"]
        if e["output"].strip():
            out.append(fence(e["output"]))
        if e["error"] and e["error"] not in e["output"]:
            out.append(f"Error: `{e['error']}`")
        out += [f"![{Path(f).name}]({f})" for f in e["figures"]]
        return out
    if kind == "action" and e["channel"] == "plugin":
        return [f"Tool call `{e['name']}` with `{e['parameters']}`:", fence(e["response"])]
    if kind == "action" and e.get("ignored_calls"):
        return [f"_{e['ignored_calls']} further call(s) in this reply were not executed._"]
    if kind == "protocol_error":
        return [f"Protocol error, told to the model: _{e['problem']}_"]
    if kind == "model_error":
        return [f"Model error: `{e['message']}`"]
    if kind == "unexecuted_code":
        return [f"_Not executed: {e['message']}._"]
    if kind == "max_turns":
        return [f"**{e['message']}**"]
    return []


def write_report(path: Path, events: list[dict], result) -> None:
    start = next(e for e in events if e["event"] == "run_start")
    lines = ["# Agent run", "", f"**Question:** {start['question']}", ""]
    if start["files"]:
        lines += ["**Files:** " + ", ".join(f"`{f['name']}` ({f['bytes']} bytes)" for f in start["files"]), ""]
    lines += [f"**Status:** {result.summary}, {result.turns} model turn(s), {result.duration_s} s; "
              f"usage: {_usage_line(result.usage)}", "", "## Answer", "",
              clean(result.answer) or f"_No answer: {result.error or 'the run ended without one'}._", ""]
    if result.figures:
        lines += ["## Figures", ""] + [f"![{Path(f).name}]({f})" for f in result.figures] + [""]
    lines += ["## Steps", ""]
    for e in events:
        for block in _render_event(e):
            lines += [block, ""]
    iso = start["isolation"]
    lines += ["## Run details", "", f"- model: `{start['model']}`",
              f"- sandbox: network {iso.get('network')}, filesystem {iso.get('filesystem')}, "
              f"seccomp {'on' if iso.get('seccomp') else 'off'}, "
              f"memory limit {iso.get('memory_bytes', 0) // 2**20} MiB", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
