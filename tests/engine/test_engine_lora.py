"""PEFT LoRA adapters in the engine, against transformers + peft on the tiny InternLM2 / Llama / Qwen2 checkpoints.

Two random adapters built by peft itself (`get_peft_model` + `save_pretrained`, non-zero B): one on every linear,
one on q/v/down only with rsLoRA. One batch mixes both adapters and the base model; logits within 1e-4 and 24 greedy
tokens identical to peft's forward (InternLM2: transformers on the peft-merged checkpoint). Prefix-cache blocks are
never shared between adapters; bad adapters fail with the file and field named.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine_helpers import DEVICE, greedy, make_prompts, reference_greedy
from puyu.config import GenerationConfig
from puyu.convert import load_model_weights
from puyu.convert.archs import layout
from puyu.engine.block_manager import BlockManager
from puyu.engine.kv_cache import KVCacheStorage
from puyu.engine.lora import RowLora
from puyu.engine.model import DecoderModel
from puyu.engine.model_runner import ModelRunner
from puyu.engine.peft_adapter import AdapterError, load_peft_adapter
from puyu.engine.sequence import ScheduledSeq, Sequence
from puyu.tiny_lora import build_peft_adapter, peft_reference

pytest.importorskip("peft")

LENGTHS = (9, 37, 20, 33)
ADAPTER_OF = (None, "all", "qvd", "all")  # per prompt: the base model, then the adapters
NEW = 24


def _arch(path) -> str:
    from puyu.convert.spec import read_model_spec

    return read_model_spec(path).arch


def _targets(arch: str, which: str) -> list[str]:
    names = layout(arch)
    short = [n.rsplit(".", 1)[-1] for n in names.linears]
    if which == "all":
        return short
    qv = [short[0]] if len(names.qkv) == 1 else [short[0], short[2]]  # InternLM2's one wqkv; else q_proj, v_proj
    return [*qv, names.down.rsplit(".", 1)[-1]]


@pytest.fixture(scope="module")
def lora_case(tiny_checkpoint, reference_model, tmp_path_factory):
    """The checkpoint, its adapters {name: dir}, and per adapter name (None: base) the transformers reference."""
    root = tmp_path_factory.mktemp("lora")
    key = _arch(tiny_checkpoint)
    adapters = {
        "all": build_peft_adapter(tiny_checkpoint, root / "all", _targets(key, "all"), r=4, alpha=8, seed=1),
        "qvd": build_peft_adapter(tiny_checkpoint, root / "qvd", _targets(key, "qvd"), r=2, alpha=4, seed=2,
                                  use_rslora=True),
    }
    refs = {None: reference_model(tiny_checkpoint)}
    refs.update({n: peft_reference(tiny_checkpoint, d, root / f"merged-{n}") for n, d in adapters.items()})
    return tiny_checkpoint, adapters, refs


def test_adapters_change_the_reference(lora_case):
    """The proof below is not vacuous: each adapter moves transformers' logits far beyond the tolerance."""
    _, _, refs = lora_case
    prompt = torch.tensor([make_prompts(refs[None].config.vocab_size, (12,))[0]])
    with torch.no_grad():
        base = refs[None](prompt).logits
        for name in ("all", "qvd"):
            assert (refs[name](prompt).logits - base).abs().max() > 0.05


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_mixed_batch_logits_match_peft(lora_case, kernels):
    """One prefill step over the base model and both adapters' rows, then one decode step, against peft; on the
    torch reference path and on puyu's cpu kernels (fused residual + RMSNorm and rotary + cache write)."""
    path, adapters, refs = lora_case
    spec, weights = load_model_weights(path, torch.float32)
    device = torch.device(DEVICE)
    model = DecoderModel(spec, {k: v.to(device) for k, v in weights.items()}, device, kernels)
    model.lora = RowLora({n: load_peft_adapter(d, spec, torch.float32, device) for n, d in adapters.items()})
    cache = KVCacheStorage(spec.num_layers, 32, 16, spec.num_kv_heads, spec.head_dim, torch.float32, device)
    bm = BlockManager(32, 16)
    prompts = make_prompts(spec.vocab_size, LENGTHS)
    seqs = [Sequence(str(i), p, GenerationConfig(adapter_name=a)) for i, (p, a) in enumerate(zip(prompts, ADAPTER_OF))]
    for s in seqs:
        assert bm.allocate(s, len(s))
    runner = ModelRunner(model, cache)
    logits = runner.run([ScheduledSeq(s, 0, len(s)) for s in seqs]).cpu()
    for s, t in zip(seqs, logits.argmax(-1).tolist()):
        s.num_computed = len(s)
        s.output_ids.append(t)
        assert bm.allocate(s, len(s))
    decode = runner.run([ScheduledSeq(s, len(s) - 1, 1) for s in seqs]).cpu()
    with torch.no_grad():
        for i, s in enumerate(seqs):
            expect = refs[ADAPTER_OF[i]](torch.tensor([s.token_ids])).logits[0]
            torch.testing.assert_close(logits[i], expect[-2], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(decode[i], expect[-1], atol=1e-4, rtol=1e-4)


def test_mixed_batch_greedy_matches_peft(lora_case, make_pipeline):
    """Through the pipeline: one batch of the base model and two adapters, each request's own greedy tokens."""
    path, adapters, refs = lora_case
    pipe = make_pipeline(path, adapters=adapters)  # kernels 'auto': the fused cpu steps carry the adapters too
    prompts = make_prompts(refs[None].config.vocab_size, LENGTHS)
    out = pipe(prompts, [greedy(NEW, adapter_name=a) for a in ADAPTER_OF])
    expected = [reference_greedy(refs[a], p, NEW) for p, a in zip(prompts, ADAPTER_OF)]
    assert [r.token_ids for r in out] == expected
    assert expected[1] != reference_greedy(refs[None], prompts[1], NEW)  # the adapter changes the tokens


def test_prefix_cache_is_keyed_by_adapter(lora_case, make_pipeline):
    """The same 48-token prompt under the base model, then adapter 'all': no block is shared (its K/V differ);
    again under 'all': its own blocks are reused; after unloading and reloading 'all', no stale block is."""
    path, adapters, refs = lora_case
    pipe = make_pipeline(path)
    pipe.load_adapter("all", adapters["all"])
    prompt = make_prompts(refs[None].config.vocab_size, (48,), seed=3)[0]
    expected = reference_greedy(refs["all"], prompt, 8)

    def hit_tokens(adapter):
        before = pipe.stats()["prefix_cache_hit_tokens"]
        out = pipe(prompt, greedy(8, adapter_name=adapter))
        return pipe.stats()["prefix_cache_hit_tokens"] - before, out.token_ids

    assert hit_tokens(None)[0] == 0
    assert hit_tokens("all") == (0, expected)
    assert hit_tokens("all") == (32, expected)
    pipe.unload_adapter("all")
    pipe.load_adapter("all", adapters["all"])
    assert hit_tokens("all") == (0, expected)
    assert hit_tokens(None)[0] == 32


def test_unknown_adapter_name_is_refused(lora_case, make_pipeline):
    path, adapters, _ = lora_case
    pipe = make_pipeline(path)
    with pytest.raises(ValueError, match="adapter_name: no adapter 'nope' is loaded"):
        pipe("hello", greedy(2, adapter_name="nope"))
    pipe.load_adapter("all", adapters["all"])
    with pytest.raises(ValueError, match="lora_name: adapter 'all' is already loaded"):
        pipe.load_adapter("all", adapters["all"])
    pipe.unload_adapter("all")
    with pytest.raises(ValueError, match="lora_name: no adapter 'all' is loaded"):
        pipe.unload_adapter("all")


def _broken(tmp_path, source, edit):
    out = tmp_path / "broken"
    shutil.copytree(source, out)
    edit(out)
    return out


def _edit_config(**changes):
    def edit(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


def _widen_first_a(d):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    save_file(tensors, str(d / "adapter_model.safetensors"))


@pytest.mark.parametrize("edit, file, field", [
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json", "file"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors", "file"),
    (_edit_config(target_modules=["q_proj", "wq_nope"]), "adapter_config.json", "target_modules"),
    (_edit_config(r="four"), "adapter_config.json", "r"),
    (_edit_config(use_dora=True), "adapter_config.json", "use_dora"),
    (_widen_first_a, "adapter_model.safetensors", "lora_A.weight"),
])
def test_bad_adapters_name_file_and_field(lora_case, tmp_path, edit, file, field):
    path, adapters, _ = lora_case
    spec, _ = load_model_weights(path, torch.float32)
    bad = _broken(tmp_path, adapters["all"], edit)
    with pytest.raises(AdapterError) as info:
        load_peft_adapter(bad, spec, torch.float32, torch.device("cpu"))
    message = str(info.value)
    assert message.startswith(str(bad / file)) and field in message, message


def test_missing_adapter_directory(lora_case, tmp_path):
    path, _, _ = lora_case
    spec, _ = load_model_weights(path, torch.float32)
    with pytest.raises(AdapterError, match="no such adapter directory"):
        load_peft_adapter(tmp_path / "absent", spec, torch.float32, torch.device("cpu"))


def test_adapter_of_another_base_is_refused(lora_case, checkpoint_factory, tmp_path):
    """An adapter trained for a wider model fails on the shapes, naming the tensor."""
    from puyu.tiny import TinyShape

    path, _, _ = lora_case
    key = _arch(path)
    wide = checkpoint_factory(key, "fp16", TinyShape(hidden_size=96, num_attention_heads=6, num_key_value_heads=2))
    other = build_peft_adapter(wide, tmp_path / "wide", _targets(key, "all"))
    spec, _ = load_model_weights(path, torch.float32)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: model\.layers\.\d+\..*lora_[AB]\.weight: shape"):
        load_peft_adapter(other, spec, torch.float32, torch.device("cpu"))
