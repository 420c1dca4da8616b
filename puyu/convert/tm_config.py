"""`triton_models/weights/config.yaml`: written from a `ModelSpec`, read back into a typed `WorkspaceConfig`.

Keys and defaults follow LMDeploy 0.7.3 (../shared/spec/turbomind-format.md). Reading is lenient about what
LMDeploy's own converters wrote over the versions: `inter_size` as a list or a number, `tp` or `attn_tp_size`,
flat rope fields or a nested `rope_param`, `fp16`/`bf16` spellings of the weight type.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .spec import CheckpointError, ModelSpec

CHAT_TEMPLATES = {"internlm2": "internlm2", "llama": "llama3", "qwen2": "qwen"}
WEIGHT_TYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "float32": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16", "int4": "int4"}
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int4": torch.float16}


def build_config(spec: ModelSpec, *, tp: int, weight_type: str, model_format: str, group_size: int,
                 vocab_pad: int, inter_pad: int, kv_heads_stored: int, model_name: str = "") -> dict[str, Any]:
    """The three mappings of config.yaml for a model written with the given split."""
    template = CHAT_TEMPLATES.get(spec.arch, "")
    model_config = {
        "model_name": model_name or template, "chat_template": template, "model_arch": spec.model_arch,
        "head_num": spec.num_heads, "kv_head_num": kv_heads_stored, "hidden_units": spec.hidden_size,
        "vocab_size": spec.vocab_size, "embedding_size": vocab_pad, "num_layer": spec.num_layers,
        "inter_size": [inter_pad] * spec.num_layers, "norm_eps": spec.norm_eps, "attn_bias": int(spec.attn_bias),
        "size_per_head": spec.head_dim, "group_size": group_size, "weight_type": weight_type,
        "session_len": spec.session_len, "tp": tp, "model_format": model_format,
        "expert_num": [], "expert_inter_size": 0, "experts_per_token": 0, "moe_shared_gate": False,
        "norm_topk_prob": False, "routed_scale": 1.0, "topk_group": 1, "topk_method": "greedy",
        "moe_group_num": 1, "q_lora_rank": 0, "kv_lora_rank": 0, "qk_rope_dim": 0, "v_head_dim": 0,
        "qk_norm": False, "tune_layer_num": 1,
    }
    kind = spec.rope_scaling_type
    attention_config = {
        "rotary_embedding": spec.head_dim, "rope_theta": spec.rope_theta, "softmax_scale": 0.0,
        "attention_factor": -1.0, "max_position_embeddings": spec.max_position_embeddings,
        "original_max_position_embeddings": spec.original_max_position_embeddings,
        "rope_scaling_type": kind, "rope_scaling_factor": float(spec.rope_scaling_factor) if kind else 0.0,
        "use_dynamic_ntk": int(kind == "dynamic"), "low_freq_factor": 1.0, "high_freq_factor": 1.0,
        "beta_fast": 32.0, "beta_slow": 1.0, "use_logn_attn": 0, "cache_block_seq_len": 64,
    }
    lora_config = {"lora_policy": "", "lora_r": 0, "lora_scale": 0.0, "lora_max_wo_r": 0,
                   "lora_rank_pattern": "", "lora_scale_pattern": ""}
    if spec.vision == "xcomposer2":  # as LMDeploy 0.7.3 writes it for XComposer2: r 256 whatever the tensors hold
        lora_config.update(lora_policy="plora", lora_r=256, lora_scale=1.0, lora_max_wo_r=256)
    return {"model_config": model_config, "attention_config": attention_config, "lora_config": lora_config}


def dump_config(config: dict[str, Any], path: Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=True)


@dataclass
class WorkspaceConfig:
    """What the reader needs from config.yaml, typed."""

    model_arch: str
    head_num: int
    kv_head_num: int  # as stored (after KV-head duplication)
    hidden_units: int
    vocab_size: int
    num_layer: int
    inter_size: int  # padded, as stored
    norm_eps: float
    attn_bias: bool
    size_per_head: int
    group_size: int
    weight_type: str  # float16 | bfloat16 | int4
    tp: int
    model_format: str
    session_len: int
    rope_theta: float
    max_position_embeddings: int
    rope_scaling_type: str
    rope_scaling_factor: float
    original_max_position_embeddings: int
    raw: dict[str, Any]

    @property
    def float_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.weight_type]


def _old_workspace_message(ini: Path) -> str:
    """LMDeploy 0.2-0.5 wrote config.ini; in 0.2-0.3 `quant_policy = 4` meant int8 KV with offline scales."""
    import configparser

    parser = configparser.ConfigParser()
    try:
        parser.read(ini)
        policy = parser.get("llama", "quant_policy", fallback="0").strip()
    except configparser.Error:
        policy = "0"
    msg = (f"{ini}: a workspace written by LMDeploy < 0.6 (config.ini); puyu reads the config.yaml layout of "
           f"LMDeploy 0.6-0.7.3: convert the HF checkpoint again with `puyu convert`")
    if policy == "4":
        msg += ("; note: its quant_policy = 4 meant int8 KV with offline calibrated scales in LMDeploy 0.2-0.3, "
                "while quant_policy 4 is int4 KV now (use --quant-policy 8 for int8)")
    return msg


def read_config(path: Path) -> WorkspaceConfig:
    """Parse config.yaml; a missing or malformed field is a `CheckpointError` naming it."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        old = path.with_name("config.ini")
        if old.exists():
            raise CheckpointError(_old_workspace_message(old)) from None
        raise CheckpointError(f"{path}: file not found (not a TurboMind workspace?)") from None
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_config"), dict):
        raise CheckpointError(f"{path}: no 'model_config' mapping")
    mc, ac = raw["model_config"], raw.get("attention_config") or {}
    return _parse(path, mc, ac, raw)


def _parse(path: Path, mc: dict, ac: dict, raw: dict) -> WorkspaceConfig:
    def need(key: str, cast=int, src: dict = mc, section: str = "model_config"):
        if src.get(key) is None:
            raise CheckpointError(f"{path}: {section}.{key} is missing")
        try:
            return cast(src[key])
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: {section}.{key} has an invalid value {src[key]!r}") from None

    weight_type = WEIGHT_TYPES.get(str(mc.get("weight_type", "")).lower())
    if weight_type is None:
        raise CheckpointError(f"{path}: model_config.weight_type {mc.get('weight_type')!r} is not supported "
                              f"(float16, bfloat16 or int4)")
    inter = mc.get("inter_size")
    if isinstance(inter, list):
        if not inter or len(set(inter)) != 1:
            raise CheckpointError(f"{path}: model_config.inter_size must hold one width for every layer, got {inter}")
        inter = inter[0]
    rope = _rope_fields(mc, ac)
    return WorkspaceConfig(
        model_arch=str(mc.get("model_arch") or ""), head_num=need("head_num"), kv_head_num=need("kv_head_num"),
        hidden_units=need("hidden_units"), vocab_size=need("vocab_size"), num_layer=need("num_layer"),
        inter_size=need("inter_size", src={"inter_size": inter}), norm_eps=float(mc.get("norm_eps", 1e-6)),
        attn_bias=bool(int(mc.get("attn_bias", 0))), size_per_head=need("size_per_head"),
        group_size=int(mc.get("group_size") or 0) if weight_type == "int4" else 0, weight_type=weight_type,
        tp=int(mc.get("tp") or mc.get("attn_tp_size") or 1), model_format=str(mc.get("model_format") or "hf"),
        session_len=int(mc.get("session_len") or 0), raw=raw, **rope,
    )


def _rope_fields(mc: dict, ac: dict) -> dict[str, Any]:
    """Flat attention_config fields (LMDeploy <= 0.7) or the nested `rope_param` of later versions."""
    rp = ac.get("rope_param") or {}
    kind = str(ac.get("rope_scaling_type") or rp.get("type") or "")
    if kind == "default":
        kind = ""
    factor = float(ac.get("rope_scaling_factor") or rp.get("factor") or 0.0)
    if ac.get("use_dynamic_ntk") and not kind:
        kind = "dynamic"
    return {
        "rope_theta": float(ac.get("rope_theta") or rp.get("base") or 10000.0),
        "max_position_embeddings": int(ac.get("max_position_embeddings") or rp.get("max_position_embeddings")
                                       or mc.get("session_len") or 2048),
        "rope_scaling_type": kind, "rope_scaling_factor": factor if kind else 0.0,
        "original_max_position_embeddings": int(ac.get("original_max_position_embeddings")
                                                or rp.get("original_max_position_embeddings") or 0),
    }
