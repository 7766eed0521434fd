"""Request pacing for the Etsy API: the per-second rate from `qps_config.json`, and the daily budget.

The server (Etsy, and the simulator: measured in its code) counts accepted requests in a sliding 1 s
window, at the moment it handles each one. That moment is unknown to us, but it lies between when we
started sending (s) and when the answer came back (r). So if a new request is sent only when fewer
than `n` earlier ones ended (r) within the last window, no server window can ever hold more than `n`,
whatever the network or thread-scheduling jitter: zero 429s by construction, at a cost of one latency
per window (a few ms locally). `skew` caps that cost on slow links: a request counts as checked at
most `skew` seconds after it was sent. A pause (slow response, database write) is made up by the
next sends, up to `n` back to back, so the rate stays at `n` per window instead of losing the slot.

n = floor(qps) per window of `(1 + margin) * n / qps` seconds (1 s + margin for a whole qps).

The daily budget: responses carry `x-remaining-today`; when it falls to the reserve, `acquire` stops
handing out slots, logs when it will look again, and waits (a stop request ends the wait).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageselector import qps_config

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """The stopper fired while a request was waiting for its slot."""


class Slot:
    """One request's place in the window: sent at `sent`, counted by the server no later than `end()`."""

    __slots__ = ("sent", "skew", "done")

    def __init__(self, sent: float, skew: float) -> None:
        self.sent = sent
        self.skew = skew
        self.done: float | None = None

    def end(self) -> float:
        return self.done if self.done is not None else self.sent + self.skew


@dataclass
class QuotaState:
    """The last daily-budget figures seen, and whether requests are held back."""

    remaining_today: int | None = None
    limit_per_day: int | None = None
    paused_until: float | None = None  # wall-clock time


class Pacer:
    """Thread-safe request limiter. Call `acquire()` before every request, `observe()` after it."""

    def __init__(
        self,
        config_path: Path,
        *,
        tmp_dir: Path | None = None,
        margin: float = 0.01,
        skew: float = 0.25,
        daily_reserve: int = 200,
        quota_recheck_s: float = 600.0,
        stopper: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config_path = Path(config_path)
        self.tmp_dir = tmp_dir
        self.margin = margin
        self.skew = skew
        self.on_wait: Callable[[], None] | None = None  # called while waiting on the quota (heartbeats)
        self.daily_reserve = daily_reserve
        self.quota_recheck_s = quota_recheck_s
        self.stopper = stopper
        self.clock = clock
        self.wall = wall
        self.quota = QuotaState()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._slots: deque[Slot] = deque()
        self._mtime: float | None = None
        self._qps = qps_config.DEFAULT_QPS
        self._server_limit: int | None = None
        self._hold_until = 0.0  # monotonic; set by a 429 with retry-after
        self._quota_probe = False
        self._quota_paused = False
        self._exhausted = False  # a daily-limit 429 was seen and no later response said otherwise
        self._ensure()
        self._reload(force=True)

    # ---- configuration -------------------------------------------------------------------------

    def _ensure(self) -> None:
        if qps_config.ensure(self.config_path, self.tmp_dir):
            log.info("created %s with the default %.1f QPS", self.config_path.name, qps_config.DEFAULT_QPS)

    def _reload(self, force: bool = False) -> None:
        try:
            mtime = self.config_path.stat().st_mtime_ns
        except FileNotFoundError:
            self._ensure()
            mtime = self.config_path.stat().st_mtime_ns
        if not force and mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            cfg = qps_config.read(self.config_path)
        except qps_config.QpsConfigError as exc:
            log.warning("%s unreadable (%s); keeping %.2f QPS", self.config_path.name, exc, self._qps)
            return
        if cfg is None:  # removed between stat and read: the next window recreates it
            return
        for warning in cfg.warnings:  # once per change of the file, not per request
            log.warning("%s: %s", self.config_path.name, warning)
        if cfg.qps != self._qps or force:
            if not force:
                log.info("%s changed: pacing at %.2f QPS (was %.2f)", self.config_path.name, cfg.qps, self._qps)
            self._qps = cfg.qps

    @property
    def qps(self) -> float:
        """The rate in force: the configured one, capped by the server's own per-second limit."""
        self._reload()
        if self._server_limit:
            return min(self._qps, float(self._server_limit))
        return self._qps

    def window(self) -> tuple[int, float]:
        """(n, w): at most n sends in any w seconds."""
        qps = self.qps
        n = max(1, math.floor(qps + 1e-9))
        return n, (1.0 + self.margin) * n / qps

    # ---- the per-second limit ------------------------------------------------------------------

    def _wait(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.stopper is not None:
            if self.stopper.wait(seconds):
                raise StopRequested(self.stopper.reason or "stop requested")
        else:
            time.sleep(seconds)

    def acquire(self) -> Slot:
        """Block until a request may be sent; pass the returned slot to `release` once answered.
        Raises StopRequested if told to stop meanwhile."""
        while True:
            if self.stopper is not None and self.stopper.should_stop():
                raise StopRequested(self.stopper.reason or "stop requested")
            self._wait_for_quota()
            with self._cond:
                n, w = self.window()
                now = self.clock()
                while self._slots and self._slots[0].end() <= now - w:
                    self._slots.popleft()
                delay = self._hold_until - now
                if delay <= 0:
                    ends = sorted(e for e in (sl.end() for sl in self._slots) if e > now - w)
                    if len(ends) < n:
                        slot = Slot(now, self.skew)
                        self._slots.append(slot)
                        return slot
                    delay = ends[len(ends) - n] + w - now
                if delay < 0.5:
                    self._cond.wait(max(delay, 0.0005))  # a release may free a slot sooner
                    continue
            self._wait(delay)

    def release(self, slot: Slot) -> None:
        """The answer to `slot`'s request has arrived (or it failed): the server has counted it by now."""
        with self._cond:
            slot.done = min(self.clock(), slot.sent + slot.skew)
            self._cond.notify_all()

    def hold(self, seconds: float) -> None:
        """Send nothing for `seconds` (a 429's retry-after applies to every thread)."""
        with self._lock:
            self._hold_until = max(self._hold_until, self.clock() + seconds)

    # ---- feedback from responses ---------------------------------------------------------------

    def observe(self, headers: Any) -> None:
        """Read the rate-limit headers of a response (case-insensitive mapping)."""
        limit_s = _int_header(headers, "x-limit-per-second")
        remaining = _int_header(headers, "x-remaining-today")
        limit_d = _int_header(headers, "x-limit-per-day")
        with self._lock:
            if limit_s and limit_s > 0:
                self._server_limit = limit_s
            if limit_d is not None:
                self.quota.limit_per_day = limit_d
            if remaining is not None:
                self.quota.remaining_today = remaining
                self._quota_probe = False
                if remaining > self.daily_reserve:
                    self._exhausted = False
                if self._quota_paused and remaining > self.daily_reserve:
                    self._quota_paused = False
                    self.quota.paused_until = None
                    log.info("daily quota: resuming requests (%s left today)", f"{remaining:,}")

    def quota_exhausted(self, retry_after: float | None) -> None:
        """A daily-limit 429: treat the budget as spent; wait `retry_after` if given, else the recheck interval."""
        with self._lock:
            self.quota.remaining_today = 0
            self._exhausted = True
            self._quota_probe = False
            if retry_after is not None:
                self.quota.paused_until = self.wall() + retry_after

    def _wait_for_quota(self) -> None:
        while True:
            with self._lock:
                rem = self.quota.remaining_today
                low = self._exhausted or (rem is not None and rem <= self.daily_reserve)
                if not low or self._quota_probe:
                    return
                now = self.wall()
                if self.quota.paused_until is None or not self._quota_paused:
                    until = self.quota.paused_until or now + self.quota_recheck_s
                    self.quota.paused_until = max(until, now)
                    self._quota_paused = True
                    log.warning(
                        "daily quota low: %s requests left (reserve %s); pausing requests until %s (%.0f min)",
                        f"{rem or 0:,}",
                        f"{self.daily_reserve:,}",
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.quota.paused_until)),
                        (self.quota.paused_until - now) / 60.0,
                    )
                left = self.quota.paused_until - now
                if left <= 0:
                    # Time to look again: let one request through; its headers decide what happens next.
                    self._quota_probe = True
                    self.quota.paused_until = None
                    log.info("daily quota: checking whether requests may resume")
                    return
            if self.on_wait is not None:
                self.on_wait()
            self._wait(min(left, 30.0))

    def paused(self) -> bool:
        return self._quota_paused


def _int_header(headers: Any, name: str) -> int | None:
    try:
        raw = headers.get(name)
    except AttributeError:
        return None
    if raw is None:
        return None
    try:
        return int(float(raw))
    except (TypeError, ValueError):
        return None
