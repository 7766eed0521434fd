"""Multi-process properties of the claim protocol: kill -9 mid-batch, kill files and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from imageselector import db
from imageselector.layout import image_path
from tests.helpers.rows import seed_images

CLAIMER = Path(__file__).parent / "helpers" / "claimer.py"


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CLAIMER), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def _wait_line(p: subprocess.Popen[str], want: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()  # type: ignore[union-attr]
        if want in line:
            return
        if not line and p.poll() is not None:
            raise AssertionError(f"worker exited {p.returncode} before {want}")
    raise AssertionError(f"no {want} within {timeout}s")


def _assert_flags_match_files(conn, settings) -> None:
    for r in conn.execute("SELECT listing_id, image_id, download_done FROM image_status"):
        exists = image_path(settings.images_dir, r["listing_id"], r["image_id"]).exists()
        if r["download_done"]:
            assert exists, "flag says done but the artifact is missing"


def test_kill9_mid_batch_loses_nothing(settings, conn) -> None:
    seed_images(conn, 12)
    p = _start("--batch", "4", "--pause", "30")
    _wait_line(p, "PAUSED")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    leased = conn.execute("SELECT COUNT(*) FROM image_status WHERE download_claim IS NOT NULL").fetchone()[0]
    assert leased == 4  # the dead worker's batch is still under lease...
    _assert_flags_match_files(conn, settings)
    assert conn.execute("SELECT COUNT(*) FROM image_status WHERE download_done=1").fetchone()[0] == 0
    # ...until the next worker frees the leases of dead pids and finishes everything.
    assert db.reclaim_dead(conn, "download") == 4
    q = _start("--batch", "5")
    assert q.wait(timeout=60) == 0
    _assert_flags_match_files(conn, settings)
    row = conn.execute(
        "SELECT COUNT(*), SUM(download_done), SUM(download_claim IS NOT NULL), MAX(download_attempts) FROM image_status"
    ).fetchone()
    assert tuple(row) == (12, 12, 0, 2)
    assert not [p for p in settings.images_dir.rglob("*") if p.is_file() and p.suffix != ".jpg"]


def test_kill_file_stops_worker_between_batches(settings, conn) -> None:
    seed_images(conn, 3)
    p = _start("--batch", "1", "--watch")
    _wait_line(p, "READY")
    deadline = time.time() + 30
    while conn.execute("SELECT SUM(download_done) FROM image_status").fetchone()[0] != 3 and time.time() < deadline:
        time.sleep(0.1)
    t0 = time.time()
    (settings.home / "KILL_DL").touch()
    assert p.wait(timeout=10) == 0
    assert time.time() - t0 < 5
    hb = (settings.run_dir / "claimer.heartbeat").read_text()
    assert '"stopped": true' in hb


def test_existing_kill_file_refuses_to_start(settings, conn) -> None:
    seed_images(conn, 2)
    (settings.home / "KILL").touch()
    p = _start("--batch", "1")
    assert p.wait(timeout=30) == 0
    assert conn.execute("SELECT SUM(download_done) FROM image_status").fetchone()[0] == 0


def test_sigterm_releases_claimed_batch(settings, conn) -> None:
    seed_images(conn, 8)
    p = _start("--batch", "4", "--pause", "2")
    _wait_line(p, "PAUSED")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=15) == 0
    row = conn.execute("SELECT SUM(download_done), SUM(download_claim IS NOT NULL) FROM image_status").fetchone()
    # The batch in hand is finished (graceful), nothing more is started, and no lease is left behind.
    assert tuple(row) == (4, 0)
