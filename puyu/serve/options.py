"""Engine options shared by `puyu serve` and `puyu chat` (names follow `lmdeploy serve api_server` / `lmdeploy chat`),
and the `--config FILE` that can hold them. Options given on the command line win over the file."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, EngineConfig

BACKENDS = ("native", "turbomind")
# argparse dest -> EngineConfig field: the same names
ENGINE_ARGS = tuple(f.name for f in dataclasses.fields(EngineConfig))


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """MODEL, --backend, --config and the engine options (all default to None: 'not given')."""
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="HF directory, TurboMind workspace, GGUF file, registry name, or nothing for the default "
                             "model")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="engine backend (default: turbomind when LMDeploy and a GPU are present, else native)")
    add_engine_options(parser)


def _argparse_options(f: dataclasses.Field) -> dict[str, Any]:
    """add_argument keywords for one EngineConfig field; default None ('not given': the file or the field wins)."""
    meta = f.metadata
    shown = f"{f.default}".lower() if isinstance(f.default, bool) else f"{f.default}"
    text = meta.get("help", "")
    options: dict[str, Any] = {"default": None, "help": text if "(default" in text else f"{text} (default: {shown})"}
    if isinstance(f.default, bool):
        options["action"] = argparse.BooleanOptionalAction
        return options
    options["type"] = meta.get("type") or type(f.default)
    if "choices" in meta:
        options["choices"] = list(meta["choices"])
    return options


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """--config and the engine options, generated from EngineConfig's fields (all default to None: 'not given');
    also used by `puyu bench engine|latency` and `puyu webui`."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="YAML or JSON file of engine options (EngineConfig field names)")
    group = parser.add_argument_group("engine options")
    for f in dataclasses.fields(EngineConfig):
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **_argparse_options(f))


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
