"""`scripts/fetch_models.py` (also `./run.sh models`): the first run's one command for model weights.

    venv/bin/python scripts/fetch_models.py [--only clip_vitb32,u2net] [--models-file F] [--no-verify]

Fetches every model's weights into the cache its library reads (the five embedders of the registry into
the Hugging Face cache, u2net into the bg stage's rembg directory), with the libraries' own progress
bars; says whether DINOv3's gated weights were granted, and which fallback is used otherwise; then proves
each model loads from local files alone (the hub switched off) and produces vectors of the registry's
dimension. Models already in the cache are not fetched again. Exit codes: 0 every model ready,
1 some could not be fetched or did not load (one line each says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageselector import weights
from imageselector.config import Settings, load_settings
from imageselector.logs import setup_logging
from imageselector.models.registry import ModelSpec, RegistryError, load_registry

log = logging.getLogger("fetch_models")

BG_MODEL = "u2net"


class Fetcher:
    """The network side: each method downloads into the library's usual cache and returns the local path."""

    def hf_file(self, repo: str, filename: str, revision: str | None = None) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo.strip("/"), filename, revision=revision))

    def hf_repo(self, repo: str, revision: str | None = None) -> Path:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )

    def url(self, url: str) -> Path:
        from open_clip.pretrained import download_pretrained_from_url

        return Path(download_pretrained_from_url(url))

    def rembg(self, model: str, directory: Path) -> Path:
        cls = weights.rembg_session_class(model)
        if cls is None:
            raise ValueError(f"unknown rembg model {model!r}")
        directory.mkdir(parents=True, exist_ok=True)
        with weights.u2net_home(directory):
            return Path(cls.download_models())


def is_denied(exc: BaseException) -> bool:
    """A gated or private repo this account may not read (as opposed to a network failure)."""
    try:
        from huggingface_hub.errors import GatedRepoError

        if isinstance(exc, GatedRepoError):
            return True
    except ImportError:
        pass
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status in (401, 403)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def fetch_spec(spec: ModelSpec, fetcher: Fetcher) -> Path:
    """Download one spec's weights (and, for transformers, its configs) where its loader looks for them."""
    if spec.library == "open_clip":
        src = weights.open_clip_source(spec)
        if src is None:
            raise ValueError(f"open_clip has no download for {spec.source} / {spec.pretrained}")
        kind, where = src
        if kind == "url":
            return fetcher.url(where)
        repo, filename = (where, "") if where.endswith("/") else os.path.split(where)
        last: Exception | None = None
        for name in (filename,) if filename else weights.OPEN_CLIP_WEIGHTS:
            try:
                return fetcher.hf_file(repo, name)
            except Exception as exc:  # noqa: BLE001 - try the next file name (safetensors first, as open_clip does)
                if is_denied(exc):
                    raise
                last = exc
        raise last or FileNotFoundError(repo)
    if spec.library == "transformers":
        return fetcher.hf_repo(spec.source, spec.revision)
    if spec.library == "timm":
        repo = weights.timm_hub_id(spec.source)
        if not repo:
            raise ValueError(f"timm has no hub weights for {spec.source}")
        last = None
        for name in weights.HF_WEIGHTS:
            try:
                return fetcher.hf_file(repo, name)
            except Exception as exc:  # noqa: BLE001
                last = exc
        raise last or FileNotFoundError(repo)
    raise ValueError(f"unknown library {spec.library}")


@dataclass
class Outcome:
    name: str
    source: str  # what will load: "<library> <source>"
    path: str | None
    notes: list[str]
    error: str | None = None
    verified: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.path is not None


def _label(spec: ModelSpec) -> str:
    return f"{spec.library} {spec.source}" + (f" ({spec.pretrained})" if spec.pretrained else "")


def fetch_embedder(name: str, spec: ModelSpec, fetcher: Fetcher) -> Outcome:
    fb = spec.fallback_spec()
    gated = fb is not None  # the registry gives a fallback where the primary is gated (DINOv3)
    here = weights.locate(spec)
    if here:
        notes = ["already in the local cache"] + (["gated weights granted"] if gated else [])
        return Outcome(name, _label(spec), here, notes)
    log.info("%s: fetching %s", name, _label(spec))
    try:
        path = fetch_spec(spec, fetcher)
        return Outcome(name, _label(spec), str(path), ["fetched"] + (["gated weights granted"] if gated else []))
    except Exception as exc:  # noqa: BLE001 - said in one line, then the fallback if any
        if fb is None:
            return Outcome(name, _label(spec), None, [], error=_first_line(exc))
        if is_denied(exc):
            why = (
                f"gated weights NOT granted for {spec.source}: accept the licence at "
                f"{weights.hub_endpoint()}/{spec.source}, then `hf auth login` (or HF_TOKEN= in .env) and run this again"
            )
        else:
            why = f"{spec.source} could not be fetched ({_first_line(exc)})"
    log.warning("%s: %s; using the fallback %s", name, why, _label(fb))
    here = weights.locate(fb)
    try:
        path = Path(here) if here else fetch_spec(fb, fetcher)
    except Exception as exc:  # noqa: BLE001
        return Outcome(name, _label(fb), None, [why], error=f"the fallback too: {_first_line(exc)}")
    return Outcome(name, _label(fb), str(path), [why, f"fallback {'in the cache' if here else 'fetched'}"])


def fetch_rembg(model: str, directory: Path, fetcher: Fetcher) -> Outcome:
    label = f"rembg {model}"
    here = weights.locate_rembg(model, directory)
    if here:
        return Outcome(model, label, str(here), ["already in the local cache"])
    log.info("%s: fetching into %s", model, directory)
    try:
        return Outcome(model, label, str(fetcher.rembg(model, directory)), ["fetched"])
    except Exception as exc:  # noqa: BLE001
        return Outcome(model, label, None, [], error=_first_line(exc))


# ------------------------------------------------------------------------------------------- verifying


def verify_embedder(spec: ModelSpec) -> str:
    """Load from local files only (the hub off), embed one image, check the dimension."""
    from PIL import Image

    from imageselector.models.encoders import load_encoder

    enc = load_encoder(spec, device="cpu", dtype="fp32")
    try:
        vec = enc.encode_images([Image.new("RGB", (64, 64), (128, 96, 64))])
        if vec.shape != (1, spec.dim):
            raise ValueError(f"produced {vec.shape[1]}-dim vectors, the registry says {spec.dim}")
        return f"loads as {enc.spec.describe()}, {spec.dim}-dim vectors"
    finally:
        del enc
        gc.collect()


def verify_rembg(model: str, directory: Path) -> str:
    import numpy as np
    from PIL import Image
    from rembg import new_session, remove

    with weights.u2net_home(directory):
        session = new_session(model, providers=["CPUExecutionProvider"])
    out = remove(Image.new("RGB", (64, 64), (200, 30, 30)), session=session)
    if np.asarray(out).shape[:2] != (64, 64):
        raise ValueError("the mask has the wrong size")
    return "loads, removes a background"


Verifier = Callable[[str, Any], str]


def _default_verify(kind: str, target: Any) -> str:
    return verify_embedder(target) if kind == "embed" else verify_rembg(*target)


# ------------------------------------------------------------------------------------------- the command


def run(
    settings: Settings,
    specs: Mapping[str, ModelSpec],
    *,
    bg_model: str | None = BG_MODEL,
    fetcher: Fetcher | None = None,
    verify: Verifier | None = _default_verify,
) -> list[Outcome]:
    from imageselector.background.session import models_dir

    fetcher = fetcher or Fetcher()
    outcomes = [fetch_embedder(n, s, fetcher) for n, s in specs.items()]
    bg_dir = models_dir(settings)
    if bg_model:
        outcomes.append(fetch_rembg(bg_model, bg_dir, fetcher))
    if verify is not None:
        weights.go_offline()  # proves each loads from local files alone, as the stages will
        for o in outcomes:
            if not o.ok:
                continue
            try:
                if o.name in specs:
                    o.verified = verify("embed", specs[o.name])
                else:
                    o.verified = verify("bg", (o.name, bg_dir))
            except Exception as exc:  # noqa: BLE001
                o.error = f"fetched but does not load: {_first_line(exc)}"
    return outcomes


def report(outcomes: list[Outcome]) -> list[str]:
    lines = []
    for o in outcomes:
        state = "READY" if o.ok else "MISSING"
        detail = "; ".join([*o.notes, *([o.verified] if o.verified else []), *([o.error] if o.error else [])])
        lines.append(f"{state:<8}{o.name:<14}{o.source}: {detail}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fetch_models.py",
        description="Fetch the weights of every model (the five embedders and u2net) into their usual caches, "
        "then check that each loads offline.",
    )
    ap.add_argument("--only", help="comma-separated names (e.g. clip_vitb32,u2net); default: all")
    ap.add_argument("--models-file", help="registry JSON instead of the shipped one (IMAGESELECTOR_MODELS_FILE)")
    ap.add_argument("--no-verify", action="store_true", help="fetch only, do not load each model afterwards")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings()
    token = settings.get("HF_TOKEN") or ""
    if token:  # from .env too: huggingface_hub reads only the environment (or `hf auth login`)
        os.environ.setdefault("HF_TOKEN", token)
    setup_logging("fetch_models", settings.home, secrets=[*settings.secrets(), token])
    try:
        specs = load_registry(args.models_file, settings)
    except RegistryError as exc:
        log.error("%s", exc)
        return 2
    bg_model: str | None = BG_MODEL
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in specs and w != BG_MODEL]
        if unknown:
            log.error("unknown model(s) %s; known: %s, %s", ", ".join(unknown), ", ".join(specs), BG_MODEL)
            return 2
        specs = {n: s for n, s in specs.items() if n in wanted}
        bg_model = BG_MODEL if BG_MODEL in wanted else None
    if weights.offline():
        log.warning("HF_HUB_OFFLINE is set: only what is already cached can be found")
    outcomes = run(settings, specs, bg_model=bg_model, verify=None if args.no_verify else _default_verify)
    lines = report(outcomes)
    print("\n".join(["", "=== Models ===", *lines]))
    for line in lines:
        log.info("%s", line)
    bad = [o.name for o in outcomes if not o.ok]
    if bad:
        log.error("not ready: %s (see the lines above); run this command again once fixed", ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
