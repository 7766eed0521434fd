"""AIMD tuning of qps_config.json: the pure policy, and the monitor applying it from kv sync_stats."""

from __future__ import annotations

import json

from imageselector import db
from imageselector.monitor import qps_tuner
from imageselector.monitor.qps_tuner import Policy, SyncStats, decide

P = Policy(min_qps=1.0, max_qps=10.0, increase=0.5, decrease=0.5, headroom=0.2, stale_after_s=120)
NOW = 1_000_000.0


def st(ts=NOW, requests=100, h429=0, lps=10.0, rts=8.0, lpd=None, rtd=None) -> SyncStats:
    return SyncStats(ts, requests, h429, lps, rts, lpd, rtd)


def test_increase_when_no_429s_and_headroom():
    d = decide(5.0, st(NOW - 30, 100), st(NOW, 150), P, NOW)
    assert d.qps == 5.5 and d.changed and d.reason.startswith("increase")


def test_multiplicative_decrease_on_429s():
    d = decide(6.0, st(NOW - 30, 100, 0), st(NOW, 150, 4), P, NOW)
    assert d.qps == 3.0 and "4 of 50 requests got 429" in d.reason


def test_holds_without_headroom_or_traffic_or_fresh_stats():
    assert decide(5.0, st(NOW - 30, 100), st(NOW, 150, rts=1.0), P, NOW).qps == 5.0  # 1 of 10 left < 20%
    assert decide(5.0, st(NOW - 30, 150), st(NOW, 150), P, NOW).qps == 5.0  # sync idle
    assert not decide(5.0, st(NOW - 500, 100), st(NOW - 400, 150), P, NOW).changed  # stale: sync not running
    assert not decide(5.0, None, st(NOW, 150), P, NOW).changed  # first look: no delta yet
    assert not decide(5.0, None, None, P, NOW).changed


def test_stays_within_min_max_and_the_server_limit():
    assert decide(1.2, st(NOW - 30, 0), st(NOW, 50, 10), P, NOW).qps == 1.0
    assert decide(9.8, st(NOW - 30, 0), st(NOW, 50), P, NOW).qps == 10.0
    assert decide(3.9, st(NOW - 30, 0), st(NOW, 50, lps=4.0, rts=4.0), P, NOW).qps == 4.0  # x-limit-per-second 4


def test_daily_quota_caps_the_rate():
    # 2,160 requests left, spread over the 6 h horizon -> 0.1/s; sustainable 1,000/day -> 0.0116/s
    low = Policy(min_qps=0.05, max_qps=10.0)
    d = decide(5.0, st(NOW - 30, 0), st(NOW, 50, lpd=1000, rtd=2160), low, NOW)
    assert d.qps == 0.1 and "daily quota" in d.reason
    # ... but never below min_qps (sync clamps to it; its daily reserve pauses requests instead)
    assert decide(5.0, st(NOW - 30, 0), st(NOW, 50, lpd=1000, rtd=2160), P, NOW).qps == 1.0
    # plenty left: the quota does not bind
    assert decide(5.0, st(NOW - 30, 0), st(NOW, 50, lpd=1e7, rtd=1e7), P, NOW).qps == 5.5
    # exhausted: fall to the sustainable rate (2/s here), never to zero
    assert decide(5.0, st(NOW - 30, 0), st(NOW, 50, lpd=2 * 86400, rtd=0), P, NOW).qps == 2.0


def test_parse_stats_accepts_header_spellings():
    raw = {"ts": 5, "requests": 9, "http_429": 2, "x-limit-per-second": "10", "x-remaining-today": 99}
    s = qps_tuner.parse_stats(json.dumps(raw))
    assert s == SyncStats(5.0, 9, 2, 10.0, None, None, 99.0)
    nested = {"ts": 5, "requests": 9, "http_429": 0, "headers": {"x_remaining_this_second": 3}}
    assert qps_tuner.parse_stats(json.dumps(nested)).remaining_this_second == 3.0
    assert qps_tuner.parse_stats("not json") is None and qps_tuner.parse_stats(None) is None


def test_monitor_applies_the_policy_to_qps_config(settings, conn):
    from imageselector.monitor.stage import Monitor
    from tests.helpers.monitor_harness import make_config

    cfg = make_config({}, qps={"enabled": True, "initial_qps": 4.0, "min_qps": 0.5, "max_qps": 8.0})
    m = Monitor(settings, cfg, install_signals=False)
    m.conn = conn
    m._init_qps()
    path = settings.qps_config_path
    assert json.loads(path.read_text())["qps"] == 4.0
    import time

    t = time.time()
    db.kv_set(conn, "sync_stats", json.dumps({"ts": t - 10, "requests": 100, "http_429": 0}))
    m._tune_qps(t)
    db.kv_set(conn, "sync_stats", json.dumps({"ts": t, "requests": 160, "http_429": 12}))
    m._tune_qps(t)
    cfg_file = json.loads(path.read_text())
    assert cfg_file["qps"] == 2.0 and "12 of 60 requests got 429" in cfg_file["reason"]
    assert cfg_file["min_qps"] == 0.5 and cfg_file["max_qps"] == 8.0 and cfg_file["updated_at"] >= t - 1
    # a hand-edited max_qps in the file wins over the configured one
    cfg_file["max_qps"] = 2.2
    path.write_text(json.dumps(cfg_file))
    db.kv_set(conn, "sync_stats", json.dumps({"ts": t + 10, "requests": 260, "http_429": 12}))
    m._tune_qps(t + 10)
    assert json.loads(path.read_text())["qps"] == 2.2


def test_monitor_backs_off_when_the_simulator_sends_429s(settings, home, monkeypatch):
    """The real sync against the simulator with 30 % injected 429s: the monitor lowers qps and says why."""
    from imageselector.etsy.simulator import Faults, Simulator
    from tests.helpers.monitor_harness import MonitorThread, make_config, wait_for

    path = settings.qps_config_path
    with Simulator(listings=40, seed=2, qps=10, qpd=10**8, faults=Faults(api_429=0.3)) as sim:
        for k, v in {
            "ETSY_API_BASE": sim.api_base,
            "ETSY_CDN_BASE": sim.cdn_base,
            "ETSY_API_KEY": sim.api_key,
            "ETSY_SHARED_SECRET": sim.shared_secret,
            "ETSY_STATS_INTERVAL_S": "0.5",
        }.items():
            monkeypatch.setenv(k, v)
        stages = {"sync": {"args": ["--once"], "restart_on_success_s": None}}
        cfg = make_config(stages, qps={"enabled": True, "interval_s": 1.0, "initial_qps": 8.0})
        with MonitorThread(settings, cfg) as mt:
            wait_for(
                lambda: "got 429" in json.loads(path.read_text()).get("reason", "") if path.exists() else "",
                timeout=45,
                step=0.2,
            )
            assert mt.stop() == 0
    final = json.loads(path.read_text())
    assert final["qps"] < 8.0 and final["min_qps"] <= final["qps"]
    assert sim.stats.snapshot()["429_injected"] > 0
