"""Pacing: qps_config.json creation and reload, the limiter's window invariant, the daily budget."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time

import pytest
import requests

from imageselector import qps_config
from imageselector.etsy.pacing import Pacer, StopRequested
from imageselector.etsy.simulator import Simulator
from imageselector.qps_config import DEFAULT_QPS
from imageselector.stopping import Stopper


def _write(path, **cfg):
    path.write_text(json.dumps(cfg))
    # make sure the mtime changes even on a coarse-grained filesystem clock
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_missing_config_is_created_with_default_atomically(settings):
    path = settings.qps_config_path
    assert not path.exists()
    assert qps_config.ensure(path, settings.tmp_dir) is True
    cfg = json.loads(path.read_text())
    assert cfg["qps"] == DEFAULT_QPS == 5.0 and {"min_qps", "max_qps", "updated_at", "reason"} <= set(cfg)
    assert not list(settings.tmp_dir.glob("*.tmp"))  # the temp file was renamed into place
    assert qps_config.ensure(path, settings.tmp_dir) is False
    pacer = Pacer(path, tmp_dir=settings.tmp_dir)
    assert pacer.qps == 5.0


def test_config_clamped_and_reloaded_when_it_changes(settings, caplog):
    path = settings.qps_config_path
    _write(path, qps=20, min_qps=1, max_qps=8)
    assert qps_config.read(path).qps == 8
    pacer = Pacer(path)
    assert pacer.qps == 8
    _write(path, qps=3.5, min_qps=1, max_qps=10)
    with caplog.at_level(logging.INFO):
        assert pacer.qps == 3.5
    assert "pacing at 3.50 QPS" in caplog.text
    assert pacer.window() == (3, pytest.approx((1 + pacer.margin) * 3 / 3.5))
    path.write_text("{not json")  # a half-written file by a careless writer: keep the old rate
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000))
    assert pacer.qps == 3.5
    path.unlink()  # deleted: recreated with the default
    assert pacer.qps == DEFAULT_QPS and path.exists()


def test_server_limit_caps_the_rate(settings):
    _write(settings.qps_config_path, qps=10, max_qps=10)
    pacer = Pacer(settings.qps_config_path)
    pacer.observe({"x-limit-per-second": "4", "x-remaining-today": "900", "x-limit-per-day": "1000"})
    assert pacer.qps == 4
    assert pacer.quota.remaining_today == 900 and pacer.quota.limit_per_day == 1000


def test_no_window_ever_holds_more_than_n_answered_requests(settings):
    """The invariant that makes the pacing 429-free whatever the jitter: a request is sent only when
    fewer than n earlier ones were answered within the last window."""
    _write(settings.qps_config_path, qps=40, max_qps=40)
    pacer = Pacer(settings.qps_config_path, skew=5.0)
    n, w = pacer.window()
    log: list[tuple[float, float]] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        rnd = random.Random(k)
        for _ in range(25):
            slot = pacer.acquire()
            time.sleep(rnd.uniform(0, 0.03))
            pacer.release(slot)
            with lock:
                log.append((slot.sent, slot.done))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log) == 100
    for sent, _ in log:
        overlapping = sum(1 for s, d in log if s < sent and d > sent - w)
        assert overlapping < n


def test_paced_requests_cause_no_429_at_the_simulators_limit(settings):
    """Four threads against a 20 QPS simulator, pacing configured at the same 20 QPS."""
    _write(settings.qps_config_path, qps=20, max_qps=20)
    pacer = Pacer(settings.qps_config_path)
    with Simulator(listings=50, seed=1, qps=20) as sim:
        session = requests.Session()
        session.headers["x-api-key"] = sim.api_key_header
        statuses: list[int] = []

        def worker() -> None:
            for _ in range(15):
                slot = pacer.acquire()
                try:
                    statuses.append(session.get(sim.api_base + "/openapi-ping", timeout=5).status_code)
                finally:
                    pacer.release(slot)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses.count(200) == 60
        assert sim.stats.snapshot().get("429_qps", 0) == 0


def test_low_daily_budget_pauses_until_recheck_then_resumes(settings, caplog):
    stopper = Stopper(settings.home, ["KILL"], install_signals=False)
    pacer = Pacer(settings.qps_config_path, daily_reserve=10, quota_recheck_s=0.3, stopper=stopper)
    pacer.observe({"x-remaining-today": "5"})
    with caplog.at_level(logging.INFO):
        t0 = time.monotonic()
        slot = pacer.acquire()  # waits for the recheck, then lets one probe through
        waited = time.monotonic() - t0
        pacer.release(slot)
        assert waited >= 0.25
        assert "daily quota low: 5 requests left (reserve 10); pausing requests until" in caplog.text
        pacer.observe({"x-remaining-today": "5000"})
    assert "daily quota: resuming requests (5,000 left today)" in caplog.text
    assert not pacer.paused()


def test_quota_wait_is_interrupted_by_a_stop(settings):
    stopper = Stopper(settings.home, ["KILL"], install_signals=False)
    pacer = Pacer(settings.qps_config_path, daily_reserve=10, quota_recheck_s=3600, stopper=stopper)
    pacer.quota_exhausted(retry_after=86400)
    threading.Timer(0.2, lambda: (settings.home / "KILL").touch()).start()
    with pytest.raises(StopRequested):
        pacer.acquire()


def test_hold_delays_every_request(settings):
    _write(settings.qps_config_path, qps=100, max_qps=100)
    pacer = Pacer(settings.qps_config_path)
    pacer.release(pacer.acquire())
    pacer.hold(0.3)
    t0 = time.monotonic()
    pacer.release(pacer.acquire())
    assert time.monotonic() - t0 >= 0.25
