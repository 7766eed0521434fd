"""What the search shows about a hit, read from the status database (read-only).

The database is the truth for gid -> (listing_id, image_id): every image_status row carries its gid,
and the lookups below touch only the few hundred hits of one query through indexed columns.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imageselector import db
from imageselector.layout import locate_image

ETSY_LISTING_URL = "https://www.etsy.com/listing/{listing_id}"
CHUNK = 500


@dataclass
class ListingCard:
    listing_id: int
    title: str | None
    price: float | None
    currency: str | None
    shop_id: int | None
    shop_name: str | None
    url: str
    primary_image_id: int | None

    def to_dict(self) -> dict:
        return dict(vars(self))  # flat fields: dataclasses.asdict's deep copy cost 0.2 ms a card (bench/search.py)


def connect_readonly(db_path: Path) -> sqlite3.Connection:
    """A read-only connection (the search never writes), refusing a missing database with a clear message."""
    if not Path(db_path).exists():
        raise FileNotFoundError(f"no database at {db_path}: run sync_data.py first")
    return db.connect(db_path, migrate=False, readonly=True)


def _chunks(values: list[int]) -> Iterable[list[int]]:
    for i in range(0, len(values), CHUNK):
        yield values[i : i + CHUNK]


def locate_gids(conn: sqlite3.Connection, gids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """gid -> (listing_id, image_id) for the gids the database knows."""
    wanted = sorted({int(g) for g in gids if int(g) >= 0})
    out: dict[int, tuple[int, int]] = {}
    for part in _chunks(wanted):
        marks = ",".join("?" * len(part))
        for r in conn.execute(f"SELECT gid, listing_id, image_id FROM image_status WHERE gid IN ({marks})", part):
            out[int(r[0])] = (int(r[1]), int(r[2]))
    return out


def listing_photos(conn: sqlite3.Connection, listing_ids: Iterable[int]) -> dict[int, list[tuple[int, int]]]:
    """listing_id -> [(gid, image_id)] of every photo the database knows for these listings."""
    ids = sorted({int(i) for i in listing_ids})
    out: dict[int, list[tuple[int, int]]] = {}
    for part in _chunks(ids):
        marks = ",".join("?" * len(part))
        for r in conn.execute(
            f"SELECT listing_id, gid, image_id FROM image_status WHERE listing_id IN ({marks}) AND gid IS NOT NULL",
            part,
        ):
            out.setdefault(int(r[0]), []).append((int(r[1]), int(r[2])))
    return out


def listing_cards(conn: sqlite3.Connection, listing_ids: Iterable[int]) -> dict[int, ListingCard]:
    """Title, latest price, shop and primary image of each listing (missing parts are None)."""
    ids = list(dict.fromkeys(int(i) for i in listing_ids))
    cards: dict[int, ListingCard] = {
        i: ListingCard(i, None, None, None, None, None, ETSY_LISTING_URL.format(listing_id=i), None) for i in ids
    }
    for part in _chunks(ids):
        marks = ",".join("?" * len(part))
        for r in conn.execute(
            "SELECT l.listing_id, l.title, l.currency_code, l.shop_id, s.shop_name, l.url FROM listings l"
            f" LEFT JOIN shops s ON s.shop_id = l.shop_id WHERE l.listing_id IN ({marks})",
            part,
        ):
            c = cards[int(r[0])]
            c.title, c.currency, c.shop_id, c.shop_name = r[1], r[2], r[3], r[4]
            if r[5]:  # the listing's URL as the API gave it (in the demo: the simulator's)
                c.url = r[5]
        # primary image first, else the lowest image id; image_status carries price and shop too
        for r in conn.execute(
            "SELECT listing_id, image_id, price, shop_id FROM image_status"
            f" WHERE listing_id IN ({marks}) ORDER BY listing_id, COALESCE(is_primary, 0) DESC, image_id",
            part,
        ):
            c = cards[int(r[0])]
            if c.primary_image_id is None:
                c.primary_image_id = int(r[1])
                c.price = r[2]
                if c.shop_id is None:
                    c.shop_id = r[3]
        for lid in part:
            got = conn.execute(
                "SELECT price FROM listings_dynamic WHERE listing_id=? AND price IS NOT NULL"
                " ORDER BY snapshot_timestamp DESC LIMIT 1",
                (lid,),
            ).fetchone()
            if got is not None:
                cards[lid].price = got[0]
    missing_shops = {c.shop_id for c in cards.values() if c.shop_id is not None and c.shop_name is None}
    if missing_shops:
        marks = ",".join("?" * len(missing_shops))
        names = dict(
            conn.execute(f"SELECT shop_id, shop_name FROM shops WHERE shop_id IN ({marks})", list(missing_shops))
        )
        for c in cards.values():
            if c.shop_name is None and c.shop_id in names:
                c.shop_name = names[c.shop_id]
    return cards


def image_file(settings, conn: sqlite3.Connection, listing_id: int, image_id: int) -> Path | None:  # type: ignore[no-untyped-def]
    """The file of a catalogued image (in images/ or moved to the backup disk), or None.

    Paths come from the ids after a database lookup, never from a client.
    """

    row = conn.execute(
        "SELECT 1 FROM image_status WHERE listing_id=? AND image_id=?", (int(listing_id), int(image_id))
    ).fetchone()
    if row is None:
        return None
    return locate_image(settings, (int(listing_id), int(image_id)), conn)
