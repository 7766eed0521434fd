"""The Etsy client's failure handling, storage edge cases, and partition splitting."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from imageselector import db
from imageselector.etsy import store
from imageselector.etsy.client import ApiError, AuthError, EtsyClient, RetriesExhausted, StatsPublisher
from imageselector.etsy.crawl import CrawlConfig, Crawler, partition_key
from imageselector.etsy.pacing import Pacer, StopRequested
from imageselector.etsy.simulator import Faults, Simulator
from imageselector.stopping import Stopper


def make_client(settings, sim, *, key=None, secret=None, stopper=None, conn=None, **kw) -> EtsyClient:
    settings.qps_config_path.write_text(json.dumps({"qps": 200, "min_qps": 1, "max_qps": 200}))
    pacer = Pacer(settings.qps_config_path, stopper=stopper, daily_reserve=kw.pop("daily_reserve", 0))
    bad = (lambda kind, ref, detail: db.record_bad(conn, kind, ref, detail)) if conn is not None else None
    return EtsyClient(
        sim.api_base,
        key if key is not None else sim.api_key,
        secret if secret is not None else sim.shared_secret,
        pacer,
        timeout=kw.pop("timeout", 2.0),
        backoff_base=0.01,
        bad_record=bad,
        **kw,
    )


def test_refused_key_raises_auth_error_without_retrying(settings):
    with Simulator(listings=20, qps=0) as sim:
        client = make_client(settings, sim, secret="nope")
        with pytest.raises(AuthError, match="HTTP 403"):
            client.ping()
        assert sim.stats.snapshot()["requests"] == 1
        client.close()


def test_429_retry_after_is_honoured(settings):
    faults = Faults(api_429=1.0)
    with Simulator(listings=20, qps=0, faults=faults) as sim:
        client = make_client(settings, sim)
        threading.Timer(0.3, lambda: setattr(sim.faults, "api_429", 0.0)).start()
        t0 = time.monotonic()
        assert client.ping()["application_id"] > 0
        assert time.monotonic() - t0 >= 0.9  # retry-after: 1 on the simulator's 429
        assert client.stats["http_429"] == 1 and sim.stats.snapshot()["requests"] == 2
        client.close()


def test_429_without_retry_after_backs_off_and_succeeds(settings):
    faults = Faults(api_429=0.6, retry_after_429=False)
    with Simulator(listings=20, qps=0, faults=faults, seed=4) as sim:
        client = make_client(settings, sim)
        for _ in range(5):
            assert client.get(f"/shops/{sim.catalogue.shops_with_active_listings()[0]}")["shop_id"]
        assert client.stats["http_429"] >= 1
        client.close()


def test_malformed_json_is_retried_then_recorded_and_skipped(settings, conn, caplog):
    with Simulator(listings=20, qps=0, faults=Faults(api_bad_json=1.0)) as sim:
        client = make_client(settings, sim, conn=conn, max_retries=2)
        with caplog.at_level(logging.INFO):
            assert client.get("/listings/active", {"limit": 5}) is None
        assert sim.stats.snapshot()["requests"] == 3
        rows = conn.execute("SELECT kind, ref FROM bad_records").fetchall()
        assert [tuple(r) for r in rows] == [("bad_json", "/listings/active?limit=5")]
        assert "malformed JSON" in caplog.text
        client.close()


def test_5xx_and_timeouts_retry_then_give_up(settings):
    with Simulator(listings=20, qps=0, faults=Faults(api_5xx=1.0)) as sim:
        client = make_client(settings, sim, max_retries=3)
        with pytest.raises(RetriesExhausted):
            client.ping()
        assert sim.stats.snapshot()["requests"] == 4
        sim.faults.api_5xx = 0.0
        sim.faults.update("api_timeout=0.5,timeout_s=0.4")
        client.timeout = 0.2
        client.max_retries = 8
        assert client.ping()["application_id"]  # timeouts are retried too
        client.close()


def test_other_4xx_is_an_api_error_not_retried(settings):
    with Simulator(listings=20, qps=0) as sim:
        client = make_client(settings, sim)
        with pytest.raises(ApiError) as exc:
            client.get("/shops/1")
        assert exc.value.status == 404 and "Could not find a shop" in exc.value.message
        res = client.get_many([("/shops/1", None), ("/openapi-ping", None)])
        assert isinstance(res[0], ApiError) and res[1]["application_id"]
        assert sim.stats.snapshot()["requests"] == 3
        client.close()


@pytest.mark.parametrize("reserve", [0, -1])
def test_daily_limit_waits_for_the_quota_and_a_stop_ends_the_wait(settings, caplog, reserve):
    """reserve 0: the headers show the budget spent, so sync pauses before any 429; reserve -1 (never
    pause early): the daily-limit 429 itself starts the wait. Either way: one wait, no hammering."""
    stopper = Stopper(settings.home, ["KILL"], install_signals=False)
    with Simulator(listings=20, qps=0, qpd=2) as sim:
        client = make_client(settings, sim, stopper=stopper, daily_reserve=reserve)
        client.ping()
        client.ping()
        threading.Timer(0.4, lambda: (settings.home / "KILL").touch()).start()
        with caplog.at_level(logging.INFO), pytest.raises(StopRequested):
            client.ping()
        assert "daily quota low: 0 requests left" in caplog.text
        assert sim.stats.snapshot().get("429_qpd", 0) == (1 if reserve < 0 else 0)
        assert ("daily rate limit reached" in caplog.text) == (reserve < 0)
        client.close()


def test_stats_published_to_kv(settings, conn):
    with Simulator(listings=20, qps=7) as sim:
        client = make_client(settings, sim, publish=StatsPublisher(settings.db_path, interval=0))
        client.ping()
        client.close()
        stats = json.loads(db.kv_get(conn, "sync_stats"))
        assert stats["requests"] == 1 and stats["http_429"] == 0
        assert stats["x-limit-per-second"] == 7 and stats["x-remaining-today"] == 9999
        assert {"ts", "x-limit-per-day", "x-remaining-this-second"} <= set(stats)


def _listing(url_full, url_570, image_id=111, rank=1):
    return {
        "listing_id": 5,
        "shop_id": 9,
        "when_made": "2020_2026",
        "price": {"amount": 1234, "divisor": 100, "currency_code": "USD"},
        "images": [{"listing_image_id": image_id, "rank": rank, "url_fullxfull": url_full, "url_570xN": url_570}],
    }


def test_image_urls_parsed_strictly_and_bad_ones_recorded(conn):
    good = "https://i.etsystatic.com/77/r/il/6290b5/111/il_fullxfull.111_tg5r.jpg"
    rows, bad = store.image_rows(conn, _listing(good, "junk"))
    assert bad == 0 and rows == [
        {
            "listing_id": 5,
            "image_id": 111,
            "shop_id": 77,
            "hex": "6290b5",
            "suffix": "tg5r",
            "is_primary": 1,
            "when_made": "2020_2026",
            "price": 12.34,
        }
    ]
    # only the 570xN URL is usable: still parsed
    rows, bad = store.image_rows(conn, _listing("", good.replace("fullxfull", "570xN")))
    assert bad == 0 and rows[0]["hex"] == "6290b5"
    # nothing usable (bad pattern, or the URL names another image): recorded, no row, no crash
    for a, b in (("https://example.com/x.jpg", None), (good, good)):
        rows, bad = store.image_rows(conn, _listing(a, b, image_id=222 if a == good else 111))
        assert rows == [] and bad == 1
    kinds = [r[0] for r in conn.execute("SELECT kind FROM bad_records")]
    assert kinds == ["image_url", "image_url"]


def test_reviews_deduplicated_on_natural_key(conn):
    r = {"listing_id": 1, "transaction_id": 2, "buyer_user_id": 3, "rating": 5, "review": "ok", "create_timestamp": 10}

    def write(rs):
        return store.in_transaction(conn, lambda c: store.write_reviews(c, 7, rs))

    assert write([r, dict(r)]) == 1
    edited = {**r, "review": "great", "buyer_user_id": None, "update_timestamp": 20}
    assert write([edited]) == 0
    rows = conn.execute("SELECT review, buyer_user_id FROM reviews").fetchall()
    assert [tuple(x) for x in rows] == [("great", None)]


def test_price_split_covers_and_bottoms_out(conn):
    cfg = CrawlConfig(price_bands=(0, 10, 50))
    crawler = Crawler(conn, client=None, cfg=cfg)  # type: ignore[arg-type]
    kids = crawler.split({"keywords": "mug"})
    assert kids == [
        {"keywords": "mug", "min_price": 0, "max_price": 10},
        {"keywords": "mug", "min_price": 10, "max_price": 50},
        {"keywords": "mug", "min_price": 50},
    ]
    assert crawler.split({"min_price": 50}) == [{"min_price": 50, "max_price": 100}, {"min_price": 100}]
    assert crawler.split({"min_price": 10, "max_price": 20}) == [
        {"min_price": 10, "max_price": 15.0},
        {"min_price": 15.0, "max_price": 20},
    ]
    assert crawler.split({"min_price": 10.0, "max_price": 10.01}) is None  # too narrow: paged to the cap
    assert partition_key({"b": 1, "a": 2}) == partition_key({"a": 2, "b": 1})


def test_rediscovery_reopens_finished_partitions_from_their_cursor(conn):
    now = [1000.0]
    crawler = Crawler(conn, client=None, cfg=CrawlConfig(keywords=["mug"], rediscover_every_s=60), clock=lambda: now[0])  # type: ignore[arg-type]
    assert crawler.seed_partitions() == 2 and crawler.seed_partitions() == 0
    conn.execute("UPDATE crawl_partitions SET state='done', next_offset=500, total_count=480, updated_at=1000")
    assert crawler.reopen_partitions() == 0
    now[0] = 1061.0
    assert crawler.reopen_partitions() == 2
    rows = conn.execute("SELECT state, next_offset FROM crawl_partitions").fetchall()
    assert {tuple(r) for r in rows} == {("pending", 400)}


def test_storage_reads_only_fields_the_oas_declares():
    """Every response field store.py (and money.py, its reading of Money) reads by name is declared in the OAS subset."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    oas = json.loads((root / "imageselector" / "etsy" / "etsy_openapi_v3_subset.json").read_text())
    schemas = oas["components"]["schemas"]
    declared: set[str] = set()
    for schema in schemas.values():
        declared |= set(schema.get("properties", {}))
    text = (root / "imageselector" / "etsy" / "store.py").read_text() + (root / "imageselector" / "money.py").read_text()
    used = set(re.findall(r'\.get\("(\w+)"', text)) | set(re.findall(r'\["(\w+)"\]', text))
    used -= {"last_snapshot_at"}  # a database row, not a response
    assert {"listing_id", "review_average", "views", "when_made", "buyer_user_id", "amount"} <= used
    assert used <= declared, sorted(used - declared)
    assert set(store.IMAGE_URL_KEYS) <= set(schemas["ListingImage"]["properties"])


class ScriptedClient:
    """Answers get_many from a function of (path, params): for partition edge cases no server produces."""

    def __init__(self, answer):
        self.answer = answer
        self.calls: list[dict] = []

    def get_many(self, reqs):
        out = []
        for path, params in reqs:
            self.calls.append(dict(params or {}))
            out.append(self.answer(path, params))
        return out


def _listings(start, n):
    return [{"listing_id": start + i, "shop_id": 1, "title": "t"} for i in range(n)]


def test_partition_edge_cases(conn):
    now = [1000.0]
    cfg = CrawlConfig(page_limit=100, max_offset=100, price_bands=(0, 10), concurrency=4, rediscover_every_s=60)

    # a query the server refuses outright: failed (not an endless loop), reopened by rediscovery
    client = ScriptedClient(lambda p, q: ApiError(400, "bad parameter", p))
    crawler = Crawler(conn, client, cfg, clock=lambda: now[0])  # type: ignore[arg-type]
    crawler.seed_partitions()
    assert crawler.step_partitions() == 1
    assert crawler.step_partitions() == 0
    assert conn.execute("SELECT state FROM crawl_partitions").fetchone()[0] == "failed"
    assert conn.execute("SELECT kind FROM bad_records").fetchone()[0] == "partition_page"
    now[0] += 61
    assert crawler.reopen_partitions() == 1

    # too many to reach: split by price; a band answering without `count` ends at its first empty page;
    # min_price=0 is left out of the query
    def answer(path, q):
        if "max_price" not in q and "min_price" not in q:
            return {"count": 250, "results": _listings(0, 100)}
        if q.get("max_price") == 10:
            return {"results": _listings(1000 + q["offset"], 100 if q["offset"] < 200 else 0)}
        return {"count": 5, "results": _listings(5000, 5)}

    crawler.client = ScriptedClient(answer)  # type: ignore[assignment]
    while crawler.step_partitions():
        pass
    states = dict(conn.execute("SELECT key, state FROM crawl_partitions").fetchall())
    assert states == {"{}": "split", '{"max_price":10,"min_price":0}': "capped", '{"min_price":10}': "done"}
    assert all("min_price" not in c or c["min_price"] != 0 for c in crawler.client.calls)
    # offsets 0 and 100 of the [0,10] band (the cap is 100), and the 5 of [10,inf), and the root's first page
    assert conn.execute("SELECT COUNT(*) FROM listings").fetchone()[0] == 100 + 200 + 5
