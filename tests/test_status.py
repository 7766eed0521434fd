"""image_db.py output against a hand-built database, as exact text."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from imageselector import db
from imageselector.status import figures
from tests.helpers.rows import seed_images

ROOT = Path(__file__).resolve().parent.parent

EXPECTED_BLOCK = """=== Image Status ===

Total images:             30
To download:              30
Download done:            20
BG removed:               12
Embedded clip32:           9
Embedded clip14:           0
Embedded dino2b:           0
Embedded dino2l:           0
Embedded dino3b:           0"""


def _build(conn) -> None:
    seed_images(conn, 30)
    conn.execute("UPDATE image_status SET download_done=1 WHERE gid < 20")
    conn.execute("UPDATE image_status SET bg_removed=1 WHERE gid < 12")
    conn.execute("UPDATE image_status SET embed_clip_vitb32=1 WHERE gid < 9")
    conn.execute("UPDATE image_status SET download_error='HTTP 404', download_parked=1 WHERE gid IN (25, 26)")
    conn.execute("UPDATE image_status SET download_error='HTTP 503', download_not_before=9e12 WHERE gid = 27")
    now = time.time()
    conn.execute(
        "INSERT INTO progress(ts, stage, n) VALUES (?, 'download', 60), (?, 'download', 120)", (now - 60, now - 1800)
    )


def test_guide_block_exact_text(conn) -> None:
    _build(conn)
    data = figures.collect(conn)
    assert figures.guide_block(data) == EXPECTED_BLOCK


def test_backlog_is_one_definition_equal_to_the_pending_rows(conn) -> None:
    """db.backlog (O(1), from the counters) counts exactly the rows a worker could still claim or retry."""
    _build(conn)
    for name in db.STAGES:
        st = db.stage(name)
        pending = conn.execute(f"SELECT COUNT(*) FROM image_status WHERE {st.pending_sql}").fetchone()[0]
        assert db.backlog(conn, name) == pending
        assert figures.collect(conn)["stages"][name]["backlog"] == pending
    assert db.backlog(conn, "download") == 30 - 20 - 2


def test_guide_alignment_at_guide_scale() -> None:
    data = dict(total=1234567, to_download=1234567, download_done=945632, bg_removed=277558, embed_clip_vitb32=79664)
    data |= {k: 0 for k in ("embed_clip_vitl14", "embed_dinov2_base", "embed_dinov2_large", "embed_dinov3_base")}
    text = figures.guide_block(data)
    assert "Total images:      1,234,567" in text
    assert "Download done:       945,632" in text
    assert "Embedded clip32:      79,664" in text
    assert "Embedded dino3b:           0" in text


def test_stage_figures(conn) -> None:
    _build(conn)
    s = figures.collect(conn)["stages"]["download"]
    assert (s["done"], s["parked"], s["failing"], s["backlog"]) == (20, 2, 1, 8)
    # 10 min: one entry, no span to measure: 60 over the whole window (a lower bound); 1 h: the 60 done
    # between the two entries, over the 1,740 s between them
    assert s["per_min_10m"] == 6.0 and abs(s["per_min_1h"] - 60 / 29) < 1e-9
    assert abs(s["eta_s"] - 8 / (60 / 1740)) < 1e-6
    bg = figures.collect(conn)["stages"]["bg"]
    assert (bg["done"], bg["backlog"], bg["eta_s"]) == (12, 8, None)


def test_rates_cover_only_the_span_work_covered(conn) -> None:
    """A run 2 minutes old shows its real pace, not 2/10 of it; the ETA follows the last 10 minutes."""
    seed_images(conn, 3000)
    conn.execute("UPDATE image_status SET download_done=1 WHERE gid < 1300")
    now = 1_000_000.0
    rows = [(now - 3000 + 60 * k, "download", 10) for k in range(40)]  # 40 min ago: 10/min
    rows += [(now - 120 + 10 * k, "download", 100) for k in range(13)]  # the last 2 min: 100 every 10 s
    conn.executemany("INSERT INTO progress(ts, stage, n) VALUES (?,?,?)", rows)
    s = figures.collect(conn, now=now)["stages"]["download"]
    assert s["per_min_10m"] == 600.0  # 1,200 after the first entry, over 120 s
    first_1h, last_1h = now - 3000, now
    assert abs(s["per_min_1h"] - (39 * 10 + 13 * 100) / ((last_1h - first_1h) / 60)) < 1e-9
    assert abs(s["eta_s"] - s["backlog"] / 10.0) < 1e-6 and s["backlog"] == 1700  # 600/min = 10/s


def test_image_db_script_text_and_json(settings, conn) -> None:
    _build(conn)
    out = subprocess.run([sys.executable, str(ROOT / "image_db.py")], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(EXPECTED_BLOCK + "\n")
    assert "=== Stages ===" in out.stdout
    js = subprocess.run(
        [sys.executable, str(ROOT / "image_db.py"), "--json"], capture_output=True, text=True, check=True
    )
    data = json.loads(js.stdout)
    assert data["download_done"] == 20 and data["stages"]["download"]["parked"] == 2


def test_warning_is_shown(conn) -> None:
    seed_images(conn, 1)
    db.kv_set(conn, "status_warning", "stand-in models: results are only structural")
    assert "WARNING: stand-in models" in figures.render(figures.collect(conn))


def _closed_early(argv: list[str]) -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reader is already gone (`| head` that has had enough)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # before the script writes anything: its first write meets a closed pipe
    err = proc.stderr.read()
    proc.stderr.close()
    return subprocess.CompletedProcess(argv, proc.wait(timeout=120), b"", err)


def test_broken_pipe_is_quiet(settings, conn) -> None:
    """`image_db.py | head`, `search.py --status | head`, `evaluate.py --help | head`: exit 0, nothing on stderr."""
    _build(conn)
    for argv in (
        [sys.executable, str(ROOT / "image_db.py")],
        [sys.executable, str(ROOT / "image_db.py"), "--json"],
        [sys.executable, str(ROOT / "image_search_v2" / "search.py"), "--status"],
        [sys.executable, str(ROOT / "image_search_v2" / "evaluate.py"), "--help"],
    ):
        done = _closed_early(argv)
        assert (done.returncode, done.stderr.decode()) == (0, ""), argv
