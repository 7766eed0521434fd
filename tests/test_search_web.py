"""The search web server: its JSON API and limits over HTTP, then the page end to end in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageselector.search.web import make_server
from tests.helpers.embed_fixtures import standin_registry  # noqa: F401 - session fixture
from tests.helpers.search_home import SearchHome, search_home, search_service  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = os.environ.get("SEARCH_SCREENSHOTS")  # a folder to keep the views' screenshots in (docs/img)


@pytest.fixture(scope="module")
def server(search_service) -> Iterator[str]:  # noqa: F811
    srv = make_server(search_service, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    host, port = srv.server_address[:2]
    yield f"http://{host}:{port}"
    srv.shutdown()
    srv.server_close()
    t.join(5)


def call(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_status_and_page(server: str) -> None:
    code, _, body = call(server + "/api/status")
    st = json.loads(body)
    assert code == 200 and len(st["image_models"]) == 5
    assert any("only structural" in w for w in st["warnings"])
    assert st["fusion"]["weights"]["dinov3_base"] == 1.0
    code, headers, body = call(server + "/")
    assert code == 200 and b'id="drop"' in body and "default-src 'self'" in headers["Content-Security-Policy"]


def test_image_search_over_http(server: str, search_home: SearchHome) -> None:  # noqa: F811
    listing = sorted(search_home.images)[4]
    body = search_home.images[listing][0][1].read_bytes()
    code, _, raw = call(
        server + "/api/search/image?k=4&models=clip_vitb32,dinov3_base", body, {"Content-Type": "image/jpeg"}
    )
    res = json.loads(raw)
    assert code == 200 and res["models"] == ["clip_vitb32", "dinov3_base"] and len(res["results"]) == 4
    top = res["results"][0]
    assert top["listing_id"] == listing
    code, headers, img = call(server + top["image_url"])
    assert code == 200 and headers["Content-Type"] == "image/jpeg" and img == body  # the primary photo, by id


@pytest.mark.parametrize(
    ("path", "data", "status", "message"),
    [
        ("/api/search/image", b"GIF89a not really", 400, "not a readable image"),
        ("/api/search/image", b"", 400, "empty"),
        ("/api/search/image?k=abc", None, 400, "k must be"),
        ("/api/search/text?q=", None, 400, "type something"),
        ("/api/search/text?q=mug&models=dinov2_large", None, 400, "CLIP models only"),
        ("/image/1/2", None, 404, "not found"),
        ("/image/gid/999999", None, 404, "no image"),
        ("/image/../../etc/passwd", None, 404, "not found"),
        ("/etc/passwd", None, 404, "not found"),
    ],
)
def test_errors_are_json_messages(server: str, path: str, data, status: int, message: str, search_home) -> None:  # noqa: F811
    if path.endswith("k=abc"):
        data = search_home.images[sorted(search_home.images)[0]][0][1].read_bytes()
    code, headers, raw = call(server + path, data, {"Content-Type": "application/octet-stream"})
    assert code == status and headers["Content-Type"].startswith("application/json")
    assert message in json.loads(raw)["error"]


def test_upload_limits(server: str, search_service) -> None:  # noqa: F811
    limit = search_service.limits.max_upload_bytes
    req = urllib.request.Request(server + "/api/search/image", data=b"x", method="POST")
    req.add_header("Content-Length", str(limit + 1))  # refused from the header, before any body is read
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=30)
    assert exc.value.code == 413 and "limit" in json.loads(exc.value.read())["error"]
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (9000, 6000)).save(buf, "PNG")  # 54 Mpx, a few hundred kB
    code, _, raw = call(server + "/api/search/image", buf.getvalue(), {"Content-Type": "image/png"})
    assert code == 413 and "too large" in json.loads(raw)["error"]


def copy_of(path: Path, out: Path) -> Path:
    """What a reseller does to a stolen photo: crop, shrink, re-encode."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        im = im.convert("RGB").crop((w // 10, h // 8, w - w // 12, h - h // 10))
        im = im.resize((round(im.width * 0.8), round(im.height * 0.8)))
        im.save(out, "JPEG", quality=60)
    return out


@pytest.mark.browser
def test_page_end_to_end_in_chromium(server: str, search_home: SearchHome, tmp_path: Path) -> None:  # noqa: F811
    """A seller's session: upload, cards, models and weights, more-like-this, back, shared link, detail, copies."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (Debian's package; no browser download)")
    from playwright.sync_api import expect, sync_playwright

    multi = [lid for lid in sorted(search_home.images) if len(search_home.images[lid]) > 2]
    listing = multi[0]
    (primary, _), (matched, photo) = search_home.images[listing][0], search_home.images[listing][-1]
    shots = Path(SCREENSHOT) if SCREENSHOT else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            expect(page.locator("#summary")).to_contain_text("5 image models")
            expect(page.locator("#warnings")).to_contain_text("only structural")
            expect(page.locator("#models input[type=checkbox]")).to_have_count(5)

            # upload a NON-primary photo: the card shows that photo first, the primary beside it
            page.set_input_files("#file", str(photo))
            expect(page).to_have_url(re.compile(r"[?&]upload=[0-9a-f]{64}"), timeout=60_000)
            first = page.locator("#results .card").first
            expect(first).to_have_attribute("data-listing-id", str(listing), timeout=60_000)
            expect(first).to_have_attribute("data-matched-image-id", str(matched))
            expect(first.locator("a.matched img")).to_have_attribute("src", f"/image/{listing}/{matched}")
            expect(first.locator("figure.primary img")).to_have_attribute("src", f"/image/{listing}/{primary}")
            expect(first.locator(".title")).to_have_text(search_home.titles[listing])
            expect(first.locator(".score")).to_contain_text("fused score")
            rows = first.locator("ul.per-model li")
            expect(rows).to_have_count(5)
            expect(rows.first).to_contain_text("#1")  # rank and score are visible text, not a tooltip
            expect(first.locator("a.etsy")).to_have_attribute("href", search_home.urls[listing])
            market = page.locator("#market")
            expect(market).to_be_visible()
            expect(market.locator(".median")).not_to_be_empty()
            expect(market.locator("table.shops tr")).not_to_have_count(0)
            expect(market).to_contain_text("Gaining favorers")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            page.screenshot(path=str(shots / "search.png"))
            upload_url = page.url

            # checkboxes: two models -> the query reruns with those two only; none -> a message
            for m in ("clip_vitl14", "dinov2_large", "dinov3_base"):
                page.uncheck(f"#model-{m}")
            expect(page).to_have_url(re.compile(r"models=clip_vitb32%2Cdinov2_base"), timeout=60_000)
            expect(page.locator("#meta")).to_contain_text("from clip_vitb32, dinov2_base", timeout=60_000)
            expect(first.locator("ul.per-model li")).to_have_count(2)
            page.fill("input.weight[data-model=dinov2_base]", "0")
            page.press("input.weight[data-model=dinov2_base]", "Tab")
            expect(page.locator("#fusion")).to_contain_text("dinov2_base 0.00", timeout=60_000)
            expect(page.locator("#fusion")).to_contain_text("overridden by the request")
            page.uncheck("#model-clip_vitb32")
            page.fill("#q", "photo print")
            page.click("#search-text")
            expect(page.locator("#message")).to_contain_text("needs a CLIP model")
            page.uncheck("#model-dinov2_base")
            expect(page.locator("#message")).to_contain_text("Choose at least one model")
            page.check("#model-clip_vitb32")
            page.click("#search-text")  # text search honours the boxes and the weights too
            expect(page.locator("#meta")).to_contain_text("from clip_vitb32, clip_vitb32_text", timeout=60_000)
            expect(page).to_have_url(re.compile(r"q=photo\+print.*models=clip_vitb32|models=clip_vitb32.*q=photo"))

            # back to the upload, then more like this on another result (stored vectors, query in the URL)
            page.goto(upload_url)
            expect(page.locator("#models input:checked")).to_have_count(5)
            second = page.locator("#results .card").nth(1)
            expect(second).to_have_attribute("data-listing-id", re.compile(r"\d+"), timeout=60_000)
            other = second.get_attribute("data-listing-id")
            other_img = second.get_attribute("data-matched-image-id")
            second.locator("a.more").click()
            expect(page).to_have_url(re.compile(rf"similar={other}%3A{other_img}"))
            expect(first).to_have_attribute("data-listing-id", other, timeout=60_000)
            expect(first).to_have_attribute("data-matched-image-id", other_img)
            expect(page.locator("#meta")).to_contain_text(f"photo {other}:{other_img}")
            expect(page.locator("#preview")).to_have_attribute("src", f"/image/{other}/{other_img}")
            page.screenshot(path=str(shots / "similar.png"))
            similar_url = page.url
            page.go_back()
            expect(page).to_have_url(upload_url)
            expect(first).to_have_attribute("data-listing-id", str(listing), timeout=60_000)
            expect(page.locator("#preview")).to_have_attribute("src", re.compile(r"^/upload/[0-9a-f]{64}$"))

            # a shared link, opened in a fresh tab, shows the same view
            tab = browser.new_page(viewport={"width": 1280, "height": 860})
            tab.goto(similar_url)
            expect(tab.locator("#results .card").first).to_have_attribute("data-listing-id", other, timeout=60_000)
            tab.close()

            # keyboard: Tab to the first card's title, Enter opens the listing's detail
            first.locator("a.title").focus()
            page.keyboard.press("Enter")
            expect(page).to_have_url(re.compile(rf"listing={listing}"))
            detail = page.locator("#detail")
            expect(detail).to_be_visible()
            expect(detail.locator(".detail-title")).to_have_text(search_home.titles[listing])
            expect(detail.locator(".gallery img")).to_have_count(len(search_home.images[listing]))
            expect(detail.locator(".detail-etsy")).to_have_attribute("href", search_home.urls[listing])
            expect(detail.locator("figure.chart")).to_have_count(5)  # price, favorers, views, quantity + shop sales
            expect(detail.locator("figure[data-series=num_favorers] circle.pt")).to_have_count(3)  # 3 snapshots
            expect(detail.locator("figure[data-series=price] polyline")).to_have_count(1)
            expect(detail.locator("table.shop-figures")).to_contain_text("sold (all time)")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#detail img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            page.screenshot(path=str(shots / "detail.png"), full_page=True)
            page.go_back()
            expect(page.locator("#layout")).to_be_visible()
            expect(first).to_have_attribute("data-listing-id", str(listing), timeout=60_000)

            # copies: a cropped, shrunk, re-encoded copy of a catalogued photo finds its source
            page.check("#copies-mode")
            with page.expect_file_chooser() as chooser:
                page.focus("#drop")
                page.keyboard.press("Enter")  # the drop zone opens the file chooser from the keyboard
            chooser.value.set_files(str(copy_of(photo, tmp_path / "stolen.jpg")))
            expect(page).to_have_url(re.compile(r"copies=upload%3A[0-9a-f]{64}"), timeout=60_000)
            card = page.locator(f"#results .card[data-listing-id='{listing}']")
            # the copies answer replaces the cards: wait for it (the previous search's card of the same listing
            # and photo is already there, so the attribute alone does not prove the copies answer arrived)
            expect(card.locator(".score")).to_contain_text("copy score", timeout=60_000)
            expect(card).to_have_attribute("data-matched-image-id", str(matched), timeout=60_000)
            expect(page.locator("#meta")).to_contain_text("reuse the photo")
            page.screenshot(path=str(shots / "copies.png"))

            bad = tmp_path / "notes.jpg"
            bad.write_bytes(b"this is not a photo")
            page.uncheck("#copies-mode")
            page.set_input_files("#file", str(bad))
            expect(page.locator("#message")).to_contain_text("not a readable image", timeout=30_000)
            assert errors == []
        finally:
            browser.close()


def test_serve_from_the_entry_script_and_stop_on_sigterm(search_home: SearchHome) -> None:  # noqa: F811
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [
            sys.executable,
            str(root / "image_search_v2/search.py"),
            "--serve",
            "--port",
            "0",
            "--no-build",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ],
        env=search_home.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("SEARCH READY http://127.0.0.1:"), line
        url = line.split()[-1].rstrip("/")
        code, _, body = call(url + "/api/status")
        assert code == 200 and len(json.loads(body)["image_models"]) == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
