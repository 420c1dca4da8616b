"""4-bit weights: AWQ packing, `puyu quantize`, int4 workspace files, Int4Linear."""
from __future__ import annotations

import json

import pytest
import torch

from convert_helpers import INT4_SHAPE, raw
from puyu.cli import main
from puyu.convert.awq import quantize_rtn
from puyu.int4_packing import AWQ_ORDER, pack_awq, pack_int4, unpack_awq, unpack_int4
from puyu.convert.readers import CheckpointFiles, permute_rotary_rows, read_hf_checkpoint
from puyu.convert.workspace import read_workspace
from puyu.engine.int4 import Int4Linear


def _unpack_awq_by_hand(words: torch.Tensor) -> torch.Tensor:
    """The spec's sentence, literally: nibble i of word w holds column 8w + [0,2,4,6,1,3,5,7][i]."""
    rows, cols = words.shape
    out = torch.zeros(rows, cols * 8, dtype=torch.int64)
    for i, column in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
        out[:, column::8] = (words.long() >> (4 * i)) & 15
    return out


def _unpack_natural_by_hand(words: torch.Tensor) -> torch.Tensor:
    rows, cols = words.shape
    out = torch.zeros(rows, cols * 8, dtype=torch.int64)
    for i in range(8):
        out[:, i::8] = (words.long() >> (4 * i)) & 15
    return out


def test_packings_round_trip_and_orders():
    values = torch.randint(0, 16, (5, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(values)), values)
    assert torch.equal(unpack_awq(pack_awq(values)), values)
    assert torch.equal(_unpack_awq_by_hand(pack_awq(values)), values.long())
    assert torch.equal(_unpack_natural_by_hand(pack_int4(values)), values.long())
    word = torch.tensor([[0x76543210]], dtype=torch.int32)  # nibble i holds the value i
    assert unpack_int4(word).tolist() == [list(range(8))]
    assert unpack_awq(word)[0, list(AWQ_ORDER)].tolist() == list(range(8))
    high = torch.full((1, 8), 15, dtype=torch.uint8)  # all bits set: the sign bit of int32 must survive
    assert pack_int4(high).item() == -1 and torch.equal(unpack_int4(pack_int4(high)), high)


def test_rtn_quantisation_error_bounded():
    w = torch.randn(256, 48, generator=torch.Generator().manual_seed(2))
    q = quantize_rtn(w, 64)
    assert q.q.max() <= 15 and q.zeros.max() <= 15
    err = (q.dequantize() - w).abs()
    bound = q.scales.float().repeat_interleave(64, 0) / 2 + 1e-3
    assert torch.all(err <= bound)
    assert err.mean() < 0.1 * w.abs().mean()


def _quantized(checkpoint_factory, tmp_path_factory, group: int):
    src = checkpoint_factory("llama", "fp16", INT4_SHAPE)
    dst = tmp_path_factory.mktemp("awq") / f"llama-awq-{group}"
    assert main(["quantize", str(src), "--dst-path", str(dst), "--group-size", str(group)]) == 0
    return src, dst


@pytest.fixture(scope="module")
def awq_checkpoint(checkpoint_factory, tmp_path_factory):
    return _quantized(checkpoint_factory, tmp_path_factory, 128)


@pytest.fixture(scope="module")
def awq64_checkpoint(checkpoint_factory, tmp_path_factory):
    """Group 64, so that tp=4 splits the attention output (256 rows) into whole groups."""
    return _quantized(checkpoint_factory, tmp_path_factory, 64)


def test_quantize_writes_autoawq_checkpoint(awq_checkpoint):
    src, dst = awq_checkpoint
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": None}
    files = CheckpointFiles(dst)
    assert files.get("model.layers.0.self_attn.q_proj.qweight").shape == (256, 256 // 8)
    assert files.get("model.layers.0.mlp.down_proj.qzeros").shape == (384 // 128, 256 // 8)
    assert files.get("model.layers.0.mlp.down_proj.scales").dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight" not in files
    # dequantised AWQ weights are close to the float ones
    w = CheckpointFiles(src).get("model.layers.1.mlp.up_proj.weight").float().t()
    z = unpack_awq(files.get("model.layers.1.mlp.up_proj.qzeros")).float().repeat_interleave(128, 0)
    s = files.get("model.layers.1.mlp.up_proj.scales").float().repeat_interleave(128, 0)
    deq = (unpack_awq(files.get("model.layers.1.mlp.up_proj.qweight")).float() - z) * s
    assert (deq - w).abs().max() <= s.max() / 2 + 1e-3


@pytest.mark.parametrize("tp", [1, 2])
def test_int4_files_hold_the_awq_integers(awq_checkpoint, tmp_path, tp):
    """Unpacked workspace files == AWQ input integers, scales and zeros (after q/k permutation, merge, split)."""
    _, awq = awq_checkpoint
    assert main(["convert", str(awq), "--dst-path", str(tmp_path / "ws"), "--tp", str(tp), "--no-progress"]) == 0
    files, w = CheckpointFiles(awq), tmp_path / "ws/triton_models/weights"
    spec, _ = read_hf_checkpoint(awq)
    d, g = spec.head_dim, 128
    p = "model.layers.1.self_attn."

    def parts(kind: str) -> list[torch.Tensor]:  # q, k, v as [in, out] integers/floats in HF column order
        out = []
        for n in ("q", "k", "v"):
            t = files.get(f"{p}{n}_proj.{kind}")
            out.append(_unpack_awq_by_hand(t) if t.dtype == torch.int32 else t)
        return out

    def permuted(kind: str) -> tuple[torch.Tensor, ...]:
        q, k, v = parts(kind)
        q = permute_rotary_rows(q.t(), spec.num_heads, d).t()
        k = permute_rotary_rows(k.t(), spec.num_kv_heads, d).t()
        return q, k, v

    hq, hkv = spec.num_heads // tp, spec.num_kv_heads // tp
    for kind, suffix in (("qweight", "qweight"), ("scales", "scales"), ("qzeros", "zeros")):
        q, k, v = permuted(kind)
        rows = q.shape[0]
        for r in range(tp):
            expect = torch.cat([q[:, r * hq * d:(r + 1) * hq * d], k[:, r * hkv * d:(r + 1) * hkv * d],
                                v[:, r * hkv * d:(r + 1) * hkv * d]], 1)
            width = (hq + 2 * hkv) * d
            if suffix == "qweight":
                got = _unpack_natural_by_hand(raw(w / f"layers.1.attention.w_qkv.{r}.qweight", torch.int32,
                                                  (rows, width // 8)))
                assert torch.equal(got, expect.long())
            else:
                got = raw(w / f"layers.1.attention.w_qkv.{r}.{suffix}", torch.float16, (rows, width))
                assert torch.equal(got, expect.half())
    # w2 is split on its input rows: rank r holds rows (and groups) r of the padded 512 = 2 x 256
    inter_pad = 384 if tp == 1 else 512
    down = _unpack_awq_by_hand(files.get("model.layers.0.mlp.down_proj.qweight"))
    down_zeros = _unpack_awq_by_hand(files.get("model.layers.0.mlp.down_proj.qzeros"))
    rows = inter_pad // tp
    for r in range(tp):
        got = _unpack_natural_by_hand(raw(w / f"layers.0.feed_forward.w2.{r}.qweight", torch.int32, (rows, 32)))
        expect = torch.cat([down, torch.zeros(inter_pad - 384, 256, dtype=torch.long)])[r * rows:(r + 1) * rows]
        assert torch.equal(got, expect)
        zeros = raw(w / f"layers.0.feed_forward.w2.{r}.zeros", torch.float16, (rows // g, 256))
        expect_z = torch.cat([down_zeros, torch.zeros(inter_pad // g - 3, 256, dtype=torch.long)])
        assert torch.equal(zeros, expect_z[r * rows // g:(r + 1) * rows // g].half())


def test_int4_workspace_reads_back_as_the_awq_checkpoint(awq64_checkpoint, tmp_path):
    """tp=4: KV heads duplicated, FFN padded to 512, all on unpacked values; the reader undoes it exactly."""
    _, awq = awq64_checkpoint
    spec, expected = read_hf_checkpoint(awq)
    assert spec.quant_method == "awq" and spec.group_size == 64
    assert "layers.0.attention.wo.qweight" in expected and "layers.0.attention.wo.weight" not in expected
    assert main(["convert", str(awq), "--dst-path", str(tmp_path / "ws"), "--tp", "4", "--no-progress"]) == 0
    spec2, got = read_workspace(tmp_path / "ws")
    assert spec2.quant_method == "awq" and spec2.group_size == 64
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name].half() if expected[name].is_floating_point() else
                           expected[name]), name


def _random_int4(n_in: int, n_out: int, g: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = quantize_rtn(torch.randn(n_in, n_out, generator=gen), g)
    return pack_int4(q.q), q.scales, q.zeros.half(), q.dequantize()


def test_int4_linear_matches_dequantised_matmul():
    qweight, scales, zeros, dense = _random_int4(256, 96, 64)
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(96)
    lin = Int4Linear(qweight, scales, zeros, 64, bias=bias, fused=False)
    assert lin.in_features == 256 and lin.out_features == 96
    torch.testing.assert_close(lin.dequantize(), dense)
    torch.testing.assert_close(lin(x), x @ dense + bias, rtol=1e-5, atol=1e-4)
    y16 = Int4Linear(qweight, scales, zeros, 64)(x.bfloat16())  # fused kernel where torch has one for bf16 on cpu
    torch.testing.assert_close(y16.float(), x @ dense, rtol=0.05, atol=0.5)


def test_int4_linear_rejects_bad_shapes():
    qweight, scales, zeros, _ = _random_int4(128, 64, 64)
    with pytest.raises(ValueError, match="scales"):
        Int4Linear(qweight, scales[:1], zeros, 64)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(qweight, scales, zeros, 48)
    with pytest.raises(ValueError, match="input has 100 features"):
        Int4Linear(qweight, scales, zeros, 64)(torch.randn(2, 100))


def test_int4_linear_falls_back_when_the_kernel_disagrees():
    """A fused kernel whose packing conventions differ from ours is detected once and not used."""
    qweight, scales, zeros, _ = _random_int4(256, 64, 64)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    lin = Int4Linear(qweight, scales, zeros, 64)
    packed, scales_zeros = lin._pack_for(x)
    lin._packed[(x.device, x.dtype)] = (packed, torch.ones_like(scales_zeros))  # a wrong convention
    assert torch.equal(lin(x), Int4Linear(qweight, scales, zeros, 64, fused=False)(x))  # dequantising path
    with pytest.raises(RuntimeError, match="no fused int4 matmul"):
        Int4Linear(qweight, scales, zeros, 64, fused=True)(torch.randn(2, 256, dtype=torch.float16))
