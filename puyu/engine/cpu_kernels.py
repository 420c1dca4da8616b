"""puyu's own CPU kernels, built on first use with the machine's C compiler, and their Python entry points:
`PackedLinear` (cpu_linear.c: bf16 or float32 weights), `PackedInt4Linear` (cpu_linear_int4.c: 4-bit group-quantised
weights), `PackedInt8Linear` (cpu_linear_int8.c: int8 blocks of 32, GGUF's Q8_0) and `decode_attention` (cpu_attention.c: paged decode attention).

The sources are compiled together with `-march=native -O3 -fopenmp` into `~/.cache/puyu/kernels/` (or `$PUYU_CACHE_DIR/kernels`)
under a name hashing the source, the compiler and the CPU, so a cached build is only ever reused on the machine
that made it. When there is no compiler, the CPU lacks AVX2/FMA, or the build fails, `available()` is False and the
caller keeps torch's ops (the reference path, also chosen by `EngineConfig(kernels="torch")`).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)
SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_linear.c", "cpu_linear_int4.c", "cpu_attention.c",
                                                                 "cpu_pointwise.c", "cpu_linear_int8.c"))
_DTYPES = (torch.float32, torch.bfloat16)


def _cpu_identity() -> str:
    """What a `-march=native` build depends on: the CPU model and its flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    root = os.environ.get("PUYU_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "puyu") / "kernels"


def _march() -> str:
    """The target: this CPU, or `$PUYU_CPU_MARCH` (e.g. `x86-64-v3`, to build and test the AVX2 code on an
    AVX-512 machine)."""
    return os.environ.get("PUYU_CPU_MARCH", "native")


def _compile(cc: str, out: Path) -> bool:
    # -ffp-contract=off: a * b - c * d stays two roundings, as in torch's elementwise ops
    base = [cc, "-O3", f"-march={_march()}", "-ffp-contract=off", "-shared", "-fPIC", *map(str, SOURCES), "-o", str(out), "-lm"]
    for extra in (["-fopenmp"], []):  # without OpenMP the kernel still works, on one thread
        try:
            done = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.info("cpu kernels: %s failed to run: %s", cc, e)
            return False
        if done.returncode == 0:
            return True
        log.info("cpu kernels: build %s failed: %s", " ".join(base + extra), done.stderr.strip()[-500:])
    return False


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.info("cpu kernels: no C compiler on PATH; using torch's ops")
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\0".join([*texts, version, _cpu_identity(), _march()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"puyu_cpu-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            if not _compile(cc, built):
                return None
            os.replace(built, path)  # atomic: concurrent first uses never load a half-written file
    lib = ctypes.CDLL(str(path))
    for flag in (lib.puyu_bf16_panels_paired, lib.puyu_bf16_dot):
        flag.restype = ctypes.c_int
        flag.argtypes = []
    for fn in (lib.puyu_linear_bf16w, lib.puyu_linear_f32w):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.puyu_linear_int4.restype = ctypes.c_int
    int4_args: list[Any] = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    lib.puyu_linear_int4.argtypes = int4_args + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.puyu_linear_int8.restype = ctypes.c_int
    int8_args: list[Any] = [ctypes.c_void_p, ctypes.c_int]
    lib.puyu_linear_int8.argtypes = int8_args + [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.puyu_add_rmsnorm.restype = None
    lib.puyu_add_rmsnorm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 2 + [ctypes.c_float, ctypes.c_int]
    lib.puyu_rope_write.restype = None
    lib.puyu_rope_write.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 4 + [ctypes.c_int]
    lib.puyu_decode_attention.restype = ctypes.c_int
    lib.puyu_decode_attention.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] + [ctypes.c_long] * 6 + [ctypes.c_float, ctypes.c_int]
    return lib


def available() -> bool:
    """True when the kernels are built (or build now) for this machine."""
    return _library() is not None


def bf16_dot() -> bool:
    """True when the build multiplies bf16 activations by bf16 weights with the CPU's bf16 dot product
    (AVX-512 BF16): there bf16 activations cost about half of float32 ones at prefill and batch sizes >= 8."""
    lib = _library()
    return lib is not None and bool(lib.puyu_bf16_dot())


PANEL = 16  # outputs per weight panel (NR in cpu_linear.c)


class PackedLinear:
    """`F.linear(x, weight, bias)` through cpu_linear.c, for a bf16 or float32 `weight [out, in]` on the cpu.

    The weight is repacked once into panels `[ceil(out/16), in, 16]` (zero rows pad the last one), the layout the
    kernel's micro-kernel streams; bf16 weights on an AVX-512 build are k-paired instead, `[ceil(out/16),
    ceil(in/2), 16, 2]` (a zero column pads an odd `in`), so that one load holds two k of the panel. x is float32
    or bf16 `[..., in]` (bias, if any, in x's dtype) and the result has x's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        lib = _library()
        if lib is None:
            raise RuntimeError("PackedLinear: puyu's cpu kernels are not available (check available() first)")
        if weight.device.type != "cpu" or weight.dtype not in _DTYPES or weight.dim() != 2:
            raise TypeError(f"PackedLinear: weight must be a 2-D float32 or bf16 cpu tensor, got {weight.dtype} "
                            f"{tuple(weight.shape)} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        pad = -self.out_features % PANEL
        padded = torch.cat([weight, weight.new_zeros(pad, self.in_features)]) if pad else weight
        if weight.dtype == torch.bfloat16 and lib.puyu_bf16_panels_paired():
            if self.in_features % 2:
                padded = torch.cat([padded, padded.new_zeros(padded.shape[0], 1)], dim=1)
            self.panels = padded.view(-1, PANEL, padded.shape[1] // 2, 2).transpose(1, 2).contiguous()
        else:
            self.panels = padded.view(-1, PANEL, self.in_features).transpose(1, 2).contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self._fn = lib.puyu_linear_bf16w if weight.dtype == torch.bfloat16 else lib.puyu_linear_f32w

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.panels.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _DTYPES:
            raise TypeError(f"PackedLinear: x must be float32 or bfloat16, got {x.dtype}")
        if self.bias is not None and self.bias.dtype != x.dtype:
            raise TypeError(f"PackedLinear: bias must have x's dtype {x.dtype}, got {self.bias.dtype}")
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty((flat.shape[0], self.out_features), dtype=x.dtype)
        if flat.shape[0]:
            rc = self._fn(flat.data_ptr(), int(x.dtype == torch.bfloat16), self.panels.data_ptr(),
                          None if self.bias is None else self.bias.data_ptr(), y.data_ptr(), flat.shape[0],
                          self.in_features, self.out_features, torch.get_num_threads())
            if rc != 0:
                raise MemoryError("PackedLinear: out of memory widening x")
        return y.reshape(*x.shape[:-1], self.out_features)


class PackedInt4Linear:
    """`x @ W (+ bias)` through cpu_linear_int4.c for TurboMind-packed 4-bit weights `W [in, out] = (q - z) * s`:
    `qweight` int32 `[in, out/8]` (low nibble first), `scales`/`zeros` `[in/g, out]`.

    Repacked once into panels of 16 outputs (int32 `[ceil(out/16), in, 2]`) and, per panel and group, its 16
    scales and 16 zero points in float16 (`[ceil(out/16), in/g, 2, 16]`); x is float32 or bf16 `[..., in]`.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: Optional[torch.Tensor] = None):
        lib = _library()
        if lib is None:
            raise RuntimeError("PackedInt4Linear: puyu's cpu kernels are not available (check available() first)")
        n_in, words = qweight.shape
        self.in_features, self.out_features, self.group_size = n_in, words * 8, group_size
        pad_words = -words % 2
        q = torch.cat([qweight, qweight.new_zeros(n_in, pad_words)], dim=1) if pad_words else qweight
        self.q = q.view(n_in, -1, 2).transpose(0, 1).contiguous()  # [panels, in, 2]
        s, z = scales.to(torch.float16), zeros.to(torch.float16)
        pad = -self.out_features % PANEL
        if pad:
            s, z = (torch.cat([t, t.new_zeros(t.shape[0], pad)], dim=1) for t in (s, z))
        sz = torch.stack([s, z], dim=1)  # [groups, 2, out]
        self.sz = sz.view(sz.shape[0], 2, -1, PANEL).permute(2, 0, 1, 3).contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self._fn = lib.puyu_linear_int4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _DTYPES:
            raise TypeError(f"PackedInt4Linear: x must be float32 or bfloat16, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"PackedInt4Linear: input has {x.shape[-1]} features, expected {self.in_features}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty((flat.shape[0], self.out_features), dtype=x.dtype)
        if flat.shape[0]:
            rc = self._fn(flat.data_ptr(), int(x.dtype == torch.bfloat16), self.q.data_ptr(), self.sz.data_ptr(),
                          self.group_size, None if bias is None else bias.data_ptr(), y.data_ptr(),
                          flat.shape[0], self.in_features, self.out_features, torch.get_num_threads())
            if rc != 0:
                raise MemoryError("PackedInt4Linear: out of memory widening x")
        return y.reshape(*x.shape[:-1], self.out_features)


INT8_BLOCK = 32  # inputs per int8 scale (I8_BLOCK in cpu_linear_int8.c; GGUF's Q8_0 block)


def exact_int8_blocks(weight: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(q int8 `[out, in]`, d float16 `[out, in/32]`) with `weight == q * d` exactly (per block of 32 inputs), or
    None. A GGUF Q8_0 tensor read back as float32 has this form: `d = max|w| / 127` recovers its scale."""
    n, k = weight.shape
    if weight.dtype != torch.float32 or k % INT8_BLOCK:
        return None
    blocks = weight.view(n, k // INT8_BLOCK, INT8_BLOCK)
    d = blocks.abs().amax(-1) / 127
    d16 = d.to(torch.float16)
    if not torch.equal(d16.float(), d):
        return None
    safe = torch.where(d > 0, d, torch.ones_like(d)).unsqueeze(-1)
    q = (blocks / safe).round()
    if not torch.equal(q * d.unsqueeze(-1), blocks):
        return None
    return q.to(torch.int8).view(n, k), d16


class PackedInt8Linear:
    """`F.linear(x, q * d)` through cpu_linear_int8.c for int8 weights `q [out, in]` with float16 scales `d
    [out, in/32]` (see `exact_int8_blocks`); repacked once into panels of 16 outputs."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, bias: Optional[torch.Tensor] = None):
        lib = _library()
        if lib is None:
            raise RuntimeError("PackedInt8Linear: puyu's cpu kernels are not available (check available() first)")
        self.out_features, self.in_features = q.shape
        pad = -self.out_features % PANEL
        if pad:
            q = torch.cat([q, q.new_zeros(pad, self.in_features)])
            d = torch.cat([d, d.new_zeros(pad, d.shape[1])])
        self.q = q.view(-1, PANEL, self.in_features).transpose(1, 2).contiguous()  # [panels, in, 16]
        self.d = d.to(torch.float16).view(-1, PANEL, d.shape[1]).transpose(1, 2).contiguous()  # [panels, in/32, 16]
        self.bias = None if bias is None else bias.contiguous()
        self._fn = lib.puyu_linear_int8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _DTYPES:
            raise TypeError(f"PackedInt8Linear: x must be float32 or bfloat16, got {x.dtype}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty((flat.shape[0], self.out_features), dtype=x.dtype)
        if flat.shape[0]:
            rc = self._fn(flat.data_ptr(), int(x.dtype == torch.bfloat16), self.q.data_ptr(), self.d.data_ptr(),
                          None if bias is None else bias.data_ptr(), y.data_ptr(), flat.shape[0], self.in_features,
                          self.out_features, torch.get_num_threads())
            if rc != 0:
                raise MemoryError("PackedInt8Linear: out of memory widening x")
        return y.reshape(*x.shape[:-1], self.out_features)


def decode_attention_supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `decode_attention` takes this step: cpu, float32 or bf16 (unquantised cache), head_dim % 8 == 0."""
    return (q.device.type == "cpu" and q.dtype in _DTYPES and k_cache.dtype == q.dtype and q.shape[-1] % 8 == 0
            and available())


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     lens: torch.Tensor) -> torch.Tensor:
    """Attention of one query per sequence, q `[B, Hq, D]`, over keys 0..lens[b]-1 found through `block_table`
    (int64 `[B, nb]`) in one layer's cache `[num_blocks, block_size, Hkv, D]`; `[B, Hq, D]` in q's dtype.
    Scaled by 1/sqrt(D), like SDPA's default."""
    lib = _library()
    assert lib is not None, "cpu_kernels.decode_attention called without the kernels"
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("decode_attention: the cache must be contiguous")
    q = q.contiguous()
    table = block_table.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    rc = lib.puyu_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr(),
                                   lens.data_ptr(), out.data_ptr(), int(q.dtype == torch.bfloat16), b,
                                   table.shape[1], block_size, hq, hkv, d, d ** -0.5, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("decode_attention: out of memory for scratch")
    return out


def add_rmsnorm(h: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`h += delta` in place (when given), then RMSNorm of h times `weight`, as model.rms_norm computes it;
    h, delta `[T, H]` contiguous, all float32 or all bf16 (see `pointwise_supports`)."""
    lib = _library()
    assert lib is not None, "cpu_kernels.add_rmsnorm called without the kernels"
    out = torch.empty_like(h)
    lib.puyu_add_rmsnorm(h.data_ptr(), None if delta is None else delta.contiguous().data_ptr(), weight.data_ptr(),
                         out.data_ptr(), h.shape[0], h.shape[1], eps, int(h.dtype == torch.bfloat16))
    return out


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rotary on the q and k heads of `qkv [T, (Hq + 2 Hkv) * D]` (float32 `cos`/`sin [T, D/2]`), k and v
    written to `slots` of one layer's unquantised cache `[num_blocks, block_size, Hkv, D]`; returns q `[T, Hq, D]`."""
    lib = _library()
    assert lib is not None, "cpu_kernels.rope_write called without the kernels"
    t = qkv.shape[0]
    q = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype)
    lib.puyu_rope_write(qkv.contiguous().data_ptr(), cos.contiguous().data_ptr(), sin.contiguous().data_ptr(),
                        slots.contiguous().data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), t,
                        num_heads, num_kv_heads, head_dim, int(qkv.dtype == torch.bfloat16))
    return q


def pointwise_supports(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether add_rmsnorm / rope_write take tensors of this dtype on this device."""
    return device.type == "cpu" and dtype in _DTYPES and available()
