"""Random PEFT LoRA adapters for a checkpoint, built offline with `peft` itself (tests, benchmarks).

`build_peft_adapter` makes a bare module tree with the architecture's HF linear names and shapes
(`model.layers.N.<linear>`), wraps it with peft's `get_peft_model`, gives every `lora_B` random non-zero values (peft
starts B at zero: such an adapter would change nothing) and saves it with `save_pretrained`: the files are exactly
what peft writes for a real fine-tune of that model. `merged_reference` gives the transformers reference of base +
adapter for an architecture transformers has no class for (InternLM2): peft's own `merge_and_unload` on that tree
loaded with the base weights, the merged weights written into a copy of the checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from .convert.archs import layout
from .convert.spec import read_model_spec


def _linear_tree(model_dir: Path) -> nn.Module:
    """`model.layers.N.<linear>` nn.Linear modules (no bias) with the base model's shapes, nothing else."""
    from .engine.peft_adapter import base_shapes

    spec = read_model_spec(model_dir)
    names = layout(spec.arch)
    root, model, layers = nn.Module(), nn.Module(), nn.ModuleList()
    for _ in range(spec.num_layers):
        layer = nn.Module()
        for name, (out, inp) in base_shapes(spec, names).items():
            parent = layer
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, nn.Linear(inp, out, bias=False))
        layers.append(layer)
    model.add_module("layers", layers)
    root.add_module("model", model)
    return root


def build_peft_adapter(model_dir: Union[str, Path], out_dir: Union[str, Path], targets: Sequence[str],
                       r: int = 4, alpha: int = 8, seed: int = 0, b_std: float = 0.1,
                       use_rslora: bool = False) -> Path:
    """A random PEFT LoRA adapter for the checkpoint in `model_dir`, saved in `out_dir` (returned)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        use_rslora=use_rslora)
    peft_model = get_peft_model(_linear_tree(Path(model_dir)), config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out


def merged_checkpoint(model_dir: Union[str, Path], adapter_dir: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """A float32 copy of the checkpoint with the adapter merged into its linears by peft's `merge_and_unload`."""
    from peft import PeftModel

    from .testing import load_shards, save_shards

    model_dir, out = Path(model_dir), Path(out_dir)
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    shards = load_shards(out)
    tree = _linear_tree(model_dir)
    flat = {k: v for tensors in shards.values() for k, v in tensors.items()}
    tree.load_state_dict({k: flat[k].float() for k in tree.state_dict()}, strict=True)
    merged = PeftModel.from_pretrained(tree, str(adapter_dir)).merge_and_unload().state_dict()
    for tensors in shards.values():  # float32 throughout: rounding the merged weights back would blur the check
        for k in tensors:
            tensors[k] = merged[k].contiguous() if k in merged else tensors[k].float()
    save_shards(out, shards)
    return out


def peft_reference(model_dir: Union[str, Path], adapter_dir: Union[str, Path], work_dir: Union[str, Path]):
    """transformers + peft on base + adapter, fp32, eval mode: peft's own LoRA forward where transformers has the
    architecture (Llama, Qwen2), else the reference model of the peft-merged checkpoint (InternLM2)."""
    from peft import PeftModel

    from .convert.reference import load_reference_model

    spec = read_model_spec(Path(model_dir))
    if spec.arch == "internlm2":
        return load_reference_model(merged_checkpoint(model_dir, adapter_dir, work_dir), torch.float32)
    return PeftModel.from_pretrained(load_reference_model(model_dir, torch.float32), str(adapter_dir)).eval()
