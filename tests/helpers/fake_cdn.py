"""A scripted CDN for the downloader's policy tests: each path answers a given sequence of responses.

The simulator's CDN (imageselector.etsy.simulator) draws faults at random rates; these tests need exact
sequences instead (two 503s with Retry-After, then a photo; a connection cut mid-body; a 410).
"""

from __future__ import annotations

import io
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def free_port() -> int:
    """A port nothing listens on (for a CDN that is down), free to bind a FakeCdn to later."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_bytes(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    im = Image.new("RGB", (w, h), ((seed * 37) % 256, (seed * 91) % 256, 120))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


@dataclass
class Reply:
    status: int = 200
    body: bytes | None = None  # None: a JPEG
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the headers
    cut_after: int | None = None  # declare the full length, send this many bytes, drop the connection


class FakeCdn:
    """`with FakeCdn() as cdn: cdn.script[path] = [Reply(503), Reply()]`; then `cdn.base`, `cdn.hits[path]`.

    The n-th request for a path gets the n-th reply of its script (the last one repeats); unscripted paths get a JPEG.
    """

    def __init__(self, port: int = 0) -> None:
        self.script: dict[str, list[Reply]] = {}
        self.hits: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}  # monotonic arrival times per path
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                with outer.lock:
                    n = outer.hits.get(self.path, 0)
                    outer.hits[self.path] = n + 1
                    outer.times.setdefault(self.path, []).append(time.monotonic())
                    seq = outer.script.get(self.path) or [Reply()]
                    reply = seq[min(n, len(seq) - 1)]
                if reply.delay:
                    time.sleep(reply.delay)
                body = reply.body if reply.body is not None else jpeg_bytes(seed=len(self.path))
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "image/jpeg" if reply.body is None else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                if reply.cut_after is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(body if reply.cut_after is None else body[: reply.cut_after])
                    self.wfile.flush()
                except OSError:
                    return
                if reply.cut_after is not None:
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeCdn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
