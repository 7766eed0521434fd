"""The search web server: its JSON API and limits over HTTP, then the page end to end in headless Chromium."""

from __future__ import annotations

import json
import os
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
SCREENSHOT = os.environ.get("SEARCH_SCREENSHOT")  # set to keep the page screenshot somewhere


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


@pytest.mark.browser
def test_page_end_to_end_in_chromium(server: str, search_home: SearchHome, tmp_path: Path) -> None:  # noqa: F811
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (Debian's package; no browser download)")
    from playwright.sync_api import expect, sync_playwright

    listing = sorted(search_home.images)[1]
    photo = search_home.images[listing][0][1]
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
            page = browser.new_page(viewport={"width": 1366, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            expect(page.locator("#summary")).to_contain_text("5 image models")
            expect(page.locator("#warnings")).to_contain_text("only structural")
            expect(page.locator("#fusion")).to_contain_text("reciprocal-rank fusion")

            page.set_input_files("#file", str(photo))  # what the drop zone's file chooser receives
            first = page.locator("#results .card").first
            expect(first).to_have_attribute("data-listing-id", str(listing), timeout=60_000)
            expect(first.locator(".title")).to_have_text(search_home.titles[listing])
            expect(first.locator("a").last).to_have_attribute("href", f"https://www.etsy.com/listing/{listing}")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            expect(page.locator("#message")).to_be_hidden()
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
            if SCREENSHOT:
                page.screenshot(path=SCREENSHOT, full_page=True)

            # drag and drop: a File built in the page from another listing's photo, dropped on the box
            other = sorted(search_home.images)[5]
            other_img = search_home.images[other][0][0]
            page.evaluate(
                """async (url) => {
                    const blob = await (await fetch(url)).blob();
                    const dt = new DataTransfer();
                    dt.items.add(new File([blob], "dropped.jpg", { type: "image/jpeg" }));
                    const drop = document.getElementById("drop");
                    drop.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
                    drop.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
                }""",
                f"/image/{other}/{other_img}",
            )
            expect(page.locator("#results .card").first).to_have_attribute(
                "data-listing-id", str(other), timeout=60_000
            )

            page.fill("#q", "orange photo print")
            page.click("#search-text")
            expect(page.locator("#meta")).to_contain_text('for "orange photo print"', timeout=60_000)
            assert page.locator("#results .card").count() > 0

            bad = tmp_path / "notes.jpg"
            bad.write_bytes(b"this is not a photo")
            page.set_input_files("#file", str(bad))
            expect(page.locator("#message")).to_contain_text("not a readable image", timeout=30_000)
            assert page.locator("#results .card").count() == 0
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
