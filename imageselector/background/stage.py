"""The background-removal stage: claim rows, remove backgrounds, replace files in place, set flags.

Read -> compute -> write, as in every stage:
  `BgWriter`        the stage side, the only writer: claims rows, reads their files, writes each result
                    atomically (keeping the original when asked), then flags or parks the row. Shared by
                    both runners.
  `BgCompute`       compute.py: bytes -> finished JPEG, one model replica, built by the same factory for both.
  `LocalBgRunner`   this process's runner. Three threads share the work so the model never waits for the disk:
                      prefetch thread: read + `compute.prepare` (decode, orient, model input) for the next images
                      main thread:     claim rows, `compute.masks` (one or several images per onnxruntime call)
                      writer thread:   `compute.finish` (composite, JPEG with the marker) -> atomic replace
  `RayBgRunner`     remote.py: the same compute on Ray actors.
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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imageselector import db, layout
from imageselector.background.compute import MARKED, OK, UNDECODABLE, BgCompute, Prepared
from imageselector.config import Settings
from imageselector.fsutil import atomic_write_bytes, fsync_dir, is_disk_full
from imageselector.logs import Progress
from imageselector.stage_entry import Context, FatalStageError, StageJob
from imageselector.stopping import Stopper
from imageselector.worker import ClaimedBatch

STAGE = "bg"
MAX_CONSECUTIVE_ERRORS = 10
PREFETCH_AHEAD = 4  # images decoded and prepared ahead of the model


@dataclass
class BgStageOptions:
    """What the stage side needs to know (the compute's own settings are the factory's arguments)."""

    keep_dir: Path | None = None
    claim_size: int = 32
    limit: int | None = None


@dataclass
class Item:
    """One claimed row: its file, its bytes once read, then what `compute.prepare` made of them."""

    rid: int
    path: Path
    relpath: str
    data: bytes | None = None
    prepared: Prepared | None = None
    error: str | None = None
    permanent: bool = False
    redownload: bool = False  # the input file is gone or undecodable: back to the download stage


class BgWriter:
    """The stage side of both runners, and the only writer: claims, reads, durable writes, flags, counts."""

    def __init__(
        self,
        settings: Settings,
        conn: sqlite3.Connection,
        opts: BgStageOptions,
        stopper: Stopper,
        logger: logging.Logger,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.conn = conn
        self.opts = opts
        self.stopper = stopper
        self.log = logger
        self.owner = owner or db.make_owner(STAGE)
        self.progress = Progress(logger, "images", remaining=lambda: db.backlog(self.conn, STAGE))
        self.processed = 0  # backgrounds removed by this run
        self.flagged_only = 0  # files that already carried the marker
        self.parked = 0
        self.sent_back = 0  # rows whose input was undecodable or missing, handed back to the download stage
        self._errors_in_a_row = 0

    @property
    def handled(self) -> int:
        return self.processed + self.flagged_only + self.parked + self.sent_back

    def claim(self) -> ClaimedBatch | None:
        """The next batch, within --limit (a reached limit asks the stopper to stop). None: no work."""
        limit = self.opts.claim_size
        if self.opts.limit is not None:
            limit = min(limit, self.opts.limit - self.handled)
            if limit <= 0:
                self.stopper.request(f"--limit {self.opts.limit} reached")
                return None
        batch = ClaimedBatch.claim(self.conn, STAGE, self.owner, limit)
        return batch if batch else None

    def read(self, row: sqlite3.Row) -> Item:
        rel = layout.image_relpath(row["listing_id"], row["image_id"])
        item = Item(rid=row["rid"], path=self.settings.images_dir / rel, relpath=rel)
        try:
            item.data = item.path.read_bytes()
        except FileNotFoundError:
            item.error, item.redownload = f"image file missing: {item.path}", True
        except OSError as exc:
            item.error = f"cannot read {item.path}: {exc}"
        return item

    def write(self, item: Item, jpeg: bytes) -> None:
        """Replace the file durably (keeping the untouched download first when asked). Any thread."""
        if self.opts.keep_dir is not None:
            keep_original(item.path, self.opts.keep_dir / item.relpath, self.opts.keep_dir / ".tmp")
        atomic_write_bytes(item.path, jpeg, tmp_dir=self.settings.tmp_dir)

    def fail(self, batch: ClaimedBatch, item: Item, error: str, *, permanent: bool = False) -> None:
        parked = batch.fail(item.rid, error, permanent=permanent)
        self.parked += int(parked)
        self.log.warning("%s: %s%s", item.relpath, error, " (parked)" if parked else " (will retry)")

    def send_back(self, batch: ClaimedBatch, item: Item, error: str) -> None:
        """The input is missing or undecodable: move the bad file aside and hand the row back to download."""
        parked = batch.send_back(item.rid, error, item.path, self.settings.tmp_dir)
        self.parked += int(parked)
        self.sent_back += int(not parked)
        self.log.warning(
            "%s: %s: %s",
            item.relpath,
            error,
            "parked in download (the CDN keeps serving it broken)" if parked else "sent back to download",
        )

    def settle_input_error(self, batch: ClaimedBatch, item: Item) -> None:
        assert item.error is not None
        if item.redownload:
            self.send_back(batch, item, item.error)
        else:
            self.fail(batch, item, item.error, permanent=item.permanent)

    def flag_marked(self, batch: ClaimedBatch, item: Item) -> None:
        batch.complete([item.rid])
        self.flagged_only += 1
        self.progress.add()
        self.log.info("%s already carries the bg-removed marker: flag set, not processed again", item.relpath)

    def flag_written(self, batch: ClaimedBatch, rids: list[int]) -> None:
        """Flag rows whose files are durably replaced, in one transaction."""
        if rids:
            batch.complete(rids)
            self.processed += len(rids)
            self.progress.add(len(rids))
            self._errors_in_a_row = 0

    def write_failed(self, batch: ClaimedBatch, item: Item, exc: BaseException) -> bool:
        """A write that failed. A full disk is the machine's problem, not the row's: the row is handed back,
        nothing counted, and True returned (the caller stops the stage once its batch is settled)."""
        if is_disk_full(exc):
            batch.release([item.rid])
            return True
        batch.fail(item.rid, f"write failed: {exc.__class__.__name__}: {exc}")
        self.error(f"{item.relpath}: write failed: {exc}")
        return False

    def settle(self, batch: ClaimedBatch, item: Item, kind: str, value: bytes | str) -> bool:
        """Apply one compute answer; True when the row's file was written (the caller flags it)."""
        if kind == OK:
            try:
                self.write(item, value)  # type: ignore[arg-type]
            except OSError as exc:
                if self.write_failed(batch, item, exc):
                    raise  # disk full: stop (stage_entry exits with EXIT_NO_SPACE), the rest is released
                return False
            return True
        if kind == MARKED:
            self.flag_marked(batch, item)
        elif kind == UNDECODABLE:
            self.send_back(batch, item, str(value))
        else:
            self.fail(batch, item, str(value))
        return False

    def error(self, message: str) -> None:
        """A failure that is not the image's fault: too many in a row stop the stage (exit 1)."""
        self.log.error(message)
        self._errors_in_a_row += 1
        if self._errors_in_a_row >= MAX_CONSECUTIVE_ERRORS:
            raise FatalStageError(f"{self._errors_in_a_row} failures in a row, last: {message}")

    def summary(self) -> Iterator[str]:
        self.progress.report(final=True)
        yield (
            f"backgrounds removed: {self.processed}, already marked (flag only): {self.flagged_only}, "
            f"parked: {self.parked}, sent back to download: {self.sent_back}"
        )


class LocalBgRunner(StageJob):
    """The compute in this process, pipelined over three threads; `run_batch` is what `worker.run_loop` calls."""

    def __init__(self, writer: BgWriter, compute: BgCompute) -> None:
        self.writer = writer
        self.compute = compute
        self.stopper = writer.stopper
        self.prefetch = ThreadPoolExecutor(1, thread_name_prefix="bg-prefetch")
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="bg-write")

    def close(self) -> None:
        self.prefetch.shutdown(wait=True, cancel_futures=True)
        self.write_pool.shutdown(wait=True)

    def summary(self) -> Iterator[str]:
        return self.writer.summary()

    # -- prefetch thread ---------------------------------------------------------------------------

    def load(self, row: sqlite3.Row) -> Item:
        item = self.writer.read(row)
        if item.data is not None:
            item.prepared, item.data = self.compute.prepare(item.data), None
            if item.prepared.error is not None:  # undecodable (permanent) goes back to download
                item.error, item.redownload = item.prepared.error, item.prepared.permanent
        return item

    # -- writer thread -----------------------------------------------------------------------------

    def finish(self, item: Item, mask: object) -> None:
        assert item.prepared is not None
        self.writer.write(item, self.compute.finish(item.prepared, mask))  # type: ignore[arg-type]
        item.prepared = None

    # -- main thread -------------------------------------------------------------------------------

    def run_batch(self) -> int:
        batch = self.writer.claim()
        if batch is None:
            return 0
        with batch:
            rows = iter(batch.rows)
            pending: deque[Future[Item]] = deque()
            writes: deque[tuple[Item, Future[None]]] = deque()
            try:
                while not self.stopper.should_stop():
                    # keep a few images decoded ahead, not the whole claim (a full-size photo is ~30 MB decoded)
                    for row in itertools.islice(rows, self.compute.max_batch + PREFETCH_AHEAD - len(pending)):
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

    def _next_group(self, batch: ClaimedBatch, pending: deque[Future[Item]]) -> list[Item]:
        """Up to `max_batch` decoded images needing inference; settle marked and failed ones on the way."""
        group: list[Item] = []
        while pending and len(group) < self.compute.max_batch:
            item = pending.popleft().result()
            if item.error is not None:
                self.writer.settle_input_error(batch, item)
            elif item.prepared is not None and item.prepared.marked:
                self.writer.flag_marked(batch, item)
            else:
                group.append(item)
        return group

    def _infer(self, batch: ClaimedBatch, group: list[Item], writes: deque[tuple[Item, Future[None]]]) -> None:
        try:
            masks = self.compute.masks([it.prepared for it in group])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - one bad input must not kill the worker
            for it in group:
                batch.fail(it.rid, f"inference failed: {exc.__class__.__name__}: {exc}")
            self.writer.error(f"inference failed for {len(group)} image(s): {exc}")
            return
        for it, mask in zip(group, masks, strict=True):
            it.prepared.tensor = None  # type: ignore[union-attr]
            writes.append((it, self.write_pool.submit(self.finish, it, mask)))

    def _collect(self, batch: ClaimedBatch, writes: deque[tuple[Item, Future[None]]], *, wait: bool) -> None:
        """Flag the rows whose files are durably replaced (in claim order), in one transaction."""
        done: list[int] = []
        no_space: BaseException | None = None
        while writes and (wait or writes[0][1].done()):
            item, fut = writes.popleft()
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001 - disk full, permission, ...: retry later
                if self.writer.write_failed(batch, item, exc):
                    no_space = no_space or exc
                continue
            done.append(item.rid)
        self.writer.flag_written(batch, done)
        if no_space is not None:
            raise no_space


def build_local(ctx: Context, opts: BgStageOptions, compute: BgCompute) -> LocalBgRunner:
    return LocalBgRunner(BgWriter(ctx.settings, ctx.conn, opts, ctx.stopper, ctx.log), compute)


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
