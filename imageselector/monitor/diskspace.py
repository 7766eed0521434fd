"""The monitor's free-space floor: pause the stages that write before the disk is full, resume when space returns.

Why a pause by SIGTERM + hold rather than the stages' kill files or a new pause file: every worker already
takes SIGTERM as its graceful stop (stopping.py: finish or hand back the batch, exit 0); nothing has to be
written on a disk that is full to ask for it; and a kill file the user touched is never mistaken for the
monitor's (or removed by it when space returns). Stopped workers also stop beating their heartbeats, which
could not be written anyway. A worker that meets ENOSPC before the monitor saw the floor exits with
`EXIT_NO_SPACE` (75); the monitor takes that as the same pause, not as a crash.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageselector.config import Settings
from imageselector.fsutil import free_mb

log = logging.getLogger("pipeline")


def watched_paths(settings: Settings) -> list[Path]:
    """Everything the stages write: the home (database, logs, .tmp, .run), images/ and embeddings/ (links may
    point at other disks)."""
    return [settings.home, settings.images_dir, settings.embeddings_dir, settings.tmp_dir]


@dataclass
class DiskGuard:
    """Decides, from free space, when the pipeline must pause and when it may resume (with hysteresis)."""

    paths: list[Path]
    min_free_mb: float
    resume_free_mb: float
    min_pause_s: float = 10.0
    paused_since: float | None = None
    reason: str = ""
    last_free_mb: float = float("inf")

    @classmethod
    def from_config(cls, settings: Settings, min_free_mb: float, resume_free_mb: float | None, min_pause_s: float):
        resume = resume_free_mb if resume_free_mb is not None else min_free_mb + max(16.0, 0.25 * min_free_mb)
        return cls(watched_paths(settings), float(min_free_mb), max(float(resume), float(min_free_mb)), min_pause_s)

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def measure(self) -> float:
        self.last_free_mb = free_mb(*self.paths)
        return self.last_free_mb

    def should_pause(self) -> str | None:
        """A reason to pause now, or None."""
        if self.paused:
            return None
        free = self.measure()
        if free < self.min_free_mb:
            return f"{free:,.0f} MB free, below the floor of {self.min_free_mb:,.0f} MB (min_free_mb / MIN_FREE_MB)"
        return None

    def pause(self, reason: str, now: float | None = None) -> None:
        self.paused_since = time.time() if now is None else now
        self.reason = reason

    def may_resume(self, now: float | None = None) -> bool:
        if not self.paused:
            return False
        now = time.time() if now is None else now
        if now - (self.paused_since or now) < self.min_pause_s:
            return False
        return self.measure() >= self.resume_free_mb

    def resume(self) -> None:
        self.paused_since, self.reason = None, ""

    def state(self) -> dict[str, Any]:
        return {
            "paused": self.paused,
            "since": self.paused_since,
            "reason": self.reason,
            "free_mb": None if self.last_free_mb == float("inf") else round(self.last_free_mb, 1),
            "min_free_mb": self.min_free_mb,
            "resume_free_mb": self.resume_free_mb,
        }
