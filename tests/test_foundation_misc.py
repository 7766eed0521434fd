"""Kill files, atomic writes, logging, settings."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imageselector import fsutil
from imageselector.config import load_settings
from imageselector.layout import image_path, image_relpath
from imageselector.logs import Progress, fmt_duration, setup_logging
from imageselector.stopping import KILL, KILL_BG, Stopper, remove_kill_files


def test_stopper_sees_own_kill_files_only(tmp_path: Path) -> None:
    s = Stopper(tmp_path, (KILL, KILL_BG), install_signals=False)
    assert not s.should_stop()
    (tmp_path / "KILL_DL").touch()
    assert not s.should_stop()
    (tmp_path / "KILL_BG").touch()
    assert s.should_stop() and s.reason == "kill file KILL_BG"
    assert sorted(remove_kill_files(tmp_path)) == ["KILL_BG", "KILL_DL"]


def test_stopper_signal_takes_graceful_path(tmp_path: Path) -> None:
    s = Stopper(tmp_path, (KILL,))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.should_stop() and s.reason == "signal SIGTERM"
        t0 = time.monotonic()
        assert s.wait(10)
        assert time.monotonic() - t0 < 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_atomic_write_leaves_old_or_new_never_partial(tmp_path: Path) -> None:
    final = tmp_path / "a" / "f.bin"
    fsutil.atomic_write_bytes(final, b"old", tmp_path / ".tmp")
    with pytest.raises(RuntimeError), fsutil.atomic_writer(final, tmp_path / ".tmp") as f:
        f.write(b"new but interrupted")
        raise RuntimeError("crash mid-write")
    assert final.read_bytes() == b"old"
    assert list((tmp_path / ".tmp").iterdir()) == []
    fsutil.atomic_write_bytes(final, b"new", tmp_path / ".tmp")
    assert final.read_bytes() == b"new"


def test_clean_tmp_removes_debris_of_dead_writers_only(tmp_path: Path) -> None:
    (tmp_path / ".x.jpg.999999.abcd1234.tmp").write_bytes(b"partial")  # dead pid
    mine = tmp_path / f".y.jpg.{os.getpid()}.abcd1234.tmp"
    mine.write_bytes(b"in progress")
    assert fsutil.clean_tmp(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [mine.name]


def test_image_layout_is_computable_and_sharded(tmp_path: Path) -> None:
    assert image_relpath(123, 4567001) == "001/123_4567001.jpg"
    assert image_path(tmp_path, 1, 2) == tmp_path / "002" / "1_2.jpg"


def test_logging_masks_secrets_and_tags_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = setup_logging("unit", tmp_path, stage="download", secrets=["supersecretkey"])
    log.info("calling with key %s", "supersecretkey:other")
    for h in logging.getLogger().handlers:
        h.flush()
    text = (tmp_path / "unit.log").read_text()
    assert "supersecretkey" not in text and "***:other" in text and "[download]" in text
    assert "supersecretkey" not in capsys.readouterr().err


def test_shared_log_only_the_main_process_rotates(tmp_path: Path) -> None:
    """A `--processes` helper (rotate=False) appends to the shared log and follows the main process's rotation."""
    helper = (
        "import logging, sys; from pathlib import Path; from imageselector.logs import setup_logging\n"
        "log = setup_logging('shared', Path(sys.argv[1]), stage='download-1', rotate=False, max_bytes=200)\n"
        "for line in sys.stdin:\n"
        "    log.info('helper %s', line.strip()); print('ok', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", helper, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    log_path = tmp_path / "shared.log"

    def say(n: int) -> None:
        proc.stdin.write(f"{n}\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "ok\n"

    try:
        for n in range(5):  # ~60 bytes a line: well past max_bytes, yet a helper never rotates
            say(n)
        assert not (tmp_path / "shared.log.1").exists()
        main_log = setup_logging("shared", tmp_path, stage="download", max_bytes=100, backups=50)
        for n in range(3):
            main_log.info("main %d", n)  # the main process rotates the file the helper writes
        assert (tmp_path / "shared.log.1").exists()
        say(99)
        assert "helper 99" in log_path.read_text()  # the helper reopened the new file
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        for h in logging.getLogger().handlers:
            h.close()
    every = "".join(p.read_text() for p in tmp_path.glob("shared.log*"))
    assert all(f"helper {n}" in every for n in (0, 1, 2, 3, 4, 99)) and all(f"main {n}" in every for n in range(3))


def test_progress_reports_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    t = [0.0]
    p = Progress(logging.getLogger("p"), "images", interval=10, remaining=lambda: 300, clock=lambda: t[0])
    with caplog.at_level(logging.INFO):
        t[0] = 10.0
        p.add(50, nbytes=5_000_000)
    line = caplog.records[-1].getMessage()
    assert "50 images done" in line and "5.00/s now" in line and "0.50 MB/s" in line and "ETA 1m00s" in line
    assert fmt_duration(90061) == "1d01h"


def test_settings_env_overrides_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("ETSY_API_KEY=fromfile\nETSY_CDN_BASE=http://cdn.example/\n")
    monkeypatch.setenv("IMAGESELECTOR_HOME", str(tmp_path))
    monkeypatch.delenv("ETSY_CDN_BASE", raising=False)
    monkeypatch.setenv("ETSY_API_KEY", "fromenv")
    s = load_settings()
    assert s.home == tmp_path.resolve() and s.api_key == "fromenv" and s.cdn_base == "http://cdn.example"
    assert s.db_path == tmp_path.resolve() / "etsy_data.db"
