"""The monitor's free-space pause and its KILL-at-start rule, over fake workers."""

from __future__ import annotations

import logging
import os
import time

from imageselector.monitor.stage import Monitor
from imageselector.status import health
from tests.helpers.monitor_harness import MonitorThread, fake_stage, make_config, read_state, starts, wait_for


def test_below_the_floor_every_stage_pauses_and_resumes_when_space_returns(settings, home, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config(
        {"a": fake_stage("a", "good", "KILL_DL"), "b": fake_stage("b", "good", None)},
        min_free_mb=1e12,  # no disk has that much: paused at once
        disk_check_s=0.1,
        min_pause_s=0.0,
    )
    with MonitorThread(settings, cfg) as mt:
        a, b = mt.runner("a"), mt.runner("b")
        wait_for(lambda: mt.monitor.disk.paused and a.state == "paused" and b.state == "paused")
        assert read_state(home)["disk"]["paused"] is True
        assert "DISK FULL: the pipeline monitor paused every stage" in (health.disk_warning(settings) or "")
        n_a, n_b = len(starts(home, "a")), len(starts(home, "b"))
        time.sleep(0.5)  # several ticks: a paused stage stays down, and no crash is counted
        assert (len(starts(home, "a")), len(starts(home, "b"))) == (n_a, n_b)
        assert a.crashes == collections_empty() and not (home / "KILL_DL").exists()  # no kill file of ours
        mt.monitor.disk.min_free_mb = mt.monitor.disk.resume_free_mb = 0.0  # "space returns"
        wait_for(lambda: a.state == "running" and b.state == "running")
        wait_for(lambda: read_state(home)["disk"]["paused"] is False)
        assert health.disk_warning(settings) is None
        assert mt.stop() == 0
    assert "DISK SPACE: " in caplog.text and "disk space is back" in caplog.text


def collections_empty():  # a deque compares equal to an empty deque only
    import collections

    return collections.deque()


def test_a_worker_that_exits_with_no_space_pauses_everything_instead_of_crash_looping(settings, home, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config(
        {
            "full": fake_stage("full", "crash", None, "--crash-after", "0", "--crash-code", "75"),
            "ok": fake_stage("ok", "good", "KILL_DL"),
        },
        min_free_mb=0.0,
        disk_check_s=0.1,
        min_pause_s=1.0,
        crash_loop_max=2,
    )
    with MonitorThread(settings, cfg) as mt:
        full, ok = mt.runner("full"), mt.runner("ok")
        wait_for(lambda: mt.monitor.disk.paused)
        assert "full stopped: no space left on the disk" in mt.monitor.disk.reason
        wait_for(lambda: ok.state == "paused")  # the others are paused too: the disk is shared
        # the disk has room (floor 0): after min_pause_s it tries again, and never counts a crash
        wait_for(lambda: len(starts(home, "full")) >= 3, timeout=20)
        assert full.state != "failed" and len(full.crashes) == 0
        assert mt.stop() == 0
    assert "CRASH LOOP" not in caplog.text and "the disk is full" in caplog.text


def test_a_kill_touched_after_the_last_exit_is_honoured_at_start(settings, home, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config({"g": fake_stage("g", "good", "KILL_DL")})
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: mt.runner("g").proc is not None)
        assert mt.stop() == 0
    exited = read_state(home)["exited_at"]
    assert exited and (home / "KILL_DL").exists()  # written by the shutdown: stale from now on
    (home / "KILL").touch()
    os.utime(home / "KILL", (exited + 0.01, exited + 0.01))  # "just before the start", after that exit
    n = len(starts(home, "g"))
    t0 = time.monotonic()
    assert Monitor(settings, cfg, install_signals=False).run() == 0  # returns at once
    assert time.monotonic() - t0 < 10 and len(starts(home, "g")) == n  # nothing was started
    assert (home / "KILL").exists()
    assert "KILL was touched at" in caplog.text and "stopping at once, as asked" in caplog.text
    # that run recorded its exit too: the same KILL is now older than it, stale, cleared, and the stage runs
    caplog.clear()
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: mt.runner("g").proc is not None)
        assert not (home / "KILL").exists()
        assert mt.stop() == 0
    assert "removed stale kill files from the last stop: KILL\n" in caplog.text


def test_a_stage_kill_file_touched_after_the_last_exit_holds_that_stage(settings, home, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config({"g": fake_stage("g", "good", "KILL_DL"), "h": fake_stage("h", "good", "KILL_BG")})
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: mt.runner("g").proc is not None)
        assert mt.stop() == 0
    exited = read_state(home)["exited_at"]
    os.utime(home / "KILL_DL", (exited + 0.01, exited + 0.01))  # touched again by the user after the stop
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: mt.runner("h").proc is not None)
        assert mt.runner("g").state == "held" and (home / "KILL_DL").exists()
        assert mt.stop() == 0
    assert "KILL_DL was touched after the last monitor exit" in caplog.text


def test_the_monitor_warns_loudly_when_images_is_missing(settings, home, conn, caplog):
    from tests.helpers.rows import seed_images

    caplog.set_level(logging.INFO)
    seed_images(conn, 4)
    conn.execute("UPDATE image_status SET download_done=1")  # but there is no images/ folder at all
    cfg = make_config({"g": fake_stage("g", "good", "KILL_DL")})
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: mt.runner("g").proc is not None)
        assert mt.stop() == 0
    assert f"WARNING: {settings.images_dir} is missing but 4 rows say downloaded: is the disk mounted?" in caplog.text
