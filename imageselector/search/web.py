"""The search web server: stdlib http.server, bound to 127.0.0.1 unless told otherwise.

Routes (everything else is 404):
  GET  /                               the page (page.py)
  GET  /static/search.css|search.js    its stylesheet and script
  GET  /api/status                     models, index kinds, fusion weights in force, warnings, limits
  POST /api/search/image?k=&models=    body = the image bytes (Content-Length required, size-limited)
  GET  /api/search/text?q=&k=&models=
  GET  /image/<listing_id>/<image_id>  a catalogued image, found through the database
  GET  /image/gid/<gid>                the same, by gid
No route takes a file path: images are looked up by id, so nothing outside the catalogue can be read.
Every error is a JSON {"error": message} with a 4xx/5xx status; tracebacks go to the log only.
A background thread builds/updates the HNSW caches of big indexes (indexes.py) while queries are served.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from imageselector.search import listings as catalog
from imageselector.search import page
from imageselector.search.service import SearchError, SearchService, open_query_image

log = logging.getLogger(__name__)

CSP = "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
STATIC = {
    "/": ("text/html; charset=utf-8", page.HTML),
    "/static/search.css": ("text/css; charset=utf-8", page.CSS),
    "/static/search.js": ("text/javascript; charset=utf-8", page.JS),
}
IMAGE_RE = re.compile(r"^/image/(\d{1,19})/(\d{1,19})$")
GID_RE = re.compile(r"^/image/gid/(\d{1,19})$")


def _models_param(qs: dict[str, list[str]]) -> list[str] | None:
    raw = ",".join(qs.get("models", []))
    names = [m.strip() for m in raw.split(",") if m.strip()]
    return names or None


class Handler(BaseHTTPRequestHandler):
    server_version = "imageselector-search"
    service: SearchService  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------ plumbing
    def log_message(self, fmt: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(
            status,
            json.dumps(obj, ensure_ascii=False).encode("utf-8"),
            "application/json; charset=utf-8",
            {"Cache-Control": "no-store"},
        )

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _guard(self, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
        except SearchError as exc:
            self._error(exc.status, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # noqa: BLE001 - the client gets a message, the log gets the traceback
            log.exception("error serving %s %s", self.command, self.path)
            try:
                self._error(500, "internal error while searching; the server log has the details")
            except OSError:
                pass

    # ------------------------------------------------------------ routes
    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        self._guard(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guard(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        qs = parse_qs(url.query)
        if url.path in STATIC:
            ctype, text = STATIC[url.path]
            self._send(200, text.encode("utf-8"), ctype, {"Cache-Control": "no-cache"})
        elif url.path == "/api/status":
            self._json(200, self.service.status())
        elif url.path == "/api/search/text":
            text = (qs.get("q") or [""])[0]
            k = (qs.get("k") or ["20"])[0]
            self._json(200, self.service.search_text(text, k, _models_param(qs)))  # type: ignore[arg-type]
        elif m := IMAGE_RE.match(url.path):
            self._image(int(m.group(1)), int(m.group(2)))
        elif m := GID_RE.match(url.path):
            found = catalog.locate_gids(self.service.conn(), [int(m.group(1))])
            if not found:
                raise SearchError("no image with that id", 404)
            self._image(*next(iter(found.values())))
        elif url.path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._error(404, "not found")

    def _post(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/api/search/image":
            self._drain_or_close()
            raise SearchError("not found", 404)
        qs = parse_qs(url.query)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise SearchError("send the image as the request body with a Content-Length", 411)
        n = int(length)
        limit = self.service.limits.max_upload_bytes
        if n > limit:
            self.close_connection = True  # do not read a body we refuse
            raise SearchError(f"the file is {n / 1e6:.1f} MB; the limit is {limit / 1e6:.0f} MB", 413)
        data = self.rfile.read(n)
        image = open_query_image(data, self.service.limits)
        k = (qs.get("k") or ["20"])[0]
        self._json(200, self.service.search_image(image, k, _models_param(qs)))  # type: ignore[arg-type]

    def _drain_or_close(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= 65536:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _image(self, listing_id: int, image_id: int) -> None:
        try:
            path = catalog.image_file(self.service.settings, self.service.conn(), listing_id, image_id)
        except sqlite3.Error as exc:
            raise SearchError(f"database error: {exc}", 503) from None
        if path is None:
            raise SearchError("image not found", 404)
        try:
            body = path.read_bytes()
        except OSError:
            raise SearchError("image not readable", 404) from None
        ctype = "image/png" if body[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
        self._send(200, body, ctype, {"Cache-Control": "private, max-age=3600"})


class SearchServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(service: SearchService, host: str = "127.0.0.1", port: int = 8765) -> SearchServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    return SearchServer((host, port), handler)


class CacheBuilder(threading.Thread):
    """Keeps HNSW caches of big indexes current in the background; queries use exact search meanwhile."""

    def __init__(self, service: SearchService, every_s: float = 60.0) -> None:
        super().__init__(name="hnsw-cache", daemon=True)
        self.service = service
        self.every_s = every_s
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.service.indexes.refresh()
                todo = self.service.indexes.needing_build()
                if todo:
                    log.info("building HNSW caches for %s in the background", ", ".join(todo))
                    self.service.indexes.build_caches(
                        todo, tmp_dir=self.service.settings.tmp_dir, should_stop=self.stop.is_set
                    )
            except Exception:  # noqa: BLE001 - keep serving; try again later
                log.exception("HNSW cache build failed; queries keep using exact search")
            self.stop.wait(self.every_s)
