"""The search web server on aiohttp.web, bound to 127.0.0.1 unless told otherwise.

Routes (everything else is a JSON 404):
  GET  /                                   the page (page.py); its state lives in the URL query
  GET  /static/search.css|search.js        its stylesheet and script
  GET  /api/status                         models, index kinds, fusion weights in force, warnings, limits
  POST /api/search/image?k=&models=&weights=   body = the image; kept under its content hash (query.upload)
  GET  /api/search/image?upload=<sha256>&...   the same search again from the kept upload
  GET  /api/search/text?q=&k=&models=&weights=
  GET  /api/search/similar?id=LISTING:IMAGE&... more like a catalogued photo, from its STORED vectors
  POST /api/copies?k=&models=              body = the image: catalogued copies of that photo
  GET  /api/copies?id=LISTING:IMAGE | upload=<sha256>
  POST /api/upload                         body = the image -> {"upload": sha256}
  GET  /api/listing/<listing_id>           the detail view's data (photos, snapshots, shop)
  GET  /image/<listing_id>/<image_id>      a catalogued photo, found through the database
  GET  /image/gid/<gid>                    the same, by gid
  GET  /upload/<sha256>                    a kept upload (the page's preview after back/reload)

Hardening (each has a test in tests/test_search_server.py):
- idle/header timeout (`SEARCH_IDLE_TIMEOUT_S`, aiohttp's keep-alive timer also runs while a request's
  headers trickle in) and a body read timeout (`SEARCH_READ_TIMEOUT_S`): a slow client is cut off;
- a listen backlog (`SEARCH_BACKLOG`, 128) so bursts of uploads queue instead of being reset;
- `client_max_size` and a Content-Length check before any body byte is read;
- uploads are checked from their header (imagecheck: format, pixel count) and decoded in a small pool
  (`SEARCH_DECODE_WORKERS`) under a memory budget (`SEARCH_DECODE_MEMORY_MB`): each decode reserves its
  estimated bytes first, so six huge PNGs at once queue instead of taking gigabytes;
- Host must be this server's (DNS rebinding), and a POST's Origin must be this server's (cross-site forms);
- the Server header names no version; error bodies name no absolute path;
- ids out of SQLite's range are 404s; photos are served only as regular files inside the image roots
  (files.py: realpath containment, O_NOFOLLOW, same inode).
Tracebacks go to the log only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from aiohttp import web, web_response
from PIL import Image

from imageselector.imagecheck import check_image
from imageselector.search import listings as catalog
from imageselector.search import page
from imageselector.search.files import read_image_file
from imageselector.search.service import (
    DECODE_SIDE,
    MAX_ID,
    SearchError,
    SearchService,
    open_query_image,
    parse_image_ref,
)
from imageselector.search.uploads import HASH_RE

log = logging.getLogger(__name__)

CSP = "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
SERVER_NAME = "imageselector-search"
STATIC = {
    "/": ("text/html", page.HTML),
    "/static/search.css": ("text/css", page.CSS),
    "/static/search.js": ("text/javascript", page.JS),
}
# aiohttp fills in "Python/3.x aiohttp/3.y" wherever a response has no Server header, including the
# answers its parser gives before any handler runs: name no version there either (server responses only;
# the client's User-Agent is a separate binding).
web_response.SERVER_SOFTWARE = SERVER_NAME
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
PATH_RE = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+[\w.@+-]*")


class DecodeBudget:
    """Bytes of decoded pixels allowed at once; a decode waits until its estimate fits."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_use = 0
        self.peak = 0
        self._cond = asyncio.Condition()

    @staticmethod
    def estimate(width: int, height: int, fmt: str) -> int:
        pixels = width * height
        if fmt == "JPEG":  # Image.draft decodes at 1/2..1/8 scale straight to about DECODE_SIDE
            scale = 1
            while scale < 8 and max(width, height) // (scale * 2) >= DECODE_SIDE:
                scale *= 2
            pixels //= scale * scale
        return pixels * 4 * 3 // 2 + (1 << 20)  # RGBA buffer + the first reduction's copy + slack

    async def acquire(self, n: int) -> None:
        if n > self.total:
            raise SearchError(
                f"the image needs about {n >> 20} MB to decode; this server allows {self.total >> 20} MB", 413
            )
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_use + n <= self.total)
            self.in_use += n
            self.peak = max(self.peak, self.in_use)

    async def release(self, n: int) -> None:
        async with self._cond:
            self.in_use -= n
            self._cond.notify_all()


def _models_param(q) -> list[str] | None:  # type: ignore[no-untyped-def]
    raw = ",".join(q.getall("models", []))
    names = [m.strip() for m in raw.split(",") if m.strip()]
    return names or None


def _host_only(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class SearchApp:
    """The aiohttp application around one SearchService."""

    def __init__(self, service: SearchService, bound_host: str = "127.0.0.1") -> None:
        self.service = service
        s = service.settings
        self.idle_timeout = s.get_float("SEARCH_IDLE_TIMEOUT_S", 15.0)
        self.read_timeout = s.get_float("SEARCH_READ_TIMEOUT_S", 30.0)
        self.backlog = s.get_int("SEARCH_BACKLOG", 128)
        self.decode_pool = ThreadPoolExecutor(s.get_int("SEARCH_DECODE_WORKERS", 2), thread_name_prefix="decode")
        self.search_pool = ThreadPoolExecutor(4, thread_name_prefix="search")
        self.budget_bytes = s.get_int("SEARCH_DECODE_MEMORY_MB", 1024) << 20
        self.budget: DecodeBudget | None = None  # made on the server's loop
        extra = [h.strip().lower() for h in (s.get("SEARCH_ALLOWED_HOSTS") or "").split(",") if h.strip()]
        hosts = {*LOCAL_HOSTS, *extra}
        if bound_host not in ("0.0.0.0", "::", ""):
            hosts.add(bound_host.lower())
        else:  # listening everywhere: this machine's own names too
            name = socket.gethostname().lower()
            hosts |= {name, f"{name}.local"}
        self.allowed_hosts = hosts
        self.home = str(s.home)

    # ------------------------------------------------------------ plumbing
    def make(self) -> web.Application:
        limit = self.service.limits.max_upload_bytes
        app = web.Application(client_max_size=limit + 65536, middlewares=[self._middleware])
        app.on_response_prepare.append(self._headers)
        r = app.router
        for path in STATIC:
            r.add_get(path, self._static)
        r.add_get("/api/status", self._status)
        r.add_post("/api/search/image", self._search_image_post)
        r.add_get("/api/search/image", self._search_image_get)
        r.add_get("/api/search/text", self._search_text)
        r.add_get("/api/search/similar", self._search_similar)
        r.add_post("/api/copies", self._copies_post)
        r.add_get("/api/copies", self._copies_get)
        r.add_post("/api/upload", self._upload)
        r.add_get("/api/listing/{listing_id}", self._listing)
        r.add_get("/image/gid/{gid}", self._image_gid)
        r.add_get("/image/{listing_id}/{image_id}", self._image)
        r.add_get("/upload/{digest}", self._upload_file)
        r.add_get("/favicon.ico", self._favicon)
        return app

    async def _headers(self, request: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["Server"] = SERVER_NAME  # aiohttp would name itself and its version
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("Referrer-Policy", "no-referrer")

    def _clean(self, message: str) -> str:
        """No absolute paths in what a client reads: the home becomes <home>, any other path <path>."""
        return PATH_RE.sub("<path>", message.replace(self.home, "<home>"))

    def _error(self, status: int, message: str) -> web.Response:
        return web.json_response({"error": self._clean(message)}, status=status, headers={"Cache-Control": "no-store"})

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable]
    ) -> web.StreamResponse:
        host = _host_only(request.headers.get("Host", ""))
        if host not in self.allowed_hosts:
            return self._error(421, "this server does not answer to that host name (set SEARCH_ALLOWED_HOSTS)")
        if request.method in UNSAFE:
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.headers.get('Host', '')}":
                return self._error(403, "cross-origin requests are refused")
            if origin is None and request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
                return self._error(403, "cross-origin requests are refused")
        try:
            return await handler(request)
        except SearchError as exc:
            return self._error(exc.status, str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            text = {404: "not found", 405: "method not allowed", 413: "the upload is too large"}.get(
                exc.status, exc.reason
            )
            return self._error(exc.status, text)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:  # noqa: BLE001 - the client gets a message, the log gets the traceback
            log.exception("error serving %s %s", request.method, request.path)
            return self._error(500, "internal error while searching; the server log has the details")

    async def _run(self, fn, *args, **kw):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self.search_pool, partial(fn, *args, **kw))

    def _json(self, obj: dict) -> web.Response:
        return web.json_response(
            obj, dumps=partial(json.dumps, ensure_ascii=False), headers={"Cache-Control": "no-store"}
        )

    async def _body(self, request: web.Request) -> bytes:
        """The request body, refused by Content-Length before reading, and read under the read timeout."""
        n = request.content_length
        if n is None:
            raise SearchError("send the image as the request body with a Content-Length", 411)
        limit = self.service.limits.max_upload_bytes
        if n > limit:
            raise SearchError(f"the file is {n / 1e6:.1f} MB; the limit is {limit / 1e6:.0f} MB", 413)
        try:
            async with asyncio.timeout(self.read_timeout):
                return await request.read()
        except TimeoutError:
            raise SearchError("the upload was too slow; the connection is closed", 408) from None

    async def _decode(self, data: bytes) -> Image.Image:
        """Header check first (size, format, pixels), then the decode in the pool within the memory budget."""
        if not data:
            raise SearchError("the upload is empty")
        limits = self.service.limits
        verdict = await asyncio.get_running_loop().run_in_executor(
            self.decode_pool, partial(check_image, data, limits.max_pixels)
        )
        if verdict.kind == "too_big":
            raise SearchError(f"the image is too large ({verdict.detail})", 413)
        if not verdict.ok:
            raise SearchError(f"not a readable image ({verdict.kind.replace('_', ' ')}: {verdict.detail})")
        if self.budget is None:
            self.budget = DecodeBudget(self.budget_bytes)
        cost = DecodeBudget.estimate(verdict.width, verdict.height, verdict.format)
        await self.budget.acquire(cost)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.decode_pool, partial(open_query_image, data, limits)
            )
        finally:
            await self.budget.release(cost)

    # ------------------------------------------------------------ routes
    async def _static(self, request: web.Request) -> web.Response:
        ctype, text = STATIC[request.path]
        return web.Response(text=text, content_type=ctype, charset="utf-8", headers={"Cache-Control": "no-cache"})

    async def _favicon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _status(self, request: web.Request) -> web.Response:
        return self._json(await self._run(self.service.status))

    def _common(self, request: web.Request) -> dict:
        q = request.query
        return {"k": q.get("k", "20"), "models": _models_param(q), "weights": q.get("weights") or None}

    async def _search_image_post(self, request: web.Request) -> web.Response:
        data = await self._body(request)
        image = await self._decode(data)
        digest = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.service.uploads.put, data)
        return self._json(
            await self._run(self.service.search_image, image, query={"upload": digest}, **self._common(request))
        )

    async def _from_upload(self, digest: str) -> Image.Image:
        if not HASH_RE.match(digest or ""):
            raise SearchError("upload= must be the sha256 the upload returned", 404)
        data = self.service.uploads.get(digest)
        if data is None:
            raise SearchError("this uploaded photo is no longer kept on the server: upload it again", 404)
        return await self._decode(data)

    async def _search_image_get(self, request: web.Request) -> web.Response:
        digest = request.query.get("upload", "")
        image = await self._from_upload(digest)
        return self._json(
            await self._run(self.service.search_image, image, query={"upload": digest}, **self._common(request))
        )

    async def _search_text(self, request: web.Request) -> web.Response:
        return self._json(
            await self._run(self.service.search_text, request.query.get("q", ""), **self._common(request))
        )

    async def _search_similar(self, request: web.Request) -> web.Response:
        lid, iid = parse_image_ref(request.query.get("id", ""))
        return self._json(await self._run(self.service.search_similar, lid, iid, **self._common(request)))

    async def _copies_post(self, request: web.Request) -> web.Response:
        data = await self._body(request)
        image = await self._decode(data)
        digest = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.service.uploads.put, data)
        c = self._common(request)
        return self._json(
            await self._run(
                self.service.find_copies, image=image, k=c["k"], models=c["models"], query={"upload": digest}
            )
        )

    async def _copies_get(self, request: web.Request) -> web.Response:
        c = self._common(request)
        if "upload" in request.query:
            digest = request.query["upload"]
            image = await self._from_upload(digest)
            kw = {"image": image, "query": {"upload": digest}}
        else:
            kw = {"ref": parse_image_ref(request.query.get("id", ""))}
        return self._json(await self._run(self.service.find_copies, k=c["k"], models=c["models"], **kw))

    async def _upload(self, request: web.Request) -> web.Response:
        data = await self._body(request)
        image = await self._decode(data)
        digest = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.service.uploads.put, data)
        return self._json({"upload": digest, "width": image.width, "height": image.height})

    async def _listing(self, request: web.Request) -> web.Response:
        raw = request.match_info["listing_id"]
        if not raw.isdigit() or int(raw) > MAX_ID:
            raise SearchError("no such listing", 404)
        return self._json(await self._run(self.service.listing, int(raw)))

    async def _send_image(self, body: bytes | None) -> web.Response:
        if body is None:
            raise SearchError("image not found", 404)
        ctype = (
            "image/png" if body[:8] == b"\x89PNG\r\n\x1a\n" else "image/webp" if body[8:12] == b"WEBP" else "image/jpeg"
        )
        return web.Response(body=body, content_type=ctype, headers={"Cache-Control": "private, max-age=3600"})

    def _read_image(self, listing_id: int, image_id: int) -> bytes | None:
        try:
            return read_image_file(self.service.settings, self.service.conn(), listing_id, image_id)
        except Exception as exc:  # noqa: BLE001 - sqlite3.Error and friends: the database is not readable now
            raise SearchError(f"database error: {type(exc).__name__}", 503) from None

    async def _image(self, request: web.Request) -> web.Response:
        a, b = request.match_info["listing_id"], request.match_info["image_id"]
        if not (a.isdigit() and b.isdigit()) or int(a) > MAX_ID or int(b) > MAX_ID:
            raise SearchError("not found", 404)
        return await self._send_image(await self._run(self._read_image, int(a), int(b)))

    async def _image_gid(self, request: web.Request) -> web.Response:
        raw = request.match_info["gid"]
        if not raw.isdigit() or int(raw) > MAX_ID:
            raise SearchError("no image with that id", 404)
        found = await self._run(lambda: catalog.locate_gids(self.service.conn(), [int(raw)]))
        if not found:
            raise SearchError("no image with that id", 404)
        return await self._send_image(await self._run(self._read_image, *next(iter(found.values()))))

    async def _upload_file(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        body = self.service.uploads.get(digest) if HASH_RE.match(digest) else None
        if body is None:
            raise SearchError("this uploaded photo is no longer kept on the server", 404)
        return await self._send_image(body)


class SearchServer:
    """An aiohttp server on its own event loop, with the old http.server-like surface
    (`server_address`, `serve_forever()`, `shutdown()`, `server_close()`) the CLI and tests use.

    The socket is bound and listening (with the backlog) when this object is made, so a bad port fails early.
    """

    def __init__(self, service: SearchService, host: str = "127.0.0.1", port: int = 8765) -> None:
        self.app = SearchApp(service, host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=self.app.backlog, reuse_port=False)
        self.server_address = self.sock.getsockname()[:2]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._done = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:  # noqa: ARG002 - http.server's signature
        loop = self._loop = asyncio.new_event_loop()
        runner = web.AppRunner(
            self.app.make(),
            handle_signals=False,
            access_log=log if log.isEnabledFor(logging.DEBUG) else None,
            keepalive_timeout=self.app.idle_timeout,
            lingering_time=2.0,  # after a refused upload, discard at most 2 s of its body, then close
            shutdown_timeout=2.0,
        )
        try:
            loop.run_until_complete(runner.setup())
            site = web.SockSite(runner, self.sock, shutdown_timeout=2.0)
            loop.run_until_complete(site.start())
            self._stop = asyncio.Event()
            self._ready.set()
            loop.run_until_complete(self._stop.wait())
            loop.run_until_complete(runner.cleanup())
        finally:
            self._ready.set()
            loop.close()
            self._done.set()

    def shutdown(self) -> None:
        self._ready.wait(10)
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._done.wait(15)

    def server_close(self) -> None:
        self.sock.close()
        self.app.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.app.search_pool.shutdown(wait=False, cancel_futures=True)


def make_server(service: SearchService, host: str = "127.0.0.1", port: int = 8765) -> SearchServer:
    return SearchServer(service, host, port)


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
