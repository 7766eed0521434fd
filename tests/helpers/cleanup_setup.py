"""A small catalogue whose images are all embedded, with real files, for the cleanup tests."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from imageselector import db
from imageselector.layout import image_path
from tests.helpers.rows import seed_images

EMBED_SET = ", ".join(f"embed_{m}=1" for m in db.EMBED_MODELS)


def make_catalogue(conn: sqlite3.Connection, images_dir: Path, n: int = 12, size: int = 20_000) -> dict[tuple, bytes]:
    """n images, 3 per listing (first primary), all downloaded, bg-removed and embedded. Returns their bytes."""
    seed_images(conn, n)
    conn.execute(f"UPDATE image_status SET to_download=0, download_done=1, bg_removed=1, {EMBED_SET}")
    rng = random.Random(7)
    content = {}
    for r in conn.execute("SELECT listing_id, image_id FROM image_status"):
        data = rng.randbytes(size + rng.randrange(1000))
        p = image_path(images_dir, r["listing_id"], r["image_id"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        content[(r["listing_id"], r["image_id"])] = data
    return content


def rows(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM image_status ORDER BY rowid").fetchall()


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def tmpfs(base: Path, size: str = "2m") -> Iterator[Path | None]:
    """A fresh tmpfs mounted at base/<name> (root only); yields None when mounting is not permitted."""
    mnt = base / f"tmpfs_{uuid.uuid4().hex[:6]}"
    mnt.mkdir(parents=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        yield None
        return
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@contextlib.contextmanager
def other_filesystem(base: Path) -> Iterator[Path | None]:
    """A folder on a filesystem other than base's: a fresh tmpfs, else one under /dev/shm; None if neither."""
    with tmpfs(base, "64m") as mnt:
        if mnt is not None:
            yield mnt
            return
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(base).st_dev:
        d = shm / f"cleanup_test_{uuid.uuid4().hex[:8]}"
        d.mkdir()
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return
    yield None
