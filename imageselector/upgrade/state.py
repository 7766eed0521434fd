"""The upgrade's progress marker and its crash-test hook.

The marker is the kv row `upgrade_home` (db.KV_UPGRADE): written in the same transaction as the new schema,
updated as each later step commits, deleted at the very end. While it exists every entry point refuses
the home (db.schema_state says UPGRADING), so a half-finished upgrade is never taken for a finished one.

The hook: `IMAGESELECTOR_UPGRADE_DIE_AFTER=N` SIGKILLs the process at its N-th step (`tick`), which lets
the tests hit every phase deterministically; `IMAGESELECTOR_UPGRADE_OPS_FILE=path` records how many
steps each phase took.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

from imageselector import db
from imageselector.fsutil import atomic_write_text

DIE_ENV = "IMAGESELECTOR_UPGRADE_DIE_AFTER"
SLEEP_ENV = "IMAGESELECTOR_UPGRADE_TICK_SLEEP"  # seconds per step: widens the window for kills by time
OPS_ENV = "IMAGESELECTOR_UPGRADE_OPS_FILE"


def read_marker(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The marker's document, or None (no kv table, or no upgrade under way)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='kv'").fetchone() is None:
        return None
    raw = db.kv_get(conn, db.KV_UPGRADE)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {}
    return doc if isinstance(doc, dict) else {}


def write_marker(conn: sqlite3.Connection, doc: dict[str, Any]) -> None:
    """Store the marker inside the caller's transaction."""
    conn.execute(
        "INSERT INTO kv(key, value, updated_at) VALUES (?,?,?)"
        " ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
        (db.KV_UPGRADE, json.dumps(doc, sort_keys=True), time.time()),
    )


class Ops:
    """Counts the upgrade's steps; dies on the one named by the environment (tests only)."""

    def __init__(self) -> None:
        raw = os.environ.get(DIE_ENV, "")
        self.die_after = int(raw) if raw.isdigit() else 0
        self.sleep_s = float(os.environ.get(SLEEP_ENV) or 0)
        self.n = 0
        self.phases: dict[str, list[int]] = {}
        self.phase = "start"

    def enter(self, phase: str) -> None:
        self.phase = phase

    def tick(self) -> None:
        self.n += 1
        span = self.phases.setdefault(self.phase, [self.n, self.n])
        span[1] = self.n
        if self.die_after and self.n >= self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.sleep_s:
            time.sleep(self.sleep_s)

    def record(self) -> None:
        path = os.environ.get(OPS_ENV)
        if path:
            atomic_write_text(Path(path), json.dumps({"total": self.n, "phases": self.phases}))
