"""puyu installed from a wheel (not the editable checkout) still finds what it ships: the model registry, the
personas and the C kernel sources are package data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, puyu
from puyu.download.registry import load_registry
from puyu.personas import load_personas
from puyu.engine.cpu_kernels import SOURCES
print(json.dumps({"file": puyu.__file__, "models": sorted(load_registry()),
                  "personas": sorted(p.name for p in load_personas()),
                  "sources": [str(s) for s in SOURCES], "sources_exist": all(s.exists() for s in SOURCES)}))
"""


def test_a_wheel_install_finds_registry_personas_and_kernel_sources(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("puyu-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(target)  # the installed copy, not the checkout
    assert {"smollm2-135m-instruct", "internlm2-chat-7b", "bajie-chat-1_8b"} <= set(found["models"])
    assert len(found["personas"]) >= 3
    assert found["sources_exist"] and all(Path(s).is_relative_to(target) for s in found["sources"])
