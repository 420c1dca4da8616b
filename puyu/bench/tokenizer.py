"""The tokenizer the benchmark counts tokens with: the target model's, from a local directory or a model name, or
the server's own through its /tokenize and /detokenize endpoints (vLLM's and puyu's).

With --tokenizer: an existing directory; puyu-tiny; a registry name or hub id already downloaded (`puyu download`);
else the name is handed to transformers, which fetches only the tokenizer files (as vLLM does) unless
HF_HUB_OFFLINE=1. Without it (`serve_tokenizer`): the server's /tokenize when it answers, else --model when it is on
disk, else one line saying --tokenizer is needed (never a hub lookup for a served model name, nor its retries).
A whole model is never downloaded just to count tokens.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

# text whose tokens make the vocabulary of random prompts built with a remote tokenizer (which cannot list its own)
from puyu.tiny import CORPUS


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


class RemoteTokenizer:
    """encode/decode through a server's /tokenize and /detokenize (results cached: data sets re-encode a lot).

    `count_later`: the client does not tokenise stream deltas with it while measuring (an HTTP call per chunk would
    stall the event loop); per-chunk counts come from the final usage instead."""

    count_later = True

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, timeout: float = 60.0):
        import httpx

        base = base_url.rstrip("/")
        self.root = base[:-3] if base.endswith("/v1") else base
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers)
        self._encoded: dict[tuple[str, bool], list[int]] = {}

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(self.root + path, json={"model": self.model, **body})
        if r.status_code != 200:
            raise ValueError(f"{self.root}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        key = (text, add_special_tokens)
        if key not in self._encoded:
            self._encoded[key] = list(self._post("/tokenize", {"prompt": text,
                                                               "add_special_tokens": add_special_tokens})["tokens"])
        return list(self._encoded[key])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._post("/detokenize", {"tokens": [int(i) for i in ids]})["prompt"]

    def normal_token_ids(self) -> list[int]:
        """Ids that ordinary text is made of (a remote vocabulary cannot be listed): those of a fixed corpus."""
        return sorted(set(self.encode(CORPUS, add_special_tokens=False)))


def probe_remote(base_url: str, model: str, api_key: Optional[str] = None) -> Optional[RemoteTokenizer]:
    """The server's tokenizer when it offers /tokenize for `model`, else None (404/405, or not reachable)."""
    import httpx

    remote = RemoteTokenizer(base_url, model, api_key, timeout=30.0)
    try:
        remote.encode("hello", add_special_tokens=False)
    except (ValueError, httpx.HTTPError, KeyError, TypeError):
        return None
    return remote


def serve_tokenizer(tokenizer: Optional[str], base_url: str, model: str, api_key: Optional[str] = None
                    ) -> tuple[Any, str]:
    """(tokenizer, its name for the results) for `puyu bench serve`; ValueError in one line when none can be had."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer), tokenizer
    remote = probe_remote(base_url, model, api_key)
    if remote is not None:
        return remote, f"{remote.root}/tokenize"
    if _local_dir(model) is not None:
        return load_tokenizer(model), model
    raise ValueError(f"--tokenizer: needed to count tokens: the server at {base_url} has no /tokenize endpoint and "
                     f"--model {model!r} is not a local directory or a downloaded model")
