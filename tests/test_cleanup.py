"""scripts/cleanup_images.py: selection, dry run, the verified move, refusals, crash safety, --watch, locate_image."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from imageselector import db, layout
from imageselector.cleanup import stage
from imageselector.cleanup.cli import main
from imageselector.layout import image_path, image_relpath
from tests.helpers.cleanup_setup import make_catalogue, other_filesystem, rows, tmpfs, tree

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cleanup_images.py"


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "backup" / "images"
    d.mkdir(parents=True)
    return d


def moved_ok(settings, conn, content, dest: Path) -> None:
    """Every qualifying image is at dest (same bytes), recorded and gone from images/; the rest untouched."""
    for r in rows(conn):
        key = (r["listing_id"], r["image_id"])
        src = image_path(settings.images_dir, *key)
        dst = dest / image_relpath(*key)
        if r["is_primary"]:
            assert src.read_bytes() == content[key] and not dst.exists() and r["archived_at"] is None
        else:
            assert dst.read_bytes() == content[key], key
            assert not src.exists() and r["archived_at"] is not None


def logtext(settings) -> str:
    """What the script logged (setup_logging replaces pytest's capture handler, so read the log file)."""
    return (settings.home / "cleanup_images.log").read_text()


def intact_somewhere(settings, content, dest: Path) -> None:
    for key, data in content.items():
        places = [image_path(settings.images_dir, *key), dest / image_relpath(*key)]
        assert any(p.is_file() and p.read_bytes() == data for p in places), f"{key} lost"


def test_moves_qualifying_images_and_records_them(settings, conn, dest, capsys):
    content = make_catalogue(conn, settings.images_dir, n=12)
    # one non-primary image not yet embedded by every model: must stay
    conn.execute("UPDATE image_status SET embed_dinov3_base=0 WHERE rowid=2")
    kept = (rows(conn)[1]["listing_id"], rows(conn)[1]["image_id"])
    rc = main(["--dest", str(dest), "--min-free-mb", "0", "--batch", "3"])
    assert rc == 0
    for r in rows(conn):
        key = (r["listing_id"], r["image_id"])
        src, dst = image_path(settings.images_dir, *key), dest / image_relpath(*key)
        if r["is_primary"] or key == kept:
            assert src.read_bytes() == content[key] and not dst.exists() and r["archived_at"] is None
        else:
            assert dst.read_bytes() == content[key] and not src.exists() and r["archived_at"] is not None
    assert conn.execute("SELECT COUNT(*) FROM image_status WHERE archived_at IS NOT NULL").fetchone()[0] == 7
    assert db.kv_get(conn, layout.KV_DEST) == str(dest)
    assert db.kv_get(conn, stage.KV_INFLIGHT) == "[]"
    assert not list((dest / ".tmp").glob("*"))
    # image_db.py shows the move
    from imageselector.status import figures

    assert figures.collect(conn)["archived"] == 7
    # a rerun has nothing left to do and changes nothing
    before = tree(dest)
    assert main(["--dest", str(dest), "--min-free-mb", "0"]) == 0
    assert tree(dest) == before


def test_dry_run_changes_nothing(settings, conn, dest, capsys):
    content = make_catalogue(conn, settings.images_dir, n=9)
    expected_bytes = sum(len(v) for (k, v), r in zip(content.items(), rows(conn), strict=True) if not r["is_primary"])
    snap = (tree(settings.images_dir), tree(dest), [tuple(r) for r in rows(conn)], list(conn.iterdump()))
    rc = main(["--dry-run", "--dest", str(dest), "--min-free-mb", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"Would move 6 images ({stage.fmt_bytes(expected_bytes)})" in out
    assert "Destination OK" in out
    assert snap == (tree(settings.images_dir), tree(dest), [tuple(r) for r in rows(conn)], list(conn.iterdump()))


def test_destination_on_another_filesystem(settings, conn, tmp_path):
    content = make_catalogue(conn, settings.images_dir, n=9)
    with other_filesystem(tmp_path) as other:
        if other is None:
            pytest.skip("no second filesystem: mounting a tmpfs is not permitted and /dev/shm is unusable")
        dest = other / "images"
        dest.mkdir()
        assert os.stat(dest).st_dev != os.stat(settings.images_dir).st_dev
        assert main(["--dest", str(dest), "--min-free-mb", "0"]) == 0
        moved_ok(settings, conn, content, dest)


def test_missing_destination_refused(settings, conn, tmp_path):
    content = make_catalogue(conn, settings.images_dir, n=6)
    missing = tmp_path / "nowhere" / "images"
    assert main(["--dest", str(missing), "--min-free-mb", "0"]) == 2
    assert "does not exist" in logtext(settings) and str(missing) in logtext(settings)
    assert not missing.exists()
    assert tree(settings.images_dir) == {
        image_relpath(*k): v for k, v in sorted(content.items(), key=lambda kv: image_relpath(*kv[0]))
    }


def test_unmounted_volume_refused(settings, conn):
    make_catalogue(conn, settings.images_dir, n=6)
    dest = Path("/Volumes/HDD_not_here_4242/embedded_backup/images")
    assert stage.volume_root(dest) == Path("/Volumes/HDD_not_here_4242")
    assert main(["--dest", str(dest), "--min-free-mb", "0"]) == 2
    assert "not mounted" in logtext(settings)
    assert conn.execute("SELECT COUNT(*) FROM image_status WHERE archived_at IS NOT NULL").fetchone()[0] == 0


def test_full_destination_refused_small_tmpfs(settings, conn, tmp_path):
    make_catalogue(conn, settings.images_dir, n=30, size=100_000)  # 20 movable images, about 2 MB
    with tmpfs(tmp_path, "1m") as small:
        if small is None:
            pytest.skip("mounting a tmpfs is not permitted here (see the fake disk_usage test)")
        assert main(["--dest", str(small), "--min-free-mb", "0"]) == 2
        assert "not enough free space" in logtext(settings)
        assert tree(small) == {}
    assert conn.execute("SELECT COUNT(*) FROM image_status WHERE archived_at IS NOT NULL").fetchone()[0] == 0


def test_full_destination_refused_fake_disk_usage(settings, conn, dest, monkeypatch):
    make_catalogue(conn, settings.images_dir, n=6)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(stage.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 50_000_000, 50_000_000))
    # 50 MB free but the default margin (1 GB) must stay free
    assert main(["--dest", str(dest)]) == 2
    assert "not enough free space" in logtext(settings) and "margin" in logtext(settings)
    assert tree(dest) == {}


def test_space_is_rechecked_per_batch(settings, conn, dest, monkeypatch):
    """The disk filling up during a run stops it cleanly before the batch that would not fit."""
    content = make_catalogue(conn, settings.images_dir, n=12)
    usage = namedtuple("usage", "total used free")
    calls = {"n": 0}

    def shrinking(_p):
        calls["n"] += 1
        return usage(10**9, 0, 10**9 if calls["n"] <= 2 else 1000)  # start-up + batch 1 fit; then full

    monkeypatch.setattr(stage.shutil, "disk_usage", shrinking)
    assert main(["--dest", str(dest), "--min-free-mb", "0", "--batch", "3"]) == 2
    assert (
        conn.execute("SELECT COUNT(*) FROM image_status WHERE archived_at IS NOT NULL").fetchone()[0] == 3
    )  # one batch
    intact_somewhere(settings, content, dest)


def _run_script(args: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early rc={proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "worker never reached the pause point"
        time.sleep(0.05)


@pytest.mark.parametrize("point", ["copy", "copied", "recorded"])
def test_kill9_then_rerun_loses_nothing(settings, conn, dest, point):
    content = make_catalogue(conn, settings.images_dir, n=12, size=150_000)
    marker = settings.run_dir / "cleanup_paused"
    proc = _run_script(["--dest", str(dest), "--min-free-mb", "0", "--batch", "4"], {stage.PAUSE_ENV: point})
    try:
        _wait_for(marker, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    marker.unlink()
    intact_somewhere(settings, content, dest)
    if point == "copy":
        assert list((dest / ".tmp").glob("*.tmp")), "the kill should have left a partial copy"
    if point == "recorded":  # recorded but the originals not yet deleted
        assert json.loads(db.kv_get(conn, stage.KV_INFLIGHT))
    assert main(["--dest", str(dest), "--min-free-mb", "0"]) == 0
    moved_ok(settings, conn, content, dest)
    assert not list((dest / ".tmp").glob("*"))


def test_adopts_copy_whose_record_was_lost(settings, conn, dest):
    """Original deleted and copy in place but archived_at lost (e.g. a restored database): adopt, don't redo."""
    content = make_catalogue(conn, settings.images_dir, n=6)
    assert main(["--dest", str(dest), "--min-free-mb", "0"]) == 0
    conn.execute("UPDATE image_status SET archived_at=NULL")
    assert main(["--dest", str(dest), "--min-free-mb", "0"]) == 0
    moved_ok(settings, conn, content, dest)


def test_watch_moves_new_rows_and_stops_on_kill(settings, conn, dest):
    content = make_catalogue(conn, settings.images_dir, n=12)
    conn.execute("UPDATE image_status SET embed_clip_vitl14=0 WHERE rowid > 6")
    proc = _run_script(["--dest", str(dest), "--min-free-mb", "0", "--watch", "--poll", "0.3"], {})

    def archived() -> int:
        return conn.execute("SELECT COUNT(*) FROM image_status WHERE archived_at IS NOT NULL").fetchone()[0]

    try:
        deadline = time.monotonic() + 20
        while archived() < 4:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        conn.execute("UPDATE image_status SET embed_clip_vitl14=1")  # the embedder finishes the rest
        while archived() < 8:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        (settings.home / "KILL").touch()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    moved_ok(settings, conn, content, dest)
    assert "kill file KILL" in (settings.home / "cleanup_images.log").read_text()


def test_kill_file_present_refuses_to_start(settings, conn, dest):
    content = make_catalogue(conn, settings.images_dir, n=6)
    (settings.home / "KILL").touch()
    assert main(["--dest", str(dest), "--min-free-mb", "0"]) == 2  # a refused start is not a success
    assert tree(dest) == {} and len(tree(settings.images_dir)) == len(content)
    assert "KILL present" in logtext(settings)


def test_limit_is_what_the_messages_count(settings, conn, dest):
    """--limit 3 announces 3 (of the qualifying total), and the last line says 0 left, not total - 3."""
    make_catalogue(conn, settings.images_dir, n=12)
    qualifying = stage.count_eligible(conn)
    assert qualifying > 3
    assert main(["--dest", str(dest), "--min-free-mb", "0", "--limit", "3", "--batch", "2"]) == 0
    text = logtext(settings)
    assert f"moving up to 3 of {qualifying:,} qualifying images" in text
    final = next(line for line in text.splitlines() if "finished: " in line)
    assert "3 images done" in final and "0 left, ETA 0s" in final, final
    assert "moved 3 images" in text


def test_bad_copy_keeps_original(settings, conn, dest, monkeypatch):
    """A copy that does not verify is removed, the original stays, the row stays pending and is recorded as bad."""
    content = make_catalogue(conn, settings.images_dir, n=6)
    real = stage.file_digest

    def corrupt(path, *, from_disk=False):
        size, sha = real(path, from_disk=from_disk)
        return (size, "0" * 64) if from_disk and str(dest) in str(path) else (size, sha)

    monkeypatch.setattr(stage, "file_digest", corrupt)
    assert main(["--dest", str(dest), "--min-free-mb", "0"]) == 0
    assert conn.execute("SELECT COUNT(*) FROM image_status WHERE archived_at IS NOT NULL").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM bad_records WHERE kind='cleanup'").fetchone()[0] == 4
    assert len(tree(settings.images_dir)) == len(content)
    assert [p for p in tree(dest) if not p.startswith(".tmp")] == []


def test_locate_image(settings, conn, dest, monkeypatch):
    content = make_catalogue(conn, settings.images_dir, n=6)
    monkeypatch.setenv("CLEANUP_DEST", str(dest))
    assert main(["--min-free-mb", "0"]) == 0
    r_moved, r_kept = rows(conn)[1], rows(conn)[0]
    got = layout.locate_image(settings, r_moved)
    assert got == dest / image_relpath(r_moved["listing_id"], r_moved["image_id"])
    assert got.read_bytes() == content[(r_moved["listing_id"], r_moved["image_id"])]
    assert layout.locate_image(settings, (r_kept["listing_id"], r_kept["image_id"])) == image_path(
        settings.images_dir, r_kept["listing_id"], r_kept["image_id"]
    )
    assert layout.locate_image(settings, {"listing_id": 1, "image_id": 2}, conn) is None


def test_help_exits_zero():
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "--dry-run" in res.stdout and "--watch" in res.stdout
