"""Embedding with the image compute on a Ray cluster (`embed.py --ray ADDRESS`).

Each actor holds one replica of the chosen models. The stage process claims rows per model (as the
local stage does), reads each image's bytes once, and sends them out; the actor decodes once,
preprocesses and runs every model with the very functions the local path uses (`decode`,
`encoder.preprocess`, `encoder.encode_batch`), and sends vectors back. The stage process alone adds
them to the FAISS indexes, flushes, and flags rows after the flush, exactly as locally, so crash
consistency is unchanged. Listing texts (few and cheap next to images) run through the CLIP text
towers of the stage process.
"""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from imageselector import db
from imageselector.config import load_settings
from imageselector.embedding.stage import EmbedStage, find_image, log
from imageselector.models.encoders import load_encoder
from imageselector.models.preprocess import DEFAULT_MODE, decode, draft_side
from imageselector.models.registry import load_registry
from imageselector.scaleout import RemoteStageRunner
from imageselector.worker import ClaimedBatch, run_loop

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_bytes(data: bytes, draft: int | None = None) -> Image.Image:
    """The local stage's `decode` (same JPEG draft scale), from bytes instead of a path."""
    return decode(io.BytesIO(data), draft)


def make_embed_compute(
    *,
    models_file: str | None,
    models: list[str],
    device: str,
    dtype: str,
    home: str | None = None,
    preprocess: str = DEFAULT_MODE,
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Load one replica of `models`; returns compute({"images": [bytes], "want": {m: [i]}}) -> vectors per model."""
    import torch

    registry = load_registry(models_file, load_settings(home) if home else None)
    encoders = {m: load_encoder(registry[m], device, dtype, preprocess) for m in models}
    draft = draft_side(e.geometry for e in encoders.values())

    def compute(payload: dict[str, Any]) -> dict[str, Any]:
        images: list[Image.Image | str] = []
        for data in payload["images"]:
            try:
                images.append(decode_bytes(data, draft))
            except _DECODE_ERRORS as exc:
                images.append(f"undecodable image: {type(exc).__name__}: {exc}")
        out: dict[str, Any] = {"ok": {}, "vectors": {}, "errors": {}}
        for m, idxs in payload["want"].items():
            ok, tensors, errors = [], [], []
            for i in idxs:
                img = images[i]
                if isinstance(img, str):
                    errors.append((i, img, True))
                    continue
                try:
                    tensors.append(encoders[m].preprocess(img))
                    ok.append(i)
                except Exception as exc:  # noqa: BLE001 - one bad image must not fail the batch
                    errors.append((i, f"preprocessing failed: {type(exc).__name__}: {exc}", True))
            out["ok"][m] = ok
            out["errors"][m] = errors
            out["vectors"][m] = (
                encoders[m].encode_batch(torch.stack(tensors)) if tensors else np.zeros((0, encoders[m].dim), "float32")
            )
        return out

    return compute


class _Round:
    """The per-model claims of one remote batch. Released on exit unless committed (handed to the stage)."""

    def __init__(self, conn: sqlite3.Connection, owner: str, rows: dict[str, list[sqlite3.Row]]) -> None:
        self.batches = {m: ClaimedBatch(conn, f"embed_{m}", owner, r) for m, r in rows.items()}
        self.committed = False

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def __enter__(self) -> _Round:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            for b in self.batches.values():
                b.__exit__(None, None, None)


class RemoteEmbed:
    """Claims and commits for `scaleout.RemoteStageRunner`, on top of a local `EmbedStage` (store, flags)."""

    def __init__(self, stage: EmbedStage) -> None:
        self.stage = stage

    def claim(self) -> tuple[_Round, dict[str, Any], dict[str, Any]] | None:
        st = self.stage
        rows = {}
        for m in st.encoders:
            got = db.claim_batch(st.conn, f"embed_{m}", st.owner, st.opts.batch_size)
            if got:
                rows[m] = got
        if not rows:
            return None
        rnd = _Round(st.conn, st.owner, rows)
        index: dict[int, int] = {}
        images: list[bytes] = []
        want: dict[str, list[int]] = {}
        keep: dict[str, list[sqlite3.Row]] = {}
        for m, batch in rnd.batches.items():
            want[m], keep[m] = [], []
            for r in batch.rows:
                gid = int(r["gid"])
                if gid not in index:
                    path = find_image(st.settings, r)
                    data = None
                    if path is not None:
                        try:
                            data = path.read_bytes()
                        except OSError:
                            data = None
                    index[gid] = len(images) if data is not None else -1
                    if data is not None:
                        images.append(data)
                if index[gid] < 0:
                    batch.fail(r["rid"], "image file missing")
                    continue
                want[m].append(index[gid])
                keep[m].append(r)
        return rnd, {"rows": keep, "want": want}, {"images": images, "want": want}

    def commit(self, rnd: _Round, ctx: dict[str, Any], result: dict[str, Any]) -> None:
        st = self.stage
        for m, batch in rnd.batches.items():
            idx_to_row = dict(zip(ctx["want"][m], ctx["rows"][m], strict=True))
            for i, reason, permanent in result["errors"][m]:
                r = idx_to_row[i]
                parked = batch.fail(r["rid"], reason, permanent=permanent)
                log.warning("%s: image %s/%s %s: %s", m, r["listing_id"], r["image_id"],
                            "parked" if parked else "will retry", reason)  # fmt: skip
            ok_rows = [idx_to_row[i] for i in result["ok"][m]]
            if ok_rows:
                st.add_vectors(m, ok_rows, result["vectors"][m])
            st.pending[m].append((batch, [r["rid"] for r in ok_rows]))
            if st.oldest_pending is None:
                st.oldest_pending = time.monotonic()
            st.since_flush += len(ok_rows)
            st.progress[m].add(len(ok_rows), failed=len(result["errors"][m]))
        rnd.committed = True
        st.maybe_flush()


def run_remote(stage: EmbedStage, pool: Any, heartbeat: Any = None) -> int:
    """`EmbedStage.run` with the image compute on Ray: same store, same flush-then-flag rule."""

    remote = RemoteEmbed(stage)
    runner = RemoteStageRunner(pool, remote.claim, remote.commit)

    def batch() -> int:
        n = runner.run_batch()
        if n == 0:
            stage.maybe_flush(force=stage.store.dirty() or any(stage.pending.values()))
        return n

    try:
        total = run_loop(batch, stage.stopper, watch=stage.opts.watch, heartbeat=heartbeat, logger=log)
        runner.drain()
        stage.flush()
    except BaseException:
        runner.abandon()
        try:
            stage.flush()  # vectors already back are valid: keep them if the files can be written
        except Exception as exc:  # noqa: BLE001
            log.error("could not flush at exit (%s); unflagged rows will be embedded again", exc)
        raise
    finally:
        stage.release_pending()
        for p in stage.progress.values():
            if p.done or p.failed:
                p.report(final=True)
        stage.store.close()
    return total
