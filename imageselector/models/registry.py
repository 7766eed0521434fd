"""The model registry: which five models embed, from where, with which weights.

The shipped `models.json` names the real models. Another registry file (`--models-file` or the
`IMAGESELECTOR_MODELS_FILE` setting) swaps them without touching code: local weights, the stand-ins
that tests and the demo build (`standins.py`), or the ungated DINOv3 source. Relative paths in a
registry file are resolved against the file's own folder, so a folder of weights can be moved whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from imageselector.db import EMBED_MODELS
from imageselector.fsutil import atomic_write_text

DEFAULT_REGISTRY = Path(__file__).resolve().parent / "models.json"
ENV_VAR = "IMAGESELECTOR_MODELS_FILE"
LIBRARIES = ("open_clip", "transformers", "timm")
_PATH_FIELDS = ("source", "pretrained", "config")


class RegistryError(ValueError):
    """A registry file that cannot be used (bad JSON, unknown model name or library, missing field)."""


@dataclass(frozen=True)
class ModelSpec:
    """One model: how to load it and what it produces.

    library: `open_clip` (source = model name, `local-dir:<dir>` or a local dir with open_clip_config.json;
    pretrained = tag or a local .pt/.safetensors file; config = a model config JSON registered with
    `open_clip.add_model_config`), `transformers` (source = hub id or a local dir saved with save_pretrained),
    `timm` (source = model name with optional `.tag`; pretrained = a local weights file, else the hub).
    """

    name: str
    library: str
    source: str
    dim: int
    pretrained: str | None = None
    config: str | None = None
    has_text: bool = False
    pooling: str = "cls"
    standin: bool = False
    revision: str | None = None
    fallback: dict[str, Any] | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return f"embed_{self.name}"

    def describe(self) -> str:
        """A short provenance string, stored in the manifest so mixed sources can be detected."""

        def short(v: str) -> str:  # a local path counts by its last component, so a moved folder still matches
            path = v.removeprefix("local-dir:")
            return Path(path).name if os.path.isabs(path) else v

        parts = [self.library, short(self.source)]
        if self.pretrained:
            parts.append(short(self.pretrained))
        return ":".join(parts)

    def fallback_spec(self) -> ModelSpec | None:
        """The alternative source (e.g. ungated timm weights for DINOv3), as a full spec."""
        if not self.fallback:
            return None
        return replace(self, **{k: v for k, v in self.fallback.items() if k != "notes"}, fallback=None)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, "") and k != "name"}


_KNOWN = {f.name for f in fields(ModelSpec)}


def _resolve(value: str | None, base: Path) -> str | None:
    """`./x` and `../x` are relative to the registry file; `local-dir:./x` too."""
    if value is None:
        return None
    prefix = ""
    if value.startswith("local-dir:"):
        prefix, value = "local-dir:", value[len("local-dir:") :]
    if value.startswith(("./", "../")):
        value = str((base / value).resolve())
    elif value.startswith("~"):
        value = str(Path(value).expanduser())
    return prefix + value


def spec_from_dict(name: str, raw: dict[str, Any], base: Path) -> ModelSpec:
    if name not in EMBED_MODELS:
        raise RegistryError(f"unknown model name {name!r}; the database has columns for: {', '.join(EMBED_MODELS)}")
    unknown = set(raw) - _KNOWN
    if unknown:
        raise RegistryError(f"model {name}: unknown field(s) {sorted(unknown)}")
    for req in ("library", "source", "dim"):
        if req not in raw:
            raise RegistryError(f"model {name}: missing field {req!r}")
    if raw["library"] not in LIBRARIES:
        raise RegistryError(f"model {name}: library must be one of {LIBRARIES}, not {raw['library']!r}")
    data = dict(raw)
    for key in _PATH_FIELDS:
        if isinstance(data.get(key), str):
            data[key] = _resolve(data[key], base)
    if data.get("fallback"):
        fb = dict(data["fallback"])
        if fb.get("library", data["library"]) not in LIBRARIES:
            raise RegistryError(f"model {name}: fallback library {fb.get('library')!r} unknown")
        for key in _PATH_FIELDS:
            if isinstance(fb.get(key), str):
                fb[key] = _resolve(fb[key], base)
        data["fallback"] = fb
    data["dim"] = int(data["dim"])
    return ModelSpec(name=name, **data)


def registry_path(path: str | os.PathLike[str] | None = None, settings: Any = None) -> Path:
    """The registry in force: an explicit path, else the setting/env var, else the shipped file."""
    if path:
        return Path(path).expanduser().resolve()
    env = settings.get(ENV_VAR) if settings is not None else os.environ.get(ENV_VAR)
    return Path(env).expanduser().resolve() if env else DEFAULT_REGISTRY


def load_registry(path: str | os.PathLike[str] | None = None, settings: Any = None) -> dict[str, ModelSpec]:
    """Read a registry file into {name: ModelSpec}, in file order. Raises RegistryError on a bad file."""
    p = registry_path(path, settings)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"models file not found: {p}") from None
    except ValueError as exc:
        raise RegistryError(f"models file {p} is not valid JSON: {exc}") from None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict) or not models:
        raise RegistryError(f"models file {p} needs a non-empty object 'models'")
    return {name: spec_from_dict(name, raw, p.parent) for name, raw in models.items()}


def write_registry(path: Path, specs: dict[str, ModelSpec]) -> Path:
    """Write specs as a registry file (atomically)."""

    doc = {"version": 1, "models": {name: s.to_dict() for name, s in specs.items()}}
    atomic_write_text(Path(path), json.dumps(doc, indent=2) + "\n")
    return Path(path)


def any_standin(specs: dict[str, ModelSpec]) -> bool:
    return any(s.standin for s in specs.values())
