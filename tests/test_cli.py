"""The `puyu` dispatcher: every area's command module is listed, imports and registers its commands."""
from __future__ import annotations

import importlib

import pytest

from puyu import cli


@pytest.mark.parametrize("name", cli.COMMAND_MODULES)
def test_every_listed_command_module_imports_and_registers(name):
    module = importlib.import_module(name)
    assert callable(getattr(module, "register", None)), f"{name} has no register(subparsers)"


def test_a_missing_command_module_is_an_error_not_a_silent_gap(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "puyu.no_such_area.cli"])
    with pytest.raises(ModuleNotFoundError, match="no_such_area"):
        cli.build_parser()


def test_the_commands_of_every_area_are_there():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for expected in ("serve", "chat", "convert", "bench", "agent", "download", "webui", "inspect", "models"):
        assert expected in commands, f"missing command {expected}: {sorted(commands)}"
