"""Reading a catalogued photo's file for the page, safely: regular files inside the image roots only.

Why: a photo's path is derived from ids looked up in the database (never from the client), but the
folders themselves may hold symlinks (a user's mistake, or a planted `images/12/34.jpg -> /etc/shadow`).
So a file is served only when its real path lies inside `images/` or a backup root, the final
component is opened with O_NOFOLLOW, it is a regular file, and the opened file is the one the real path
names (same device and inode: no swap between the check and the open).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from imageselector.layout import backup_roots
from imageselector.search.listings import image_file

MAX_FILE_BYTES = 64 << 20


def _inside(real: str, roots: list[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def image_roots(settings, conn: sqlite3.Connection | None) -> list[str]:  # type: ignore[no-untyped-def]
    roots = [settings.images_dir, *backup_roots(settings, conn)]
    return [os.path.realpath(r) for r in roots]


def read_image_file(settings, conn: sqlite3.Connection, listing_id: int, image_id: int) -> bytes | None:  # type: ignore[no-untyped-def]
    """The bytes of a catalogued photo, or None (not catalogued, not on disk, or not a safe regular file)."""
    path = image_file(settings, conn, listing_id, image_id)  # catalogued and located, or None
    if path is None:
        return None
    return read_inside(Path(path), image_roots(settings, conn))


def read_inside(path: Path, roots: list[str]) -> bytes | None:
    """Read `path` only if it is a regular file whose real path is inside one of `roots` (real paths)."""
    real = os.path.realpath(path)
    if not _inside(real, roots):
        return None
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            return None
        try:
            again = os.stat(real, follow_symlinks=False)
        except OSError:
            return None
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            return None
        return f.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES]
