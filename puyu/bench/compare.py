"""`puyu bench compare A.json B.json ...`: a side-by-side table of summaries and ratios to the first
(the plot: plots.plot_compare)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .report import read_json

# (key, label, higher is better)
COMPARE_KEYS = (
    ("request_throughput", "requests/s", True),
    ("output_throughput", "output tok/s", True),
    ("total_token_throughput", "total tok/s", True),
    ("mean_ttft_ms", "mean TTFT ms", False),
    ("p99_ttft_ms", "p99 TTFT ms", False),
    ("mean_tpot_ms", "mean TPOT ms", False),
    ("p99_tpot_ms", "p99 TPOT ms", False),
    ("mean_itl_ms", "mean ITL ms", False),
    ("mean_e2el_ms", "mean E2EL ms", False),
    ("p99_e2el_ms", "p99 E2EL ms", False),
    ("completed", "completed", True),
    ("failed", "failed", False),
)


def load_summaries(paths: Sequence[Path | str]) -> list[tuple[str, dict[str, Any]]]:
    """(name, summary) per file; a sweep file contributes its points. Errors name the file."""
    out = []
    for path in paths:
        data = read_json(path)
        stem = Path(path).name.removesuffix(".json")
        if "points" in data:
            for p in data["points"]:
                out.append((f"{stem}@{p.get('max_concurrency') or p.get('request_rate')}", p))
        elif "output_throughput" in data:
            out.append((stem, data))
        else:
            raise ValueError(f"{path}: not a bench summary (no 'output_throughput' or 'points')")
    if len(out) < 2:
        raise ValueError("bench compare needs at least two summaries")
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.2f}" if isinstance(value, float) else str(value)
    return "-" if value is None else str(value)


def ratio(a: Any, b: Any) -> Optional[float]:
    """b / a, or None when either is missing or a is zero."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a == 0:
        return None
    return b / a


def compare_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """Rows are metrics; columns are the runs, then each later run's ratio to the first (x = later / first)."""
    names = [n for n, _ in runs]
    base = runs[0][1]
    header = ["metric"] + names + [f"{n} / {names[0]}" for n in names[1:]]
    rows = [header]
    for key, label, _ in COMPARE_KEYS:
        values = [s.get(key) for _, s in runs]
        ratios = [ratio(base.get(key), v) for v in values[1:]]
        rows.append([label] + [_fmt(v) for v in values] + [("-" if r is None else f"{r:.2f}x") for r in ratios])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
