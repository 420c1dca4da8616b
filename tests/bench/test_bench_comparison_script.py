"""The committed comparison script runs end to end (tiny shape, two levels) and writes its JSON and plot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench_servers import offline_env

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_vs_transformers.py"


def test_serve_vs_transformers_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--concurrency", "1", "2", "--prompts-per-level", "2", "2",
           "--input-len", "16", "--output-len", "4", "--num-warmups", "1", "--kv-blocks", "32",
           "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=offline_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "serve_vs_transformers.json").read_text())
    for name in ("puyu", "transformers"):
        points = result["runs"][name]
        assert [p["max_concurrency"] for p in points] == [1, 2]
        assert all(p["completed"] == 2 and p["failed"] == 0 for p in points), points
        assert all(p["total_output_tokens"] == 8 for p in points)  # forced lengths on both servers
    ratios = result["ratios_puyu_over_transformers"]
    assert set(ratios) == {"1", "2"} and ratios["1"]["output_throughput"] > 0
    assert "puyu@c1 / transformers@c1" in proc.stdout
    assert (tmp_path / "out" / "serve_vs_transformers.png").read_bytes()[:4] == b"\x89PNG"
