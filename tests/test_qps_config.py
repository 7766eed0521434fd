"""qps_config.json, the one owner: hostile hand-edited values are clamped with a warning, never a crash or a stall."""

from __future__ import annotations

import json
import logging
import math

import pytest

from imageselector import qps_config
from imageselector.etsy.pacing import Pacer
from imageselector.monitor.stage import Monitor
from tests.helpers.monitor_harness import make_config


@pytest.mark.parametrize(
    ("text", "qps"),
    [
        ('{"qps": 1e999}', qps_config.DEFAULT_MAX_QPS),  # json reads it as infinity
        ('{"qps": 0.0001}', qps_config.DEFAULT_MIN_QPS),
        ('{"qps": -3}', qps_config.DEFAULT_MIN_QPS),
        ('{"qps": NaN}', qps_config.DEFAULT_QPS),
        ('{"qps": "fast"}', qps_config.DEFAULT_QPS),
        ('{"qps": true}', qps_config.DEFAULT_QPS),
        ('{"qps": null}', qps_config.DEFAULT_QPS),
        ('{"qps": 50, "min_qps": 1, "max_qps": 1e999}', qps_config.DEFAULT_MAX_QPS),  # unusable bound: default
        ('{"qps": 3, "min_qps": 5, "max_qps": 2}', 3.0),  # crossed bounds: defaults
        ('{"qps": 0.02, "min_qps": 0.0001}', qps_config.DEFAULT_MIN_QPS),
    ],
)
def test_out_of_range_values_are_clamped_with_a_warning(tmp_path, text, qps):
    path = tmp_path / qps_config.FILE_NAME
    path.write_text(text)
    cfg = qps_config.read(path)
    assert cfg.qps == qps and cfg.warnings
    assert math.isfinite(cfg.qps) and qps_config.ABS_MIN_QPS <= cfg.min_qps <= cfg.qps <= cfg.max_qps


def test_good_values_pass_untouched_and_write_is_atomic(tmp_path):
    path = tmp_path / qps_config.FILE_NAME
    assert qps_config.read(path) is None
    written = qps_config.write(path, 2.5, 0.5, 20.0, "by hand", tmp_dir=tmp_path / ".tmp")
    assert json.loads(path.read_text()) == written
    assert not list((tmp_path / ".tmp").iterdir())
    cfg = qps_config.read(path)
    assert (cfg.qps, cfg.min_qps, cfg.max_qps, cfg.reason, cfg.warnings) == (2.5, 0.5, 20.0, "by hand", ())
    path.write_text("[1, 2]")
    with pytest.raises(qps_config.QpsConfigError):
        qps_config.read(path)


@pytest.mark.parametrize("value", ["1e999", "0.0001", "NaN", "-1", '"x"'])
def test_sync_pacer_neither_crashes_nor_stalls(settings, caplog, value):
    settings.qps_config_path.write_text(f'{{"qps": {value}}}')
    with caplog.at_level(logging.WARNING):
        pacer = Pacer(settings.qps_config_path, tmp_dir=settings.tmp_dir)
        n, window = pacer.window()
    assert qps_config.DEFAULT_MIN_QPS <= pacer.qps <= qps_config.DEFAULT_MAX_QPS
    assert n >= 1 and 0 < window <= 2.0  # a request at least every two seconds: no stall
    assert "qps_config.json: qps=" in caplog.text


def test_monitor_tunes_from_a_hostile_file_without_crashing(settings, conn, caplog):
    cfg = make_config({}, qps={"enabled": True, "initial_qps": 4.0, "min_qps": 1.0, "max_qps": 8.0})
    m = Monitor(settings, cfg, install_signals=False)
    m.conn = conn
    settings.qps_config_path.write_text('{"qps": 1e999, "min_qps": -1, "max_qps": "lots"}')
    with caplog.at_level(logging.WARNING):
        m._init_qps()
        m._tune_qps(0.0)  # no sync stats: holds, at the clamped value
        m._tune_qps(1.0)
    assert caplog.text.count("qps=inf is outside") == 1  # said once, not at every interval
    settings.qps_config_path.write_text('{"qps": 0.0001}')
    m.qps_prev = None
    m._tune_qps(2.0)
    assert "clamped to 1" in caplog.text
