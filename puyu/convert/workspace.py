"""Read a TurboMind workspace (puyu's or LMDeploy's) back into tp=1 TurboMind-layout tensors.

The rank files are memory-mapped (`torch.from_file`, copy-on-write), merged over the ranks and stripped of their
vocab/FFN padding and duplicated KV heads; at tp=1 the tensors stay views of the mapped files. Nothing is converted
again: the result equals `read_hf_checkpoint` of the source directory.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .layout import tp1_tensors
from .spec import SUPPORTED_ARCHS, VISION_ARCHS, CheckpointError, ModelSpec, eos_token_ids, read_json, read_model_spec
from .tm_config import WorkspaceConfig, read_config
from .tp import TPPlan

WEIGHTS_DIR = Path("triton_models") / "weights"


def weights_dir(path: Path | str) -> Path:
    return Path(path) / WEIGHTS_DIR


def read_workspace_config(path: Path | str) -> WorkspaceConfig:
    return read_config(weights_dir(path) / "config.yaml")


def read_workspace(path: Path | str,
                   dtype: torch.dtype | None = None) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """(spec, tensors at tp=1) of a workspace; `dtype` casts the float tensors (None keeps the stored dtype)."""
    root = Path(path)
    spec, files = workspace_files(root)
    tensors = {}
    for name, (plan, parts) in files.items():
        mapped = [map_tensor(weights_dir(root) / fname, shape, file_dtype) for fname, shape, file_dtype in parts]
        t = plan.merge(name, mapped)
        tensors[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return spec, tensors


FilePart = tuple[str, torch.Size, torch.dtype]


def workspace_files(root: Path) -> tuple[ModelSpec, dict[str, tuple[TPPlan, list[FilePart]]]]:
    """The spec, and for every tp=1 tensor the rank files that hold it with their shapes and dtypes."""
    cfg = read_workspace_config(root)
    spec = workspace_spec(root, cfg)
    plan = TPPlan(cfg.tp, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.vocab_size,
                  spec.intermediate_size, cfg.group_size)
    plan.validate()
    _check_plan(root, cfg, plan)
    out = {}
    for name, info in tp1_tensors(spec, cfg.group_size).items():
        file_dtype = torch.int32 if info.packed else cfg.float_dtype
        meta = torch.empty(info.shape, dtype=file_dtype, device="meta")
        out[name] = (plan, [(fname, part.shape, file_dtype) for fname, part in plan.split(name, meta)])
    return spec, out


def map_tensor(path: Path, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Memory-map one headerless tensor dump; its size must match the shape config.yaml implies."""
    numel = shape.numel()
    expected = numel * torch.empty((), dtype=dtype).element_size()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: tensor file missing (config.yaml implies shape {tuple(shape)})") from None
    if size != expected:
        raise CheckpointError(f"{path}: {size} bytes, but config.yaml implies shape {tuple(shape)} of "
                              f"{str(dtype).removeprefix('torch.')} = {expected} bytes (shape mismatch)")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_file(str(path), shared=False, size=numel, dtype=dtype).view(shape)


def workspace_spec(root: Path, cfg: WorkspaceConfig) -> ModelSpec:
    """The model's spec: from the HF config.json copied to the root when there is one, else from config.yaml.

    config.json gives the unpadded sizes and the original KV heads; config.yaml must agree with it.
    """
    if (root / "config.json").exists():
        spec = read_model_spec(root)
        _cross_check(root, cfg, spec)
    else:
        spec = _spec_from_config(root, cfg)
    spec.torch_dtype = str(cfg.float_dtype).removeprefix("torch.")
    spec.quant_method = cfg.model_format if cfg.weight_type == "int4" else ""
    spec.group_size = cfg.group_size
    spec.lora_r = _lora_rank(root, cfg)
    return spec


def _lora_rank(root: Path, cfg: WorkspaceConfig) -> int:
    """The rank of a PLoRA workspace's tensors, from a `wo.lora_b` file (`[r, hidden]`, copied to every rank):
    config.yaml's lora_r says 256 whatever the tensors hold (LMDeploy writes it so)."""
    probe = weights_dir(root) / "layers.0.attention.wo.lora_b.0.weight"
    if not probe.exists():
        return 0
    row = cfg.hidden_units * torch.empty((), dtype=cfg.float_dtype).element_size()
    size = probe.stat().st_size
    if size % row:
        raise CheckpointError(f"{probe}: {size} bytes is not a whole number of rows of {cfg.hidden_units}")
    return size // row


def _cross_check(root: Path, cfg: WorkspaceConfig, spec: ModelSpec) -> None:
    pairs: dict[str, tuple[object, object]] = {"head_num": (cfg.head_num, spec.num_heads), "hidden_units": (cfg.hidden_units, spec.hidden_size),
             "num_layer": (cfg.num_layer, spec.num_layers), "size_per_head": (cfg.size_per_head, spec.head_dim),
             "vocab_size": (cfg.vocab_size, spec.vocab_size)}
    if cfg.model_arch:
        pairs["model_arch"] = (cfg.model_arch, spec.model_arch)
    for key, (yaml_value, json_value) in pairs.items():
        if yaml_value != json_value:
            raise CheckpointError(f"{root / WEIGHTS_DIR / 'config.yaml'}: model_config.{key} is {yaml_value!r} but "
                                  f"{root / 'config.json'} implies {json_value!r}")


def _spec_from_config(root: Path, cfg: WorkspaceConfig) -> ModelSpec:
    """A spec from config.yaml alone (padded FFN width, stored KV heads: the same function, padded)."""
    where = root / WEIGHTS_DIR / "config.yaml"
    if cfg.model_arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{where}: unsupported model_arch {cfg.model_arch or '(none)'!r}; "
                              f"supported: {', '.join(SUPPORTED_ARCHS)}")
    gen = root / "generation_config.json"
    spec = ModelSpec(
        arch=SUPPORTED_ARCHS[cfg.model_arch], model_arch=cfg.model_arch, hidden_size=cfg.hidden_units,
        num_layers=cfg.num_layer, num_heads=cfg.head_num, num_kv_heads=cfg.kv_head_num, head_dim=cfg.size_per_head,
        intermediate_size=cfg.inter_size, vocab_size=cfg.vocab_size, norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings, attn_bias=cfg.attn_bias,
        rope_scaling_type=cfg.rope_scaling_type, rope_scaling_factor=cfg.rope_scaling_factor,
        original_max_position_embeddings=cfg.original_max_position_embeddings,
        vision=VISION_ARCHS.get(cfg.model_arch, ""),
    )
    if gen.exists():
        gen_cfg = read_json(gen)
        spec.bos_token_id = gen_cfg.get("bos_token_id", spec.bos_token_id)
        spec.eos_token_ids = eos_token_ids(root, gen_cfg)
    return spec


def _check_plan(root: Path, cfg: WorkspaceConfig, plan: TPPlan) -> None:
    where = root / WEIGHTS_DIR / "config.yaml"
    if plan.kv_heads_stored != cfg.kv_head_num:
        raise CheckpointError(f"{where}: model_config.kv_head_num is {cfg.kv_head_num}, expected "
                              f"{plan.kv_heads_stored} for {plan.num_kv_heads} KV heads at tp {plan.tp}")
    if plan.inter_pad != cfg.inter_size:
        raise CheckpointError(f"{where}: model_config.inter_size is {cfg.inter_size}, expected {plan.inter_pad} "
                              f"(FFN width {plan.inter_size} padded for group size {cfg.group_size}, tp {plan.tp})")
