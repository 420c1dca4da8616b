"""The tokenizer the benchmark counts tokens with: the target model's, from a local directory or a model name.

A name is resolved with `puyu.resolve.resolve_model_path` (puyu-tiny, a directory, or a registry entry already
downloaded); nothing is fetched from a hub here unless the registry resolution does so explicitly.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str) -> Any:
    """A transformers tokenizer; raises ValueError naming the argument when it cannot be loaded."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        from puyu.resolve import resolve_model_path

        try:
            path = resolve_model_path(name_or_path)
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"--tokenizer {name_or_path!r}: not a local model directory ({exc})") from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--tokenizer {name_or_path!r}: cannot load a tokenizer from {path} ({exc})") from None


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens in a piece of generated text (no BOS/EOS added)."""
    if not text:
        return 0
    return len(tokenizer.encode(text, add_special_tokens=False))
