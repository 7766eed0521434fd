"""Warnings about the data home itself, for `image_db.py` and the monitor: a missing images/, a full disk.

Both are conditions a person must act on (mount the disk, free space) that the counters alone hide.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from imageselector.config import Settings
from imageselector.fsutil import free_mb

MONITOR_STATE = ".run/pipeline_monitor.state.json"  # monitor/stage.py STATE_FILE (status does not import the monitor)


def downloaded_here(conn: sqlite3.Connection) -> int:
    """Rows whose file should be in images/ (downloaded and not moved to the backup disk)."""
    return int(
        conn.execute("SELECT COUNT(*) FROM image_status WHERE download_done=1 AND archived_at IS NULL").fetchone()[0]
    )


def images_missing(settings: Settings, conn: sqlite3.Connection) -> str | None:
    """A warning when images/ is gone while rows say their file is there (an unmounted disk, a moved folder)."""
    if settings.images_dir.is_dir():
        return None
    n = downloaded_here(conn)
    if not n:
        return None
    return (
        f"{settings.images_dir} is missing but {n:,} rows say downloaded: is the disk mounted? "
        f"The downloader refuses to start until it is back (to download them all again instead: "
        f"scripts/image_downloader.py --refetch-missing)"
    )


def monitor_state(settings: Settings) -> dict[str, Any]:
    try:
        data = json.loads((settings.home / MONITOR_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def disk_warning(settings: Settings, floor_mb: float | None = None) -> str | None:
    """The monitor's pause for disk space (from its state file), else free space below the floor right now."""
    state = monitor_state(settings)
    disk = state.get("disk") if isinstance(state.get("disk"), dict) else {}
    if disk.get("paused") and not state.get("exited_at"):
        since = disk.get("since")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(since)) if isinstance(since, int | float) else "?"
        return (
            f"DISK FULL: the pipeline monitor paused every stage at {when} ({disk.get('reason', '')}); it resumes "
            f"by itself at {disk.get('resume_free_mb', 0):,.0f} MB free: free space under {settings.home}"
        )
    if floor_mb is None:
        floor_mb = disk.get("min_free_mb") if isinstance(disk.get("min_free_mb"), int | float) else None
    if floor_mb is None:
        try:
            floor_mb = float(settings.get("MIN_FREE_MB") or 2048)
        except ValueError:
            floor_mb = 2048.0
    free = free_mb(settings.home, settings.images_dir, settings.embeddings_dir)
    if free < floor_mb:
        return (
            f"disk nearly full: {free:,.0f} MB free under {settings.home}, below the floor of {floor_mb:,.0f} MB "
            f"(MIN_FREE_MB): the pipeline monitor pauses every stage until there is more"
        )
    return None


def home_warnings(settings: Settings, conn: sqlite3.Connection) -> list[str]:
    disk = disk_warning(settings) if settings.writable() else None  # nothing writes to a read-only home
    return [w for w in (images_missing(settings, conn), disk) if w]
