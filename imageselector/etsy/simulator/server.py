"""The simulator's HTTP server: Etsy Open API v3 endpoints and the image CDN on one 127.0.0.1 port.

Request pipeline for the API: auth -> injected 429 -> real per-second / per-day limits -> injected timeout / 5xx
-> handler -> injected malformed JSON. The CDN path is served from the same port (no auth, no API limits).
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from imageselector import cdn
from imageselector.etsy.simulator.catalogue import Catalogue
from imageselector.etsy.simulator.faults import Dice, Faults
from imageselector.etsy.simulator.images import JpegCache
from imageselector.etsy.simulator.ratelimit import RateLimiter

API_PREFIX = "/v3/application"
OFFSET_ERROR = "Offset provided is greater than the maximum offset allowed."
SECRET_ERROR = "Shared secret is required in x-api-key header."
MISSING_KEY_ERROR = "Missing x-api-key header."  # body not documented by Etsy; 403 like the bare-key case
INVALID_KEY_ERROR = "Invalid API key"  # the body Etsy answered for a rejected key (etsy/open-api#498)
QPS_ERROR = "Exceeded per second rate limit"
QPD_ERROR = "Exceeded per day rate limit"
GATEWAY_HTML = (
    "<html><head><title>{code} {text}</title></head><body><center><h1>{code} {text}</h1></center></body></html>"
)
CDN_ERROR_HTML = "<!DOCTYPE html><html><head><title>Error</title></head><body><h1>{text}</h1></body></html>"


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Stats(Counter):
    """Thread-safe counters: requests, status_<code>, 429_qps, 429_qpd, 429_injected, cdn_requests, ..."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def add(self, *keys: str, n: int = 1) -> None:
        with self._lock:
            for k in keys:
                self[k] += n

    def enter(self, gauge: str) -> None:
        """Count one more request in flight for `gauge`, tracking the peak in `<gauge>_max`."""
        with self._lock:
            self[gauge] += 1
            self[gauge + "_max"] = max(self[gauge + "_max"], self[gauge])

    def leave(self, gauge: str) -> None:
        with self._lock:
            self[gauge] -= 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self)


def _int(q: dict, name: str, default: int | None = None) -> int | None:
    v = q.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ApiError(400, f"Invalid value for parameter {name}: expected an integer") from None


def _float(q: dict, name: str) -> float | None:
    v = q.get(name)
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        raise ApiError(400, f"Invalid value for parameter {name}: expected a number") from None
    if not math.isfinite(f) or f < 0:
        raise ApiError(400, f"Invalid value for parameter {name}")
    return f


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "EtsySimulator/1.0"
    wbufsize = 256 << 10  # one send per answer (flushed by handle_one_request): no Nagle/delayed-ACK stalls
    sim: Simulator  # set on the per-simulator subclass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests and benches make thousands of requests
        pass

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.sim.stats.add(f"status_{status}")

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json", headers)

    def _drop(self) -> None:
        """Close the connection without (finishing) an answer."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_HEAD(self):
        self.do_GET()

    def do_POST(self):
        path = urlsplit(self.path).path
        if path.startswith("/_sim/"):
            return self._admin(path)
        self._json(404, {"error": "Not found"})

    def do_GET(self):
        parts = urlsplit(self.path)
        try:
            if parts.path.startswith(API_PREFIX + "/") or parts.path == API_PREFIX:
                self._api(parts.path[len(API_PREFIX) :], parts.query)
            elif parts.path.startswith("/_sim/"):
                self._admin(parts.path)
            else:
                self._cdn(parts.path)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a simulator bug must look like a server error, not a hang-up
            self.sim.stats.add("internal_error")
            self.sim.last_error = f"{type(e).__name__}: {e}"
            self._json(500, {"error": f"simulator internal error: {type(e).__name__}"})

    # ---- admin (test/bench control, not part of Etsy) ------------------------------------------------------------
    def _admin(self, path: str) -> None:
        q = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        if path == "/_sim/stats":  # plus the simulator process's CPU seconds so far
            return self._json(200, {**self.sim.stats.snapshot(), "process_cpu_s": time.process_time()})
        if path == "/_sim/faults":
            if "spec" in q:
                try:
                    self.sim.faults.update(q["spec"])
                except ValueError as e:
                    return self._json(400, {"error": str(e)})
            return self._json(200, {"faults": self.sim.faults.spec()})
        self._json(404, {"error": "Not found"})

    # ---- API -----------------------------------------------------------------------------------------------------
    def _api(self, path: str, query: str) -> None:
        sim, st, f = self.sim, self.sim.stats, self.sim.faults
        st.add("requests")
        key = self.headers.get("x-api-key")
        if key is None or not key.strip():
            st.add("auth_rejected")
            return self._json(403, {"error": MISSING_KEY_ERROR})
        keystring, sep, secret = key.strip().partition(":")
        if not sep or not secret:
            st.add("auth_rejected")
            return self._json(403, {"error": SECRET_ERROR})
        if keystring != sim.api_key or secret != sim.shared_secret:
            st.add("auth_rejected")
            return self._json(403, {"error": INVALID_KEY_ERROR})
        req_key = f"{path}?{query}"
        attempt = sim.dice.attempt(req_key)
        if f.api_429 and sim.dice.draw("api_429", req_key, attempt) < f.api_429:
            st.add("429_injected")
            hdr = {**sim.limiter.peek(), "x-remaining-this-second": "0"}
            if f.retry_after_429:
                hdr["retry-after"] = "1"
            return self._json(429, {"error": QPS_ERROR}, hdr)
        over, retry, rl_headers = sim.limiter.check()
        if over:
            st.add(f"429_{over}")
            hdr = dict(rl_headers)
            if sim.retry_after:
                hdr["retry-after"] = str(max(1, math.ceil(retry)))
            return self._json(429, {"error": QPS_ERROR if over == "qps" else QPD_ERROR}, hdr)
        if f.api_timeout and sim.dice.draw("api_timeout", req_key, attempt) < f.api_timeout:
            st.add("api_timeout_injected")
            time.sleep(f.timeout_s)
            return self._drop()
        if f.api_5xx and sim.dice.draw("api_5xx", req_key, attempt) < f.api_5xx:
            st.add("api_5xx_injected")
            code = (500, 502, 503, 504)[int(sim.dice.draw("api_5xx_code", req_key, attempt) * 4)]
            if code == 500:
                return self._json(500, {"error": "An internal error occurred."}, rl_headers)
            text = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Time-out"}[code]
            return self._send(code, GATEWAY_HTML.format(code=code, text=text).encode(), "text/html", rl_headers)
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        try:
            op, body = sim.route(path, q)
        except ApiError as e:
            return self._json(e.status, {"error": e.message}, rl_headers)
        st.add(f"op_{op}")
        raw = json.dumps(body, separators=(",", ":")).encode()
        if f.api_bad_json and sim.dice.draw("api_bad_json", req_key, attempt) < f.api_bad_json:
            st.add("api_bad_json_injected")
            raw = raw[: max(1, len(raw) // 2)]
        self._send(200, raw, "application/json", rl_headers)

    # ---- CDN -----------------------------------------------------------------------------------------------------
    def _cdn(self, path: str) -> None:
        self.sim.stats.enter("cdn_inflight")
        try:
            self._cdn_answer(path)
        finally:
            self.sim.stats.leave("cdn_inflight")

    def _cdn_answer(self, path: str) -> None:
        sim, st, f = self.sim, self.sim.stats, self.sim.faults
        st.add("cdn_requests")
        if sim.cdn_latency_ms:
            time.sleep(sim.cdn_latency_ms / 1000.0)
        j = sim.resolve_image(path)
        if j is None:
            st.add("cdn_404")
            return self._send(404, CDN_ERROR_HTML.format(text="Not Found").encode(), "text/html")
        image_id = int(sim.catalogue.image_ids[j])
        if f.cdn_404 and sim.dice.draw("cdn_404", image_id) < f.cdn_404:
            st.add("cdn_404", "cdn_404_injected")
            return self._send(404, CDN_ERROR_HTML.format(text="Not Found").encode(), "text/html")
        attempt = sim.dice.attempt(path)
        if f.cdn_slow and sim.dice.draw("cdn_slow", path, attempt) < f.cdn_slow:
            st.add("cdn_slow_injected")
            time.sleep(f.slow_s)
        if f.cdn_5xx and sim.dice.draw("cdn_5xx", path, attempt) < f.cdn_5xx:
            st.add("cdn_5xx_injected")
            code = (500, 502, 503)[int(sim.dice.draw("cdn_5xx_code", path, attempt) * 3)]
            return self._send(code, CDN_ERROR_HTML.format(text="Service Error").encode(), "text/html")
        if f.cdn_not_image and sim.dice.draw("cdn_not_image", path, attempt) < f.cdn_not_image:
            st.add("cdn_not_image_injected")
            page = CDN_ERROR_HTML.format(text="Please enable cookies to continue.").encode()
            return self._send(200, page, "text/html; charset=utf-8")
        data = sim.jpegs.get(j, cdn.parse_image_path(path).size)
        st.add("cdn_served")
        hdr = {"Cache-Control": "public, max-age=31536000", "ETag": f'"{image_id:x}-{len(data):x}"'}
        if f.cdn_truncated and sim.dice.draw("cdn_truncated", path, attempt) < f.cdn_truncated:
            st.add("cdn_truncated_injected")
            cut = data[: max(1, len(data) // 3)]
            if sim.dice.draw("cdn_truncated_kind", path, attempt) < 0.5:
                # honest headers, connection cut mid-body
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(cut)
                st.add("status_200")
                return self._drop()
            return self._send(200, cut, "image/jpeg", hdr)  # a complete response whose JPEG is cut short
        st.add("cdn_bytes", n=len(data))
        self._send(200, data, "image/jpeg", hdr)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


class Simulator:
    """A local Etsy Open API v3 + image CDN. Use as a context manager, or `start()` / `stop()`."""

    def __init__(
        self,
        listings: int = 200,
        seed: int = 1,
        qps: float = 10,
        qpd: int = 10000,
        faults: Faults | None = None,
        max_offset: int = 12000,
        cdn_latency_ms: float = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = "sim-keystring",
        shared_secret: str = "sim-secret",
        retry_after: bool = True,
        cache_mb: int = 256,
        jpeg_quality: int = 85,
        when_made_drift: float = 0.0,
    ):
        self.catalogue = Catalogue(listings, seed, when_made_drift=when_made_drift)
        self.seed = seed
        self.faults = faults if faults is not None else Faults()
        self.max_offset = max_offset
        self.cdn_latency_ms = cdn_latency_ms
        self.api_key, self.shared_secret = api_key, shared_secret
        self.retry_after = retry_after
        self.application_id = 1_000_000 + seed % 1_000_000
        self.limiter = RateLimiter(qps, qpd)
        self.dice = Dice(seed)
        self.stats = Stats()
        self.jpegs = JpegCache(self.catalogue, cache_mb << 20, jpeg_quality)
        self._host, self._port = host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> Simulator:
        handler = type("SimHandler", (Handler,), {"sim": self})
        self._server = _Server((self._host, self._port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="etsy-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "simulator not started"
        return self._server.server_address[1]

    @property
    def cdn_base(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.cdn_base}{API_PREFIX}"

    @property
    def api_key_header(self) -> str:
        """The value of a valid `x-api-key` header."""
        return f"{self.api_key}:{self.shared_secret}"

    @property
    def qps(self) -> float:
        return self.limiter.qps

    @qps.setter
    def qps(self, v: float) -> None:
        self.limiter.qps = v

    @property
    def qpd(self) -> int:
        return self.limiter.qpd

    @qpd.setter
    def qpd(self, v: int) -> None:
        self.limiter.qpd = v

    # ---- routing -------------------------------------------------------------------------------------------------
    def _page(self, q: dict) -> tuple[int, int]:
        limit = _int(q, "limit", 25)
        offset = _int(q, "offset", 0)
        limit = min(100, max(1, limit))
        if offset < 0:
            raise ApiError(400, "Invalid value for parameter offset: expected an integer >= 0")
        if offset > self.max_offset:
            raise ApiError(400, OFFSET_ERROR)
        return limit, offset

    def _sort(self, q: dict) -> tuple[str, str]:
        sort_on = q.get("sort_on") or "created"
        sort_order = q.get("sort_order") or "desc"
        if sort_on not in ("created", "price", "updated", "score"):
            raise ApiError(400, f"Invalid value for parameter sort_on: {sort_on}")
        if sort_order not in ("asc", "ascending", "desc", "descending", "up", "down"):
            raise ApiError(400, f"Invalid value for parameter sort_order: {sort_order}")
        return sort_on, sort_order

    def _listing_page(self, idx, limit: int, offset: int) -> dict:
        cat = self.catalogue
        return {"count": len(idx), "results": [cat.listing_json(int(i)) for i in idx[offset : offset + limit]]}

    def _shop(self, shop_id: str) -> int:
        try:
            s = self.catalogue.shop_index(int(shop_id))
        except ValueError:
            s = None
        if s is None:
            raise ApiError(404, f"Could not find a shop with shop_id = {shop_id}")
        return s

    def route(self, path: str, q: dict) -> tuple[str, object]:
        """(operationId, JSON body) for an authorised GET; `ApiError` for 4xx answers."""
        cat = self.catalogue
        seg = [s for s in path.split("/") if s]
        if seg == ["openapi-ping"]:
            return "ping", {"application_id": self.application_id}
        if seg == ["listings", "active"]:
            limit, offset = self._page(q)
            sort_on, sort_order = self._sort(q)
            idx = cat.search(
                keywords=(q.get("keywords") or "").strip() or None,
                min_price=_float(q, "min_price"),
                max_price=_float(q, "max_price"),
                taxonomy_id=_int(q, "taxonomy_id"),
                shop_location=q.get("shop_location") or None,
                sort_on=sort_on,
                sort_order=sort_order,
            )
            return "findAllListingsActive", self._listing_page(idx, limit, offset)
        if seg == ["listings", "batch"]:
            raw = q.get("listing_ids") or ""
            try:
                ids = [int(x) for x in raw.split(",") if x.strip()]
            except ValueError:
                raise ApiError(400, "Invalid value for parameter listing_ids: expected integers") from None
            if not ids:
                raise ApiError(400, "listing_ids is required")
            if len(ids) > 100:
                raise ApiError(400, "listing_ids may contain at most 100 ids")
            includes = {s.strip().lower() for s in (q.get("includes") or "").split(",") if s.strip()}
            results, seen = [], set()
            for lid in ids:
                i = cat.listing_index(lid)
                if i is None or lid in seen:
                    continue
                seen.add(lid)
                obj = cat.listing_json(i)
                if cat.views_known(i):
                    obj["views"] = int(cat.views[i])
                if "images" in includes:
                    obj["images"] = cat.images_json(i, self.cdn_base)
                if "shop" in includes:
                    obj["shop"] = cat.shop_json(int(cat.shop_of[i]))
                results.append(obj)
            return "getListingsByListingIds", {"count": len(results), "results": results}
        if len(seg) in (2, 3) and seg[0] == "listings":
            try:
                i = cat.listing_index(int(seg[1]))
            except ValueError:
                i = None
            if i is None:
                raise ApiError(404, f"Could not find a Listing with listing_id = {seg[1]}")
            if len(seg) == 3 and seg[2] == "images":
                imgs = cat.images_json(i, self.cdn_base)
                return "getListingImages", {"count": len(imgs), "results": imgs}
            if len(seg) == 2:
                return "getListing", cat.listing_json(i)
        if len(seg) >= 2 and seg[0] == "shops":
            if len(seg) == 2:
                return "getShop", cat.shop_json(self._shop(seg[1]))
            if seg[2:] == ["listings", "active"]:
                s = self._shop(seg[1])
                limit, offset = self._page(q)
                sort_on, sort_order = self._sort(q)
                kw = (q.get("keywords") or "").strip() or None
                idx = cat.search(keywords=kw, sort_on=sort_on, sort_order=sort_order, shop_index=s)
                return "findAllActiveListingsByShop", self._listing_page(idx, limit, offset)
            if seg[2:] == ["reviews"]:
                s = self._shop(seg[1])
                limit, offset = self._page(q)
                lo, hi = _int(q, "min_created"), _int(q, "max_created")
                revs = [
                    r
                    for r in cat.reviews(s)
                    if (lo is None or r["created_timestamp"] >= lo) and (hi is None or r["created_timestamp"] <= hi)
                ]
                return "getReviewsByShop", {"count": len(revs), "results": revs[offset : offset + limit]}
        raise ApiError(404, f"No route found for GET {API_PREFIX}{path}")

    def image_url(self, j: int, size: str = "570xN") -> str:
        """The CDN URL of catalogue image index `j` (as the API lists it) at `size`."""
        cat = self.catalogue
        shop_id = int(cat.shop_ids[cat.shop_of[cat.listing_of_image(j)]])
        return cdn.build_image_url(
            self.cdn_base, shop_id, cat.image_hex(j), int(cat.image_ids[j]), cat.image_suffix(j), size
        )

    def resolve_image(self, path: str) -> int | None:
        """The catalogue image index a CDN path names, or None (unknown image, or hex/suffix/shop/size mismatch)."""
        try:
            p = cdn.parse_image_path(path)
        except ValueError:
            return None
        cat = self.catalogue
        j = cat.image_index(p.image_id)
        if j is None or p.size not in cdn.SIZES:
            return None
        if p.hex != cat.image_hex(j) or p.suffix != cat.image_suffix(j):
            return None
        if p.shop_id != int(cat.shop_ids[cat.shop_of[cat.listing_of_image(j)]]):
            return None
        return j
