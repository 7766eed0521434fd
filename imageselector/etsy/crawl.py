"""The crawl: discovery past the offset cap, the shop queue, image batches and periodic re-snapshots.

Discovery: `findAllListingsActive` reaches at most `max_offset + limit` listings per query, so the catalogue
is cut into partitions (rows of `crawl_partitions`): one root for all listings, one per configured keyword
and taxonomy id. A partition whose `count` is more than offsets can reach is split by price: first into the
configured bands, then by halving its price range, until each part fits (a range too narrow to halve is
paged as far as the cap allows and marked `capped`). Pages are sorted by `created` ascending, so new
listings land at the end and a later rediscovery pass continues from the saved cursor.

Every listing found queues its shop (`shops.crawl_state='pending'`); a shop crawl reads getShop, all its
active listings and its reviews, and stores them in one transaction. Images come 100 listings a call from
`getListingsByListingIds?includes=Images`; `listings.images_fetched_at` marks a listing done. All state is
in the database, and each step commits its data together with its cursor, so a restart resumes exactly.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageselector import db
from imageselector.etsy import store
from imageselector.etsy.client import ApiError, EtsyClient, RetriesExhausted

log = logging.getLogger(__name__)

KEYWORDS_FILE = Path(__file__).with_name("keywords.txt")
DEFAULT_PRICE_BANDS = (0, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 250, 500, 1000)
SHOP_MAX_ATTEMPTS = 3
IMAGE_MAX_ATTEMPTS = 3
PARTITION_MAX_FAILURES = 3  # pages that outlasted every retry, per partition and process


def _flag(raw: str | None) -> bool:
    return (raw or "").strip().lower() not in ("0", "false", "no", "off")


def _split_list(raw: str) -> list[str]:
    return [x.strip() for x in raw.replace("\n", ",").split(",") if x.strip()]


@dataclass
class CrawlConfig:
    """Crawl settings (see docs/sync.md); `from_settings` reads them from the environment / .env."""

    page_limit: int = 100
    max_offset: int = 12000
    keywords: list[str] = field(default_factory=list)
    taxonomy_ids: list[int] = field(default_factory=list)
    price_bands: tuple[float, ...] = DEFAULT_PRICE_BANDS
    include_all: bool = True
    snapshot_every_s: float = 24 * 3600.0
    rediscover_every_s: float = 6 * 3600.0
    concurrency: int = 8
    min_price_step: float = 0.01
    split: bool = True  # False: an over-full partition is paged to the cap only (a bounded crawl)
    crawl_shops: bool = True  # False: no per-shop listings/reviews (a bounded crawl)

    @property
    def reachable(self) -> int:
        """How many listings one query can page through: offsets 0..max_offset, `limit` each."""
        return self.max_offset + self.page_limit

    @classmethod
    def from_settings(cls, settings: Any) -> CrawlConfig:
        kw_raw = settings.get("ETSY_KEYWORDS")
        if kw_raw is None:
            path = Path(settings.get("ETSY_KEYWORDS_FILE") or KEYWORDS_FILE)
            try:
                kw_raw = "\n".join(
                    ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.lstrip().startswith("#")
                )
            except OSError as exc:
                raise SystemExit(f"keyword file {path} unreadable: {exc}") from exc
        bands_raw = settings.get("ETSY_PRICE_BANDS")
        bands = tuple(float(x) for x in _split_list(bands_raw)) if bands_raw else DEFAULT_PRICE_BANDS
        if list(bands) != sorted(set(bands)):
            raise SystemExit(f"ETSY_PRICE_BANDS must be increasing numbers, got {bands_raw!r}")
        tax_raw = settings.get("ETSY_TAXONOMY_IDS") or ""
        return cls(
            page_limit=max(1, min(100, settings.get_int("ETSY_PAGE_LIMIT", 100))),
            max_offset=settings.get_int("ETSY_MAX_OFFSET", 12000),
            keywords=_split_list(kw_raw),
            taxonomy_ids=[int(x) for x in _split_list(tax_raw)],
            price_bands=bands,
            include_all=_flag(settings.get("ETSY_CRAWL_ALL", "1")),
            snapshot_every_s=settings.get_float("ETSY_SNAPSHOT_INTERVAL_H", 24.0) * 3600.0,
            rediscover_every_s=settings.get_float("ETSY_REDISCOVER_INTERVAL_H", 6.0) * 3600.0,
            concurrency=max(1, settings.get_int("ETSY_CONCURRENCY", 8)),
            split=_flag(settings.get("ETSY_SPLIT_PARTITIONS", "1")),
            crawl_shops=_flag(settings.get("ETSY_CRAWL_SHOPS", "1")),
        )


def partition_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def label(params: dict[str, Any]) -> str:
    """A partition in words, for the log: `keywords 'mug', taxonomy 1062, price 10-20`."""
    parts = []
    if params.get("keywords"):
        parts.append(f"keywords {params['keywords']!r}")
    if params.get("taxonomy_id") is not None:
        parts.append(f"taxonomy {params['taxonomy_id']}")
    lo, hi = params.get("min_price"), params.get("max_price")
    if lo is not None or hi is not None:
        parts.append(f"price {lo or 0:g}-{'' if hi is None else f'{hi:g}'}")
    return ", ".join(parts) if parts else "all active listings"


@dataclass
class Counters:
    """What this run has done (for the log lines and the heartbeat)."""

    listings_new: int = 0
    listings_seen: int = 0
    images_new: int = 0
    shops_crawled: int = 0
    reviews_new: int = 0
    pages: int = 0
    bad: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ShopData:
    shop: dict[str, Any]
    listings: list[dict[str, Any]]
    reviews: list[dict[str, Any]]
    notes: list[str]


class Crawler:
    """One crawler over one database connection. `step()` does one unit of work; `run()` loops."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        client: EtsyClient,
        cfg: CrawlConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.conn = conn
        self.client = client
        self.cfg = cfg
        self.clock = clock
        self.counters = Counters()
        self._page_failures: dict[str, int] = {}

    # ---- partitions ----------------------------------------------------------------------------

    def seed_partitions(self) -> int:
        """Create the root partitions that are not there yet (new keywords join a running crawl)."""
        roots: list[dict[str, Any]] = []
        if self.cfg.include_all:
            roots.append({})
        roots += [{"keywords": k} for k in self.cfg.keywords]
        roots += [{"taxonomy_id": t} for t in self.cfg.taxonomy_ids]

        def add(conn: sqlite3.Connection) -> int:
            n = 0
            for p in roots:
                n += conn.execute(
                    "INSERT OR IGNORE INTO crawl_partitions(key, params, state) VALUES (?,?,'pending')",
                    (partition_key(p), json.dumps(p, sort_keys=True)),
                ).rowcount
            return n

        added = store.in_transaction(self.conn, add)
        if added:
            log.info("discovery: %d new root partitions", added)
        return added

    def split(self, params: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Child partitions covering `params` by price, or None when its price range cannot be halved."""
        lo, hi = params.get("min_price"), params.get("max_price")
        if lo is None and hi is None:
            edges = list(self.cfg.price_bands)
            kids = [{**params, "min_price": a, "max_price": b} for a, b in zip(edges, edges[1:], strict=False)]
            kids.append({**params, "min_price": edges[-1]})
            if edges[0] > 0:
                kids.insert(0, {**params, "max_price": edges[0]})
            return kids
        lo = lo or 0.0
        if hi is None:
            mid = max(2 * lo, lo + 1.0)
            return [{**params, "min_price": lo, "max_price": mid}, {**params, "min_price": mid}]
        if hi - lo < 2 * self.cfg.min_price_step:
            return None
        mid = round((lo + hi) / 2, 2)
        if not lo < mid < hi:
            return None
        return [{**params, "min_price": lo, "max_price": mid}, {**params, "min_price": mid, "max_price": hi}]

    def _page_params(self, params: dict[str, Any], offset: int) -> dict[str, Any]:
        q = {**params, "limit": self.cfg.page_limit, "offset": offset, "sort_on": "created", "sort_order": "asc"}
        if q.get("min_price") == 0:
            del q["min_price"]  # the same set, and no zero for a picky server to refuse
        return q

    def step_partitions(self) -> int:
        """Fetch the next pages of up to `concurrency` open partitions. Returns pages fetched."""
        rows = self.conn.execute(
            "SELECT rowid AS rid, key, params, state, next_offset, total_count FROM crawl_partitions"
            " WHERE state IN ('pending', 'paging') ORDER BY rowid LIMIT ?",
            (self.cfg.concurrency,),
        ).fetchall()
        if not rows:
            return 0
        plan: list[tuple[sqlite3.Row, int]] = []
        budget = self.cfg.concurrency
        for r in rows:
            if budget <= 0:
                break
            off = r["next_offset"]
            if off > self.cfg.max_offset:  # paged as far as offsets go without learning its size
                store.in_transaction(
                    self.conn,
                    lambda c, k=r["key"]: c.execute(
                        "UPDATE crawl_partitions SET state='capped', updated_at=? WHERE key=?", (self.clock(), k)
                    ),
                )
                continue
            if r["total_count"] is None or r["state"] == "pending":
                plan.append((r, off))
                budget -= 1
                continue
            while budget > 0 and off < r["total_count"] and off <= self.cfg.max_offset:
                plan.append((r, off))
                off += self.cfg.page_limit
                budget -= 1
        if not plan:
            return len(rows)  # only bookkeeping this time; look again
        results = self.client.get_many(
            [("/listings/active", self._page_params(json.loads(r["params"]), off)) for r, off in plan]
        )
        by_part: dict[str, list[tuple[sqlite3.Row, int, Any]]] = {}
        for (r, off), res in zip(plan, results, strict=True):
            by_part.setdefault(r["key"], []).append((r, off, res))
        for pages in by_part.values():
            self._apply_partition_pages(pages)
        self.counters.pages += len(plan)
        return len(plan)

    def _apply_partition_pages(self, pages: list[tuple[sqlite3.Row, int, Any]]) -> None:
        row = pages[0][0]
        key, params = row["key"], json.loads(row["params"])
        listings: list[dict[str, Any]] = []
        next_offset = row["next_offset"]
        count = row["total_count"]
        forced: str | None = None  # 'capped' / 'failed' when the server refuses to page on
        for _r, off, res in pages:
            if isinstance(res, ApiError):
                store.in_transaction(
                    self.conn, lambda c, o=off, e=res: store._bad(c, "partition_page", f"{key}@{o}", str(e))
                )
                # A 400 past the first page: the server's offset cap is lower than ours; else the query is bad.
                forced = "capped" if res.status == 400 and off > 0 else "failed"
                log.warning("discovery: %s offset %d refused (%s): partition %s", label(params), off, res, forced)
                break
            if isinstance(res, RetriesExhausted):
                n = self._page_failures[key] = self._page_failures.get(key, 0) + 1
                if n >= PARTITION_MAX_FAILURES:
                    forced = "failed"  # reopened with the next rediscovery
                log.warning("discovery: %s offset %d failed (%s); %s", label(params), off, res, forced or "will retry")
                break
            next_offset = off + self.cfg.page_limit
            if res is None:  # malformed JSON after retries: recorded by the client; skip the page
                continue
            results = [x for x in (res.get("results") or []) if isinstance(x, dict)]
            listings += results
            if isinstance(res.get("count"), int):
                count = res["count"]
            if not results:  # past the end, whatever `count` says (or without one)
                count = off if count is None else min(count, off)
        now = self.clock()

        def apply(conn: sqlite3.Connection) -> store.WriteResult:
            res = store.write_listings(conn, listings, snapshot_every_s=None, now=now)
            state = forced or "paging"
            if not forced and count is not None and count > self.cfg.reachable and row["state"] == "pending":
                kids = self.split(params) if self.cfg.split else None
                if kids:
                    for k in kids:
                        conn.execute(
                            "INSERT OR IGNORE INTO crawl_partitions(key, params, state, parent_key)"
                            " VALUES (?,?,'pending',?)",
                            (partition_key(k), json.dumps(k, sort_keys=True), key),
                        )
                    state = "split"
                    log.info(
                        "discovery: %s has %s listings (> %s reachable): split into %d by price",
                        label(params),
                        f"{count:,}",
                        f"{self.cfg.reachable:,}",
                        len(kids),
                    )
            if state == "paging" and count is not None:
                if next_offset >= count:
                    state = "done"
                elif next_offset > self.cfg.max_offset:
                    state = "capped"
                    log.warning(
                        "discovery: %s has %s listings but cannot be split further; stored the first %s",
                        label(params),
                        f"{count:,}",
                        f"{next_offset:,}",
                    )
            conn.execute(
                "UPDATE crawl_partitions SET state=?, next_offset=?, total_count=?, updated_at=? WHERE key=?",
                (state, next_offset, count, now, key),
            )
            return res

        wr = store.in_transaction(self.conn, apply)
        self._count(wr)

    def reopen_partitions(self) -> int:
        """Rediscovery: finished leaf partitions older than the interval page on from their cursor
        (one page back, in case deletions shifted the offsets)."""
        cutoff = self.clock() - self.cfg.rediscover_every_s

        def reopen(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE crawl_partitions SET state='pending', next_offset=MAX(0, next_offset - ?)"
                " WHERE state IN ('done', 'capped', 'failed') AND updated_at <= ?",
                (self.cfg.page_limit, cutoff),
            ).rowcount

        n = store.in_transaction(self.conn, reopen)
        if n:
            log.info("rediscovery: %d partitions reopened to pick up new listings", n)
        return n

    # ---- shops ---------------------------------------------------------------------------------

    def _paged(self, path: str, params: dict[str, Any], notes: list[str]) -> tuple[list[dict[str, Any]], int, bool]:
        """Results of a paged endpoint as far as offsets reach: (items, count, reached_the_end)."""
        out: list[dict[str, Any]] = []
        off, count = 0, 0
        while True:
            res = self.client.get(path, {**params, "limit": self.cfg.page_limit, "offset": off})
            if res is None:  # malformed JSON after retries: recorded by the client; skip the page
                notes.append(f"{path} offset {off}: malformed JSON, page skipped")
                page: list[dict[str, Any]] = []
                count = max(count, off + 2 * self.cfg.page_limit)  # unknown: look at the next page
            else:
                page = [x for x in (res.get("results") or []) if isinstance(x, dict)]
                out += page
                count = res["count"] if isinstance(res.get("count"), int) else 0
            off += self.cfg.page_limit
            if res is not None and (off >= count or not page):
                return out, count, True
            if off > self.cfg.max_offset:
                return out, count, False

    def _shop_listings(self, shop_id: int, notes: list[str]) -> list[dict[str, Any]]:
        """All active listings of a shop; past the offset cap, the other end is read in ascending order."""
        path = f"/shops/{shop_id}/listings/active"
        items, count, complete = self._paged(path, {"sort_on": "created", "sort_order": "desc"}, notes)
        if not complete:
            more, _, _ = self._paged(path, {"sort_on": "created", "sort_order": "asc"}, notes)
            items = list({x.get("listing_id"): x for x in items + more}.values())
            if count > len(items):
                notes.append(f"{path}: {count:,} active listings, {len(items):,} reachable from both ends")
        return items

    def _shop_reviews(self, shop_id: int, notes: list[str]) -> list[dict[str, Any]]:
        """All reviews of a shop (newest first); past the offset cap, continue below the oldest one seen
        with `max_created` (inclusive: the overlap is deduplicated on the natural key)."""
        path = f"/shops/{shop_id}/reviews"
        seen: dict[str, dict[str, Any]] = {}
        params: dict[str, Any] = {}
        floor: int | None = None
        while True:
            items, _count, complete = self._paged(path, params, notes)
            for r in items:
                seen[store.review_key(shop_id, r)] = r
            if complete:
                return list(seen.values())
            stamps = [
                t for t in (r.get("create_timestamp", r.get("created_timestamp")) for r in items) if isinstance(t, int)
            ]
            oldest = min(stamps, default=None)
            if oldest is None or (floor is not None and oldest >= floor):
                notes.append(f"{path}: more reviews than offsets reach at one timestamp; kept {len(seen):,}")
                return list(seen.values())
            floor = oldest
            params = {"max_created": oldest + 1}

    def fetch_shop(self, shop_id: int) -> ShopData:
        """getShop, then every active listing and every review of the shop (runs on a client thread)."""
        notes: list[str] = []
        shop = self.client.get(f"/shops/{shop_id}")
        if shop is None or not isinstance(shop.get("shop_id"), int):
            raise RetriesExhausted(f"getShop {shop_id}: no usable body")
        listings = self._shop_listings(shop_id, notes)
        reviews = self._shop_reviews(shop_id, notes)
        return ShopData(shop, listings, reviews, notes)

    def step_shops(self) -> int:
        """Crawl a batch of pending shops, `concurrency` at a time; each is stored as soon as it is
        complete while the others keep fetching. Returns shops handled."""
        ids = [
            r[0]
            for r in self.conn.execute(
                "SELECT shop_id FROM shops WHERE crawl_state='pending' ORDER BY shop_id LIMIT ?",
                (self.cfg.concurrency * 4,),
            )
        ]
        if ids:
            self.client.map_rolling(self.fetch_shop, ids, self._apply_shop)
        return len(ids)

    def _apply_shop(self, shop_id: int, res: ShopData | Exception) -> None:
        now = self.clock()
        if isinstance(res, Exception):
            gone = isinstance(res, ApiError) and res.status == 404

            def failed(conn: sqlite3.Connection) -> None:
                row = conn.execute("SELECT crawl_attempts FROM shops WHERE shop_id=?", (shop_id,)).fetchone()
                attempts = (row[0] if row else 0) + 1
                state = "gone" if gone else ("failed" if attempts >= SHOP_MAX_ATTEMPTS else "pending")
                conn.execute(
                    "UPDATE shops SET crawl_state=?, crawl_attempts=?, crawl_error=? WHERE shop_id=?",
                    (state, attempts, str(res)[:500], shop_id),
                )

            store.in_transaction(self.conn, failed)
            log.warning("shop %d: %s", shop_id, res)
            return

        def apply(conn: sqlite3.Connection) -> store.WriteResult:
            store.write_shop(conn, res.shop, now)
            wr = store.write_listings(conn, res.listings, snapshot_every_s=None, now=now)
            wr.reviews_new = store.write_reviews(conn, shop_id, res.reviews)
            for note in res.notes:
                store._bad(conn, "shop_crawl", str(shop_id), note)
            conn.execute(
                "UPDATE shops SET crawl_state='done', crawled_at=?, crawl_error=NULL WHERE shop_id=?", (now, shop_id)
            )
            return wr

        wr = store.in_transaction(self.conn, apply)
        self.counters.shops_crawled += 1
        self.counters.reviews_new += wr.reviews_new
        self._count(wr)

    # ---- images and snapshots ------------------------------------------------------------------

    def image_backlog(self) -> int:
        return self.conn.execute(
            "SELECT COUNT(*) FROM listings WHERE images_fetched_at IS NULL AND images_attempts < ?",
            (IMAGE_MAX_ATTEMPTS,),
        ).fetchone()[0]

    def step_images(self, *, full_only: bool) -> int:
        """Fetch images for up to 2 x `concurrency` x 100 listings. With `full_only`, only when a whole
        batch of 100 is waiting (a short batch wastes quota). Returns listings handled."""
        n = self.cfg.concurrency * 200
        ids = [
            r[0]
            for r in self.conn.execute(
                "SELECT listing_id FROM listings WHERE images_fetched_at IS NULL AND images_attempts < ?"
                " ORDER BY listing_id LIMIT ?",
                (IMAGE_MAX_ATTEMPTS, n),
            )
        ]
        if not ids or (full_only and len(ids) < 100):
            return 0
        chunks = [ids[i : i + 100] for i in range(0, len(ids), 100)]
        if full_only and len(chunks[-1]) < 100 and len(chunks) > 1:
            chunks.pop()
        self._fetch_listing_batches(chunks, snapshot=False)
        return sum(len(c) for c in chunks)

    def _fetch_listing_batches(self, chunks: list[list[int]], *, snapshot: bool) -> None:
        """Batch calls, `concurrency` in flight; each result is stored as it arrives."""

        def fetch(chunk: list[int]) -> Any:
            return self.client.get("/listings/batch", {"listing_ids": ",".join(map(str, chunk)), "includes": "Images"})

        self.client.map_rolling(fetch, chunks, lambda chunk, res: self._apply_batch(chunk, res, snapshot=snapshot))

    def _apply_batch(self, chunk: list[int], res: Any, *, snapshot: bool) -> None:
        now = self.clock()
        marks = "images_fetched_at" if not snapshot else "last_snapshot_at"
        if res is None or isinstance(res, Exception):
            if not snapshot:

                def failed(conn: sqlite3.Connection) -> None:
                    conn.executemany(
                        "UPDATE listings SET images_attempts=images_attempts+1 WHERE listing_id=?",
                        [(i,) for i in chunk],
                    )

                store.in_transaction(self.conn, failed)
            log.warning("listing batch of %d (from %d) failed: %s", len(chunk), chunk[0], res)
            return
        wanted = set(chunk)
        listings = [x for x in (res.get("results") or []) if isinstance(x, dict) and x.get("listing_id") in wanted]
        rows: list[dict[str, Any]] = []
        bad = 0

        def collect(conn: sqlite3.Connection) -> None:
            nonlocal bad
            for lst in listings:
                r, b = store.image_rows(conn, lst)
                rows.extend(r)
                bad += b
            # The first snapshot is taken here, not from search pages: only batch results carry `views`.
            store.write_listings(
                conn, listings, snapshot_every_s=0.0 if snapshot else self.cfg.snapshot_every_s, now=now
            )

        store.in_transaction(self.conn, collect)
        new_images = db.upsert_images(self.conn, rows) if rows else 0

        def mark(conn: sqlite3.Connection) -> None:
            conn.executemany(f"UPDATE listings SET {marks}=? WHERE listing_id=?", [(now, i) for i in chunk])
            if snapshot:  # a snapshot batch also carries images: it completes listings whose image fetch failed
                conn.executemany(
                    "UPDATE listings SET images_fetched_at=? WHERE listing_id=? AND images_fetched_at IS NULL",
                    [(now, x["listing_id"]) for x in listings],
                )

        store.in_transaction(self.conn, mark)
        self.counters.images_new += new_images
        self.counters.bad += bad

    def step_snapshots(self) -> int:
        """Re-snapshot listings and shops whose last snapshot is older than the interval."""
        cutoff = self.clock() - self.cfg.snapshot_every_s
        ids = [
            r[0]
            for r in self.conn.execute(
                "SELECT listing_id FROM listings WHERE last_snapshot_at <= ? OR last_snapshot_at IS NULL"
                " ORDER BY last_snapshot_at LIMIT ?",
                (cutoff, self.cfg.concurrency * 100),
            )
        ]
        if ids:
            chunks = [ids[i : i + 100] for i in range(0, len(ids), 100)]
            self._fetch_listing_batches(chunks, snapshot=True)
            return len(chunks)
        shops = [
            r[0]
            for r in self.conn.execute(
                "SELECT shop_id FROM shops WHERE crawl_state='done' AND last_snapshot_at <= ?"
                " ORDER BY last_snapshot_at LIMIT ?",
                (cutoff, self.cfg.concurrency),
            )
        ]
        if not shops:
            return 0
        results = self.client.get_many([(f"/shops/{s}", None) for s in shops])
        now = self.clock()
        for sid, res in zip(shops, results, strict=True):
            if isinstance(res, dict) and res.get("shop_id") == sid:
                store.in_transaction(self.conn, lambda c, r=res: store.write_shop(c, r, now))
            else:
                store.in_transaction(
                    self.conn,
                    lambda c, s=sid: c.execute("UPDATE shops SET last_snapshot_at=? WHERE shop_id=?", (now, s)),
                )
        return len(shops)

    # ---- driving -------------------------------------------------------------------------------

    def _count(self, wr: store.WriteResult) -> None:
        self.counters.listings_new += wr.listings_new
        self.counters.listings_seen += wr.listings_seen
        self.counters.bad += wr.bad

    def step(self) -> str | None:
        """Do one unit of work, most urgent first. Returns what it did, or None when nothing is left."""
        if self.step_images(full_only=True):
            return "images"
        if self.cfg.crawl_shops and self.step_shops():
            return "shops"
        if self.step_partitions():
            return "discovery"
        if self.step_images(full_only=False):
            return "images"
        if self.step_snapshots():
            return "snapshots"
        return None

    def open_work(self) -> dict[str, int]:
        """What is left (for the log and the heartbeat)."""
        q = self.conn.execute
        return {
            "partitions_open": q(
                "SELECT COUNT(*) FROM crawl_partitions WHERE state IN ('pending','paging')"
            ).fetchone()[0],
            "shops_pending": q("SELECT COUNT(*) FROM shops WHERE crawl_state='pending'").fetchone()[0],
            "listings_without_images": self.image_backlog(),
        }
