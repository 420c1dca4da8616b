"""Downloads from the Hugging Face hub (or a mirror of it) and from ModelScope.

Hugging Face: list the repository at the requested revision, select files with --include/--exclude, check the
disk, fetch each file resumably (`resume.fetch`), then let `huggingface_hub.snapshot_download` put the snapshot
together (refs, symlinks or --local-dir copies) exactly as the rest of the ecosystem expects. The endpoint is
`--endpoint`, else $HF_ENDPOINT, else https://huggingface.co; it is read at call time, not at import.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import resume
from .errors import DownloadError, MissingPackageError, OfflineError, disk_full, explain, free_space

DEFAULT_ENDPOINT = "https://huggingface.co"
SOURCES = ("huggingface", "modelscope")
# What a model needs to be served; weights only as safetensors when the repository has them (see `weight_patterns`).
MODEL_EXCLUDE_WHEN_SAFETENSORS = ["*.bin", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.ckpt", "*.gguf", "*.onnx"]


@dataclass
class DownloadRequest:
    repo_id: str
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    revision: Optional[str] = None
    local_dir: Optional[Path] = None
    cache_dir: Optional[Path] = None
    endpoint: Optional[str] = None
    source: str = "huggingface"
    prefer_safetensors: bool = False  # skip *.bin etc. when the repository also has *.safetensors

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DownloadError(f"source: must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise DownloadError(f"repo_id: must be 'owner/name', got {self.repo_id!r}")

    def resolved_endpoint(self) -> str:
        return (self.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def download(request: DownloadRequest) -> Path:
    """Download what `request` selects; returns the local directory (snapshot folder or --local-dir)."""
    if request.source == "modelscope":
        return download_modelscope(request)
    return download_huggingface(request)


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _storage_folder(request: DownloadRequest) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(request.cache_dir) if request.cache_dir else Path(constants.HF_HUB_CACHE)
    return cache / repo_folder_name(repo_id=request.repo_id, repo_type="model")


def select_files(names: list[str], request: DownloadRequest) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    exclude = list(request.exclude)
    if request.prefer_safetensors and any(n.endswith(".safetensors") for n in names):
        exclude += MODEL_EXCLUDE_WHEN_SAFETENSORS
    return list(filter_repo_objects(names, allow_patterns=request.include or None, ignore_patterns=exclude or None))


def _target(request: DownloadRequest, remote: resume.RemoteFile) -> Optional[Path]:
    """Where huggingface_hub will look for this file's bytes; None where we leave the file to it.

    In --local-dir mode huggingface_hub accepts an existing file only if its sha256 matches an LFS ETag, so small
    non-LFS files (configs, tokenizers) are left to it there.
    """
    if request.local_dir is None:
        return _storage_folder(request) / "blobs" / remote.etag
    if resume._SHA256.fullmatch(remote.etag):
        return Path(request.local_dir) / remote.path
    return None


def _describe(request: DownloadRequest, endpoint: str, names: list[str], commit: str) -> list[resume.RemoteFile]:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    remotes = []
    for name in names:
        meta = get_hf_file_metadata(hf_hub_url(request.repo_id, name, revision=commit, endpoint=endpoint))
        etag = (meta.etag or "").strip('"')
        remotes.append(resume.RemoteFile(path=name, url=meta.location, etag=etag, size=meta.size))
    return remotes


def _remaining(plan: list[tuple[resume.RemoteFile, Path]]) -> int:
    """Bytes still to transfer for `plan` (partial files count as already there)."""
    return sum(max((r.size or 0) - resume.partial_size(t), 0) for r, t in plan)


def _check_space(plan: list[tuple[resume.RemoteFile, Path]]) -> None:
    """Fail before the first byte when the files still to fetch cannot fit."""
    if not plan:
        return
    needed = _remaining(plan)
    where = plan[0][1].parent
    if needed > free_space(where):
        raise disk_full(where, needed)


def download_huggingface(request: DownloadRequest) -> Path:
    endpoint = request.resolved_endpoint()
    if _hf_offline():
        raise OfflineError(f"{request.repo_id}: downloads are disabled because HF_HUB_OFFLINE=1 is set; unset it "
                           f"to download from {endpoint}")
    state: dict = {"file": None, "target": None, "remote": None, "needed": None}
    try:
        return _download_huggingface(request, endpoint, state)
    except Exception as exc:  # noqa: BLE001 - translated below or re-raised (Ctrl-C keeps the partial file)
        target, remote = state["target"], state["remote"]
        partial = (resume.partial_size(target), remote.size) if target is not None else None
        where = target.parent if target is not None else Path(request.local_dir or _storage_folder(request))
        error = explain(exc, repo_id=request.repo_id, endpoint=endpoint, revision=request.revision,
                        current_file=state["file"], partial=partial, where=where, needed=state["needed"])
        if error is None:
            raise
        raise error from None


def _download_huggingface(request: DownloadRequest, endpoint: str, state: dict) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    # Like snapshot_download, no revision means the branch 'main'.
    info = HfApi(endpoint=endpoint).model_info(request.repo_id, revision=request.revision or "main")
    names = select_files([s.rfilename for s in info.siblings or []], request)
    if not names:
        raise DownloadError(f"{request.repo_id}: no file matches --include {request.include or ['*']} "
                            f"--exclude {request.exclude or []} (the repository has {len(info.siblings or [])} files)")
    plan = []
    for remote in _describe(request, endpoint, names, info.sha or request.revision or "main"):
        target = _target(request, remote)
        if target is not None and not target.exists():
            plan.append((remote, target))
    _check_space(plan)
    for i, (remote, target) in enumerate(plan):
        state.update(file=remote.path, target=target, remote=remote, needed=_remaining(plan[i:]))
        resume.fetch(remote, target)
    state.update(file=None, target=None, remote=None)
    path = snapshot_download(request.repo_id, revision=request.revision, endpoint=endpoint, allow_patterns=names,
                             cache_dir=request.cache_dir, local_dir=request.local_dir)
    return Path(path)


def download_modelscope(request: DownloadRequest) -> Path:
    """ModelScope through its own package (it has its own cache, mirrors and resume)."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise MissingPackageError(f"{request.repo_id}: ModelScope downloads need the `modelscope` package "
                                  f"(pip install modelscope), or use --source huggingface where the model is there") \
            from None
    kwargs = {"revision": request.revision, "cache_dir": str(request.cache_dir) if request.cache_dir else None,
              "allow_patterns": request.include or None, "ignore_patterns": request.exclude or None}
    if request.local_dir is not None:
        kwargs["local_dir"] = str(request.local_dir)
    try:
        return Path(snapshot_download(request.repo_id, **kwargs))
    except OSError as exc:
        error = explain(exc, repo_id=request.repo_id, endpoint="modelscope.cn", revision=request.revision)
        if error is None:
            raise
        raise error from None
    except Exception as exc:  # modelscope raises its own HTTP/requests errors
        raise DownloadError(f"{request.repo_id}: ModelScope download failed ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); run the same command "
                            f"again to resume") from None


def cached_snapshot(request: DownloadRequest) -> Optional[Path]:
    """The cached snapshot of `request` without asking the hub (None if there is none)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(request.repo_id, revision=request.revision, cache_dir=request.cache_dir,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
