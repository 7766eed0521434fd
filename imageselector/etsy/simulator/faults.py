"""Fault injection for the simulator: which faults, at what rates, decided reproducibly.

A decision is a hash of (seed, fault, request key, attempt number), so a run's faults do not depend on thread
timing, and a retried request gets a fresh draw. `cdn_404` hashes the image alone: a permanently missing image.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

from imageselector.etsy.simulator.catalogue import stable_hash

RATE_FIELDS = (
    "api_429",
    "api_5xx",
    "api_timeout",
    "api_bad_json",
    "cdn_404",
    "cdn_5xx",
    "cdn_truncated",
    "cdn_not_image",
    "cdn_slow",
)


@dataclass
class Faults:
    """Rates in 0..1 per request (mutable while the simulator runs), plus the durations some faults take."""

    api_429: float = 0.0
    api_5xx: float = 0.0
    api_timeout: float = 0.0  # sleep `timeout_s`, then drop the connection without answering
    api_bad_json: float = 0.0  # 200 with a cut-off JSON body
    cdn_404: float = 0.0  # stable per image
    cdn_5xx: float = 0.0
    cdn_truncated: float = 0.0  # body cut short (either a lying Content-Length + dropped connection, or a short body)
    cdn_not_image: float = 0.0  # 200 with an HTML error page instead of a JPEG
    cdn_slow: float = 0.0  # answer after `slow_s`
    timeout_s: float = 3.0
    slow_s: float = 1.5
    retry_after_429: bool = True  # whether injected 429s carry retry-after (the real API sometimes omits it)

    @classmethod
    def parse(cls, spec: str | None) -> Faults:
        """`"api_429=0.05,api_5xx=0.02,cdn_404=0.01,timeout_s=2"` -> Faults; `ValueError` on unknown names or bad values."""
        f = cls()
        f.update(spec or "")
        return f

    def update(self, spec: str) -> None:
        """Apply a SPEC string to this object in place (e.g. at run time)."""
        known = {fl.name: fl for fl in fields(self)}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in known:
                raise ValueError(f"bad fault spec item {part!r}; known: {', '.join(known)}")
            if name == "retry_after_429":
                setattr(self, name, value.strip().lower() in ("1", "true", "yes", "on"))
                continue
            v = float(value)
            if name in RATE_FIELDS and not 0.0 <= v <= 1.0:
                raise ValueError(f"fault rate {name}={v} is outside 0..1")
            if v < 0:
                raise ValueError(f"{name} must be >= 0")
            setattr(self, name, v)

    def spec(self) -> str:
        return ",".join(f"{n}={getattr(self, n)}" for n in RATE_FIELDS if getattr(self, n))


class Dice:
    """Reproducible fault draws; counts attempts per request key so retries draw again."""

    def __init__(self, seed: int):
        self.seed = seed
        self._attempts: dict[int, int] = {}
        self._lock = threading.Lock()

    def attempt(self, key: str) -> int:
        k = stable_hash(self.seed, key)
        with self._lock:
            if len(self._attempts) > 2_000_000:
                self._attempts.clear()
            n = self._attempts.get(k, 0)
            self._attempts[k] = n + 1
            return n

    def draw(self, *parts: object) -> float:
        """A uniform number in [0, 1) fixed by `parts`."""
        return stable_hash(self.seed, *parts) / 2**64
