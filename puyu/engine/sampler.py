"""Sampler: the next token of each sequence from its logits and its GenerationConfig.

Order per row: the grammar's token bitmask (constrained decoding, see grammar.py), logit_bias, repetition penalty (over prompt and output, as transformers: divide positive logits, multiply negative
ones), presence/frequency penalties (over the output, as OpenAI), the stop ids masked while `min_new_tokens` is not
reached, then greedy argmax, or temperature -> top-k -> top-p -> min-p -> a draw from the request's own generator (so a seed
gives the same tokens whatever else is in the batch). Logprobs come from the model's distribution (log-softmax of the
raw logits, before the grammar, penalties and temperature), the chosen token first, then the top-k alternatives.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import torch

from ..config import GenerationConfig
from .grammar import GuideState, apply_guides


@dataclass
class SampleRequest:
    """What the sampler needs of one sequence."""

    gen_config: GenerationConfig
    prompt_ids: Seq[int]
    output_ids: Seq[int]
    stop_ids: Seq[int]  # ids that end the sequence (masked before min_new_tokens)
    generator: Optional[torch.Generator]
    guide: Optional[GuideState] = None  # the grammar matcher of a constrained request


def apply_penalties(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    g = req.gen_config
    if g.logit_bias:
        ids = torch.tensor(list(g.logit_bias), dtype=torch.int64, device=logits.device)
        bias = torch.tensor(list(g.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(0, ids, bias)
    if g.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.prompt_ids) | set(req.output_ids)), dtype=torch.int64,
                            device=logits.device)
        if seen.numel():
            vals = logits.index_select(0, seen)
            vals = torch.where(vals < 0, vals * g.repetition_penalty, vals / g.repetition_penalty)
            logits = logits.index_copy(0, seen, vals)
    if (g.presence_penalty or g.frequency_penalty) and req.output_ids:
        counts = Counter(req.output_ids)
        ids = torch.tensor(list(counts), dtype=torch.int64, device=logits.device)
        n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(0, ids, -(g.presence_penalty + g.frequency_penalty * n))
    return logits


def mask_stop_ids(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    """Stop ids masked below min_new_tokens, unless a complete grammar leaves nothing else (the grammar wins)."""
    if len(req.output_ids) < req.gen_config.min_new_tokens and req.stop_ids:
        masked = logits.clone()
        masked[torch.tensor(list(req.stop_ids), dtype=torch.int64, device=logits.device)] = float("-inf")
        if req.guide is None or torch.isfinite(masked).any():
            return masked
    return logits


def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Logits with everything outside the top-k, the top-p nucleus and the min-p floor set to -inf (at least one
    token stays: the most likely one passes every cut)."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        cum_before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
        drop = cum_before >= top_p
        drop[0] = False
        logits = logits.index_put((order[drop],), torch.tensor(float("-inf"), device=logits.device))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def choose(logits: torch.Tensor, req: SampleRequest) -> int:
    g = req.gen_config
    if g.greedy:
        return int(torch.argmax(logits))
    logits = logits / float(g.temperature)
    logits = top_k_top_p(logits, g.top_k, g.top_p, g.min_p)
    probs = logits.softmax(-1).cpu()  # draws on cpu: the request's generator lives there
    return int(torch.multinomial(probs, 1, generator=req.generator))


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> dict[int, float]:
    lp = torch.log_softmax(logits, -1)
    out = {token: float(lp[token])}
    if k:
        vals, ids = torch.topk(lp, k)
        for v, i in zip(vals.tolist(), ids.tolist()):
            out.setdefault(i, v)
    return out


class SamplingFailed(Exception):
    """Sampling one row failed (e.g. its adjusted distribution is not finite); only that request fails."""


def sample(logits: torch.Tensor,
           requests: list[SampleRequest]) -> tuple[list[int | SamplingFailed], list[Optional[dict[int, float]]]]:
    """Next token (and logprobs when asked) for each row of float32 `logits` `[S, vocab]`.

    A row whose sampling fails yields a `SamplingFailed` in place of its token, so that one bad request does not
    take down the others of the batch.
    """
    tokens: list[int | SamplingFailed] = []
    logprobs: list[Optional[dict[int, float]]] = []
    guided = apply_guides(logits, [r.guide for r in requests])
    plain = all(r.gen_config.greedy and _no_adjustments(r) for r in requests)
    if plain:  # the common greedy case in one call
        tokens = torch.argmax(guided, dim=-1).tolist()
    for row, req in enumerate(requests):
        if not plain:
            tokens.append(_choose_or_fail(mask_stop_ids(apply_penalties(guided[row], req), req), req))
        k, token = req.gen_config.logprobs, tokens[row]
        logprobs.append(token_logprobs(logits[row], token, k) if not isinstance(token, SamplingFailed) and k is not None
                        else None)
    return tokens, logprobs


def _choose_or_fail(logits: torch.Tensor, req: SampleRequest) -> int | SamplingFailed:
    if not torch.isfinite(logits).any():
        return SamplingFailed("sampling failed: no finite logit after penalties and temperature")
    try:
        return choose(logits, req)
    except RuntimeError as exc:  # torch.multinomial on nan/inf probabilities
        return SamplingFailed(f"sampling failed: {exc}")


def _no_adjustments(req: SampleRequest) -> bool:
    g = req.gen_config
    return (g.repetition_penalty == 1.0 and not g.logit_bias and not g.presence_penalty and not g.frequency_penalty
            and len(req.output_ids) >= g.min_new_tokens)


def make_generator(seed: Optional[int]) -> torch.Generator:
    """The request's own generator: seeded when asked, else from the OS."""
    import random

    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2 ** 63))
    return gen
