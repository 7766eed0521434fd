"""Build image_status rows for tests without running the crawler."""

from __future__ import annotations

import sqlite3

from imageselector import db


def image_rows(n: int, *, per_listing: int = 3, start_listing: int = 1000, shop_id: int = 77) -> list[dict]:
    rows = []
    for i in range(n):
        listing = start_listing + i // per_listing
        rows.append(
            dict(
                listing_id=listing,
                image_id=5_000_000 + i,
                shop_id=shop_id,
                hex=f"{i % 0xFFFFFF:06x}",
                suffix="ab12",
                is_primary=int(i % per_listing == 0),
                when_made="2020_2026",
                price=12.5,
            )
        )
    return rows


def seed_images(conn: sqlite3.Connection, n: int, **kw) -> int:
    return db.upsert_images(conn, image_rows(n, **kw))
