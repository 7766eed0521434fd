"""Kill files and signals, folded into one "should I stop?" check shared by every worker.

`KILL` in the data home stops everything (sync and the monitor directly; the monitor fans it out to
the per-stage files). `KILL_DL`, `KILL_BG`, `KILL_EMBED` stop one stage. SIGTERM and SIGINT take the
same graceful path: the worker finishes or releases its batch and exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from pathlib import Path

KILL = "KILL"
KILL_DL = "KILL_DL"
KILL_BG = "KILL_BG"
KILL_EMBED = "KILL_EMBED"
STAGE_KILL_FILES = (KILL_DL, KILL_BG, KILL_EMBED)
ALL_KILL_FILES = (KILL, *STAGE_KILL_FILES)

log = logging.getLogger(__name__)


class Stopper:
    """Answers `should_stop()` from kill files and signals; `wait()` sleeps but wakes on a stop."""

    def __init__(self, home: Path, kill_files: Iterable[str], *, install_signals: bool = True) -> None:
        self.home = Path(home)
        self.kill_files = tuple(kill_files)
        self._event = threading.Event()
        self.reason: str | None = None
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.request(f"signal {signal.Signals(signum).name}")

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def present(self) -> list[str]:
        """Kill files of ours that exist now."""
        return [name for name in self.kill_files if (self.home / name).exists()]

    def should_stop(self) -> bool:
        if self._event.is_set():
            return True
        found = self.present()
        if found:
            self.request(f"kill file {found[0]}")
            return True
        return False

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, checking the kill files every half second. True if told to stop."""
        remaining = seconds
        while remaining > 0:
            if self.should_stop():
                return True
            step = min(0.5, remaining)
            self._event.wait(step)
            remaining -= step
        return self.should_stop()


def refuse_if_killed(stopper: Stopper) -> bool:
    """At start-up: a kill file already present means "do not run". Log how to clear it."""
    found = stopper.present()
    if found:
        names = " ".join(found)
        log.warning("%s present in %s: not starting. Remove it to run: rm %s", names, stopper.home, names)
        return True
    return False


def remove_kill_files(home: Path, names: Iterable[str] = ALL_KILL_FILES) -> list[str]:
    """Delete stale kill files; returns the names removed."""
    removed = []
    for name in names:
        p = Path(home) / name
        try:
            p.unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
