"""A full disk mid-run: the whole pipeline (monitor, sync, download, bg, embed on the simulator with stand-in
models) on a small tmpfs that is filled to the last byte, then partly freed, then emptied.

Nothing may die of ENOSPC: the monitor keeps running and pauses every stage; it stays paused while free
space is above the floor but below the resume level; it resumes by itself; the backlog finishes; verify
finds every flag backed by its artifact and no row parked (a full disk is never a row's fault); no temp
file is left in .tmp/ or .run/.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imageselector import db
from imageselector.config import PROJECT_ROOT, load_settings
from imageselector.fsutil import pid_alive
from imageselector.monitor.stage import STATE_FILE
from imageselector.proving import chaos
from imageselector.proving.verify import verify
from imageselector.status import figures as status
from tests.helpers.rows import seed_images

MODEL = "clip_vitb32"
STAGES = ("download", "bg", f"embed_{MODEL}")
FLOOR_MB, RESUME_MB = 4.0, 14.0


@pytest.fixture
def disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root and mount for a small tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_mb(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 1e6


def fill(path: Path, leave_mb: float = 0.0) -> None:
    """Write a ballast file until only `leave_mb` is free (0: until ENOSPC at the last page)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12):
            try:
                while leave_mb == 0 or free_mb(path) > leave_mb + chunk / 1e6:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def wait_for(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for: {what}")


def state(home: Path) -> dict:
    try:
        return json.loads((home / ".run" / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def settled(conn, home: Path) -> bool:  # type: ignore[no-untyped-def]
    if state(home).get("stages", {}).get("sync", {}).get("state") != "finished":
        return False
    data = status.collect(conn)
    return data["total"] > 0 and all(data["stages"][s]["backlog"] == 0 and data["stages"][s]["leased"] == 0 for s in STAGES)


def test_full_disk_pauses_everything_and_nothing_is_lost(disk, tmp_path):
    from imageselector.etsy.simulator import Simulator

    home = disk / "home"
    home.mkdir()
    registry, u2net = chaos.prepare_models(tmp_path / "models")  # the models live off the small disk
    opts = chaos.ChaosOptions(home=home, listings=8, kills=0, faults="", kill_timeout_s=10, embed_models=MODEL)
    cfg = chaos.monitor_config(opts, registry, u2net)
    cfg.update(tick_s=0.2, min_free_mb=FLOOR_MB, resume_free_mb=RESUME_MB, disk_check_s=0.3, min_pause_s=1.0)
    cfg["stages"]["embed"]["args"][cfg["stages"]["embed"]["args"].index("--flush-seconds") + 1] = "1"
    (tmp_path / "monitor.json").write_text(json.dumps(cfg))
    ballast = disk / "ballast"
    with Simulator(listings=opts.listings, seed=5, qps=50, qpd=100_000_000) as sim:
        env = {
            **os.environ,
            "IMAGESELECTOR_HOME": str(home),
            "ETSY_API_BASE": sim.api_base,
            "ETSY_CDN_BASE": sim.cdn_base,
            "ETSY_API_KEY": sim.api_key,
            "ETSY_SHARED_SECRET": sim.shared_secret,
            "ETSY_TIMEOUT_S": "2",
            "ETSY_IDLE_POLL_S": "1",
            "HF_HUB_OFFLINE": "1",
            "IMAGESELECTOR_MODELS_FILE": str(registry),
        }
        cmd = [sys.executable, str(PROJECT_ROOT / "scripts" / "pipeline_monitor.py"), "--config", str(tmp_path / "monitor.json")]
        with open(tmp_path / "pipeline.log", "ab") as out:  # its stdout off the full disk, to read it afterwards
            mon = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            conn_path = home / "etsy_data.db"
            wait_for(conn_path.exists, 30, "the database")
            conn = db.connect(conn_path)
            wait_for(lambda: status.collect(conn)["download_done"] >= 3, 40, "the first downloads")
            # embed has loaded its model (its first heartbeat): it takes SIGTERM at once, not after the load
            wait_for((home / ".run" / "embed.heartbeat").exists, 60, "embed to load its model")
            conn.close()  # the test's own connection must not hold the WAL open across the fill
            # 1. the disk fills to the last byte while every stage is writing
            fill(ballast)
            wait_for(lambda: not children(mon.pid), 30, "every worker stopped")
            time.sleep(1.5)
            assert mon.poll() is None, "the monitor died of the full disk"
            # 2. some space comes back, above the floor but below the resume level: still paused
            os.truncate(ballast, ballast.stat().st_size - int((FLOOR_MB + RESUME_MB) / 2 * 1e6))
            wait_for(lambda: state(home).get("disk", {}).get("paused"), 10, "the state file says paused")
            time.sleep(1.5)
            st = state(home)
            assert st["disk"]["paused"] and not children(mon.pid)
            assert all(s["state"] in ("paused", "finished") for s in st["stages"].values()), st["stages"]
            assert mon.poll() is None
            # 3. space returns: it resumes by itself and the backlog finishes
            ballast.unlink()
            conn = db.connect(conn_path)
            wait_for(lambda: not state(home).get("disk", {}).get("paused", True), 15, "resumed")
            wait_for(lambda: settled(conn, home), 60, "the backlog to finish after the pause")
            conn.close()
            (home / "KILL").touch()
            assert mon.wait(timeout=40) == 0
        finally:
            if mon.poll() is None:  # a failed test must not leave workers behind: stop them all
                workers = children(mon.pid)
                mon.kill()
                mon.wait()
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    log = (tmp_path / "pipeline.log").read_text() + (home / "pipeline.log").read_text(errors="replace")
    assert "DISK SPACE:" in log and "disk space is back" in log
    assert "CRASH LOOP" not in log and "STOPPED, NOT RESTARTING" not in log
    rep = verify(load_settings(home), stages=STAGES)
    assert rep.ok, rep.inconsistencies[:10]
    assert rep.backlog == 0 and rep.rows > 0
    assert rep.parked == {s: 0 for s in STAGES}  # the full disk parked no row and burned no attempt into one
    assert rep.done["download"] == rep.done[f"embed_{MODEL}"] == rep.rows
    left = [p.name for d in (home / ".tmp", home / ".run") if d.is_dir() for p in d.iterdir() if p.name.endswith(".tmp")]
    assert left == []
    assert not [p for p in children(os.getpid()) if pid_alive(p) and p == mon.pid]


def test_writers_on_a_full_disk_raise_once_and_leave_no_temp_file(disk):
    """atomic_writer's cleanup must not raise again (close() itself fails on ENOSPC), so no temp file stays;
    a heartbeat never kills its worker; SQLite's "database or disk is full" is recognised as a full disk."""
    from imageselector.fsutil import atomic_write_bytes, is_disk_full
    from imageselector.worker import Heartbeat

    home = disk / "home"
    (home / ".tmp").mkdir(parents=True)
    conn = db.connect(home / "etsy_data.db")
    fill(disk / "ballast")
    with pytest.raises(OSError) as err:
        atomic_write_bytes(home / "images" / "x.jpg", b"\xff" * 200_000, home / ".tmp")
    assert err.value.errno == errno.ENOSPC and is_disk_full(err.value)
    assert list((home / ".tmp").iterdir()) == [] and not (home / "images" / "x.jpg").exists()
    Heartbeat(home / ".run", "w").beat()  # logs a warning, does not raise
    assert [p.name for p in (home / ".run").iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(sqlite3.Error) as sql_err:
        for _ in range(200):  # until the WAL needs a page the disk does not have
            seed_images(conn, 50, start_listing=10_000 + _ * 100)
    assert is_disk_full(sql_err.value)
    conn.close()
