"""Personas for the chat tab: a name, a system prompt and a greeting, read from `configs/personas/*.yaml`.

Each file holds one persona: `name`, `system` (the system prompt) and `greeting` (the first assistant message shown).
`default.yaml` comes first (the persona a new session starts with), then the others by file name, then a plain
assistant with no system prompt, which is always offered.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from ..paths import configs_dir

DEFAULT_PERSONA_DIR = configs_dir() / "personas"


@dataclass(frozen=True)
class Persona:
    name: str = ""  # "" only for an unnamed one (`puyu chat --system ...`); files must name theirs
    system: str = ""
    greeting: str = ""


PLAIN = Persona(name="Assistant (no system prompt)")


def _field(data: dict, path: Path, key: str, required: bool) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f"{path}: field '{key}' must be a non-empty string")
    return value


def read_persona(path: Path) -> Persona:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with name, system and greeting")
    system = data.get("system", data.get("system_prompt"))
    return Persona(name=_field(data, path, "name", True),
                   system=_field({"system": system}, path, "system", False),
                   greeting=_field(data, path, "greeting", False))


def load_personas(directory: Optional[Path] = None) -> list[Persona]:
    """The personas of `directory` (default first), then the plain assistant; names must be unique."""
    directory = Path(directory) if directory is not None else DEFAULT_PERSONA_DIR
    if not directory.is_dir():
        if directory != DEFAULT_PERSONA_DIR:
            raise FileNotFoundError(f"{directory}: persona directory not found")
        return [PLAIN]
    paths = sorted(directory.glob("*.y*ml"), key=lambda p: (p.stem != "default", p.name))
    personas: list[Persona] = []
    for path in paths:
        persona = read_persona(path)
        if any(p.name == persona.name for p in personas + [PLAIN]):
            raise ValueError(f"{path}: persona name {persona.name!r} is used twice")
        personas.append(persona)
    return personas + [PLAIN]
