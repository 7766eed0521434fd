"""Logs a person can trust: progress every 10 s, rates from a smoothed recent window, secrets masked in
tracebacks, and stdout/stderr that follow the log through rotations without overwriting anything."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imageselector.logs import Progress, setup_logging

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "done" in r.getMessage()]


def _eta_s(line: str) -> float:
    m = re.search(r"ETA (?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$", line)
    assert m, line
    h, mi, s = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + s


def test_progress_line_at_least_every_10_s_while_work_flows(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    p = Progress(logging.getLogger("p"), "images", clock=clock)
    stamps = []
    with caplog.at_level(logging.INFO):
        for _ in range(120):  # one image every 0.5 s for a minute
            clock.t += 0.5
            n = len(caplog.records)
            p.add()
            if len(caplog.records) > n:
                stamps.append(clock.t)
    assert len(stamps) >= 6
    gaps = [b - a for a, b in zip([0.0, *stamps], stamps, strict=False)]
    assert max(gaps) <= 10.0, gaps


def test_eta_after_an_idle_hour_follows_the_recent_rate(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    left = [1000]
    p = Progress(logging.getLogger("p"), "images", remaining=lambda: left[0], clock=clock)
    clock.t = 3600.0  # an hour with nothing to do, then 10 images/s
    with caplog.at_level(logging.INFO):
        for _ in range(300):
            clock.t += 0.1
            p.add()
    lines = _lines(caplog)
    assert lines, "no progress line in 30 s of work"
    for line in lines:
        assert "10.00/s now" in line, line
        assert 95 <= _eta_s(line) <= 105, line  # 1,000 left at 10/s, not 3h15m


def test_rate_is_smoothed_like_tqdm_and_follows_a_slowdown(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    p = Progress(logging.getLogger("p"), "images", clock=clock)
    with caplog.at_level(logging.INFO):
        for k in range(1, 601):  # 10/s for a minute: 6 intervals of (100 items, 10 s)
            clock.t = k / 10
            p.add()
        assert p.rate() == pytest.approx(10.0)
        seen = []
        for k in range(1, 161):  # then 2/s: 8 intervals of (20 items, 10 s)
            clock.t = 60 + k / 2
            p.add()
            if k % 20 == 0:
                seen.append(p.rate())
    # tqdm's EMA (smoothing 0.3) of items and of seconds per interval, debiased
    dn = dt = 0.0
    want = []
    for k, (n, s) in enumerate([(100, 10.0)] * 6 + [(20, 10.0)] * 8, start=1):
        dn, dt = 0.3 * n + 0.7 * dn, 0.3 * s + 0.7 * dt
        if k > 6:
            want.append(dn / dt)
    assert seen == pytest.approx(want)
    assert seen[0] < 8.0 and seen[-1] < 2.6  # follows the new pace within a minute or so...
    assert "5.43/s avg" in _lines(caplog)[-1]  # ...while the run's average (760 in 140 s) lags behind


def test_slow_batches_are_work_not_idle(caplog: pytest.LogCaptureFixture) -> None:
    """A 64-image batch every 400 s (a slow CPU) is the pace of the work, not a pause."""
    clock = Clock()
    p = Progress(logging.getLogger("p"), "images", remaining=lambda: 640, clock=clock)
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            clock.t += 400.0
            p.add(64)
    assert p.rate() == pytest.approx(0.16)
    assert 3900 <= _eta_s(_lines(caplog)[-1]) <= 4100


def test_final_report_leaves_out_an_idle_tail(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    p = Progress(logging.getLogger("p"), "images", clock=clock)
    with caplog.at_level(logging.INFO):
        for _ in range(50):
            clock.t += 0.2
            p.add()
        clock.t += 7200.0
        line = p.report(final=True)
    assert line.startswith("finished: 50 images done, 5.00/s now, 5.00/s avg"), line


def test_secrets_are_masked_in_tracebacks_and_stacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = "kEy-supersecret-123"
    log = setup_logging("unit", tmp_path, secrets=[key])
    try:
        try:
            raise RuntimeError(f"GET https://api.example/v3?api_key={key} failed")
        except RuntimeError:
            log.exception("request failed")
        log.warning("where am I", stack_info=True, extra={"k": key})

        def stack_with_secret(secret: str) -> None:
            log.error("deep", stack_info=True)

        stack_with_secret(key)
    finally:
        for h in logging.getLogger().handlers:
            h.flush()
    text = (tmp_path / "unit.log").read_text()
    assert "RuntimeError: GET https://api.example/v3?api_key=*** failed" in text
    assert "Traceback (most recent call last)" in text and "Stack (most recent call last)" in text
    assert key not in text and key not in capsys.readouterr().err


_CHILD = """
import logging, os, sys
from pathlib import Path
from imageselector.logs import setup_logging
log = setup_logging("child", Path(sys.argv[1]), max_bytes=2000, backups=50)
for n in range(100):
    log.info("logline %03d %s", n, "x" * 40)
    os.write(2, b"rawstderr %03d\\n" % n)  # as a traceback printed by a library would be
    print("stdout %03d" % n, flush=True)
"""


@pytest.mark.parametrize("mode", ["wb", "ab"])  # `> child.log 2>&1` (truncating fd) and `>> child.log 2>&1`
def test_stdio_follows_the_log_through_rotations_without_overwriting(tmp_path: Path, mode: str) -> None:
    log_path = tmp_path / "child.log"
    with open(log_path, mode) as out:
        subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=True
        )
    files = sorted(tmp_path.glob("child.log*"))
    assert len(files) >= 4  # it rotated several times
    every = ""
    for f in files:
        text = f.read_text()
        # each file holds whole lines only: nothing written over the start of a backup
        for line in text.splitlines():
            assert re.fullmatch(r"\S+ \S+ INFO +\[child\] logline \d{3} x{40}|rawstderr \d{3}|stdout \d{3}", line), (
                f.name,
                line,
            )
        every += text
    for n in range(100):
        assert every.count(f"logline {n:03d} ") == 1
        assert every.count(f"rawstderr {n:03d}\n") == 1
        assert every.count(f"stdout {n:03d}\n") == 1
    # and the raw lines land in the current file, next to the log lines written at the same time
    newest = log_path.read_text()
    assert "rawstderr 099" in newest and "logline 099" in newest
