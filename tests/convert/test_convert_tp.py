"""Workspaces on disk: layout, config.yaml, tp splits rebuilt independently, and the reader's round trip."""
from __future__ import annotations

import pytest
import torch
import yaml

from convert_helpers import TP8_SHAPE, copy_checkpoint, raw
from puyu.convert import load_model_weights
from puyu.convert.readers import CheckpointFiles, permute_rotary_rows, read_hf_checkpoint
from puyu.convert.workspace import read_workspace
from puyu.convert.writer import ConvertOptions, convert_checkpoint
from puyu.tiny import TinyShape

MODEL_CONFIG_KEYS = {
    "model_name", "chat_template", "model_arch", "head_num", "kv_head_num", "hidden_units", "vocab_size",
    "embedding_size", "num_layer", "inter_size", "norm_eps", "attn_bias", "size_per_head", "group_size",
    "weight_type", "session_len", "tp", "model_format", "expert_num", "expert_inter_size", "experts_per_token",
    "moe_shared_gate", "norm_topk_prob", "routed_scale", "topk_group", "topk_method", "moe_group_num", "q_lora_rank",
    "kv_lora_rank", "qk_rope_dim", "v_head_dim", "qk_norm", "tune_layer_num"}
ATTENTION_CONFIG_KEYS = {
    "rotary_embedding", "rope_theta", "softmax_scale", "attention_factor", "max_position_embeddings",
    "original_max_position_embeddings", "rope_scaling_type", "rope_scaling_factor", "use_dynamic_ntk",
    "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "use_logn_attn", "cache_block_seq_len"}
LORA_CONFIG_KEYS = {"lora_policy", "lora_r", "lora_scale", "lora_max_wo_r", "lora_rank_pattern", "lora_scale_pattern"}


def convert(src, dst, **options):
    return convert_checkpoint(src, dst, ConvertOptions(progress=False, **options))


@pytest.fixture(scope="module")
def tp8_checkpoint(checkpoint_factory):
    return checkpoint_factory("internlm2", "fp16", TP8_SHAPE)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_reader_round_trip_is_exact(tiny_checkpoint, tmp_path, tp):
    spec, expected = read_hf_checkpoint(tiny_checkpoint)
    convert(tiny_checkpoint, tmp_path / "ws", tp=tp)
    spec2, got = load_model_weights(tmp_path / "ws")  # dispatches on triton_models/
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name
    assert (spec2.num_kv_heads, spec2.intermediate_size, spec2.vocab_size) == (
        spec.num_kv_heads, spec.intermediate_size, spec.vocab_size)


def test_bf16_bits_and_dtype_override(checkpoint_factory, tmp_path):
    src = checkpoint_factory("llama", "bf16")
    _, expected = read_hf_checkpoint(src)
    convert(src, tmp_path / "bf16", tp=2)
    cfg = yaml.safe_load((tmp_path / "bf16/triton_models/weights/config.yaml").read_text())
    assert cfg["model_config"]["weight_type"] == "bfloat16"
    spec, got = read_workspace(tmp_path / "bf16")
    assert spec.torch_dtype == "bfloat16"
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    convert(src, tmp_path / "fp16", dtype="float16")
    _, half = read_workspace(tmp_path / "fp16")
    assert half["output.weight"].dtype == torch.float16
    assert torch.equal(half["output.weight"], expected["output.weight"].half())


def test_files_config_and_tokenizer_copied(internlm2_checkpoint, tmp_path):
    r = convert(internlm2_checkpoint, tmp_path / "ws", tp=2)
    root = tmp_path / "ws"
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (root / f).read_bytes() == (internlm2_checkpoint / f).read_bytes()
    text = (root / "triton_models/weights/config.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert list(cfg) == ["attention_config", "lora_config", "model_config"]
    assert text == yaml.safe_dump(cfg, sort_keys=True)
    assert set(cfg["model_config"]) == MODEL_CONFIG_KEYS
    assert set(cfg["attention_config"]) == ATTENTION_CONFIG_KEYS
    assert set(cfg["lora_config"]) == LORA_CONFIG_KEYS
    mc, spec = cfg["model_config"], r.spec
    assert mc["inter_size"] == [128] * spec.num_layers
    assert (mc["tp"], mc["group_size"], mc["weight_type"], mc["model_format"]) == (2, 0, "float16", "hf")
    assert mc["vocab_size"] == spec.vocab_size and mc["embedding_size"] == spec.vocab_size + spec.vocab_size % 2
    assert (mc["head_num"], mc["kv_head_num"], mc["size_per_head"]) == (4, 2, 16)
    assert mc["model_arch"] == "InternLM2ForCausalLM" and mc["session_len"] == 2048
    names = {p.name for p in (root / "triton_models/weights").iterdir()}
    assert {"tok_embeddings.0.weight", "tok_embeddings.1.weight", "output.1.weight", "norm.weight",
            "layers.1.attention.w_qkv.1.weight", "layers.0.attention_norm.weight"} <= names
    assert "layers.0.attention_norm.0.weight" not in names


def test_rank_written_for_tp1(internlm2_checkpoint, tmp_path):
    convert(internlm2_checkpoint, tmp_path / "ws")
    w = tmp_path / "ws/triton_models/weights"
    assert (w / "tok_embeddings.0.weight").exists() and (w / "layers.0.feed_forward.w2.0.weight").exists()


def _rebuild(ws, spec, tp: int, hkv_stored: int) -> dict[str, torch.Tensor]:
    """The tp=1 tensors rebuilt from the rank files with the spec's formulas (not puyu's merge code)."""
    w, f16 = ws / "triton_models/weights", torch.float16
    h, d, hq, inter, vocab = spec.hidden_size, spec.head_dim, spec.num_heads, spec.intermediate_size, spec.vocab_size
    vocab_pad = -(-vocab // tp) * tp
    inter_pad = -(-inter // tp) * tp
    out = {"tok_embeddings.weight": torch.cat([raw(w / f"tok_embeddings.{r}.weight", f16, (vocab_pad, h // tp))
                                               for r in range(tp)], 1)[:vocab],
           "output.weight": torch.cat([raw(w / f"output.{r}.weight", f16, (vocab_pad // tp, h))
                                       for r in range(tp)], 0)[:vocab]}
    qr, kr = hq // tp * d, hkv_stored // tp * d
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        ranks = [raw(w / f"{p}attention.w_qkv.{r}.weight", f16, (h, qr + 2 * kr)) for r in range(tp)]
        q = torch.cat([x[:, :qr] for x in ranks], 1)
        k = torch.cat([x[:, qr:qr + kr] for x in ranks], 1)
        v = torch.cat([x[:, qr + kr:] for x in ranks], 1)
        dup = hkv_stored // spec.num_kv_heads
        k = k.reshape(h, hkv_stored, d)[:, ::dup].reshape(h, -1)
        v = v.reshape(h, hkv_stored, d)[:, ::dup].reshape(h, -1)
        out[p + "attention.w_qkv.weight"] = torch.cat([q, k, v], 1)
        out[p + "attention.wo.weight"] = torch.cat(
            [raw(w / f"{p}attention.wo.{r}.weight", f16, (hq * d // tp, h)) for r in range(tp)], 0)
        for name in ("w1", "w3"):
            out[f"{p}feed_forward.{name}.weight"] = torch.cat(
                [raw(w / f"{p}feed_forward.{name}.{r}.weight", f16, (h, inter_pad // tp)) for r in range(tp)],
                1)[:, :inter]
        parts = [raw(w / f"{p}feed_forward.w2.{r}.weight", f16, (inter_pad // tp, h)) for r in range(tp)]
        out[p + "feed_forward.w2.weight"] = torch.cat(parts, 0)[:inter]
    return out


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_rebuild_full_weights_from_rank_files(tp8_checkpoint, tmp_path, tp):
    """tp=2/4/8 files put back together by the spec's rules equal the tp=1 files, padding zero."""
    r1 = convert(tp8_checkpoint, tmp_path / "tp1")
    spec = r1.spec
    _, tp1 = read_workspace(tmp_path / "tp1")
    r = convert(tp8_checkpoint, tmp_path / f"tp{tp}", tp=tp)
    hkv_stored = max(spec.num_kv_heads, tp)
    cfg = yaml.safe_load((tmp_path / f"tp{tp}/triton_models/weights/config.yaml").read_text())["model_config"]
    assert cfg["kv_head_num"] == hkv_stored and cfg["tp"] == tp
    assert cfg["inter_size"][0] == -(-100 // tp) * tp and cfg["embedding_size"] == -(-spec.vocab_size // tp) * tp
    rebuilt = _rebuild(tmp_path / f"tp{tp}", spec, tp, hkv_stored)
    for name, t in rebuilt.items():
        assert torch.equal(t, tp1[name]), name
    assert r.num_files > r1.num_files


def test_kv_heads_duplicated_adjacent(tp8_checkpoint, tmp_path):
    """At tp=8 with 2 KV heads, rank r holds KV head r // 4 (copies adjacent), and q heads r."""
    spec, full = read_hf_checkpoint(tp8_checkpoint)
    convert(tp8_checkpoint, tmp_path / "ws", tp=8)
    h, d, hq = spec.hidden_size, spec.head_dim, spec.num_heads
    qkv = full["layers.1.attention.w_qkv.weight"]
    k_full = qkv[:, hq * d:(hq + 2) * d]
    for r in range(8):
        part = raw(tmp_path / f"ws/triton_models/weights/layers.1.attention.w_qkv.{r}.weight", torch.float16,
                   (h, 3 * d))
        assert torch.equal(part[:, :d], qkv[:, r * d:(r + 1) * d])
        assert torch.equal(part[:, d:2 * d], k_full[:, (r // 4) * d:(r // 4 + 1) * d])


def test_padding_is_zero(tp8_checkpoint, tmp_path):
    spec, _ = read_hf_checkpoint(tp8_checkpoint)
    convert(tp8_checkpoint, tmp_path / "ws", tp=8)
    w, h = tmp_path / "ws/triton_models/weights", spec.hidden_size
    last_w1 = raw(w / "layers.0.feed_forward.w1.7.weight", torch.float16, (h, 13))  # 104 / 8
    assert torch.count_nonzero(last_w1[:, -4:]) == 0 and torch.count_nonzero(last_w1[:, :-4]) > 0
    last_w2 = raw(w / "layers.0.feed_forward.w2.7.weight", torch.float16, (13, h))
    assert torch.count_nonzero(last_w2[-4:]) == 0
    vocab_pad = -(-spec.vocab_size // 8) * 8
    emb = raw(w / "tok_embeddings.3.weight", torch.float16, (vocab_pad, h // 8))
    assert torch.count_nonzero(emb[spec.vocab_size:]) == 0


@pytest.mark.parametrize("rope,expected", [
    ({"type": "dynamic", "factor": 2.0}, ("dynamic", 2.0, 1, 4096)),
    ({"rope_type": "linear", "factor": 4.0}, ("linear", 4.0, 0, 8192)),
    (None, ("", 0.0, 0, 2048)),
])
def test_rope_scaling_in_attention_config(checkpoint_factory, tmp_path, rope, expected):
    src = copy_checkpoint(checkpoint_factory("internlm2"), tmp_path / "src", rope_scaling=rope, rope_theta=50000.0)
    convert(src, tmp_path / "ws")
    ac = yaml.safe_load((tmp_path / "ws/triton_models/weights/config.yaml").read_text())
    mc, ac = ac["model_config"], ac["attention_config"]
    kind, factor, dyn, session = expected
    assert (ac["rope_scaling_type"], ac["rope_scaling_factor"], ac["use_dynamic_ntk"]) == (kind, factor, dyn)
    assert (ac["rope_theta"], ac["rotary_embedding"], ac["max_position_embeddings"]) == (50000.0, 16, 2048)
    assert mc["session_len"] == session
    (tmp_path / "ws/config.json").unlink()  # the yaml alone must carry the rope settings
    spec, _ = read_workspace(tmp_path / "ws")
    assert (spec.rope_scaling_type, spec.rope_scaling_factor, spec.rope_theta) == (kind, factor, 50000.0)
    assert spec.session_len == session


@pytest.mark.parametrize("head_dim", [48, 128])
def test_internlm2_any_head_dim(checkpoint_factory, tmp_path, head_dim):
    shape = TinyShape(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    src = checkpoint_factory("internlm2", "fp16", shape)
    spec, expected = read_hf_checkpoint(src)
    assert spec.head_dim == head_dim
    convert(src, tmp_path / "ws", tp=2)
    _, got = read_workspace(tmp_path / "ws")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # rank 1 holds q head 1 with its rows permuted to interleaved pairs
    h = spec.hidden_size
    hf = CheckpointFiles(src).get("model.layers.0.attention.wqkv.weight")  # rows [q0, q1, k0, v0] (one KV head)
    q1 = permute_rotary_rows(hf[head_dim:2 * head_dim], 1, head_dim)
    part = raw(tmp_path / "ws/triton_models/weights/layers.0.attention.w_qkv.1.weight", torch.float16,
               (h, 3 * head_dim))
    assert torch.equal(part[:, :head_dim], q1.t())


def test_workspace_without_config_json(tiny_checkpoint, tmp_path):
    """An LMDeploy-style workspace whose root lacks config.json is read from config.yaml alone."""
    _, expected = read_hf_checkpoint(tiny_checkpoint)
    convert(tiny_checkpoint, tmp_path / "ws")
    (tmp_path / "ws/config.json").unlink()
    cfg_path = tmp_path / "ws/triton_models/weights/config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model_config"]["inter_size"] = cfg["model_config"]["inter_size"][0]  # older writers: a number
    cfg["model_config"]["weight_type"] = "fp16"
    cfg_path.write_text(yaml.safe_dump(cfg))
    spec, got = read_workspace(tmp_path / "ws")
    assert spec.eos_token_ids and spec.arch in ("internlm2", "llama", "qwen2")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_tp1_workspace_is_memory_mapped(internlm2_checkpoint, tmp_path):
    """At tp=1 the tensors are views of the files themselves (mapped, not read into memory): a byte written to
    the file afterwards shows through (Linux maps untouched private pages from the page cache)."""
    convert(internlm2_checkpoint, tmp_path / "ws")
    _, w = read_workspace(tmp_path / "ws")
    t = w["layers.1.feed_forward.w2.weight"]
    with open(tmp_path / "ws/triton_models/weights/layers.1.feed_forward.w2.0.weight", "r+b") as f:
        f.write(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16).numpy().tobytes())
    assert t[0, :3].tolist() == [1.0, 2.0, 3.0]


def test_bin_checkpoint_converts_and_pickles_are_refused(checkpoint_factory, tmp_path, capsys):
    """`.bin` weights load with torch.load(weights_only=True): tensors convert, arbitrary pickles are refused."""
    from puyu.cli import main

    src = checkpoint_factory("qwen2")
    _, expected = read_hf_checkpoint(src)
    files = CheckpointFiles(src)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json" and not f.name.endswith(".index.json"):
            (bin_dir / f.name).write_bytes(f.read_bytes())
    torch.save({n: files.get(n) for n in files.names()}, bin_dir / "pytorch_model.bin")
    assert main(["convert", str(bin_dir), "--dst-path", str(tmp_path / "ws"), "--tp", "2", "--no-progress"]) == 0
    _, got = read_workspace(tmp_path / "ws")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    torch.save({"payload": _NotATensor()}, bin_dir / "pytorch_model.bin")
    assert main(["convert", str(bin_dir), "--dst-path", str(tmp_path / "ws2"), "--no-progress"]) == 2
    assert "weights_only=True" in capsys.readouterr().err
    assert not (tmp_path / "ws2").exists()


class _NotATensor:
    """Any pickled object other than tensors (a real attack would run code in __reduce__)."""
