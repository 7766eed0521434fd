"""One logging setup for every script, and a progress meter that logs rate and ETA.

Each script logs to `<home>/<script>.log` (rotating) and to stderr, unless stderr already is that
file (a worker started by the monitor, or `nohup ... >> pipeline.log 2>&1`), so no line is written twice;
then stdout and stderr follow the log through its rotations, always appending (see `_FollowStdio`).
Every line carries time, level and stage; known secrets are masked before anything is written, in
messages and in tracebacks alike.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
import threading
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
    """Replace every known secret by '***' in the message, the exception text and the stack text.

    A traceback can carry a secret as well as a message (an exception built from a URL with the key in it),
    so the exception is formatted here, masked, and left in `record.exc_text` for the formatter to use.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def mask(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        msg = record.getMessage()
        masked = self.mask(msg)
        if masked != msg:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _EXC_FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True


_EXC_FORMATTER = logging.Formatter()


def _same_file(stream: object, path: Path) -> bool:
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
        a, b = os.fstat(fd), os.stat(path)
    except (OSError, AttributeError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _stdio_fds_on(path: Path) -> tuple[int, ...]:
    """Which of fd 1 and 2 write to `path` (`nohup ... >> pipeline.log 2>&1`, or a worker the monitor started)."""
    try:
        b = os.stat(path)
    except OSError:
        return ()
    out = []
    for fd in (1, 2):
        try:
            a = os.fstat(fd)
        except OSError:
            continue
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            out.append(fd)
    return tuple(out)


class _FollowStdio:
    """Keeps this process's stdout/stderr on the current log file, in append mode.

    When stdout/stderr is the log file itself, raw writes (a traceback printed by Python or a library,
    faulthandler) would otherwise go through the descriptor the shell or the monitor opened: after a
    rotation it points at a backup, and a descriptor opened without O_APPEND (`> pipeline.log`) writes at its
    own offset, over the start of whatever file it now names. Each time the handler opens its file, fds
    1 and 2 are pointed at a fresh O_APPEND descriptor of that file.
    """

    stdio_fds: tuple[int, ...] = ()
    baseFilename: str

    def __init__(self, path: Path, stdio_fds: tuple[int, ...], **kw) -> None:  # type: ignore[no-untyped-def]
        self.stdio_fds = stdio_fds
        super().__init__(path, **kw)  # type: ignore[call-arg]

    def _open(self):  # type: ignore[no-untyped-def]
        stream = super()._open()  # type: ignore[misc]
        self._point_stdio()
        return stream

    def _point_stdio(self) -> None:
        if not self.stdio_fds:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        try:
            fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            for target in self.stdio_fds:
                os.dup2(fd, target)
        finally:
            os.close(fd)


class _RotatingFile(_FollowStdio, logging.handlers.RotatingFileHandler):
    pass


class _WatchedFile(_FollowStdio, logging.handlers.WatchedFileHandler):
    pass


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
    stdio = _stdio_fds_on(log_path)
    fh: logging.Handler
    try:
        if rotate:
            fh = _RotatingFile(log_path, stdio, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        else:
            fh = _WatchedFile(log_path, stdio, encoding="utf-8")
        handlers.append(fh)
    except OSError:  # read-only home (search, status): stderr only
        pass
    if not handlers or (2 not in stdio and not _same_file(sys.stderr, log_path)):
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

    def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread else "?"
        logging.getLogger(script).critical(
            "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
        )

    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
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


class _Ema:
    """tqdm's exponential moving average (`smoothing`), debiased so the first samples are not pulled to 0."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value = 0.0
        self.calls = 0

    def push(self, x: float) -> None:
        self.value = self.alpha * x + (1 - self.alpha) * self.value
        self.calls += 1

    def get(self) -> float:
        return self.value / (1 - (1 - self.alpha) ** self.calls) if self.calls else 0.0


class Progress:
    """Counts work and logs, every `interval` seconds while work flows, the rate, totals and an ETA.

    The rate is tqdm's: an exponential moving average (weight `smoothing` for the newest interval) of items
    and of seconds over the intervals between lines, so the ETA follows the recent pace, not the average
    since start. Idle time is not work: a pause between completions longer than `idle_after` seconds (and
    five times the usual pause) ends the measured window, and the clock restarts when work comes back;
    after an idle hour, 10 items/s with 1,000 left reads "ETA 1m40s". `avg` is items per busy second.
    `remaining` (optional) returns the backlog, so the ETA reflects work added meanwhile.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str = "items",
        *,
        interval: float = 10.0,
        remaining: Callable[[], int | None] | None = None,
        clock=time.monotonic,  # type: ignore[no-untyped-def]
        smoothing: float = 0.3,
        idle_after: float = 300.0,
    ) -> None:
        self.log = logger
        self.what = what
        self.interval = interval
        self.remaining = remaining
        self.clock = clock
        self.idle_after = idle_after
        self.start = self.last = clock()
        self.done = self.failed = 0
        self.nbytes = 0
        self.busy_s = 0.0  # seconds of measured work (idle pauses left out)
        self._timed = 0  # items counted within measured windows
        self._win_start = self.start
        self._window_done = 0
        self._window_bytes = 0
        self._last_add: float | None = None
        self._gap: float | None = None  # EMA of the pause between two add() calls
        self._ema_dn = _Ema(smoothing)
        self._ema_dt = _Ema(smoothing)
        self._ema_bytes = _Ema(smoothing)

    def _idle(self, gap: float) -> bool:
        if gap <= self.idle_after:
            return False
        if self._gap is None:  # only the first completion can't be compared with the usual pause
            return self._last_add is None
        return gap > 5 * self._gap

    def _close_window(self, end: float) -> None:
        """Fold the current window (since the last line or since work resumed) into the moving averages."""
        dt = end - self._win_start
        if dt > 0 and self._window_done > 0:
            self._ema_dn.push(self._window_done)
            self._ema_dt.push(dt)
            self._ema_bytes.push(self._window_bytes)
            self.busy_s += dt
            self._timed += self._window_done
        self._window_done = 0
        self._window_bytes = 0
        self._win_start = end

    def add(self, n: int = 1, *, failed: int = 0, nbytes: int = 0) -> None:
        now = self.clock()
        gap = now - (self._last_add if self._last_add is not None else self.start)
        self.done += n
        self.failed += failed
        self.nbytes += nbytes
        if self._idle(gap):
            # The work before the pause is a sample of its own; what ends the pause began at an unknown
            # time, so it is counted but not timed, and the next line comes `interval` after work resumed.
            self._close_window(self._last_add if self._last_add is not None else self.start)
            self._win_start = self.last = now
            self._last_add = now
            return
        if self._last_add is not None:
            self._gap = gap if self._gap is None else 0.3 * gap + 0.7 * self._gap
        self._last_add = now
        self._window_done += n
        self._window_bytes += nbytes
        if now - self.last >= self.interval:
            self.report()

    def rate(self) -> float:
        """Items per second, smoothed over the recent intervals (0.0 before the first measured interval)."""
        dt = self._ema_dt.get()
        return self._ema_dn.get() / dt if dt > 0 else 0.0

    def report(self, final: bool = False) -> str:
        now = self.clock()
        end = now
        if final and self._last_add is not None and self._idle(now - self._last_add):
            end = self._last_add  # an idle tail is not work
        self._close_window(end)
        rate = self.rate()
        avg = self._timed / self.busy_s if self.busy_s > 0 else 0.0
        parts = [f"{self.done:,} {self.what} done", f"{rate:.2f}/s now", f"{avg:.2f}/s avg"]
        if self.nbytes:
            dt = self._ema_dt.get()
            parts.append(f"{(self._ema_bytes.get() / dt if dt > 0 else 0.0) / 1e6:.2f} MB/s")
        if self.failed:
            parts.append(f"{self.failed:,} failed")
        left = None
        if self.remaining is not None:
            try:
                left = self.remaining()
            except Exception:  # noqa: BLE001 - a status query must never kill the worker
                left = None
        if left is not None:
            eta = 0.0 if left == 0 else (left / rate if rate > 0 else None)
            parts.append(f"{left:,} left, ETA {fmt_duration(eta)}")
        line = ("finished: " if final else "") + ", ".join(parts)
        self.log.info(line)
        self.last = now
        self._win_start = now
        return line
