"""The HF readers produce TurboMind's layout: checked by undoing each transform and by a tiny forward pass."""
import json

import pytest
import torch

from puyu.convert.readers import CheckpointFiles, permute_rotary_rows, read_hf_checkpoint
from puyu.convert.spec import CheckpointError, read_model_spec


def test_permutation_matches_spec_formula():
    heads, d = 3, 8
    old = torch.arange(heads * d).float()
    new = permute_rotary_rows(old, heads, d)
    for h in range(heads):
        for j in range(d // 2):
            for s in (0, 1):
                assert new[h * d + 2 * j + s] == old[h * d + s * d // 2 + j]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reader_shapes(checkpoint_factory, arch, dtype):
    path = checkpoint_factory(arch, dtype)
    spec, w = read_hf_checkpoint(path)
    assert spec.arch == arch
    h, d = spec.hidden_size, spec.head_dim
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * d
    assert w["layers.0.attention.w_qkv.weight"].shape == (h, qkv)
    assert w["layers.0.attention.wo.weight"].shape == (spec.num_heads * d, h)
    assert w["layers.0.feed_forward.w2.weight"].shape == (spec.intermediate_size, h)
    assert w["output.weight"].shape == (spec.vocab_size, h)
    assert ("layers.0.attention.w_qkv.bias" in w) == (arch == "qwen2")
    assert w["tok_embeddings.weight"].dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def test_internlm2_and_llama_same_seed_give_same_layout(checkpoint_factory):
    _, a = read_hf_checkpoint(checkpoint_factory("internlm2"))
    _, b = read_hf_checkpoint(checkpoint_factory("llama"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_unknown_architecture(tmp_path, checkpoint_factory):
    src = checkpoint_factory("llama")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture 'MambaForCausalLM'"):
        read_model_spec(tmp_path)


def test_missing_and_corrupt_shard(tmp_path, checkpoint_factory):
    src = checkpoint_factory("qwen2")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        read_hf_checkpoint(tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointFiles(tmp_path)


@pytest.mark.parametrize("arch_key", ["internlm2", "llama", "qwen2"])
def test_every_architecture_is_one_layout_in_the_registry(checkpoint_factory, arch_key):
    """The HF names live once, in puyu/convert/archs/: spec's architectures come from it, and the tiny fixtures
    (written through the layouts) read back through the same layouts with every tensor used."""
    from puyu.convert.archs import HF_ARCHITECTURES, LAYOUTS, layout
    from puyu.convert.readers import CheckpointFiles, iter_turbomind_tensors
    from puyu.convert.spec import SUPPORTED_ARCHS, read_model_spec

    path = checkpoint_factory(arch_key)
    files, used = CheckpointFiles(path), set()
    get = files.get
    files.get = lambda name: used.add(name) or get(name)  # type: ignore[method-assign]
    list(iter_turbomind_tensors(files, read_model_spec(path)))
    assert used == set(files.names())

    assert SUPPORTED_ARCHS == HF_ARCHITECTURES
    assert set(HF_ARCHITECTURES.values()) == set(LAYOUTS)
    for key, names in LAYOUTS.items():
        assert layout(key) is names and len(names.linears) in (5, 7)
    with pytest.raises(KeyError, match="known: internlm2, llama, qwen2"):
        layout("mamba")
