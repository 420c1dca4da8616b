"""Output directories written all at once: a temporary directory next to the destination, renamed into place only
when everything is written, so that a failure never leaves a half-written workspace or checkpoint behind."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .spec import CheckpointError

# files copied from a checkpoint to the output root (tokenizer, configs, remote code), as LMDeploy does
COPY_SUFFIXES = (".json", ".py", ".model", ".tiktoken", ".txt", ".jinja")


def check_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: destination exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise CheckpointError(f"{dst}: destination exists and is not empty (use --force to replace it)")


@contextmanager
def atomic_directory(dst: Path) -> Iterator[Path]:
    """Yield a fresh directory; on success it replaces `dst`, on any error it is removed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_side_files(src: Path, dst_root: Path, skip: tuple[str, ...] = ()) -> None:
    """Tokenizer and config files (not the weight index: the output has its own weights; nor the names in `skip`)."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in COPY_SUFFIXES and not f.name.endswith(".index.json") and f.name not in skip:
            shutil.copy2(f, dst_root / f.name)
