"""The `serve deploy` example (configs/ray/puyu-serve.yaml) against Ray Serve's own schema, and `--replicas`
without Ray installed (no Ray is started here)."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import yaml

from puyu.paths import configs_dir
from puyu.testing import free_port


def test_the_serve_deploy_example_is_a_valid_config():
    schema = pytest.importorskip("ray.serve.schema")
    raw = yaml.safe_load((configs_dir() / "ray" / "puyu-serve.yaml").read_text())
    config = schema.ServeDeploySchema.model_validate(raw)
    app = config.applications[0]
    module, _, name = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert config.http_options.port == 23333 and app.args["routing"] in ("prefix", "least-loaded", "round-robin")


def test_replicas_without_ray_say_how_to_install_it(internlm2_checkpoint):
    code = ("import sys; sys.modules['ray'] = None; from puyu.cli import main; "
            f"sys.exit(main(['serve', {str(internlm2_checkpoint)!r}, '--replicas', '2', '--server-port', '{free_port()}']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "pip install 'puyu[ray]'" in done.stderr and "Traceback" not in done.stderr, done.stderr
