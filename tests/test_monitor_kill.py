"""`touch KILL` and SIGTERM to the real monitor process: fan-out, the bound, SIGTERM/SIGKILL escalation, exit 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from imageselector.fsutil import pid_alive
from imageselector.monitor.stage import STATE_FILE
from tests.helpers.monitor_harness import config_dict, fake_stage, read_state, starts, wait_for

ROOT = Path(__file__).resolve().parent.parent


def _start_monitor(home: Path, stages: dict, **overrides) -> subprocess.Popen:
    cfg = home / "mon.json"
    cfg.write_text(json.dumps(config_dict(stages, **overrides)))
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "pipeline_monitor.py"), "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _child_pids(home: Path) -> dict[str, int]:
    return {n: s["pid"] for n, s in read_state(home)["stages"].items() if s["pid"]}


def test_kill_fans_out_and_escalates_within_the_bound(home):
    stages = {
        "sync": fake_stage("sync", "good", None),  # stops on KILL itself
        "download": fake_stage("download", "good", "KILL_DL"),
        "bg": fake_stage("bg", "good", "KILL_BG"),
        "embed": fake_stage("embed", "ignore", "KILL_EMBED"),  # ignores kill files and SIGTERM
    }
    mon = _start_monitor(home, stages, kill_timeout_s=2.0, term_grace_s=1.0)
    try:
        wait_for(lambda: (home / ".run" / STATE_FILE).exists() and len(_child_pids(home)) == 4, 20)
        wait_for(lambda: all(starts(home, n) for n in stages), 20)
        pids = _child_pids(home)
        t0 = time.monotonic()
        (home / "KILL").touch()
        rc = mon.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        if mon.poll() is None:
            mon.kill()
    assert rc == 0
    assert took < 2.0 + 1.0 + 5.0  # kill bound + SIGTERM grace + slack for the tick and process exits
    assert all((home / n).exists() for n in ("KILL_DL", "KILL_BG", "KILL_EMBED"))
    assert not any(pid_alive(p) for p in pids.values())
    report = read_state(home)["shutdown"]
    assert {report[n]["how"] for n in ("sync", "download", "bg")} == {"exited"}
    assert report["embed"]["how"] == "killed with SIGKILL"
    log = (home / "pipeline.log").read_text()
    assert "writing KILL_DL, KILL_BG, KILL_EMBED" in log
    assert f"embed (pid {pids['embed']}) still running after" in log
    assert "ignored SIGTERM: sending SIGKILL (last resort)" in log
    # A worker that sees KILL before the monitor's tick does exits on its own: both are a clean exit.
    assert re.search(r"download (had already )?exited \(exit code 0\)", log)


def test_sigterm_to_monitor_takes_the_same_path(home):
    stages = {"sync": fake_stage("sync", "good", None), "download": fake_stage("download", "good", "KILL_DL")}
    mon = _start_monitor(home, stages, kill_timeout_s=5.0)
    try:
        wait_for(lambda: (home / ".run" / STATE_FILE).exists() and len(_child_pids(home)) == 2, 20)
        wait_for(lambda: all(starts(home, n) for n in stages), 20)
        pids = _child_pids(home)
        mon.send_signal(signal.SIGTERM)
        rc = mon.wait(timeout=30)
    finally:
        if mon.poll() is None:
            mon.kill()
    assert rc == 0
    assert not any(pid_alive(p) for p in pids.values())
    assert (home / "KILL_DL").exists()
    report = read_state(home)["shutdown"]
    assert report["sync"]["how"] == report["download"]["how"] == "exited"
    assert report["sync"]["code"] == report["download"]["code"] == 0
    log = (home / "pipeline.log").read_text()
    assert "stopping (signal SIGTERM)" in log
    assert "sync stops on KILL, which is absent" in log


def test_second_monitor_refuses_to_start(home):
    stages = {"download": fake_stage("download", "good", "KILL_DL")}
    mon = _start_monitor(home, stages)
    try:
        wait_for(lambda: (home / ".run" / STATE_FILE).exists(), 20)
        env = {**os.environ, "IMAGESELECTOR_HOME": str(home)}
        second = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "pipeline_monitor.py"), "--config", str(home / "mon.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 2  # as the guide says: configuration errors exit 2
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "another pipeline monitor is running" in lines[0], second.stderr
        assert f"pid {mon.pid}" in lines[0]
        assert mon.poll() is None  # the first one is untouched, KILL files included
        (home / "KILL").touch()
        assert mon.wait(timeout=30) == 0
    finally:
        if mon.poll() is None:
            mon.kill()


def test_workers_orphaned_by_a_killed_monitor_are_stopped_by_the_next_one(home):
    stages = {"download": fake_stage("download", "good", "KILL_DL")}
    first = _start_monitor(home, stages)
    try:
        wait_for(lambda: (home / ".run" / STATE_FILE).exists() and _child_pids(home), 20)
        orphan = _child_pids(home)["download"]
        first.kill()  # kill -9: its worker lives on, in its own session
        first.wait(10)
        assert pid_alive(orphan)
    finally:
        if first.poll() is None:
            first.kill()
    second = _start_monitor(home, stages)
    try:
        wait_for(lambda: len(starts(home, "download")) == 2, 20)
        assert not pid_alive(orphan)
        (home / "KILL").touch()
        assert second.wait(timeout=30) == 0
    finally:
        if second.poll() is None:
            second.kill()
        if pid_alive(orphan):
            os.kill(orphan, signal.SIGKILL)
    log = (home / "pipeline.log").read_text()
    assert f"download: pid {orphan} from an earlier monitor is still running; stopping it" in log
