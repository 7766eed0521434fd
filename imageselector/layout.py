"""Where an image lives on disk, computed from (listing_id, image_id) alone.

`images/{image_id % 1000:03d}/{listing_id}_{image_id}.jpg`: a million images spread over 1,000
folders of about 1,000 files each (a flat folder of a million files is slow to list and to back up).
A moved image (scripts/cleanup_images.py) lives at the same relative path under the backup root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imageselector import db
from imageselector.config import Settings

log = logging.getLogger(__name__)

DEFAULT_DEST = "/Volumes/HDD_1000/embedded_backup/images/"
KV_DEST = "cleanup_dest"  # the backup root cleanup moves images to now
KV_DEST_HISTORY = "cleanup_dests"  # every backup root it ever moved images to (JSON list)


def image_relpath(listing_id: int, image_id: int) -> str:
    return f"{int(image_id) % 1000:03d}/{int(listing_id)}_{int(image_id)}.jpg"


def image_path(images_dir: Path, listing_id: int, image_id: int) -> Path:
    return Path(images_dir) / image_relpath(listing_id, image_id)


def dest_from_settings(settings: Settings, override: str | os.PathLike[str] | None = None) -> Path:
    return Path(override or settings.get("CLEANUP_DEST") or DEFAULT_DEST).expanduser()


_ROOTS_CACHE: dict[str, tuple[float, list[Path]]] = {}
_ROOTS_TTL_S = 30.0


def backup_roots(settings: Settings, conn: sqlite3.Connection | None = None) -> list[Path]:
    """Every backup destination images may have been moved to (recorded ones first, then the setting)."""
    key = str(settings.db_path)
    hit = _ROOTS_CACHE.get(key)
    if conn is None and hit is not None and time.monotonic() - hit[0] < _ROOTS_TTL_S:
        return hit[1]
    roots: list[str] = []
    own = None
    try:
        if conn is None and settings.db_path.exists():
            conn = own = db.connect(settings.db_path, readonly=True)
        if conn is not None:
            current = db.kv_get(conn, KV_DEST)
            if current:
                roots.append(current)
            with contextlib.suppress(ValueError, TypeError):
                roots += json.loads(db.kv_get(conn, KV_DEST_HISTORY) or "[]")
    except sqlite3.Error as exc:
        log.debug("backup roots not readable from the database: %s", exc)
    finally:
        if own is not None:
            own.close()
    roots.append(str(dest_from_settings(settings)))
    out: list[Path] = []
    for r in roots:
        p = Path(r)
        if p not in out:
            out.append(p)
    _ROOTS_CACHE[key] = (time.monotonic(), out)
    return out


def _ids(row_or_ids: Any) -> tuple[int, int]:
    if isinstance(row_or_ids, (sqlite3.Row, Mapping)):
        return int(row_or_ids["listing_id"]), int(row_or_ids["image_id"])
    listing_id, image_id = row_or_ids
    return int(listing_id), int(image_id)


def locate_image(settings: Settings, row_or_ids: Any, conn: sqlite3.Connection | None = None) -> Path | None:
    """Where an image's file is now: in images/, else at a backup location; None if nowhere.

    `row_or_ids` is a row/mapping with listing_id and image_id, or a (listing_id, image_id) pair.
    """
    listing_id, image_id = _ids(row_or_ids)
    local = image_path(settings.images_dir, listing_id, image_id)
    if local.is_file():
        return local
    rel = image_relpath(listing_id, image_id)
    for root in backup_roots(settings, conn):
        p = root / rel
        if p.is_file():
            return p
    return None
