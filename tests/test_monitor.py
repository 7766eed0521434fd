"""The pipeline monitor over fake workers: backoff, crash-loop cap, hangs, kill files, held stages."""

from __future__ import annotations

import logging
import time

from imageselector.fsutil import pid_alive
from tests.helpers.monitor_harness import MonitorThread, fake_stage, make_config, starts, wait_for


def test_crash_restarts_with_exponential_backoff(settings, home, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config({"w": fake_stage("w", "crash-first", None, "--crash-times", "3", "--crash-after", "0")})
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: len(starts(home, "w")) >= 4)
        r = mt.runner("w")
        wait_for(lambda: r.state == "running" and r.proc is not None)
        assert r.delays == [0.2, 0.4, 0.8]  # base 0.2 doubling, one per crash
        times = [t for _, t in starts(home, "w")]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(g >= d for g, d in zip(gaps, r.delays, strict=True)), (gaps, r.delays)
        assert mt.stop() == 0
    assert r.restarts == 3
    assert "w crashed (exit code 3" in caplog.text


def test_crash_loop_is_capped_and_other_stages_keep_running(settings, home, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config(
        {"bad": fake_stage("bad", "crash", None, "--crash-after", "0"), "ok": fake_stage("ok", "good", "KILL_DL")},
        crash_loop_max=3,
        backoff_base_s=0.05,
    )
    with MonitorThread(settings, cfg) as mt:
        bad, ok = mt.runner("bad"), mt.runner("ok")
        wait_for(lambda: bad.state == "failed")
        ok_pid = ok.proc.pid
        n = len(starts(home, "bad"))
        time.sleep(0.6)  # several ticks: a failed stage must stay down
        assert len(starts(home, "bad")) == n == 3
        assert ok.state == "running" and ok.proc.pid == ok_pid and ok.starts == 1
        assert mt.stop() == 0
    assert "CRASH LOOP: 3 crashes" in caplog.text
    assert "bad STOPPED, NOT RESTARTING" in caplog.text


def test_hung_worker_is_detected_by_heartbeat_and_restarted(settings, home, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config({"h": fake_stage("h", "hang", "KILL_BG")}, hang_timeout_s=0.8)
    with MonitorThread(settings, cfg) as mt:
        r = mt.runner("h")
        wait_for(lambda: len(starts(home, "h")) >= 2)
        first_pid = starts(home, "h")[0][0]
        assert not pid_alive(first_pid)
        assert r.hangs >= 1
        assert mt.stop() == 0
    assert "hung: no heartbeat for" in caplog.text


def test_healthy_worker_with_heartbeats_is_not_restarted(settings, home):
    cfg = make_config({"g": fake_stage("g", "good", "KILL_DL")}, hang_timeout_s=0.8)
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: mt.runner("g").proc is not None)
        time.sleep(2.0)  # well past the hang timeout, but it beats every 0.1 s
        assert mt.runner("g").starts == 1 and mt.runner("g").hangs == 0
        assert mt.stop() == 0


def test_stale_kill_files_are_removed_at_start(settings, home, caplog):
    caplog.set_level(logging.INFO)
    for name in ("KILL", "KILL_DL", "KILL_BG", "KILL_EMBED"):
        (home / name).touch()
    cfg = make_config({"g": fake_stage("g", "good", "KILL_DL")})
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: mt.runner("g").proc is not None)
        assert not any((home / n).exists() for n in ("KILL", "KILL_DL", "KILL_BG", "KILL_EMBED"))
        assert mt.stop() == 0
    assert "removed stale kill files from the last stop: KILL KILL_DL KILL_BG KILL_EMBED" in caplog.text


def test_stage_kill_file_holds_stage_until_removed(settings, home):
    cfg = make_config({"g": fake_stage("g", "good", "KILL_DL")})
    with MonitorThread(settings, cfg) as mt:
        r = mt.runner("g")
        wait_for(lambda: r.proc is not None)
        (home / "KILL_DL").touch()
        wait_for(lambda: r.state == "held")
        assert len(starts(home, "g")) == 1
        (home / "KILL_DL").unlink()
        wait_for(lambda: r.state == "running" and len(starts(home, "g")) == 2)
        assert mt.stop() == 0
    assert r.delays == []  # a requested stop is not a crash


def test_exit_code_2_is_not_retried(settings, home, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config({"u": fake_stage("u", "good", None, "--bogus-flag")})
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: mt.runner("u").state == "failed")
        assert mt.runner("u").starts == 1
        assert mt.stop() == 0
    assert "bad usage or configuration" in caplog.text


def test_status_lines_name_every_stage(settings, home, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config({"download": fake_stage("download", "good", "KILL_DL")}, status_interval_s=0.3)
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: "status: download" in caplog.text)
        assert mt.stop() == 0
    line = next(ln for ln in caplog.text.splitlines() if "status: download" in ln)
    assert "backlog 0" in line and "restarts 0" in line and "running pid" in line


def test_leases_of_a_crashed_worker_are_freed_at_once(settings, home, conn, caplog):
    from imageselector import db
    from tests.helpers.rows import seed_images

    caplog.set_level(logging.INFO)
    seed_images(conn, 8)
    stage = fake_stage("download", "crash", "KILL_DL", "--claim", "download", "--crash-after", "0")
    cfg = make_config({"download": stage}, crash_loop_max=1)
    with MonitorThread(settings, cfg) as mt:
        wait_for(lambda: mt.runner("download").state == "failed")
        assert mt.stop() == 0
    assert conn.execute("SELECT COUNT(*) FROM image_status WHERE download_claim IS NOT NULL").fetchone()[0] == 0
    assert "freed 5 row(s) leased by the exited worker (download)" in caplog.text
    assert len(db.claim_batch(conn, "download", db.make_owner(), 10)) == 8  # all claimable again


def test_crash_looped_stage_is_tried_again_after_the_cool_down(settings, home, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config(
        {"bad": fake_stage("bad", "crash", None, "--crash-after", "0")},
        crash_loop_max=2,
        backoff_base_s=0.05,
        crash_loop_cooldown_s=0.5,
    )
    with MonitorThread(settings, cfg):
        wait_for(lambda: len(starts(home, "bad")) >= 3)  # 2 crashes, cool-down, a third start
        assert "one more try in 0s" in caplog.text
        assert "cool-down after its crash loop is over; trying it again" in caplog.text
