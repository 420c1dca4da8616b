"""PNG plots (matplotlib, Agg backend): latency CDFs of one run; throughput and p99 latency against load."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .metrics import request_metrics
from .records import RequestRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    xs = sorted(values)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]


def plot_latency_cdfs(runs: dict[str, Sequence[RequestRecord]], path: Path, title: str = "") -> Path:
    """TTFT and end-to-end latency CDFs (ms) of successful requests, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in runs.items():
        metrics = [request_metrics(r) for r in records if r.success]
        for ax, key in zip(axes, ("ttft", "e2el")):
            values = [v * 1000.0 for v in (m[key] for m in metrics) if v is not None]
            if values:
                ax.step(*_cdf(values), where="post", label=label)
    for ax, name in zip(axes, ("TTFT (ms)", "End-to-end latency (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(title or "Latency CDFs")
    return _save(plt, fig, path)


def plot_against_load(series: dict[str, list[dict[str, Any]]], x_key: str, path: Path, title: str = "",
                      p_key: str = "p99") -> Path:
    """Output throughput, p99 TTFT and p99 TPOT against concurrency or rate; one line per series of summaries."""
    plt = _pyplot()
    return _save(plt, load_figure(plt, series, x_key, title, p_key), path)


def load_figure(plt: Any, series: dict[str, list[dict[str, Any]]], x_key: str, title: str = "",
                p_key: str = "p99") -> Any:
    """The figure of `plot_against_load`; its x ticks are the swept values themselves (1, 4, 16, not 2^k)."""
    panels = (("output_throughput", "output tokens/s"), (f"{p_key}_ttft_ms", f"{p_key} TTFT (ms)"),
              (f"{p_key}_tpot_ms", f"{p_key} TPOT (ms)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, points in series.items():
        xs = [float(p[x_key]) for p in points]
        for ax, (key, _) in zip(axes, panels):
            ax.plot(xs, [p.get(key, float("nan")) for p in points], marker="o", label=label)
    for ax, (_, name) in zip(axes, panels):
        ax.set_xlabel(x_key)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        swept = sorted({float(p[x_key]) for pts in series.values() for p in pts} - {float("inf")})
        if len(swept) > 2:
            ax.set_xscale("log", base=2)
        ax.set_xticks(swept, [f"{x:g}" for x in swept])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.legend(fontsize=8)
    fig.suptitle(title or f"Throughput and latency against {x_key}")
    return fig


def plot_compare(runs: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """Bars of output throughput, mean TTFT and mean TPOT for each run (of `compare.load_summaries`)."""
    plt = _pyplot()
    panels = (("output_throughput", "output tok/s"), ("mean_ttft_ms", "mean TTFT (ms)"),
              ("mean_tpot_ms", "mean TPOT (ms)"))
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.2 * len(runs) * 3, 4))
    names = [n for n, _ in runs]
    for ax, (key, label) in zip(axes, panels):
        ax.bar(range(len(runs)), [float(s.get(key) or 0) for _, s in runs])
        ax.set_xticks(range(len(runs)), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)
