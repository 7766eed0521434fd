"""Which models the demo can use: the real five (and u2net) where their weights are reachable, else stand-ins.

"Reachable" means already in a local cache, or the hub answers within a few seconds (then the workers
download on first use). Every check is offline-safe: cache look-ups never touch the network, and
the one network probe is a HEAD request with a short timeout, skipped under HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from imageselector import weights
from imageselector.config import Settings
from imageselector.models.registry import DEFAULT_REGISTRY, load_registry
from imageselector.weights import FETCH_COMMAND

log = logging.getLogger(__name__)

STANDIN_WARNING = (
    "DEMO WITH STAND-IN MODELS (random weights): search results are only structural, not visual similarity. "
    f"Fetch the real model weights for meaningful results: {FETCH_COMMAND} (or ./run.sh models)."
)


@dataclass(frozen=True)
class ModelChoice:
    real_embed: bool
    real_bg: bool
    registry: Path | None  # a registry file for embed.py / search (None: the shipped models.json)
    bg_model_path: Path | None  # a custom ONNX for bg_remover.py --model-path (None: rembg's u2net)
    u2net_home: Path | None
    why: list[str]

    @property
    def warning(self) -> str | None:
        return None if self.real_embed and self.real_bg else STANDIN_WARNING


def reachable(url: str, timeout: float = 3.0) -> bool:
    return weights.reachable(url, timeout)


def embedding_weights_cached(spec) -> bool:  # type: ignore[no-untyped-def]
    """True when `spec`'s real weights load without a download (local files or the Hugging Face cache)."""
    return not spec.standin and weights.locate(spec) is not None


def _u2net_file(settings: Settings) -> Path | None:
    candidates = []
    if settings.get("U2NET_HOME"):
        candidates.append(Path(settings.get("U2NET_HOME")).expanduser())  # type: ignore[arg-type]
    candidates += [settings.home / "models" / "rembg", Path.home() / ".u2net"]
    for d in candidates:
        if (d / "u2net.onnx").is_file():
            return d
    return None


def choose(settings: Settings, mode: str, standin_dir: Path) -> ModelChoice:
    """mode: "auto" (real where reachable), "real", or "standin". Builds stand-ins into `standin_dir` as needed."""
    why: list[str] = []
    real_embed = real_bg = mode == "real"
    u2net_home = _u2net_file(settings)
    if mode == "auto":
        specs = load_registry(DEFAULT_REGISTRY)  # the real five (a home .env may point at stand-ins)
        missing = [a.name for a in weights.availability(specs) if not a.present]  # a cached fallback counts
        if not missing:
            real_embed = True
            why.append("embedding weights found in the local cache")
        elif reachable("https://huggingface.co"):
            real_embed = True
            why.append(f"Hugging Face reachable; will download {', '.join(missing)} on first use")
        else:
            why.append(f"no cached weights for {', '.join(missing)} and the hub is unreachable")
        if u2net_home is not None:
            real_bg = True
            why.append(f"u2net.onnx found in {u2net_home}")
        elif reachable("https://github.com"):
            real_bg = True
            why.append("GitHub reachable; rembg will download u2net.onnx on first use")
        else:
            why.append("no u2net.onnx and GitHub unreachable")
    registry = bg_model = None
    if not real_embed:
        from imageselector.models.standins import build_standins

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # open_clip logs every step of building a model at INFO
        try:
            registry = build_standins(standin_dir / "embedding")
        finally:
            root.setLevel(level)
        why.append(f"embedding stand-ins built: {registry}")
    if not real_bg:
        from imageselector.background.standins import build_standin_u2net

        bg_model = build_standin_u2net(standin_dir / "u2net_standin.onnx")
        why.append(f"background stand-in built: {bg_model}")
    return ModelChoice(real_embed, real_bg, registry, bg_model, u2net_home if real_bg else None, why)
