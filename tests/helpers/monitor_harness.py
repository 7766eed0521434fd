"""Run the pipeline monitor over fake workers with short timings (seconds instead of minutes)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageselector.monitor import config as monitor_config
from imageselector.monitor.config import MonitorConfig
from imageselector.monitor.stage import STATE_FILE, Monitor

FAKE = str(Path(__file__).resolve().parent / "fake_worker.py")

FAST: dict[str, Any] = {
    "tick_s": 0.1,
    "kill_timeout_s": 3.0,
    "term_grace_s": 1.0,
    "hang_timeout_s": 1.5,
    "startup_timeout_s": 3.0,
    "backoff_base_s": 0.2,
    "backoff_max_s": 5.0,
    "stable_after_s": 30.0,
    "crash_loop_max": 4,
    "crash_loop_window_s": 60.0,
    "status_interval_s": 1.0,
    "qps": {"enabled": False},
}


def fake_stage(name: str, mode: str = "good", kill_file: str | None = None, *extra: str, **kw: Any) -> dict[str, Any]:
    args = ["--name", name, "--mode", mode, *extra]
    if kill_file:
        args += ["--kill-file", kill_file]
    return {"script": FAKE, "args": args, "kill_file": kill_file, "heartbeat": name, "log": f"fake_{name}", **kw}


def config_dict(stages: dict[str, dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """A full config that disables the real stages and runs only `stages`."""
    all_stages: dict[str, dict[str, Any]] = {n: {"enabled": False} for n in monitor_config.DEFAULT_STAGES}
    all_stages.update(stages)
    return {**FAST, **overrides, "stages": all_stages}


def make_config(stages: dict[str, dict[str, Any]], **overrides: Any) -> MonitorConfig:
    return monitor_config.from_dict(config_dict(stages, **overrides))


class MonitorThread:
    """The monitor in a background thread of the test process (no signal handlers)."""

    def __init__(self, settings: Any, cfg: MonitorConfig) -> None:
        self.monitor = Monitor(settings, cfg, install_signals=False)
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.rc = self.monitor.run()

    def __enter__(self) -> MonitorThread:
        self.thread.start()
        return self

    def runner(self, name: str):  # type: ignore[no-untyped-def]
        return next(r for r in self.monitor.runners if r.name == name)

    def stop(self, timeout: float = 20.0) -> int | None:
        self.monitor.stopper.request("test stop")
        self.thread.join(timeout)
        return self.rc

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.stop()
        for r in self.monitor.runners:  # never leave a child behind, even when a test fails
            if r.proc is not None and r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, step: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def starts(home: Path, name: str) -> list[tuple[int, float]]:
    p = home / f"{name}.starts"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        pid, ts = line.split()
        out.append((int(pid), float(ts)))
    return out


def read_state(home: Path) -> dict[str, Any]:
    return json.loads((home / ".run" / STATE_FILE).read_text())
