"""Personas for the chat tab: a name, a system prompt and a greeting, read from `configs/personas/*.yaml`.

Each file holds one persona: `name`, `system` (the system prompt) and `greeting` (the first assistant message shown).
`default.yaml` comes first (the persona a new session starts with), then the others by file name, then a plain
assistant with no system prompt, which is always offered.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .paths import configs_dir

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


# A tokenizer that spends more tokens than this per character of a language was (nearly) not trained on it: byte-level
# fallback gives 2-3 tokens per CJK character (SmolLM2: 2.4), a tokenizer that knows Chinese about 1 or less
# (InternLM2: 0.8, Qwen2: 0.7).
FOREIGN_TOKENS_PER_CHAR = 1.6


def claims_internlm(persona: Persona) -> bool:
    """A persona that tells the model it is InternLM (the default one): only right for an InternLM model."""
    return "internlm" in persona.system.lower()


def order_for_model(personas: list[Persona], model_id: str) -> list[Persona]:
    """The personas with the one a new session starts with first: as given for an InternLM model; for any other,
    the first one that does not claim to be InternLM (so a Llama model is not told 'You are InternLM')."""
    if "internlm" in model_id.lower() or not personas:
        return list(personas)
    neutral = [p for p in personas if not claims_internlm(p)]
    return neutral + [p for p in personas if claims_internlm(p)] if neutral else list(personas)


def _cjk(text: str) -> str:
    return "".join(ch for ch in text if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf")


def language_note(persona: Persona, tokenizer: Optional[Any]) -> str:
    """'' when the model can likely speak the persona's language; else a one-line note for the page. Measured on
    the model's own tokenizer (tokens per character of the persona's Chinese text); no tokenizer: no note."""
    text = persona.system + persona.greeting
    chinese = _cjk(text)
    if tokenizer is None or len(chinese) < max(8, len(text) // 4):
        return ""
    per_char = len(tokenizer.encode(chinese, add_special_tokens=False)) / len(chinese)
    if per_char <= FOREIGN_TOKENS_PER_CHAR:
        return ""
    return (f"{persona.name} speaks Chinese, which this model's tokenizer hardly knows ({per_char:.1f} tokens per "
            f"character): expect broken or '???' replies; an InternLM model speaks it")
