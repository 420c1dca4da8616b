"""`puyu convert`, `puyu quantize`, `puyu inspect`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="write a TurboMind workspace (LMDeploy 0.7.3 layout) from an HF "
                              "checkpoint or a GGUF file", description="Convert an HF checkpoint (float or AutoAWQ "
                              "int4) or a GGUF file (Q4_0/Q4_1: int4, group 32; other types: fp16/bf16) into a "
                              "TurboMind workspace that LMDeploy <= 0.7.3 and puyu can serve.")
    p.add_argument("model_path", metavar="MODEL_PATH", help="HF checkpoint directory, GGUF file (or puyu-tiny)")
    p.add_argument("--dst-path", default="./workspace", help="workspace directory to create (default ./workspace)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: 1, 2, 4 or 8")
    p.add_argument("--model-format", default=None, choices=["hf", "awq"],
                   help="hf (float weights) or awq (int4: AutoAWQ gemm, or a GGUF file's Q4_0/Q4_1); "
                   "default: from the checkpoint")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16"],
                   help="weight dtype of a float model (auto: the checkpoint's)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (must match the checkpoint)")
    p.add_argument("--model-name", default="", help="model_name written to config.yaml")
    p.add_argument("--force", action="store_true", help="replace a non-empty destination")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert)

    q = subparsers.add_parser("quantize", help="4-bit AWQ-format checkpoint from an HF float checkpoint (CPU)",
                              description="Quantise the linears of an HF checkpoint to 4 bits per group (round-to-"
                              "nearest, activation-aware scaling with --calib-file) and save it in AutoAWQ gemm "
                              "format.")
    q.add_argument("model_path", metavar="MODEL_PATH")
    q.add_argument("--dst-path", required=True, help="directory for the quantised checkpoint")
    q.add_argument("--w-bits", type=int, default=4, help="weight bits (only 4)")
    q.add_argument("--group-size", type=int, default=128, help="group size: 32, 64 or 128 (default 128)")
    q.add_argument("--calib-file", default=None, help="a text file for activation-aware scaling (AWQ)")
    q.add_argument("--calib-tokens", type=int, default=512, help="calibration tokens to use (default 512)")
    q.add_argument("--force", action="store_true", help="replace a non-empty destination")
    q.set_defaults(func=_quantize)

    i = subparsers.add_parser("inspect", help="show what a checkpoint or workspace holds")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--tensors", action="store_true", help="also one line per tensor (name, shape, dtype, bytes)")
    i.add_argument("--summary", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for scripts
    i.set_defaults(func=_inspect)


def _model_dir(model: str) -> Path:
    from ..resolve import resolve_model_path

    return resolve_model_path(model)


def _convert(args: argparse.Namespace) -> int:
    from .writer import ConvertOptions, convert_checkpoint

    src = _model_dir(args.model_path)
    fmt = args.model_format or _default_format(src)
    options = ConvertOptions(tp=args.tp, model_format=fmt, dtype=args.dtype, group_size=args.group_size,
                             force=args.force, model_name=args.model_name,
                             progress=not args.no_progress and sys.stderr.isatty())
    r = convert_checkpoint(src, Path(args.dst_path), options)
    print(f"wrote {r.path} ({r.spec.model_arch}, {r.weight_type}, tp={r.tp}): {r.num_files} tensor files, "
          f"{r.weight_bytes / 2**20:.1f} MiB in {r.seconds:.1f} s")
    return 0


def _default_format(src: Path) -> str:
    """awq for AutoAWQ checkpoints and GGUF files with Q4_0/Q4_1 linears, else hf."""
    from .gguf import is_gguf_dir
    from .gguf_convert import gguf_default_format
    from .spec import read_model_spec

    return gguf_default_format(src) if is_gguf_dir(src) else (read_model_spec(src).quant_method or "hf")


def _quantize(args: argparse.Namespace) -> int:
    from .quantize import QuantizeOptions, quantize_checkpoint

    options = QuantizeOptions(w_bits=args.w_bits, group_size=args.group_size,
                              calib_path=Path(args.calib_file) if args.calib_file else None,
                              calib_tokens=args.calib_tokens, force=args.force)
    r = quantize_checkpoint(_model_dir(args.model_path), Path(args.dst_path), options)
    how = "activation-aware scaling + round-to-nearest" if r.awq_scaled else "round-to-nearest"
    print(f"wrote {r.path}: {r.num_linears} linears quantised to 4 bits ({how}, group {args.group_size}) "
          f"in {r.seconds:.1f} s")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import format_inspection, inspect_path

    print(format_inspection(inspect_path(args.path), show_tensors=args.tensors))
    return 0
