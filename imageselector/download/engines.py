"""How one image is fetched, judged and stored, and the two concurrency engines that run many at once.

Both engines share the retry policy (`judge`, `Attempts`) and the store step; they differ only in how
requests overlap:

- `ThreadEngine`: N daemon threads, each with its own pooled `requests.Session` (keep-alive), a
  semaphore per host. Daemon threads cannot hold the process open after a stop.
- `AsyncEngine`: one asyncio loop (in a daemon thread) with an aiohttp connector limited per host;
  judging and the fsync'ed write run on a small thread pool so the loop never blocks on the disk.

Both take `Job`s with `submit()` and put one `Outcome` per job on `results`. `drain()` stops new
starts (queued jobs come back as RELEASE); `abort()` also cuts in-flight transfers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

from imageselector.fsutil import atomic_write_bytes
from imageselector.imagecheck import DEFAULT_MAX_PIXELS, NOT_IMAGE, OK, TOO_BIG, TRUNCATED, check_image

log = logging.getLogger(__name__)

USER_AGENT = "imageselector-downloader/1.0"

# Outcome kinds
DONE = "done"  # file durable at job.dest: complete the row
PARK = "park"  # permanent failure: park the row with the reason
RETRY = "retry"  # transient failure after the in-process tries: the database retries it later
RELEASE = "release"  # not attempted / cut off by a stop: hand the row back untouched

# What a single response means
STORE = "store"
AGAIN = "again"


@dataclass(frozen=True)
class EngineOptions:
    concurrency: int = 64
    per_host: int = 64
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    total_timeout: float = 60.0
    tries: int = 3  # attempts within one claim before handing the row back to the database's backoff
    backoff_base: float = 0.5
    backoff_cap: float = 20.0  # longest backoff of our own between two tries
    retry_after_cap: float = 600.0  # a server's Retry-After is honoured up to this (the whole host waits)
    outage_after: int = 16  # this many connection failures in a row, with no answer between: the host is down
    outage_pause: float = 5.0  # first pause of a down host; doubles up to outage_pause_cap
    outage_pause_cap: float = 300.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = 50_000_000


@dataclass(frozen=True)
class Job:
    rid: int
    name: str  # "listing_image", for log lines
    url: str
    dest: Path
    retried: bool = False  # claimed before: a file from that attempt may already be at dest


@dataclass(frozen=True)
class Outcome:
    job: Job
    kind: str
    reason: str = ""
    nbytes: int = 0


@dataclass(frozen=True)
class Step:
    """What one attempt's response means: STORE, PARK or AGAIN (with a reason and an optional wait)."""

    kind: str
    reason: str = ""
    wait: float | None = None  # from Retry-After
    bad_content: bool = False  # truncated or not an image: parked when every try ends like this
    no_answer: bool = False  # connect error or timeout: the host may be down


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class FetchError(Exception):
    """A transport failure (connect, timeout, reset); `truncated` when the body was cut short."""

    def __init__(self, reason: str, truncated: bool = False) -> None:
        super().__init__(reason)
        self.truncated = truncated
        self.no_answer = not truncated  # a cut-off body was an answer; a refused connect or a timeout was not


class Aborted(Exception):
    """The engine was told to abort while this transfer was running."""


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def judge(resp: Response, opts: EngineOptions) -> Step:
    """Classify one HTTP response. 404/410 and non-images park; 429/5xx/timeouts and cut-off bodies retry."""
    st = resp.status
    if st == 200:
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and len(resp.body) < int(declared):
            return Step(AGAIN, f"truncated body ({len(resp.body):,} of {int(declared):,} bytes)", bad_content=True)
        if len(resp.body) > opts.max_bytes:
            return Step(PARK, f"body larger than {opts.max_bytes:,} bytes")
        v = check_image(resp.body, opts.max_pixels)
        if v.kind == OK:
            return Step(STORE)
        if v.kind == TOO_BIG:
            return Step(PARK, v.detail)
        if v.kind in (TRUNCATED, NOT_IMAGE):
            return Step(AGAIN, v.detail, bad_content=True)
    if st in (404, 410):
        return Step(PARK, f"HTTP {st} (image gone from the CDN)")
    if st in (429, 503):
        return Step(AGAIN, f"HTTP {st}", wait=retry_after_s(resp.headers.get("retry-after")))
    if st in (401, 403, 408, 425) or st >= 500:
        return Step(AGAIN, f"HTTP {st}")
    if 400 <= st < 500:
        return Step(PARK, f"HTTP {st}")
    return Step(AGAIN, f"unexpected HTTP {st}")


class Attempts:
    """The per-claim retry loop's bookkeeping, shared by both engines."""

    def __init__(self, job: Job, opts: EngineOptions) -> None:
        self.job = job
        self.opts = opts
        self.n = 0
        self.all_bad_content = True
        self.last: Step | None = None

    def record(self, step: Step) -> float | None:
        """Note a failed attempt; return how long to wait before the next, or None to stop trying now."""
        self.n += 1
        self.last = step
        self.all_bad_content &= step.bad_content
        if self.n >= self.opts.tries:
            return None
        if step.wait is not None:
            return min(step.wait, self.opts.retry_after_cap)
        delay = min(self.opts.backoff_cap, self.opts.backoff_base * 2 ** (self.n - 1))
        return delay * random.uniform(0.5, 1.0)

    def after(self, step: Step, gate: HostGate, host: str) -> Outcome | float:
        """After a response that was not stored: the final Outcome, or seconds to wait before the next try."""
        if step.kind == PARK:
            return Outcome(self.job, PARK, step.reason)
        if step.no_answer and gate.no_answer(host, self.opts):
            return 0.0  # the host is down, not this image: wait on the gate, and this try does not count
        if step.wait:
            gate.pause(host, min(step.wait, self.opts.retry_after_cap))
        delay = self.record(step)
        return self.outcome() if delay is None else delay

    def outcome(self) -> Outcome:
        step = self.last or Step(AGAIN, "no attempt made")
        if self.all_bad_content and self.n >= self.opts.tries:
            return Outcome(self.job, PARK, f"{step.reason} (after {self.n} tries)")
        return Outcome(self.job, RETRY, f"{step.reason} (after {self.n} tries)")


def store(job: Job, body: bytes, tmp_dir: Path) -> None:
    """The only way a file enters images/: temp file in <home>/.tmp, fsync, rename, directory fsync."""
    atomic_write_bytes(job.dest, body, tmp_dir)


def adopt_existing(job: Job, opts: EngineOptions) -> Outcome | None:
    """A whole image already at the destination (written before a crash, before its flag): keep it."""
    try:
        body = job.dest.read_bytes()
    except OSError:
        return None
    if check_image(body, opts.max_pixels).ok:
        return Outcome(job, DONE, "already on disk", nbytes=0)
    return None


def host_of(url: str) -> str:
    return urlsplit(url).netloc


class HostGate:
    """Per-host pauses: after a 429/503 with Retry-After, and while the host looks down.

    A network outage must not burn through the backlog: without this every row would fail its tries,
    then its database retries, and end parked. Once `outage_after` requests in a row got no answer at
    all, the host is paused (5 s, doubling to 5 min) and those tries are not counted against the images.
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._silent: dict[str, int] = {}  # requests in a row without an answer
        self._outages: dict[str, int] = {}  # pauses in the current outage

    def answered(self, host: str) -> None:
        """Any HTTP answer (even a 5xx) shows the host is reachable."""
        if self._outages.pop(host, 0):
            log.warning("%s answers again: resuming downloads", host)
        self._silent[host] = 0

    def no_answer(self, host: str, opts: EngineOptions) -> bool:
        """Count a connect error or timeout; True when the host looks down (it is then paused)."""
        n = self._silent[host] = self._silent.get(host, 0) + 1
        if n < opts.outage_after:
            return False
        if self.wait_s(host) <= 0:  # not paused, or the last pause is over and it still fails: pause longer
            k = self._outages.get(host, 0)
            self._outages[host] = k + 1
            pause = min(opts.outage_pause_cap, opts.outage_pause * 2**k)
            self.pause(host, pause)
            log.warning("%s looks down (%d requests in a row got no answer): pausing %.0f s", host, n, pause)
        return True

    def pause(self, host: str, seconds: float) -> None:
        self._until[host] = max(self._until.get(host, 0.0), time.monotonic() + seconds)

    def wait_s(self, host: str) -> float:
        return max(0.0, self._until.get(host, 0.0) - time.monotonic())


class Engine:
    """Common state of both engines: the result queue, stop flags and the host gate."""

    name = "?"

    def __init__(self, opts: EngineOptions, tmp_dir: Path) -> None:
        self.opts = opts
        self.tmp_dir = tmp_dir
        self.results: queue.Queue[Outcome] = queue.Queue()
        self.draining = threading.Event()  # start nothing new
        self.aborting = threading.Event()  # cut transfers in flight
        self.gate = HostGate()
        self.fatal: str | None = None  # set when the worker must stop (the disk refuses writes)
        self.fatal_exc: OSError | None = None

    def drain(self) -> None:
        self.draining.set()

    def cannot_write(self, job: Job, exc: OSError) -> Outcome:
        """A disk problem (full, read-only, gone) is the machine's, not the image's: stop, fail nothing."""
        if self.fatal is None:
            self.fatal = f"cannot write {job.dest}: {exc}"
            self.fatal_exc = exc
        self.drain()
        return Outcome(job, RELEASE)

    def abort(self) -> None:
        self.draining.set()
        self.aborting.set()

    def submit(self, job: Job) -> None:
        """Start fetching `job`; its Outcome will appear on `results`."""
        raise NotImplementedError

    def close(self, timeout: float = 2.0) -> None:
        """Abort what is left and free threads, connections and the loop."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Threads over pooled requests sessions
# --------------------------------------------------------------------------------------------------


class ThreadEngine(Engine):
    name = "threads"

    def __init__(self, opts: EngineOptions, tmp_dir: Path) -> None:
        super().__init__(opts, tmp_dir)
        import requests  # noqa: F401 - fail early if missing

        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._host_sems: dict[str, threading.BoundedSemaphore] = {}
        self._sem_lock = threading.Lock()
        # Twice as many threads as request slots: a thread busy with fsync does not hold a request slot.
        self._slots = threading.BoundedSemaphore(opts.concurrency)
        self._local = threading.local()
        self._threads = [
            threading.Thread(target=self._work, name=f"download-{i}", daemon=True) for i in range(2 * opts.concurrency)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def close(self, timeout: float = 2.0) -> None:
        self.abort()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _session(self):  # type: ignore[no-untyped-def]
        s = getattr(self._local, "session", None)
        if s is None:
            import requests
            from requests.adapters import HTTPAdapter

            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=2, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers["User-Agent"] = USER_AGENT
            self._local.session = s
        return s

    def _host_sem(self, host: str) -> threading.BoundedSemaphore:
        sem = self._host_sems.get(host)
        if sem is None:
            with self._sem_lock:
                sem = self._host_sems.setdefault(host, threading.BoundedSemaphore(self.opts.per_host))
        return sem

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                out = self._one(job)
            except Exception as exc:  # noqa: BLE001 - one bad job must not kill a worker thread
                log.exception("unexpected error on %s", job.name)
                out = Outcome(job, RETRY, f"internal error: {type(exc).__name__}: {exc}")
            self.results.put(out)

    def _one(self, job: Job) -> Outcome:
        if self.draining.is_set():
            return Outcome(job, RELEASE)
        adopted = adopt_existing(job, self.opts) if job.retried and job.dest.exists() else None
        if adopted is not None:
            return adopted
        tries = Attempts(job, self.opts)
        host = host_of(job.url)
        while True:
            pause = self.gate.wait_s(host)
            if pause and self.draining.wait(pause):
                return Outcome(job, RELEASE)
            if self.draining.is_set():
                return Outcome(job, RELEASE)
            try:
                with self._slots, self._host_sem(host):
                    if self.draining.is_set():
                        return Outcome(job, RELEASE)
                    resp = self._get(job.url)
                self.gate.answered(host)
                step = judge(resp, self.opts)
            except Aborted:
                return Outcome(job, RELEASE)
            except FetchError as exc:
                step = Step(AGAIN, str(exc), bad_content=exc.truncated, no_answer=exc.no_answer)
            if step.kind == STORE:
                try:
                    store(job, resp.body, self.tmp_dir)
                except OSError as exc:
                    return self.cannot_write(job, exc)
                return Outcome(job, DONE, nbytes=len(resp.body))
            wait = tries.after(step, self.gate, host)
            if isinstance(wait, Outcome):
                return wait
            if self.draining.wait(wait):
                return Outcome(job, RELEASE)

    def _get(self, url: str) -> Response:
        import requests

        o = self.opts
        deadline = time.monotonic() + o.total_timeout
        try:
            with self._session().get(url, timeout=(o.connect_timeout, o.read_timeout), stream=True) as r:
                chunks: list[bytes] = []
                n = 0
                for chunk in r.iter_content(65536):
                    chunks.append(chunk)
                    n += len(chunk)
                    if self.aborting.is_set():
                        raise Aborted()
                    if n > o.max_bytes:
                        break
                    if time.monotonic() > deadline:
                        raise FetchError(f"slower than {o.total_timeout:.0f}s in total")
                headers = {k.lower(): v for k, v in r.headers.items()}
                return Response(r.status_code, headers, b"".join(chunks))
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
            raise FetchError(f"body cut short: {_short(exc)}", truncated=True) from None
        except requests.exceptions.Timeout as exc:
            raise FetchError(f"timeout: {_short(exc)}") from None
        except requests.exceptions.RequestException as exc:
            raise FetchError(f"connection error: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# --------------------------------------------------------------------------------------------------
# asyncio + aiohttp
# --------------------------------------------------------------------------------------------------


class AsyncEngine(Engine):
    name = "async"

    def __init__(self, opts: EngineOptions, tmp_dir: Path, io_threads: int | None = None) -> None:
        super().__init__(opts, tmp_dir)
        import aiohttp  # noqa: F401 - fail early if missing

        # fsync is ~10 ms here and overlaps well across threads: enough threads that the disk never paces the loop
        io_threads = io_threads or max(4, min(32, opts.concurrency // 2))
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="download-io")
        self._loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-loop", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._setup())
        self._ready.set()
        self._loop.run_forever()

    async def _setup(self) -> None:
        import aiohttp

        o = self.opts
        self._sem = asyncio.Semaphore(o.concurrency)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=o.concurrency, limit_per_host=o.per_host, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=o.total_timeout, sock_connect=o.connect_timeout, sock_read=o.read_timeout
            ),
            headers={"User-Agent": USER_AGENT},
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # a CDN sets no cookies worth keeping; saves work per response
            read_bufsize=1 << 18,  # a 570xN photo in one or two reads
        )

    def submit(self, job: Job) -> None:
        self._loop.call_soon_threadsafe(self._spawn, job)

    def _spawn(self, job: Job) -> None:
        task = self._loop.create_task(self._guarded(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def abort(self) -> None:
        super().abort()
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._cancel_all)

    def _cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    def close(self, timeout: float = 2.0) -> None:
        self.abort()

        async def _shutdown() -> None:
            await asyncio.sleep(0)
            await self._session.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_shutdown(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _guarded(self, job: Job) -> None:
        try:
            out = await self._one(job)
        except asyncio.CancelledError:
            out = Outcome(job, RELEASE)
        except Exception as exc:  # noqa: BLE001 - one bad job must not stop the loop
            log.exception("unexpected error on %s", job.name)
            out = Outcome(job, RETRY, f"internal error: {type(exc).__name__}: {exc}")
        self.results.put(out)

    async def _one(self, job: Job) -> Outcome:
        if self.draining.is_set():
            return Outcome(job, RELEASE)
        loop = asyncio.get_running_loop()
        if job.retried and job.dest.exists():
            adopted = await loop.run_in_executor(self._pool, adopt_existing, job, self.opts)
            if adopted is not None:
                return adopted
        tries = Attempts(job, self.opts)
        host = host_of(job.url)
        while True:
            pause = self.gate.wait_s(host)
            if pause:
                await asyncio.sleep(pause)
            try:
                async with self._sem:  # a request slot is held for the transfer only, not for the disk
                    if self.draining.is_set():
                        return Outcome(job, RELEASE)
                    resp = await self._get(job.url)
                self.gate.answered(host)
                step = judge(resp, self.opts)  # header parse + end marker: tens of microseconds
            except FetchError as exc:
                step = Step(AGAIN, str(exc), bad_content=exc.truncated, no_answer=exc.no_answer)
            if step.kind == STORE:
                try:
                    await loop.run_in_executor(self._pool, store, job, resp.body, self.tmp_dir)
                except OSError as exc:
                    return self.cannot_write(job, exc)
                return Outcome(job, DONE, nbytes=len(resp.body))
            wait = tries.after(step, self.gate, host)
            if isinstance(wait, Outcome):
                return wait
            await asyncio.sleep(wait)

    async def _get(self, url: str) -> Response:
        import aiohttp

        try:
            async with self._session.get(url) as r:
                declared = r.content_length
                if declared is not None and declared <= self.opts.max_bytes:
                    body = await r.read()
                else:  # unknown or oversized: read at most max_bytes + 1 and let judge() refuse it
                    chunks: list[bytes] = []
                    n = 0
                    async for chunk in r.content.iter_chunked(1 << 18):
                        chunks.append(chunk)
                        n += len(chunk)
                        if n > self.opts.max_bytes:
                            break
                    body = b"".join(chunks)
                headers = {k.lower(): v for k, v in r.headers.items()}
                return Response(r.status, headers, body)
        except aiohttp.ClientPayloadError as exc:
            raise FetchError(f"body cut short: {_short(exc)}", truncated=True) from None
        except TimeoutError:
            raise FetchError(f"timeout after {self.opts.total_timeout:.0f}s or a stalled read") from None
        except aiohttp.ClientError as exc:
            raise FetchError(f"connection error: {_short(exc)}") from None


ENGINES: dict[str, Callable[..., Engine]] = {"threads": ThreadEngine, "async": AsyncEngine}


def make_engine(name: str, opts: EngineOptions, tmp_dir: Path) -> Engine:
    try:
        return ENGINES[name](opts, tmp_dir)
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}") from None
