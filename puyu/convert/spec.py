"""`ModelSpec`: the shape of a model as TurboMind's `model_config` / `attention_config` describe it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .archs import HF_ARCHITECTURES


class CheckpointError(ValueError):
    """A checkpoint or workspace cannot be read; the message names the file and what is wrong."""


SUPPORTED_ARCHS = HF_ARCHITECTURES  # config.json architectures[0] -> ModelSpec.arch (one file each: archs/)
VISION_ARCHS = {"InternLMXComposer2ForCausalLM": "xcomposer2"}


@dataclass
class ModelSpec:
    arch: str  # internlm2 | llama | qwen2
    model_arch: str  # HF architectures[0]
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attn_bias: bool
    rope_scaling_type: str = ""  # '' | dynamic | linear | llama3 | yarn
    rope_scaling_factor: float = 0.0
    original_max_position_embeddings: int = 0
    torch_dtype: str = "float16"
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_ids: tuple[int, ...] = (2,)
    quant_method: str = ""  # '' for float weights, 'awq' for AutoAWQ gemm int4 checkpoints
    group_size: int = 0  # quantisation group size (0 for float weights)
    vision: str = ""  # '' for text-only models, 'xcomposer2' for InternLM-XComposer2 (a CLIP tower + Partial LoRA)
    img_size: int = 0  # the square side images are resized to (vision models only)
    lora_r: int = 0  # rank of the Partial LoRA tensors (XComposer2); set from the weights by the converter

    @property
    def session_len(self) -> int:
        """The model's max context: max_position_embeddings, scaled by linear/dynamic rope scaling."""
        if self.rope_scaling_type in ("linear", "dynamic") and self.rope_scaling_factor > 1:
            return int(self.max_position_embeddings * self.rope_scaling_factor)
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _rope_parameters(cfg: dict) -> dict:
    """The rope settings of either config layout: transformers < 5 writes `rope_theta` and `rope_scaling` at the top
    level; transformers 5 writes one `rope_parameters` mapping (`rope_theta`, `rope_type`, `factor`, ...). Keys of
    `rope_parameters` win, top-level keys fill the gaps."""
    merged = dict(cfg.get("rope_scaling") or {})
    if "rope_theta" in cfg:
        merged.setdefault("rope_theta", cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict):
        merged.update(params)
    return merged


def _rope_theta(cfg: dict) -> float:
    return float(_rope_parameters(cfg).get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict) -> tuple[str, float, int]:
    """Accept both `type` and `rope_type` spellings, in either layout; null / default mean no scaling."""
    rs = _rope_parameters(cfg)
    kind = rs.get("rope_type") or rs.get("type") or ""
    if kind == "default":
        kind = ""
    return kind, float(rs.get("factor") or 0.0), int(rs.get("original_max_position_embeddings") or 0)


def read_model_spec(model_dir: Path | str) -> ModelSpec:
    """Read config.json (and generation_config.json for stop ids) of an HF checkpoint."""
    model_dir = Path(model_dir)
    cfg = read_json(model_dir / "config.json")
    archs = cfg.get("architectures") or []
    model_arch = archs[0] if archs else ""
    if model_arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{model_dir / 'config.json'}: unsupported architecture {model_arch or '(none)'!r}; "
                              f"supported: {', '.join(SUPPORTED_ARCHS)}")
    arch = SUPPORTED_ARCHS[model_arch]
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kind, factor, orig = _rope_scaling(cfg)
        spec = ModelSpec(
            arch=arch, model_arch=model_arch, hidden_size=hidden, num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(cfg),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            attn_bias=bool(cfg.get("bias", False)) if arch == "internlm2" else
            (arch == "qwen2" or bool(cfg.get("attention_bias", False))),
            rope_scaling_type=kind, rope_scaling_factor=factor, original_max_position_embeddings=orig,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
        )
    except KeyError as exc:
        raise CheckpointError(f"{model_dir / 'config.json'}: missing field {exc.args[0]!r}") from None
    if spec.num_heads % spec.num_kv_heads:
        raise CheckpointError(f"{model_dir / 'config.json'}: num_attention_heads {spec.num_heads} is not a multiple "
                              f"of num_key_value_heads {spec.num_kv_heads}")
    spec.eos_token_ids = eos_token_ids(model_dir, cfg)
    spec.vision = VISION_ARCHS.get(model_arch, "")
    if spec.vision:
        spec.img_size = int(cfg.get("img_size") or 0)
        if spec.img_size <= 0:
            raise CheckpointError(f"{model_dir / 'config.json'}: a vision model needs a positive 'img_size'")
    spec.quant_method, spec.group_size = _quantization(model_dir, cfg)
    return spec


SUPPORTED_QUANT = {"awq": "gemm"}


def _quantization(model_dir: Path, cfg: dict) -> tuple[str, int]:
    """('awq', group_size) for an AutoAWQ gemm checkpoint, ('', 0) for float weights; anything else is an error."""
    qc = cfg.get("quantization_config")
    if not qc:
        return "", 0
    where = model_dir / "config.json"
    method = str(qc.get("quant_method", "")).lower()
    version = str(qc.get("version", "gemm")).lower()
    if method not in SUPPORTED_QUANT or version != SUPPORTED_QUANT[method]:
        raise CheckpointError(f"{where}: unsupported quantization_config (quant_method {method!r}, version "
                              f"{version!r}); supported: AutoAWQ quant_method 'awq' with version 'gemm'")
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise CheckpointError(f"{where}: quantization_config.bits is {bits}; only 4-bit weights are supported")
    if not qc.get("zero_point", True):
        raise CheckpointError(f"{where}: quantization_config.zero_point is false; only asymmetric AWQ is supported")
    group = int(qc.get("group_size", qc.get("q_group_size", 0)) or 0)
    if group <= 0:
        raise CheckpointError(f"{where}: quantization_config.group_size is missing or not positive")
    return method, group


def eos_token_ids(model_dir: Path, cfg: dict) -> tuple[int, ...]:
    """Stop ids from a config mapping and the generation_config.json beside it (deduplicated, in order)."""
    ids: list[int] = []
    sources = [cfg.get("eos_token_id")]
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        sources.append(read_json(gen_path).get("eos_token_id"))
    for src in sources:
        for i in (src if isinstance(src, list) else [src]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids or [2])
