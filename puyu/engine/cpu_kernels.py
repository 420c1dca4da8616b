"""puyu's own CPU kernels, built on first use with the machine's C compiler, and their Python entry points:
`linear` (cpu_linear.c: bf16 or float32 weights) and `decode_attention` (cpu_attention.c: paged decode attention).

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
from typing import Optional

import torch

log = logging.getLogger(__name__)
SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_linear.c", "cpu_attention.c"))
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


def _compile(cc: str, out: Path) -> bool:
    base = [cc, "-O3", "-march=native", "-shared", "-fPIC", *map(str, SOURCES), "-o", str(out), "-lm"]
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
    key = hashlib.sha256("\0".join([*texts, version, _cpu_identity()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"puyu_cpu-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            if not _compile(cc, built):
                return None
            os.replace(built, path)  # atomic: concurrent first uses never load a half-written file
    lib = ctypes.CDLL(str(path))
    for fn in (lib.puyu_linear_bf16w, lib.puyu_linear_f32w):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_long, ctypes.c_long, ctypes.c_long]
    lib.puyu_decode_attention.restype = ctypes.c_int
    lib.puyu_decode_attention.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] + [ctypes.c_long] * 6 + [ctypes.c_float]
    return lib


def available() -> bool:
    """True when the kernels are built (or build now) for this machine."""
    return _library() is not None


def supports(weight: torch.Tensor) -> bool:
    """Whether `linear` can take this weight: bf16 or float32 `[out, in]` on the cpu, contiguous."""
    return (weight.device.type == "cpu" and weight.dtype in _DTYPES and weight.dim() == 2
            and weight.is_contiguous() and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a weight `supports` takes and a float32 or bf16 `x [..., in]` (bias, if any,
    in x's dtype); the result has x's dtype."""
    lib = _library()
    assert lib is not None, "cpu_kernels.linear called without the kernel (check supports() first)"
    if x.dtype not in _DTYPES:
        raise TypeError(f"cpu_kernels.linear: x must be float32 or bfloat16, got {x.dtype}")
    fn = lib.puyu_linear_bf16w if weight.dtype == torch.bfloat16 else lib.puyu_linear_f32w
    n_out, n_in = weight.shape
    flat = x.reshape(-1, n_in).contiguous()
    y = torch.empty((flat.shape[0], n_out), dtype=x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"cpu_kernels.linear: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if flat.shape[0]:
        rc = fn(flat.data_ptr(), int(x.dtype == torch.bfloat16), weight.data_ptr(),
                None if bias is None else bias.contiguous().data_ptr(), y.data_ptr(), flat.shape[0], n_in, n_out)
        if rc != 0:
            raise MemoryError("cpu_kernels.linear: out of memory widening x")
    return y.reshape(*x.shape[:-1], n_out)


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
                                   table.shape[1], block_size, hq, hkv, d, d ** -0.5)
    if rc != 0:
        raise MemoryError("decode_attention: out of memory for scratch")
    return out
