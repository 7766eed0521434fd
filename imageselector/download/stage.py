"""The download stage: rows with `to_download=1 AND download_done=0` -> photos in images/.

For each claimed row the URL is built from (shop_id, hex, image_id, suffix) under ETSY_CDN_BASE with a
size tag (570xN by default), the body is checked to be a whole image (imagecheck), written atomically
to `layout.image_path()` and only then is `download_done` set. 404/410, non-images and bodies still cut
off after the retries are parked with their reason; 429/5xx/timeouts are retried (Retry-After honoured)
and then left to the database's backoff.

Rows flow through a pipeline, not lock-step batches: a new batch is claimed whenever fewer than
`2 x concurrency` rows are in flight, and finished rows are flagged in small groups, so the CDN
connections never wait for the slowest image of a batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imageselector import db, layout
from imageselector.cdn import build_image_url, parse_image_url
from imageselector.download.engines import DONE, PARK, RETRY, Engine, Job, Outcome
from imageselector.imagecheck import DEFAULT_MAX_PIXELS, decode_error
from imageselector.logs import Progress
from imageselector.stopping import Stopper
from imageselector.worker import ClaimedBatch

STAGE = "download"
SCRIPT = "image_downloader"
log = logging.getLogger(SCRIPT)


# --------------------------------------------------------------------------------------------------
# Reconciliation: a flag of 1 must mean a file on disk
# --------------------------------------------------------------------------------------------------


@dataclass
class ReconcileResult:
    checked: int = 0
    missing: int = 0
    full: bool = False
    undecodable: int = 0
    decoded: bool = False


def _missing(images_dir: Path, rows: list[sqlite3.Row]) -> list[int]:
    return [r["rid"] for r in rows if not layout.image_path(images_dir, r["listing_id"], r["image_id"]).is_file()]


def _undecodable(images_dir: Path, rows: list[sqlite3.Row], max_pixels: int) -> list[tuple[int, Path, str]]:
    out = []
    for r in rows:
        path = layout.image_path(images_dir, r["listing_id"], r["image_id"])
        why = decode_error(path, max_pixels)
        if why is not None and why != "missing":
            out.append((r["rid"], path, why))
    return out


def _reset_missing(conn: sqlite3.Connection, rids: list[int]) -> None:
    """Download again; and since the new file will have its background, remove that again too."""
    for i in range(0, len(rids), 500):
        chunk = rids[i : i + 500]
        marks = ",".join("?" * len(chunk))
        db.reset_rows(conn, STAGE, f"rowid IN ({marks})", chunk)
        db.reset_rows(conn, "bg", f"rowid IN ({marks}) AND bg_removed=1", chunk)


def _refetch_undecodable(conn: sqlite3.Connection, bad: list[tuple[int, Path, str]], tmp_dir: Path) -> int:
    """Fetch again the files that do not decode: the file is moved away first, then the flags go back to 0
    (rows leased by a live bg worker right now are left to it: it sends an undecodable file back itself)."""
    n = 0
    now = time.time()
    for rid, path, why in bad:
        leased = conn.execute(
            "SELECT 1 FROM image_status WHERE rowid=? AND bg_claim IS NOT NULL AND bg_not_before > ?", (rid, now)
        ).fetchone()
        if leased:
            continue
        aside = tmp_dir / f".{path.name}.{os.getpid()}.verify.tmp"
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            os.replace(path, aside)
        except OSError as exc:
            log.warning("could not move %s aside (%s); leaving it", path, exc)
            continue
        log.warning("%s does not decode (%s): fetching it again", path.name, why)
        _reset_missing(conn, [rid])
        with contextlib.suppress(OSError):
            aside.unlink()
        n += 1
    return n


def images_gone(conn: sqlite3.Connection, images_dir: Path) -> str | None:
    """Why starting now would download everything again (images/ missing or empty while rows say downloaded)."""
    if images_dir.is_dir():
        with os.scandir(images_dir) as it:
            if next(it, None) is not None:
                return None
        state = "is empty"
    else:
        state = "is missing"
    n = conn.execute("SELECT COUNT(*) FROM image_status WHERE download_done=1 AND archived_at IS NULL").fetchone()[0]
    if not n:
        return None
    return (
        f"{images_dir} {state} but {n:,} rows say downloaded: is the disk mounted? Not starting "
        f"(to download them all again: image_downloader.py --refetch-missing)"
    )


def reconcile(
    conn: sqlite3.Connection,
    images_dir: Path,
    *,
    full: bool = False,
    sample: int = 2000,
    decode: bool = False,
    tmp_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ReconcileResult:
    """Reset `download_done` for rows whose file is gone (archived rows live on the backup disk: skipped).

    Default: a random sample of `sample` rowids (O(sample) index look-ups, milliseconds even for a million
    rows); if the sample finds one missing file, escalate to checking every row. `full` checks every row
    from the start (a stat per image: about a minute per million on an SSD).
    """
    res = ReconcileResult(full=full)
    base = "SELECT rowid AS rid, listing_id, image_id FROM image_status WHERE download_done=1 AND archived_at IS NULL"
    if not full:
        top = conn.execute("SELECT MAX(rowid) FROM image_status").fetchone()[0] or 0
        picks = sorted(random.sample(range(1, top + 1), min(sample, top))) if top else []
        missing: list[int] = []
        for i in range(0, len(picks), 500):
            chunk = picks[i : i + 500]
            rows = conn.execute(f"{base} AND rowid IN ({','.join('?' * len(chunk))})", chunk).fetchall()
            res.checked += len(rows)
            missing += _missing(images_dir, rows)
        if not missing:
            return res
        log.warning(
            "sample check: %d of %d flagged images missing on disk; checking every row", len(missing), res.checked
        )
        res.full = True
    res.checked = 0
    cur = conn.execute(base)
    lost: list[int] = []
    bad: list[tuple[int, Path, str]] = []
    t_log = time.monotonic()
    while rows := cur.fetchmany(5000):
        res.checked += len(rows)
        lost += _missing(images_dir, rows)
        if decode:
            bad += _undecodable(images_dir, rows, max_pixels)
            if time.monotonic() - t_log > 30:
                log.info("verify: %d files decoded so far, %d do not decode", res.checked, len(bad))
                t_log = time.monotonic()
    _reset_missing(conn, lost)
    res.missing = len(lost)
    if decode:
        res.decoded = True
        res.undecodable = _refetch_undecodable(conn, bad, tmp_dir or images_dir.parent / ".tmp")
    return res


# --------------------------------------------------------------------------------------------------
# The stage: claim -> engine -> flags
# --------------------------------------------------------------------------------------------------


class DownloadStage:
    """Keeps the engine fed from claimed batches and turns its outcomes into complete/fail/release."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        engine: Engine,
        *,
        images_dir: Path,
        cdn_base: str,
        size: str,
        batch_size: int,
        stopper: Stopper,
        progress: Progress,
        owner: str | None = None,
    ) -> None:
        self.conn = conn
        self.engine = engine
        self.images_dir = images_dir
        self.cdn_base = cdn_base
        self.size = size
        self.batch_size = batch_size
        self.low_water = max(2 * engine.opts.concurrency, batch_size // 2)
        self.stopper = stopper
        self.progress = progress
        self.owner = owner or db.make_owner(STAGE)
        self.open: dict[int, ClaimedBatch] = {}  # rid -> its batch, for rows handed to the engine
        self.left: dict[int, int] = {}  # id(batch) -> rows of it still in the engine
        self.last_renew = time.monotonic()
        self.counts: dict[str, int] = defaultdict(int)

    # -- claiming
    def _job(self, row: sqlite3.Row) -> Job:
        url = build_image_url(self.cdn_base, row["shop_id"], row["hex"], row["image_id"], row["suffix"], self.size)
        parse_image_url(url)  # strict pattern check: a row with a missing or odd part raises ValueError here
        dest = layout.image_path(self.images_dir, row["listing_id"], row["image_id"])
        name = f"{row['listing_id']}_{row['image_id']}"
        return Job(row["rid"], name, url, dest, retried=row[db.stage(STAGE).attempts_col] > 1)

    def _claim(self) -> int:
        batch = ClaimedBatch.claim(self.conn, STAGE, self.owner, self.batch_size)
        if not batch.rows:
            return 0
        self.left[id(batch)] = 0
        for row in batch.rows:
            try:
                job = self._job(row)
            except (ValueError, TypeError) as exc:  # a row without shop/hex/suffix cannot be fetched, ever
                batch.fail(row["rid"], f"cannot build URL: {exc}", permanent=True)
                self.counts[PARK] += 1
                continue
            self.open[job.rid] = batch
            self.left[id(batch)] += 1
            self.engine.submit(job)
        self._close_finished([batch])
        return len(batch.rows)

    # -- outcomes
    def _collect(self, timeout: float, linger: float = 0.05) -> list[Outcome]:
        try:
            first = self.engine.results.get(timeout=timeout)
        except queue.Empty:
            return []
        got = [first]
        until = time.monotonic() + linger
        while True:
            try:
                got.append(self.engine.results.get(timeout=max(0.0, until - time.monotonic())))
            except queue.Empty:
                return got

    def _apply(self, outcomes: list[Outcome]) -> int:
        done: dict[int, list[Outcome]] = defaultdict(list)  # id(batch) -> outcomes
        handed_back: dict[int, list[int]] = defaultdict(list)  # id(batch) -> rids
        batches: dict[int, ClaimedBatch] = {}
        for out in outcomes:
            batch = self.open.pop(out.job.rid, None)
            if batch is None:
                continue
            batches[id(batch)] = batch
            self.left[id(batch)] -= 1
            self.counts[out.kind] += 1
            if out.kind == DONE:
                done[id(batch)].append(out)
            elif out.kind == PARK:
                batch.fail(out.job.rid, out.reason, permanent=True)
                self.progress.add(0, failed=1)
                log.info("parked %s: %s", out.job.name, out.reason)
            elif out.kind == RETRY:
                parked = batch.fail(out.job.rid, out.reason)
                self.progress.add(0, failed=1)
                log.warning("%s %s: %s", "parked" if parked else "will retry later", out.job.name, out.reason)
            else:
                handed_back[id(batch)].append(out.job.rid)
        for key, rids in handed_back.items():
            batches[key].release(rids)
        for key, outs in done.items():
            batches[key].complete([o.job.rid for o in outs])
            self.progress.add(len(outs), nbytes=sum(o.nbytes for o in outs))
        self._close_finished(batches.values())
        return len(outcomes)

    def _close_finished(self, batches: Iterable[ClaimedBatch]) -> None:
        for b in batches:
            if self.left.get(id(b)) == 0:
                del self.left[id(b)]
                b.__exit__(None, None, None)  # nothing left open; releases strays if any

    def _renew_leases(self) -> None:
        """Rows queued behind slow ones must not lose their lease to another worker."""
        if time.monotonic() - self.last_renew < db.stage(STAGE).lease_s / 3:
            return
        self.last_renew = time.monotonic()
        if self.open:
            db.renew(self.conn, STAGE, self.owner, sorted(self.open))

    def _stopping(self) -> bool:
        if self.engine.fatal:
            self.stopper.request(self.engine.fatal)
        return self.stopper.should_stop()

    # -- the unit run_loop drives
    def run_batch(self) -> int:
        """Claim a batch if there is room, then handle outcomes until there is room again (or all is done)."""
        claimed = 0
        if len(self.open) < self.low_water and not self._stopping():
            claimed = self._claim()
        handled = 0
        until = time.monotonic() + 5.0  # come back to run_loop now and then: it beats the heartbeat
        while self.open and not self._stopping():
            if claimed and len(self.open) < self.low_water:
                break
            handled += self._apply(self._collect(timeout=0.25))
            self._renew_leases()
            if time.monotonic() > until:
                break
        return claimed + handled or len(self.open)  # rows still in flight (a long Retry-After) are work too

    def shutdown(self, grace_s: float = 3.0) -> None:
        """Stop: start nothing new, let transfers in flight finish for `grace_s`, release the rest."""
        self.engine.drain()
        deadline = time.monotonic() + grace_s
        while self.open and time.monotonic() < deadline:
            self._apply(self._collect(timeout=0.1))
        if self.open:
            self.engine.abort()
            self._apply(self._collect(timeout=0.3, linger=0.2))
        leftover = sorted(self.open)
        if leftover:
            log.info("releasing %d unfinished rows for the next run", len(leftover))
            for b in {id(b): b for b in self.open.values()}.values():
                b.release([rid for rid in leftover if self.open.get(rid) is b])
            self.open.clear()
            self.left.clear()
        self.engine.close()


def log_waiting(conn: sqlite3.Connection) -> None:
    st = db.stage(STAGE)
    row = conn.execute(
        f"SELECT COUNT(*), MIN({st.not_before_col}) FROM image_status INDEXED BY ix_{st.prefix}_todo"
        f" WHERE {st.pending_sql} AND {st.not_before_col} > ?",
        (time.time(),),
    ).fetchone()
    if row[0]:
        when = time.strftime("%H:%M:%S", time.localtime(row[1]))
        log.info("%d rows wait for a retry (first at %s): run again later or use --watch", row[0], when)
