"""Moving finished non-primary images to the backup disk, without ever losing one; and finding them again.

An image qualifies when `is_primary=0`, all five `embed_*` flags are 1, `archived_at IS NULL`, and its
file is still in `images/`. Each move, in this order (a crash between any two steps leaves the image
whole in at least one place, and the next run finishes the job):

1. copy to `<dest>/.tmp/` on the destination's filesystem, full fsync, rename to `<dest>/<relpath>`, fsync
   the folder (the same relative path as under `images/`, see `layout.image_relpath`);
2. verify: the copy, re-read from disk, has the source's size and sha256;
3. record: `archived_at` is set, and the batch's rowids are written to kv `cleanup_inflight`, in one
   durable transaction (`synchronous=FULL`);
4. delete the originals, fsync their folders, then clear `cleanup_inflight`.

At start-up, rows named in `cleanup_inflight` whose original still exists are verified again and their
originals deleted (crash between 3 and 4). A row whose original is gone but whose copy exists with
`archived_at` still NULL is adopted (the copy was only ever renamed into place complete).
Later stages find an image wherever it is with `layout.locate_image()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageselector import db
from imageselector.config import Settings
from imageselector.fsutil import atomic_writer, clean_tmp, fsync_dir
from imageselector.layout import (
    KV_DEST,
    KV_DEST_HISTORY,
    image_path,
    image_relpath,
)

log = logging.getLogger("cleanup_images")

DEFAULT_MIN_FREE_MB = 1024.0
KV_INFLIGHT = "cleanup_inflight"
PAUSE_ENV = "IMAGESELECTOR_CLEANUP_PAUSE_AT"  # test hook: "copy", "copied" or "recorded"
CHUNK = 64 * 1024

SELECT_COLS = "rowid AS rid, listing_id, image_id, gid"
ELIGIBLE_SQL = "is_primary=0 AND archived_at IS NULL AND " + " AND ".join(f"embed_{m}=1" for m in db.EMBED_MODELS)


class DestinationError(Exception):
    """The backup destination cannot take the move (missing, not mounted, not writable, full)."""


class CopyError(Exception):
    """One image could not be copied and verified; its original is left untouched."""


# --------------------------------------------------------------------------------------------------
# The destination
# --------------------------------------------------------------------------------------------------


def volume_root(dest: Path) -> Path | None:
    """`/Volumes/<name>` for a path on a macOS external volume, else None."""
    parts = Path(os.path.abspath(dest)).parts
    if len(parts) >= 3 and parts[0] == "/" and parts[1] == "Volumes":
        return Path("/Volumes", parts[2])
    return None


def check_destination(dest: Path) -> None:
    """Refuse a destination that is not there: an unmounted volume, a missing or read-only folder.

    On macOS a folder under /Volumes that is not on a mounted volume is a plain folder on the system
    disk (left behind by an earlier unmount): writing there would fill the SSD we are trying to free.
    """
    vol = volume_root(dest)
    if vol is not None and not os.path.ismount(vol):
        raise DestinationError(
            f"backup disk not mounted: {vol} is not a mount point. Connect/mount the disk, or choose another "
            f"destination with --dest or CLEANUP_DEST"
        )
    if not dest.is_dir():
        raise DestinationError(
            f"destination {dest} does not exist. Create it (mkdir -p '{dest}') or choose another with --dest "
            f"or CLEANUP_DEST"
        )
    if not os.access(dest, os.W_OK | os.X_OK):
        raise DestinationError(f"destination {dest} is not writable")


def check_space(dest: Path, need_bytes: int, margin_bytes: int) -> int:
    """Refuse when `need_bytes` plus the margin do not fit; returns the free bytes."""
    free = shutil.disk_usage(dest).free
    if free < need_bytes + margin_bytes:
        raise DestinationError(
            f"not enough free space on {dest}: {fmt_bytes(free)} free, need {fmt_bytes(need_bytes)} "
            f"plus a margin of {fmt_bytes(margin_bytes)} (CLEANUP_MIN_FREE_MB / --min-free-mb)"
        )
    return free


def same_filesystem(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000.0
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# Copy and verify
# --------------------------------------------------------------------------------------------------


def _pause_if_asked(point: str, home: Path) -> None:
    """Test hook: stop dead at `point` (after writing a marker) so a test can `kill -9` us there."""
    if os.environ.get(PAUSE_ENV) != point:
        return
    marker = Path(home) / ".run" / "cleanup_paused"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(point)
    while True:
        time.sleep(60)


def _drop_cache(fd: int) -> None:
    """Ask the OS to forget the file's cached pages, so the next read comes from the disk itself."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    else:  # macOS: F_NOCACHE makes reads on this descriptor bypass the cache
        nocache = getattr(fcntl, "F_NOCACHE", None)
        if nocache is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, nocache, 1)


def file_digest(path: Path, *, from_disk: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of a file, optionally bypassing the page cache."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        if from_disk:
            _drop_cache(f.fileno())
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def _ensure_dir(directory: Path, root: Path) -> None:
    """Create `directory` (under `root`) durably: the new folder's entry is fsynced into its parent."""
    if directory.is_dir():
        return
    rel = directory.relative_to(root)
    cur = root
    for part in rel.parts:
        nxt = cur / part
        if not nxt.is_dir():
            nxt.mkdir(exist_ok=True)
            fsync_dir(cur)
        cur = nxt


def copy_verified(src: Path, dst: Path, dest_root: Path, home: Path) -> int:
    """Copy `src` to `dst` atomically and durably, then verify the copy from disk. Returns the size.

    An existing `dst` that already matches (an earlier run died after the rename) is kept as it is.
    Raises CopyError (and leaves no partial `dst`) when the copy cannot be made or does not verify.
    """
    try:
        src_size = os.stat(src).st_size
        if dst.exists() and file_digest(dst, from_disk=True) == file_digest(src):
            return src_size
        _ensure_dir(dst.parent, dest_root)
        h = hashlib.sha256()
        n = 0
        with open(src, "rb") as fin, atomic_writer(dst, dest_root / ".tmp") as fout:
            while chunk := fin.read(CHUNK):
                fout.write(chunk)
                h.update(chunk)
                n += len(chunk)
                if n == len(chunk) and os.environ.get(PAUSE_ENV) == "copy":
                    fout.flush()
                    _pause_if_asked("copy", home)
        if n != src_size:
            raise CopyError(f"{src} changed size while copying ({src_size} -> {n} bytes)")
        got_size, got_sha = file_digest(dst, from_disk=True)
    except OSError as exc:
        raise CopyError(f"copy {src} -> {dst} failed: {exc}") from exc
    if (got_size, got_sha) != (n, h.hexdigest()):
        with contextlib.suppress(OSError):
            dst.unlink()
        raise CopyError(f"copy of {src} does not verify: {got_size} bytes sha256 {got_sha[:12]}, expected {n} bytes")
    return n


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _delete_originals(paths: Iterable[Path]) -> None:
    parents = set()
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        parents.add(p.parent)
    for d in parents:
        fsync_dir(d)


# --------------------------------------------------------------------------------------------------
# Database side
# --------------------------------------------------------------------------------------------------


def durable(conn: sqlite3.Connection) -> sqlite3.Connection:
    """Make this connection's commits survive power loss (WAL + synchronous=NORMAL may lose the last ones).

    Needed because an original is deleted right after its move is recorded.
    """
    conn.execute("PRAGMA synchronous=FULL")
    if hasattr(os, "uname") and os.uname().sysname == "Darwin":
        conn.execute("PRAGMA fullfsync=1")
    return conn


def eligible_rows(conn: sqlite3.Connection, after_rid: int, limit: int) -> list[sqlite3.Row]:
    """The next qualifying rows by rowid (a keyset scan: one pass over the table costs O(rows))."""
    return conn.execute(
        f"SELECT {SELECT_COLS} FROM image_status WHERE rowid > ? AND {ELIGIBLE_SQL} ORDER BY rowid LIMIT ?",
        (after_rid, limit),
    ).fetchall()


def count_eligible(conn: sqlite3.Connection) -> int:
    return int(conn.execute(f"SELECT COUNT(*) FROM image_status WHERE {ELIGIBLE_SQL}").fetchone()[0])


@db.retry_on_lock
def record_moved(conn: sqlite3.Connection, rids: Sequence[int], now: float | None = None) -> list[int]:
    """Set archived_at and remember the batch as in flight, in one transaction. Returns rids recorded."""
    now = time.time() if now is None else now
    done = []
    with db.Transaction(conn):
        for rid in rids:
            if conn.execute(
                "UPDATE image_status SET archived_at=? WHERE rowid=? AND archived_at IS NULL", (now, rid)
            ).rowcount:
                done.append(rid)
        _kv_put(conn, KV_INFLIGHT, json.dumps(list(rids)))
    return done


@db.retry_on_lock
def unrecord(conn: sqlite3.Connection, rid: int) -> None:
    with db.Transaction(conn):
        conn.execute("UPDATE image_status SET archived_at=NULL WHERE rowid=?", (rid,))


def _kv_put(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO kv(key, value, updated_at) VALUES (?,?,?)"
        " ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
        (key, value, time.time()),
    )


def remember_dest(conn: sqlite3.Connection, dest: Path) -> None:
    """kv `cleanup_dest` = where moves go now; `cleanup_dests` = every destination ever used."""
    dest_s = str(Path(os.path.abspath(dest)))
    try:
        history = json.loads(db.kv_get(conn, KV_DEST_HISTORY) or "[]")
    except ValueError:
        history = []
    if dest_s not in history:
        history.append(dest_s)
        db.kv_set(conn, KV_DEST_HISTORY, json.dumps(history))
    if db.kv_get(conn, KV_DEST) != dest_s:
        db.kv_set(conn, KV_DEST, dest_s)


# --------------------------------------------------------------------------------------------------
# The mover
# --------------------------------------------------------------------------------------------------


@dataclass
class Mover:
    """Moves qualifying images batch by batch; `run_batch()` plugs into `worker.run_loop`."""

    settings: Settings
    conn: sqlite3.Connection
    dest: Path
    margin_bytes: int
    batch_size: int = 200
    limit: int | None = None
    progress: Any = None
    cursor: int = 0
    moved: int = 0
    moved_bytes: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def src(self, row: Mapping[str, Any]) -> Path:
        return image_path(self.settings.images_dir, row["listing_id"], row["image_id"])

    def dst(self, row: Mapping[str, Any]) -> Path:
        return self.dest / image_relpath(row["listing_id"], row["image_id"])

    def prepare(self) -> None:
        """Start-up: clear temp debris in the destination and finish a batch a crash left half done."""
        removed = clean_tmp(self.dest / ".tmp")
        if removed:
            log.info("removed %d partial copies left by an interrupted run", removed)
        remember_dest(self.conn, self.dest)
        self.finish_inflight()

    def finish_inflight(self) -> int:
        try:
            rids = json.loads(db.kv_get(self.conn, KV_INFLIGHT) or "[]")
        except ValueError:
            rids = []
        if not rids:
            return 0
        marks = ",".join("?" * len(rids))
        rows = self.conn.execute(
            f"SELECT {SELECT_COLS} FROM image_status WHERE rowid IN ({marks}) AND archived_at IS NOT NULL", rids
        ).fetchall()
        finished = []
        for row in rows:
            src = self.src(row)
            if not src.exists():
                continue
            try:
                copy_verified(src, self.dst(row), self.dest, self.settings.home)
            except CopyError as exc:
                log.error("recorded move not verifiable, keeping the original and marking it not moved: %s", exc)
                unrecord(self.conn, row["rid"])
                continue
            finished.append(src)
        _delete_originals(finished)
        db.kv_set(self.conn, KV_INFLIGHT, "[]")
        if finished:
            log.info("finished %d moves that an interrupted run had recorded but not completed", len(finished))
        return len(finished)

    def run_batch(self) -> int:
        """Scan the next rows; move those whose file is in images/. Returns rows scanned (0 = pass over)."""
        want = self.batch_size
        if self.limit is not None:
            want = min(want, self.limit - self.moved)
            if want <= 0:
                return 0
        rows = eligible_rows(self.conn, self.cursor, want)
        if not rows:
            self.cursor = 0  # next pass (in --watch) starts over: new rows may qualify anywhere
            return 0
        self.cursor = rows[-1]["rid"]
        present, adopted = [], []
        for row in rows:
            if self.src(row).is_file():
                present.append(row)
            elif self.dst(row).is_file():
                adopted.append(row["rid"])
        if adopted:  # the copy is there and the original gone: only the record was lost
            record_moved(self.conn, adopted)
            db.kv_set(self.conn, KV_INFLIGHT, "[]")
            log.info("recorded %d images already at the backup location", len(adopted))
        if not present:
            return len(rows)
        check_destination(self.dest)
        need = sum(_size(self.src(r)) for r in present)
        check_space(self.dest, need, self.margin_bytes)
        copied: list[sqlite3.Row] = []
        nbytes = 0
        for row in present:
            try:
                nbytes += copy_verified(self.src(row), self.dst(row), self.dest, self.settings.home)
                copied.append(row)
            except CopyError as exc:
                self.failed += 1
                self.errors.append(str(exc))
                log.error("%s", exc)
                db.record_bad(self.conn, "cleanup", f"{row['listing_id']}_{row['image_id']}", str(exc))
                if not self.dest.is_dir():
                    raise DestinationError(f"destination {self.dest} disappeared during the move") from exc
        if not copied:
            return len(rows)
        _pause_if_asked("copied", self.settings.home)
        recorded = set(record_moved(self.conn, [r["rid"] for r in copied]))
        _pause_if_asked("recorded", self.settings.home)
        _delete_originals(self.src(r) for r in copied if r["rid"] in recorded)
        db.kv_set(self.conn, KV_INFLIGHT, "[]")
        self.moved += len(recorded)
        self.moved_bytes += nbytes
        if self.progress is not None:
            self.progress.add(len(recorded), nbytes=nbytes)
        return len(rows)


def plan(settings: Settings, conn: sqlite3.Connection) -> tuple[int, int]:
    """What a move would do now: (images, bytes) qualifying with their file present in images/."""
    count = total = 0
    cursor = 0
    while rows := eligible_rows(conn, cursor, 2000):
        cursor = rows[-1]["rid"]
        for row in rows:
            try:
                total += image_path(settings.images_dir, row["listing_id"], row["image_id"]).stat().st_size
                count += 1
            except FileNotFoundError:
                pass
    return count, total


def estimate_bytes(settings: Settings, conn: sqlite3.Connection, sample: int = 500) -> tuple[int, int]:
    """(qualifying rows, estimated bytes) from a sample of file sizes: cheap enough for a start-up check."""
    n = count_eligible(conn)
    sizes = []
    for row in eligible_rows(conn, 0, sample):
        with contextlib.suppress(FileNotFoundError):
            sizes.append(image_path(settings.images_dir, row["listing_id"], row["image_id"]).stat().st_size)
    mean = sum(sizes) / len(sizes) if sizes else 0
    return n, int(n * mean)
