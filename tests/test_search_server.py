"""The search server's hardening, point by point, against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from imageselector.config import load_settings
from imageselector.search.service import SearchService
from imageselector.search.web import SearchServer, make_server
from tests.helpers.embed_fixtures import standin_registry  # noqa: F401 - session fixture
from tests.helpers.search_home import SearchHome, search_home, search_service  # noqa: F401


def start(srv: SearchServer) -> Iterator[SearchServer]:
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


@pytest.fixture(scope="module")
def srv(search_service) -> Iterator[SearchServer]:  # noqa: F811
    s = make_server(search_service, "127.0.0.1", 0)
    s.app.idle_timeout = 1.5  # short timeouts so the slow clients below are cut off quickly
    s.app.read_timeout = 1.5
    yield from start(s)


def request(
    srv: SearchServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = srv.server_address
    c = http.client.HTTPConnection(host, port, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def raw(srv: SearchServer, data: bytes) -> bytes:
    with socket.create_connection(srv.server_address, timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(buf, "JPEG")
    return buf.getvalue()


def test_server_header_names_no_version(srv: SearchServer) -> None:
    for path in ("/", "/nowhere", "/api/listing/1"):
        _, headers, _ = request(srv, "GET", path)
        assert headers["Server"] == "imageselector-search"
    reply = raw(srv, b"BROKEN / HTTP/9\r\n\r\n")  # a request the parser rejects before any handler
    assert reply.startswith(b"HTTP/1.0 400") and b"aiohttp" not in reply and b"Python/" not in reply


def test_host_check_against_dns_rebinding(srv: SearchServer) -> None:
    port = srv.server_address[1]
    assert request(srv, "GET", "/api/status", headers={"Host": f"127.0.0.1:{port}"})[0] == 200
    assert request(srv, "GET", "/api/status", headers={"Host": f"localhost:{port}"})[0] == 200
    code, _, body = request(srv, "GET", "/api/status", headers={"Host": f"attacker.example:{port}"})
    assert code == 421 and "host" in json.loads(body)["error"]
    assert request(srv, "GET", "/image/1/2", headers={"Host": "rebind.attacker.example"})[0] == 421


def test_origin_check_against_cross_site_posts(srv: SearchServer) -> None:
    host, port = srv.server_address
    body = jpeg(1)
    code, _, raw_body = request(srv, "POST", "/api/upload", body, {"Origin": "http://evil.example"})
    assert code == 403 and "cross-origin" in json.loads(raw_body)["error"]
    assert request(srv, "POST", "/api/upload", body, {"Sec-Fetch-Site": "cross-site"})[0] == 403
    code, _, raw_body = request(srv, "POST", "/api/upload", body, {"Origin": f"http://{host}:{port}"})
    assert code == 200 and len(json.loads(raw_body)["upload"]) == 64
    assert request(srv, "POST", "/api/upload", body)[0] == 200  # scripts send no Origin


@pytest.mark.parametrize(
    "path",
    [
        "/image/99999999999999999999/1",
        "/image/1/99999999999999999999999",
        "/image/gid/99999999999999999999",
        "/api/listing/99999999999999999999",
        "/api/listing/12abc",
        "/api/search/similar?id=99999999999999999999:1",
        "/api/search/similar?id=1:2",
        "/api/copies?id=99999999999999999999:5",
        "/api/search/image?upload=" + "0" * 64,
        "/upload/" + "f" * 64,
        "/upload/../../etc/passwd",
    ],
)
def test_out_of_range_and_unknown_ids_are_404(srv: SearchServer, path: str) -> None:
    code, headers, body = request(srv, "GET", path)
    assert code == 404 and headers["Content-Type"].startswith("application/json") and json.loads(body)["error"]


def test_error_bodies_name_no_absolute_path(home: Path, standin_registry: Path) -> None:  # noqa: F811
    # an empty home: the database and index errors would name the home's paths
    service = SearchService(load_settings(home), models_file=str(standin_registry), device="cpu", dtype="fp32")
    for s in start(make_server(service, "127.0.0.1", 0)):
        for path in ("/api/search/text?q=mug", "/api/listing/5", "/api/search/similar?id=1:2"):
            code, _, body = request(s, "GET", path)
            text = body.decode()
            assert code >= 400 and json.loads(text)["error"]
            assert str(home) not in text and "/tmp" not in text and not any(f"/{d}/" in text for d in ("home", "root"))
        assert "<home>" in request(s, "GET", "/api/search/text?q=mug")[2].decode()


def test_image_routes_serve_only_regular_files_inside_the_roots(
    srv: SearchServer,
    search_home: SearchHome,  # noqa: F811
    tmp_path: Path,
) -> None:
    listing = [lid for lid in sorted(search_home.images) if len(search_home.images[lid]) > 1][-1]
    (iid, path), (iid2, path2) = search_home.images[listing][0], search_home.images[listing][-1]
    assert request(srv, "GET", f"/image/{listing}/{iid}")[0] == 200
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$secret-hash")
    saved = path.read_bytes()
    try:
        path.unlink()
        path.symlink_to(secret)  # a planted link in images/ to a file outside
        code, _, body = request(srv, "GET", f"/image/{listing}/{iid}")
        assert code == 404 and b"secret" not in body
        path.unlink()
        os.mkfifo(path)  # not a regular file: must not hang or be served
        assert request(srv, "GET", f"/image/{listing}/{iid}")[0] == 404
        path.unlink()
        path.mkdir()
        assert request(srv, "GET", f"/image/{listing}/{iid}")[0] == 404
        path.rmdir()
        # a link inside the root to another catalogued photo is still inside: served
        path.symlink_to(path2)
        code, _, body = request(srv, "GET", f"/image/{listing}/{iid}")
        assert code == 200 and body == path2.read_bytes()
    finally:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif path.is_symlink() or path.exists():
            path.unlink()
        path.write_bytes(saved)
    assert request(srv, "GET", f"/image/{listing}/{iid}")[2] == saved and iid2 != iid


def test_content_length_required_and_checked_before_reading(srv: SearchServer, search_service) -> None:  # noqa: F811
    limit = search_service.limits.max_upload_bytes
    head = f"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {limit + 1}\r\n\r\n".encode()
    reply = raw(srv, head + b"x" * 1000)  # the rest of the body never comes: the answer must not wait for it
    assert reply.startswith(b"HTTP/1.1 413") and b"limit" in reply
    chunked = (
        b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert raw(srv, chunked).startswith(b"HTTP/1.1 411")
    assert srv.app.make()._client_max_size == limit + 65536  # aiohttp's own cap behind the check


def test_fifty_concurrent_uploads_see_no_reset(srv: SearchServer) -> None:
    def one(i: int) -> int:
        code, _, body = request(srv, "POST", "/api/search/image?k=3&models=dinov2_base", jpeg(i), {})
        assert json.loads(body)["results"]
        return code

    barrier_pool = ThreadPoolExecutor(50)
    try:
        codes = list(barrier_pool.map(one, range(50)))  # ConnectionResetError would propagate here
    finally:
        barrier_pool.shutdown()
    assert codes == [200] * 50
    assert srv.app.backlog >= 50


def test_slow_loris_headers_and_body_are_cut_off(srv: SearchServer) -> None:
    """A client trickling headers (or a body) is disconnected by the idle/read timeouts, and others are served."""
    trickled = []
    clients = []
    for _ in range(10):
        s = socket.create_connection(srv.server_address, timeout=30)
        s.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        clients.append(s)
    assert request(srv, "GET", "/api/status")[0] == 200  # served while the slow ones hang on
    s = clients[0]
    s.settimeout(1.0)
    closed = False
    for i in range(120):  # one header byte every second at most, for up to 2 minutes: the server must hang up first
        try:
            s.sendall(b"X"[:1] if i % 2 else b"-")
            got = s.recv(4096)
            if got == b"":
                closed = True
                break
        except TimeoutError:
            trickled.append(i)
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
    assert closed and len(trickled) < 60
    for c in clients:
        c.close()
    # a slow BODY: headers complete, then nothing more -> 408 and the connection closes
    with socket.create_connection(srv.server_address, timeout=60) as b:
        b.sendall(b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\n" + jpeg(3)[:100])
        reply = b""
        while chunk := b.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"too slow" in reply


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG")  # a few hundred kB that decode to w*h bytes and more
    return buf.getvalue()


def test_decoding_is_bounded_by_a_memory_budget(search_service) -> None:  # noqa: F811
    s = make_server(search_service, "127.0.0.1", 0)
    s.app.budget_bytes = 200 << 20  # 200 MB: one 5000x5000 image (about 150 MB estimated) at a time
    big, huge = png_bytes(5000, 5000), png_bytes(6300, 6300)
    for srv in start(s):
        code, _, body = request(srv, "POST", "/api/upload", huge)  # 39.7 Mpx: under the pixel limit, over the budget
        assert code == 413 and "to decode" in json.loads(body)["error"]
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _, srv=srv: request(srv, "POST", "/api/upload", big)[0], range(4)))
        assert codes == [200] * 4
        budget = srv.app.budget
        assert budget is not None and 0 < budget.peak <= budget.total and budget.in_use == 0
