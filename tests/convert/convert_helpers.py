"""Helpers shared by the convert tests (a plain module: tests/engine owns the name `conftest`)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from puyu.tiny import TinyShape

HERE = Path(__file__).parent
# head_dim 64 (LMDeploy's converter only takes 64 or 128), FFN 384 = 3 groups of 128 (padded for tp 2 and 4)
INT4_SHAPE = TinyShape(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=384)
# 8 heads / 2 KV heads (tp 8 duplicates KV heads), FFN 100 (padded for every tp > 1)
TP8_SHAPE = TinyShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=100)


def copy_checkpoint(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_changes)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def raw(path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A headerless tensor dump read with numpy (independently of puyu's reader)."""
    np_dtype = {torch.float16: np.uint16, torch.bfloat16: np.uint16, torch.int32: np.int32}[dtype]
    a = np.fromfile(path, dtype=np.dtype(np_dtype).newbyteorder("<"))
    t = torch.from_numpy(a.astype(np_dtype))
    if dtype != torch.int32:
        t = t.view(dtype)
    return t.reshape(shape)


def lmdeploy_available() -> bool:
    try:
        import lmdeploy.version  # noqa: F401
        import mmengine  # noqa: F401
    except ImportError:
        return False
    return True


def lmdeploy_convert(jobs: list[tuple[Path, Path, int, str]]) -> None:
    """Run LMDeploy's converter for each (src, dst, tp, model_format), in one subprocess."""
    argv = [str(x) for job in jobs for x in job]
    r = subprocess.run([sys.executable, str(HERE / "lmdeploy_cpu_convert.py"), *argv], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
