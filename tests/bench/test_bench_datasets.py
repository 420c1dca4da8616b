"""Datasets with the target's real tokenizer: token-exact random prompts, range modes, ShareGPT, shared prefix,
JSONL."""
from __future__ import annotations

import json

import pytest

from puyu.bench.datasets import (DatasetConfig, SHAREGPT_MAX_PROMPT, length_bounds, load_dataset,
                                 write_sharegpt_file)
from puyu.bench.tokenizer import load_tokenizer
from puyu.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return load_tokenizer(str(d))


def n_tokens(tok, text):
    return len(tok.encode(text, add_special_tokens=False))


def test_random_prompts_are_token_exact(tokenizer):
    samples = load_dataset(DatasetConfig("random", num_prompts=20, input_len=64, output_len=32, seed=3), tokenizer)
    assert len(samples) == 20
    for s in samples:
        assert s.prompt_len == 64 == n_tokens(tokenizer, s.prompt)
        assert s.output_len == 32
    again = load_dataset(DatasetConfig("random", num_prompts=20, input_len=64, output_len=32, seed=3), tokenizer)
    assert [s.prompt for s in again] == [s.prompt for s in samples]  # seeded
    other = load_dataset(DatasetConfig("random", num_prompts=20, input_len=64, output_len=32, seed=4), tokenizer)
    assert [s.prompt for s in other] != [s.prompt for s in samples]


def test_range_modes():
    assert length_bounds(100, 0.25, "vllm") == (75, 125)
    assert length_bounds(100, 0.25, "sglang") == (25, 100)
    assert length_bounds(100, 1.0, "sglang") == (100, 100)


@pytest.mark.parametrize("mode,ratio,lo,hi", [("vllm", 0.5, 20, 60), ("sglang", 0.5, 20, 40)])
def test_random_lengths_stay_within_the_mode_bounds(tokenizer, mode, ratio, lo, hi):
    cfg = DatasetConfig("random", num_prompts=40, input_len=40, output_len=40, range_ratio=ratio, range_mode=mode)
    samples = load_dataset(cfg, tokenizer)
    ins, outs = [s.prompt_len for s in samples], [s.output_len for s in samples]
    assert lo <= min(ins) and max(ins) <= hi and lo <= min(outs) and max(outs) <= hi
    assert len(set(ins)) > 5  # actually spread out
    for s in samples:
        assert s.prompt_len == n_tokens(tokenizer, s.prompt)


def test_output_range_ratio_can_fix_outputs(tokenizer):
    cfg = DatasetConfig("random", num_prompts=20, input_len=30, output_len=16, range_ratio=0.5, output_range_ratio=0)
    samples = load_dataset(cfg, tokenizer)
    assert {s.output_len for s in samples} == {16} and len({s.prompt_len for s in samples}) > 3
    cfg.output_range_ratio = 0.25
    assert {s.output_len for s in load_dataset(cfg, tokenizer)} <= set(range(12, 21))


@pytest.mark.parametrize("mode,ratio", [("vllm", 1.0), ("sglang", 0.0), ("vllm", -0.1)])
def test_bad_range_ratio_names_the_option(mode, ratio):
    with pytest.raises(ValueError, match="--range-ratio"):
        DatasetConfig("random", range_ratio=ratio, range_mode=mode).validate()


def test_sharegpt_file_is_generated_and_filtered(tokenizer, tmp_path):
    path = write_sharegpt_file(tmp_path / "sg.json", num_conversations=30, seed=1)
    data = json.loads(path.read_text())
    assert len(data) == 30 and data[0]["conversations"][0]["from"] == "human"
    # one prompt too long and one reply too short: both filtered out
    data.append({"conversations": [{"from": "human", "value": "word " * (SHAREGPT_MAX_PROMPT + 10)},
                                   {"from": "gpt", "value": "a long enough reply here"}]})
    data.append({"conversations": [{"from": "human", "value": "a normal prompt with words"},
                                   {"from": "gpt", "value": "ok"}]})
    path.write_text(json.dumps(data))
    samples = load_dataset(DatasetConfig("sharegpt", path=str(path), num_prompts=100), tokenizer)
    assert 0 < len(samples) <= 30
    for s in samples:
        assert 4 <= s.prompt_len <= SHAREGPT_MAX_PROMPT and s.output_len >= 4
        assert s.prompt_len == n_tokens(tokenizer, s.prompt)
    fixed = load_dataset(DatasetConfig("sharegpt", path=str(path), num_prompts=5), tokenizer, fixed_output_len=7)
    assert len(fixed) == 5 and {s.output_len for s in fixed} == {7}


def test_sharegpt_errors_name_the_file(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_dataset(DatasetConfig("sharegpt", path=str(tmp_path / "missing.json")), tokenizer)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_dataset(DatasetConfig("sharegpt", path=str(bad)), tokenizer)
    with pytest.raises(ValueError, match="--dataset-path is required"):
        load_dataset(DatasetConfig("sharegpt"), tokenizer)


def test_shared_prefix_groups(tokenizer):
    cfg = DatasetConfig("shared-prefix", num_prompts=8, input_len=16, output_len=8, prefix_len=48, num_groups=2)
    samples = load_dataset(cfg, tokenizer)
    heads = {s.prompt.split("\n")[0] for s in samples}
    assert len(heads) == 2
    assert samples[0].prompt.split("\n")[0] == samples[2].prompt.split("\n")[0]
    assert len({s.prompt for s in samples}) == 8
    for s in samples:
        assert s.prompt_len == n_tokens(tokenizer, s.prompt) and s.prompt_len >= 48 + 16


def test_jsonl(tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 5}\n\n{"prompt": "the quick brown fox"}\n')
    samples = load_dataset(DatasetConfig("jsonl", path=str(path), output_len=9), tokenizer)
    assert [(s.output_len, s.prompt_len) for s in samples] == [(5, n_tokens(tokenizer, "hello there")),
                                                               (9, n_tokens(tokenizer, "the quick brown fox"))]
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        load_dataset(DatasetConfig("jsonl", path=str(path)), tokenizer)


def test_tokenizer_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(str(tmp_path))  # a directory without a tokenizer
