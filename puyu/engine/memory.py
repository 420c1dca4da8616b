"""How many KV-cache blocks to allocate, and which device/dtype to compute in.

`cache_max_entry_count` >= 1 is an absolute block count. Below 1 it is a fraction of the free memory, measured after
the weights are loaded: `torch.cuda.mem_get_info` on cuda; on cpu the available RAM (psutil, else /proc/meminfo), of
which at most `cpu_cache_cap(weight_bytes)` is taken: the size of the weights, kept within `CPU_CACHE_MIN_BYTES`
(512 MiB) and `CPU_CACHE_CAP_BYTES` (4 GiB). A small model on a shared machine thus does not claim gigabytes it
cannot use (a CPU decodes a few sessions at a time; SmolLM2-135M gets 512 MiB, tens of thousands of tokens), while a
7B model keeps the 4 GiB. Either way a fraction never allocates more blocks than `max_batch_size` full sessions need.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..config import ConfigError, EngineConfig
from ..convert.spec import ModelSpec
from .kv_cache import KVCacheStorage

CPU_CACHE_CAP_BYTES = 4 * 1024 ** 3
CPU_CACHE_MIN_BYTES = 512 * 1024 ** 2
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{config.device!r} requested but CUDA is not available")
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, spec: ModelSpec, device: torch.device, packed: bool = False) -> torch.dtype:
    """'auto': on cpu, bf16 for a bf16 checkpoint where puyu's kernels have the CPU's bf16 dot product (measured
    on Zen 5, SmolLM2: the same step time at batch 1, 1.45x the tokens/s at 8 and 32), else float32 (fp16 matmuls
    are slow there; without a bf16 dot product, and for 4-bit packed weights, puyu's kernels are faster with
    float32 activations), but bf16 for packed 4-bit weights without puyu's kernels (torch's fused int4 kernel on
    cpu takes bf16 activations only); the checkpoint's dtype on cuda."""
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type == "cpu":
        if not _native_cpu_kernels(config):
            return torch.bfloat16 if packed else torch.float32
        bf16_native = not packed and spec.torch_dtype == "bfloat16" and _cpu_bf16_dot()
        return torch.bfloat16 if bf16_native else torch.float32
    return _DTYPES.get(spec.torch_dtype, torch.float16)


def _cpu_bf16_dot() -> bool:
    from . import cpu_kernels

    return cpu_kernels.bf16_dot()


def _native_cpu_kernels(config: EngineConfig) -> bool:
    from . import cpu_kernels

    return config.kernels == "auto" and cpu_kernels.available()


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemFree", 0))


def cpu_cache_cap(weight_bytes: Optional[int]) -> int:
    """The most KV-cache bytes a fraction takes on cpu: the weights' size within [512 MiB, 4 GiB] (4 GiB when the
    weights' size is unknown)."""
    if weight_bytes is None:
        return CPU_CACHE_CAP_BYTES
    return max(CPU_CACHE_MIN_BYTES, min(int(weight_bytes), CPU_CACHE_CAP_BYTES))


def num_cache_blocks(config: EngineConfig, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                     session_len: int, weight_bytes: Optional[int] = None) -> int:
    count = config.cache_max_entry_count
    if count >= 1:
        return int(count)
    per_block = KVCacheStorage.bytes_per_block(spec.num_layers, config.cache_block_seq_len, spec.num_kv_heads,
                                               spec.head_dim, dtype, config.quant_policy)
    budget = available_bytes(device) * count
    if device.type == "cpu":
        budget = min(budget, cpu_cache_cap(weight_bytes))
    blocks_per_session = -(-session_len // config.cache_block_seq_len)
    blocks = min(int(budget // per_block), config.max_batch_size * blocks_per_session)
    if blocks < 1:
        raise ConfigError("cache_max_entry_count", f"{count} of the free memory holds no KV block "
                          f"({per_block} bytes each); raise it or give an absolute block count")
    return blocks


def cpu_threads(config: EngineConfig) -> None:
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    elif os.environ.get("PUYU_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["PUYU_NUM_THREADS"]))
