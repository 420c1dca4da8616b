"""KV-cache quantisation: the stored integers, scales and zeros follow TurboMind's formulas; storage through slots.

The reference values here are computed independently of `puyu.engine.kv_quant`: by hand for the small vectors, and
element by element with numpy float32 arithmetic and Python's `round` (half to even) for the random ones.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from puyu.engine import kv_quant
from puyu.engine.kv_cache import KVCacheStorage, slots_for

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_quantize(x: np.ndarray, bits: int, param_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Element-by-element reference: params in float32, rounded to the storage dtype, then q from those."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
    qs, scales, zeros = [], [], []
    qmax = 2 ** bits - 1
    for row in flat:
        lo, hi = np.float32(row.min()), np.float32(row.max())
        scale = np.float32(np.float32(hi - lo) / np.float32(qmax)).astype(param_dtype).astype(np.float32)
        zero = lo.astype(param_dtype).astype(np.float32)
        if scale == 0:
            q = [0] * len(row)
        else:
            q = [min(max(round(float(np.float32(np.float32(v - zero) / scale))), 0), qmax) for v in row]
        qs.append(q)
        scales.append(scale)
        zeros.append(zero)
    shape = x.shape[:-1]
    return (np.array(qs, dtype=np.uint8).reshape(x.shape), np.array(scales).reshape(shape),
            np.array(zeros).reshape(shape))


# ---- the formulas on hand-made vectors --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_ties_round_half_to_even_and_negative_values(dtype):
    # min -3, max 12: scale = 15 / 15 = 1, zero = -3; (x - zero) lands exactly on .5 for the tie values
    x = torch.tensor([[-3.0, 12.0, -2.5, -1.5, -0.5, 0.5, 1.5, 2.0]], dtype=dtype)
    q, scale, zero = kv_quant.quantize(x, 4)
    assert scale.item() == 1.0 and zero.item() == -3.0
    assert scale.dtype == dtype and zero.dtype == dtype
    # (x - zero) = 0, 15, 0.5, 1.5, 2.5, 3.5, 4.5, 5  -> half to even: 0, 15, 0, 2, 2, 4, 4, 5
    assert q.tolist() == [[0, 15, 0, 2, 2, 4, 4, 5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_ties_and_negative_range(dtype):
    # min -127.5, max 127.5: scale = 255 / 255 = 1, zero = -127.5
    x = torch.tensor([[-127.5, 127.5, -127.0, -126.0, -0.5, 0.0, 0.5, 126.0]], dtype=dtype)
    q, scale, zero = kv_quant.quantize(x, 8)
    assert (scale.item(), zero.item()) == (1.0, -127.5)
    # (x - zero) = 0, 255, 0.5, 1.5, 127, 127.5, 128, 253.5 -> 0, 255, 0, 2, 127, 128, 128, 254
    assert q.tolist() == [[0, 255, 0, 2, 127, 128, 128, 254]]


def test_scale_is_range_over_levels():
    x = torch.tensor([[0.0, 3.0], [-1.0, 1.0]])
    _, s8, z8 = kv_quant.quantize(x, 8)
    _, s4, z4 = kv_quant.quantize(x, 4)
    assert torch.allclose(s8, torch.tensor([3.0 / 255, 2.0 / 255])) and z8.tolist() == [0.0, -1.0]
    assert torch.allclose(s4, torch.tensor([3.0 / 15, 2.0 / 15])) and z4.tolist() == [0.0, -1.0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("value", [3.25, 0.0, -7.5])
def test_constant_vector_guard(bits, value):
    x = torch.full((2, 16), value, dtype=torch.float16)
    q, scale, zero = kv_quant.quantize(x, bits)
    assert (scale == 0).all() and (zero == value).all()
    assert (q == 0).all()
    x_hat = kv_quant.dequantize(q, scale, zero, torch.float16)
    assert torch.isfinite(x_hat).all() and torch.equal(x_hat, x)


def test_per_token_per_head_params():
    """Each (token, head) row gets its own min/max: scaling one head must not change another's integers."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 32, generator=gen)
    y = x.clone()
    y[:, 1] *= 100.0
    qx, sx, _ = kv_quant.quantize(x, 8)
    qy, sy, _ = kv_quant.quantize(y, 8)
    assert sx.shape == (5, 3)
    assert torch.equal(qx[:, 0], qy[:, 0]) and torch.equal(qx[:, 2], qy[:, 2])
    assert torch.allclose(sy[:, 1], sx[:, 1] * 100.0, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_vectors_match_elementwise_reference(bits, dtype):
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(64, 4, 64, generator=gen) * 3 + 0.5).to(dtype)
    q, scale, zero = kv_quant.quantize(x, bits)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype)
    if np_dtype is None:  # numpy has no bfloat16: compare against the params the code stored, q element-wise
        ref_s, ref_z = scale.float().numpy(), zero.float().numpy()
        xf = x.float().numpy()
        ref_q = np.clip(np.vectorize(round)(((xf - ref_z[..., None]) / ref_s[..., None]).astype(np.float32)),
                        0, 2 ** bits - 1)
    else:
        ref_q, ref_s, ref_z = reference_quantize(x.float().numpy(), bits, np_dtype)
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_array_equal(scale.float().numpy(), ref_s)
    np.testing.assert_array_equal(zero.float().numpy(), ref_z)


# ---- dequantisation error ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_dequant_error_at_most_half_a_step_fp32(bits):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 2, 128, generator=gen) * 5
    q, scale, zero = kv_quant.quantize(x, bits)
    err = (kv_quant.dequantize(q, scale, zero, torch.float32) - x).abs()
    bound = scale.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-6
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    # and the error really is of that order (the test could fail if q were, e.g., truncated)
    assert err.max() > 0.3 * scale.max()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_error_bound_16bit(bits, dtype):
    """With scale/zero rounded to 16 bits the bound grows by what that rounding moves the grid, and no more."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(256, 2, 128, generator=gen) * 5).to(dtype)
    q, scale, zero = kv_quant.quantize(x, bits)
    xf = x.float()
    exact_scale = (xf.amax(-1) - xf.amin(-1)) / (2 ** bits - 1)
    grid_shift = (2 ** bits - 1) * (scale.float() - exact_scale).abs() + (zero.float() - xf.amin(-1)).abs()
    x_hat = kv_quant.dequantize(q, scale, zero, torch.float32)
    eps = torch.finfo(dtype).eps
    bound = scale.float() / 2 + grid_shift
    err = (x_hat - xf).abs()
    assert (err <= bound.unsqueeze(-1) + xf.abs() * eps + 1e-6).all()


# ---- int4 packing ------------------------------------------------------------------------------------------------
def test_pack_int4_bit_layout_low_nibble_first():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    word = kv_quant.pack_int4(q)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert word.item() & 0xFFFFFFFF == 0xF7654321


def test_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (7, 3, 64), generator=gen, dtype=torch.uint8)
    words = kv_quant.pack_int4(q)
    assert words.shape == (7, 3, 8)
    assert torch.equal(kv_quant.unpack_int4(words), q)
    assert torch.equal(kv_quant.unpack_int4(kv_quant.pack_int4(torch.full((8,), 15, dtype=torch.uint8))),
                       torch.full((8,), 15, dtype=torch.uint8))


def test_pack_int4_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="multiple of 8"):
        kv_quant.pack_int4(torch.zeros(2, 12, dtype=torch.uint8))


# ---- storage through slots ---------------------------------------------------------------------------------------
def _kv(t: int, hkv: int, d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(t, hkv, d, generator=gen).to(dtype), torch.randn(t, hkv, d, generator=gen).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qp", [0, 8, 4])
def test_write_read_across_blocks(qp, device):
    dtype = torch.float16
    cache = KVCacheStorage(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16,
                           dtype=dtype, device=device, quant_policy=qp)
    k, v = _kv(10, 2, 16, dtype, seed=qp)
    table = [5, 2, 7]
    slots = slots_for(table, 0, 10, 4)
    assert slots.tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 28, 29]
    cache.write(1, k.to(device), v.to(device), slots.to(device))
    k_hat, v_hat = cache.read(1, slots)
    assert k_hat.dtype == dtype and k_hat.shape == (10, 2, 16) and k_hat.device.type == device
    for x, x_hat in ((k, k_hat), (v, v_hat)):
        if qp == 0:
            assert torch.equal(x_hat.cpu(), x)
        else:
            qx, s, z = kv_quant.quantize(x, qp)
            assert torch.equal(x_hat.cpu(), kv_quant.dequantize(qx, s, z, dtype))
    # layer 0 and the untouched blocks stay empty
    other = torch.tensor([0, 1, 4, 12, 31])
    for layer, idx in ((0, slots), (1, other)):
        ko, vo = cache.read(layer, idx)
        assert not ko.any() and not vo.any()


@pytest.mark.parametrize("qp", [8, 4])
def test_stored_integers_and_params_through_slots(qp):
    cache = KVCacheStorage(1, 4, 4, 2, 8, torch.float16, "cpu", qp)
    k = torch.tensor([[-3.0, 12.0, -2.5, -1.5, -0.5, 0.5, 1.5, 2.0]] * 2, dtype=torch.float16).unsqueeze(0)
    v = torch.full((1, 2, 8), 3.25, dtype=torch.float16)
    slot = torch.tensor([13])
    cache.write(0, k, v, slot)
    got = cache.read_quantized(0, slot)
    ref_q, ref_s, ref_z = reference_quantize(k.float().numpy(), qp, np.float16)
    np.testing.assert_array_equal(got["k"].numpy(), ref_q)
    np.testing.assert_array_equal(got["k_scale"].float().numpy(), ref_s)
    np.testing.assert_array_equal(got["k_zero"].float().numpy(), ref_z)
    assert got["v_scale"].eq(0).all() and got["v_zero"].eq(3.25).all() and not got["v"].any()
    assert torch.equal(cache.read(0, slot)[1], v)


def test_overwrite_keeps_other_slots():
    cache = KVCacheStorage(2, 4, 2, 1, 8, torch.float32, "cpu", 8)
    k, v = _kv(2, 1, 8, torch.float32, seed=5)
    cache.write(0, k, v, torch.tensor([2, 3]))
    k2, v2 = _kv(1, 1, 8, torch.float32, seed=6)
    cache.write(0, k2, v2, torch.tensor([3]))
    assert torch.allclose(cache.read(0, torch.tensor([3]))[0], k2, atol=0.05)
    assert torch.allclose(cache.read(0, torch.tensor([2]))[0], k[:1], atol=0.05)


# ---- memory ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bytes_per_block_real_savings(dtype):
    shape = dict(num_layers=24, block_size=64, num_kv_heads=8, head_dim=128, dtype=dtype)
    b16 = KVCacheStorage.bytes_per_block(quant_policy=0, **shape)
    b8 = KVCacheStorage.bytes_per_block(quant_policy=8, **shape)
    b4 = KVCacheStorage.bytes_per_block(quant_policy=4, **shape)
    assert b16 == 2 * 24 * 64 * 8 * 128 * 2
    overhead = 2 * 24 * 64 * 8 * 2 * 2  # K and V: one 16-bit scale and zero per token and head
    assert b8 == b16 // 2 + overhead and b4 == b16 // 4 + overhead
    assert 0.5 < b8 / b16 < 0.52 and 0.25 < b4 / b16 < 0.27


@pytest.mark.parametrize("qp", [0, 8, 4])
def test_allocated_bytes_equal_bytes_per_block(qp):
    cache = KVCacheStorage(3, 5, 16, 2, 64, torch.float16, "cpu", qp)
    per_block = KVCacheStorage.bytes_per_block(3, 16, 2, 64, torch.float16, qp)
    tensors = [cache.k_data, cache.v_data, cache.k_params, cache.v_params]
    storage = sum(t.untyped_storage().nbytes() for t in tensors if t is not None)
    assert cache.nbytes() == storage == 5 * per_block


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="quant_policy"):
        KVCacheStorage(1, 1, 4, 1, 16, torch.float16, "cpu", quant_policy=2)
    with pytest.raises(ValueError, match="head_dim"):
        KVCacheStorage(1, 1, 4, 1, 12, torch.float16, "cpu", quant_policy=4)
    with pytest.raises(ValueError, match="floating"):
        KVCacheStorage(1, 1, 4, 1, 16, torch.int8, "cpu")
    cache = KVCacheStorage(1, 2, 4, 1, 16, torch.float16, "cpu", 8)
    with pytest.raises(ValueError, match="shape"):
        cache.write(0, torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), torch.tensor([0, 1]))
    with pytest.raises(IndexError, match="layer"):
        cache.read(1, torch.tensor([0]))
    with pytest.raises(ValueError, match="blocks"):
        slots_for([0], 0, 5, 4)
