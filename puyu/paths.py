"""Where puyu keeps things: its cache (`$PUYU_CACHE`, else ~/.cache/puyu) and the configs it ships (the model
registry and the personas, package data: `puyu/configs` links to the checkout's `configs/` and is copied into
wheels, so an installed puyu finds them without a checkout)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("PUYU_CACHE", Path.home() / ".cache" / "puyu"))


def configs_dir() -> Path:
    return Path(__file__).resolve().parent / "configs"
