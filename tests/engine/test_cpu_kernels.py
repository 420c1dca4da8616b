"""puyu's own cpu kernels (puyu/engine/cpu_*.c) against torch on the same inputs: the linear for bf16 and float32
weights (panel and row-block tails, bias, bf16 activations) and decode attention over a paged cache (GQA, ragged lengths,
scattered block tables), float32 and bf16."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from puyu.engine import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler / AVX2 for puyu's cpu kernels")


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 576, 960), (3, 1536, 577), (8, 13, 5), (33, 64, 132), (7, 40, 16)])
def test_linear_matches_f_linear(w_dtype, shape):
    b, k, n = shape
    gen = torch.Generator().manual_seed(b * k + n)
    w = torch.randn(n, k, generator=gen).to(w_dtype)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(b, k, generator=gen)
    want = F.linear(x.double(), w.double(), bias.double())
    got = cpu_kernels.PackedLinear(w, bias)(x)
    assert got.dtype == torch.float32 and got.shape == (b, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu_kernels.PackedLinear(w)(x).double(), want - bias.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 5, 96, 200), (1, 1, 97, 33), (3, 15, 64, 40), (1, 1, 576, 48)])
def test_linear_bf16_activations_round_like_torch(shape):
    """bf16 x: on AVX-512 BF16 machines the dot-product instruction (even in), else x widened (odd in, AVX2)."""
    *lead, k, n = shape
    gen = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(*lead, k, generator=gen).bfloat16()
    got = cpu_kernels.PackedLinear(w)(x)
    assert got.dtype == torch.bfloat16 and got.shape == (*lead, n)
    want = F.linear(x.float(), w.float())  # fp32 accumulation, one rounding to bf16 at the end
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-2)
    assert (got.float() - want).abs().max() <= 2 ** -7 * want.abs().max()


def test_linear_empty_batch_and_bad_dtype():
    w = torch.randn(8, 16).bfloat16()
    assert cpu_kernels.PackedLinear(w)(torch.empty(0, 16)).shape == (0, 8)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        cpu_kernels.PackedLinear(w)(torch.randn(2, 16).half())


def _reference_attention(q, k_cache, v_cache, table, lens):
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        slots = [int(table[b, t // bs]) * bs + t % bs for t in range(n)]
        k = k_cache.flatten(0, 1)[slots].double().transpose(0, 1)  # [Hkv, n, D]
        v = v_cache.flatten(0, 1)[slots].double().transpose(0, 1)
        qb = q[b].double().unflatten(0, (hkv, -1))  # [Hkv, G, D]
        p = torch.softmax(qb @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        outs.append((p @ v).flatten(0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (9, 3)])
def test_decode_attention_matches_reference(dtype, heads):
    hq, hkv = heads
    d, bs, num_blocks = 64, 4, 24
    gen = torch.Generator().manual_seed(hq)
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)[:15].view(3, 5)  # scattered blocks, no two rows share one
    lens = torch.tensor([1, 13, 20])
    q = torch.randn(3, hq, d, generator=gen).to(dtype)
    got = cpu_kernels.decode_attention(q, k_cache, v_cache, table, lens)
    want = _reference_attention(q, k_cache, v_cache, table, lens)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(1, 64, 48), (5, 128, 40), (9, 192, 16), (40, 128, 40)])
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_linear_matches_dequantised(shape, group_size):
    from puyu.int4_packing import pack_int4
    from puyu.engine.int4 import Int4Linear

    b, k, n = shape
    if k % group_size:
        pytest.skip("group size must divide the input features")
    gen = torch.Generator().manual_seed(k + n + group_size)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group_size, n, generator=gen) * 0.1 + 0.01).half()
    zeros = torch.randint(0, 16, (k // group_size, n), generator=gen).half()
    bias = torch.randn(n, generator=gen)
    qweight = pack_int4(q)
    x = torch.randn(b, k, generator=gen)
    dense = Int4Linear(qweight, scales, zeros, group_size, fused=False).dequantize(torch.float64)
    want = x.double() @ dense + bias.double()
    got = cpu_kernels.PackedInt4Linear(qweight, scales, zeros, group_size, bias)(x)
    assert got.dtype == torch.float32 and got.shape == (b, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rmsnorm_matches_reference(dtype, with_delta):
    from puyu.engine.model import rms_norm

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(7, 96, generator=gen).to(dtype)
    delta = torch.randn(7, 96, generator=gen).to(dtype) if with_delta else None
    weight = (torch.rand(96, generator=gen) + 0.5).to(dtype)
    want_h = h + delta if with_delta else h.clone()
    want = rms_norm(want_h, weight, 1e-5)
    got = cpu_kernels.add_rmsnorm(h, delta, weight, 1e-5)
    assert torch.equal(h, want_h)  # the residual add happened in place, rounded like torch's
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_matches_rotary_and_cache_write(dtype):
    from puyu.engine.kv_cache import KVCacheStorage
    from puyu.engine.rotary import apply_rotary

    hq, hkv, d, t = 6, 2, 16, 5
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    angles = torch.rand(t, d // 2, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([9, 2, 30, 17, 4])
    ref, got = (KVCacheStorage(1, 8, 4, hkv, d, dtype, "cpu") for _ in range(2))
    qk = apply_rotary(qkv[:, :(hq + hkv) * d].unflatten(-1, (-1, d)), cos, sin)
    ref.write(0, qk[:, hq:], qkv[:, (hq + hkv) * d:].unflatten(-1, (hkv, d)), slots)
    q = cpu_kernels.rope_write(qkv, cos, sin, slots, got.k_data[0], got.v_data[0], hq, hkv, d)
    tol = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(q, qk[:, :hq], rtol=tol, atol=tol)
    torch.testing.assert_close(got.k_data, ref.k_data, rtol=tol, atol=tol)
    assert torch.equal(got.v_data, ref.v_data)


def test_int8_blocks_recovered_exactly_and_linear_matches():
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (40, 96), generator=gen, dtype=torch.int8)
    q[:, ::32] = 127  # every block reaches the full range, as Q8_0's quantiser makes it
    d = (torch.rand(40, 3, generator=gen) * 0.01).half()
    d[3, 1] = 0  # an all-zero block
    q[3, 32:64] = 0
    w = q.float() * d.float().repeat_interleave(32, dim=1)
    blocks = cpu_kernels.exact_int8_blocks(w)
    assert blocks is not None and torch.equal(blocks[0], q) and torch.equal(blocks[1], d)
    assert cpu_kernels.exact_int8_blocks(w + 1e-3) is None  # not of that form: stays dense
    x = torch.randn(5, 96, generator=gen)
    bias = torch.randn(40, generator=gen)
    got = cpu_kernels.PackedInt8Linear(*blocks, bias)(x)
    torch.testing.assert_close(got.double(), F.linear(x.double(), w.double(), bias.double()), rtol=1e-5, atol=1e-4)


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            return " avx512f" in info.read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512() or os.environ.get("PUYU_CPU_MARCH"), reason="AVX2 is the native build here")
def test_avx2_build_passes_these_tests_too(tmp_path):
    """The kernels have an AVX-512 and an AVX2 variant of each micro-kernel (chosen when compiled); on an AVX-512
    machine the native build runs only the first, so the AVX2 one is built and checked here by this same module."""
    env = {**os.environ, "PUYU_CPU_MARCH": "x86-64-v3", "PUYU_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not avx2_build"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-500:]
