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

import argparse
import contextlib
import logging
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imageselector import db, layout
from imageselector.config import PROJECT_ROOT, load_settings
from imageselector.download.engines import (
    DONE,
    ENGINES,
    PARK,
    RELEASE,
    RETRY,
    Engine,
    FetchOptions,
    Job,
    Outcome,
    make_engine,
)
from imageselector.etsy.cdn import SIZES, build_image_url, parse_image_url
from imageselector.fsutil import clean_tmp, is_disk_full
from imageselector.imagecheck import DEFAULT_MAX_PIXELS, decode_error
from imageselector.logs import Progress, setup_logging
from imageselector.stopping import EXIT_NO_SPACE, KILL, KILL_DL, Stopper, guarded_main, refuse_if_killed
from imageselector.worker import ClaimedBatch, Heartbeat, run_loop

STAGE = "download"
SCRIPT = "image_downloader"
DEFAULT_ENGINE = "async"
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
# The pipeline: claim -> engine -> flags
# --------------------------------------------------------------------------------------------------


class Pipeline:
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


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser(settings_get=lambda name, default: default) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser(
        prog="image_downloader.py",
        description="Download product photos from the Etsy CDN into images/ (stop: touch KILL_DL).",
    )
    p.add_argument(
        "--watch", action="store_true", help="keep polling for new rows instead of exiting when none are left"
    )
    p.add_argument(
        "--size",
        default=settings_get("DOWNLOAD_SIZE", "570xN"),
        choices=SIZES,
        help="CDN size tag (default 570xN: about 70 KB, enough for 224-pixel models; fullxfull = original)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=int(settings_get("DOWNLOAD_CONCURRENCY", 64)),
        help="requests in flight per process (default 64)",
    )
    p.add_argument(
        "--per-host",
        type=int,
        default=int(settings_get("DOWNLOAD_PER_HOST", 64)),
        help="most requests in flight to one host per process (default 64)",
    )
    p.add_argument("--batch-size", type=int, default=200, help="rows claimed per database transaction (default 200)")
    p.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        help="read timeout in seconds: the longest silence of a response (default 20)",
    )
    p.add_argument("--connect-timeout", type=float, default=5.0, help="connect timeout in seconds (default 5)")
    p.add_argument("--total-timeout", type=float, default=60.0, help="longest one request may take in all (default 60)")
    p.add_argument(
        "--tries",
        type=int,
        default=3,
        help="attempts per image within one claim before the database's backoff takes over (default 3)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="decompression-bomb guard: park images with more pixels",
    )
    p.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        default=DEFAULT_ENGINE,
        help=f"concurrency design (default {DEFAULT_ENGINE}; see docs/download.md)",
    )
    p.add_argument(
        "--poll", type=float, default=10.0, help="with --watch: seconds between polls when idle (default 10)"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="at start check every flagged image's file exists and decodes (full decode, slow: about a millisecond "
        "per image), and fetch again what fails (default: a random sample of 2,000 checked for existence)",
    )
    p.add_argument(
        "--refetch-missing",
        action="store_true",
        help="start even when images/ is missing or empty while rows say downloaded (downloads them all again)",
    )
    p.add_argument("--no-reconcile", action="store_true", help="skip the start-up check of flags against files")
    p.add_argument(
        "--processes",
        type=int,
        default=int(settings_get("DOWNLOAD_PROCESSES", 1)),
        help="downloader processes (default 1); more helps only when one process is CPU-bound",
    )
    p.add_argument("--helper", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines (default 10)")
    return p


def _start_helpers(args: argparse.Namespace, argv: list[str]) -> list[subprocess.Popen]:
    """`--processes N`: N-1 more copies of this worker; the claim protocol keeps their rows apart."""
    script = PROJECT_ROOT / "scripts" / "image_downloader.py"
    procs = []
    for i in range(1, args.processes):
        cmd = [sys.executable, str(script), *argv, "--processes", "1", "--no-reconcile", "--helper", str(i)]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
    log.info("started %d more downloader processes: pids %s", len(procs), " ".join(str(p.pid) for p in procs))
    return procs


def _wait_helpers(procs: list[subprocess.Popen], stopper: Stopper) -> int:
    worst = 0
    for p in procs:
        if stopper.reason and stopper.reason.startswith("signal") and p.poll() is None:
            p.send_signal(signal.SIGTERM)  # a kill file reaches them directly; a signal has to be passed on
        rc = p.wait()
        if rc:
            log.warning("downloader process %d exited with code %d", p.pid, rc)
        worst = max(worst, rc)
    return worst


def main(argv: list[str] | None = None) -> int:
    return guarded_main("image_downloader.py", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    settings = load_settings()
    db.check_usable(settings, write=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(lambda n, d: settings.get(n) or d).parse_args(argv)
    except ValueError as exc:  # a DOWNLOAD_* setting that is not a number
        print(f"image_downloader: bad setting: {exc}", file=sys.stderr)
        return 2
    if min(args.concurrency, args.per_host, args.batch_size, args.tries, args.processes) < 1:
        print(
            "image_downloader: --concurrency, --per-host, --batch-size, --tries and --processes must be at least 1",
            file=sys.stderr,
        )
        return 2
    name = STAGE if not args.helper else f"{STAGE}-{args.helper}"
    setup_logging(SCRIPT, settings.home, stage=name, secrets=settings.secrets(), rotate=not args.helper)
    stopper = Stopper(settings.home, (KILL_DL, KILL))
    if refuse_if_killed(stopper):
        return 0

    conn = db.connect(settings.db_path)
    if not args.helper:
        removed = clean_tmp(settings.tmp_dir)
        if removed:
            log.info("removed %d temp files left by an earlier run in %s", removed, settings.tmp_dir)
        freed = db.reclaim_dead(conn, STAGE)
        if freed:
            log.info("freed %d rows claimed by downloaders that are no longer running", freed)
    gone = None if args.refetch_missing or args.helper else images_gone(conn, settings.images_dir)
    if gone:
        log.error("%s", gone)
        conn.close()
        return 2
    if not args.no_reconcile:
        res = reconcile(
            conn,
            settings.images_dir,
            full=args.verify,
            decode=args.verify,
            tmp_dir=settings.tmp_dir,
            max_pixels=args.max_pixels,
        )
        how = "every row" if res.full else "a random sample"
        log.info("flags vs files (%s): %d flagged images checked, %d missing and reset", how, res.checked, res.missing)
        if res.decoded:
            log.info("verify: %d files did not decode and will be fetched again", res.undecodable)

    opts = FetchOptions(
        concurrency=args.concurrency,
        per_host=args.per_host,
        connect_timeout=args.connect_timeout,
        read_timeout=args.timeout,
        total_timeout=args.total_timeout,
        tries=args.tries,
        max_pixels=args.max_pixels,
    )
    helpers = _start_helpers(args, argv) if args.processes > 1 else []
    engine = make_engine(args.engine, opts, settings.tmp_dir)
    progress = Progress(log, "images", interval=args.progress_interval, remaining=lambda: db.backlog(conn, STAGE))
    pipeline = Pipeline(
        conn,
        engine,
        images_dir=settings.images_dir,
        cdn_base=settings.cdn_base,
        size=args.size,
        batch_size=args.batch_size,
        stopper=stopper,
        progress=progress,
    )
    log.info(
        "downloading %s images from %s into %s: engine %s, %d in flight (%d per host), %d rows waiting",
        args.size,
        settings.cdn_base,
        settings.images_dir,
        engine.name,
        opts.concurrency,
        opts.per_host,
        db.backlog(conn, STAGE),
    )
    heartbeat = Heartbeat(settings.run_dir, name)
    rc = 0
    try:
        run_loop(pipeline.run_batch, stopper, watch=args.watch, heartbeat=heartbeat, poll_s=args.poll, logger=log)
    finally:
        pipeline.shutdown()
        progress.report(final=True)
        c = pipeline.counts
        log.info(
            "downloaded %d, parked %d, to retry later %d, handed back %d",
            c[DONE],
            c[PARK],
            c[RETRY],
            c[RELEASE],
        )
        rc = _wait_helpers(helpers, stopper)
        if engine.fatal:
            log.error("stopped: %s (the rows were handed back, nothing failed)", engine.fatal)
            rc = EXIT_NO_SPACE if is_disk_full(engine.fatal_exc) else 1
        if not args.helper:
            _log_waiting(conn)
        conn.close()
    return rc if rc in (0, EXIT_NO_SPACE) else 1


def _log_waiting(conn: sqlite3.Connection) -> None:
    st = db.stage(STAGE)
    row = conn.execute(
        f"SELECT COUNT(*), MIN({st.not_before_col}) FROM image_status INDEXED BY ix_{st.prefix}_todo"
        f" WHERE {st.pending_sql} AND {st.not_before_col} > ?",
        (time.time(),),
    ).fetchone()
    if row[0]:
        when = time.strftime("%H:%M:%S", time.localtime(row[1]))
        log.info("%d rows wait for a retry (first at %s): run again later or use --watch", row[0], when)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
