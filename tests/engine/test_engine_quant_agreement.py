"""KV int8/int4 through the whole engine: next-token agreement with the unquantised cache (figures printed with -s).

Teacher-forced: for every prefix `prompt + reference[:k]` of the unquantised greedy run, does the engine with a
quantised cache pick the same next token? (Free-running agreement says little: after the first difference the
contexts differ.) The formulas themselves are tested in test_engine_kvquant.py.
"""
from __future__ import annotations

import pytest

from engine_helpers import greedy, make_prompts

LENGTHS = (9, 23, 40, 57)
NEW = 24
# measured on the fixture (random weights, head_dim 16, so int4 is coarse): int8 0.99, int4 0.75; see the report
MIN_AGREEMENT = {0: 1.0, 8: 0.95, 4: 0.6}


@pytest.fixture(scope="module")
def baseline(internlm2_checkpoint):
    from puyu.engine.pipeline import pipeline

    with pipeline(internlm2_checkpoint, cache_max_entry_count=64, cache_block_seq_len=16, dtype="float32") as pipe:
        prompts = make_prompts(pipe.engine.spec.vocab_size, LENGTHS, seed=21)
        return prompts, [r.token_ids for r in pipe(prompts, greedy(NEW))]


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_quantised_cache_agrees_with_unquantised(quant_policy, baseline, internlm2_checkpoint, make_pipeline):
    prompts, expected = baseline
    pipe = make_pipeline(internlm2_checkpoint, quant_policy=quant_policy, cache_max_entry_count=128)
    assert pipe.stats()["quant_policy"] == quant_policy
    forced = [p + e[:k] for p, e in zip(prompts, expected) for k in range(NEW)]
    want = [e[k] for e in expected for k in range(NEW)]
    got = [r.token_ids[0] for r in pipe(forced, greedy(1))]
    agreement = sum(g == w for g, w in zip(got, want)) / len(want)
    print(f"\nquant_policy={quant_policy}: teacher-forced next-token agreement {agreement:.3f} ({len(want)} steps)")
    assert agreement >= MIN_AGREEMENT[quant_policy]
