"""The downloader against the simulator's CDN: random faults, kill -9 and resume, KILL_DL; always flags == files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from imageselector import db, layout
from imageselector.download.cli import main
from imageselector.etsy.simulator import Faults, Simulator
from imageselector.imagecheck import check_image
from tests.conftest import ROOT
from tests.helpers.download_setup import all_rows, assert_flags_match_files, catalogue_rows, files_under


def start_downloader(home: Path, cdn_base: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home), "ETSY_CDN_BASE": cdn_base}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "image_downloader.py"), "--progress-interval", "600", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_done(conn, at_least: int, proc: subprocess.Popen, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = conn.execute("SELECT COUNT(*) FROM image_status WHERE download_done=1").fetchone()[0]
        if n >= at_least:
            return n
        assert proc.poll() is None, f"downloader exited early: {proc.stderr.read()}"
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} downloads after {timeout}s")


def test_random_cdn_faults_then_recovery_give_the_simulators_bytes(conn, settings, monkeypatch):
    faults = Faults(cdn_404=0.1, cdn_5xx=0.2, cdn_truncated=0.2, cdn_not_image=0.1, cdn_slow=0.1, slow_s=1.0)
    with Simulator(listings=25, seed=3, faults=faults) as sim:
        n = len(sim.catalogue.image_ids)
        db.upsert_images(conn, catalogue_rows(sim.catalogue))
        monkeypatch.setenv("ETSY_CDN_BASE", sim.cdn_base)
        assert main(["--timeout", "0.5", "--tries", "3", "--progress-interval", "600"]) == 0
        assert_flags_match_files(conn, settings.images_dir)
        gone = {
            int(sim.catalogue.image_ids[j])
            for j in range(n)
            if sim.dice.draw("cdn_404", int(sim.catalogue.image_ids[j])) < 0.1
        }
        assert gone, "the seed should make some images permanently missing"
        rows = {r["image_id"]: r for r in all_rows(conn)}
        for image_id in gone:
            assert rows[image_id]["download_parked"] == 1 and "HTTP 404" in rows[image_id]["download_error"]
        assert sim.stats.get("cdn_5xx_injected") and sim.stats.get("cdn_truncated_injected")

        # the faults clear up; transient failures are retried once their backoff is over
        sim.faults = Faults(cdn_404=0.1)
        conn.execute("UPDATE image_status SET download_not_before=0 WHERE download_parked=0")
        assert main(["--progress-interval", "600"]) == 0
        for r in all_rows(conn):
            assert r["download_done"] == (r["image_id"] not in gone), dict(r)
            if r["download_done"]:
                j = sim.catalogue.image_index(r["image_id"])
                path = layout.image_path(settings.images_dir, r["listing_id"], r["image_id"])
                assert path.read_bytes() == sim.jpegs.get(j, "570xN")
        assert_flags_match_files(conn, settings.images_dir)


def test_kill_9_mid_download_then_resume(conn, settings):
    with Simulator(listings=40, seed=5, cdn_latency_ms=150) as sim:
        db.upsert_images(conn, catalogue_rows(sim.catalogue))
        total = len(sim.catalogue.image_ids)
        proc = start_downloader(settings.home, sim.cdn_base, "--concurrency", "6", "--batch-size", "10")
        wait_done(conn, 8, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # mid-run state: every file in images/ is whole; rows of the dead process are still leased
        for p in files_under(settings.images_dir):
            assert p.suffix == ".jpg" and check_image(p.read_bytes()).ok, p
        held = conn.execute("SELECT COUNT(*) FROM image_status WHERE download_claim IS NOT NULL").fetchone()[0]
        assert held > 0
        done_before = conn.execute("SELECT COUNT(*) FROM image_status WHERE download_done=1").fetchone()[0]
        assert done_before < total

        proc = start_downloader(settings.home, sim.cdn_base, "--concurrency", "16", "--processes", "2")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "released" in err  # the dead run's leases were taken back at once, not after the lease expiry
        assert "started 1 more downloader processes" in err
    assert conn.execute("SELECT COUNT(*) FROM image_status WHERE download_done=1").fetchone()[0] == total
    assert_flags_match_files(conn, settings.images_dir)
    assert not list(settings.tmp_dir.glob("*"))


def test_kill_dl_stops_within_seconds_and_hands_rows_back(conn, settings):
    with Simulator(listings=80, seed=7, cdn_latency_ms=300) as sim:
        db.upsert_images(conn, catalogue_rows(sim.catalogue))
        proc = start_downloader(settings.home, sim.cdn_base, "--watch", "--concurrency", "8", "--batch-size", "20")
        wait_done(conn, 5, proc)
        (settings.home / "KILL_DL").touch()
        _, err = proc.communicate(timeout=20)  # generous: it stops within a few seconds
    assert proc.returncode == 0, err
    assert "kill file KILL_DL" in err
    rows = all_rows(conn)
    assert any(r["download_done"] == 0 for r in rows)
    undone = [r for r in rows if not r["download_done"]]
    assert all(r["download_attempts"] == 0 and r["download_error"] is None for r in undone)  # released, not failed
    assert_flags_match_files(conn, settings.images_dir)
