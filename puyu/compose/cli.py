"""`puyu compose MODEL "instruction" --images DIR --out DIR`: 图文创作 with InternLM-XComposer2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compose", help="write an illustrated article (InternLM-XComposer2)",
        description="Write an article for INSTRUCTION with image slots the model places, fill each slot with the "
                    "closest image of --images (by the model's own captions), and write article.md, article.html "
                    "and images/ into --out.")
    p.add_argument("model", metavar="MODEL", help="an InternLM-XComposer2 checkpoint (directory or registry name)")
    p.add_argument("instruction", help="what to write about (an instruction or an outline)")
    p.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder of candidate images")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--device", default=None, help="cpu | cuda")
    p.add_argument("--dtype", default=None, help="auto | float32 | float16 | bfloat16")
    p.add_argument("--cache-max-entry-count", type=float, default=None)
    p.set_defaults(func=run_compose)


def run_compose(args: argparse.Namespace) -> int:
    from ..config import GenerationConfig
    from ..engine.pipeline import pipeline
    from .compose import compose
    from .matching import image_files

    image_files(args.images)  # a bad folder fails before the model loads
    options = {k: v for k, v in (("device", args.device), ("dtype", args.dtype),
                                 ("cache_max_entry_count", args.cache_max_entry_count)) if v is not None}
    if isinstance(options.get("cache_max_entry_count"), float) and options["cache_max_entry_count"] >= 1:
        options["cache_max_entry_count"] = int(options["cache_max_entry_count"])
    with pipeline(args.model, **options) as pipe:
        result = compose(pipe, args.instruction, args.images, args.out,
                         GenerationConfig(max_new_tokens=args.max_new_tokens))
    filled = sum(c is not None for c in result.chosen)
    print(f"wrote {result.markdown} and {result.html}: {len(result.slots)} image slots, {filled} filled",
          file=sys.stderr)
    return 0
