"""Helpers for the sync tests: point settings at a simulator, and the catalogue's ground truth."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from imageselector.config import Settings, load_settings
from imageselector.etsy.store import review_key

FAST = {
    "ETSY_KEYWORDS": "",  # one root partition: the whole catalogue, split by price
    "ETSY_TIMEOUT_S": "0.5",
    "ETSY_BACKOFF_BASE_S": "0.02",
    "ETSY_MAX_RETRIES": "6",
    "ETSY_STATS_INTERVAL_S": "0.2",
    "ETSY_LOG_INTERVAL_S": "2",
    "ETSY_IDLE_POLL_S": "0.5",
}


def sync_env(sim: Any, home: Path, **extra: str) -> dict[str, str]:
    """Environment variables that point sync at `sim` with a data home `home`."""
    env = {
        "IMAGESELECTOR_HOME": str(home),
        "ETSY_API_BASE": sim.api_base,
        "ETSY_API_KEY": sim.api_key,
        "ETSY_SHARED_SECRET": sim.shared_secret,
        "ETSY_MAX_OFFSET": str(sim.max_offset),
        **FAST,
    }
    env.update(extra)
    return env


def sim_settings(sim: Any, home: Path, monkeypatch: Any, qps: float = 500.0, **extra: str) -> Settings:
    """Settings for an in-process sync against `sim`, with qps_config.json at `qps`."""
    for k, v in sync_env(sim, home, **extra).items():
        monkeypatch.setenv(k, v)
    write_qps(home, qps)
    return load_settings(home)


def write_qps(home: Path, qps: float) -> None:
    cfg = {"qps": qps, "min_qps": 0.5, "max_qps": max(qps, 10.0), "updated_at": time.time(), "reason": "test"}
    (Path(home) / "qps_config.json").write_text(json.dumps(cfg))


def subprocess_env(sim: Any, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETSY_")}
    env.update(sync_env(sim, home, **extra))
    return env


def quiet_logger() -> logging.Logger:
    return logging.getLogger("test_sync")


# ---- ground truth ------------------------------------------------------------------------------


def expected_images(cat: Any) -> dict[tuple[int, int], dict[str, Any]]:
    """(listing_id, image_id) -> the image_status fields a complete crawl must store."""
    out = {}
    for i in range(cat.n):
        if not cat.active[i]:
            continue
        lid = int(cat.listing_ids[i])
        shop_id = int(cat.shop_ids[int(cat.shop_of[i])])
        start, end = int(cat.img_start[i]), int(cat.img_start[i + 1])
        for j in range(start, end):
            out[(lid, int(cat.image_ids[j]))] = {
                "shop_id": shop_id,
                "hex": cat.image_hex(j),
                "suffix": cat.image_suffix(j),
                "is_primary": int(j == start),
                "when_made": cat.when_made(i),
                "price": int(cat.price[i]) / 100,
            }
    return out


def expected_review_keys(cat: Any) -> set[str]:
    keys = set()
    for shop_id in cat.shops_with_active_listings():
        s = cat.shop_index(shop_id)
        for r in cat.reviews(s):
            keys.add(review_key(shop_id, r))
    return keys


def assert_complete(conn: sqlite3.Connection, cat: Any) -> None:
    """Everything the active-listing endpoints expose is stored, exactly once."""
    want_listings = set(cat.active_listing_ids())
    got_listings = [r[0] for r in conn.execute("SELECT listing_id FROM listings")]
    assert len(got_listings) == len(set(got_listings))
    missing = want_listings - set(got_listings)
    assert not missing, f"{len(missing)} listings never stored, e.g. {sorted(missing)[:5]}"
    assert set(got_listings) == want_listings
    # one dynamic snapshot per listing (the snapshot interval has not passed)
    snaps = conn.execute("SELECT listing_id, COUNT(*) FROM listings_dynamic GROUP BY listing_id").fetchall()
    assert {r[0] for r in snaps} == want_listings
    assert all(r[1] == 1 for r in snaps)
    views = dict(conn.execute("SELECT listing_id, views FROM listings_dynamic").fetchall())
    for i in range(cat.n):
        if cat.active[i]:
            lid = int(cat.listing_ids[i])
            assert views[lid] == (int(cat.views[i]) if cat.views_known(i) else None), lid
    # images: every one, with the URL's hex/suffix, primary = rank 1, price in currency units
    want = expected_images(cat)
    rows = conn.execute(
        "SELECT listing_id, image_id, shop_id, hex, suffix, is_primary, when_made, price, to_download, gid"
        " FROM image_status"
    ).fetchall()
    got = {(r["listing_id"], r["image_id"]): r for r in rows}
    assert len(got) == len(rows) == len(want)
    assert set(got) == set(want)
    for key, w in want.items():
        r = got[key]
        assert (r["shop_id"], r["hex"], r["suffix"], r["is_primary"], r["when_made"]) == (
            w["shop_id"],
            w["hex"],
            w["suffix"],
            w["is_primary"],
            w["when_made"],
        ), key
        assert abs(r["price"] - w["price"]) < 1e-9 and r["to_download"] == 1
    gids = sorted(r["gid"] for r in rows)
    assert gids == list(range(len(rows))), "gids must be dense: no insert was repeated"
    # shops: all crawled, with their names
    want_shops = set(cat.shops_with_active_listings())
    got_shops = {
        r[0]: r[1] for r in conn.execute("SELECT shop_id, shop_name FROM shops WHERE crawl_state='done'").fetchall()
    }
    assert set(got_shops) == want_shops
    for sid in list(want_shops)[:20]:
        assert got_shops[sid] == cat.shop_name(cat.shop_index(sid))
    assert conn.execute("SELECT COUNT(*) FROM shops WHERE crawl_state != 'done'").fetchone()[0] == 0
    dyn = conn.execute("SELECT shop_id, COUNT(*) FROM shops_dynamic GROUP BY shop_id").fetchall()
    assert {r[0] for r in dyn} == want_shops and all(r[1] == 1 for r in dyn)
    # reviews: complete, deduplicated
    keys = [r[0] for r in conn.execute("SELECT natural_key FROM reviews")]
    assert len(keys) == len(set(keys))
    assert set(keys) == expected_review_keys(cat)
