"""Bad homes get one clear line on stderr and exit 2, never a traceback, and nothing is created on disk."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from imageselector import db
from tests.helpers.rows import seed_images

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ("sync_data.py", "scripts/image_downloader.py", "scripts/bg_remover.py", "image_search_v2/embed.py")
ALL = ("image_db.py", *WORKERS, "scripts/pipeline_monitor.py")


def run(script: str, home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "IMAGESELECTOR_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=e, timeout=120, cwd=ROOT
    )


def assert_refused(res: subprocess.CompletedProcess, *needles: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    for n in needles:
        assert n in lines[0], lines[0]


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.mark.parametrize("script", ALL)
def test_a_home_that_does_not_exist_is_refused_and_not_created(tmp_path, script):
    typo = tmp_path / "typo"
    res = run(script, typo)
    assert_refused(res, "does not exist", str(typo))
    assert not typo.exists()


def test_image_db_init_creates_the_home_and_prints_zeros(tmp_path):
    home = tmp_path / "new"
    res = run("image_db.py", home, "--init")
    assert res.returncode == 0, res.stderr
    assert "Total images:" in res.stdout and (home / "etsy_data.db").is_file()


def test_image_db_refuses_an_existing_home_without_a_database(home):
    res = run("image_db.py", home)
    assert_refused(res, "no database at", "--init")
    assert listing(home) == []


@pytest.mark.parametrize("script", ALL)
def test_a_file_that_is_not_sqlite_is_refused(home, script):
    (home / "etsy_data.db").write_bytes(b"this is not a database, just text\n" * 50)
    before = listing(home)
    assert_refused(run(script, home), "is not a SQLite database")
    assert listing(home) == before


def test_a_database_from_a_newer_version_is_refused(home):
    conn = db.connect(home / "etsy_data.db")
    conn.execute(f"PRAGMA user_version={db.SCHEMA_VERSION + 1}")
    conn.close()  # the last connection checkpoints: the header carries the version
    before = listing(home)
    for script in ("image_db.py", "sync_data.py", "scripts/image_downloader.py", "scripts/pipeline_monitor.py"):
        assert_refused(run(script, home), f"schema v{db.SCHEMA_VERSION + 1}", "newer than this code")
    assert listing(home) == before


def test_search_status_says_the_database_is_unreadable(home):
    (home / "etsy_data.db").write_bytes(b"garbage" * 100)
    res = run("image_search_v2/search.py", home, "--status")
    assert res.returncode == 0, res.stderr
    assert any("database unreadable" in w and "not a SQLite database" in w for w in json.loads(res.stdout)["warnings"])


@pytest.mark.parametrize("key", ["abc\ndef", "abc def", "clé"])
def test_a_key_with_invalid_bytes_is_a_configuration_error(home, key):
    res = run("sync_data.py", home, env={"ETSY_API_KEY": key, "ETSY_SHARED_SECRET": "s3cret"})
    assert_refused(res, "ETSY_API_KEY contains", "invalid character")
    assert listing(home) == []


@pytest.fixture
def readonly_home(tmp_path):
    """A home on a read-only mount (root ignores permission bits, not a read-only filesystem)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root and mount to build a read-only filesystem")
    try:
        conn = db.connect(mnt / "etsy_data.db")
        seed_images(conn, 7)
        conn.execute("UPDATE image_status SET download_done=1 WHERE rowid <= 3")
        conn.close()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_read_only_home_still_answers_status_and_search_but_workers_refuse(readonly_home):
    res = run("image_db.py", readonly_home)
    assert res.returncode == 0, res.stderr
    assert re.search(r"Total images:\s+7\n", res.stdout) and re.search(r"Download done:\s+3\n", res.stdout)
    res = run("image_search_v2/search.py", readonly_home, "--status")
    assert res.returncode == 0, res.stderr
    assert not any("unreadable" in w for w in json.loads(res.stdout)["warnings"])
    for script in ("sync_data.py", "scripts/image_downloader.py", "scripts/pipeline_monitor.py"):
        assert_refused(run(script, readonly_home), "read-only")
    with pytest.raises(sqlite3.OperationalError):  # and the read-only connection really is one
        db.connect(readonly_home / "etsy_data.db", readonly=True).execute("DELETE FROM image_status")
