"""The embed stage's compute: an image in, one vector per model out (or why not). No files, no database.

One `EmbedCompute` holds one replica of the chosen models. Both runners build it with the same factory,
`make_embed_compute`, from the same keyword arguments (`scaleout.build_compute` locally, a Ray actor per
replica remotely), so the vectors are the same by construction:
  - the local runner (stage.py) drives its two steps on two sides of a queue, so the models never wait
    for decoding: `prepare` (decode once, preprocess per model) on the prefetch threads, `encode` (the
    model's forward pass) on the main thread;
  - the Ray runner (remote.py) calls the whole thing, `compute(payload)`, on an actor.
Listing texts are not part of it: the stage process encodes them at flush (few, and cheap next to images).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imageselector.config import load_settings
from imageselector.models.encoders import Encoder, load_encoder
from imageselector.models.preprocess import DEFAULT_MODE, decode, draft_side
from imageselector.models.registry import load_registry

FACTORY = "imageselector.embedding.compute:make_embed_compute"

DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class EmbedCompute:
    """The encoders of one replica, and the JPEG draft scale they allow."""

    def __init__(self, encoders: dict[str, Encoder]) -> None:
        self.encoders = encoders
        # JPEGs are decoded at reduced scale when every model is on the fast path (preprocess.py)
        self.draft = draft_side(getattr(e, "geometry", None) for e in encoders.values())

    def decode(self, source: Path | bytes) -> Image.Image:
        """Decode a file or bytes (raises one of DECODE_ERRORS on a bad image)."""
        return decode(io.BytesIO(source) if isinstance(source, bytes) else source, self.draft)

    def prepare(self, img: Image.Image, models: Iterable[str]) -> dict[str, Any]:
        """{model: tensor | error} for one decoded image; models with the same fast-path geometry share one tensor."""
        out: dict[str, Any] = {}
        shared: dict[Any, Any] = {}
        for m in models:
            key = getattr(self.encoders[m], "geometry", None)
            if key is not None and key in shared:
                out[m] = shared[key]
                continue
            try:
                out[m] = self.encoders[m].preprocess(img)
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the stage
                out[m] = f"preprocessing failed: {type(exc).__name__}: {exc}"
            if key is not None:
                shared[key] = out[m]
        return out

    def encode(self, m: str, tensors: torch.Tensor) -> np.ndarray:
        """Model m's vectors for a stacked batch of its prepared tensors."""
        return self.encoders[m].encode_batch(tensors)

    def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The whole compute for {"images": [bytes], "want": {model: [index into images]}}.
        Returns {"ok": {m: [i]}, "vectors": {m: array}, "errors": {m: [(i, reason, permanent)]}}."""
        prepared: list[dict[str, Any] | str] = []
        wanted: dict[int, list[str]] = {}
        for m, idxs in payload["want"].items():
            for i in idxs:
                wanted.setdefault(i, []).append(m)
        for i, data in enumerate(payload["images"]):
            try:
                prepared.append(self.prepare(self.decode(data), wanted.get(i, [])))
            except DECODE_ERRORS as exc:
                prepared.append(f"undecodable image: {type(exc).__name__}: {exc}")
        out: dict[str, Any] = {"ok": {}, "vectors": {}, "errors": {}}
        for m, idxs in payload["want"].items():
            ok, tensors, errors = [], [], []
            for i in idxs:
                res = prepared[i]
                got = res if isinstance(res, str) else res[m]
                if isinstance(got, str):
                    errors.append((i, got, True))
                else:
                    tensors.append(got)
                    ok.append(i)
            out["ok"][m] = ok
            out["errors"][m] = errors
            out["vectors"][m] = (
                self.encode(m, torch.stack(tensors)) if tensors else np.zeros((0, self.encoders[m].dim), "float32")
            )
        return out


def make_embed_compute(
    *,
    models_file: str | None,
    models: list[str],
    device: str,
    dtype: str,
    home: str | None = None,
    preprocess: str = DEFAULT_MODE,
) -> EmbedCompute:
    """Load one replica of `models` (raises RegistryError / ValueError / the loader's error on a bad configuration)."""
    registry = load_registry(models_file, load_settings(home) if home else None)
    return EmbedCompute({m: load_encoder(registry[m], device, dtype, preprocess) for m in models})
