"""Where each model's weights live and whether they are already here: local look-ups, never the network.

The five embedders load through open_clip (weights in the Hugging Face cache, or `~/.cache/clip` for URL
tags), transformers and timm (the Hugging Face cache, `HF_HOME`); u2net through rembg
(`<U2NET_HOME>/u2net.onnx` or `<U2NET_HOME>/models/u2net/u2net.onnx`, where the bg stage sets U2NET_HOME).
`preflight()` lets a stage say in one line, within seconds, which weights are missing and the command
that fetches them, instead of letting the hub's client retry for a minute and print its own error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageselector.models.registry import ModelSpec

FETCH_COMMAND = "venv/bin/python scripts/fetch_models.py"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_PREPROCESSING = ("config.json", "preprocessor_config.json")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PROBE_TIMEOUT_S = 3.0


def offline() -> bool:
    """HF_HUB_OFFLINE (or IMAGESELECTOR_OFFLINE) says: do not even try the network."""
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false") or os.environ.get(
        "IMAGESELECTOR_OFFLINE", ""
    ) not in ("", "0")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One HEAD request with a short timeout; False offline or on any failure."""
    if offline():
        return False
    try:
        import requests

        requests.head(url, timeout=timeout, allow_redirects=False)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False


def hf_cached(repo: str, filenames: tuple[str, ...], revision: str | None = None) -> Path | None:
    """The first of `filenames` present in the Hugging Face cache for `repo`, without the network."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        got = try_to_load_from_cache(repo.strip("/"), name, revision=revision)
        if isinstance(got, str) and Path(got).is_file():
            return Path(got)
    return None


def open_clip_source(spec: ModelSpec) -> tuple[str, str] | None:
    """("hf", repo) or ("url", url) for an open_clip pretrained tag; None for a local or unknown one."""
    import open_clip

    try:
        cfg = open_clip.get_pretrained_cfg(spec.source, spec.pretrained or "")
    except Exception:  # noqa: BLE001 - an unknown tag: nothing to look up
        return None
    if not cfg:
        return None
    if cfg.get("hf_hub"):
        return "hf", cfg["hf_hub"]
    if cfg.get("url"):
        return "url", cfg["url"]
    return None


def timm_hub_id(name: str) -> str | None:
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def locate(spec: ModelSpec) -> str | None:
    """Where `spec`'s weights are on this machine (a path, or a note when none are needed); None if absent."""
    if spec.pretrained and Path(spec.pretrained).is_file():
        return spec.pretrained
    local = spec.source.removeprefix("local-dir:")
    if Path(local).is_dir():
        return local
    if spec.library == "open_clip":
        src = open_clip_source(spec)
        if src is None:
            return None
        kind, where = src
        if kind == "url":
            p = Path("~/.cache/clip").expanduser() / os.path.basename(where)
            return str(p) if p.is_file() else None
        repo, filename = os.path.split(where.rstrip("/")) if not where.endswith("/") else (where, "")
        names = (filename, *OPEN_CLIP_WEIGHTS) if filename else OPEN_CLIP_WEIGHTS
        got = hf_cached(repo, names)
        return str(got) if got else None
    if spec.library == "transformers":
        if not all(hf_cached(spec.source, (f,), spec.revision) for f in HF_PREPROCESSING):
            return None
        got = hf_cached(spec.source, HF_WEIGHTS, spec.revision)
        return str(got) if got else None
    if spec.library == "timm":
        if not spec.extra.get("timm_pretrained", True):
            return "(no pretrained weights)"
        repo = timm_hub_id(spec.source)
        got = hf_cached(repo, (*HF_WEIGHTS, "open_clip_pytorch_model.bin")) if repo else None
        return str(got) if got else None
    return None


@dataclass(frozen=True)
class Availability:
    """One model: the source that will load from local files (the primary or its fallback), or none."""

    name: str
    primary: str | None  # where the primary weights are, None when absent
    fallback: str | None  # where the fallback's weights are (None when absent or no fallback)

    @property
    def present(self) -> bool:
        return self.primary is not None or self.fallback is not None


def availability(specs: Mapping[str, ModelSpec]) -> list[Availability]:
    out = []
    for name, spec in specs.items():
        primary = locate(spec)
        fb = spec.fallback_spec()
        out.append(Availability(name, primary, locate(fb) if fb is not None and primary is None else None))
    return out


@dataclass(frozen=True)
class Preflight:
    ok: bool
    line: str  # one line for the log: what is missing and the command, or what will happen
    all_local: bool  # every model loads from local files: the hub need not be asked at all


def missing_line(missing: list[str], why: str) -> str:
    return f"model weights missing for {', '.join(missing)} ({why}); fetch them with: {FETCH_COMMAND}"


def preflight_embedding(specs: Mapping[str, ModelSpec]) -> Preflight:
    """Can these models load? Local caches first; the hub is probed (3 s) only when something is missing."""
    missing = [a.name for a in availability(specs) if not a.present]
    if not missing:
        return Preflight(True, "all model weights are in the local caches", True)
    if offline():
        return Preflight(False, missing_line(missing, "not in the local caches, and HF_HUB_OFFLINE is set"), False)
    if not reachable(hub_endpoint()):
        return Preflight(
            False, missing_line(missing, f"not in the local caches, and {hub_endpoint()} is unreachable"), False
        )
    return Preflight(
        True, f"downloading on first use: {', '.join(missing)} (progress and checks: {FETCH_COMMAND})", False
    )


def go_offline() -> None:
    """Every weight is local: keep the hub clients off the network (no per-file checks, no retries)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    with contextlib.suppress(ImportError, AttributeError):
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True


# ---------------------------------------------------------------------------------------------- rembg


@contextlib.contextmanager
def u2net_home(directory: Path) -> Iterator[None]:
    """rembg reads its model directory from the environment."""
    before = os.environ.get("U2NET_HOME")
    os.environ["U2NET_HOME"] = str(directory)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("U2NET_HOME", None)
        else:
            os.environ["U2NET_HOME"] = before


def rembg_session_class(model: str) -> Any:
    from rembg.sessions import sessions_class

    return next((c for c in sessions_class if c.name() == model), None)


def locate_rembg(model: str, directory: Path) -> Path | None:
    """rembg's own look-up (`resolve_existing`) for a named model in `directory`; never downloads."""
    cls = rembg_session_class(model)
    if cls is None:
        return None
    with u2net_home(directory):
        try:
            got = cls.resolve_existing(f"{cls.name()}.onnx")
        except Exception:  # noqa: BLE001 - a model with several files: let rembg decide at load time
            return None
    return Path(got) if got else None


def preflight_rembg(model: str, directory: Path) -> Preflight:
    if rembg_session_class(model) is None:
        return Preflight(True, f"unknown rembg model {model!r}: the loader says so", False)
    if locate_rembg(model, directory) is not None:
        return Preflight(True, f"{model}.onnx found in {directory}", True)
    if offline():
        return Preflight(False, missing_line([model], f"no {model}.onnx in {directory}, and offline"), False)
    if not reachable("https://github.com"):
        return Preflight(
            False, missing_line([model], f"no {model}.onnx in {directory}, and github.com is unreachable"), False
        )
    return Preflight(True, f"rembg downloads {model}.onnx into {directory} on first use", False)
