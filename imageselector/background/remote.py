"""Background removal with the compute on a Ray cluster (`bg_remover.py --ray ADDRESS`).

Each actor holds one rembg session and turns image bytes into finished JPEG bytes, with exactly the
functions the local stage uses (decode, prepare, masks, composite, encode with the marker), so the
files are the same. The stage process alone writes them (atomically) and sets `bg_removed`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageselector import db, layout
from imageselector.config import Settings
from imageselector.fsutil import atomic_write_bytes
from imageselector.worker import ClaimedBatch

from .imaging import UndecodableImage, composite, decode, encode_jpeg, marker_text

STAGE = "bg"

# What the compute answers per image.
OK, MARKED, UNDECODABLE = "ok", "marked", "undecodable"


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
) -> Callable[[list[bytes]], list[tuple[str, bytes | str]]]:
    """Build one model replica; returns `compute(images) -> [(OK, jpeg) | (MARKED, b"") | (UNDECODABLE, why)]`."""
    from .providers import choose_providers
    from .session import open_model

    settings = Settings(home=Path(models_dir), extra={"U2NET_HOME": models_dir})
    choice = choose_providers(gpu=gpu, provider=provider, coreml_cache=Path(models_dir) / "coreml_cache")
    bg = open_model(
        settings,
        model,
        model_path=Path(model_path) if model_path else None,
        choice=choice,
        threads=threads,
        batch_size=batch_size,
    )
    marker = marker_text(bg.label, tuple(background))  # type: ignore[arg-type]

    def compute(images: list[bytes]) -> list[tuple[str, bytes | str]]:
        out: list[tuple[str, bytes | str] | None] = [None] * len(images)
        todo = []
        for i, data in enumerate(images):
            try:
                d = decode(data)
            except UndecodableImage as exc:
                out[i] = (UNDECODABLE, str(exc))
                continue
            if d.marked:
                out[i] = (MARKED, b"")
            else:
                todo.append((i, d.img))
        if todo:
            imgs = [img for _, img in todo]
            masks = bg.masks(imgs, [bg.prepare(img) for img in imgs])
            for (i, img), mask in zip(todo, masks, strict=True):
                out[i] = (OK, encode_jpeg(composite(img, mask, tuple(background)), marker, quality))  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    return compute


class RemoteBg:
    """Claims and commits for `scaleout.RemoteStageRunner`: read files, send bytes, write results."""

    def __init__(
        self,
        settings: Settings,
        conn: sqlite3.Connection,
        claim_size: int,
        keep_dir: Path | None,
        progress: Any,
        logger: logging.Logger,
    ) -> None:
        self.settings = settings
        self.conn = conn
        self.claim_size = claim_size
        self.keep_dir = keep_dir
        self.progress = progress
        self.log = logger
        self.owner = db.make_owner("bg-ray")
        self.processed = self.flagged_only = self.parked = 0

    def claim(self) -> tuple[ClaimedBatch, list[tuple[int, Path, str]], list[bytes]] | None:
        batch = ClaimedBatch.claim(self.conn, STAGE, self.owner, self.claim_size)
        if not batch:
            return None
        items, payload = [], []
        for row in batch.rows:
            rel = layout.image_relpath(row["listing_id"], row["image_id"])
            path = self.settings.images_dir / rel
            try:
                payload.append(path.read_bytes())
            except OSError as exc:
                self.parked += int(batch.fail(row["rid"], f"cannot read {path}: {exc}"))
                continue
            items.append((row["rid"], path, rel))
        return batch, items, payload

    def commit(self, batch: ClaimedBatch, items: list[tuple[int, Path, str]], results: list[tuple[str, Any]]) -> None:
        from .stage import keep_original

        done: list[int] = []
        for (rid, path, rel), (kind, value) in zip(items, results, strict=True):
            if kind == UNDECODABLE:
                self.parked += int(batch.fail(rid, f"undecodable image: {value}", permanent=True))
                self.log.warning("%s: undecodable image: %s (parked)", rel, value)
                continue
            if kind == OK:
                try:
                    if self.keep_dir is not None:
                        keep_original(path, self.keep_dir / rel, self.keep_dir / ".tmp")
                    atomic_write_bytes(path, value, tmp_dir=self.settings.tmp_dir)
                except OSError as exc:
                    batch.fail(rid, f"write failed: {exc.__class__.__name__}: {exc}")
                    self.log.error("%s: write failed: %s", rel, exc)
                    continue
                self.processed += 1
            else:
                self.flagged_only += 1
            done.append(rid)
        if done:
            batch.complete(done)
            self.progress.add(len(done))
