"""Files corrupted after download are fetched again (`--verify`), and a missing images/ is refused, not refetched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from imageselector import layout
from imageselector.download.cli import main
from imageselector.imagecheck import decode_error
from tests.helpers.download_setup import all_rows, assert_flags_match_files, row_path
from tests.helpers.fake_cdn import FakeCdn
from tests.helpers.rows import seed_images

ROOT = Path(__file__).resolve().parent.parent


def run(monkeypatch, cdn: FakeCdn, *args: str) -> int:
    monkeypatch.setenv("ETSY_CDN_BASE", cdn.base)
    return main(["--progress-interval", "600", "--engine", "threads", "--concurrency", "4", *args])


def paths(settings, conn) -> list[Path]:
    return [layout.image_path(settings.images_dir, r["listing_id"], r["image_id"]) for r in all_rows(conn)]


def test_verify_decodes_every_file_and_fetches_the_broken_ones_again(settings, conn, monkeypatch):
    seed_images(conn, 6)
    with FakeCdn() as cdn:
        assert run(monkeypatch, cdn) == 0
        files = paths(settings, conn)
        body = files[0].read_bytes()
        files[0].write_bytes(body[: len(body) // 2])  # cut off on disk after the download
        files[1].write_bytes(b"\xff\xd8\xff" + os.urandom(len(body)))  # bit rot: a JPEG start, then noise
        assert decode_error(files[0]) and decode_error(files[1])
        assert run(monkeypatch, cdn, "--verify") == 0
        hits = [cdn.hits[row_path(r)] for r in all_rows(conn)]
    assert hits == [2, 2, 1, 1, 1, 1]  # only the two broken files were fetched again
    assert all(decode_error(p) is None for p in files)
    assert_flags_match_files(conn, settings.images_dir)
    assert not list(settings.tmp_dir.glob("*.tmp"))


def _cli(home: Path, cdn: FakeCdn, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home), "ETSY_CDN_BASE": cdn.base}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "image_downloader.py"), "--engine", "threads", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_a_missing_images_folder_is_refused_loudly_not_fetched_again(settings, conn, home):
    seed_images(conn, 5)
    with FakeCdn() as cdn:
        assert _cli(home, cdn).returncode == 0
        shutil.rmtree(settings.images_dir)  # the external disk is not mounted
        status = subprocess.run(
            [sys.executable, str(ROOT / "image_db.py")], capture_output=True, text=True, check=True
        ).stdout
        assert f"WARNING: {settings.images_dir} is missing but 5 rows say downloaded: is the disk mounted?" in status
        res = _cli(home, cdn)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "is missing but 5 rows say downloaded" in lines[0], res.stderr
        assert "--refetch-missing" in lines[0] and "Traceback" not in res.stderr
        assert sum(cdn.hits.values()) == 5  # nothing fetched again
        assert all(r["download_done"] == 1 for r in all_rows(conn))  # and no flag touched
        settings.images_dir.mkdir()  # an empty mount point is the same mistake
        res = _cli(home, cdn)
        assert res.returncode == 2 and "is empty but 5 rows say downloaded" in res.stderr
        res = _cli(home, cdn, "--refetch-missing")  # asked for explicitly: everything is fetched again
        assert res.returncode == 0, res.stderr
        assert sum(cdn.hits.values()) == 10
    assert_flags_match_files(conn, settings.images_dir)
