"""One listing as the detail view shows it: its photos, its figures over time, its shop's figures.

Read-only over the crawl's tables: `listings` + `image_status` (photos), `listings_dynamic` (one row per
snapshot: price, favorers, views, quantity, state), `shops` + `shops_dynamic` (the shop's snapshots).
"""

from __future__ import annotations

import sqlite3

from imageselector.search.listings import ETSY_LISTING_URL
from imageselector.search.market import Converter, snapshots_of


def listing_detail(conn: sqlite3.Connection, listing_id: int, converter: Converter) -> dict | None:
    """Everything the detail view shows, or None when the database knows no such listing."""
    lid = int(listing_id)
    row = conn.execute(
        "SELECT listing_id, shop_id, title, url, tags, materials, when_made, currency_code FROM listings"
        " WHERE listing_id=?",
        (lid,),
    ).fetchone()
    photos = [
        {"image_id": int(r[0]), "is_primary": bool(r[1]), "url": f"/image/{lid}/{int(r[0])}"}
        for r in conn.execute(
            "SELECT image_id, COALESCE(is_primary, 0) FROM image_status WHERE listing_id=?"
            " ORDER BY COALESCE(is_primary, 0) DESC, image_id",
            (lid,),
        )
    ]
    if row is None and not photos:
        return None
    shop_id = row[1] if row is not None else None
    if shop_id is None:
        got = conn.execute("SELECT shop_id FROM image_status WHERE listing_id=? LIMIT 1", (lid,)).fetchone()
        shop_id = got[0] if got else None
    currency = row[7] if row is not None else None
    shop = None
    if shop_id is not None:
        s = conn.execute(
            "SELECT shop_id, shop_name, url, shop_location_country_iso, currency_code FROM shops WHERE shop_id=?",
            (shop_id,),
        ).fetchone()
        snaps = [
            {
                "t": int(r[0]),
                "listing_active_count": r[1],
                "num_favorers": r[2],
                "review_count": r[3],
                "review_average": r[4],
                "transaction_sold_count": r[5],
            }
            for r in conn.execute(
                "SELECT snapshot_timestamp, listing_active_count, num_favorers, review_count, review_average,"
                " transaction_sold_count FROM shops_dynamic WHERE shop_id=? ORDER BY snapshot_timestamp",
                (shop_id,),
            )
        ]
        shop = {
            "shop_id": int(shop_id),
            "shop_name": s[1] if s else None,
            "url": s[2] if s else None,
            "country": s[3] if s else None,
            "currency": s[4] if s else None,
            "latest": snaps[-1] if snaps else None,
            "snapshots": snaps,
        }
        if currency is None and s is not None:
            currency = s[4]
    snapshots = [
        {
            "t": int(t),
            "price": price,
            "price_converted": converter.convert(price, currency),
            "num_favorers": fav,
            "views": views,
            "quantity": qty,
            "state": state,
        }
        for t, price, fav, views, qty, state in snapshots_of(conn, [lid])[lid]
    ]
    latest_price = next((s["price"] for s in reversed(snapshots) if s["price"] is not None), None)
    return {
        "listing_id": lid,
        "title": row[2] if row is not None else None,
        "url": (row[3] if row is not None and row[3] else None) or ETSY_LISTING_URL.format(listing_id=lid),
        "tags": row[4] if row is not None else None,
        "when_made": row[6] if row is not None else None,
        "currency": currency,
        "price": latest_price,
        "price_converted": converter.convert(latest_price, currency),
        "display_currency": converter.currency,
        "photos": photos,
        "snapshots": snapshots,
        "shop": shop,
    }
