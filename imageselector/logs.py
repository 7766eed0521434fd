"""One logging setup for every script, and a progress meter that logs rate and ETA.

Each script logs to `<home>/<script>.log` (rotating) and to stderr, unless stderr already is that
file (a worker started by the monitor, or `nohup ... > pipeline.log`), so no line is written twice.
Every line carries time, level and stage; known secrets are masked before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s [%(stage)s] %(message)s"


class _StageFilter(logging.Filter):
    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "stage"):
            record.stage = self.stage
        return True


class RedactSecrets(logging.Filter):
    """Replace every known secret in the formatted message by '***'."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            masked = msg
            for s in self.secrets:
                masked = masked.replace(s, "***")
            if masked != msg:
                record.msg, record.args = masked, None
        return True


def _same_file(stream: object, path: Path) -> bool:
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
        a, b = os.fstat(fd), os.stat(path)
    except (OSError, AttributeError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def setup_logging(
    script: str,
    home: Path,
    *,
    stage: str | None = None,
    secrets: Iterable[str] = (),
    level: int = logging.INFO,
    max_bytes: int = 20 * 1024 * 1024,
    backups: int = 5,
    rotate: bool = True,
) -> logging.Logger:
    """Configure the root logger for one script; returns the logger to use.

    `rotate=False` is for extra processes that share a log with the one that rotates it (the downloader's
    `--processes` helpers): they append without ever rotating, and reopen the file when it has been rotated
    under them, so two processes never rename the same files at once and no helper line goes to a stale file.
    """
    home = Path(home)
    with contextlib.suppress(OSError):  # a read-only home: the log goes to stderr only (below)
        home.mkdir(parents=True, exist_ok=True)
    log_path = home / f"{script}.log"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    fmt = logging.Formatter(FORMAT)
    filters: list[logging.Filter] = [_StageFilter(stage or script), RedactSecrets(secrets)]
    handlers: list[logging.Handler] = []
    fh: logging.Handler
    try:
        if rotate:
            fh = logging.handlers.RotatingFileHandler(
                log_path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
        else:
            fh = logging.handlers.WatchedFileHandler(log_path, encoding="utf-8")
        handlers.append(fh)
    except OSError:  # read-only home (search, status): stderr only
        pass
    if not handlers or not _same_file(sys.stderr, log_path):
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
        for f in filters:
            h.addFilter(f)
        root.addHandler(h)
    for noisy in ("urllib3", "httpx", "PIL", "filelock", "huggingface_hub", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def _excepthook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        logging.getLogger(script).critical("uncaught exception", exc_info=(exc_type, exc, tb))

    sys.excepthook = _excepthook
    return logging.getLogger(script)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class Progress:
    """Counts work and logs, at most every `interval` seconds, the rate, totals and an ETA.

    `remaining` (optional) returns the backlog, so the ETA reflects work added meanwhile.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str = "items",
        *,
        interval: float = 30.0,
        remaining: Callable[[], int | None] | None = None,
        clock=time.monotonic,  # type: ignore[no-untyped-def]
    ) -> None:
        self.log = logger
        self.what = what
        self.interval = interval
        self.remaining = remaining
        self.clock = clock
        self.start = self.last = clock()
        self.done = self.failed = 0
        self.nbytes = 0
        self._window_done = 0
        self._window_bytes = 0

    def add(self, n: int = 1, *, failed: int = 0, nbytes: int = 0) -> None:
        self.done += n
        self.failed += failed
        self.nbytes += nbytes
        self._window_done += n
        self._window_bytes += nbytes
        if self.clock() - self.last >= self.interval:
            self.report()

    def rate(self) -> float:
        elapsed = self.clock() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def report(self, final: bool = False) -> str:
        now = self.clock()
        window = max(now - self.last, 1e-9)
        rate_now = self._window_done / window
        rate_all = self.rate()
        parts = [f"{self.done:,} {self.what} done", f"{rate_now:.2f}/s now", f"{rate_all:.2f}/s avg"]
        if self.nbytes:
            parts.append(f"{self._window_bytes / window / 1e6:.2f} MB/s")
        if self.failed:
            parts.append(f"{self.failed:,} failed")
        left = None
        if self.remaining is not None:
            try:
                left = self.remaining()
            except Exception:  # noqa: BLE001 - a status query must never kill the worker
                left = None
        if left is not None:
            eta = left / rate_all if rate_all > 0 else None
            parts.append(f"{left:,} left, ETA {fmt_duration(eta)}")
        line = ("finished: " if final else "") + ", ".join(parts)
        self.log.info(line)
        self.last = now
        self._window_done = 0
        self._window_bytes = 0
        return line
