"""The background-removal stage: claim rows, remove backgrounds, replace files in place, set flags.

Three threads share the work so the model never waits for the disk:
  prefetch thread: read + decode + orient + build the model input for the next images
  main thread:     claim rows, run onnxruntime (one or several images per call), record results
  writer thread:   mask -> composite on the background -> JPEG with the marker -> atomic replace
A row is flagged `bg_removed=1` only after its file was replaced durably (fsync + rename + dir fsync).
A stop (KILL_BG, KILL, SIGTERM) is honoured between inference calls: writes in flight finish and are
flagged, unstarted rows are released, nothing is left half-written.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imageselector import db, layout
from imageselector.background.imaging import UndecodableImage, composite, decode, encode_jpeg, marker_text
from imageselector.background.session import BgModel
from imageselector.config import Settings
from imageselector.fsutil import atomic_write_bytes, fsync_dir, is_disk_full
from imageselector.logs import Progress
from imageselector.stopping import Stopper
from imageselector.worker import ClaimedBatch

STAGE = "bg"
MAX_CONSECUTIVE_ERRORS = 10
PREFETCH_AHEAD = 4  # images decoded and prepared ahead of the model


class FatalStageError(RuntimeError):
    """Every image fails the same way (model broken, disk full): stop instead of parking the backlog."""


@dataclass
class BgOptions:
    background: tuple[int, int, int] = (255, 255, 255)
    quality: int = 95
    keep_dir: Path | None = None
    claim_size: int = 32
    limit: int | None = None


@dataclass
class Item:
    """One claimed row after the prefetch thread looked at its file."""

    rid: int
    path: Path
    relpath: str
    marked: bool = False
    img: Image.Image | None = None
    tensor: np.ndarray | None = None
    error: str | None = None
    permanent: bool = False
    redownload: bool = False  # the input file is gone or undecodable: back to the download stage


class BgStage:
    """Drives one worker process; `run_batch` is what `worker.run_loop` calls."""

    def __init__(
        self,
        settings: Settings,
        conn: sqlite3.Connection,
        model: BgModel,
        opts: BgOptions,
        stopper: Stopper,
        logger: logging.Logger,
    ) -> None:
        self.settings = settings
        self.conn = conn
        self.model = model
        self.opts = opts
        self.stopper = stopper
        self.log = logger
        self.owner = db.make_owner(STAGE)
        self.marker = marker_text(model.label, opts.background)
        self.prefetch = ThreadPoolExecutor(1, thread_name_prefix="bg-prefetch")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="bg-write")
        self.progress = Progress(logger, "images", remaining=self._remaining)
        self.processed = 0  # backgrounds removed by this run
        self.flagged_only = 0  # files that already carried the marker
        self.parked = 0
        self.sent_back = 0  # rows whose input was undecodable or missing, handed back to the download stage
        self._errors_in_a_row = 0

    def close(self) -> None:
        self.prefetch.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True)

    def _remaining(self) -> int:
        return db.backlog(self.conn, STAGE)

    # -- prefetch thread ---------------------------------------------------------------------------

    def load(self, row: sqlite3.Row) -> Item:
        rel = layout.image_relpath(row["listing_id"], row["image_id"])
        item = Item(rid=row["rid"], path=self.settings.images_dir / rel, relpath=rel)
        try:
            data = item.path.read_bytes()
        except FileNotFoundError:
            item.error, item.redownload = f"image file missing: {item.path}", True
            return item
        except OSError as exc:
            item.error = f"cannot read {item.path}: {exc}"
            return item
        try:
            decoded = decode(data)
        except UndecodableImage as exc:
            item.error, item.redownload = f"undecodable image: {exc}", True
            return item
        if decoded.marked:
            item.marked = True
            return item
        item.img = decoded.img
        try:
            item.tensor = self.model.prepare(decoded.img)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory on a huge image: retried, then parked
            item.img, item.error = None, f"could not prepare the model input: {exc.__class__.__name__}: {exc}"
        return item

    # -- writer thread -----------------------------------------------------------------------------

    def write(self, item: Item, mask: Image.Image) -> None:
        assert item.img is not None
        data = encode_jpeg(composite(item.img, mask, self.opts.background), self.marker, self.opts.quality)
        if self.opts.keep_dir is not None:
            keep_original(item.path, self.opts.keep_dir / item.relpath, self.opts.keep_dir / ".tmp")
        atomic_write_bytes(item.path, data, tmp_dir=self.settings.tmp_dir)

    # -- main thread -------------------------------------------------------------------------------

    def run_batch(self) -> int:
        limit = self.opts.claim_size
        if self.opts.limit is not None:
            limit = min(limit, self.opts.limit - self.handled)
            if limit <= 0:
                self.stopper.request(f"--limit {self.opts.limit} reached")
                return 0
        with ClaimedBatch.claim(self.conn, STAGE, self.owner, limit) as batch:
            if not batch:
                return 0
            rows = iter(batch.rows)
            pending: deque[Future[Item]] = deque()
            writes: deque[tuple[Item, Future[None]]] = deque()
            try:
                while not self.stopper.should_stop():
                    # keep a few images decoded ahead, not the whole claim (a full-size photo is ~30 MB decoded)
                    for row in itertools.islice(rows, self.model.max_batch + PREFETCH_AHEAD - len(pending)):
                        pending.append(self.prefetch.submit(self.load, row))
                    if not pending:
                        break
                    group = self._next_group(batch, pending)
                    if group:
                        self._infer(batch, group, writes)
                    self._collect(batch, writes, wait=False)
            finally:
                for fut in pending:
                    fut.cancel()
                self._collect(batch, writes, wait=True)
            return len(batch)

    @property
    def handled(self) -> int:
        return self.processed + self.flagged_only + self.parked + self.sent_back

    def _next_group(self, batch: ClaimedBatch, pending: deque[Future[Item]]) -> list[Item]:
        """Up to `max_batch` decoded images needing inference; settle marked and failed ones on the way."""
        group: list[Item] = []
        while pending and len(group) < self.model.max_batch:
            item = pending.popleft().result()
            if item.redownload:
                assert item.error is not None
                parked = batch.send_back(item.rid, item.error, item.path, self.settings.tmp_dir)
                self.parked += int(parked)
                self.sent_back += int(not parked)
                self.log.warning(
                    "%s: %s: %s",
                    item.relpath,
                    item.error,
                    "parked in download (the CDN keeps serving it broken)" if parked else "sent back to download",
                )
            elif item.error is not None:
                parked = batch.fail(item.rid, item.error, permanent=item.permanent)
                self.parked += int(parked)
                self.log.warning("%s: %s%s", item.relpath, item.error, " (parked)" if parked else " (will retry)")
            elif item.marked:
                batch.complete([item.rid])
                self.flagged_only += 1
                self.progress.add()
                self.log.info("%s already carries the bg-removed marker: flag set, not processed again", item.relpath)
            else:
                group.append(item)
        return group

    def _infer(self, batch: ClaimedBatch, group: list[Item], writes: deque[tuple[Item, Future[None]]]) -> None:
        try:
            masks = self.model.masks([it.img for it in group], [it.tensor for it in group])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - one bad input must not kill the worker
            for it in group:
                batch.fail(it.rid, f"inference failed: {exc.__class__.__name__}: {exc}")
            self._error(f"inference failed for {len(group)} image(s): {exc}")
            return
        for it, mask in zip(group, masks, strict=True):
            it.tensor = None
            writes.append((it, self.writer.submit(self.write, it, mask)))

    def _collect(self, batch: ClaimedBatch, writes: deque[tuple[Item, Future[None]]], *, wait: bool) -> None:
        """Flag the rows whose files are durably replaced (in claim order), in one transaction."""
        done: list[int] = []
        no_space: BaseException | None = None
        while writes and (wait or writes[0][1].done()):
            item, fut = writes.popleft()
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001 - disk full, permission, ...: retry later
                if is_disk_full(exc):  # the machine's problem, not the row's: hand it back, count nothing
                    batch.release([item.rid])
                    no_space = no_space or exc
                    continue
                batch.fail(item.rid, f"write failed: {exc.__class__.__name__}: {exc}")
                self._error(f"{item.relpath}: write failed: {exc}")
                continue
            done.append(item.rid)
            self._errors_in_a_row = 0
        if done:
            batch.complete(done)
            self.processed += len(done)
            self.progress.add(len(done))
        if no_space is not None:
            raise no_space

    def _error(self, message: str) -> None:
        self.log.error(message)
        self._errors_in_a_row += 1
        if self._errors_in_a_row >= MAX_CONSECUTIVE_ERRORS:
            raise FatalStageError(f"{self._errors_in_a_row} failures in a row, last: {message}")


def keep_original(src: Path, dest: Path, tmp_dir: Path) -> None:
    """Keep the untouched download at `dest` before it is replaced: a hard link when on the same disk, else a copy."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".{dest.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write_bytes(dest, src.read_bytes(), tmp_dir=tmp_dir)
        return
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
