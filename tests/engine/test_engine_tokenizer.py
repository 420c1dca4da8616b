"""Tokenizer wrapper: chat template, stop ids, id bounds, incremental detokenisation, the sentencepiece fallback."""
from __future__ import annotations

import io
import json
import shutil

import pytest

from puyu.convert.spec import CheckpointError
from puyu.chat_templates import INTERNLM2_CHAT_TEMPLATE
from puyu.tokenizer import Tokenizer

TEXT = "你好，我是书生·浦语，很高兴为你服务。Hello, how are you? 俺老猪是天蓬元帅下凡"


@pytest.fixture(scope="module")
def tok(internlm2_checkpoint):
    return Tokenizer(internlm2_checkpoint)


def test_chat_template_renders_the_internlm2_protocol(tok):
    messages = [{"role": "system", "name": "plugin", "content": "[]"},
                {"role": "user", "name": "file", "content": "{}"},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    assert tok.apply_chat_template(messages) == (
        "<s><|im_start|>system name=<|plugin|>\n[]<|im_end|>\n<|im_start|>user name=file\n{}<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n<|im_start|>assistant\n")


def test_stop_ids_include_eos_and_im_end(tok):
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end is not None and im_end in tok.stop_token_ids
    assert tok.token_to_id("</s>") in tok.stop_token_ids


def test_checkpoint_template_preferred_else_ours(internlm2_checkpoint, tmp_path):
    own = tmp_path / "own"
    shutil.copytree(internlm2_checkpoint, own)
    cfg = json.loads((own / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (own / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(own).apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"
    del cfg["chat_template"]
    (own / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(own).chat_template == INTERNLM2_CHAT_TEMPLATE
    (own / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    assert Tokenizer(own).apply_chat_template([{"role": "user", "content": "hi"}]) == "<hi>"


def test_no_internlm2_template_for_other_architectures(checkpoint_factory, tmp_path):
    """A Llama checkpoint without a template must not be rendered with InternLM2's (SmolLM2's prompt came out as
    `<|im_start|><|im_start|>user` without its system prompt): chat requests are refused with a clear message."""
    own = tmp_path / "llama"
    shutil.copytree(checkpoint_factory("llama", "fp16"), own)
    cfg = json.loads((own / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (own / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(own)
    assert tok.chat_template == ""
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_ids_beyond_the_embedding_rows_are_refused(internlm2_checkpoint, tok):
    small = Tokenizer(internlm2_checkpoint, vocab_rows=tok.token_to_id("<|im_end|>") + 1)
    with pytest.raises(ValueError, match="out of range"):
        small.check_ids([small.vocab_rows])
    with pytest.raises(CheckpointError, match="<\\|im_end\\|>"):
        Tokenizer(internlm2_checkpoint, vocab_rows=tok.token_to_id("<|im_end|>"))


def test_incremental_detokenizer_never_emits_half_a_character(tok):
    ids = tok.encode(TEXT)
    detok = tok.detokenizer()
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == TEXT == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some ids were only part of a character


def test_special_tokens_kept_or_skipped(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids) == "user\nhi"


@pytest.fixture(scope="module")
def sp_checkpoint(tmp_path_factory, internlm2_checkpoint):
    """An InternLM2-like tokenizer.model whose protocol tokens are placeholder pieces, and no tokenizer.json."""
    spm = pytest.importorskip("sentencepiece")
    out = tmp_path_factory.mktemp("sp")
    placeholders = [f"[UNUSED_TOKEN_{i}]" for i in range(141, 147)]
    corpus = [TEXT, "The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=330, minloglevel=2, hard_vocab_limit=False,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=False, split_by_whitespace=True,
                                   user_defined_symbols=placeholders, byte_fallback=True, character_coverage=1.0)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "add_bos_token": True}))
    return out


def test_sentencepiece_fallback_maps_protocol_tokens(sp_checkpoint):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_checkpoint / "tokenizer.model"))
    tok = Tokenizer(sp_checkpoint)
    im_start, im_end = sp.piece_to_id("[UNUSED_TOKEN_146]"), sp.piece_to_id("[UNUSED_TOKEN_145]")
    assert tok.token_to_id("<|im_start|>") == im_start and tok.token_to_id("<|im_end|>") == im_end
    assert im_end in tok.stop_token_ids and sp.eos_id() in tok.stop_token_ids
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    ids = tok.encode(rendered, add_special_tokens=False)
    assert ids[0] == sp.bos_id() and ids[1] == im_start and im_end in ids
    assert tok.decode(ids, skip_special_tokens=False) == rendered
    plain = tok.encode("hello")
    assert plain[0] == sp.bos_id()  # add_bos_token
    detok = tok.detokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids) and not any("\ufffd" in d for d in deltas)
