"""Shared checks for the downloader tests: rows, the URL path of a row, and "flags == files"."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

from imageselector import layout
from imageselector.cdn import build_image_url
from imageselector.imagecheck import check_image


def row_path(row: sqlite3.Row | dict, size: str = "570xN") -> str:
    """The CDN path the downloader will request for a row."""
    url = build_image_url("http://x", row["shop_id"], row["hex"], row["image_id"], row["suffix"], size)
    return urlsplit(url).path


def all_rows(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT rowid AS rid, * FROM image_status ORDER BY rowid").fetchall()


def files_under(images_dir: Path) -> set[Path]:
    return {p for p in images_dir.rglob("*") if p.is_file()} if images_dir.exists() else set()


def assert_flags_match_files(conn: sqlite3.Connection, images_dir: Path) -> None:
    """Every download_done=1 row has a whole image at its path, and every file under images/ is such a row's."""
    rows = all_rows(conn)
    flagged = {layout.image_path(images_dir, r["listing_id"], r["image_id"]) for r in rows if r["download_done"]}
    on_disk = files_under(images_dir)
    assert on_disk == flagged, (
        f"files without flag: {sorted(on_disk - flagged)[:3]}; flags without file: {sorted(flagged - on_disk)[:3]}"
    )
    for p in on_disk:
        verdict = check_image(p.read_bytes())
        assert verdict.ok, f"{p}: {verdict.detail}"
    claimed = [r["rid"] for r in rows if r["download_claim"] is not None]
    assert not claimed, f"rows still claimed: {claimed[:5]}"


def catalogue_rows(cat, n: int | None = None) -> list[dict]:  # type: ignore[no-untyped-def]
    """image_status rows for the first `n` images of a simulator Catalogue, as the crawler would store them."""
    rows = []
    for j in range(len(cat.image_ids) if n is None else n):
        i = cat.listing_of_image(j)
        rows.append(
            dict(
                listing_id=int(cat.listing_ids[i]),
                image_id=int(cat.image_ids[j]),
                shop_id=int(cat.shop_ids[int(cat.shop_of[i])]),
                hex=cat.image_hex(j),
                suffix=cat.image_suffix(j),
                is_primary=int(j == int(cat.img_start[i])),
                when_made=None,
                price=None,
            )
        )
    return rows
