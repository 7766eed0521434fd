"""The background stage's compute: image bytes in, finished JPEG bytes (or why not) out. No files, no database.

One `BgCompute` holds one rembg session. Both runners build it with the same factory, `make_bg_compute`,
from the same keyword arguments (`scaleout.build_compute` locally, a Ray actor per replica remotely), so
their files are the same by construction:
  - the local runner (stage.py) drives its three steps on three threads, so the model never waits for
    decoding or encoding: `prepare` (decode, orient, model input), `masks` (onnxruntime, batched),
    `finish` (composite on the background, JPEG with the marker);
  - the Ray runner (remote.py) calls the whole thing, `compute(images)`, on an actor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imageselector.background.imaging import UndecodableImage, composite, decode, encode_jpeg, marker_text
from imageselector.background.providers import ProviderChoice, choose_providers
from imageselector.background.session import BgModel, open_model
from imageselector.config import Settings

FACTORY = "imageselector.background.compute:make_bg_compute"

# What the compute answers per image: (kind, value).
OK = "ok"  # value: the finished JPEG bytes
MARKED = "marked"  # the input already carries the marker: flag it, nothing to write
UNDECODABLE = "undecodable"  # value: why; retrying will not help (parked at once)
FAILED = "failed"  # value: why; worth retrying (out of memory on a huge image, an inference error)


@dataclass
class Prepared:
    """One image after `prepare`: ready for the model, or already settled (marked, or an error)."""

    img: Image.Image | None = None
    tensor: np.ndarray | None = None
    marked: bool = False
    error: str | None = None
    permanent: bool = False


class BgCompute:
    """One model replica and the background colour and JPEG quality of the run."""

    def __init__(
        self, model: BgModel, background: tuple[int, int, int], quality: int, choice: ProviderChoice | None = None
    ) -> None:
        self.model = model
        self.choice = choice
        self.background = tuple(background)
        self.quality = quality
        self.marker = marker_text(model.label, self.background)  # type: ignore[arg-type]

    @property
    def max_batch(self) -> int:
        return self.model.max_batch

    def prepare(self, data: bytes) -> Prepared:
        try:
            decoded = decode(data)
        except UndecodableImage as exc:
            return Prepared(error=f"undecodable image: {exc}", permanent=True)
        if decoded.marked:
            return Prepared(marked=True)
        try:
            return Prepared(img=decoded.img, tensor=self.model.prepare(decoded.img))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory on a huge image: retried, then parked
            return Prepared(error=f"could not prepare the model input: {exc.__class__.__name__}: {exc}")

    def masks(self, items: list[Prepared]) -> list[Image.Image]:
        """Masks for prepared images (raises on an inference error: the caller decides what fails)."""
        return self.model.masks([it.img for it in items], [it.tensor for it in items])  # type: ignore[misc]

    def finish(self, item: Prepared, mask: Image.Image) -> bytes:
        assert item.img is not None
        return encode_jpeg(composite(item.img, mask, self.background), self.marker, self.quality)  # type: ignore[arg-type]

    def __call__(self, images: list[bytes]) -> list[tuple[str, bytes | str]]:
        """The whole compute for a batch, one answer per input, in order."""
        prepared = [self.prepare(data) for data in images]
        out: list[tuple[str, bytes | str]] = []
        todo = [p for p in prepared if p.img is not None]
        try:
            masks = iter(self.masks(todo)) if todo else iter(())
            error = None
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill a replica
            masks, error = iter(()), f"inference failed: {exc.__class__.__name__}: {exc}"
        for p in prepared:
            if p.error is not None:
                out.append((UNDECODABLE if p.permanent else FAILED, p.error))
            elif p.marked:
                out.append((MARKED, b""))
            elif error is not None:
                out.append((FAILED, error))
            else:
                out.append((OK, self.finish(p, next(masks))))
        return out


def make_bg_compute(
    *,
    model: str,
    model_path: str | None,
    models_dir: str,
    provider: str | None,
    gpu: bool,
    threads: int,
    batch_size: int,
    background: tuple[int, int, int],
    quality: int,
) -> BgCompute:
    """Build one replica (raises session.ModelError / providers.ProviderError on a bad configuration)."""
    settings = Settings(home=Path(models_dir), extra={"U2NET_HOME": models_dir})
    choice = choose_providers(gpu=gpu, provider=provider, coreml_cache=Path(models_dir) / "coreml_cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a provider fallback is reported by the caller, once
        bg = open_model(
            settings,
            model,
            model_path=Path(model_path) if model_path else None,
            choice=choice,
            threads=threads,
            batch_size=batch_size,
        )
    return BgCompute(bg, background, quality, choice)
