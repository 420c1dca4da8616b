"""Engine options shared by `puyu serve` and `puyu chat` (names follow `lmdeploy serve api_server` / `lmdeploy chat`),
and the `--config FILE` that can hold them. Options given on the command line win over the file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, EngineConfig

BACKENDS = ("native", "turbomind")
# argparse dest -> EngineConfig field
ENGINE_ARGS = ("quant_policy", "session_len", "cache_max_entry_count", "cache_block_seq_len", "max_batch_size",
               "max_prefill_token_num", "enable_prefix_caching", "device", "dtype", "tp", "num_threads",
               "kernels")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """MODEL, --backend, --config and the engine options (all default to None: 'not given')."""
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="HF directory, TurboMind workspace, registry name, or nothing for puyu-tiny")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="engine backend (default: turbomind when LMDeploy and a GPU are present, else native)")
    add_engine_options(parser)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """--config and the engine options (all default to None: 'not given'); also used by `puyu bench engine|latency`."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="YAML or JSON file of engine options (EngineConfig field names)")
    e = parser.add_argument_group("engine options")
    e.add_argument("--quant-policy", type=int, choices=[0, 4, 8], default=None, help="KV cache int8 (8) / int4 (4)")
    e.add_argument("--session-len", type=int, default=None, help="max tokens of one conversation")
    e.add_argument("--cache-max-entry-count", type=float, default=None,
                   help="KV cache: fraction of free memory (< 1) or number of blocks (>= 1)")
    e.add_argument("--cache-block-seq-len", type=int, default=None, help="tokens per KV block")
    e.add_argument("--max-batch-size", type=int, default=None)
    e.add_argument("--max-prefill-token-num", type=int, default=None)
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    e.add_argument("--device", default=None, help="cpu | cuda | cuda:N")
    e.add_argument("--dtype", default=None, help="auto | float32 | float16 | bfloat16")
    e.add_argument("--tp", type=int, default=None, help="tensor parallel degree (TurboMind)")
    e.add_argument("--num-threads", type=int, default=None, help="torch threads on cpu")
    e.add_argument("--kernels", choices=["auto", "torch"], default=None,
                   help="auto: puyu's cpu kernels where they build; torch: torch ops only (the reference)")


def read_config_file(path: Path) -> dict[str, Any]:
    """A mapping of engine options from YAML or JSON; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise their own types
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of engine options, got {type(data).__name__}")
    return data


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from --config FILE, overridden by the options given on the command line."""
    config_file = getattr(args, "config", None)
    options: dict[str, Any] = read_config_file(config_file) if config_file else {}
    for name in ENGINE_ARGS:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    count = options.get("cache_max_entry_count")
    if isinstance(count, float) and count >= 1 and count.is_integer():
        options["cache_max_entry_count"] = int(count)
    try:
        return EngineConfig.from_dict(options)
    except ConfigError as exc:
        where = f"{config_file}: " if config_file and exc.field in read_config_file(config_file) else ""
        raise ValueError(f"{where}{exc}") from None
    except TypeError as exc:
        raise ValueError(f"{config_file or 'engine options'}: {exc}") from None
