"""Paged KV-cache storage: `num_blocks` blocks of `block_size` tokens per layer, optionally quantised.

A token's place in the cache is its *slot*: `slot = block_id * block_size + offset`. The block manager hands out
block ids; the model runner turns (block table, positions) into slots (`slots_for`) and calls `write` after computing
k (after rotary) and v, and `read` to gather the context it attends over.

Layout per layer (K and V each):
- quant_policy 0: data `[num_blocks, block_size, Hkv, D]` in the compute dtype.
- quant_policy 8: data `[num_blocks, block_size, Hkv, D]` uint8, plus params `[num_blocks, block_size, Hkv, 2]`
  (scale, zero) in the compute dtype: a block's scales and zeros sit at the same block index as its data.
- quant_policy 4: data `[num_blocks, block_size, Hkv, D / 8]` int32 (8 nibbles per word, see `kv_quant`), plus
  the same params.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import kv_quant

QUANT_BITS = {8: 8, 4: 4}
PARAMS_PER_HEAD = 2  # scale, zero


def _validate(num_kv_heads: int, head_dim: int, dtype: torch.dtype, quant_policy: int) -> None:
    if quant_policy not in (0, 8, 4):
        raise ValueError(f"quant_policy must be 0 (off), 8 (int8) or 4 (int4), got {quant_policy!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point compute dtype, got {dtype}")
    if quant_policy == 4 and head_dim % kv_quant.NIBBLES_PER_WORD:
        raise ValueError(f"quant_policy 4 needs head_dim to be a multiple of 8, got head_dim={head_dim}")
    if num_kv_heads < 1 or head_dim < 1:
        raise ValueError(f"num_kv_heads and head_dim must be >= 1, got {num_kv_heads} and {head_dim}")


def _bytes_per_head_token(head_dim: int, dtype: torch.dtype, quant_policy: int) -> int:
    """Bytes one token of one KV head takes for K (or for V), parameters included."""
    esize = torch.empty((), dtype=dtype).element_size()
    if quant_policy == 0:
        return head_dim * esize
    data = head_dim if quant_policy == 8 else head_dim // 2
    return data + PARAMS_PER_HEAD * esize


def slot_list(block_table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of token positions [start, end) of a sequence with blocks `block_table`: block * size + offset."""
    if end > len(block_table) * block_size:
        raise ValueError(f"positions up to {end} need {-(-end // block_size)} blocks, the table has {len(block_table)}")
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def slots_for(block_table: Sequence[int], start: int, end: int, block_size: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """`slot_list` as an int64 tensor on `device`."""
    return torch.tensor(slot_list(block_table, start, end, block_size), dtype=torch.int64, device=device)


class KVCacheStorage:
    """K/V tensors of all layers, addressed by slot; quantises on `write`, dequantises on `read`."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, quant_policy: int = 0):
        _validate(num_kv_heads, head_dim, dtype, quant_policy)
        if num_layers < 1 or num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_layers, num_blocks and block_size must be >= 1, "
                             f"got {num_layers}, {num_blocks}, {block_size}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device, self.quant_policy = dtype, torch.device(device), quant_policy
        shape = (num_layers, num_blocks, block_size, num_kv_heads)
        if quant_policy == 0:
            data_shape, data_dtype = shape + (head_dim,), dtype
        elif quant_policy == 8:
            data_shape, data_dtype = shape + (head_dim,), torch.uint8
        else:
            data_shape, data_dtype = shape + (head_dim // kv_quant.NIBBLES_PER_WORD,), torch.int32
        self.k_data = torch.zeros(data_shape, dtype=data_dtype, device=self.device)
        self.v_data = torch.zeros(data_shape, dtype=data_dtype, device=self.device)
        self.k_params = self.v_params = None
        if quant_policy:
            self.k_params = torch.zeros(shape + (PARAMS_PER_HEAD,), dtype=dtype, device=self.device)
            self.v_params = torch.zeros(shape + (PARAMS_PER_HEAD,), dtype=dtype, device=self.device)

    # ---- sizes -------------------------------------------------------------------------------------------------
    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, quant_policy: int) -> int:
        """Bytes one block takes over all layers, K and V, quantisation parameters included."""
        _validate(num_kv_heads, head_dim, dtype, quant_policy)
        return 2 * num_layers * block_size * num_kv_heads * _bytes_per_head_token(head_dim, dtype, quant_policy)

    def nbytes(self) -> int:
        """Bytes actually allocated (equals `num_blocks * bytes_per_block(...)`)."""
        tensors = [self.k_data, self.v_data, self.k_params, self.v_params]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    # ---- access ------------------------------------------------------------------------------------------------
    def _flat(self, t: torch.Tensor, layer: int) -> torch.Tensor:
        return t[layer].view(self.num_slots, *t.shape[3:])

    def _check(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        return slots.to(device=self.device, dtype=torch.int64).reshape(-1)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v `[T, Hkv, D]` (k after rotary) at `slots` (int64 `[T]`)."""
        slots = self._check(layer, slots)
        expect = (slots.numel(), self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expect or tuple(v.shape) != expect:
            raise ValueError(f"k and v must have shape {expect}, got {tuple(k.shape)} and {tuple(v.shape)}")
        for x, data, params in ((k, self.k_data, self.k_params), (v, self.v_data, self.v_params)):
            self._write_one(x.to(device=self.device, dtype=self.dtype), self._flat(data, layer), params, layer, slots)

    def _write_one(self, x: torch.Tensor, data: torch.Tensor, params: torch.Tensor | None, layer: int,
                   slots: torch.Tensor) -> None:
        if self.quant_policy == 0:
            data.index_copy_(0, slots, x)
            return
        q, scale, zero = kv_quant.quantize(x, QUANT_BITS[self.quant_policy], self.dtype)
        stored = q if self.quant_policy == 8 else kv_quant.pack_int4(q)
        data.index_copy_(0, slots, stored)
        assert params is not None  # a quantised cache always has its parameter tensors
        self._flat(params, layer).index_copy_(0, slots, torch.stack([scale, zero], dim=-1))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather k, v `[N, Hkv, D]` in the compute dtype (dequantised) for `slots`."""
        slots = self._check(layer, slots)
        return (self._read_one(self.k_data, self.k_params, layer, slots),
                self._read_one(self.v_data, self.v_params, layer, slots))

    def _read_one(self, data: torch.Tensor, params: torch.Tensor | None, layer: int,
                  slots: torch.Tensor) -> torch.Tensor:
        stored = self._flat(data, layer).index_select(0, slots)
        p = None if params is None else self._flat(params, layer).index_select(0, slots)
        return self._dequantize(stored, p)

    def _dequantize(self, stored: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        if self.quant_policy == 0:
            return stored
        q = stored if self.quant_policy == 8 else kv_quant.unpack_int4(stored)
        assert params is not None  # a quantised cache always has its parameter tensors
        return kv_quant.dequantize(q, params[..., 0], params[..., 1], self.dtype)

    def read_blocks(self, layer: int, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather k, v `[B, nb * block_size, Hkv, D]` of whole blocks `block_table` (int64 `[B, nb]`).

        Copying whole blocks is much cheaper than gathering token by token (one index per block, not per token);
        the caller masks the positions past each context's end.
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        b, nb = block_table.shape
        flat = block_table.reshape(-1)

        def gather(data: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
            stored = data[layer].index_select(0, flat).view(b, nb * self.block_size, *data.shape[3:])
            p = None if params is None else params[layer].index_select(0, flat).view(b, nb * self.block_size,
                                                                                      *params.shape[3:])
            return self._dequantize(stored, p)

        return gather(self.k_data, self.k_params), gather(self.v_data, self.v_params)

    def read_quantized(self, layer: int, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored integers (unpacked, uint8) and (scale, zero) of `slots`; for tests and inspection."""
        if self.quant_policy == 0:
            raise ValueError("read_quantized needs quant_policy 8 or 4")
        slots = self._check(layer, slots)
        out: dict[str, torch.Tensor] = {}
        for name, data, params in (("k", self.k_data, self.k_params), ("v", self.v_data, self.v_params)):
            stored = self._flat(data, layer).index_select(0, slots)
            out[name] = stored if self.quant_policy == 8 else kv_quant.unpack_int4(stored)
            assert params is not None  # a quantised cache always has its parameter tensors
            p = self._flat(params, layer).index_select(0, slots)
            out[name + "_scale"], out[name + "_zero"] = p[..., 0], p[..., 1]
        return out
