"""Sync against the simulator with faults on: complete, exactly once, resumable after kill -9, bad key fails fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imageselector import db
from imageselector.etsy.cli import LOCK_NAME, build_client, run_sync
from imageselector.etsy.crawl import CrawlConfig, Crawler
from imageselector.etsy.simulator import Faults, Simulator
from imageselector.fsutil import instance_lock
from imageselector.stopping import KILL, Stopper
from tests.helpers.sync_sim import (
    assert_complete,
    expected_images,
    quiet_logger,
    sim_settings,
    subprocess_env,
    write_qps,
)

ROOT = Path(__file__).resolve().parent.parent
FAULTS = "api_429=0.04,api_5xx=0.04,api_timeout=0.01,api_bad_json=0.04,timeout_s=0.7"


def test_full_crawl_with_faults_stores_everything_exactly_once(home, monkeypatch):
    faults = Faults.parse(FAULTS)
    faults.retry_after_429 = False  # the client's own backoff (retry-after is covered in test_sync_client)
    with Simulator(listings=700, seed=3, qps=0, faults=faults, max_offset=100) as sim:
        settings = sim_settings(sim, home, monkeypatch)
        stopper = Stopper(home, [KILL], install_signals=False)
        rc = run_sync(settings, stopper, once=True, log=quiet_logger())
        stats = sim.stats.snapshot()
        assert rc == 0
        conn = db.connect(settings.db_path)
        assert_complete(conn, sim.catalogue)
        # the faults really happened, and the partitioning really split past the small offset cap
        assert stats.get("429_injected", 0) and stats.get("api_5xx_injected", 0)
        assert stats.get("api_bad_json_injected", 0)
        states = dict(conn.execute("SELECT state, COUNT(*) FROM crawl_partitions GROUP BY state").fetchall())
        assert states.get("split", 0) >= 1 and set(states) <= {"split", "done"}
        sync_stats = json.loads(db.kv_get(conn, "sync_stats"))
        assert sync_stats["requests"] >= stats["requests"] - stats.get("auth_rejected", 0) - 5
        assert sync_stats["x-limit-per-day"] == 10000 and isinstance(sync_stats["x-remaining-today"], int)

        # A second pass finds nothing new and writes nothing twice.
        before = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("listings_dynamic", "reviews")}
        sim.faults = Faults()
        store_conn = db.connect(settings.db_path)
        client = build_client(settings, stopper)
        crawler = Crawler(store_conn, client, CrawlConfig.from_settings(settings))
        assert crawler.reopen_partitions() == 0  # not due yet
        assert crawler.step() is None

        # Later: re-snapshot dynamic metrics (one more row per listing and shop), views where the API has them.
        crawler.clock = lambda: time.time() + 25 * 3600
        while crawler.step_snapshots():
            pass
        client.close()
        n_listings = len(sim.catalogue.active_listing_ids())
        assert (
            conn.execute("SELECT COUNT(*) FROM listings_dynamic").fetchone()[0]
            == before["listings_dynamic"] + n_listings
        )
        n_views = conn.execute("SELECT COUNT(*) FROM listings_dynamic WHERE views IS NOT NULL").fetchone()[0]
        assert 0 < n_views < 2 * n_listings
        assert conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0] == before["reviews"]
        per_shop = conn.execute("SELECT MIN(c), MAX(c) FROM (SELECT COUNT(*) c FROM shops_dynamic GROUP BY shop_id)")
        assert tuple(per_shop.fetchone()) == (2, 2)
        assert_complete_images = conn.execute("SELECT COUNT(*) FROM image_status").fetchone()[0]
        assert assert_complete_images == len(set(conn.execute("SELECT listing_id, image_id FROM image_status")))
        store_conn.close()
        conn.close()


def _run_sync_proc(sim, home, *args, **env_extra):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "sync_data.py"), *args],
        cwd=ROOT,
        env=subprocess_env(sim, home, **env_extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_resume_after_kill_9_loses_and_duplicates_nothing(home):
    faults = Faults.parse("api_5xx=0.02,api_bad_json=0.02")
    with Simulator(listings=1200, seed=5, qps=0, faults=faults, max_offset=100) as sim:
        write_qps(home, 60.0)
        for kill_at in (50, 130):  # requests seen by the simulator before the kill (of about 240)
            proc = _run_sync_proc(sim, home, "--once")
            deadline = time.monotonic() + 60
            while sim.stats.snapshot().get("requests", 0) < kill_at:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            proc.stderr.close()
        conn = db.connect(home / "etsy_data.db")
        partial = conn.execute("SELECT COUNT(*) FROM image_status").fetchone()[0]
        pending_shops = conn.execute("SELECT COUNT(*) FROM shops WHERE crawl_state='pending'").fetchone()[0]
        assert 0 < partial < len(expected_images(sim.catalogue)) or pending_shops > 0  # really cut short
        proc = _run_sync_proc(sim, home, "--once")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert_complete(conn, sim.catalogue)
        beat = json.loads((home / ".run" / "sync.heartbeat").read_text())
        assert beat["stopped"] is True and beat["pid"] == proc.pid
        assert (home / "sync_data.log").exists()
        conn.close()


@pytest.mark.parametrize("secret", ["wrong-secret", ""])
def test_bad_key_fails_fast_with_exit_2(home, secret):
    with Simulator(listings=50, seed=1, qps=0) as sim:
        env = subprocess_env(sim, home)
        env["ETSY_SHARED_SECRET"] = secret
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "sync_data.py")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        took = time.monotonic() - t0
        assert proc.returncode == 2, proc.stderr
        # at most the one ping: no retry loop
        assert sim.stats.snapshot().get("requests", 0) <= 1
        log = (home / "sync_data.log").read_text()
        assert "ETSY_SHARED_SECRET" in log
        if secret:
            assert "rejected the API key (HTTP 403" in log and secret not in log
        assert sim.api_key not in log
        assert took < 30


def test_kill_file_present_refuses_to_start(home):
    with Simulator(listings=50, seed=1, qps=0) as sim:
        (home / KILL).touch()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "sync_data.py")],
            cwd=ROOT,
            env=subprocess_env(sim, home),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0
        assert "not starting" in proc.stderr
        assert sim.stats.snapshot().get("requests", 0) == 0


def test_second_sync_on_the_same_home_refuses_and_kill_9_frees_the_lock(home):
    """The one single-instance lock (fsutil.instance_lock): held by a process, refused to a second, freed by kill -9."""
    run_dir = home / ".run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir), LOCK_NAME], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run(
            [sys.executable, str(ROOT / "sync_data.py")], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2 and "another sync_data.py is already running" in proc.stderr
        assert f"pid {holder.pid}" in proc.stderr
    finally:
        holder.kill()  # kill -9: no chance to clean up
        holder.wait(10)
    with instance_lock(run_dir, LOCK_NAME) as mine:
        assert mine  # the kernel released it


HOLD_LOCK = """
import sys, time
from pathlib import Path
from imageselector.fsutil import instance_lock
with instance_lock(Path(sys.argv[1]), sys.argv[2]) as mine:
    print("held" if mine else "busy", flush=True)
    time.sleep(120)
"""


def test_kill_file_stops_a_running_sync_gracefully(home):
    with Simulator(listings=800, seed=2, qps=0) as sim:
        write_qps(home, 20.0)
        proc = _run_sync_proc(sim, home)
        deadline = time.monotonic() + 60
        while sim.stats.snapshot().get("requests", 0) < 10:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        (home / KILL).touch()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
        assert "stopping: kill file KILL" in err


def test_bounded_crawl_without_splitting_or_shop_crawls(home, monkeypatch):
    """ETSY_SPLIT_PARTITIONS=0 / ETSY_CRAWL_SHOPS=0 (the demo's bounded real-API crawl): stop at the offset cap."""
    with Simulator(listings=400, seed=7, qps=0, max_offset=100) as sim:
        settings = sim_settings(sim, home, monkeypatch, ETSY_SPLIT_PARTITIONS="0", ETSY_CRAWL_SHOPS="0")
        rc = run_sync(settings, Stopper(home, [KILL], install_signals=False), once=True, log=quiet_logger())
        assert rc == 0
        conn = db.connect(settings.db_path)
        assert conn.execute("SELECT COUNT(*) FROM listings").fetchone()[0] == 200  # offsets 0 and 100
        assert [tuple(r) for r in conn.execute("SELECT state FROM crawl_partitions")] == [("capped",)]
        assert conn.execute("SELECT COUNT(*) FROM shops WHERE crawl_state != 'pending'").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM listings WHERE images_fetched_at IS NULL").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(DISTINCT listing_id) FROM image_status").fetchone()[0] == 200
        conn.close()
