"""How the agent's transcript events look in the data-analysis tab: each event becomes chat messages
(thoughts, code cells, outputs, errors, figures inline, the answer), in Gradio's messages format."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..agent.protocol import split_calls
from ..agent.report import clean, fence

Message = dict[str, Any]


def _note(title: str, content: str) -> Message:
    """A step: a bold title over its content, always expanded (Gradio's metadata bubbles start collapsed)."""
    return {"role": "assistant", "content": f"**{title}**\n\n{content}"}


def _cell(e: dict, run_dir: Path) -> list[Message]:
    number = e.get("cell", "")
    out = [_note(f"Code · cell {number}", fence(e["code"], "python"))]
    text = (e.get("output") or "").rstrip()
    if e["status"] == "ok":
        out.append(_note(f"Output · cell {number} ({e['duration_s']} s)", fence(text or "[no output]")))
    else:
        error = e.get("error") or ""
        body = text if error and error in text else "\n".join(t for t in (text, error) if t)
        out.append(_note(f"Error · cell {number}: {e['status']}", fence(body or e["status"])))
    out += [{"role": "assistant", "content": {"path": str(run_dir / f), "alt_text": Path(f).name}}
            for f in e.get("figures") or []]
    return out


def render_event(e: dict, run_dir: Path) -> list[Message]:
    """The messages for one transcript event (none for bookkeeping events)."""
    kind = e.get("event")
    if kind == "run_start":
        files = ", ".join(f"`{f['name']}`" for f in e.get("files") or []) or "none"
        return [{"role": "user", "content": f"{e['question']}\n\nFiles: {files}"}]
    if kind == "model":
        thought, calls = split_calls(e["text"])
        if not calls:  # a final answer follows as its own event
            return []
        return [_note(f"Thought · turn {e['turn']} ({e['duration_s']} s)", clean(thought) or "(no thought)")]
    if kind == "cell":
        return _cell(e, run_dir)
    if kind == "action" and e.get("channel") == "plugin":
        return [_note(f"Tool `{e['name']}`", fence(str(e.get("response", ""))))]
    if kind == "protocol_error":
        return [_note("Protocol error (told to the model)", str(e.get("problem", "")))]
    if kind == "model_error":
        return [_note("Model error", str(e.get("message", "")))]
    if kind == "max_turns":
        return [_note("Stopped", str(e.get("message", "")))]
    if kind == "answer":
        return [{"role": "assistant", "content": clean(e.get("text", "")) or "(empty answer)"}]
    return []


def render_partial(text: str) -> list[Message]:
    """The model turn still being generated: its thought so far, and the code of a call as it is written."""
    if not text:
        return []
    thought, calls = split_calls(text)
    out = [_note("Thinking …", clean(thought) or "…")]
    for _, body in calls:
        out.append(_note("Writing code …", fence(clean(body).removeprefix("```python").strip("`\n"), "python")))
    return out


def run_summary(e: dict) -> str:
    """The status line for a `run_end` event."""
    usage = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in (e.get("usage") or {}).items())
    line = f"**{e.get('summary') or e['status']}** · {e['turns']} model turn(s) · {e['duration_s']} s"
    if usage:
        line += f" · {usage}"
    if e.get("error"):
        line += f"\n\n**Error:** {e['error']}"
    return line
