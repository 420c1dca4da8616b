"""The `puyu` command: a thin layer over library calls.

Each area registers its subcommands from its own module (`register(subparsers)`), so this file only dispatches.
A subcommand handler returns an exit code; `CLIError` (or any `ValueError` subclass the library raises for bad
input) is printed as one line on stderr with exit code 2, never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# The modules that add subcommands; each defines `register(subparsers) -> None`. Every one must import: a module
# that cannot is an error here, not a silently missing command.
COMMAND_MODULES = [
    "puyu.convert.cli",
    "puyu.serve.cli",
    "puyu.bench.cli",
    "puyu.agent.cli",
    "puyu.download.cli",
    "puyu.webui.cli",
    "puyu.compose.cli",
]


class CLIError(Exception):
    """A user error: printed as `puyu: error: <message>` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puyu", description="Serve, convert, benchmark and run agents on "
                                     "InternLM chat models.")
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"puyu {version('puyu')}"
    except PackageNotFoundError:
        return "puyu (not installed)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"puyu: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # under `python -m puyu.cli` this file runs as __main__, a second copy of the module whose CLIError
    # would not be the one the areas raise: dispatch through the imported module instead
    from puyu.cli import main as _main

    sys.exit(_main())
