"""Tokenizer wrapper: encode/decode, incremental detokenisation, chat template, stop ids.

Two back-ends, never any remote code:
- `tokenizer.json` through transformers' `PreTrainedTokenizerFast` (the class is chosen by us, so a checkpoint whose
  tokenizer_config.json names a remote-code class still loads);
- `tokenizer.model` through `sentencepiece` (what real InternLM2 checkpoints ship), with the special tokens of
  tokenizer_config.json mapped onto their ids, as LMDeploy's own wrapper does.
Every id we hand to the model is checked against the number of embedding rows (`vocab_rows`): some InternLM2
snapshots make recent transformers give protocol tokens ids beyond the table (../shared/spec/internlm2-protocol.md).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from .convert.spec import CheckpointError
from .chat_templates import INTERNLM2_CHAT_TEMPLATE

log = logging.getLogger(__name__)

# InternLM2 snapshots that keep placeholder names for the protocol tokens inside the SentencePiece vocabulary.
_INTERNLM2_PLACEHOLDERS = {"<|plugin|>": "[UNUSED_TOKEN_141]", "<|interpreter|>": "[UNUSED_TOKEN_142]",
                           "<|action_end|>": "[UNUSED_TOKEN_143]", "<|action_start|>": "[UNUSED_TOKEN_144]",
                           "<|im_end|>": "[UNUSED_TOKEN_145]", "<|im_start|>": "[UNUSED_TOKEN_146]"}


def _token_str(value: Any) -> Optional[str]:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


class _FastBackend:
    """tokenizer.json through PreTrainedTokenizerFast."""

    def __init__(self, path: Path, cfg: dict):
        from transformers import PreTrainedTokenizerFast

        kwargs = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        try:
            self.tok = PreTrainedTokenizerFast(tokenizer_file=str(path),
                                               **{k: v for k, v in kwargs.items() if v is not None})
        except Exception as exc:  # tokenizers raises its own exception types
            raise CheckpointError(f"{path}: cannot be loaded ({exc})") from None
        self.special_ids = set(self.tok.all_special_ids) | {
            i for i, t in self.tok.added_tokens_decoder.items() if t.special}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # the Rust tokenizer directly: transformers' wrapper costs more than the decode itself on the hot path
        return self.tok.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        i = self.tok.convert_tokens_to_ids(token)
        if not isinstance(i, int) or (i == self.tok.unk_token_id and token != self.tok.unk_token):
            return None
        return i

    def __len__(self) -> int:
        return len(self.tok)


class _SentencePieceBackend:
    """tokenizer.model through sentencepiece, special tokens split out of the text before encoding."""

    def __init__(self, path: Path, cfg: dict):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a valid SentencePiece model ({exc})") from None
        self.add_bos = bool(cfg.get("add_bos_token", True))
        self.special: dict[str, int] = {}
        for id_str, entry in (cfg.get("added_tokens_decoder") or {}).items():
            content = _token_str(entry)
            if content and str(id_str).isdigit():
                self.special[content] = int(id_str)
        for public, placeholder in _INTERNLM2_PLACEHOLDERS.items():
            if public not in self.special:
                i = self._piece_id(public)
                i = i if i is not None else self._piece_id(placeholder)
                if i is not None:
                    self.special[public] = i
        for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()):
            if i >= 0:
                self.special.setdefault(self.sp.id_to_piece(i), i)
        self.id_to_special = {i: s for s, i in self.special.items()}
        self.special_ids = set(self.id_to_special)
        names = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in names) + ")") if names else None

    def _piece_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else int(i)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = [self.sp.bos_id()] if add_special_tokens and self.add_bos and self.sp.bos_id() >= 0 else []
        parts = self._split.split(text) if self._split else [text]
        for part in parts:
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.id_to_special:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.id_to_special[i])
            else:
                run.append(int(i))
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.special.get(token, self._piece_id(token))

    def __len__(self) -> int:
        return max(self.sp.get_piece_size(), max(self.special_ids, default=-1) + 1)


class Tokenizer:
    """The tokenizer of one checkpoint. `vocab_rows` (the embedding rows) bounds every id we produce or accept."""

    def __init__(self, model_dir: Path | str, vocab_rows: Optional[int] = None,
                 eos_token_ids: Sequence[int] = (), arch: str = ""):
        self.model_dir = Path(model_dir)
        cfg = _read_config(self.model_dir)
        if (self.model_dir / "tokenizer.json").exists():
            self.backend: Any = _FastBackend(self.model_dir / "tokenizer.json", cfg)
        elif (self.model_dir / "tokenizer.model").exists():
            self.backend = _SentencePieceBackend(self.model_dir / "tokenizer.model", cfg)
        else:
            raise CheckpointError(f"{self.model_dir}: no tokenizer (tokenizer.json or tokenizer.model)")
        self.vocab_rows = vocab_rows if vocab_rows is not None else len(self.backend)
        self.bos_token = _token_str(cfg.get("bos_token")) or "<s>"
        self.eos_token = _token_str(cfg.get("eos_token")) or "</s>"
        self.bos_token_id = self.backend.token_to_id(self.bos_token)
        self.chat_template: str = checkpoint_chat_template(self.model_dir, cfg, arch)
        self.stop_token_ids = self._stop_ids(eos_token_ids)
        for name, i in (("<|im_end|>", self.backend.token_to_id("<|im_end|>")), ("bos", self.bos_token_id)):
            if i is not None and i >= self.vocab_rows:
                raise CheckpointError(f"{self.model_dir}: token {name} has id {i}, beyond the {self.vocab_rows} "
                                      f"embedding rows (a remote-code tokenizer renumbered it?)")
        self.special_ids: set[int] = set(self.backend.special_ids)

    def _stop_ids(self, eos_token_ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in eos_token_ids]
        eos = self.backend.token_to_id(self.eos_token)
        for i in (eos, self.backend.token_to_id("<|im_end|>")):
            if i is not None and i not in ids and i < self.vocab_rows:
                ids.append(i)
        return ids

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.stop_token_ids[0] if self.stop_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the checkpoint's tokenizer adds (BOS for most)."""
        ids = self.backend.encode(text, add_special_tokens)
        self.check_ids(ids)
        return ids

    def check_ids(self, ids: Sequence[int], what: str = "token id") -> None:
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_rows:
                raise ValueError(f"{what} {i!r} is out of range: the model has {self.vocab_rows} embedding rows")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the checkpoint's jinja template (else InternLM2's)."""
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token)

    def detokenizer(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special_tokens)


def checkpoint_chat_template(model_dir: Path, cfg: dict, arch: str = "") -> str:
    """The checkpoint's own chat template: `chat_template.jinja` (transformers >= 4.50 saves it there), else
    `chat_template` of tokenizer_config.json. Only an InternLM2 checkpoint without one falls back to InternLM2's
    template (logged); any other model without one gets '' and chat requests are refused by `render_chat`."""
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text()
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{jinja_path}: not UTF-8 text ({exc})") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str) and template:
        return template
    if arch == "internlm2" or (not arch and _is_internlm2(model_dir)):
        log.warning("%s: no chat template in the checkpoint; using InternLM2's", model_dir)
        return INTERNLM2_CHAT_TEMPLATE
    return ""


def _is_internlm2(model_dir: Path) -> bool:
    """True unless config.json names another architecture (a tokenizer folder alone is taken as InternLM2's)."""
    try:
        archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return True
    return not archs or "InternLM2ForCausalLM" in archs


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never emitting half a UTF-8 character.

    It decodes a short window of ids before the new ones and emits only what the new ids add (decoding a window, not
    the whole output, keeps a step O(1)); text ending in the replacement character (an incomplete multi-byte sequence)
    is held back until a later id completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _pending(self) -> str:
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        return full[len(prefix_text):] if len(full) > len(prefix_text) else ""

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ids; return the text they complete (maybe empty)."""
        self.ids.extend(new_ids)
        delta = self._pending()
        if not delta or delta.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta

    def flush(self) -> str:
        """At the end of a stream: whatever is still held back (an incomplete character is emitted as is)."""
        delta = self._pending()
        self.prefix_offset = self.read_offset = len(self.ids)
        return delta


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, **variables: Any) -> str:
    """Render `messages` with a jinja chat template in a sandbox (as transformers does, without its import cost)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    if not template:
        raise ValueError("messages: this model has no chat template (chat_template.jinja or tokenizer_config.json); "
                         "send a plain prompt instead")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as exc:
        raise CheckpointError(f"chat_template: not a valid jinja template ({exc})") from None
    return compiled.render(messages=normalize_messages(messages), add_generation_prompt=add_generation_prompt,
                           **variables)


def normalize_messages(messages: Any) -> list[dict]:
    """Check chat messages; OpenAI content parts (`[{"type": "text", "text": ...}]`) are joined into one string."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}].role: missing or not a string")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string or a list of text parts")
        out.append({**m, "content": content})
    return out
