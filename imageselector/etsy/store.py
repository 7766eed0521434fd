"""Storing what the API returns: idempotent upserts into listings, shops, reviews and image_status.

Reads only fields the OAS subset declares. Each write runs in one BEGIN IMMEDIATE transaction, together
with the crawl-state change that records it as done (a cursor, a shop's state), so a `kill -9` leaves
either both or neither, and a repeated write changes nothing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from imageselector import db
from imageselector.cdn import parse_image_url
from imageselector.money import money

log = logging.getLogger(__name__)

IMAGE_URL_KEYS = ("url_fullxfull", "url_570xN")  # the sizes hex/suffix are parsed from, best first


def _currency(price: Any) -> str | None:
    return price.get("currency_code") if isinstance(price, dict) else None


def _bool(v: Any) -> int | None:
    return None if v is None else int(bool(v))


def _json_list(v: Any) -> str:
    return json.dumps(list(v) if isinstance(v, list) else [], ensure_ascii=False)


@dataclass
class WriteResult:
    """What one write added."""

    listings_new: int = 0
    listings_seen: int = 0
    shops_new: list[int] = field(default_factory=list)
    images_new: int = 0
    reviews_new: int = 0
    bad: int = 0


@db.retry_on_lock
def in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """Run `fn(conn)` under BEGIN IMMEDIATE (retried whole on 'database is locked')."""
    with db.Transaction(conn):
        return fn(conn)


# ---- listings ------------------------------------------------------------------------------------

_LISTING_SQL = """
INSERT INTO listings (listing_id, shop_id, title, description, url, tags, materials, when_made, taxonomy_id,
    who_made, is_supply, currency_code, created_timestamp, original_creation_timestamp, last_seen)
VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT(listing_id) DO UPDATE SET shop_id=excluded.shop_id, title=excluded.title,
    description=excluded.description, url=excluded.url, tags=excluded.tags, materials=excluded.materials,
    when_made=excluded.when_made, taxonomy_id=excluded.taxonomy_id, who_made=excluded.who_made,
    is_supply=excluded.is_supply, currency_code=excluded.currency_code,
    created_timestamp=excluded.created_timestamp,
    original_creation_timestamp=excluded.original_creation_timestamp, last_seen=excluded.last_seen
"""


def write_listings(
    conn: sqlite3.Connection,
    listings: Iterable[dict[str, Any]],
    *,
    snapshot_every_s: float | None,
    now: float | None = None,
) -> WriteResult:
    """Upsert listings (static fields), a dynamic snapshot when the last one is older than
    `snapshot_every_s` (None: no snapshot here), and a pending shop row for every shop not seen before.
    Call inside a transaction."""
    now = time.time() if now is None else now
    res = WriteResult()
    for lst in listings:
        lid, sid = lst.get("listing_id"), lst.get("shop_id")
        if not isinstance(lid, int) or not isinstance(sid, int):
            res.bad += 1
            _bad(conn, "listing", str(lid), f"listing without integer listing_id/shop_id: {str(lst)[:300]}")
            continue
        res.listings_seen += 1
        prev = conn.execute("SELECT last_snapshot_at FROM listings WHERE listing_id=?", (lid,)).fetchone()
        if prev is None:
            res.listings_new += 1
        price = lst.get("price")
        conn.execute(
            _LISTING_SQL,
            (
                lid,
                sid,
                lst.get("title"),
                lst.get("description"),
                lst.get("url"),
                _json_list(lst.get("tags")),
                _json_list(lst.get("materials")),
                lst.get("when_made"),
                lst.get("taxonomy_id"),
                lst.get("who_made"),
                _bool(lst.get("is_supply")),
                _currency(price),
                lst.get("created_timestamp"),
                lst.get("original_creation_timestamp"),
                now,
            ),
        )
        last_snap = prev["last_snapshot_at"] if prev is not None else None
        if snapshot_every_s is not None and (last_snap is None or last_snap <= now - snapshot_every_s):
            write_listing_snapshot(conn, lst, now)
        if conn.execute("INSERT OR IGNORE INTO shops(shop_id) VALUES (?)", (sid,)).rowcount:
            res.shops_new.append(sid)
    return res


def write_listing_snapshot(conn: sqlite3.Connection, lst: dict[str, Any], now: float) -> None:
    """One listings_dynamic row (views only where the API sent it: it is tabulated daily and optional)."""
    views = lst.get("views")
    conn.execute(
        "INSERT OR IGNORE INTO listings_dynamic (listing_id, snapshot_timestamp, state, quantity, num_favorers,"
        " views, price) VALUES (?,?,?,?,?,?,?)",
        (
            lst["listing_id"],
            int(now),
            lst.get("state"),
            lst.get("quantity"),
            lst.get("num_favorers"),
            views if isinstance(views, int) else None,
            money(lst.get("price")),
        ),
    )
    conn.execute("UPDATE listings SET last_snapshot_at=? WHERE listing_id=?", (now, lst["listing_id"]))


# ---- images --------------------------------------------------------------------------------------


def image_rows(conn: sqlite3.Connection, lst: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """image_status rows for one listing with `images`, and how many images had unusable URLs
    (each recorded in bad_records)."""
    images = lst.get("images")
    if not isinstance(images, list):
        return [], 0
    lid = lst["listing_id"]
    ranked = [im for im in images if isinstance(im, dict) and isinstance(im.get("rank"), int)]
    primary_rank = 1 if any(im["rank"] == 1 for im in ranked) else min((im["rank"] for im in ranked), default=None)
    price = money(lst.get("price"))
    rows, bad = [], 0
    for im in images:
        if not isinstance(im, dict):
            bad += 1
            continue
        image_id = im.get("listing_image_id")
        parts = None
        problems = []
        for key in IMAGE_URL_KEYS:
            url = im.get(key)
            try:
                p = parse_image_url(url)
            except ValueError:
                problems.append(f"{key}={url!r}")
                continue
            if p.image_id != image_id:
                problems.append(f"{key} names image {p.image_id}, not {image_id}")
                continue
            parts = p
            break
        if parts is None:
            bad += 1
            _bad(conn, "image_url", f"{lid}/{image_id}", "; ".join(problems))
            continue
        rows.append(
            {
                "listing_id": lid,
                "image_id": image_id,
                # The CDN path's shop id: it is what the downloader rebuilds the URL from.
                "shop_id": parts.shop_id,
                "hex": parts.hex,
                "suffix": parts.suffix,
                "is_primary": int(primary_rank is not None and im.get("rank") == primary_rank),
                "when_made": lst.get("when_made"),
                "price": price,
            }
        )
    return rows, bad


def _bad(conn: sqlite3.Connection, kind: str, ref: str, detail: str) -> None:
    """Record bad input inside the caller's transaction (db.record_bad opens its own)."""
    log.warning("bad %s %s: %s", kind, ref, detail[:200])
    conn.execute("INSERT INTO bad_records(kind, ref, detail) VALUES (?,?,?)", (kind, ref, detail[:2000]))


# ---- shops and reviews ---------------------------------------------------------------------------

_SHOP_SQL = """
INSERT INTO shops (shop_id, shop_name, user_id, create_date, url, shop_location_country_iso,
    shipping_from_country_iso, currency_code)
VALUES (?,?,?,?,?,?,?,?)
ON CONFLICT(shop_id) DO UPDATE SET shop_name=excluded.shop_name, user_id=excluded.user_id,
    create_date=excluded.create_date, url=excluded.url,
    shop_location_country_iso=excluded.shop_location_country_iso,
    shipping_from_country_iso=excluded.shipping_from_country_iso, currency_code=excluded.currency_code
"""


def write_shop(conn: sqlite3.Connection, shop: dict[str, Any], now: float | None = None) -> None:
    """Upsert the shop's static fields and add one shops_dynamic snapshot. Call inside a transaction."""
    now = time.time() if now is None else now
    sid = shop["shop_id"]
    conn.execute(
        _SHOP_SQL,
        (
            sid,
            shop.get("shop_name"),
            shop.get("user_id"),
            shop.get("create_date"),
            shop.get("url"),
            shop.get("shop_location_country_iso"),
            shop.get("shipping_from_country_iso"),
            shop.get("currency_code"),
        ),
    )
    avg = shop.get("review_average")
    conn.execute(
        "INSERT OR IGNORE INTO shops_dynamic (shop_id, snapshot_timestamp, listing_active_count, num_favorers,"
        " review_count, review_average, transaction_sold_count) VALUES (?,?,?,?,?,?,?)",
        (
            sid,
            int(now),
            shop.get("listing_active_count"),
            shop.get("num_favorers"),
            shop.get("review_count"),
            float(avg) if isinstance(avg, int | float) else None,
            shop.get("transaction_sold_count"),
        ),
    )
    conn.execute("UPDATE shops SET last_snapshot_at=? WHERE shop_id=?", (now, sid))


def review_key(shop_id: int, r: dict[str, Any]) -> str:
    """A review's natural key: one review per transaction; create time guards against reused ids.
    Mutable fields (text, rating, buyer, update time) are left out so an edit updates, never duplicates."""
    created = r.get("create_timestamp", r.get("created_timestamp"))
    return f"{shop_id}:{r.get('listing_id')}:{r.get('transaction_id')}:{created}"


def write_reviews(conn: sqlite3.Connection, shop_id: int, reviews: Iterable[dict[str, Any]]) -> int:
    """Upsert reviews on their natural key. Returns how many were new. Call inside a transaction."""
    new = 0
    for r in reviews:
        if not isinstance(r, dict):
            continue
        key = review_key(shop_id, r)
        if conn.execute("SELECT 1 FROM reviews WHERE natural_key=?", (key,)).fetchone() is None:
            new += 1
        conn.execute(
            "INSERT INTO reviews (shop_id, listing_id, transaction_id, buyer_user_id, rating, review, language,"
            " create_timestamp, update_timestamp, natural_key) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(natural_key) DO UPDATE SET buyer_user_id=excluded.buyer_user_id, rating=excluded.rating,"
            " review=excluded.review, language=excluded.language, update_timestamp=excluded.update_timestamp",
            (
                shop_id,
                r.get("listing_id"),
                r.get("transaction_id"),
                r.get("buyer_user_id"),
                r.get("rating"),
                r.get("review"),
                r.get("language"),
                r.get("create_timestamp", r.get("created_timestamp")),
                r.get("update_timestamp", r.get("updated_timestamp")),
                key,
            ),
        )
    return new
