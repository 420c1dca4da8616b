"""Constrained decoding with xgrammar: a `Guide` compiled against the checkpoint's vocabulary, one matcher per request.

Invariants:
- the token bitmask of a request allows exactly the tokens that keep its output a prefix of a sentence of the grammar;
  the stop tokens are allowed only where the grammar accepts (so EOS never ends an unfinished JSON value), and when
  the grammar is complete only the stop tokens are left;
- a request with no stop token at all (`ignore_eos` without stop ids) ends when its grammar has nothing more to add;
- JSON output never holds a raw control character nor invalid UTF-8: xgrammar's JSON strings admit bytes below
  0x20 (which JSON forbids unescaped) and overlong or surrogate sequences (`E0 80 AA`); for the JSON kinds, tokens
  holding such bytes are masked as well, and so are, after a token ending in the lead byte E0/ED/F0/F4, the tokens
  whose first byte would make that character overlong, a surrogate or beyond U+10FFFF;
- compiled grammars are cached by (kind, spec): the same schema compiles once per engine.
xgrammar is imported on first use, so engines that never constrain a request do not load it.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any, Optional, Sequence, cast

import torch

from ..config import ConfigError, Guide

CACHE_ENTRIES = 128
JSON_KINDS = ("json_object", "json_schema", "tool_call")
# UTF-8 lead bytes whose first continuation byte is restricted, and the continuation bytes they forbid
_LEAD_FORBIDS = {0xE0: range(0x80, 0xA0), 0xED: range(0xA0, 0xC0), 0xF0: range(0x80, 0x90), 0xF4: range(0x90, 0xC0)}
# JSON is compiled without free whitespace between tokens: a small model would otherwise emit it forever
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")


class GuideError(ConfigError):
    """A guide that cannot be compiled; the message names the request field and says why."""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _XGR_PREFIX.sub("", text)


def _literal(text: str) -> str:
    """`text` as an EBNF string literal (JSON's escapes are xgrammar's)."""
    return json.dumps(text, ensure_ascii=False)


def _encoded_vocab(tokenizer: Any) -> tuple[Any, list[bytes | str], Any, bool]:
    """xgrammar's view of the vocabulary: (hf tokenizer or None, tokens, vocab type, add_prefix_space)."""
    import xgrammar as xgr

    backend = tokenizer.backend
    if hasattr(backend, "tok"):  # tokenizer.json (PreTrainedTokenizerFast)
        return backend.tok, [], None, False
    sp = backend.sp  # SentencePiece: byte-fallback pieces ("<0x41>", "▁word")
    vocab: list[bytes | str] = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab += [""] * (len(backend) - len(vocab))
    for token, i in backend.special.items():
        vocab[i] = token
    return None, vocab, xgr.VocabType.BYTE_FALLBACK, True


class Grammars:
    """The compiler of one engine's vocabulary and its cache (thread-safe: the API threads compile to validate a
    request before it is queued, the engine thread compiles again, from the cache, to start its matcher)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.action_end_id: Optional[int] = tokenizer.token_to_id("<|action_end|>")

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr

            tok = self.tokenizer
            hf, vocab, vocab_type, prefix_space = _encoded_vocab(tok)
            stops = list(tok.stop_token_ids)
            if hf is not None:
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_rows, stop_token_ids=stops)
            else:
                info = xgr.TokenizerInfo(cast(Any, vocab), vocab_type, vocab_size=tok.vocab_rows, stop_token_ids=stops,
                                         add_prefix_space=prefix_space)
            self.vocab_size = info.vocab_size
            self.json_tables = JSONByteTables(info.decoded_vocab, set(tok.special_ids) | set(stops), info.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        return self._compiler

    def compile(self, guide: Guide) -> Any:
        """The compiled grammar of `guide` (cached); GuideError naming `guide.field` when it cannot compile.
        The lock guards the cache only: a long compile in an API thread never stalls the engine thread's hits."""
        key = (guide.kind, guide.spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            compiler = self._get_compiler()
        try:
            compiled = _compile(compiler, guide)
        except Exception as exc:  # xgrammar raises RuntimeError, InvalidJSONError, ValueError
            raise GuideError(guide.field, f"cannot be compiled into a grammar: {_reason(exc)}") from None
        if not _admits_output(compiled):
            raise GuideError(guide.field, "the grammar admits no output at all")
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, guide: Guide, stop_ids: Sequence[int]) -> "GuideState":
        """A fresh matcher for one request; `stop_ids` are the ids that end it (allowed where the grammar accepts).
        A tool call may also end with `<|action_end|>`."""
        compiled = self.compile(guide)
        stops = set(stop_ids)
        if guide.kind == "tool_call" and self.action_end_id is not None:
            stops.add(self.action_end_id)
        return GuideState(compiled, sorted(stops), self.json_tables if guide.kind in JSON_KINDS else None)


def _admits_output(compiled: Any) -> bool:
    """False for a grammar under which not even the first token can be chosen (e.g. `root ::= root`)."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    return bool(bitmask.any())


def _compile(compiler: Any, guide: Guide) -> Any:
    import xgrammar as xgr

    kind, spec = guide.kind, guide.spec
    if kind == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if kind == "json_schema":
        return compiler.compile_json_schema(spec, any_whitespace=False)
    if kind == "regex":
        return compiler.compile_regex(spec)
    if kind == "choice":
        choices = json.loads(spec)
        return compiler.compile_grammar("root ::= " + " | ".join(_literal(c) for c in choices))
    if kind == "grammar":
        return compiler.compile_grammar(spec)
    return compiler.compile_grammar(_tool_call_grammar(xgr, json.loads(spec)))


def _tool_call_grammar(xgr: Any, spec: dict[str, Any]) -> Any:
    """The body of an InternLM2 action call after the forced prefix: for a named function the prompt already ends in
    `{"name": "f", "parameters": ` (so: its arguments, then `}`); else `{"name": "f", "parameters": {...}}` of any of
    the functions."""
    def params(fn: dict[str, Any]) -> Any:
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)

    close = xgr.Grammar.from_ebnf('root ::= "}"')
    functions = spec["functions"]
    if spec.get("named"):
        return xgr.Grammar.concat(params(functions[0]), close)
    calls = [xgr.Grammar.concat(xgr.Grammar.from_ebnf(
        "root ::= " + _literal('{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "parameters": ')),
        params(fn), close) for fn in functions]
    return xgr.Grammar.union(*calls) if len(calls) > 1 else calls[0]


def _bad_bytes(b: bytes) -> bool:
    """A control byte, a byte that never occurs in UTF-8, or a restricted lead byte followed (inside the token) by a
    continuation byte it forbids."""
    for k, c in enumerate(b):
        if c < 0x20 or c in (0xC0, 0xC1) or c >= 0xF5:
            return True
        if c in _LEAD_FORBIDS and k + 1 < len(b) and b[k + 1] in _LEAD_FORBIDS[c]:
            return True
    return False


def packed_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A bool vector over the vocabulary as xgrammar's bitmask row (int32 words, bit j of word w = token 32w + j)."""
    words = (allowed.numel() + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[:allowed.numel()] = allowed.to(torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


class JSONByteTables:
    """Per-vocabulary tables for the byte checks of JSON output (built once per engine), as packed bitmask rows
    ANDed into the grammar's (so a step costs one bitwise and of vocab/32 words)."""

    def __init__(self, decoded_vocab: Sequence[bytes], special: set[int], vocab_size: int):
        plain = [(i, b) for i, b in enumerate(decoded_vocab) if i not in special and b]
        # xgrammar sees some tokens as empty (the byte 00 of a byte-level vocabulary) and lets them in anywhere
        empty = [i for i, b in enumerate(decoded_vocab) if i not in special and not b]

        def allowed_without(ids: list[int]) -> torch.Tensor:
            keep = torch.ones(vocab_size, dtype=torch.bool)
            keep[torch.tensor(ids, dtype=torch.int64)] = False
            return packed_mask(keep)

        self.good = allowed_without([i for i, b in plain if _bad_bytes(b)] + empty)
        self.ends_in_lead = {i: b[-1] for i, b in plain if b[-1] in _LEAD_FORBIDS}
        self.after_lead = {lead: self.good & allowed_without([i for i, b in plain if b[0] in cont])
                           for lead, cont in _LEAD_FORBIDS.items()}


class GuideState:
    """The grammar matcher of one request: it advances with each accepted token."""

    def __init__(self, compiled: Any, stop_ids: list[int], tables: Optional[JSONByteTables] = None):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_ids or None,
                                          terminate_without_stop_token=not stop_ids)
        self.tables = tables
        self._lead = 0  # the restricted UTF-8 lead byte the output ends in (0: none)

    def accept(self, token: int) -> bool:
        """Advance by `token`; False when the grammar does not allow it (the request then fails)."""
        if self.tables is not None:
            self._lead = self.tables.ends_in_lead.get(int(token), 0)
        return bool(self.matcher.accept_token(int(token)))

    @property
    def finished(self) -> bool:
        """The grammar accepted a stop token, or (with no stop tokens) has nothing more to add."""
        return bool(self.matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of `bitmask`: the tokens allowed next (the grammar's, less the byte checks of JSON)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.tables is not None:
            bitmask[row] &= self.tables.after_lead[self._lead] if self._lead else self.tables.good


def apply_guides(logits: torch.Tensor, guides: Sequence[Optional[GuideState]]) -> torch.Tensor:
    """`logits` `[S, vocab]` with every token a row's grammar forbids set to -inf (a copy; the input is kept for
    logprobs). Rows without a guide are unchanged. One bitmask for the whole batch, applied in one call."""
    rows = [i for i, g in enumerate(guides) if g is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    # one row per batch row (xgrammar's `indices` pick rows of the logits and of the bitmask alike)
    bitmask = xgr.allocate_token_bitmask(len(guides), logits.shape[-1])
    for i in rows:
        guides[i].fill(bitmask, i)  # type: ignore[union-attr]
    out = logits.clone()
    if out.device.type == "cpu":
        xgr.apply_token_bitmask_inplace(out, bitmask, indices=None if len(rows) == len(guides) else rows)
        return out
    # other devices: unpack the bits with torch ops (xgrammar's GPU kernels need a triton matching the torch build)
    index = torch.tensor(rows, dtype=torch.int64, device=out.device)
    allowed = unpack_mask(bitmask[rows].to(out.device), out.shape[-1])
    out[index] = out[index].masked_fill(~allowed, float("-inf"))
    return out


def unpack_mask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """xgrammar's int32 bitmask rows `[B, words]` -> bool `[B, vocab]` (bit j of word w: token 32w + j)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :vocab].bool()
