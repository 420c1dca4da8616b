"""Filling slots with images of a local folder: each image is captioned by the vision model itself, and each slot
takes the unused image whose caption is closest to the slot's caption (cosine of word counts; every CJK character
counts as a word). Offline: no web search and no CLIP text tower (the checkpoint has only CLIP's vision side)."""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Optional

from .article import Slot

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_WORD = re.compile(r"[a-z0-9]+|[\u3400-\u9fff]")


def image_files(folder: Path) -> list[Path]:
    """The images of `folder` (by suffix, sorted by name); ValueError naming the folder when there are none."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such image folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    return files


def similarity(a: str, b: str) -> float:
    ca, cb = Counter(_WORD.findall(a.lower())), Counter(_WORD.findall(b.lower()))
    dot = sum(n * cb[w] for w, n in ca.items())
    norm = math.sqrt(sum(n * n for n in ca.values())) * math.sqrt(sum(n * n for n in cb.values()))
    return dot / norm if norm else 0.0


def assign(slots: list[Slot], captions: dict[Path, str]) -> list[Optional[Path]]:
    """One image per slot, in slot order, never used twice (ties: the first by name); None once images run out."""
    free = list(captions)
    chosen: list[Optional[Path]] = []
    for slot in slots:
        if not free:
            chosen.append(None)
            continue
        best = max(free, key=lambda p: (similarity(slot.caption, captions[p]), -free.index(p)))
        free.remove(best)
        chosen.append(best)
    return chosen
