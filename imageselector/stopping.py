"""Kill files and signals, folded into one "should I stop?" check shared by every worker.

`KILL` in the data home stops everything (sync and the monitor directly; the monitor fans it out to
the per-stage files). `KILL_DL`, `KILL_BG`, `KILL_EMBED` stop one stage. SIGTERM and SIGINT take the
same graceful path: the worker finishes or releases its batch and exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from imageselector.config import HomeError
from imageselector.fsutil import is_disk_full

KILL = "KILL"
EXIT_NO_SPACE = 75  # a worker that stopped because the disk is full (EX_TEMPFAIL): the monitor waits for space
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


def split_kill_files(
    home: Path, last_exit: float | None, names: Iterable[str] = ALL_KILL_FILES
) -> tuple[list[str], list[str]]:
    """(stale, fresh) kill files present now. Fresh: touched after `last_exit` (the monitor's last exit),
    i.e. a stop asked for since, which must be honoured. With no recorded exit every file counts as stale."""
    stale, fresh = [], []
    for name in names:
        try:
            mtime = (Path(home) / name).stat().st_mtime
        except OSError:
            continue
        (fresh if last_exit is not None and mtime > last_exit else stale).append(name)
    return stale, fresh


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


def guarded_main(prog: str, body: Callable[[], int]) -> int:
    """Run an entry point's body. A home that cannot be used: one line, exit 2. A full disk: one line,
    exit EXIT_NO_SPACE (the monitor waits for space instead of counting a crash); rows were handed back
    (or their leases expire), nothing is lost."""
    try:
        return body()
    except HomeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        msg = f"{prog}: stopped, the disk is full ({exc}); start again when there is space"
        if logging.getLogger().handlers:
            logging.getLogger(prog).error("%s", msg)
        else:
            print(msg, file=sys.stderr)
        return EXIT_NO_SPACE
