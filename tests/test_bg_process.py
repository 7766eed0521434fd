"""Background removal as a real process: KILL_BG stops it cleanly; kill -9 mid-run loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from imageselector.background.imaging import MARKER
from tests.helpers.bg import SCRIPT, flags, run_cli, seed_downloaded, standin_in_home

N = 24


@pytest.fixture(autouse=True)
def _models_dir_in_home(home, monkeypatch):
    """Never touch the user's model directory: U2NET_HOME (env beats .env) points into the test home."""
    monkeypatch.setenv("U2NET_HOME", str(home / "models" / "rembg"))


def start(home, model, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--model-path", str(model), "--claim-size", "8", *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_done(conn, at_least: int, proc: subprocess.Popen, timeout: float = 30) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = flags(conn)["done"]
        if done >= at_least:
            return done
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} images done after {timeout}s")


def marked(path) -> bool:
    with Image.open(path) as im:
        im.load()  # the file must decode completely either way
        return im.info.get("comment", b"").startswith(MARKER)


def check_files_consistent(conn, paths) -> None:
    """Every file is whole; a flagged row's file is processed, an unflagged one may be either."""
    rows = conn.execute("SELECT bg_removed FROM image_status ORDER BY rowid").fetchall()
    for r, p in zip(rows, paths, strict=True):
        m = marked(p)
        if r["bg_removed"]:
            assert m, f"{p} flagged but not processed"


def test_kill_bg_stops_between_images(settings, conn):
    model = standin_in_home(settings.home, size="small")
    paths = seed_downloaded(conn, settings.images_dir, N, size=(640, 480))
    proc = start(settings.home, model, "--watch", "--poll", "0.2")
    try:
        wait_done(conn, 3, proc)
        (settings.home / "KILL_BG").touch()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopping: kill file KILL_BG" in err
    f = flags(conn)
    assert 3 <= f["done"] < N and f["parked"] == 0
    check_files_consistent(conn, paths)
    # unflagged rows were released untouched: no lease left, the attempt not counted, the file original
    leftover = conn.execute("SELECT COUNT(*) FROM image_status WHERE bg_claim IS NOT NULL").fetchone()[0]
    assert leftover == 0
    for r, p in zip(
        conn.execute("SELECT bg_removed, bg_attempts FROM image_status ORDER BY rowid"), paths, strict=True
    ):
        if not r["bg_removed"]:
            assert r["bg_attempts"] == 0 and not marked(p)
    assert not list(settings.tmp_dir.glob("*.tmp"))
    # with the kill file present it refuses to start
    again = run_cli(settings.home, "--model-path", str(model))
    assert again.returncode == 0 and "not starting" in again.stderr
    assert flags(conn)["done"] == f["done"]


def test_kill_9_mid_run_then_restart_finishes_everything_once(settings, conn):
    model = standin_in_home(settings.home, size="small")
    paths = seed_downloaded(conn, settings.images_dir, N, size=(640, 480))
    proc = start(settings.home, model)
    try:
        wait_done(conn, 4, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = flags(conn)["done"]
    assert first < N
    check_files_consistent(conn, paths)
    stuck = conn.execute("SELECT COUNT(*) FROM image_status WHERE bg_claim IS NOT NULL").fetchone()[0]
    assert stuck > 0  # the dead worker's leases; the restart reclaims them at once
    res = run_cli(settings.home, "--model-path", str(model))
    assert res.returncode == 0, res.stderr
    assert "released" in res.stderr and "dead bg_remover" in res.stderr
    assert flags(conn) == {"done": N, "parked": 0, "n": N}
    assert all(marked(p) for p in paths)
    assert not list(settings.tmp_dir.glob("*.tmp"))
    # rows the killed run had already replaced but not flagged were only flagged, not processed again
    processed = int(res.stderr.split("backgrounds removed: ")[1].split(",")[0])
    flagged_only = int(res.stderr.split("already marked (flag only): ")[1].split(",")[0])
    assert processed + flagged_only == N - first
