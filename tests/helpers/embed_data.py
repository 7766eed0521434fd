"""Seed a data home with bg-removed images, their files and listings, for the embed tests and bench."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
from PIL import Image

from imageselector import db
from imageselector.layout import image_path
from tests.helpers.rows import image_rows


def make_jpeg(path: Path, seed: int, size: tuple[int, int] = (320, 256)) -> None:
    """A small, distinct JPEG: a colour gradient plus noise, different per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = (base + (xx[..., None] * rng.uniform(0, 0.6, 3)) + (yy[..., None] * rng.uniform(0, 0.6, 3))) % 255
    arr = arr + rng.normal(0, 12, (h, w, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)


def seed_embeddable(
    conn: sqlite3.Connection, images_dir: Path, n: int, *, per_listing: int = 3, size: tuple[int, int] = (320, 256)
) -> list[sqlite3.Row]:
    """n images ready for embedding (downloaded, bg removed), files on disk, listings with title and tags."""
    rows = image_rows(n, per_listing=per_listing)
    db.upsert_images(conn, rows)
    conn.execute("UPDATE image_status SET to_download=0, download_done=1, bg_removed=1")
    for r in rows:
        make_jpeg(image_path(images_dir, r["listing_id"], r["image_id"]), r["image_id"], size)
    for lid in sorted({r["listing_id"] for r in rows}):
        conn.execute(
            "INSERT OR IGNORE INTO listings(listing_id, shop_id, title, tags) VALUES (?,?,?,?)",
            (lid, 77, f"handmade ceramic mug {lid}", json.dumps(["mug", "ceramic", f"tag{lid % 7}"])),
        )
    return conn.execute("SELECT rowid AS rid, * FROM image_status ORDER BY gid").fetchall()
