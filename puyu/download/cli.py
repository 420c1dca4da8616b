"""`puyu download` and `puyu models`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from .hub import SOURCES, DownloadRequest, download
from .registry import ModelEntry, load_registry, lookup
from .remote import local_copy, request_for


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "download", help="download a model (registry name or hub repository id)",
        description="Download a model into the Hugging Face cache (or --local-dir), resumably, with a progress bar. "
                    "The hub is $HF_ENDPOINT or --endpoint (e.g. https://hf-mirror.com), else huggingface.co. "
                    "Prints the local directory.")
    p.add_argument("model", metavar="REPO_OR_NAME", help="registry name (see `puyu models`) or 'owner/name'")
    p.add_argument("--include", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="only files matching these glob patterns (e.g. config.json '*.safetensors')")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="skip files matching these glob patterns")
    p.add_argument("--revision", help="branch, tag or commit (default: the registry's, else the default branch)")
    p.add_argument("--local-dir", type=Path, help="put real files here instead of the cache")
    p.add_argument("--cache-dir", type=Path, help="cache folder (default: $HF_HUB_CACHE)")
    p.add_argument("--endpoint", help="hub or mirror URL (default: $HF_ENDPOINT, else https://huggingface.co)")
    p.add_argument("--source", choices=SOURCES, help="where to download from (default: the registry's first source, "
                   "huggingface for a repository id)")
    p.set_defaults(func=run_download)

    m = subparsers.add_parser("models", help="list the models of the registry (configs/models/*.yaml)",
                              description="List the registry; LOCAL says whether a complete copy is already here "
                                          "(found without asking any hub).")
    m.add_argument("name", nargs="?", help="show one model in full")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=run_models)


def _request(args: argparse.Namespace) -> Optional[DownloadRequest]:
    return request_for(args.model, source=args.source, revision=args.revision, include=args.include,
                       exclude=args.exclude, local_dir=args.local_dir, cache_dir=args.cache_dir,
                       endpoint=args.endpoint)


def run_download(args: argparse.Namespace) -> int:
    request = _request(args)
    if request is None:  # a built-in model: built locally, nothing to download
        from ..tiny import puyu_tiny_path

        print(puyu_tiny_path())
        return 0
    print(download(request))
    return 0


def _row(e: ModelEntry) -> list[str]:
    source = e.default_source
    repo = "(built in)" if e.builtin or source is None else e.repos.get(source, "")
    return [e.name, e.display_name, e.params, e.architecture, repo, "yes" if e.persona else "",
            "yes" if local_copy(e) else ""]


def _details(e: ModelEntry) -> str:
    local = local_copy(e)
    lines = [f"{e.name}: {e.display_name} ({e.params} parameters)", f"  {e.description}",
             f"  architecture: {e.architecture}   chat template: {e.chat_template}   "
             f"context: {e.context_length or '?'}"]
    lines += [f"  {source}: {repo}" for source, repo in e.repos.items()]
    if e.builtin:
        lines.append("  built in: made offline on first use, never downloaded")
    if e.generation:
        lines.append("  generation: " + ", ".join(f"{k}={v}" for k, v in e.generation.items()))
    if e.persona:
        lines += [f"  system prompt: {e.persona.system}", f"  greeting: {e.persona.greeting}"]
    if e.notes:
        lines.append(f"  notes: {e.notes}")
    lines.append(f"  local copy: {local or '(none: downloaded on first use)'}")
    lines.append(f"  file: {e.source_file}")
    return "\n".join(lines)


def _as_dict(e: ModelEntry) -> dict:
    from dataclasses import asdict

    local = local_copy(e)
    return {**asdict(e), "local_path": str(local) if local else None}


def run_models(args: argparse.Namespace) -> int:
    registry = load_registry()
    if args.name:
        entry = lookup(args.name, registry)
        print(json.dumps(_as_dict(entry), ensure_ascii=False, indent=2) if args.json else _details(entry))
        return 0
    if args.json:
        print(json.dumps([_as_dict(e) for e in registry.values()], ensure_ascii=False, indent=2))
        return 0
    rows = [["NAME", "MODEL", "PARAMS", "ARCHITECTURE", "REPOSITORY", "PERSONA", "LOCAL"]] + [_row(e) for e in registry.values()]
    widths = [max(_width(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c + " " * (w - _width(c)) for c, w in zip(r, widths)).rstrip())
    return 0


def _width(text: str) -> int:
    """Display width: CJK characters take two columns."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
