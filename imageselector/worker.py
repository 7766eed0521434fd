"""The skeleton every stage worker shares.

    until stop: heartbeat -> claim a batch -> process -> make artifacts durable -> complete / fail
    on a graceful stop: release whatever of the batch was not finished

A stage supplies only `run_batch()` (claim + process one batch, return how many rows it handled)
and uses `ClaimedBatch` so leftover rows are always released, never stranded under a lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imageselector import db
from imageselector.fsutil import atomic_write_text
from imageselector.stopping import Stopper

log = logging.getLogger(__name__)


class ClaimedBatch:
    """Rows leased to this worker for one stage. On exit, rows neither completed nor failed are released."""

    def __init__(self, conn: sqlite3.Connection, stage: str, owner: str, rows: Sequence[sqlite3.Row]) -> None:
        self.conn = conn
        self.stage = stage
        self.owner = owner
        self.rows = list(rows)
        self._open = {r["rid"] for r in self.rows}
        self.completed: list[int] = []
        self.parked = 0
        self.failed = 0
        self.sent_back = 0

    @classmethod
    def claim(cls, conn: sqlite3.Connection, stage: str, owner: str, limit: int, **kw: Any) -> ClaimedBatch:
        return cls(conn, stage, owner, db.claim_batch(conn, stage, owner, limit, **kw))

    def __len__(self) -> int:
        return len(self.rows)

    def __enter__(self) -> ClaimedBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open:
            db.release(self.conn, self.stage, self.owner, sorted(self._open))
            self._open.clear()

    def complete(self, rids: Sequence[int], extra: Callable[[sqlite3.Connection], None] | None = None) -> list[int]:
        """Flag rows done (their artifacts must already be durable)."""
        done = db.complete(self.conn, self.stage, self.owner, rids, extra)
        self.completed += done
        self._open.difference_update(rids)
        return done

    def fail(self, rid: int, error: str, *, permanent: bool = False) -> bool:
        parked = db.fail(self.conn, self.stage, self.owner, rid, error, permanent=permanent)
        self._open.discard(rid)
        self.failed += 1
        self.parked += int(parked)
        return parked

    def send_back(self, rid: int, error: str, bad_file: Path | None, tmp_dir: Path) -> bool:
        """Input undecodable or missing: move the bad file out of images/, then hand the row back to download.

        The file goes first (renamed into `tmp_dir`, removed after the flag change) so a downloader can never
        write the fresh copy before the old one is taken away. Returns True when the row was parked instead
        (out of download attempts: see db.send_back_to_download).
        """
        moved = None
        if bad_file is not None and bad_file.exists():
            moved = Path(tmp_dir) / f".{bad_file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                moved.parent.mkdir(parents=True, exist_ok=True)
                os.replace(bad_file, moved)
            except OSError as exc:  # cannot take it away: do not let a download race with it
                log.warning("could not move %s aside (%s); failing the row instead", bad_file, exc)
                return self.fail(rid, f"{error}; and the file could not be moved aside: {exc}")
        parked = db.send_back_to_download(self.conn, self.stage, self.owner, rid, error)
        if moved is not None:
            with contextlib.suppress(OSError):
                if parked is None and bad_file is not None and not bad_file.exists():
                    os.replace(moved, bad_file)  # the row is no longer ours: leave everything as it was
                else:
                    moved.unlink()
        self._open.discard(rid)
        self.parked += int(bool(parked))
        self.sent_back += int(parked is False)
        return bool(parked)

    def release(self, rids: Sequence[int]) -> None:
        db.release(self.conn, self.stage, self.owner, rids)
        self._open.difference_update(rids)


class Heartbeat:
    """A small JSON file per worker (`<home>/.run/<name>.heartbeat`) that the monitor watches."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.path = Path(run_dir) / f"{name}.heartbeat"
        self.started = time.time()
        self.beats = 0

    def beat(self, **info: Any) -> None:
        self.beats += 1
        payload = {"pid": os.getpid(), "ts": time.time(), "started": self.started, "beats": self.beats, **info}
        try:
            atomic_write_text(self.path, json.dumps(payload))
        except OSError as exc:  # a full disk must not kill the worker; the monitor will notice
            log.warning("heartbeat not written: %s", exc)

    @staticmethod
    def read(run_dir: Path, name: str) -> dict[str, Any] | None:
        """One heartbeat file as written by `beat`, with `_name` added; None when absent or unreadable."""
        try:
            hb = json.loads((Path(run_dir) / f"{name}.heartbeat").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(hb, dict):
            return None
        hb["_name"] = name
        return hb

    @staticmethod
    def scan(run_dir: Path) -> list[dict[str, Any]]:
        """Every readable heartbeat in `run_dir` (what the monitor checks each tick)."""
        try:
            names = [p.name[: -len(".heartbeat")] for p in Path(run_dir).glob("*.heartbeat")]
        except OSError:
            return []
        return [hb for hb in (Heartbeat.read(run_dir, n) for n in names) if hb is not None]


def run_loop(
    run_batch: Callable[[], int],
    stopper: Stopper,
    *,
    watch: bool,
    heartbeat: Heartbeat | None = None,
    poll_s: float = 10.0,
    idle_log_s: float = 300.0,
    logger: logging.Logger = log,
) -> int:
    """Drive a stage until it runs out of work (or, with `watch`, until told to stop). Returns rows handled."""
    total = 0
    last_idle_log = 0.0
    while not stopper.should_stop():
        if heartbeat is not None:
            heartbeat.beat(rows=total)
        n = run_batch()
        total += n
        if n:
            continue
        if not watch:
            logger.info("no work left; exiting (use --watch to keep polling)")
            break
        if time.monotonic() - last_idle_log >= idle_log_s:
            logger.info("no work ready; polling every %.0fs", poll_s)
            last_idle_log = time.monotonic()
        if stopper.wait(poll_s):
            break
    if stopper.reason:
        logger.info("stopping: %s", stopper.reason)
    if heartbeat is not None:
        heartbeat.beat(rows=total, stopped=True)
    return total
