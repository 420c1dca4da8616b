"""`resolve_remote_model`: a registry name or hub repository id -> a local directory, downloading on first use.

The local cache is looked at first and the hub is asked only when the model is not (completely) there, so serving a
downloaded model works offline.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .errors import OfflineError
from .hub import SOURCES, DownloadRequest, _hf_offline, cached_snapshot, download
from .registry import ModelEntry, UnknownModelError, load_registry, lookup

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_complete_model(path: Path) -> bool:
    """config.json and every weight file the checkpoint refers to are present."""
    if not (path / "config.json").is_file():
        return False
    for index_name in _WEIGHT_INDEXES:
        index = path / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError):
                return False
            return all((path / shard).is_file() for shard in shards)
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def request_for(name_or_repo: str, *, source: Optional[str] = None, revision: Optional[str] = None,
                registry: Optional[dict[str, ModelEntry]] = None, **options: Any) -> Optional[DownloadRequest]:
    """The download that provides `name_or_repo` (a registry name or 'owner/name'); None for a built-in model.

    `source`/`revision` override the registry's; `options` are further `DownloadRequest` fields.
    """
    registry = load_registry() if registry is None else registry
    if name_or_repo not in registry and _looks_like_path(name_or_repo):
        raise FileNotFoundError(f"{name_or_repo}: no such model directory")
    if name_or_repo not in registry and looks_like_repo_id(name_or_repo):
        return DownloadRequest(name_or_repo, revision=revision, source=source or "huggingface", **options)
    entry = lookup(name_or_repo, registry)
    if entry.builtin:
        return None
    source = source or entry.default_source
    if source not in SOURCES:
        raise UnknownModelError(f"{entry.name}: only available from {source}, which puyu cannot download from")
    return DownloadRequest(entry.repo_for(source), revision=revision or entry.revision, source=source, **options)


def modelscope_cached(repo_id: str) -> Optional[Path]:
    """A complete copy of `repo_id` in ModelScope's cache ($MODELSCOPE_CACHE, default ~/.cache/modelscope/hub)."""
    root = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope" / "hub"))
    owner, name = repo_id.split("/")
    for folder in (root / "models" / owner, root / owner):
        for candidate in (folder / name, folder / name.replace(".", "___")):
            if candidate.is_dir() and is_complete_model(candidate):
                return candidate
    return None


def cached_model(request: DownloadRequest) -> Optional[Path]:
    """A complete local copy of what `request` would download, found without asking any hub."""
    if request.source == "modelscope":
        return modelscope_cached(request.repo_id)
    cached = cached_snapshot(request)
    return cached if cached is not None and is_complete_model(cached) else None


def local_copy(entry: ModelEntry) -> Optional[Path]:
    """Where `entry` already is on this machine (complete), without building or downloading anything."""
    packaged = entry.packaged_file()
    if packaged is not None:
        return packaged
    if entry.builtin:
        from ..paths import cache_root

        path = cache_root() / "models" / entry.name
        return path if is_complete_model(path) else None
    request = request_for(entry.name, registry={entry.name: entry}, prefer_safetensors=True)
    return cached_model(request) if request is not None else None


def resolve_remote_model(name_or_repo: str) -> Path:
    """A registry name ('internlm2-chat-1_8b') or hub repository id ('internlm/internlm2-chat-1_8b') -> local dir."""
    registry = load_registry()
    packaged = registry[name_or_repo].packaged_file() if name_or_repo in registry else None
    if packaged is not None:
        from ..convert.gguf import gguf_model_dir

        return gguf_model_dir(packaged)
    request = request_for(name_or_repo, registry=registry, prefer_safetensors=True)
    if request is None:
        from ..tiny import puyu_tiny_path

        return puyu_tiny_path()
    cached = cached_model(request)
    if cached is not None:
        return cached
    if request.source == "huggingface" and _hf_offline():
        raise OfflineError(f"{name_or_repo}: not in the local cache and HF_HUB_OFFLINE=1 is set; run "
                           f"`puyu download {name_or_repo}` where the hub (or a mirror) is reachable")
    return download(request)
