"""The decoder (InternLM2 / Llama / Qwen2 share it) over TurboMind-layout weights.

Per layer: RMSNorm -> fused QKV `x @ w_qkv (+ bias)` -> interleaved rotary on q, k -> write k, v to the paged cache ->
paged attention (GQA) -> `wo` -> residual; RMSNorm -> SwiGLU `w2(silu(w1 x) * w3 x)` -> residual. Final RMSNorm and
the lm head only for the rows whose logits are needed. A step may replace some rows' embeddings (image features) and
add low-rank adapter deltas on chosen rows of every linear (engine/lora.py: XComposer2's Partial LoRA on image rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..convert.spec import CheckpointError, ModelSpec
from .attention import AttentionBatch, paged_attention
from .kv_cache import KVCacheStorage
from .lora import RowLora, StepInputs, plora_from_weights
from .rotary import InterleavedRotary, apply_rotary

Linear = Callable[[torch.Tensor], torch.Tensor]


def make_linear(weights: dict[str, torch.Tensor], name: str, kernels: str = "torch") -> Linear:
    """The one place a linear is built: dense `X.weight` `[in, out]`, or 4-bit `X.qweight/scales/zeros`."""
    bias = weights.get(f"{name}.bias")
    if f"{name}.weight" in weights:
        return dense_linear(weights[f"{name}.weight"], bias, kernels)
    if f"{name}.qweight" in weights:
        qweight, scales, zeros = (weights[f"{name}.{part}"] for part in ("qweight", "scales", "zeros"))
        group_size = qweight.shape[0] // scales.shape[0]
        if kernels == "auto" and qweight.device.type == "cpu" and qweight.shape[0] % group_size == 0:
            from . import cpu_kernels

            if cpu_kernels.available():
                return cpu_kernels.PackedInt4Linear(qweight, scales, zeros, group_size, bias)
        from .int4 import Int4Linear  # only int4 checkpoints need it

        return Int4Linear(qweight, scales, zeros, group_size, bias=bias)
    raise CheckpointError(f"weights: tensor {name}.weight (or {name}.qweight) is missing")


def dense_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], kernels: str = "torch") -> Linear:
    """`x -> x @ weight + bias` for a TurboMind-layout `weight [in, out]`.

    The weight is stored transposed, `[out, in]` (nn.Linear's layout): every backend streams it fastest that way
    (on cpu `x @ W[in, out]` in bf16 runs 5-18x slower than `F.linear` on `[out, in]`). With `kernels="auto"` on
    cpu, puyu's own linears take it, each streaming the fewest bytes that lose nothing: a float32 weight whose
    values are all bf16 numbers (a bf16 checkpoint computed in float32) is kept in bf16, one that is exactly int8
    times a scale per 32 inputs (a GGUF Q8_0 tensor, e.g. SmolLM2's lm head) as int8; the products are the same.
    """
    w = weight.t().contiguous()
    if kernels == "auto" and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16):
        from . import cpu_kernels

        if cpu_kernels.available():
            w = _narrowed(w)
            blocks = cpu_kernels.exact_int8_blocks(w) if w.dtype == torch.float32 else None
            if blocks is not None:
                return cpu_kernels.PackedInt8Linear(*blocks, bias)
            return cpu_kernels.PackedLinear(w, bias)
    return lambda x: F.linear(x, w, bias)


def _narrowed(w: torch.Tensor) -> torch.Tensor:
    """`w` as bf16 when that loses nothing (every value is a bf16 number), else `w`."""
    if w.dtype == torch.bfloat16:
        return w
    w16 = w.to(torch.bfloat16)
    return w16 if torch.equal(w16.float(), w) else w


def make_gate_up(weights: dict[str, torch.Tensor], prefix: str, kernels: str = "torch") -> Linear:
    """`x -> cat(w1 x, w3 x)`: one matmul for both FFN inputs when they are dense without bias (half the matmul
    calls, each twice as wide: cheaper on cpu, where every call synchronises the threads), else two."""
    names = (prefix + "w1", prefix + "w3")
    dense = all(f"{n}.weight" in weights and f"{n}.bias" not in weights for n in names)
    if dense:
        return dense_linear(torch.cat([weights[f"{n}.weight"] for n in names], dim=1), None, kernels)
    w1, w3 = (make_linear(weights, n, kernels) for n in names)
    return lambda x: torch.cat([w1(x), w3(x)], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 like transformers, cast back before the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: Linear
    wo: Linear
    gate_up: Linear  # x -> cat(w1 x, w3 x)
    w2: Linear


def _get(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in weights:
        raise CheckpointError(f"weights: tensor {name} is missing")
    return weights[name]


class DecoderModel:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], device: torch.device,
                 kernels: str = "torch"):
        self.spec = spec
        self.device = device
        self.kernels = kernels
        self.embed = _get(weights, "tok_embeddings.weight")
        self.norm = _get(weights, "norm.weight")
        self.lm_head = dense_linear(_get(weights, "output.weight").t(), None, kernels)  # stored [vocab, hidden]
        self.dtype = self.embed.dtype
        self.layers = []
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            self.layers.append(LayerWeights(
                attn_norm=_get(weights, p + "attention_norm.weight"), ffn_norm=_get(weights, p + "ffn_norm.weight"),
                qkv=make_linear(weights, p + "attention.w_qkv", kernels),
                wo=make_linear(weights, p + "attention.wo", kernels),
                gate_up=make_gate_up(weights, p + "feed_forward.", kernels),
                w2=make_linear(weights, p + "feed_forward.w2", kernels)))
        self.rotary = InterleavedRotary(spec, device)
        adapters = {"plora": plora_from_weights(weights, spec.num_layers)} if spec.vision == "xcomposer2" else {}
        self.lora = RowLora(adapters)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                cache: KVCacheStorage, logit_rows: torch.Tensor,
                seq_lens: Optional[list[tuple[int, int]]] = None, extra: Optional[StepInputs] = None) -> torch.Tensor:
        """float32 logits `[len(logit_rows), vocab]` for a flattened step of `T` tokens; `extra` gives embeddings of
        some rows (image features) and the rows each adapter applies to."""
        h = F.embedding(input_ids, self.embed)
        if extra is not None and extra.embed_rows is not None and extra.embeds is not None:
            h.index_copy_(0, extra.embed_rows, extra.embeds.to(h.dtype))
        cos, sin = self.rotary.cos_sin(positions, seq_lens)
        if self._fused_steps(cache):
            h = self._layers_fused(h, cos, sin, batch, cache, extra)
        else:
            h = self._layers_reference(h, cos, sin, batch, cache, extra)
        last = rms_norm(h.index_select(0, logit_rows), self.norm, self.spec.norm_eps)
        return self.lm_head(last).float()

    def _fused_steps(self, cache: KVCacheStorage) -> bool:
        """puyu's fused cpu steps (add + RMSNorm, rotary + cache write) apply: kernels on, cpu, float32/bf16,
        unquantised cache (a quantised one is written by KVCacheStorage.write, the one owner of its formulas)."""
        if self.kernels != "auto" or cache.quant_policy:
            return False
        from . import cpu_kernels

        return cpu_kernels.pointwise_supports(self.dtype, self.device)

    def _layers_reference(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch,
                          cache: KVCacheStorage, extra: Optional[StepInputs] = None) -> torch.Tensor:
        s = self.spec
        lora = self.lora.apply
        cos, sin = (t[:, None, :].to(self.dtype) for t in (cos, sin))
        nq, nkv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        for i, lw in enumerate(self.layers):
            x = rms_norm(h, lw.attn_norm, s.norm_eps)
            qkv = lora(i, "attention.w_qkv", x, lw.qkv(x), extra)
            qk = apply_rotary(qkv[:, :nq + nkv].unflatten(-1, (-1, s.head_dim)), cos, sin)  # q and k heads at once
            q, k = qk[:, :s.num_heads], qk[:, s.num_heads:]
            v = qkv[:, nq + nkv:].unflatten(-1, (s.num_kv_heads, s.head_dim))
            cache.write(i, k, v, batch.write_slots)
            attn = paged_attention(i, q, cache, batch, self.kernels).flatten(1)
            h = h + lora(i, "attention.wo", attn, lw.wo(attn), extra)
            x = rms_norm(h, lw.ffn_norm, s.norm_eps)
            gate, up = lora(i, "feed_forward.w1w3", x, lw.gate_up(x), extra).chunk(2, dim=-1)
            act = F.silu(gate) * up
            h = h + lora(i, "feed_forward.w2", act, lw.w2(act), extra)
        return h

    def _layers_fused(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch,
                      cache: KVCacheStorage, extra: Optional[StepInputs] = None) -> torch.Tensor:
        """The reference's arithmetic in fewer calls: each residual add is fused into the RMSNorm that follows it
        (h is updated in place: it is this forward's own tensor), rotary into the cache write."""
        from .cpu_kernels import add_rmsnorm, rope_write

        s = self.spec
        lora = self.lora.apply
        x = add_rmsnorm(h, None, self.layers[0].attn_norm, s.norm_eps)
        for i, lw in enumerate(self.layers):
            qkv = lora(i, "attention.w_qkv", x, lw.qkv(x), extra)
            q = rope_write(qkv, cos, sin, batch.write_slots, cache.k_data[i], cache.v_data[i], s.num_heads,
                           s.num_kv_heads, s.head_dim)
            attn = paged_attention(i, q, cache, batch, self.kernels).flatten(1)
            x = add_rmsnorm(h, lora(i, "attention.wo", attn, lw.wo(attn), extra), lw.ffn_norm, s.norm_eps)
            gate, up = lora(i, "feed_forward.w1w3", x, lw.gate_up(x), extra).chunk(2, dim=-1)
            act = F.silu(gate) * up
            ffn = lora(i, "feed_forward.w2", act, lw.w2(act), extra)
            if i + 1 < len(self.layers):
                x = add_rmsnorm(h, ffn, self.layers[i + 1].attn_norm, s.norm_eps)
            else:
                h.add_(ffn)
        return h
