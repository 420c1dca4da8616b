"""The tokenizer the benchmark counts tokens with: the target model's, from a local directory or a model name.

Order: an existing directory; puyu-tiny; a registry name or hub id already downloaded (`puyu download`); else the
name is handed to transformers, which fetches only the tokenizer files (as vLLM does) unless HF_HUB_OFFLINE=1.
A whole model is never downloaded just to count tokens.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Optional


def _local_dir(name: str) -> Optional[Path]:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name == "puyu-tiny":
        from puyu.tiny import puyu_tiny_path

        return puyu_tiny_path()
    try:
        from puyu.download.remote import cached_model, request_for
    except ImportError:
        return None
    try:
        request = request_for(name)
        return cached_model(request) if request is not None else None
    except Exception:  # noqa: BLE001 - not a registry name: fall through to transformers
        return None


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str) -> Any:
    """A transformers tokenizer; raises ValueError naming --tokenizer when it cannot be loaded."""
    from transformers import AutoTokenizer

    local = _local_dir(name_or_path)
    source = str(local) if local else name_or_path
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local is not None, trust_remote_code=True)
    except (OSError, ValueError) as exc:
        where = f"from {local}" if local else "(not a local directory or a downloaded model)"
        raise ValueError(f"--tokenizer {name_or_path!r}: cannot load a tokenizer {where}: {exc}") from None


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens in a piece of generated text (no BOS/EOS added)."""
    if not text:
        return 0
    return len(tokenizer.encode(text, add_special_tokens=False))
