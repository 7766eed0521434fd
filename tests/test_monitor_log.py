"""The monitor's logs across restarts and rotations, started exactly as the guide says."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from imageselector.stopping import ALL_KILL_FILES
from tests.helpers.monitor_harness import config_dict, fake_stage, starts, wait_for

ROOT = Path(__file__).resolve().parent.parent

# A worker that rotates its own log many times while it also writes raw lines to stderr (which the
# monitor pointed at that log), as a library printing a traceback or a warning would.
CHATTY = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from imageselector.config import load_settings
from imageselector.logs import setup_logging
log = setup_logging("chatty", load_settings().home, max_bytes=1500, backups=100)
for n in range(80):
    log.info("logline %d %03d %s", os.getpid(), n, "x" * 40)
    os.write(2, b"rawstderr %d %03d\\n" % (os.getpid(), n))
log.info("chatty %d done", os.getpid())
"""


def _guide_start_command() -> str:
    """The guide's start line, every copy of it the same, as bash runs it here (no caffeinate off macOS)."""
    text = (ROOT / "IMAC_OPERATIONS.md").read_text()
    lines = {ln.strip() for ln in text.splitlines() if ln.strip().startswith("nohup") and "pipeline_monitor" in ln}
    assert len(lines) == 1, lines
    cmd = lines.pop()
    assert cmd.endswith("&")
    cmd = cmd[:-1].strip().replace("caffeinate -i ", "").replace("venv/bin/python", shlex.quote(sys.executable))
    return cmd.replace("scripts/pipeline_monitor.py", shlex.quote(str(ROOT / "scripts" / "pipeline_monitor.py")))


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:  # rotated away between the glob and the read (the rotation this test provokes)
        return ""


def _chatty_pid(home: Path) -> int | None:
    text = "".join(_read_or_empty(p) for p in home.glob("chatty.log*"))
    found = re.findall(r"chatty (\d+) done", text)
    return int(found[-1]) if found else None


def test_restart_with_the_guides_command_keeps_the_log_and_rotation_overwrites_nothing(home: Path) -> None:
    (home / "chatty.py").write_text(CHATTY)
    chatty = {"script": str(home / "chatty.py"), "log": "chatty", "heartbeat": None, "restart_on_success_s": None}
    cfg = config_dict({"g": fake_stage("g", "good", "KILL_DL"), "chatty": chatty})
    (home / "pipeline_monitor.json").write_text(json.dumps(cfg))
    cmd = _guide_start_command()
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home)}
    chatty_pids = []
    for run in (1, 2):
        seen = _chatty_pid(home)
        mon = subprocess.Popen(["bash", "-c", cmd], cwd=home, env=env)
        try:
            wait_for(lambda: len(starts(home, "g")) >= run, 30)  # noqa: B023
            wait_for(lambda: _chatty_pid(home) not in (None, seen), 30)  # noqa: B023
            chatty_pids.append(_chatty_pid(home))
            (home / "KILL").touch()
            assert mon.wait(timeout=60) == 0
        finally:
            if mon.poll() is None:
                mon.kill()
                mon.wait()
        for name in ALL_KILL_FILES:
            (home / name).unlink(missing_ok=True)

    log = (home / "pipeline.log").read_text()
    assert log.count("pipeline monitor started") == 2, log  # run 1 is still there, and no line is written twice
    assert len(re.findall(r"g started: pid", log)) == 2

    chatty_files = sorted(home.glob("chatty.log*"))
    assert len(chatty_files) >= 6  # each run rotated its log several times
    every = ""
    for f in chatty_files:
        text = f.read_text()
        for line in text.splitlines():  # whole lines only: nothing was written over the start of a backup
            assert re.fullmatch(
                r"\S+ \S+ INFO +\[chatty\] (logline \d+ \d{3} x{40}|chatty \d+ done)|rawstderr \d+ \d{3}", line
            ), (f.name, line)
        every += text
    for pid in chatty_pids:
        for n in range(80):
            assert every.count(f"logline {pid} {n:03d} ") == 1
            assert every.count(f"rawstderr {pid} {n:03d}\n") == 1
