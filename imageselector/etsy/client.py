"""The Etsy Open API v3 client: one pooled requests.Session, pacing, retries, and rate-limit bookkeeping.

What each kind of failure means here (and why):
- 401/403: the key is wrong; retrying cannot help, so `AuthError` goes straight up (the CLI exits 2).
- 429: honour `retry-after` (every thread holds off), else back off exponentially; a daily-limit 429
  hands over to the pacer's quota wait. 429s never use up the retry budget: the limit passes.
- 5xx, timeouts, connection errors: exponential backoff with full jitter, up to `max_retries`.
- a 200 whose body is not JSON: logged and retried; after the retries it is recorded in
  `bad_records` and the call returns None, so the crawl moves on instead of looping.
- other 4xx: `ApiError` (the caller decides: a vanished shop is skipped, a 400 is recorded).
The last rate-limit headers and the counters are published to kv `sync_stats` every few seconds.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from imageselector import db
from imageselector.etsy.pacing import Pacer, StopRequested

log = logging.getLogger(__name__)

RATE_HEADERS = ("x-limit-per-second", "x-remaining-this-second", "x-limit-per-day", "x-remaining-today")


class AuthError(Exception):
    """The API rejected the key (401/403). Not retried; the CLI exits with code 2."""


class ApiError(Exception):
    """A non-retryable HTTP error (4xx other than 401/403/429)."""

    def __init__(self, status: int, message: str, path: str) -> None:
        super().__init__(f"HTTP {status} on {path}: {message}")
        self.status = status
        self.message = message
        self.path = path


class RetriesExhausted(Exception):
    """5xx / timeouts / connection errors outlasted every retry."""


Request = tuple[str, dict[str, Any] | None]


class StatsPublisher:
    """Writes the client's counters to kv `sync_stats`, at most every `interval` seconds, from any thread."""

    def __init__(self, db_path: Path, interval: float = 5.0) -> None:
        self.db_path = Path(db_path)
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def __call__(self, stats: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        if not self._lock.acquire(blocking=force):
            return  # another thread is writing them right now
        try:
            self._last = now
            if self._conn is None:
                db.connect(self.db_path).close()  # schema in place; then one connection any thread may use
                self._conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=10.0, check_same_thread=False)
                self._conn.execute("PRAGMA busy_timeout=10000")
            db.kv_set(self._conn, db.KV_SYNC_STATS, json.dumps(stats, sort_keys=True))
        except Exception as exc:  # noqa: BLE001 - stats must never stop the crawl
            log.warning("sync_stats not written: %s", exc)
        finally:
            self._lock.release()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class EtsyClient:
    """GET requests against the Etsy API base. Thread-safe; `get_many` runs requests concurrently."""

    def __init__(
        self,
        api_base: str,
        api_key: str,
        shared_secret: str,
        pacer: Pacer,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        concurrency: int = 4,
        publish: Callable[[dict[str, Any], bool], None] | None = None,
        bad_record: Callable[[str, str, str], None] | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.api_base = api_base.rstrip("/")
        self.pacer = pacer
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.concurrency = max(1, concurrency)
        self.publish = publish
        self.bad_record = bad_record
        self.session = session or requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(10, self.concurrency * 2), max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # The key never appears in a log line: it lives only in this header.
        self.session.headers.update({"x-api-key": f"{api_key}:{shared_secret}", "accept": "application/json"})
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.stats: dict[str, Any] = {
            "requests": 0,
            "http_429": 0,
            "http_5xx": 0,
            "timeouts": 0,
            "bad_json": 0,
            "errors": 0,
            "started": time.time(),
        }
        for h in RATE_HEADERS:
            self.stats[h] = None

    # ---- bookkeeping ---------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def _remember_headers(self, headers: Any) -> None:
        with self._lock:
            for h in RATE_HEADERS:
                v = headers.get(h)
                if v is not None:
                    try:
                        self.stats[h] = int(float(v))
                    except ValueError:
                        pass

    def snapshot(self) -> dict[str, Any]:
        """The counters and last rate-limit headers (what kv `sync_stats` holds)."""
        with self._lock:
            out = dict(self.stats)
        out["latency_ms_avg"] = round(out.pop("latency_ms_total", 0) / max(1, out["requests"]), 1)
        out["ts"] = time.time()
        out["qps_target"] = round(self.pacer.qps, 3)
        out["quota_paused"] = self.pacer.paused()
        return out

    def publish_stats(self, force: bool = False) -> None:
        if self.publish is not None:
            self.publish(self.snapshot(), force)

    # ---- requests ------------------------------------------------------------------------------

    def _retry_wait(self, path: str, problem: str, failures: int) -> None:
        """Back off before retry number `failures`, or give up once the retries are spent."""
        if failures > self.max_retries:
            raise RetriesExhausted(f"{path}: {problem} after {failures} attempts")
        delay = self._backoff(failures)
        log.info("%s on %s; retry %d/%d in %.1fs", problem, path, failures, self.max_retries, delay)
        self._sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * (2**attempt)))

    def _sleep(self, seconds: float) -> None:
        stopper = self.pacer.stopper
        if stopper is not None:
            if stopper.wait(seconds):
                raise StopRequested(stopper.reason or "stop requested")
        else:
            time.sleep(seconds)

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """GET `path` (relative to the API base). Returns the JSON object, or None for a body that
        stayed malformed through every retry (recorded in bad_records)."""
        url = self.api_base + path
        failures = 0  # 5xx, timeouts, connection errors, bad JSON: each uses up one retry
        throttled = 0  # 429s: waited out, never fatal
        last_problem = ""
        while True:
            slot = self.pacer.acquire()
            self._count("requests")
            error: requests.RequestException | None = None
            try:
                resp = self.session.get(url, params=params, timeout=self.timeout)
            except requests.RequestException as exc:  # timeout, refused/reset connection, cut-off body
                error = exc
            finally:
                self.pacer.release(slot)
                self._count("latency_ms_total", int((slot.done - slot.sent) * 1000) if slot.done else 0)
                self.publish_stats()
            if error is not None:
                self._count("timeouts")
                last_problem = type(error).__name__
                failures += 1
                self._retry_wait(path, last_problem, failures)
                continue
            self._remember_headers(resp.headers)
            self.pacer.observe(resp.headers)
            status = resp.status_code
            if status in (401, 403):
                raise AuthError(f"Etsy rejected the API key (HTTP {status}: {_error_text(resp)})")
            if status == 429:
                self._count("http_429")
                throttled += 1
                self._on_429(resp, path, throttled)
                continue
            if status >= 500:
                self._count("http_5xx")
                failures += 1
                last_problem = f"HTTP {status}"
                self._retry_wait(path, last_problem, failures)
                continue
            if status >= 400:
                self._count("errors")
                raise ApiError(status, _error_text(resp), path)
            try:
                data = resp.json()
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, got {type(data).__name__}")
                return data
            except ValueError as exc:
                self._count("bad_json")
                failures += 1
                snippet = resp.text[:200].replace("\n", " ")
                if failures > self.max_retries:
                    ref = path + ("?" + "&".join(f"{k}={v}" for k, v in sorted(params.items())) if params else "")
                    log.warning("malformed JSON from %s after %d attempts; recorded and skipped", ref, failures)
                    if self.bad_record is not None:
                        self.bad_record("bad_json", ref, f"{exc}: {snippet}")
                    return None
                delay = self._backoff(failures - 1)
                log.info("malformed JSON from %s (%s); retry %d/%d", path, exc, failures, self.max_retries)
                self._sleep(delay)

    def _on_429(self, resp: requests.Response, path: str, throttled: int) -> None:
        retry_after = _retry_after(resp.headers.get("retry-after"))
        text = _error_text(resp).lower()
        daily = "day" in text or "daily" in text or (retry_after is not None and retry_after > 60)
        if daily:
            log.warning("daily rate limit reached (HTTP 429 on %s)", path)
            self.pacer.quota_exhausted(retry_after)
            return
        delay = retry_after if retry_after is not None else self._backoff(min(throttled, 6))
        log.info("HTTP 429 on %s; holding all requests %.2fs", path, delay)
        self.pacer.hold(delay)

    def ping(self) -> dict[str, Any]:
        """`GET /openapi-ping`: checks the key before any real work (AuthError when it is refused)."""
        data = self.get("/openapi-ping")
        if data is None:
            raise RetriesExhausted("/openapi-ping kept answering malformed JSON")
        return data

    def get_many(self, reqs: Sequence[Request]) -> list[dict[str, Any] | None | Exception]:
        """Run independent GETs concurrently (pacing still applies). Results in order; an ApiError or
        RetriesExhausted comes back as the exception object, AuthError/StopRequested are raised."""
        return self.map(lambda r: self.get(r[0], r[1]), reqs)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """Run `fn(item)` for each item on the client's threads (fn may call `get`, never `map`).
        Results in order; ApiError/RetriesExhausted are returned as values, AuthError/StopRequested raised."""
        if not items:
            return []
        if len(items) == 1 or self.concurrency == 1:
            return [_capture(fn, it) for it in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="etsy")
        futures = [self._pool.submit(_capture, fn, it) for it in items]
        results: list[Any] = []
        fatal: BaseException | None = None
        for f in futures:
            try:
                results.append(f.result())
            except (AuthError, StopRequested) as exc:
                fatal = fatal or exc
                results.append(exc)
        if fatal is not None:
            raise fatal
        return results

    def map_rolling(
        self, fn: Callable[[Any], Any], items: Sequence[Any], on_result: Callable[[Any, Any], None]
    ) -> None:
        """Run `fn(item)` with at most `concurrency` in flight, topping up as each finishes, and hand
        each (item, result) to `on_result` on the calling thread (so it may use the database) while
        the others keep the request slots busy. Result semantics as in `map`."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="etsy")
        todo = list(items)[::-1]
        running: dict[Any, Any] = {}
        fatal: BaseException | None = None
        while todo or running:
            while todo and fatal is None and len(running) < self.concurrency:
                item = todo.pop()
                running[self._pool.submit(_capture, fn, item)] = item
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in done:
                item = running.pop(f)
                try:
                    res = f.result()
                except (AuthError, StopRequested) as exc:
                    fatal = fatal or exc
                    continue
                if fatal is None:
                    on_result(item, res)
        if fatal is not None:
            raise fatal

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.publish_stats(force=True)
        self.session.close()


def _capture(fn: Callable[[Any], Any], item: Any) -> Any:
    try:
        return fn(item)
    except (ApiError, RetriesExhausted) as exc:
        return exc


def _retry_after(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def _error_text(resp: requests.Response) -> str:
    """The `error` field of Etsy's error body, or the start of the raw text."""
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return body["error"]
    except ValueError:
        pass
    return (resp.text or resp.reason or "").strip()[:200]
