"""Per-second (sliding 1 s window) and per-day (rolling 24 h) request limits, like Etsy's per-key limits."""

from __future__ import annotations

import threading
import time
from collections import deque

DAY_S = 86400.0


class RateLimiter:
    """Counts accepted requests; `check()` says whether one more may pass and what the headers say."""

    def __init__(self, qps: float, qpd: int, clock=time.monotonic):
        self.qps, self.qpd, self.clock = qps, qpd, clock
        self._sec: deque[float] = deque()
        self._day: deque[float] = deque()
        self._lock = threading.Lock()

    def check(self) -> tuple[str | None, float, dict[str, str]]:
        """(None | "qps" | "qpd", retry_after_s, headers). Accepted requests count towards both windows."""
        now = self.clock()
        with self._lock:
            self._prune(now)
            limit_s = int(self.qps) if self.qps == int(self.qps) else self.qps
            if self.qpd and len(self._day) >= self.qpd:
                retry = max(1.0, self._day[0] + DAY_S - now)
                return "qpd", retry, self._headers(limit_s)
            if self.qps and len(self._sec) >= self.qps:
                retry = max(0.0, self._sec[0] + 1.0 - now)
                return "qps", retry, self._headers(limit_s)
            self._sec.append(now)
            self._day.append(now)
            return None, 0.0, self._headers(limit_s)

    def peek(self) -> dict[str, str]:
        """The headers as they stand, counting nothing (for answers that bypass the limiter)."""
        with self._lock:
            self._prune(self.clock())
            return self._headers(int(self.qps) if self.qps == int(self.qps) else self.qps)

    def _prune(self, now: float) -> None:
        while self._sec and self._sec[0] <= now - 1.0:
            self._sec.popleft()
        while self._day and self._day[0] <= now - DAY_S:
            self._day.popleft()

    def _headers(self, limit_s) -> dict[str, str]:
        """Etsy's four headers; a window set to 0 (no limit, a simulator-only mode) sends none of its two,
        since `x-remaining-today: 0` would tell the crawler its day's budget is spent."""
        h: dict[str, str] = {}
        if self.qps:
            h["x-limit-per-second"] = str(limit_s)
            h["x-remaining-this-second"] = str(max(0, int(self.qps - len(self._sec))))
        if self.qpd:
            h["x-limit-per-day"] = str(self.qpd)
            h["x-remaining-today"] = str(max(0, self.qpd - len(self._day)))
        return h
