"""kill -9 embed.py mid-run, then restart: never a duplicate, never a flag without its vector; all done at the end."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from imageselector import db
from imageselector.embedding.cli import main
from imageselector.vectorstore.store import read_store_manifest
from tests.conftest import ROOT, venv_python
from tests.helpers import embed_fixtures
from tests.helpers.embed_checks import check_no_lies, check_store_files, check_texts
from tests.helpers.embed_data import seed_embeddable

ALL = ["clip_vitb32", "clip_vitl14", "dinov2_base", "dinov2_large", "dinov3_base"]
N = 90
MID_FLUSH_CAP = 6  # rows of progress after which a mid-flush attempt kills even without a sighting


def _env() -> dict[str, str]:
    """The fixtures' home (set in os.environ per test), and merges all the time so kills land in them too."""
    return {**os.environ, "EMBED_STORE_FANOUT": "2"}


standin_registry = embed_fixtures.standin_registry


def _cmd(registry: Path, *extra: str) -> list[str]:
    return [
        venv_python(),
        str(ROOT / "image_search_v2" / "embed.py"),
        *("--model", "all", "--models-file", str(registry), "--batch-size", "3", "--flush-every", "6"),
        *("--dtype", "fp32", *extra),
    ]


def _done(conn) -> int:
    return conn.execute("SELECT SUM(embed_dinov2_base) FROM image_status").fetchone()[0] or 0


def _least_done(conn) -> int:
    """Rows done by the model furthest behind. Models progress at their own rates: a kill mid-flush leaves
    some models' files (and flags) written and others not, and each model claims its own rows."""
    cols = ", ".join(f"SUM(embed_{m})" for m in ALL)
    return min(v or 0 for v in conn.execute(f"SELECT {cols} FROM image_status").fetchone())


def _kill_at_some_instant(settings, conn, registry: Path, rng: random.Random, mid_flush: bool) -> bool:
    """Start embed.py and SIGKILL it once work is under way: at a random moment, or while a file is being written.

    A mid-flush attempt that does not catch a temp file within MID_FLUSH_CAP rows of progress kills there
    anyway: the write window is milliseconds long, and a missed one must not let this run finish all the
    work and leave nothing to kill for the attempts after it (what made this test flaky on a fast machine).
    """
    before = _done(conn)
    proc = subprocess.Popen(_cmd(registry), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 90
    tmp = settings.tmp_dir
    while proc.poll() is None and time.monotonic() < deadline:
        done = _done(conn)
        if (
            mid_flush
            and done > before
            and (done >= before + MID_FLUSH_CAP or (tmp.is_dir() and any(tmp.glob("*.seg.*.tmp"))))
        ):
            break
        if not mid_flush and done > before:
            time.sleep(rng.uniform(0.0, 0.2))
            break
        time.sleep(0.002 if mid_flush else 0.01)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    check_no_lies(conn, settings.embeddings_dir, ALL, exact=False)  # straight after the kill, before any repair
    return killed


def _finish_and_check(settings, conn, registry: Path) -> None:
    """Restart with --watch: it repairs, finishes, keeps polling, and exits 0 on KILL_EMBED."""
    emb = settings.embeddings_dir
    proc = subprocess.Popen(_cmd(registry, "--watch"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 120
    while _least_done(conn) < N and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    (settings.home / "KILL_EMBED").touch()
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
    counts = check_no_lies(conn, emb, ALL, exact=True)
    assert counts == dict.fromkeys(ALL, N)
    check_texts(conn, emb, ["clip_vitb32", "clip_vitl14"])
    check_store_files(emb, ALL)
    merged = [s for m in ALL for s in read_store_manifest(emb, m)["segments"] if s["level"] > 0]
    assert merged, "no merge ran: the kills could not land in one"
    for m in ALL:
        st = db.stage(f"embed_{m}")
        assert conn.execute(f"SELECT COUNT(*) FROM image_status WHERE {st.claim_col} IS NOT NULL").fetchone()[0] == 0
    assert not list(settings.tmp_dir.glob("*.tmp")), "temp files of killed writers were not cleaned"


def test_kill_9_then_restart_no_duplicates_no_lies(settings, conn, standin_registry) -> None:
    seed_embeddable(conn, settings.images_dir, N)
    assert _kill_at_some_instant(settings, conn, standin_registry, random.Random(7), mid_flush=False)
    assert _done(conn) < N
    _finish_and_check(settings, conn, standin_registry)


@pytest.mark.slow
def test_many_kills_including_mid_flush(settings, conn, standin_registry) -> None:
    seed_embeddable(conn, settings.images_dir, N)
    rng = random.Random(11)
    kills = sum(_kill_at_some_instant(settings, conn, standin_registry, rng, mid_flush=i % 2 == 0) for i in range(5))
    assert kills >= 3, f"only {kills} of 5 runs were still working when killed"
    assert _done(conn) < N
    _finish_and_check(settings, conn, standin_registry)


def test_usage_errors_exit_2(home: Path, standin_registry, capsys) -> None:
    assert main(["--models-file", str(standin_registry), "--model", "clip_rn50"]) == 2
    bad = home / "bad.json"
    bad.write_text("{not json")
    assert main(["--models-file", str(bad)]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--batch-size" in capsys.readouterr().out
