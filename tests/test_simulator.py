"""The Etsy simulator: OAS conformance, paging, auth, rate limits, faults, CDN images, determinism, CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import requests
from PIL import Image

from imageselector import cdn
from imageselector.etsy.pacing import Pacer
from imageselector.etsy.simulator import Faults, Simulator
from imageselector.etsy.simulator.catalogue import Catalogue, tokens
from imageselector.etsy.simulator.images import render
from imageselector.etsy.simulator.ratelimit import RateLimiter
from imageselector.etsy.simulator.server import OFFSET_ERROR, QPD_ERROR, QPS_ERROR, SECRET_ERROR
from tests.helpers import oas

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim():
    with Simulator(listings=300, seed=7, qps=0, qpd=0, when_made_drift=0.0) as s:
        yield s


@pytest.fixture(scope="module")
def http(sim):
    with requests.Session() as s:
        s.headers["x-api-key"] = sim.api_key_header
        yield s


def get(http, sim, path, **params):
    return http.get(sim.api_base + path, params=params, timeout=10)


def all_pages(http, sim, path, **params) -> list[dict]:
    out, offset = [], 0
    while True:
        r = get(http, sim, path, limit=100, offset=offset, **params)
        assert r.status_code == 200, r.text
        body = r.json()
        out += body["results"]
        offset += 100
        if offset >= body["count"]:
            return out


# ---- OAS conformance ---------------------------------------------------------------------------------------------
def test_every_endpoint_validates_against_the_oas(sim, http):
    cat = sim.catalogue
    ping = get(http, sim, "/openapi-ping")
    oas.validate(ping.json(), oas.response_component("/openapi-ping"))

    page = get(http, sim, "/listings/active", limit=100, keywords="gift", sort_on="price", sort_order="asc")
    oas.validate(page.json(), oas.response_component("/listings/active"))
    assert page.json()["results"], "expected matches for 'gift'"

    listing_ids = cat.listing_ids.tolist()  # every listing, every state, through the batch endpoint
    shops_seen = set()
    for k in range(0, len(listing_ids), 100):
        ids = ",".join(map(str, listing_ids[k : k + 100]))
        body = get(http, sim, "/listings/batch", listing_ids=ids, includes="Images,Shop").json()
        oas.validate(body, oas.response_component("/listings/batch"))
        assert body["count"] == len(body["results"]) == len(listing_ids[k : k + 100])
        shops_seen |= {r["shop_id"] for r in body["results"]}
        assert all(r["images"] and r["shop"]["shop_id"] == r["shop_id"] for r in body["results"])

    lid = listing_ids[0]
    oas.validate(get(http, sim, f"/listings/{lid}").json(), oas.response_component("/listings/{listing_id}"))
    images = get(http, sim, f"/listings/{lid}/images").json()
    oas.validate(images, oas.response_component("/listings/{listing_id}/images"))
    for shop_id in sorted(shops_seen)[:8]:
        oas.validate(get(http, sim, f"/shops/{shop_id}").json(), oas.response_component("/shops/{shop_id}"))
        sl = get(http, sim, f"/shops/{shop_id}/listings/active", limit=100).json()
        oas.validate(sl, oas.response_component("/shops/{shop_id}/listings/active"))
        rv = get(http, sim, f"/shops/{shop_id}/reviews", limit=100).json()
        oas.validate(rv, oas.response_component("/shops/{shop_id}/reviews"))
    for path in ("/listings/active?offset=99999", "/shops/1", "/listings/1/images", "/nope"):
        r = http.get(sim.api_base + path, timeout=10)
        assert r.status_code in (400, 404)
        oas.validate(r.json(), "ErrorSchema")


def test_when_made_drift_is_free_text_outside_the_2025_enum():
    with Simulator(listings=400, seed=2, qps=0, qpd=0, when_made_drift=0.5) as s:
        cat = s.catalogue
        values = {cat.listing_json(i)["when_made"] for i in range(cat.n)}
        assert values & {"2020_2026", "before_2007", "2000_2006"}
        body = {"count": 1, "results": [cat.listing_json(i) for i in range(cat.n)]}
        oas.validate(body, "ShopListings", relax=("when_made",))
        with pytest.raises(jsonschema.ValidationError, match="when_made"):
            oas.validate(body, "ShopListings")


# ---- paging and search rules -------------------------------------------------------------------------------------
def test_limit_clamp_default_and_offset_cap(sim, http):
    assert len(get(http, sim, "/listings/active").json()["results"]) == 25
    assert len(get(http, sim, "/listings/active", limit=500).json()["results"]) == 100
    assert len(get(http, sim, "/listings/active", limit=0).json()["results"]) == 1
    assert get(http, sim, "/listings/active", offset=12000).status_code == 200
    r = get(http, sim, "/listings/active", offset=12001)
    assert r.status_code == 400 and r.json() == {"error": OFFSET_ERROR}
    r = get(http, sim, f"/shops/{int(sim.catalogue.shop_ids[0])}/reviews", offset=12001)
    assert r.status_code == 400 and r.json() == {"error": OFFSET_ERROR}
    assert get(http, sim, "/listings/active", limit="x").status_code == 400
    assert get(http, sim, "/listings/active", sort_on="nope").status_code == 400


def test_max_offset_is_configurable():
    with Simulator(listings=200, seed=1, qps=0, qpd=0, max_offset=50) as s:
        h = {"x-api-key": s.api_key_header}
        assert requests.get(s.api_base + "/listings/active?offset=50", headers=h).status_code == 200
        r = requests.get(s.api_base + "/listings/active?offset=51", headers=h)
        assert r.status_code == 400 and r.json()["error"] == OFFSET_ERROR


def test_pages_cover_every_active_listing_exactly_once(sim, http):
    got = [r["listing_id"] for r in all_pages(http, sim, "/listings/active")]
    assert len(got) == len(set(got))
    assert sorted(got) == sorted(sim.catalogue.active_listing_ids())
    created = [sim.catalogue.listing_json(sim.catalogue.listing_index(x))["created_timestamp"] for x in got]
    assert created == sorted(created, reverse=True)  # newest first by default


def test_filters_and_sorting(sim, http):
    probe = sim.catalogue.listing_json(int(np.nonzero(sim.catalogue.active)[0][0]))
    query = f"{probe['tags'][-4]} {probe['tags'][0]}"  # colour word + product word
    res = all_pages(http, sim, "/listings/active", keywords=query)
    assert probe["listing_id"] in {r["listing_id"] for r in res}
    for r in res:
        words = set(tokens(" ".join([r["title"], *r["tags"], *r["materials"]])))
        assert set(tokens(query)) <= words
    res = all_pages(http, sim, "/listings/active", min_price=10, max_price=20, sort_on="price", sort_order="asc")
    amounts = [r["price"]["amount"] for r in res]
    assert res and amounts == sorted(amounts) and all(1000 <= a <= 2000 for a in amounts)
    tax = int(sim.catalogue.taxonomy[0])
    res = all_pages(http, sim, "/listings/active", taxonomy_id=tax)
    assert res and all(r["taxonomy_id"] == tax for r in res)
    # partitions by taxonomy add up to the whole
    total = sum(
        get(http, sim, "/listings/active", taxonomy_id=int(t), limit=1).json()["count"]
        for t in np.unique(sim.catalogue.taxonomy)
    )
    assert total == len(sim.catalogue.active_listing_ids())
    us = all_pages(http, sim, "/listings/active", shop_location="United States")
    for r in us[:20]:
        assert get(http, sim, f"/shops/{r['shop_id']}").json()["shipping_from_country_iso"] == "US"


def test_shop_listings_and_reviews_complete(sim, http):
    cat = sim.catalogue
    shop_id = max(cat.shops_with_active_listings(), key=lambda s: len(cat.reviews(cat.shop_index(s))))
    s = cat.shop_index(shop_id)
    shop = get(http, sim, f"/shops/{shop_id}").json()
    listings = all_pages(http, sim, f"/shops/{shop_id}/listings/active")
    assert len(listings) == shop["listing_active_count"] == int(cat.active[cat.shop_listing_indices(s)].sum())
    reviews = all_pages(http, sim, f"/shops/{shop_id}/reviews")
    assert [r["transaction_id"] for r in reviews] == [r["transaction_id"] for r in cat.reviews(s)]
    mid = reviews[len(reviews) // 2]["created_timestamp"]
    newer = all_pages(http, sim, f"/shops/{shop_id}/reviews", min_created=mid)
    older = all_pages(http, sim, f"/shops/{shop_id}/reviews", max_created=mid - 1)
    assert len(newer) + len(older) == len(reviews)
    everyone = [r for i in range(cat.n_shops) for r in cat.reviews(i)]
    assert any(r["buyer_user_id"] is None for r in everyone) and any(r["buyer_user_id"] for r in everyone)


def test_tick_changes_dynamic_metrics_only():
    cat = Catalogue(200, seed=4)
    before = [cat.listing_json(i) for i in range(cat.n)]
    cat.tick(30)
    after = [cat.listing_json(i) for i in range(cat.n)]
    assert [b["listing_id"] for b in before] == [a["listing_id"] for a in after]
    assert sum(a["num_favorers"] > b["num_favorers"] for a, b in zip(after, before, strict=True)) > 100
    assert all(a["state"] == b["state"] and a["title"] == b["title"] for a, b in zip(after, before, strict=True))
    assert all(a["quantity"] >= 1 for a in after if a["state"] == "active")
    again = Catalogue(200, seed=4)
    again.tick(30)
    assert [again.listing_json(i) for i in range(again.n)] == after


def test_catalogue_scales_to_100k_listings():
    cat = Catalogue(100_000, seed=1)
    assert cat.n == 100_000 and len(cat.image_ids) >= 100_000
    assert len(set(cat.listing_ids.tolist())) == 100_000
    idx = cat.search(keywords="mug")
    assert 0 < len(idx) < 12_100 < len(cat.search())  # one keyword is a partition the offset cap can reach
    assert cat.listing_index(int(cat.listing_ids[-1])) == 99_999


# ---- auth and rate limits ----------------------------------------------------------------------------------------
def test_auth_errors(sim):
    url = sim.api_base + "/openapi-ping"
    r = requests.get(url)
    assert r.status_code == 403 and set(r.json()) == {"error"}
    r = requests.get(url, headers={"x-api-key": sim.api_key})
    assert r.status_code == 403 and r.json() == {"error": SECRET_ERROR}
    r = requests.get(url, headers={"x-api-key": "wrong:key"})
    assert r.status_code == 403 and r.json() == {"error": "Invalid API key"}
    r = requests.get(url, headers={"x-api-key": f"{sim.api_key}:wrong"})
    assert r.status_code == 403


def test_rate_limit_headers_and_qps_429():
    with Simulator(listings=50, seed=1, qps=4, qpd=1000) as s, requests.Session() as h:
        h.headers["x-api-key"] = s.api_key_header
        t0 = time.monotonic()
        rs = [h.get(s.api_base + "/openapi-ping") for _ in range(8)]
        fast = time.monotonic() - t0 < 0.9
        ok = [r for r in rs if r.status_code == 200]
        assert ok[0].headers["x-limit-per-second"] == "4" and ok[0].headers["x-limit-per-day"] == "1000"
        assert ok[0].headers["x-remaining-this-second"] == "3" and ok[0].headers["x-remaining-today"] == "999"
        if fast:  # 8 requests inside one second: exactly 4 pass
            assert len(ok) == 4
            bad = [r for r in rs if r.status_code == 429]
            assert bad and bad[0].json() == {"error": QPS_ERROR} and int(bad[0].headers["retry-after"]) >= 1
            assert s.stats["429_qps"] == len(bad) and s.stats["429_qpd"] == 0
        time.sleep(1.05)
        assert h.get(s.api_base + "/openapi-ping").status_code == 200


def test_daily_limit_429():
    with Simulator(listings=50, seed=1, qps=0, qpd=3) as s, requests.Session() as h:
        h.headers["x-api-key"] = s.api_key_header
        rs = [h.get(s.api_base + "/openapi-ping") for _ in range(5)]
        assert [r.status_code for r in rs] == [200, 200, 200, 429, 429]
        assert [r.headers["x-remaining-today"] for r in rs[:3]] == ["2", "1", "0"]
        assert rs[3].json() == {"error": QPD_ERROR} and int(rs[3].headers["retry-after"]) > 80000
        assert s.stats["429_qpd"] == 2 and s.stats["429_qps"] == 0


def test_no_limit_windows_send_no_headers_so_the_crawler_never_pauses(tmp_path):
    """qps=0 / qpd=0 mean "no limit": `x-remaining-today: 0` there would make the crawler wait for tomorrow."""
    over, _, headers = RateLimiter(qps=0, qpd=0).check()
    assert over is None and headers == {}
    _, _, headers = RateLimiter(qps=5, qpd=0).check()
    assert headers == {"x-limit-per-second": "5", "x-remaining-this-second": "4"}
    pacer = Pacer(tmp_path / "qps_config.json", tmp_dir=tmp_path)
    pacer.observe(RateLimiter(qps=0, qpd=0).check()[2])
    assert pacer.quota.remaining_today is None and pacer.quota.limit_per_day is None


def test_rate_limiter_sliding_window():
    now = [100.0]
    rl = RateLimiter(qps=2, qpd=5, clock=lambda: now[0])
    assert rl.check()[0] is None and rl.check()[0] is None
    over, retry, _ = rl.check()
    assert over == "qps" and 0 < retry <= 1
    now[0] += 0.5
    assert rl.check()[0] == "qps"  # window slides: the first two are still inside it
    now[0] += 0.51
    assert rl.check()[0] is None and rl.check()[0] is None
    now[0] += 1.1
    assert rl.check()[0] is None and rl.check()[0] == "qpd"


# ---- faults ------------------------------------------------------------------------------------------------------
def test_api_faults_occur_at_configured_rates():
    f = Faults(api_429=0.1, api_5xx=0.15, api_bad_json=0.1)
    with Simulator(listings=100, seed=3, qps=0, qpd=0, faults=f) as s, requests.Session() as h:
        h.headers["x-api-key"] = s.api_key_header
        n, codes, bad_json = 400, [], 0
        for k in range(n):
            r = h.get(s.api_base + "/listings/active", params={"limit": 1, "offset": k % 50})
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.json() == {"error": QPS_ERROR} and r.headers["retry-after"] == "1"
                assert r.headers["x-remaining-this-second"] == "0" and "x-remaining-today" not in r.headers  # qpd=0
            if r.status_code == 200:
                try:
                    r.json()
                except ValueError:
                    bad_json += 1
        n429, n5xx = codes.count(429), sum(c >= 500 for c in codes)
        assert 0.05 * n < n429 < 0.16 * n
        assert 0.08 * n < n5xx < 0.23 * n  # of the requests that got past the 429 draw
        assert 0.04 * n < bad_json < 0.16 * n
        assert s.stats["429_injected"] == n429 and s.stats["429_qps"] == 0
        assert s.stats["api_5xx_injected"] == n5xx and s.stats["api_bad_json_injected"] == bad_json
        s.faults.update("api_429=0,api_5xx=0,api_bad_json=0")  # faults change at run time
        assert all(h.get(s.api_base + "/openapi-ping").status_code == 200 for _ in range(20))
        r = requests.post(s.cdn_base + "/_sim/faults", params={"spec": "api_5xx=1"})
        assert r.status_code == 200 and s.faults.api_5xx == 1.0
        assert h.get(s.api_base + "/openapi-ping").status_code >= 500


def test_api_timeout_fault_drops_the_connection():
    with Simulator(listings=20, seed=1, qps=0, qpd=0, faults=Faults(api_timeout=1.0, timeout_s=0.3)) as s:
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(s.api_base + "/openapi-ping", headers={"x-api-key": s.api_key_header}, timeout=0.15)
        with pytest.raises(requests.exceptions.ConnectionError):  # waited out: hang-up without an answer
            requests.get(s.api_base + "/openapi-ping", headers={"x-api-key": s.api_key_header}, timeout=2)
        assert s.stats["api_timeout_injected"] == 2


def _image_urls(s: Simulator, size: str = "340x270") -> list[str]:
    return [s.image_url(j, size) for j in range(len(s.catalogue.image_ids))]


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


def test_cdn_faults():
    f = Faults(cdn_404=0.1, cdn_5xx=0.1, cdn_truncated=0.1, cdn_not_image=0.1)
    with Simulator(listings=120, seed=5, faults=f) as s, requests.Session() as h:
        urls = _image_urls(s, "75x75")[:300]
        first = {}
        outcome = {"404": 0, "5xx": 0, "cut": 0, "html": 0, "ok": 0}
        for u in urls:
            try:
                r = h.get(u, timeout=5)
            except requests.exceptions.RequestException:
                outcome["cut"] += 1
                continue
            first[u] = r.status_code
            if r.status_code == 404:
                outcome["404"] += 1
            elif r.status_code >= 500:
                outcome["5xx"] += 1
            elif not r.headers["content-type"].startswith("image/jpeg"):
                outcome["html"] += 1
            elif not _decodes(r.content):
                outcome["cut"] += 1
            else:
                outcome["ok"] += 1
        n = len(urls)
        for k in ("404", "5xx", "cut", "html"):
            assert 0.03 * n < outcome[k] < 0.2 * n, outcome
        assert s.stats["cdn_404_injected"] == outcome["404"]
        # 404 is permanent for an image; the other faults are transient
        missing = [u for u, c in first.items() if c == 404]
        assert all(h.get(u).status_code == 404 for u in missing[:10])
        s.faults.update("cdn_5xx=0,cdn_truncated=0,cdn_not_image=0")
        assert all(h.get(u).status_code == 200 for u in urls[:60] if u not in missing)


# ---- CDN images --------------------------------------------------------------------------------------------------
def test_cdn_serves_jpegs_at_the_implied_size(sim, http):
    cat = sim.catalogue
    img = get(http, sim, f"/listings/{int(cat.listing_ids[0])}/images").json()["results"][0]
    parts = cdn.parse_image_url(img["url_570xN"])
    for size in cdn.SIZES:
        url = cdn.build_image_url(sim.cdn_base, parts.shop_id, parts.hex, parts.image_id, parts.suffix, size)
        r = http.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == cdn.size_dims(size, img["full_width"], img["full_height"])
    assert len(http.get(img["url_570xN"]).content) > 15_000  # a photo, not a flat colour
    bad = [
        img["url_570xN"].replace(parts.hex, "000000" if parts.hex != "000000" else "111111"),
        img["url_570xN"].replace(f"_{parts.suffix}.", "_zzzzz."),
        img["url_570xN"].replace(f"/{parts.shop_id}/", f"/{parts.shop_id + 1}/"),
        img["url_570xN"].replace("570xN", "571xN"),
        cdn.build_image_url(sim.cdn_base, parts.shop_id, parts.hex, 1, parts.suffix),
        sim.cdn_base + "/favicon.ico",
    ]
    assert [http.get(u).status_code for u in bad] == [404] * len(bad)


def _hist(im: Image.Image) -> np.ndarray:
    a = np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.int64) // 64  # 4 bins a channel
    h = np.bincount((a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]).ravel(), minlength=64).astype(float)
    return h / h.sum()


def test_same_listing_images_look_alike_and_listings_differ():
    cat = Catalogue(120, seed=11)
    multi = [i for i in range(cat.n) if cat.n_images[i] >= 2][:16]
    hists = {i: [_hist(render(cat, int(cat.img_start[i]) + k, "170x135")) for k in range(2)] for i in multi}
    intra = [np.abs(a - b).sum() for a, b in hists.values()]
    inter = [np.abs(hists[a][0] - hists[b][0]).sum() for a in multi for b in multi if a < b]
    assert np.mean(intra) < 0.6 * np.mean(inter)
    assert np.median(inter) > 0.5  # different listings look clearly different


def test_cdn_latency_does_not_serialise_requests():
    with Simulator(listings=40, seed=1, cdn_latency_ms=300) as s:
        urls = _image_urls(s, "75x75")[:8]
        with ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(lambda u: requests.get(u, timeout=10).status_code, urls))
        assert codes == [200] * 8
        assert s.stats["cdn_inflight_max"] >= 4
        stats = requests.get(s.cdn_base + "/_sim/stats").json()
        assert stats["cdn_served"] == 8 and stats["process_cpu_s"] > 0


# ---- determinism and CLI -----------------------------------------------------------------------------------------
def test_same_seed_same_catalogue_and_bytes():
    with Simulator(listings=150, seed=9) as a, Simulator(listings=150, seed=9) as b:

        def page(s):
            r = requests.get(
                s.api_base + "/listings/batch",
                headers={"x-api-key": s.api_key_header},
                params={"listing_ids": ",".join(map(str, s.catalogue.listing_ids[:50])), "includes": "Images,Shop"},
            )
            return json.loads(r.text.replace(s.cdn_base, "CDN"))

        assert page(a) == page(b)
        ua, ub = _image_urls(a, "570xN")[3], _image_urls(b, "570xN")[3]
        assert requests.get(ua).content == requests.get(ub).content
    other = Catalogue(150, seed=10)
    assert other.listing_ids.tolist() != a.catalogue.listing_ids.tolist()


def test_cli_prints_ready_and_stops_on_sigterm():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "imageselector.etsy.simulator", "--port", "0", "--listings", "30", "--faults", ""]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        line = p.stdout.readline().strip()
        assert line.startswith("SIMULATOR READY api_base=http://127.0.0.1:"), line
        fields = dict(kv.split("=", 1) for kv in line.split()[2:])
        r = requests.get(fields["api_base"] + "/openapi-ping", headers={"x-api-key": "sim-keystring:sim-secret"})
        assert r.status_code == 200 and r.json()["application_id"] >= 1
        assert fields["api_base"] == fields["cdn_base"] + "/v3/application"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    bad = subprocess.run([*cmd[:-1], "api_429=2"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)
    assert bad.returncode == 2 and "outside 0..1" in bad.stderr
