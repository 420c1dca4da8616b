"""`resolve_remote_model`: a registry name or hub repository id -> a local directory, downloading on first use.

The local cache is looked at first and the hub is asked only when the model is not (completely) there, so serving a
downloaded model works offline.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .errors import OfflineError
from .hub import DownloadRequest, _hf_offline, cached_snapshot, download
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


def request_for(name_or_repo: str, registry: Optional[dict[str, ModelEntry]] = None) -> Optional[DownloadRequest]:
    """The download that provides `name_or_repo`; None for a built-in model. Raises `UnknownModelError`."""
    registry = load_registry() if registry is None else registry
    if name_or_repo in registry or not looks_like_repo_id(name_or_repo):
        entry = lookup(name_or_repo, registry)
        if entry.builtin:
            return None
        source = entry.default_source
        if source not in ("huggingface", "modelscope"):
            raise UnknownModelError(f"{entry.name}: only available from {source}, which puyu cannot download from")
        return DownloadRequest(entry.repos[source], revision=entry.revision, source=source, prefer_safetensors=True)
    return DownloadRequest(name_or_repo, prefer_safetensors=True)


def resolve_remote_model(name_or_repo: str) -> Path:
    """A registry name ('internlm2-chat-1_8b') or hub repository id ('internlm/internlm2-chat-1_8b') -> local dir."""
    request = request_for(name_or_repo)
    if request is None:
        from ..tiny import puyu_tiny_path

        return puyu_tiny_path()
    if request.source == "huggingface":
        cached = cached_snapshot(request)
        if cached is not None and is_complete_model(cached):
            return cached
        if _hf_offline():
            raise OfflineError(f"{name_or_repo}: not in the local cache and HF_HUB_OFFLINE=1 is set; run "
                               f"`puyu download {name_or_repo}` where the hub (or a mirror) is reachable")
    return download(request)
